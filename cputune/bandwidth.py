"""STREAM-style bandwidth runs: which CPUs read which node's memory, how big, how often.

The C extension only times kernels; this module plans the runs (per node, whole machine,
node-to-node matrix, thread sweep), sizes arrays by STREAM's rules within a safe share of
free memory, validates checksums and turns seconds into GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from cputune import stats
from cputune.errors import ProbeError

KERNELS = ("read", "copy", "triad")
# Bytes counted per element per thread, STREAM's convention (stream.c: bytes[] = {2,2,3,3} *
# sizeof(double)); read-only counts its one load. The SIMD copy/triad kernels use non-temporal
# stores, so these counts equal bus traffic; the scalar fallback's write-allocate reads (one
# extra 8 B per element written, hardware.md 1.1) are not counted.
BYTES_PER_ELEMENT = {"read": 8, "copy": 16, "triad": 24}
ARRAYS = {"read": 1, "copy": 2, "triad": 3}
# Values the kernels leave behind (bwprobe.c): read sums a = 1.0; copy b = a = 1.0;
# triad a = b + 3.0 * c = 2.0 + 3.0 * 0.5.
EXPECTED_PER_ELEMENT = {"read": 1.0, "copy": 1.0, "triad": 3.5}

MIB = 1 << 20
MIN_ARRAY_BYTES = 8 * 1_000_000  # STREAM: at least 1 million elements
# Share of memory a probe may hold at once: of MemAvailable overall, and of a node's free memory.
MAX_SHARE_AVAILABLE = 0.25
MAX_SHARE_NODE = 0.5
# Smallest array the planner asks for: 1 GiB read at 20-30 GB/s is a ~40 ms trial on a small box.
FLOOR_BYTES = 1 << 30
QUICK_FLOOR_BYTES = 256 * MIB


@dataclass(frozen=True, slots=True)
class Layout:
    """What the planner needs from the topology: one CPU per physical core per node (ordered to
    spread across L3 groups), cache sizes and free memory."""

    node_cores: dict[int, tuple[int, ...]]
    llc_bytes: int  # all last-level caches of the machine together
    node_llc_bytes: dict[int, int]
    node_free_bytes: dict[int, int]
    mem_available_bytes: int
    numa: bool = True  # False when the kernel exposes no NUMA nodes: memory by first touch


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    kind: str  # node | machine | matrix | sweep
    kernel: str
    cpus: tuple[int, ...]
    mem_nodes: tuple[int, ...]  # per thread; -1 = first touch only
    bytes_per_array: int  # per thread
    ntimes: int
    cpu_node: int | None = None
    mem_node: int | None = None


@dataclass(frozen=True, slots=True)
class Measurement:
    run: Run
    isa: str
    elements_per_thread: int
    bytes_per_trial: int  # STREAM-counted bytes of one trial, all threads
    seconds: tuple[float, ...]
    best_gbps: float  # STREAM: best trial after the first
    gbps: stats.Summary  # trials after the first
    checksum_ok: bool
    nt_stores: bool


@dataclass(frozen=True, slots=True)
class Plan:
    runs: tuple[Run, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def available_isas(mod=None) -> list[str]:
    """Kernel ISAs this CPU and build offer, best first (bwprobe registers only those)."""
    mod = mod or _module()
    return [isa for isa in ("avx512", "avx2", "scalar") if hasattr(mod, f"read_{isa}")]


def _module():
    try:
        from cputune import _bwprobe
    except ImportError as e:  # pragma: no cover - a broken install
        raise ProbeError("the bandwidth probe's C extension is not built",
                         hint="reinstall cputune with `pip install .` (needs gcc)") from e
    return _bwprobe


def array_bytes(llc_bytes: int, threads: int, narrays: int, cap_bytes: int,
                floor_bytes: int = 256 * MIB) -> tuple[int, str | None]:
    """Per-thread bytes per array: total per array >= 4 x the caches in the run (STREAM rule)
    and >= 1M elements, unless that breaks the memory cap, which then wins with a note.
    `floor_bytes` keeps small-cache boxes' trials long enough (>= ~50 ms, hardware.md 3.1)."""
    want_total = max(4 * llc_bytes, MIN_ARRAY_BYTES, floor_bytes)
    cap_total = cap_bytes // narrays
    note = None
    total = want_total
    if want_total > cap_total:
        total = cap_total
        if total < 4 * llc_bytes:
            note = (f"arrays of {total / MIB:.0f} MiB are below STREAM's 4 x cache rule "
                    f"({4 * llc_bytes / MIB:.0f} MiB): free memory is short")
    per = max(total // threads, 64 * 8)
    return per - per % 4096, note


def plan_probe(layout: Layout, quick: bool = False, matrix: bool = True, sweep: bool = True,
               kernels: Iterable[str] = KERNELS) -> Plan:
    ntimes = 5 if quick else 20
    floor = QUICK_FLOOR_BYTES if quick else FLOOR_BYTES
    kernels = ("read",) if quick else tuple(kernels)
    nodes = sorted(n for n, c in layout.node_cores.items() if c)
    if not nodes:
        raise ProbeError("no CPUs with a NUMA node were found to run the probe on")
    runs: list[Run] = []
    notes: list[str] = []

    def mem(node: int) -> int:
        return node if layout.numa else -1

    def cap_for(mem_nodes: set[int]) -> int:
        cap = int(MAX_SHARE_AVAILABLE * layout.mem_available_bytes)
        if layout.numa:
            cap = min([cap] + [int(MAX_SHARE_NODE * layout.node_free_bytes.get(n, 0)) * len(mem_nodes)
                               for n in mem_nodes])
        return cap

    def add(name, kind, kernel, cpus, mem_nodes, llc, cpu_node=None, mem_node=None, n=ntimes):
        per, note = array_bytes(llc, len(cpus), ARRAYS[kernel], cap_for(set(mem_nodes)), floor)
        if note and note not in notes:
            notes.append(note)
        runs.append(Run(name, kind, kernel, tuple(cpus), tuple(mem(m) for m in mem_nodes), per, n,
                        cpu_node, mem_node))

    for node in nodes:
        cores = layout.node_cores[node]
        for k in kernels:
            add(f"node {node}", "node", k, cores, [node] * len(cores),
                layout.node_llc_bytes.get(node, layout.llc_bytes), node, node)
    if len(nodes) > 1:
        cpus = [c for n in nodes for c in layout.node_cores[n]]
        owners = [n for n in nodes for _ in layout.node_cores[n]]
        for k in kernels:
            add("all nodes", "machine", k, cpus, owners, layout.llc_bytes)
        if matrix and not quick:
            for i in nodes:
                for j in nodes:
                    if i != j:
                        cores = layout.node_cores[i]
                        add(f"node {i} -> mem {j}", "matrix", "read", cores, [j] * len(cores),
                            layout.node_llc_bytes.get(i, layout.llc_bytes), i, j, max(5, ntimes // 2))
    if sweep and not quick:
        node = nodes[0]
        cores = layout.node_cores[node]
        counts, c = [], 1
        while c < len(cores):
            counts.append(c)
            c *= 2
        for c in counts:  # the full node is the "node" read run already
            add(f"{c} core" + ("" if c == 1 else "s"), "sweep", "read", cores[:c], [node] * c,
                layout.node_llc_bytes.get(node, layout.llc_bytes), node, node, max(5, ntimes // 2))
    return Plan(tuple(runs), tuple(notes))


def measure(run: Run, isa: str | None = None, mod=None) -> Measurement:
    mod = mod or _module()
    isa = isa or available_isas(mod)[0]
    fn = getattr(mod, f"{run.kernel}_{isa}")
    try:
        seconds, checksum, n = fn(run.cpus, run.mem_nodes, run.bytes_per_array, run.ntimes)
    except OSError as e:
        raise ProbeError(f"{run.name} {run.kernel}: {e.filename or 'a system call'} failed: "
                         f"{e.strerror}", hint="is the cpuset or memory limit smaller than "
                         "the topology says?") from e
    threads = len(run.cpus)
    per_trial = BYTES_PER_ELEMENT[run.kernel] * n * threads
    expected = EXPECTED_PER_ELEMENT[run.kernel] * n * threads
    ok = abs(checksum - expected) <= 1e-9 * expected
    timed = seconds[1:] if len(seconds) > 1 else seconds
    rates = [per_trial / s / 1e9 for s in timed]
    return Measurement(run=run, isa=isa, elements_per_thread=n, bytes_per_trial=per_trial,
                       seconds=tuple(seconds), best_gbps=max(rates), gbps=stats.summarize(rates),
                       checksum_ok=ok, nt_stores=isa != "scalar" and run.kernel != "read")


def run_plan(plan: Plan, progress: Callable[[int, int, str], None] | None = None,
             isa: str | None = None) -> list[Measurement]:
    """Runs one at a time; a Ctrl-C between kernels returns nothing half-done (the C side frees
    its arrays before returning, and Python raises KeyboardInterrupt after the call)."""
    out = []
    total = len(plan.runs)
    for i, run in enumerate(plan.runs):
        if progress:
            progress(i, total, f"{run.name} {run.kernel}")
        m = measure(run, isa)
        if not m.checksum_ok:
            raise ProbeError(f"{run.name} {run.kernel}: the kernel's checksum is wrong",
                             hint="the probe's results cannot be trusted; please report this")
        out.append(m)
    if progress:
        progress(total, total, "done")
    return out


@dataclass(frozen=True, slots=True)
class BandwidthSummary:
    """The figures the predictor and the findings use (best trial, GB/s = 10^9 B/s).

    `read_gbps` is the whole machine reading node-local memory (the decode pattern); on a
    one-node box it is that node's run.
    """

    isa: str
    read_gbps: float
    copy_gbps: float | None
    triad_gbps: float | None
    node_read_gbps: dict[int, float]
    matrix_read_gbps: tuple[tuple[int, int, float], ...]  # (cpu node, memory node, GB/s)
    sweep_read_gbps: tuple[tuple[int, float], ...]  # (cores, GB/s), ending with the whole node


def summarize_measurements(ms: list[Measurement]) -> BandwidthSummary:
    if not ms:
        raise ProbeError("no bandwidth measurements to summarize")
    scope = "machine" if any(m.run.kind == "machine" for m in ms) else "node"

    def total(kernel: str) -> float | None:
        vals = [m.best_gbps for m in ms if m.run.kind == scope and m.run.kernel == kernel]
        return sum(vals) if vals else None

    node_read = {m.run.cpu_node: m.best_gbps for m in ms
                 if m.run.kind == "node" and m.run.kernel == "read"}
    sweep = [(len(m.run.cpus), m.best_gbps) for m in ms if m.run.kind == "sweep"]
    first = min(node_read) if node_read else None
    if first is not None:
        full = next(m for m in ms if m.run.kind == "node" and m.run.kernel == "read"
                    and m.run.cpu_node == first)
        sweep.append((len(full.run.cpus), full.best_gbps))
    return BandwidthSummary(
        isa=ms[0].isa,
        read_gbps=total("read") or 0.0,
        copy_gbps=total("copy"),
        triad_gbps=total("triad"),
        node_read_gbps=dict(sorted(node_read.items())),
        matrix_read_gbps=tuple((m.run.cpu_node, m.run.mem_node, m.best_gbps)
                               for m in ms if m.run.kind == "matrix"),
        sweep_read_gbps=tuple(sorted(sweep)),
    )
