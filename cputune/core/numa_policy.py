"""The one NUMA rule: which nodes a model runs on, how its weights are placed, how many threads.

predict, select, plan, serve (and its dry run) and tune all ask `decide`, so on one box and one
model they name the same policy, threads and nodes. It is pure: the caller says how many nodes
and cores there are, how much memory one node offers (what is free there on a live box, the
DIMMs on a described one), what the model needs (selector.ram_needed, OS headroom included)
and whether numactl exists.

The rule (shared/reference/llama_cpp_cpu.md A2; cputune.engine.placement for the mechanics):
- one node: nothing to place;
- the model fits in one node: run there, threads = that node's physical cores, weights local
  (no cross-socket reads: published dual-socket decode is only 1.02-1.08x one socket);
- it does not fit: weights interleaved over every node (numactl --interleave=all), threads on
  all nodes; without numactl, threads spread (--numa distribute) and pages go by first touch.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30

# The policies the predictor models, and the placement mode (placement.py) that realises each.
PLACEMENT_OF = {"one-node": "node", "interleave": "interleave", "distribute": "distribute", "off": "off"}
POLICY_OF = {"node": "one-node", "interleave": "interleave", "distribute": "distribute",
             "isolate": "one-node", "off": "off"}


@dataclass(frozen=True, slots=True)
class NumaDecision:
    policy: str  # one-node | interleave | distribute | off (the predictor's names)
    threads: int
    nodes: int  # NUMA nodes whose cores run threads
    reason: str
    notes: tuple[str, ...] = ()

    @property
    def placement_mode(self) -> str:
        return PLACEMENT_OF[self.policy]


def fits_one_node(need_bytes: int | None, node_bytes: int | None) -> bool:
    """Whether `need_bytes` fits in the memory one node offers (unknown on either side: no)."""
    return need_bytes is not None and node_bytes is not None and 0 < need_bytes <= node_bytes


def node_bytes_of_box(mem_bytes: int, nodes: int) -> int:
    """What one node of a described box offers: its share of the DIMMs (the need it is compared
    with, selector.ram_needed, already holds the OS's headroom)."""
    return mem_bytes // max(nodes, 1)


def decide(*, nodes: int, cores_per_node: int, need_bytes: int | None, node_bytes: int | None,
           numactl: bool = True, requested: str = "auto", threads: int | None = None,
           threads_per_core: int = 1) -> NumaDecision:
    """Policy, threads and nodes for one model on one box (see the module docstring).

    `requested` is auto or one of the predictor's policies. Threads default to the physical
    cores of the nodes used; asked-for threads are kept (the predictor says what SMT siblings
    do) up to the logical CPUs of those nodes, and capped there with a note.
    """
    nodes = max(nodes, 1)
    cores_per_node = max(cores_per_node, 1)
    threads_per_core = max(threads_per_core, 1)
    notes: list[str] = []
    if requested == "auto":
        if nodes == 1:
            policy, reason = "one-node", "one NUMA node: nothing to place"
        elif fits_one_node(need_bytes, node_bytes):
            policy = "one-node"
            reason = (f"fits in one node ({need_bytes / GIB:.1f} of {node_bytes / GIB:.1f} GiB): one "
                      "node's bandwidth, no cross-socket reads")
        else:
            why = ("memory per node unknown" if need_bytes is None or node_bytes is None else
                   f"needs {need_bytes / GIB:.1f} GiB, more than any one node has (at most {node_bytes / GIB:.1f} GiB)")
            policy = "interleave" if numactl else "distribute"
            reason = why + (": weights interleaved over all nodes" if numactl else
                            ": threads spread over all nodes (numactl is not installed)")
    else:
        policy, reason = requested, f"--numa {requested}"
        if requested == "one-node" and nodes > 1 and need_bytes is not None and node_bytes is not None \
                and not fits_one_node(need_bytes, node_bytes):
            notes.append(f"the model needs {need_bytes / GIB:.1f} GiB, more than one node offers "
                         f"({node_bytes / GIB:.1f} GiB): it will spill to other nodes or not load")
    used = 1 if policy == "one-node" else nodes
    cores, logical = cores_per_node * used, cores_per_node * used * threads_per_core
    n = threads or cores
    where = "one node" if used == 1 else f"{used} nodes"
    if n > logical:
        notes.append(f"--threads {n} is more than the {logical} CPUs of {where}: capped at {logical}"
                     + (" (--numa interleave or distribute use every node)" if used == 1 < nodes else ""))
        n = logical
    elif n > cores:
        notes.append(f"{n} threads on {cores} physical cores: {n - cores} run on SMT siblings")
    return NumaDecision(policy=policy, threads=n, nodes=used, reason=reason, notes=tuple(notes))
