"""Decode and prefill tokens/s from bandwidth, compute and a per-token fixed cost: pure math.

No I/O, no clock: a machine, a model profile, settings and calibrated constants in; a
Prediction carrying every term out, so the CLI can explain it and tests can check each term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from cputune.errors import ConfigError
from cputune.gguf_model import ModelProfile, bits_per_weight, kv_bytes_per_token

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

    @property
    def cores_per_node(self) -> int:
        return max(self.cores // max(self.nodes, 1), 1)


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
    overhead_node_factor: the fixed cost grows by this share per extra NUMA node spanned
        (barriers across sockets); fitted to the published two-socket runs.
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
    moe_decode_efficiency: float = 1.0
    elementwise_s: float = 0.0
    moe_prefill_efficiency_by_type: dict[str, float] = field(default_factory=dict)
    source: str = "default"


@dataclass(frozen=True, slots=True)
class Settings:
    threads: int
    numa: str = "one-node"
    depth: int = 0  # tokens already in the KV cache
    n_ubatch: int = 512
    cache_type: str = "f16"


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


def nearest_rate(rates: dict[str, float], type_name: str) -> float:
    """A type not calibrated takes the rate of the calibrated type closest in bits per weight."""
    if type_name in rates:
        return rates[type_name]
    bpw = bits_per_weight()
    want = bpw.get(type_name, 8.0)
    best = min(rates, key=lambda n: abs(bpw.get(n, 8.0) - want))
    return rates[best]


def read_bandwidth_gbps(m: MachineBandwidth, threads: int, numa: str) -> tuple[float, int]:
    """Bandwidth `threads` pinned cores pull under a NUMA policy, and the nodes they span.

    Cores add bandwidth until their node saturates (the probe's thread sweep shows that knee);
    `distribute` keeps each thread on pages it first touched (local); `interleave` makes
    (k-1)/k of each node's reads remote; `off` leaves all weights on the loader's node.
    """
    if numa not in NUMA_POLICIES:
        raise ValueError(f"numa policy {numa!r} is not one of {NUMA_POLICIES}")
    nodes = 1 if numa == "one-node" else min(m.nodes, math.ceil(threads / m.cores_per_node))
    per_node_threads = threads / nodes
    node_bw = min(per_node_threads * m.core_read_gbps, m.node_read_gbps)
    if numa in ("one-node", "distribute") or nodes == 1:
        return nodes * node_bw, nodes
    if numa == "interleave":
        local = 1 / nodes
        per_byte = local / node_bw + (1 - local) / (node_bw * m.remote_ratio)
        return nodes / per_byte, nodes
    # off: one node's controllers serve everyone; other nodes' threads read remotely.
    local = 1 / nodes
    per_byte = local / node_bw + (1 - local) / (node_bw * m.remote_ratio)
    return min(m.node_read_gbps, nodes / per_byte), nodes


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


def predict(model: ModelProfile, machine: MachineBandwidth, settings: Settings,
            cal: Calibration) -> Prediction:
    threads = max(1, min(settings.threads, machine.cores))
    notes = []
    if settings.threads > machine.cores:
        notes.append(f"{settings.threads} threads asked, {machine.cores} physical cores: "
                     f"predicted at {threads}")
    bw, nodes = read_bandwidth_gbps(machine, threads, settings.numa)
    eff_bw = bw * cal.bw_efficiency
    kv_tok = kv_bytes_per_token(model, settings.cache_type)
    kv_read = kv_tok * settings.depth
    bytes_tok = model.active_bytes_per_token + kv_read
    expert_tok = (model.expert_bytes * model.n_expert_used / model.n_expert) if model.is_moe else 0.0
    t_mem = (bytes_tok - expert_tok + expert_tok / cal.moe_bw_efficiency) / (eff_bw * 1e9)

    by_type = _active_bytes_by_type(model)
    workers = threads ** cal.thread_scaling
    total_active = sum(by_type.values()) or 1.0
    experts = _expert_bytes_by_type(model, by_type, expert_tok)
    t_cpu = sum((b - experts[t] + experts[t] / cal.moe_decode_efficiency)
                / (workers * nearest_rate(cal.decode_gbps_per_core, t) * 1e9)
                for t, b in by_type.items() if b)
    # Attention over the cache: K·q and the value mix read the KV in f16 arithmetic.
    t_cpu += kv_read / (workers * nearest_rate(cal.decode_gbps_per_core, "F16") * 1e9)
    t_ovh = (model.n_layer * (cal.overhead_s_per_layer + cal.overhead_s_per_layer_thread * threads)
             * (1 + cal.overhead_node_factor * (nodes - 1)))
    t_tok = combine(t_mem, t_cpu, cal.overlap_p) + t_ovh
    bottleneck = "memory" if t_mem >= t_cpu else "compute"
    if t_ovh > max(t_mem, t_cpu):
        bottleneck = "overhead"

    # Prefill: FLOPs of the active matrices per token at each type's rate; one pass over all
    # weights per ubatch (a batch of 512 touches nearly every expert). The logits matrix runs
    # for the ubatch's last token only.
    pp_bytes, flops_tok = prefill_work(model, by_type, settings.n_ubatch)
    flops_tok += model.attn_flops_per_ctx_token * (settings.depth + settings.n_ubatch / 2)
    # Routed experts' share of the matrix FLOPs runs at the MoE prefill efficiency of its type.
    isa_factor = cal.avx512_prefill_factor if "avx512f" in machine.isa else 1.0
    pp_workers = threads ** cal.prefill_thread_scaling
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
                         / (pp_workers * isa_factor * nearest_rate(cal.prefill_gflops_per_core, t) * 1e9))
    t_pp_mem = model.weight_bytes / settings.n_ubatch / (eff_bw * 1e9)
    t_pp = combine(t_pp_cpu, t_pp_mem, cal.overlap_p) + t_ovh / settings.n_ubatch
    need = model.weight_bytes + int(kv_tok * (settings.depth + settings.n_ubatch))
    return Prediction(
        tg_tokens_per_s=1 / t_tok, pp_tokens_per_s=1 / t_pp, bottleneck=bottleneck,
        bytes_per_token=bytes_tok, effective_bw_gbps=eff_bw,
        roofline_tg_tokens_per_s=eff_bw * 1e9 / bytes_tok, t_memory_s=t_mem, t_compute_s=t_cpu,
        t_overhead_s=t_ovh, pp_bottleneck="compute" if t_pp_cpu >= t_pp_mem else "memory",
        memory_needed_bytes=need, nodes_used=nodes, notes=tuple(notes))
