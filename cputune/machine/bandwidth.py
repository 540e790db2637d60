"""STREAM-style bandwidth runs: which CPUs read which node's memory, how big, how often.

The C extension only times kernels; this module plans the runs (per node, whole machine,
node-to-node matrix, thread sweep), sizes arrays by STREAM's rules within a safe share of
free memory, validates checksums and turns seconds into GB/s. A shared or throttling host reads
at different speeds from one second to the next, so the read runs are measured in bursts spread
over the probe, and one rule (`combine_bursts`) turns bursts into the figure the predictor uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Sequence

from cputune.core import stats
from cputune.core.errors import ProbeError

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

# Bursts (issue 18): the same 2-thread read gave 29.4, 59.0 and 56.8 GB/s in three calls a few
# seconds apart on the project's VM, so one burst of trials inside a second catches one phase of
# the host. Read runs are repeated in bursts spaced over at least SPAN_S; trials per burst
# (first one discarded) are fewer than one long run had. Copy, triad and the matrix run once.
BURSTS, QUICK_BURSTS = 5, 4
SPAN_S, QUICK_SPAN_S = 12.0, 3.0
NTIMES, QUICK_NTIMES, SWEEP_NTIMES, ONCE_NTIMES = 8, 5, 6, 20
# Bursts whose figures differ by more than this share (and by more than the trials within a
# burst do) are reported: past 10 % the predictions' 15 % target is at stake.
BURSTS_DISAGREE = 0.10
# The figure a run stands for when its bursts disagree. Another tenant or a throttled clock only
# ever slows a read, and the predictor predicts the box alone: so the best burst, as calibrate
# takes a point's fastest repetition. The median is recorded beside it.
FIGURE_RULE = ("best burst: other load only slows a read, and the predictor predicts the box alone "
               "(calibrate keeps a point's fastest run by the same rule)")
# Reads beside a llama-bench run (calibrate, bench): quick-probe arrays, one short burst, so the
# read costs ~0.15 s on a small box rather than the full probe's ~0.5 s per thread count.
MOMENT_NTIMES = 6


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
    """One burst: one kernel call of `run.ntimes` trials."""

    run: Run
    isa: str
    elements_per_thread: int
    bytes_per_trial: int  # STREAM-counted bytes of one trial, all threads
    seconds: tuple[float, ...]
    best_gbps: float  # STREAM: best trial after the first
    gbps: stats.Summary  # trials after the first
    checksum_ok: bool
    nt_stores: bool
    burst: int = 0  # which burst of its run, in time order
    at_s: float = 0.0  # when the burst started, seconds after the first step of its plan


@dataclass(frozen=True, slots=True)
class Step:
    """One kernel call of a plan: a run's `burst`-th measurement, started no earlier than
    `not_before_s` after the plan began (waiting if the steps before it were quicker)."""

    run: Run
    burst: int = 0
    not_before_s: float = 0.0


@dataclass(frozen=True, slots=True)
class BandwidthPlan:
    runs: tuple[Run, ...]  # each distinct run once, in plan order
    notes: tuple[str, ...] = field(default_factory=tuple)
    steps: tuple[Step, ...] = ()  # the order they are measured in; empty: each run once, in order

    def schedule(self) -> tuple[Step, ...]:
        return self.steps or tuple(Step(r) for r in self.runs)


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


def _cap_bytes(layout: Layout, mem_nodes: set[int]) -> int:
    """Bytes a run may hold: a share of MemAvailable, and of each memory node's free memory."""
    cap = int(MAX_SHARE_AVAILABLE * layout.mem_available_bytes)
    if layout.numa:
        cap = min([cap] + [int(MAX_SHARE_NODE * layout.node_free_bytes.get(n, 0)) * len(mem_nodes)
                           for n in mem_nodes])
    return cap


def is_burst_sampled(run: Run) -> bool:
    """The read runs the predictor and the findings use are measured in bursts; copy, triad and
    the node-to-node matrix (ratios and extras) once, between them."""
    return run.kernel == "read" and run.kind in ("node", "machine", "sweep")


