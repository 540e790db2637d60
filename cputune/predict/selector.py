"""Which quant fits and how fast: RAM arithmetic, published quality and the choice, pure functions.

ram_needed is shared by `select`, `plan` and `serve`'s refusal, so the number a builder reads
before downloading is the number serve checks before loading. select and plan weigh candidates
(cputune/predict/candidates.py finds them) against a box's capacity with the predictor's speeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from cputune.core.errors import ConfigError, ModelError
from cputune.model.gguf_model import ModelProfile, kv_cache_bytes
from cputune.core import numa_policy
from cputune.predict.hardware import ESTIMATED_READ_FRACTION
from cputune.core.numa_policy import NumaDecision
from cputune.machine.memory import MemoryInfo, theoretical_peak_gbps
from cputune.model.quality import Quality, QualityRow, quality_of, quality_rows  # noqa: F401  (re-exported)
from cputune.predict.predictor import (  # noqa: F401  (the cache-type names are re-exported for callers)
    repacked_types, FLOAT_CACHE_TYPES, read_bandwidth_gbps, KV_CACHE_TYPES, NUMA_POLICIES, Calibration, MachineBandwidth, Prediction, Settings,
    cache_type_name, predict,
)

GIB = 1 << 30
OS_HEADROOM_BYTES = 2 * GIB  # kernel, page tables, the server's own heap


@dataclass(frozen=True, slots=True)
class RamNeed:
    """Bytes a llama.cpp CPU server holds resident, by cause."""

    weights_bytes: int
    repack_copy_bytes: int  # mmap'd originals of repacked tensors stay mapped (#16761)
    kv_bytes: int
    compute_bytes: int
    headroom_bytes: int
    ctx_tokens: int
    cache_type: str
    mmap: bool

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.repack_copy_bytes + self.kv_bytes + self.compute_bytes
                + self.headroom_bytes)


def repacked_bytes(model: ModelProfile, isa: tuple[str, ...] | frozenset[str]) -> int:
    """Bytes of the weight matrices llama.cpp repacks at load on a CPU with these flags."""
    types = repacked_types(isa)
    return sum(b for t, b in model.matmul_bytes_by_type.items() if t in types)


def compute_buffer_bytes(model: ModelProfile, ctx_tokens: int, n_ubatch: int = 512,
                         flash_attn: bool = False) -> int:
    """The CPU compute buffer at the largest ubatch: f32 activations and logits, plus the
    attention scores (heads x ubatch x context) when flash attention is off."""
    acts = 4 * n_ubatch * (model.n_vocab + 8 * model.n_embd)
    scores = 0 if flash_attn else 4 * model.n_head * n_ubatch * ctx_tokens
    return acts + scores


def ram_needed(model: ModelProfile, ctx_tokens: int, cache_type: str = "f16", *,
               mmap: bool = True, isa: tuple[str, ...] = ("avx2",), repack: bool = True,
               n_ubatch: int = 512, flash_attn: bool = False,
               headroom_bytes: int = OS_HEADROOM_BYTES) -> RamNeed:
    """RAM to serve `model` with a `ctx_tokens` KV cache of `cache_type`.

    With mmap on and repack on, llama.cpp keeps both the file's pages and the repacked copy of
    every repacked matrix (shared/reference/llama_cpp_cpu.md A5); with mmap off there is one copy.
    """
    copy = repacked_bytes(model, isa) if (mmap and repack) else 0
    return RamNeed(
        weights_bytes=model.weight_bytes, repack_copy_bytes=copy,
        kv_bytes=round(kv_cache_bytes(model, ctx_tokens, cache_type)),
        compute_bytes=compute_buffer_bytes(model, ctx_tokens, n_ubatch, flash_attn),
        headroom_bytes=headroom_bytes, ctx_tokens=ctx_tokens, cache_type=cache_type, mmap=mmap)


# ---------------------------------------------------------------------------------------------
# select and plan: every quant of a model against a box's memory, speed and published quality

# What select and plan show when the models folder has no GGUF of the model: the presets builders
# download (unsloth, bartowski), best quality first. llama-quantize makes IQ2_XXS and IQ1_S only
# with an imatrix (tools/quantize/quantize.cpp).
CATALOG_PRESETS = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "IQ3_XXS", "Q2_K",
                   "IQ2_XXS", "IQ1_S")
DEFAULT_CTX_TOKENS = 8192
CTX_STEP_TOKENS = 256  # a smaller --ctx is suggested in whole steps of this
DEFAULT_CHANNEL_MTS = 6000  # DDR5-6000, the reference box's memory
QUALITY_NOTE = ("quality is the published cost on the family named, not on this model: small dense models "
                "lose more per bit than big MoE ones")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One quant of the model: a GGUF file (split files as one) or a catalog preset (file None)."""

    quant: str
    profile: ModelProfile
    file: str | None = None
    n_shards: int = 1

    @property
    def origin(self) -> str:
        if self.file is None:
            return "catalog preset"
        name = Path(self.file).name
        return name if self.n_shards == 1 else f"{name} (+{self.n_shards - 1} shards)"


