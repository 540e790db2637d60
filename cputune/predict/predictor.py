"""Decode and prefill tokens/s from bandwidth, compute and a per-token fixed cost: pure math.

No I/O, no clock: a machine, a model profile, settings and calibrated constants in; a
Prediction carrying every term out, so the CLI can explain it and tests can check each term.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cputune.core.cores import nearest_family, vector_scale
from cputune.core.errors import ConfigError
from cputune.model.gguf_model import (ModelProfile, attn_flops_at, bits_per_weight, cache_type_bytes, kv_cache_bytes,
                                      kv_read_bytes, kv_rows_at)

NUMA_POLICIES = ("one-node", "distribute", "interleave", "off")
# common/arg.cpp kv_cache_types (shared/reference/llama_cpp_cpu.md A7); quantized V needs flash attention.
FLOAT_CACHE_TYPES = ("f32", "f16", "bf16")
KV_CACHE_TYPES = FLOAT_CACHE_TYPES + ("q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def cache_type_name(name: str) -> str:
    """The llama.cpp -ctk/-ctv name of a KV cache type; ConfigError listing them if unknown.
    The one check every command that takes a cache type (predict, select, plan, tune, serve's
    tuned settings) goes through."""
    n = name.lower() if isinstance(name, str) else name
    if n not in KV_CACHE_TYPES:
        raise ConfigError(f"unknown KV cache type {name!r}",
                          hint="llama.cpp's cache types: " + ", ".join(KV_CACHE_TYPES))
    return n


def check_context(model: ModelProfile, tokens: int, what: str) -> None:
    """ConfigError when `tokens` (what a run puts in the KV cache, described by `what`, e.g.
    "--depth 9000 + --n-gen 32 = 9032 tokens") pass the context the model was trained for:
    llama.cpp runs it, but positions are then out of the trained range and the numbers mean nothing."""
    n = model.n_ctx_train
    if n and tokens > n:
        raise ConfigError(f"{what} is beyond the context {model.name or 'the model'} was trained for "
                          f"(n_ctx_train {n} tokens)", hint=f"keep it at most {n} tokens")


@dataclass(frozen=True, slots=True)
class MachineBandwidth:
    """What the predictor needs from a machine (a probe profile or a hardware TOML)."""

    name: str
    sockets: int
    nodes: int
    cores: int  # physical cores llama.cpp may use
    node_read_gbps: float  # one node, all its cores, local memory
    core_read_gbps: float  # one core alone
    remote_ratio: float  # node-to-node read / local read (1.0 on one node)
    mem_bytes: int
    isa: tuple[str, ...] = ()
    threads_per_core: int = 1  # 2 with SMT: siblings llama.cpp may also run threads on
    core_family: str | None = None  # zen4, graniterapids ... (configs/core_families.csv), for per-core rates
    core_told: str = ""  # how: "numbers", "name", "caches" (cores.identify_core)

    @property
    def cores_per_node(self) -> int:
        return max(self.cores // max(self.nodes, 1), 1)

    @property
    def logical_cpus(self) -> int:
        return self.cores * max(self.threads_per_core, 1)

    def sockets_spanned(self, nodes: int) -> int:
        """Sockets that `nodes` NUMA nodes lie on (nodes are numbered socket by socket): NPS2/4 or
        SNC split a socket into nodes that still share its fabric, not the socket link."""
        per_socket = max(self.nodes // max(self.sockets, 1), 1)
        return max(1, min(self.sockets, -(-nodes // per_socket)))


@dataclass(frozen=True, slots=True)
class Calibration:
    """Constants fitted from llama-bench runs (`cputune calibrate`) or published measurements.

    bw_efficiency: share of the probe's read bandwidth that llama.cpp decode reaches.
    decode_gbps_per_core: weight bytes one core dequantizes and dots per second at batch 1.
    prefill_gflops_per_core: matrix FLOP/s one core reaches in prompt processing, by type.
    overhead_s_per_layer / overhead_s_per_layer_thread: per-token fixed cost (graph, barriers).
    moe_bw_efficiency: routed-expert bytes reach this share of the dense efficiency (many small
        matrices, chosen per token: less streaming, uneven work per thread).
    moe_prefill_efficiency: share of the dense matrix rate that routed-expert FLOPs reach in
        prompt processing (a 512-token batch gives each expert only a few rows).
    avx512_prefill_factor: prefill rates scale by this on AVX-512 machines when the rates were
        fitted across ISAs (the published fit); a box's own calibration keeps 1.
    overhead_node_factor: the fixed cost grows by this share per extra socket spanned (barriers
        across the socket link); fitted to the published two-socket runs. Nodes of one socket
        (NPS2/4, SNC) do not add it: their cores share the socket's fabric either way.
    overlap_p: how memory and compute time combine: 0 takes the larger (perfect overlap);
        p > 0 takes (mem^p + cpu^p)^(1/p), slower where both are close, as a box whose cores
        are busy dequantizing cannot also keep every load in flight.
    moe_decode_efficiency: share of the dense per-core decode rate that routed-expert bytes reach
        when decode is compute-bound (a few small matrices per token, split unevenly over threads).
    thread_scaling: decode compute grows as threads^this (1: linear). Below 1 where threads share
        what a matrix-vector product lives on: the L3, the memory controllers' queues, a
        physical core's load ports (SMT siblings, or vCPUs a hypervisor places on one core).
    prefill_thread_scaling: the same for prompt processing, whose matrix-matrix products reuse
        each loaded weight many times and so scale nearer to linear.
    moe_prefill_efficiency_by_type: the same per weight type, where a box's own runs tell them
        apart: the dense mul_mat has tiled GEMMs (llamafile sgemm) for F16 and Q8_0 that the
        experts' mul_mat_id does not use, while repacked K-quants run both paths alike.
    elementwise_s: prefill seconds per prompt token, layer and embedding element: work that grows
        with width, not parameters (norms, residual adds, RoPE, expert routing, converting
        activations for each matmul, and narrow matrices' poorer GEMM tiling). It does not shrink
        with quantization and weighs most in narrow models; fitted on a box's own runs only.
    """

    bw_efficiency: float
    decode_gbps_per_core: dict[str, float]
    prefill_gflops_per_core: dict[str, float]
    overhead_s_per_layer: float
    overhead_s_per_layer_thread: float
    overhead_node_factor: float = 0.0
    moe_bw_efficiency: float = 1.0
    moe_prefill_efficiency: float = 1.0
    avx512_prefill_factor: float = 1.0
    overlap_p: float = 0.0
    thread_scaling: float = 1.0
    prefill_thread_scaling: float = 1.0
    # Amdahl's serial share: n threads do the work of n / (1 + s (n - 1)) (barriers, the main
    # thread's share, work that does not split). Unlike threads^x it keeps a per-core rate the
    # same on a 24-core and a 128-core box of one core family: the published fit uses this.
    serial_share: float = 0.0
    prefill_serial_share: float = 0.0
    moe_decode_efficiency: float = 1.0
    elementwise_s: float = 0.0
    moe_prefill_efficiency_by_type: dict[str, float] = field(default_factory=dict)
    # Attention over the KV cache (scores and the value mix), matrix FLOP/s per core: decode runs
    # one query row per head against every cached token, prefill a ubatch of them. It grows with
    # depth and does not shrink with the weights' quantization.
    # Defaults: llama-bench -d 0..4096 on this project's 2-vCPU Zen 4 VM (mainline, no flash
    # attention, synthetic llama with 16 heads of 128 and 4 KV heads): 8.4 and 21 per core.
    attn_gflops_per_core: float = 8.4
    attn_prefill_gflops_per_core: float = 21.0
    # MLA (deepseek2) as the pinned llama.cpp runs it: all heads share one latent, so the scores
    # are a matrix-matrix product and run this much faster per FLOP than GQA's (measured 2.7x
    # for decode and 2.6x for prefill on the same VM, synthetic deepseek2 with R1's head sizes).
    mla_attn_factor: float = 2.7
    # Attention without flash attention (-fa off), as a factor on the rates above, which are
    # flash attention's (llama.cpp's -fa auto turns it on for the CPU; serve passes -fa on).
    # Measured on this project's Zen 4 VM, llama-bench -d 0,4096, 1 thread, -fa 0 vs -fa 1
    # (benchmarks/README.md): GQA decode 1.9-2.9x faster without it (median 2.2), prefill at depth
    # 1.6-1.8x (1.6); MLA decode 5x slower (it falls back to the decompressed K/V path, which also
    # costs at depth 0 and is not modelled further).
    fa_off_decode_factor: float = 2.2
    fa_off_prefill_factor: float = 1.6
    fa_off_mla_decode_factor: float = 0.21
    # Mainline's flash-attention decode (ggml-cpu ops.cpp, one query row: each thread walks its
    # share of the cached tokens for one query head after another) pays, beside the FLOPs, a first
    # pass over each KV head's K/V rows that the prefetcher covers less the farther apart a head's
    # rows of consecutive tokens sit (the other KV heads' rows lie between them): this many FLOPs at
    # the attention rate per KV head, cached token and layer once that gap is fa_kv_gap_bytes or
    # more, in proportion below it. The query heads sharing a KV head (the GQA group) share the
    # pass, so MHA pays it for every head: measured 2-4x GQA-4's cost per query head on Zen 1, 2 and
    # 4 (benchmarks/attention_layout.py, benchmarks/README.md). 640 FLOPs (160 head dimensions'
    # worth) at a 512 B gap: the one pair that, with the rate fitted on an 8/2/128 model alone,
    # predicts the other layouts' cost per query head on Zen 1, 2 and 4 cores with a median error of
    # 6-9 % (20, 10, 21 % without it; the MHA layouts miss most, -29..-39 %).
    fa_kv_row_flops: float = 640.0
    fa_kv_gap_bytes: float = 512.0
    # SMT: what a sibling thread adds to its core's throughput (0: nothing, < 0: it slows the
    # core down, as llama.cpp's spin barriers and shared load ports make it on most boxes).
    smt_tg_gain: float = 0.0
    smt_pp_gain: float = 0.0
    # Share of the bandwidth reached with 4 KiB pages (mmap'd weights, THP off) instead of 2 MiB:
    # a 4 KiB page covers few of an expert's rows, so decode walks the page tables (TLB misses).
    page_4k_efficiency: float = 1.0
    # ik_llama.cpp's kernels against mainline's (its fused MoE, repacked quants and MLA attention
    # as published runs use them: -fmoe -rtr -mla 3 -fa): factors on the per-core rates.
    ik_tg_factor: float = 1.0
    ik_pp_factor: float = 1.0
    ik_attn_factor: float = 1.0
    # Prefill across sockets: each extra socket spanned adds this share to the matrices' time
    # (activations and partial results cross the socket link every layer).
    prefill_node_factor: float = 0.0
    # Decode rate of a weight type per byte relative to Q4_K's on the same core, for the types a
    # rate table lacks (ik_llama.cpp's IQ*_K, _R4 and trellis types): measured one type at a time
    # (configs/decode_type_ratios.csv), since a type's dequantize-and-dot cost is a property of
    # the kernel and the core, not of the box.
    decode_type_ratio: dict[str, float] = field(default_factory=dict)
    # Per-core rate tables of other core families ({"zen4": {"decode": {...}, "prefill": {...}}}),
    # used instead of the two tables above on a machine of that family (published.family_calibration).
    family_rates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # How far off a prediction is: measured / predicted for 80 % of the runs a fit did not see
    # (leave-one-out over the published runs; held-out points for a box's own calibration).
    tg_error_band: tuple[float, float] = (1.0, 1.0)
    pp_error_band: tuple[float, float] = (1.0, 1.0)
    error_band_source: str = "no held-out errors"
    # The same for a box none of the fitted runs ran on: every fitted box predicted by a fit
    # without any of its runs (leave-one-box-out), with the held-out box's runs. Wider: the
    # per-box terms (bandwidth share, fixed cost) are what a new box changes.
    tg_error_band_new_box: tuple[float, float] = (1.0, 1.0)
    pp_error_band_new_box: tuple[float, float] = (1.0, 1.0)
    error_band_source_new_box: str = "no held-out errors"
    fitted_boxes: tuple[str, ...] = ()  # the hardware profiles whose runs the fit saw
    # What each fitted box's own runs say of the per-box terms, as factors on the pooled ones
    # ({"xeon-6980p-2s": {"bw": 0.97, "fixed": 1.2}}): `bw` on the share of the profile's read
    # bandwidth decode reaches, `fixed` on the per-token fixed cost. A box without runs takes the
    # pooled terms (factor 1) and the new-box range; for_box applies them.
    box_terms: dict[str, dict[str, float]] = field(default_factory=dict)
    source: str = "default"


ENGINES = ("llama.cpp", "ik_llama")
PAGE_SIZES = ("4K", "2M")


@dataclass(frozen=True, slots=True)
class Settings:
    threads: int
    numa: str = "one-node"
    depth: int = 0  # tokens already in the KV cache
    n_ubatch: int = 512
    cache_type: str = "f16"
    # Prompt tokens of the prefill figure (default one ubatch): a pp8192 from an empty cache
    # averages attention over depths 0..8191, so its tokens see depth + n_prompt / 2 on average.
    n_prompt: int | None = None
    page_size: str = "2M"  # what backs the weights: 4K (mmap'd file, THP off) or 2M huge pages
    engine: str = "llama.cpp"
    threads_batch: int | None = None  # prefill threads (-tb), default `threads`
    flash_attn: bool = True  # -fa on (serve's and llama.cpp's CPU default) or off
    # The engine build's date (YYYY-MM-DD) when it is older than the pinned one (a published
    # run): weight types repacked only by later builds stay where the threads touched them.
    build_date: str | None = None
    repack: bool = True  # mainline's load-time repacking (off: --no-repack, or ik_llama.cpp without -rtr)


@dataclass(frozen=True, slots=True)
class Prediction:
    tg_tokens_per_s: float
    pp_tokens_per_s: float
    bottleneck: str  # memory | compute | overhead
    bytes_per_token: float  # weights read + KV read at this depth
    effective_bw_gbps: float
    roofline_tg_tokens_per_s: float  # effective bandwidth / bytes per token
    t_memory_s: float
    t_compute_s: float
    t_overhead_s: float
    pp_bottleneck: str
    memory_needed_bytes: int
    nodes_used: int
    notes: tuple[str, ...] = field(default_factory=tuple)
    t_attention_s: float = 0.0  # decode attention over the cache at this depth (part of compute)
    pp_t_attention_s: float = 0.0  # the same per prompt token
    # The range 80 % of held-out runs fell in (Calibration.*_error_band): "8.1 t/s (6.9-9.4)".
    tg_range: tuple[float, float] = (0.0, 0.0)
    pp_range: tuple[float, float] = (0.0, 0.0)


def nearest_rate(rates: dict[str, float], type_name: str, per_byte: bool = False,
                 ratios: dict[str, float] | None = None) -> float:
    """A type not calibrated takes its measured ratio to Q4_K on the same core (`ratios`, decode
    only: Calibration.decode_type_ratio), else the rate of the calibrated type closest in bits
    per weight.

    `per_byte`: the rates are weight bytes per second (decode's dequantize-and-dot), so the
    borrowed rate is converted through weights per second (a low-bit file is compute-bound
    sooner). That guess is what a type without a measured ratio gets: the measured ones show
    how wrong it can be, IQ1_S_R4 unpacks half Q4_K's weights per second, not Q2_K's 1.3x."""
    if type_name in rates:
        return rates[type_name]
    if per_byte and ratios and type_name in ratios and "Q4_K" in rates:
        return rates["Q4_K"] * ratios[type_name]
    bpw = bits_per_weight()
    want = bpw.get(type_name, 8.0)
    best = min(rates, key=lambda n: abs(bpw.get(n, 8.0) - want))
    if per_byte:
        return rates[best] * want / bpw.get(best, 8.0)
    return rates[best]


def read_bandwidth_gbps(m: MachineBandwidth, threads: int, numa: str) -> tuple[float, int]:
    """Bandwidth `threads` pinned cores pull under a NUMA policy, and the nodes they span.

    Cores add bandwidth until their node saturates (the probe's thread sweep shows that knee).
    Off one node, llama.cpp's --numa distribute puts thread i on node i % nodes, so threads span
    every node however few they are. `distribute` reads pages where threads first touched them
    (local; predict() puts repacked weights on the loader's node); `interleave` (numactl
    --interleave=all) makes (k-1)/k of each node's reads remote; `off` leaves the weights on the
    node whose page cache read the file, which serves every thread.
    """
    if numa not in NUMA_POLICIES:
        raise ValueError(f"numa policy {numa!r} is not one of {NUMA_POLICIES}")
    nodes = 1 if numa == "one-node" else max(1, min(m.nodes, threads))
    per_node_threads = threads / nodes
    node_bw = min(per_node_threads * m.core_read_gbps, m.node_read_gbps)
    if numa == "one-node" or nodes == 1:
        return nodes * node_bw, nodes
    if numa == "distribute":
        return nodes * node_bw, nodes  # pages each thread touched first: local
    local = 1 / nodes
    per_byte = local / node_bw + (1 - local) / (node_bw * m.remote_ratio)
    if numa == "interleave":
        return nodes / per_byte, nodes
    # off: one node's controllers serve everyone; other nodes' threads read remotely.
    return min(m.node_read_gbps, nodes / per_byte), nodes


# Weight types llama.cpp's CPU backend copies into its repack buffer on x86 (ggml-cpu/repack.cpp
# @0c1e57098, extra buffer types), the ISA flag each needs, and the date the pull request that
# added it was opened (a build older than that cannot have it; None: before any published row):
# Q4_K ggml-org/llama.cpp#12332, Q2_K #14373, IQ4_NL #14904; Q4_0 on AVX2 came with #10446 (its
# thread agreed to merge on 2024-12-07). ik_llama.cpp's -rtr repacks all.
X86_REPACK = {"Q4_0": ("avx2", "2024-12-07"), "Q4_K": ("avx2", "2025-03-11"), "IQ4_NL": ("avx2", "2025-07-27"),
              "MXFP4": ("avx2", None), "Q2_K": ("avx512f", "2025-06-25")}


def repacked_types(isa, build_date: str | None = None) -> frozenset[str]:
    """The weight types mainline llama.cpp repacks at load on a CPU with these ISA flags, in the
    pinned build or (`build_date`, YYYY-MM-DD) in an older one."""
    flags = set(isa)
    return frozenset(t for t, (need, since) in X86_REPACK.items()
                     if need in flags and not (build_date and since and build_date < since))


def repacked_share(by_type: dict[str, float], machine: MachineBandwidth, engine: str,
                   build_date: str | None = None, repack: bool = True) -> float:
    """The share of the bytes read per token that sit in repacked copies: the loading thread
    writes those, so under --numa distribute they are all on its node (first touch).
    `build_date` (YYYY-MM-DD): a mainline build of that date, which lacks the later repacks."""
    total = sum(by_type.values()) or 1.0
    if engine == "ik_llama":
        return 1.0
    if not repack:
        return 0.0
    types = repacked_types(machine.isa, build_date)
    return sum(b for t, b in by_type.items() if t in types) / total


def at_read_bandwidth(m: MachineBandwidth, threads: int, gbps: float, numa: str = "one-node") -> MachineBandwidth:
    """The machine as a read measured just before a run found it (issue 18): node and core
    bandwidth scaled by k so that `threads` under `numa` pull `gbps`, the knee kept."""
    now, _ = read_bandwidth_gbps(m, max(1, min(threads, m.cores)), numa)
    k = gbps / now
    return replace(m, node_read_gbps=m.node_read_gbps * k, core_read_gbps=m.core_read_gbps * k)


def _active_bytes_by_type(model: ModelProfile) -> dict[str, float]:
    if model.active_bytes_by_type:
        return dict(model.active_bytes_by_type)
    scale = model.active_bytes_per_token / model.weight_bytes if model.weight_bytes else 0.0
    return {k: v * scale for k, v in model.bytes_by_type.items()}


def _expert_bytes_by_type(model: ModelProfile, by_type: dict[str, float], expert_tok: float) -> dict[str, float]:
    """Routed-expert bytes per token by type; a profile without them spreads the experts evenly."""
    if model.expert_active_bytes_by_type:
        return {t: min(float(model.expert_active_bytes_by_type.get(t, 0)), b) for t, b in by_type.items()}
    share = min(expert_tok / (sum(by_type.values()) or 1.0), 1.0)
    return {t: b * share for t, b in by_type.items()}


def prefill_work(model: ModelProfile, by_type: dict[str, float], n_ubatch: int) -> tuple[dict[str, float], float]:
    """Active bytes by type and matrix FLOPs per prompt token: llama.cpp computes logits for a
    prompt batch's last token only (llama-bench's pp and the server's prompt alike), so the
    output matrix counts once per ubatch, not once per token; for a 1.5B distill with a 152k
    vocabulary that is 15 % of the per-token FLOPs."""
    skipped = 1 - 1 / max(n_ubatch, 1)
    out = dict(by_type)
    if model.output_type in out:
        out[model.output_type] = max(out[model.output_type] - model.output_bytes * skipped, 0.0)
    return out, max(model.flops_per_token - 2 * model.output_params * skipped, 0.0)


def combine(a: float, b: float, p: float) -> float:
    """max(a, b) for p = 0, else the p-norm: the larger term, plus some of the smaller one."""
    if p <= 0:
        return max(a, b)
    hi = max(a, b)
    return hi * ((a / hi) ** p + (b / hi) ** p) ** (1 / p) if hi > 0 else 0.0


def workers(threads: int, cores: int, scaling: float, smt_gain: float, serial: float = 0.0) -> float:
    """Effective parallel workers of `threads` on `cores` physical cores: n physical cores do
    n^scaling / (1 + serial (n - 1)) cores' work; threads past them run on SMT siblings, each
    adding `smt_gain` of a core (negative: the core they share gets slower, as llama.cpp's spin
    barriers make it)."""
    phys = max(1, min(threads, cores))
    w = phys ** scaling / (1 + serial * (phys - 1))
    extra = max(threads - cores, 0)
    if extra:
        w *= max(1 + smt_gain * min(extra, cores) / cores, 0.05)
    return w


def engine_rates(cal: Calibration, engine: str) -> tuple[float, float, float]:
    """Factors on the decode, prefill and attention rates for an engine (1 for llama.cpp)."""
    if engine == "ik_llama":
        return cal.ik_tg_factor, cal.ik_pp_factor, cal.ik_attn_factor
    if engine != "llama.cpp":
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    return 1.0, 1.0, 1.0


def rates_for(cal: Calibration, machine: MachineBandwidth) -> tuple[Calibration, str | None]:
    """`cal` with the per-core rate tables of the machine's core family (Calibration.family_rates),
    or of the nearest family it has when this core is not among them (same vector ISA first),
    scaled by how much SIMD work each core does per cycle (cores.vector_scale), and the family
    used; `cal` itself when it holds no family tables (a box's own calibration)."""
    if not cal.family_rates:
        return cal, None
    fam = machine.core_family if machine.core_family in cal.family_rates else \
        nearest_family(frozenset(cal.family_rates), machine.isa, any_isa=True)
    if fam is None:
        return cal, None
    t = cal.family_rates[fam]
    k = family_scale(machine, fam)
    return replace(cal, decode_gbps_per_core={n: v * k for n, v in t["decode"].items()},
                   prefill_gflops_per_core={n: v * k for n, v in t["prefill"].items()}), fam


def family_scale(machine: MachineBandwidth, fam: str) -> float:
    """The factor on family `fam`'s per-core rates for this machine's cores: 1 for its own family
    or a core of unknown family, else cores.vector_scale."""
    if not machine.core_family or machine.core_family == fam:
        return 1.0
    return vector_scale(machine.core_family, fam) or 1.0


def fa_row_pass_flops(model: ModelProfile, settings: Settings, cal: Calibration) -> float:
    """Mainline flash-attention decode's first pass over each KV head's cached rows, as FLOPs at
    the attention rate (Calibration.fa_kv_row_flops): 0 for MLA's one latent, ik_llama.cpp's own
    kernels and attention without flash attention."""
    if (model.mla or not settings.flash_attn or settings.engine != "llama.cpp" or not settings.depth
            or model.n_head_kv < 1 or model.key_length < 1):
        return 0.0
    gap = (model.n_head_kv - 1) * model.key_length * cache_type_bytes(settings.cache_type)
    return kv_rows_at(model, settings.depth) * cal.fa_kv_row_flops * min(1.0, gap / cal.fa_kv_gap_bytes)


# Mainline's CPU flash attention for a batch of queries (ggml-cpu ops.cpp,
# ggml_compute_forward_flash_attn_ext_f16 at the pinned commit): the n_tokens x n_head query rows
# are cut into 4 x threads chunks (one per thread with one thread, or under --numa, which turns
# chunking off), taken by the next free thread; inside a chunk, tiles of up to FA_TILE_Q rows of
# one head each make a full pass over the cached K/V, and every tile costs a full FA_TILE_Q-row
# GEMM however few rows it holds. A chunk that starts or ends inside a head or tile pays for a
# whole tile: 12 heads x 64 tokens on 2 threads make 16 tiles of work, not 12.
FA_TILE_Q = 64


def fa_prefill_tile_factor(n_tokens: int, n_head: int, threads: int, chunking: bool = True) -> float:
    """The busiest thread's attention work in mainline's tiled flash attention over an even share
    of the rows (>= 1; 1.0 below one tile of tokens, which runs the row-by-row path)."""
    if n_tokens < FA_TILE_Q or n_head < 1 or threads < 1:
        return 1.0
    nr = n_tokens * n_head
    chunk = -(-nr // (4 * threads))
    nchunk = -(-nr // chunk)
    if threads == 1 or nchunk < threads or not chunking:
        nchunk = threads
    dr = -(-nr // nchunk)
    busy = [0] * threads  # tiles each thread has run; the next chunk goes to the first one free
    for c in range(nchunk):
        a, b = c * dr, min((c + 1) * dr, nr)
        tiles = 0
        while a < b:  # one head's part of the chunk at a time
            end = min(b, (a // n_tokens + 1) * n_tokens)
            tiles += -(-(end - a) // FA_TILE_Q)
            a = end
        i = c if c < threads else min(range(threads), key=busy.__getitem__)
        busy[i] += tiles
    return max(busy) * FA_TILE_Q * threads / nr


def predict(model: ModelProfile, machine: MachineBandwidth, settings: Settings,
            cal: Calibration) -> Prediction:
    notes = []
    cal, fam = rates_for(cal, machine)
    if fam and fam != machine.core_family:
        k = family_scale(machine, fam)
        scaled = f", x{k:.2g} for its SIMD width (configs/core_families.csv)" if k != 1 else ""
        notes.append(f"per-core rates of {fam} cores{scaled}: the nearest family calibrated to a "
                     f"{machine.core_family or 'core of unknown family'}")
    if machine.core_told == "caches":
        notes.append(f"core family {machine.core_family} told by its caches and ISA flags: the CPU "
                     f"reports no model cputune knows (configs/core_families.csv)")
    logical = max(machine.logical_cpus, machine.cores)
    asked = max(1, settings.threads)
    threads = min(asked, logical)
    if asked > logical:
        notes.append(f"{asked} threads asked, {logical} CPUs: predicted at {threads}")
    elif threads > machine.cores:
        notes.append(f"{threads} threads on {machine.cores} physical cores: "
                     f"{threads - machine.cores} run on SMT siblings")
    tg_f, pp_f, attn_f = engine_rates(cal, settings.engine)
    phys = min(threads, machine.cores)  # siblings add no memory-level parallelism of their own
    bw, nodes = read_bandwidth_gbps(machine, phys, settings.numa)
    sockets = machine.sockets_spanned(nodes)
    eff_bw = bw * cal.bw_efficiency * (cal.page_4k_efficiency if settings.page_size == "4K" else 1.0)
    kv_read = kv_read_bytes(model, settings.depth, settings.cache_type)
    bytes_tok = model.active_bytes_per_token + kv_read
    expert_tok = (model.expert_bytes * model.n_expert_used / model.n_expert) if model.is_moe else 0.0
    by_type = _active_bytes_by_type(model)
    if settings.numa == "distribute" and nodes > 1:
        # Repacked weights sit on the loading thread's node; the rest where threads touched them.
        share = repacked_share(by_type, machine, settings.engine, settings.build_date, settings.repack)
        off_bw, _ = read_bandwidth_gbps(machine, phys, "off")
        eff_bw = 1 / (share / (off_bw * eff_bw / bw) + (1 - share) / eff_bw)
    # The weights' matmuls and the attention over the cache are separate ops, run one after the
    # other: each overlaps its own reads and arithmetic, the two do not overlap each other.
    t_mem_w = (bytes_tok - kv_read - expert_tok + expert_tok / cal.moe_bw_efficiency) / (eff_bw * 1e9)
    t_kv = kv_read / (eff_bw * 1e9)
    t_mem = t_mem_w + t_kv

    w_tg = workers(threads, machine.cores, cal.thread_scaling, cal.smt_tg_gain, cal.serial_share)
    experts = _expert_bytes_by_type(model, by_type, expert_tok)
    t_cpu = sum((b - experts[t] + experts[t] / cal.moe_decode_efficiency)
                / (w_tg * tg_f * nearest_rate(cal.decode_gbps_per_core, t, per_byte=True,
                                                   ratios=cal.decode_type_ratio) * 1e9)
                for t, b in by_type.items() if b)
    # Attention over the cache: every head's query against each cached token (for MLA, against
    # the shared latent), then the value mix; the KV bytes are small beside the FLOPs for MLA.
    mla_f = cal.mla_attn_factor if model.mla else 1.0
    fa_tg = fa_pp = 1.0
    if not settings.flash_attn:
        fa_tg = cal.fa_off_mla_decode_factor if model.mla else cal.fa_off_decode_factor
        fa_pp = cal.fa_off_prefill_factor
    t_attn_cpu = ((attn_flops_at(model, settings.depth) + fa_row_pass_flops(model, settings, cal))
                  / (w_tg * attn_f * mla_f * fa_tg * cal.attn_gflops_per_core * 1e9))
    t_attn = combine(t_kv, t_attn_cpu, cal.overlap_p) if settings.depth else 0.0
    t_ovh = (model.n_layer * (cal.overhead_s_per_layer + cal.overhead_s_per_layer_thread * threads)
             * (1 + cal.overhead_node_factor * (sockets - 1)))
    t_tok = combine(t_mem_w, t_cpu, cal.overlap_p) + t_attn + t_ovh
    bottleneck = "memory" if t_mem >= t_cpu + t_attn_cpu else "compute"
    if t_ovh > max(t_mem, t_cpu + t_attn_cpu):
        bottleneck = "overhead"

    # Prefill: FLOPs of the active matrices per token at each type's rate; one pass over all
    # weights per ubatch (a batch of 512 touches nearly every expert). The logits matrix runs
    # for the ubatch's last token only.
    tb = min(max(1, settings.threads_batch or threads), logical)
    n_prompt = settings.n_prompt or settings.n_ubatch
    pp_bytes, flops_tok = prefill_work(model, by_type, settings.n_ubatch)
    # Routed experts' share of the matrix FLOPs runs at the MoE prefill efficiency of its type.
    isa_factor = cal.avx512_prefill_factor if "avx512f" in machine.isa else 1.0
    pp_workers = workers(tb, machine.cores, cal.prefill_thread_scaling, cal.smt_pp_gain,
                         cal.prefill_serial_share)
    # FLOPs follow parameters, not bytes: a Q6_K byte holds fewer weights than a Q4_K byte.
    bpw = bits_per_weight()
    params = {t: b * 8 / bpw.get(t, 8.0) for t, b in pp_bytes.items()}
    total_params = sum(params.values()) or 1.0
    t_pp_cpu = model.n_layer * model.n_embd * cal.elementwise_s / pp_workers
    for t, b in pp_bytes.items():
        if b:
            expert_share = min(experts[t] / b, 1.0)
            moe_eff = cal.moe_prefill_efficiency_by_type.get(t, cal.moe_prefill_efficiency)
            t_pp_cpu += (flops_tok * params[t] / total_params
                         * (1 - expert_share + expert_share / moe_eff)
                         / (pp_workers * pp_f * isa_factor * nearest_rate(cal.prefill_gflops_per_core, t) * 1e9))
    # A prompt token attends to the cache before it and to the prompt tokens ahead of it; in
    # mainline's tiled flash attention the busiest thread may run padded tiles (see above).
    tiles = 1.0
    if settings.engine == "llama.cpp" and settings.flash_attn and settings.cache_type in ("f16", "f32"):
        numa_on = settings.numa in ("interleave", "distribute") and machine.nodes > 1  # ggml_is_numa()
        tiles = fa_prefill_tile_factor(min(n_prompt, settings.n_ubatch), model.n_head, tb, chunking=not numa_on)
    t_pp_attn = (attn_flops_at(model, settings.depth + n_prompt / 2) * tiles
                 / (pp_workers * attn_f * mla_f * fa_pp * isa_factor * cal.attn_prefill_gflops_per_core * 1e9))
    t_pp_cpu += t_pp_attn
    t_pp_cpu *= 1 + cal.prefill_node_factor * (sockets - 1)
    t_pp_mem = model.weight_bytes / settings.n_ubatch / (eff_bw * 1e9)
    t_pp = combine(t_pp_cpu, t_pp_mem, cal.overlap_p) + t_ovh / settings.n_ubatch
    need = model.weight_bytes + int(kv_cache_bytes(model, settings.depth + n_prompt, settings.cache_type))
    return Prediction(
        tg_tokens_per_s=1 / t_tok, pp_tokens_per_s=1 / t_pp, bottleneck=bottleneck,
        bytes_per_token=bytes_tok, effective_bw_gbps=eff_bw,
        roofline_tg_tokens_per_s=eff_bw * 1e9 / bytes_tok, t_memory_s=t_mem, t_compute_s=t_cpu + t_attn_cpu,
        t_overhead_s=t_ovh, pp_bottleneck="compute" if t_pp_cpu >= t_pp_mem else "memory",
        memory_needed_bytes=need, nodes_used=nodes, notes=tuple(notes),
        t_attention_s=t_attn, pp_t_attention_s=t_pp_attn,
        tg_range=(cal.tg_error_band[0] / t_tok, cal.tg_error_band[1] / t_tok),
        pp_range=(cal.pp_error_band[0] / t_pp, cal.pp_error_band[1] / t_pp))


BOX_TERMS = ("bw", "fixed")
# A box's factors stay within this of the pooled terms: its runs correct the profile's bandwidth
# figure (an MLC read, an estimate) and its fixed cost, not the physics.
BOX_TERM_RANGE = (0.2, 5.0)


def for_box(cal: Calibration, box: str | None) -> Calibration:
    """`cal` with the per-box terms its fit found for hardware profile `box` (Calibration.box_terms),
    or `cal` itself for a box it has none for."""
    f = cal.box_terms.get(box or "")
    if not f:
        return cal
    bw, fixed = f.get("bw", 1.0), f.get("fixed", 1.0)
    return replace(cal, bw_efficiency=cal.bw_efficiency * bw, overhead_s_per_layer=cal.overhead_s_per_layer * fixed,
                   overhead_s_per_layer_thread=cal.overhead_s_per_layer_thread * fixed,
                   source=f"{cal.source}; {box}'s own runs: bandwidth share x{bw:.2f}, fixed cost x{fixed:.2f}")


def for_new_box(cal: Calibration) -> Calibration:
    """`cal` with the ranges of a box its fit never saw (Calibration.*_error_band_new_box), when
    it has them: what a hardware profile without published runs is predicted with."""
    if cal.tg_error_band_new_box == (1.0, 1.0):
        return cal
    return replace(cal, tg_error_band=cal.tg_error_band_new_box, pp_error_band=cal.pp_error_band_new_box,
                   error_band_source=cal.error_band_source_new_box)


def best_threads(model: ModelProfile, machine: MachineBandwidth, settings: Settings,
                 cal: Calibration) -> tuple[int, int]:
    """The thread counts the predictor finds fastest for decode (-t) and prefill (-tb) under
    `settings`, from 1 to every logical CPU: decode often peaks below all cores (the fixed
    cost grows with threads once bandwidth is spent), prefill nearer to all of them."""
    top = max(machine.logical_cpus, machine.cores)
    step = max(1, top // 512)
    counts = sorted(set(range(step, top + 1, step)) | {1, machine.cores, machine.cores_per_node, top})
    tg = max(counts, key=lambda n: predict(model, machine, replace(settings, threads=n, threads_batch=n),
                                           cal).tg_tokens_per_s)
    pp = max(counts, key=lambda n: predict(model, machine, replace(settings, threads=n, threads_batch=n),
                                           cal).pp_tokens_per_s)
    return tg, pp