def plan_probe(layout: Layout, quick: bool = False, matrix: bool = True, sweep: bool = True,
               kernels: Iterable[str] = KERNELS, bursts: int | None = None,
               span_s: float | None = None) -> BandwidthPlan:
    ntimes = QUICK_NTIMES if quick else NTIMES
    bursts = bursts or (QUICK_BURSTS if quick else BURSTS)
    span_s = (QUICK_SPAN_S if quick else SPAN_S) if span_s is None else span_s
    floor = QUICK_FLOOR_BYTES if quick else FLOOR_BYTES
    kernels = ("read",) if quick else tuple(kernels)
    nodes = sorted(n for n, c in layout.node_cores.items() if c)
    if not nodes:
        raise ProbeError("no CPUs with a NUMA node were found to run the probe on")
    runs: list[Run] = []
    notes: list[str] = []

    def mem(node: int) -> int:
        return node if layout.numa else -1

    def add(name, kind, kernel, cpus, mem_nodes, llc, cpu_node=None, mem_node=None, n=None):
        n = n or (ntimes if kernel == "read" else ONCE_NTIMES)
        per, note = array_bytes(llc, len(cpus), ARRAYS[kernel], _cap_bytes(layout, set(mem_nodes)), floor)
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
                            layout.node_llc_bytes.get(i, layout.llc_bytes), i, j, ONCE_NTIMES // 2)
    if sweep and not quick:
        node = nodes[0]
        cores = layout.node_cores[node]
        counts, c = [], 1
        while c < len(cores):
            counts.append(c)
            c *= 2
        for c in counts:  # the full node is the "node" read run already
            add(f"{c} core" + ("" if c == 1 else "s"), "sweep", "read", cores[:c], [node] * c,
                layout.node_llc_bytes.get(node, layout.llc_bytes), node, node, SWEEP_NTIMES)
    return BandwidthPlan(tuple(runs), tuple(notes), burst_schedule(runs, bursts, span_s))


def burst_schedule(runs: Sequence[Run], bursts: int, span_s: float) -> tuple[Step, ...]:
    """Every burst-sampled run once per round, `bursts` rounds spaced at least span_s / (bursts - 1)
    apart; the runs measured once fill the gaps between rounds, so on a big box the rounds spread
    over the whole probe without waiting."""
    repeated = [r for r in runs if is_burst_sampled(r)]
    once = [r for r in runs if not is_burst_sampled(r)]
    if bursts <= 1 or not repeated:
        return tuple(Step(r) for r in runs)
    gap = span_s / (bursts - 1)
    steps: list[Step] = []
    for k in range(bursts):
        steps += [Step(r, k, k * gap) for r in repeated]
        if k < bursts - 1:  # the once-runs in bursts - 1 even slices between the rounds
            lo, hi = len(once) * k // (bursts - 1), len(once) * (k + 1) // (bursts - 1)
            steps += [Step(r) for r in once[lo:hi]]
    return tuple(steps)


def moment_run(layout: Layout, threads: int, ntimes: int = MOMENT_NTIMES) -> Run:
    """The read that stands for `threads` llama.cpp threads just before a run: the first `threads`
    cores in the probe's order (node by node, spread over L3 groups), node-local memory, arrays
    sized as the quick probe sizes them."""
    order = [(n, c) for n in sorted(layout.node_cores) for c in layout.node_cores[n]]
    if not order:
        raise ProbeError("no CPUs with a NUMA node were found to read bandwidth on")
    picked = order[:max(1, min(threads, len(order)))]
    nodes = sorted({n for n, _ in picked})
    llc = sum(layout.node_llc_bytes.get(n, 0) for n in nodes) or layout.llc_bytes
    per, _ = array_bytes(llc, len(picked), 1, _cap_bytes(layout, set(nodes)), QUICK_FLOOR_BYTES)
    return Run(f"{len(picked)} core" + ("" if len(picked) == 1 else "s") + " now", "moment", "read",
               tuple(c for _, c in picked), tuple(n if layout.numa else -1 for n, _ in picked), per,
               ntimes, nodes[0] if len(nodes) == 1 else None, nodes[0] if len(nodes) == 1 else None)


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
    return from_seconds(run, isa, seconds, checksum, n)


def from_seconds(run: Run, isa: str, seconds: Sequence[float], checksum: float, n: int) -> Measurement:
    """A measurement from what the kernel returned (per-trial seconds, checksum, elements per
    thread): also how recorded bursts are replayed."""
    threads = len(run.cpus)
    per_trial = BYTES_PER_ELEMENT[run.kernel] * n * threads
    expected = EXPECTED_PER_ELEMENT[run.kernel] * n * threads
    ok = abs(checksum - expected) <= 1e-9 * expected
    timed = seconds[1:] if len(seconds) > 1 else seconds
    rates = [per_trial / s / 1e9 for s in timed]
    return Measurement(run=run, isa=isa, elements_per_thread=n, bytes_per_trial=per_trial,
                       seconds=tuple(seconds), best_gbps=max(rates), gbps=stats.summarize(rates),
                       checksum_ok=ok, nt_stores=isa != "scalar" and run.kernel != "read")


def checked(m: Measurement) -> Measurement:
    if not m.checksum_ok:
        raise ProbeError(f"{m.run.name} {m.run.kernel}: the kernel's checksum is wrong",
                         hint="the probe's results cannot be trusted; please report this")
    return m


