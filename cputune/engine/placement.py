"""Where llama.cpp's threads and weights go on a NUMA box: the numactl prefix, llama.cpp's --numa
and thread counts, as a pure function of the topology, so a recorded machine plans like a live one.

How the modes map (ggml/src/ggml-cpu/ggml-cpu.c @0c1e57098, shared/reference/llama_cpp_cpu.md A2):

- ``node:N`` is ``numactl --cpunodebind=N --membind=N`` and *no* ``--numa``. With ``--numa numactl``
  on a box of more than one node, ggml_graph_compute ends every graph with
  clear_numa_thread_affinity(), which widens the main compute thread to every CPU of the machine, so
  that thread would leave the node; ``--numa`` also turns matmul chunking and the loader's mmap
  prefetch off. Without it every thread simply inherits numactl's CPU and memory binding.
- ``interleave`` is ``numactl --interleave=all`` plus ``--numa distribute``: pages go round-robin over
  the nodes whichever thread touches them first (the loading thread repacks Q4_0/Q4_K weights into
  fresh buffers, which first-touch would put on one node), and compute threads alternate nodes.
- ``distribute`` is ``--numa distribute`` alone: threads alternate nodes and weight pages land where
  they are first touched; pages already in the page cache stay where an earlier run left them (#1437).
- ``isolate`` is ``--numa isolate``: every thread on the node the main thread starts on.
- ``auto`` picks ``node:N`` (the node with the most available memory) when the model fits in one node,
  else ``interleave`` (``distribute`` when numactl is missing); ``off`` on a one-node box.

llama.cpp counts nodes as node0, node1, ... up to the first missing id and at most 8
(GGML_NUMA_MAX_NODES), and CPUs up to 512; distribute and isolate only know those.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from cputune.core import numa_policy
from cputune.core.checks import shown
from cputune.core.errors import ConfigError, EngineError
from cputune.core.sysfs import format_cpulist
from cputune.machine.topology import Topology

MODES = ("auto", "off", "distribute", "isolate", "interleave", "node:N")
WORKER_MODES = ("auto", "off", "interleave", "node:N")  # ggml-rpc-server has no --numa
GGML_NUMA_MAX_NODES = 8  # ggml-cpu.c
GGML_NUMA_MAX_CPUS = 512


@dataclass(frozen=True, slots=True)
class NumaChoice:
    """A parsed --numa value; node_id is set for node:N only."""

    mode: str
    node_id: int | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the server runs. `cpus` is what every thread's Cpus_allowed_list must stay within."""

    mode: str  # off, node, distribute, isolate or interleave (auto resolved)
    requested: str  # the --numa value as given
    node_ids: tuple[int, ...]  # nodes whose CPUs run the threads
    mem_node_ids: tuple[int, ...]  # nodes whose memory holds the weights
    numactl_argv: tuple[str, ...]
    llama_numa: str | None  # value for llama.cpp's --numa, None to leave it off
    threads: int
    threads_batch: int
    cpus: tuple[int, ...]
    physical_cores: int  # cores (not SMT siblings) among `cpus`
    reason: str
    warnings: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def cpu_list(self) -> str:
        return format_cpulist(self.cpus)


def parse_numa(text: str, worker: bool = False) -> NumaChoice:
    """auto|off|distribute|isolate|interleave|node:N (a worker: auto|off|interleave|node:N)."""
    valid = WORKER_MODES if worker else MODES
    value = (text or "").strip().lower()
    m = re.fullmatch(r"node[:=]?([0-9]{1,9})", value, re.ASCII)
    if m:
        return NumaChoice("node", int(m.group(1)))
    if value in valid and value != "node:N":
        return NumaChoice(value)
    hint = "choose one of: " + ", ".join(valid)
    if worker and value in ("distribute", "isolate"):
        hint = "ggml-rpc-server has no --numa option; " + hint
    raise ConfigError(f"unknown --numa {shown(text)}", hint=hint)


def llama_visible_nodes(node_ids) -> tuple[int, ...]:
    """The nodes ggml_numa_init counts: node0, node1, ... until the first missing id, at most 8."""
    present, out = set(node_ids), []
    while len(out) in present and len(out) < GGML_NUMA_MAX_NODES:
        out.append(len(out))
    return tuple(out)