@dataclass(frozen=True, slots=True)
class Capacity:
    """Memory llama.cpp can use on a box, in total and per NUMA node.

    Hugepage pools are counted as used: hugetlbfs pages serve only explicit MAP_HUGETLB/hugetlbfs
    mappings (Documentation/admin-guide/mm/hugetlbpage.rst), never llama.cpp's mmap of a model file
    or its malloc'd buffers.
    """

    total_bytes: int
    node_bytes: dict[int, int]
    hugepage_bytes: int
    source: str

    @property
    def largest_node(self) -> int:
        return max(self.node_bytes, key=lambda n: (self.node_bytes[n], -n)) if self.node_bytes else 0

    @property
    def largest_node_bytes(self) -> int:
        return self.node_bytes[self.largest_node] if self.node_bytes else self.total_bytes

    def available_bytes(self, numa: str) -> int:
        """What one server may hold: the largest node when pinned to one node, else the box."""
        return self.largest_node_bytes if numa == "one-node" else self.total_bytes


def _pool_bytes(pool) -> int:
    return (pool.total_pages or 0) * pool.page_bytes


def capacity_from_memory(mem: MemoryInfo, source: str, fallback_total_bytes: int = 0) -> Capacity:
    """This box: MemTotal (and each node's MemTotal) less the hugepage pools reserved there.

    The system-wide pool files count pages on every node; the per-node files split them
    (Documentation/admin-guide/mm/hugetlbpage.rst, "Per Node Hugepages Attributes").
    """
    system = sum(_pool_bytes(p) for p in mem.hugepages if p.node_id is None)
    per_node: dict[int, int] = {}
    for p in mem.hugepages:
        if p.node_id is not None:
            per_node[p.node_id] = per_node.get(p.node_id, 0) + _pool_bytes(p)
    pools = max(system, sum(per_node.values()))
    total = (mem.mem_total_bytes or mem.node_mem_total_sum_bytes or fallback_total_bytes) - pools
    sized = [n for n in mem.nodes if n.mem_total_bytes]
    if not per_node and sized:  # no per-node pool files: the kernel spreads a pool over the nodes
        per_node = {n.node_id: system // len(sized) for n in sized}
    nodes = {n.node_id: n.mem_total_bytes - per_node.get(n.node_id, 0) for n in sized}
    return Capacity(total, nodes or {0: total}, pools, source)


def capacity_from_machine(machine: MachineBandwidth, source: str) -> Capacity:
    """A box described by a hardware profile: its DIMMs, split evenly over its NUMA nodes."""
    nodes = max(machine.nodes, 1)
    return Capacity(machine.mem_bytes, {i: machine.mem_bytes // nodes for i in range(nodes)}, 0, source)


@dataclass(frozen=True, slots=True)
class FitSettings:
    """How the model would be served, which the RAM and speed are computed for."""

    ctx_tokens: int
    cache_type: str = "f16"
    numa: str = "auto"  # auto: the one NUMA rule (cputune.core.numa_policy) decides per model
    threads: int | None = None  # None: the rule's default, the physical cores of the nodes used
    mmap: bool = True
    flash_attn: bool = False
    n_ubatch: int = 512
    min_tps: float | None = None


def fit_settings(machine: MachineBandwidth, ctx_tokens: int = DEFAULT_CTX_TOKENS, cache_type: str = "f16",
                 numa: str = "auto", threads: int | None = None, mmap: bool = True,
                 flash_attn: bool = False, n_ubatch: int = 512,
                 min_tps: float | None = None) -> FitSettings:
    """Checked settings; threads default to what serve uses, a quantized cache turns flash attention on."""
    ct = cache_type_name(cache_type)
    if numa != "auto" and numa not in NUMA_POLICIES:
        raise ConfigError(f"unknown NUMA policy {numa!r}", hint="one of: auto, " + ", ".join(NUMA_POLICIES))
    if ctx_tokens < 1:
        raise ConfigError(f"--ctx must be at least 1 token, not {ctx_tokens}")
    if numa != "auto" or machine.nodes <= 1:
        # The policy is known: its threads are too (auto on a multi-node box waits for the model).
        threads = numa_policy.decide(nodes=machine.nodes, cores_per_node=machine.cores_per_node,
                                     need_bytes=None, node_bytes=None, threads=threads,
                                     requested="one-node" if numa == "auto" else numa,
                                     threads_per_core=machine.threads_per_core).threads
    return FitSettings(ctx_tokens=ctx_tokens, cache_type=ct, numa=numa, threads=threads, mmap=mmap,
                       # llama.cpp refuses a quantized V cache without flash attention (A7).
                       flash_attn=flash_attn or ct not in FLOAT_CACHE_TYPES,
                       n_ubatch=n_ubatch, min_tps=min_tps)


def need_for(model: ModelProfile, s: FitSettings, isa: tuple[str, ...] | frozenset[str]) -> RamNeed:
    return ram_needed(model, s.ctx_tokens, s.cache_type, mmap=s.mmap, isa=tuple(isa),
                      n_ubatch=s.n_ubatch, flash_attn=s.flash_attn)


def settle(model: ModelProfile, s: FitSettings, machine: MachineBandwidth,
           capacity: Capacity | None = None) -> tuple[FitSettings, NumaDecision]:
    """`s` with the policy and threads the one NUMA rule gives this model (numa_policy.decide,
    as predict, serve and tune ask it): one node when the model fits there, else interleave."""
    capacity = capacity or capacity_from_machine(machine, "")
    d = numa_policy.decide(nodes=machine.nodes, cores_per_node=machine.cores_per_node,
                           need_bytes=need_for(model, s, machine.isa).total_bytes,
                           node_bytes=capacity.largest_node_bytes, requested=s.numa, threads=s.threads,
                           threads_per_core=machine.threads_per_core)
    return replace(s, numa=d.policy, threads=d.threads), d


def _predict_settings(s: FitSettings) -> Settings:
    # Decode speed at the depth asked for: a full --ctx cache is read for every token.
    return Settings(threads=s.threads, numa=s.numa, depth=s.ctx_tokens, n_ubatch=s.n_ubatch,
                    cache_type=s.cache_type)


# --- one quant against the box ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuantOption:
    quant: str
    origin: str  # file name, or "catalog preset"
    file: str | None
    n_shards: int
    weight_bytes: int
    total_params: int
    bits_per_weight: float
    need: RamNeed
    need_bytes: int  # need.total_bytes
    available_bytes: int  # under the NUMA policy: the largest node's with one-node, else the box's
    fits: bool  # need.total_bytes <= available_bytes
    margin_bytes: int  # available - need; negative is how much is missing
    node_available_bytes: int
    fits_one_node: bool
    prediction: Prediction  # at depth = ctx_tokens
    quality: Quality | None
    numa: NumaDecision | None = None  # the policy and threads it is served and predicted with

    @property
    def tg_tokens_per_s(self) -> float:
        return self.prediction.tg_tokens_per_s


def evaluate(c: Candidate, machine: MachineBandwidth, cal: Calibration, capacity: Capacity,
             s: FitSettings) -> QuantOption:
    m = c.profile
    s, numa = settle(m, s, machine, capacity)
    need = need_for(m, s, machine.isa)
    avail = capacity.available_bytes(s.numa)
    node = capacity.largest_node_bytes
    bpw = m.weight_bytes * 8 / m.total_params if m.total_params else 0.0
    return QuantOption(
        quant=c.quant, origin=c.origin, file=c.file, n_shards=c.n_shards, weight_bytes=m.weight_bytes,
        total_params=m.total_params, bits_per_weight=bpw, need=need, need_bytes=need.total_bytes,
        available_bytes=avail,
        fits=need.total_bytes <= avail, margin_bytes=avail - need.total_bytes,
        node_available_bytes=node, fits_one_node=need.total_bytes <= node,
        prediction=predict(m, machine, _predict_settings(s), cal),
        quality=quality_of(c.quant, bpw, m.total_params, m.is_moe), numa=numa)


def quality_key(o: QuantOption) -> tuple[float, float]:
    """Best quality first: the smaller estimated perplexity change (cputune.model.quality), then more bits per weight."""
    ppl = o.quality.ppl_change_pct if o.quality and o.quality.ppl_change_pct is not None else math.inf
    return (ppl, -o.bits_per_weight)


# --- the reverse question: what box reaches a speed -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a box needs for `quant` to decode at `target_tg_tokens_per_s` with these settings.

    read_gbps is the read bandwidth `cputune probe` would measure over the nodes used;
    machine is the template box with its bandwidth scaled to it, which the predictor puts at the
    target. channels: DDR channels at channel_mts reading ESTIMATED_READ_FRACTION of their peak.
    """

    quant: str
    target_tg_tokens_per_s: float
    reachable: bool
    ceiling_tg_tokens_per_s: float  # unlimited bandwidth: compute and per-token overhead remain
    read_gbps: float | None
    node_read_gbps: float | None
    channels: int | None
    channel_mts: int
    capacity_bytes: int
    machine: MachineBandwidth | None
    prediction: Prediction | None


def _scaled(m: MachineBandwidth, k: float) -> MachineBandwidth:
    return replace(m, name=f"{m.name} x{k:.3g} bandwidth", node_read_gbps=m.node_read_gbps * k,
                   core_read_gbps=m.core_read_gbps * k)


def requirements(model: ModelProfile, target_tps: float, machine: MachineBandwidth, cal: Calibration,
                 s: FitSettings, quant: str = "", channel_mts: int = DEFAULT_CHANNEL_MTS) -> Requirement:
    """Solve predict(model, box scaled by k) = target for k, keeping the box's cores and NUMA layout.

    Decode time is max(memory, compute) + overhead and only the memory term depends on bandwidth,
    so speed rises with k up to 1 / (compute + overhead); bisection on k finds the smallest k that
    reaches the target.
    """
    if target_tps <= 0:
        raise ConfigError(f"--target-tps must be above 0, not {target_tps}")
    s, _ = settle(model, s, machine)
    ps = _predict_settings(s)
    capacity = need_for(model, s, machine.isa).total_bytes
    base = predict(model, machine, ps, cal)
    ceiling = 1 / (base.t_compute_s + base.t_overhead_s)
    if target_tps >= ceiling:
        return Requirement(quant, target_tps, False, ceiling, None, None, None, channel_mts, capacity,
                           None, None)

    def tg(k: float) -> float:
        return predict(model, _scaled(machine, k), ps, cal).tg_tokens_per_s

    lo, hi = 1.0, 1.0
    while tg(hi) < target_tps:
        lo, hi = hi, hi * 2
    while tg(lo) >= target_tps:
        lo, hi = lo / 2, lo
    for _ in range(200):  # tg(lo) < target <= tg(hi)
        mid = math.sqrt(lo * hi)
        if tg(mid) >= target_tps:
            hi = mid
        else:
            lo = mid
        if hi / lo - 1 < 1e-12:
            break
    box = _scaled(machine, hi)
    p = predict(model, box, ps, cal)
    # What the scaled box reads under the policy (the predictor's own figure; efficiency, page
    # size and where repacked weights sit are applied on top of it).
    read, _ = read_bandwidth_gbps(box, max(1, min(ps.threads, box.cores)), ps.numa)
    per_channel = ESTIMATED_READ_FRACTION * theoretical_peak_gbps(1, channel_mts)
    return Requirement(quant, target_tps, True, ceiling, read, read / p.nodes_used,
                       math.ceil(read / per_channel), channel_mts, capacity, box, p)


# --- select ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One change to the settings or the box that would make a quant usable."""

    kind: str  # ctx | cache_type | no_mmap | numa | combined | more_ram | bandwidth
    option: str  # as typed: "--ctx 4096", "--no-mmap", "+12.0 GiB"
    value: float  # the new ctx tokens, the bytes needed, the GB/s needed
    quant: str
    text: str


@dataclass(frozen=True, slots=True)
class Selection:
    model: str
    from_catalog: bool
    notes: tuple[str, ...]
    capacity: Capacity
    settings: FitSettings
    options: tuple[QuantOption, ...]  # best quality first
    recommended: QuantOption | None
    why: str
    what_would_fit: tuple[Change, ...]


def _largest_ctx(model: ModelProfile, s: FitSettings, isa: tuple[str, ...], avail: int) -> int | None:
    """The largest whole step of context below s.ctx_tokens whose need fits `avail`, or None."""
    def total(ctx: int) -> int:
        return need_for(model, replace(s, ctx_tokens=ctx), isa).total_bytes

    if s.ctx_tokens <= CTX_STEP_TOKENS or total(CTX_STEP_TOKENS) > avail:
        return None
    lo, hi = CTX_STEP_TOKENS, s.ctx_tokens  # need(lo) fits; need grows with ctx
    if total(hi) <= avail:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= avail else (lo, mid)
    return lo // CTX_STEP_TOKENS * CTX_STEP_TOKENS


def what_would_fit(c: Candidate, machine: MachineBandwidth, capacity: Capacity,
                   s: FitSettings) -> tuple[Change, ...]:
    """The single changes that make `c` fit: a smaller context, a q8_0 cache, --no-mmap, every
    node; when none of those alone does, --no-mmap and a q8_0 cache together (with the context that
    then fits); and more RAM, always, as the bytes missing."""
    s, _ = settle(c.profile, s, machine, capacity)
    avail = capacity.available_bytes(s.numa)
    need = need_for(c.profile, s, machine.isa)
    isa = tuple(machine.isa)
    q = c.quant
    if need.total_bytes <= avail:
        return ()

    def total(**changes) -> int:
        return need_for(c.profile, replace(s, **changes), isa).total_bytes

    out = []
    ctx = _largest_ctx(c.profile, s, isa, avail)
    if ctx is not None:
        out.append(Change("ctx", f"--ctx {ctx}", ctx, q,
                          f"{q} fits with --ctx {ctx} instead of {s.ctx_tokens}: {_gib(total(ctx_tokens=ctx))} GiB"))
    q8 = {"cache_type": "q8_0", "flash_attn": True} if s.cache_type in FLOAT_CACHE_TYPES else {}
    if q8 and total(**q8) <= avail:
        out.append(Change("cache_type", "--cache-type q8_0", total(**q8), q,
                          f"{q} fits with a q8_0 KV cache (flash attention on): {_gib(total(**q8))} GiB"))
    no_mmap = {"mmap": False} if s.mmap and need.repack_copy_bytes else {}
    if no_mmap and total(**no_mmap) <= avail:
        out.append(Change("no_mmap", "--no-mmap", total(**no_mmap), q,
                          f"{q} fits with --no-mmap: {_gib(total(**no_mmap))} GiB, without the mmap'd copy of "
                          f"the {_gib(need.repack_copy_bytes)} GiB llama.cpp repacks (llama.cpp #16761)"))
    if s.numa == "one-node" and len(capacity.node_bytes) > 1 and need.total_bytes <= capacity.total_bytes:
        out.append(Change("numa", "--numa distribute", need.total_bytes, q,
                          f"{q} fits the whole box ({_gib(capacity.total_bytes)} GiB) with --numa distribute"))
    if q8 and no_mmap and not any(ch.kind in ("ctx", "cache_type", "no_mmap") for ch in out):
        both = replace(s, **q8, **no_mmap)
        ctx = s.ctx_tokens if total(**q8, **no_mmap) <= avail else _largest_ctx(c.profile, both, isa, avail)
        if ctx is not None:
            opts = "--no-mmap --cache-type q8_0" + ("" if ctx == s.ctx_tokens else f" --ctx {ctx}")
            n = total(**q8, **no_mmap, ctx_tokens=ctx)
            out.append(Change("combined", opts, n, q, f"{q} fits with {opts}: {_gib(n)} GiB"))
    short = need.total_bytes - avail
    where = " on the node" if s.numa == "one-node" and len(capacity.node_bytes) > 1 else ""
    out.append(Change("more_ram", f"+{_gib(short)} GiB", short, q,
                      f"{q} fits with {_gib(short)} GiB more RAM{where}: {_gib(need.total_bytes)} GiB needed, "
                      f"{_gib(avail)} GiB there"))
    return tuple(out)


def _speed_change(c: Candidate, o: QuantOption, machine: MachineBandwidth, cal: Calibration,
                  s: FitSettings) -> Change:
    s, _ = settle(c.profile, s, machine)
    r = requirements(c.profile, s.min_tps, machine, cal, s, c.quant)
    now = o.prediction.effective_bw_gbps / cal.bw_efficiency
    if not r.reachable:
        return Change("bandwidth", "more or faster cores", r.ceiling_tg_tokens_per_s, c.quant,
                      f"{c.quant} cannot reach {s.min_tps:g} tok/s on {s.threads} threads with any "
                      f"bandwidth: compute and per-token overhead cap it at {r.ceiling_tg_tokens_per_s:.1f}")
    return Change("bandwidth", f"{r.read_gbps:.0f} GB/s read", r.read_gbps, c.quant,
                  f"{c.quant} reaches {s.min_tps:g} tok/s on a box reading {r.read_gbps:.0f} GB/s "
                  f"over {r.prediction.nodes_used} node(s) (this one: {now:.0f} GB/s)")


def _why(rec: QuantOption, better: Sequence[QuantOption], s: FitSettings) -> str:
    text = (f"{rec.quant} is the best quality that fits: {_gib(rec.margin_bytes)} GiB to spare, "
            f"{rec.tg_tokens_per_s:.1f} tok/s predicted at {s.ctx_tokens} tokens of context")
    if better:
        b = better[-1]
        if not b.fits:
            text += f"; {b.quant} needs {_gib(-b.margin_bytes)} GiB more"
        else:
            text += f"; {b.quant} fits but predicts {b.tg_tokens_per_s:.1f} tok/s, below --min-tps {s.min_tps:g}"
    return text


def select(model: str, candidates: Sequence[Candidate], machine: MachineBandwidth, cal: Calibration,
           capacity: Capacity, s: FitSettings, *, from_catalog: bool = False,
           notes: Sequence[str] = ()) -> Selection:
    """Every candidate's fit, speed and quality; the best quality that fits and meets s.min_tps;
    when none does, the smallest changes that would give one."""
    if not candidates:
        raise ModelError(f"no quant of {model} to choose from")
    pairs = sorted(((evaluate(c, machine, cal, capacity, s), c) for c in candidates),
                   key=lambda oc: quality_key(oc[0]))
    opts = tuple(o for o, _ in pairs)
    fitting = [(o, c) for o, c in pairs if o.fits]
    fast = [o for o, _ in fitting if s.min_tps is None or o.tg_tokens_per_s >= s.min_tps]
    rec, changes = None, ()
    one = {o.quant: o.numa is not None and o.numa.policy == "one-node" for o in opts}
    if fast:
        rec = fast[0]
        better = pairs[:next(i for i, o in enumerate(opts) if o is rec)]
        why = _why(rec, [o for o, _ in better], s)
        if better and not better[-1][0].fits:
            # The next quality up: what it would take to run that one instead.
            changes = what_would_fit(better[-1][1], machine, capacity, s)
    elif fitting:
        o, c = max(fitting, key=lambda oc: oc[0].tg_tokens_per_s)
        why = (f"{len(fitting)} of {len(opts)} fit, but the fastest, {o.quant}, predicts "
               f"{o.tg_tokens_per_s:.1f} tok/s at {s.ctx_tokens} tokens of context, below --min-tps {s.min_tps:g}")
        changes = (_speed_change(c, o, machine, cal, s),)
    else:
        o, c = min(pairs, key=lambda oc: oc[0].need_bytes)
        where = f"node {capacity.largest_node}'s " if one[o.quant] and len(capacity.node_bytes) > 1 else ""
        why = (f"nothing fits in {where}{_gib(o.available_bytes)} GiB: the smallest, {o.quant}, "
               f"needs {_gib(o.need_bytes)} GiB")
        changes = what_would_fit(c, machine, capacity, s)
    return Selection(model, from_catalog, tuple(notes) + (QUALITY_NOTE,), capacity, s, opts, rec, why,
                     changes)


# --- plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlanRow:
    model_id: str
    model: str
    option: QuantOption
    requirement: Requirement | None


@dataclass(frozen=True, slots=True)
class Plan:
    machine: MachineBandwidth
    capacity: Capacity
    settings: FitSettings
    target_tg_tokens_per_s: float | None
    rows: tuple[PlanRow, ...]
    notes: tuple[str, ...]


def plan(models: Sequence[tuple[str, str, Sequence[Candidate]]], machine: MachineBandwidth,
         cal: Calibration, capacity: Capacity, s: FitSettings, target_tps: float | None = None,
         channel_mts: int = DEFAULT_CHANNEL_MTS) -> Plan:
    """Every (model id, name, candidates) on one box, best quality first within a model; with a
    target speed, the bandwidth and capacity each would need."""
    rows = []
    for model_id, name, cands in models:
        pairs = sorted(((evaluate(c, machine, cal, capacity, s), c) for c in cands),
                       key=lambda oc: quality_key(oc[0]))
        for o, c in pairs:
            req = (requirements(c.profile, target_tps, machine, cal, s, c.quant, channel_mts)
                   if target_tps else None)
            rows.append(PlanRow(model_id, name, o, req))
    return Plan(machine, capacity, s, target_tps, tuple(rows), (QUALITY_NOTE,))