def run_plan(plan: BandwidthPlan, progress: Callable[[int, int, str], None] | None = None,
             isa: str | None = None, measure_fn: Callable[[Run], Measurement] | None = None,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> list[Measurement]:
    """Steps one at a time, each burst waiting for its time; a Ctrl-C between kernels returns
    nothing half-done (the C side frees its arrays before returning, and Python raises
    KeyboardInterrupt after the call). `measure_fn` swaps the kernels for recorded ones."""
    measure_fn = measure_fn or (lambda run: measure(run, isa))
    steps = plan.schedule()
    out = []
    t0 = clock()
    for i, step in enumerate(steps):
        wait = step.not_before_s - (clock() - t0)
        if wait > 0:
            sleep(wait)
        if progress:
            burst = f" (burst {step.burst + 1})" if step.burst else ""
            progress(i, len(steps), f"{step.run.name} {step.run.kernel}{burst}")
        at = clock() - t0
        out.append(replace(checked(measure_fn(step.run)), burst=step.burst, at_s=at))
    if progress:
        progress(len(steps), len(steps), "done")
    return out


@dataclass(frozen=True, slots=True)
class Spread:
    """One run over its bursts: the figure used (FIGURE_RULE), the spread between bursts and the
    noise of the trials within them. Shares are (max - min) / max."""

    name: str
    kind: str
    kernel: str
    threads: int
    burst_gbps: tuple[float, ...]  # each burst's best trial, in time order
    at_s: tuple[float, ...]  # when each burst started
    gbps: float  # the figure the predictor and the findings use
    median_gbps: float
    between: float  # spread of the burst figures
    within: float  # median over bursts of the spread of their timed trials
    varies: bool  # bursts disagree by more than BURSTS_DISAGREE and more than `within`
    rule: str = FIGURE_RULE


def combine_bursts(ms: Sequence[Measurement]) -> Spread:
    """The one rule from bursts of a run to its figure, for the probe, calibrate and bench."""
    if not ms:
        raise ProbeError("no bandwidth bursts to combine")
    ms = sorted(ms, key=lambda m: (m.at_s, m.burst))
    bursts = stats.summarize([m.best_gbps for m in ms])
    within = stats.summarize([(m.gbps.max - m.gbps.min) / m.gbps.max for m in ms]).median
    between = (bursts.max - bursts.min) / bursts.max
    run = ms[0].run
    return Spread(name=run.name, kind=run.kind, kernel=run.kernel, threads=len(run.cpus),
                  burst_gbps=bursts.samples, at_s=tuple(m.at_s for m in ms), gbps=bursts.max,
                  median_gbps=bursts.median, between=between, within=within,
                  varies=len(ms) > 1 and between > max(within, BURSTS_DISAGREE))


@dataclass(frozen=True, slots=True)
class BandwidthSummary:
    """The figures the predictor and the findings use (GB/s = 10^9 B/s): each run's best trial,
    over its bursts by `combine_bursts`.

    `read_gbps` is the whole machine reading node-local memory (the decode pattern); on a
    one-node box it is that node's run. `spreads` has every run measured in several bursts.
    """

    isa: str
    read_gbps: float
    copy_gbps: float | None
    triad_gbps: float | None
    node_read_gbps: dict[int, float]
    matrix_read_gbps: tuple[tuple[int, int, float], ...]  # (cpu node, memory node, GB/s)
    sweep_read_gbps: tuple[tuple[int, float], ...]  # (cores, GB/s), ending with the whole node
    spreads: tuple[Spread, ...] = ()

    @property
    def read_spread(self) -> Spread | None:
        """The bursts behind `read_gbps` (the machine run, else the first node's)."""
        scope = "machine" if any(s.kind == "machine" for s in self.spreads) else "node"
        return next((s for s in self.spreads if s.kind == scope and s.kernel == "read"), None)


def group_bursts(ms: Sequence[Measurement]) -> list[list[Measurement]]:
    """Measurements of the same run together, in plan order."""
    groups: dict[Run, list[Measurement]] = {}
    for m in ms:
        groups.setdefault(m.run, []).append(m)
    return list(groups.values())


def summarize_measurements(ms: list[Measurement]) -> BandwidthSummary:
    if not ms:
        raise ProbeError("no bandwidth measurements to summarize")
    runs = [(g[0].run, combine_bursts(g)) for g in group_bursts(ms)]
    scope = "machine" if any(r.kind == "machine" for r, _ in runs) else "node"

    def total(kernel: str) -> float | None:
        vals = [s.gbps for r, s in runs if r.kind == scope and r.kernel == kernel]
        return sum(vals) if vals else None

    node_read = {r.cpu_node: s.gbps for r, s in runs if r.kind == "node" and r.kernel == "read"}
    sweep = [(len(r.cpus), s.gbps) for r, s in runs if r.kind == "sweep"]
    first = min(node_read) if node_read else None
    if first is not None:
        full = next(r for r, _ in runs if r.kind == "node" and r.kernel == "read" and r.cpu_node == first)
        sweep.append((len(full.cpus), node_read[first]))
    return BandwidthSummary(
        isa=ms[0].isa,
        read_gbps=total("read") or 0.0,
        copy_gbps=total("copy"),
        triad_gbps=total("triad"),
        node_read_gbps=dict(sorted(node_read.items())),
        matrix_read_gbps=tuple((r.cpu_node, r.mem_node, s.gbps) for r, s in runs if r.kind == "matrix"),
        sweep_read_gbps=tuple(sorted(sweep)),
        spreads=tuple(s for _, s in runs if len(s.burst_gbps) > 1),
    )