def _cores(t: Topology, cpus) -> int:
    return len(t.first_thread_per_core(cpus))


def _node_cpus(t: Topology, node_ids) -> tuple[int, ...]:
    allowed = set(t.allowed_cpus)
    return tuple(sorted(c for n in t.nodes if n.id in node_ids for c in n.cpus if c in allowed))


def _ids(ids) -> str:
    return format_cpulist(ids)


def plan_placement(topology: Topology, numa: NumaChoice | str = "auto", *, threads: int | None = None,
                   threads_batch: int | None = None, numactl_available: bool = True,
                   numa_balancing: int | None = None, need_bytes: int | None = None,
                   node_available_bytes: Mapping[int, int] | None = None,
                   worker: bool = False) -> Placement:
    """Plan the placement of one llama-server (or, with worker=True, one ggml-rpc-server).

    `need_bytes` (RAM the server will hold) and `node_available_bytes` (per node) let auto choose
    one node when the model fits there; threads default to the physical cores of the nodes used.
    """
    t = topology
    choice = parse_numa(numa, worker) if isinstance(numa, str) else numa
    requested = f"node:{choice.node_id}" if choice.mode == "node" else choice.mode
    cpu_nodes = tuple(n.id for n in t.nodes if n.id in t.allowed_node_ids
                      and set(n.cpus) & set(t.allowed_cpus))
    visible = tuple(i for i in llama_visible_nodes(n.id for n in t.nodes) if i in cpu_nodes)
    multi = len(cpu_nodes) > 1
    # With fewer than two nodes counted, ggml_is_numa() is false and --numa pins nothing.
    spread_nodes = visible if len(visible) > 1 else cpu_nodes
    warnings: list[str] = []
    notes: list[str] = []
    mode, reason = choice.mode, ""

    if mode == "auto":
        # The one NUMA rule (numa_policy.decide, which predict, select, plan and tune ask too),
        # on the node with the most memory available.
        avail = dict(node_available_bytes or {})
        known = [n for n in cpu_nodes if n in avail]
        best = max(known, key=lambda n: (avail[n], -n)) if known else None
        d = numa_policy.decide(nodes=len(cpu_nodes), cores_per_node=max(_cores(t, t.allowed_cpus) // max(len(cpu_nodes), 1), 1),
                               need_bytes=need_bytes, node_bytes=avail.get(best) if best is not None else None,
                               numactl=numactl_available)
        if not multi:
            mode, reason = "off", "one NUMA node: nothing to place"
        elif d.policy == "one-node":
            mode, reason = "node", (f"fits in node {best} ({need_bytes / 2**30:.1f} of "
                                    f"{avail[best] / 2**30:.1f} GiB available): one node's "
                                    "bandwidth, no cross-socket reads")
            choice = NumaChoice("node", best)
        elif worker and not numactl_available:
            mode = "off"
            reason = d.reason.split(":")[0] + ": numactl is not installed, so the worker is not placed"
            warnings.append("numactl is not installed: the worker's memory lands wherever its "
                            "threads first touch it (apt install numactl)")
        else:
            mode, reason = d.placement_mode, d.reason
            if mode == "distribute":
                warnings.append("numactl is not installed, so pages are placed by first touch "
                                "instead of interleaved (apt install numactl)")
    elif not reason:
        reason = f"--numa {requested}"

    numactl: tuple[str, ...] = ()
    llama_numa: str | None = None
    if mode == "node":
        nid = choice.node_id
        ids = [n.id for n in t.nodes]
        if nid not in ids:
            raise ConfigError(f"--numa node:{nid}: there is no NUMA node {nid}",
                              hint=f"this machine has node{'s' if len(ids) > 1 else ''} {_ids(ids)}")
        if nid not in cpu_nodes:
            why = "has no CPUs" if not t.node(nid).cpus else "is not allowed to this process (cpuset)"
            raise ConfigError(f"--numa node:{nid}: node {nid} {why}",
                              hint=f"nodes with CPUs here: {_ids(cpu_nodes)}")
        used, mem_nodes = (nid,), (nid,)
        if multi:
            if not numactl_available:
                raise EngineError(f"--numa node:{nid} needs numactl, which is not installed",
                                  hint="apt install numactl (or dnf install numactl)")
            numactl = ("numactl", f"--cpunodebind={nid}", f"--membind={nid}")
    elif mode == "interleave":
        used, mem_nodes = (cpu_nodes if worker else spread_nodes), cpu_nodes
        if not multi:
            mode = "off"
            notes.append("one NUMA node: --numa interleave changes nothing here")
        elif not numactl_available:
            raise EngineError("--numa interleave needs numactl, which is not installed",
                              hint="apt install numactl, or use --numa distribute")
        else:
            numactl = ("numactl", "--interleave=all")
            llama_numa = None if worker else "distribute"
    elif mode in ("distribute", "isolate"):
        used, mem_nodes = spread_nodes, cpu_nodes
        if not multi:
            notes.append(f"one NUMA node: llama.cpp ignores --numa {mode} here")
        llama_numa = mode
    else:  # off
        used, mem_nodes = cpu_nodes, cpu_nodes

    if mode == "off":
        cpus = tuple(t.allowed_cpus)
    elif mode == "node":
        cpus = _node_cpus(t, used)
    else:
        # distribute and isolate widen threads to whole nodes, and ggml resets the main thread to
        # every CPU after each graph (clear_numa_thread_affinity): the allowed set is the whole box.
        cpus = tuple(t.allowed_cpus)
    if mode == "isolate":
        per_node = [_cores(t, _node_cpus(t, (n,))) for n in used] or [_cores(t, cpus)]
        cores = min(per_node)
        notes.append("isolate keeps every thread on the node the server starts on; "
                     "node:N chooses the node and its memory")
    elif mode in ("distribute", "interleave") and not worker:
        cores = _cores(t, _node_cpus(t, used))
    else:
        cores = _cores(t, cpus)

    if multi and mode in ("distribute", "isolate", "interleave") and not worker:
        hidden = [n for n in cpu_nodes if n not in visible]
        why = f"it counts node ids from 0 up to the first gap, at most {GGML_NUMA_MAX_NODES}"
        if len(visible) < 2:
            warnings.append(f"llama.cpp's --numa finds fewer than two nodes here ({why}), so it "
                            "pins no thread; node:N or interleave place the server through numactl")
        elif hidden:
            warnings.append(f"llama.cpp's --numa sees nodes {_ids(visible)} only ({why}): the CPUs "
                            f"of node{'s' if len(hidden) > 1 else ''} {_ids(hidden)} run no compute thread")
        if max(t.online_cpus, default=0) >= GGML_NUMA_MAX_CPUS:
            warnings.append(f"llama.cpp's --numa knows CPUs 0-{GGML_NUMA_MAX_CPUS - 1} only")
    if multi and numa_balancing:
        warnings.append(f"numa_balancing is on ({numa_balancing}): the kernel migrates the weights' "
                        "pages while llama.cpp runs, which llama.cpp itself warns impairs performance "
                        "(sudo sysctl -w kernel.numa_balancing=0)")

    n_threads = cores if threads is None else threads
    n_batch = n_threads if threads_batch is None else threads_batch
    for name, n in (("--threads", n_threads), ("--threads-batch", n_batch)):
        if n < 1:
            raise ConfigError(f"{name} {n}: must be at least 1", hint=f"{name} auto uses {cores}")
        if n > len(cpus):
            warnings.append(f"{name} {n} is more than the {len(cpus)} CPUs the server may use: "
                            "threads will share CPUs, which slows llama.cpp down")
    return Placement(mode=mode, requested=requested, node_ids=tuple(used), mem_node_ids=tuple(mem_nodes),
                     numactl_argv=numactl, llama_numa=llama_numa, threads=n_threads,
                     threads_batch=n_batch, cpus=cpus, physical_cores=_cores(t, cpus),
                     reason=reason, warnings=tuple(warnings), notes=tuple(notes))
