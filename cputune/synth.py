"""Small, correctly shaped GGUF models with random weights, so llama.cpp can be run and calibrated without downloads."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    ExpertGatingFuncType,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
    TokenType,
)

from . import fsutil
from .errors import ConfigError, ProcessFailed, process_failed

# SPM vocabularies start <unk>, <s>, </s> (llama-vocab.cpp defaults unk=0, bos=1, eos=2), then the
# 256 byte-fallback pieces "<0x00>".."<0xFF>" that byte_to_token() looks up.
N_SPECIAL_TOKENS = 3
MIN_VOCAB = N_SPECIAL_TOKENS + 256

# deepseek2.cpp::load_arch_hparams treats these block counts as "lite" models without q_lora:
# a file with attn_q_a at 26/27 layers then fails with "wrong number of tensors".
_DEEPSEEK2_LITE_LAYERS = (26, 27)
# LLAMA_MAX_EXPERTS in src/llama-hparams.h.
_MAX_EXPERTS = 512
# DeepSeek-V2/V3/R1's MLA latent: kv_lora_rank 512 and 64 rope dims, so the cache holds K 576
# (512 + 64) and V 512 per token. ik_llama.cpp's loader adjusts a mainline-written MLA file only
# with these sizes and n_head a multiple of 4 (src/llama-hparams.cpp @8337e4cd, LLM_ARCH_DEEPSEEK2),
# and aborts on any other.
MLA_KV_LORA_RANK = 512
MLA_ROPE_DIM = 64
MLA_HEAD_MULTIPLE = 4
# K-quant super-block (QK_K in ggml-common.h): rows that llama-quantize turns into Q4_K/Q6_K must be
# a multiple of it, otherwise tensor_type_fallback() in llama-quant.cpp demotes them.
QK_K = 256

Shape = Union["LlamaShape", "Deepseek2Shape"]


@dataclass(frozen=True, slots=True)
class LlamaShape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    ctx: int = 4096

    arch = "llama"

    def __post_init__(self) -> None:
        _check_positive(self)
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"n_embd {self.n_embd} must split into {self.n_head} heads of even size")
        if self.n_head % self.n_head_kv:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_head_kv {self.n_head_kv}")
        _check_vocab(self.n_vocab)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True, slots=True)
class Deepseek2Shape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_dense_lead: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_ff_exp: int
    n_head: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    n_vocab: int
    ctx: int = 4096

    arch = "deepseek2"

    def __post_init__(self) -> None:
        _check_positive(self)
        if not self.n_dense_lead < self.n_layer:
            raise ConfigError(f"n_dense_lead {self.n_dense_lead} leaves no MoE block in {self.n_layer}")
        if self.n_layer in _DEEPSEEK2_LITE_LAYERS:
            raise ConfigError(f"llama.cpp reads a {self.n_layer}-block deepseek2 as a 'lite' model without q_lora",
                              hint="use another n_layer")
        if not self.n_expert_used <= self.n_expert <= _MAX_EXPERTS:
            raise ConfigError(f"need n_expert_used {self.n_expert_used} <= n_expert {self.n_expert} <= {_MAX_EXPERTS}")
        if self.qk_rope_dim % 2:
            raise ConfigError(f"qk_rope_dim {self.qk_rope_dim} must be even")
        _check_vocab(self.n_vocab)

    @property
    def ik_loadable(self) -> bool:
        """Whether ik_llama.cpp's DeepSeek loader takes this shape (see MLA_KV_LORA_RANK)."""
        return (self.kv_lora_rank, self.qk_rope_dim) == (MLA_KV_LORA_RANK, MLA_ROPE_DIM) \
            and self.n_head % MLA_HEAD_MULTIPLE == 0

    @property
    def yarn_orig_ctx(self) -> int:
        # R1 trained at 4096 and stretched by yarn factor 40 to 163840 (config.json rope_scaling).
        return min(self.ctx, 4096)


def _check_positive(shape) -> None:
    for name in shape.__slots__:
        value = getattr(shape, name)
        if value < 0 or (value == 0 and name != "n_dense_lead"):
            raise ConfigError(f"{type(shape).__name__}.{name} must be positive, got {value}")


def _check_vocab(n_vocab: int) -> None:
    if n_vocab < MIN_VOCAB:
        raise ConfigError(f"n_vocab {n_vocab} is below {MIN_VOCAB}: the vocabulary needs 3 specials and 256 byte tokens")


# ---------------------------------------------------------------------------------------------
# Tensor layout: one table per architecture, shared by the writer and the size estimate.

NORM, WEIGHT, ROUTER, BIAS = "norm", "weight", "router", "bias"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor: `ne` in ggml order (ne[0] = row length), and what fills it."""

    name: str
    ne: tuple[int, ...]
    kind: str  # NORM (F32 ones), WEIGHT (file dtype, random), ROUTER (F32 random), BIAS (F32 zeros)

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)


def tensor_specs(shape: Shape) -> tuple[TensorSpec, ...]:
    if isinstance(shape, LlamaShape):
        return _llama_specs(shape)
    if isinstance(shape, Deepseek2Shape):
        return _deepseek2_specs(shape)
    raise TypeError(f"not a model shape: {shape!r}")


def _llama_specs(s: LlamaShape) -> tuple[TensorSpec, ...]:
    # src/models/llama.cpp::load_arch_tensors; output.weight written untied like Llama 3 8B.
    kv = s.n_head_kv * s.head_dim
    specs = [TensorSpec("token_embd.weight", (s.n_embd, s.n_vocab), WEIGHT)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (s.n_embd,), NORM),
            TensorSpec(b + "attn_q.weight", (s.n_embd, s.n_embd), WEIGHT),
            TensorSpec(b + "attn_k.weight", (s.n_embd, kv), WEIGHT),
            TensorSpec(b + "attn_v.weight", (s.n_embd, kv), WEIGHT),
            TensorSpec(b + "attn_output.weight", (s.n_embd, s.n_embd), WEIGHT),
            TensorSpec(b + "ffn_norm.weight", (s.n_embd,), NORM),
            TensorSpec(b + "ffn_gate.weight", (s.n_embd, s.n_ff), WEIGHT),
            TensorSpec(b + "ffn_up.weight", (s.n_embd, s.n_ff), WEIGHT),
            TensorSpec(b + "ffn_down.weight", (s.n_ff, s.n_embd), WEIGHT),
        ]
    specs += [TensorSpec("output_norm.weight", (s.n_embd,), NORM),
              TensorSpec("output.weight", (s.n_embd, s.n_vocab), WEIGHT)]
    return tuple(specs)


def _deepseek2_specs(s: Deepseek2Shape) -> tuple[TensorSpec, ...]:
    # src/models/deepseek2.cpp::load_arch_tensors, MLA layout (split attn_k_b/attn_v_b, PR #12801),
    # separate gate/up experts as conversion/deepseek.py writes them.
    qk_head = s.qk_nope_dim + s.qk_rope_dim
    ff_sh = s.n_ff_exp * s.n_expert_shared
    specs = [TensorSpec("token_embd.weight", (s.n_embd, s.n_vocab), WEIGHT)]
    for i in range(s.n_layer):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (s.n_embd,), NORM),
            TensorSpec(b + "attn_q_a.weight", (s.n_embd, s.q_lora_rank), WEIGHT),
            TensorSpec(b + "attn_q_a_norm.weight", (s.q_lora_rank,), NORM),
            TensorSpec(b + "attn_q_b.weight", (s.q_lora_rank, s.n_head * qk_head), WEIGHT),
            TensorSpec(b + "attn_kv_a_mqa.weight", (s.n_embd, s.kv_lora_rank + s.qk_rope_dim), WEIGHT),
            TensorSpec(b + "attn_kv_a_norm.weight", (s.kv_lora_rank,), NORM),
            TensorSpec(b + "attn_k_b.weight", (s.qk_nope_dim, s.kv_lora_rank, s.n_head), WEIGHT),
            TensorSpec(b + "attn_v_b.weight", (s.kv_lora_rank, s.v_head_dim, s.n_head), WEIGHT),
            TensorSpec(b + "attn_output.weight", (s.n_head * s.v_head_dim, s.n_embd), WEIGHT),
            TensorSpec(b + "ffn_norm.weight", (s.n_embd,), NORM),
        ]
        if i < s.n_dense_lead:
            specs += [
                TensorSpec(b + "ffn_gate.weight", (s.n_embd, s.n_ff), WEIGHT),
                TensorSpec(b + "ffn_up.weight", (s.n_embd, s.n_ff), WEIGHT),
                TensorSpec(b + "ffn_down.weight", (s.n_ff, s.n_embd), WEIGHT),
            ]
        else:
            specs += [
                TensorSpec(b + "ffn_gate_inp.weight", (s.n_embd, s.n_expert), ROUTER),
                TensorSpec(b + "exp_probs_b.bias", (s.n_expert,), BIAS),
                TensorSpec(b + "ffn_gate_exps.weight", (s.n_embd, s.n_ff_exp, s.n_expert), WEIGHT),
                TensorSpec(b + "ffn_up_exps.weight", (s.n_embd, s.n_ff_exp, s.n_expert), WEIGHT),
                TensorSpec(b + "ffn_down_exps.weight", (s.n_ff_exp, s.n_embd, s.n_expert), WEIGHT),
                TensorSpec(b + "ffn_gate_shexp.weight", (s.n_embd, ff_sh), WEIGHT),
                TensorSpec(b + "ffn_up_shexp.weight", (s.n_embd, ff_sh), WEIGHT),
                TensorSpec(b + "ffn_down_shexp.weight", (ff_sh, s.n_embd), WEIGHT),
            ]
    specs += [TensorSpec("output_norm.weight", (s.n_embd,), NORM),
              TensorSpec("output.weight", (s.n_embd, s.n_vocab), WEIGHT)]
    return tuple(specs)


def n_params(shape: Shape) -> int:
    """Total elements in the file, which is what llama.cpp reports as model_n_params."""
    return sum(t.n_elements for t in tensor_specs(shape))


# ---------------------------------------------------------------------------------------------
# Sizes


def _ggml_type(dtype: str) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType[dtype.upper()]
    except KeyError:
        raise ConfigError(f"unknown tensor type {dtype!r}", hint="use f16, f32 or a ggml type such as q8_0") from None


def _tensor_bytes(spec: TensorSpec, qtype: GGMLQuantizationType) -> int:
    if spec.kind != WEIGHT:
        return 4 * spec.n_elements
    block, type_size = GGML_QUANT_SIZES[qtype]
    return spec.n_elements // block * type_size


def _vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    for i in range(n_vocab - MIN_VOCAB):
        # "▁" is SentencePiece's word-start marker; base-26 letters keep every piece unique.
        word, k = "", i
        while True:
            word = chr(ord("a") + k % 26) + word
            k = k // 26 - 1
            if k < 0:
                break
        tokens.append("\u2581" + word)
        types.append(TokenType.NORMAL)
    scores = [0.0] * MIN_VOCAB + [-float(i) for i in range(n_vocab - MIN_VOCAB)]
    return tokens, scores, [int(t) for t in types]


def estimate_bytes(shape: Shape, dtype: str = "f16") -> int:
    """File size if written with `dtype` (f16, f32), or rough size if every weight were of ggml type `dtype`.

    Norms, router and bias stay F32 as llama-quantize leaves them. The header estimate counts the
    vocabulary (8-byte length + text + score + type per token) and each tensor info; data is
    padded to the 32-byte GGUF alignment.
    """
    qtype = _ggml_type(dtype)
    specs = tensor_specs(shape)
    data = sum(GGUFWriter.ggml_pad(_tensor_bytes(t, qtype), 32) for t in specs)
    infos = sum(8 + len(t.name) + 4 + 8 * len(t.ne) + 4 + 8 for t in specs)
    return data + infos + _vocab_bytes(shape.n_vocab) + 4096


@functools.lru_cache(maxsize=None)
def _vocab_bytes(n_vocab: int) -> int:
    return sum(8 + len(tok.encode()) + 4 + 4 for tok in _vocab(n_vocab)[0])


def _round_to(x: float, step: int, minimum: int) -> int:
    return max(minimum, int(round(x / step)) * step)


def _vocab_at_width(n_embd: int) -> int:
    # 32768 from 4096 wide up (Llama 2: 32000 at 4096), 512 at the 256 width tests use.
    return min(32768, max(512, n_embd * n_embd // 512))


def _llama_at_width(n_embd: int, n_layer: int, n_expert: int, n_vocab: int) -> LlamaShape:
    # Head size 128 as in Llama 3 (64 below 1024 wide); GQA 4:1 as in Llama-3-8B (32 q / 8 kv heads).
    head_dim = 128 if n_embd >= 1024 else 64
    n_head = n_embd // head_dim
    return LlamaShape(n_layer=n_layer, n_embd=n_embd,
                      n_ff=_round_to(2.7 * n_embd, QK_K, QK_K),  # Llama 2 7B: 11008 / 4096 = 2.69
                      n_head=n_head, n_head_kv=max(1, n_head // 4), n_vocab=n_vocab, ctx=4096)


def _deepseek2_at_width(n_embd: int, n_layer: int, n_expert: int, n_vocab: int) -> Deepseek2Shape:
    # Proportions of DeepSeek-V3 (hidden 7168): q_lora 1536, moe_intermediate 2048, intermediate
    # 18432, head dims 128/64/128; rows that get quantized are rounded to QK_K, and n_head is a
    # multiple of 4 so attn_output rows (n_head * v_head_dim) are too. The latent is DeepSeek's own
    # at every width (MLA_KV_LORA_RANK, MLA_ROPE_DIM): ik_llama.cpp loads nothing else.
    big = n_embd >= 2048
    return Deepseek2Shape(
        n_layer=n_layer, n_embd=n_embd,
        n_ff=_round_to(n_embd * 18432 / 7168, QK_K, QK_K),
        n_dense_lead=1,
        n_expert=n_expert, n_expert_used=max(2, n_expert // 8), n_expert_shared=1,  # R1: 256, 8, 1
        n_ff_exp=_round_to(n_embd * 2048 / 7168, QK_K, QK_K),
        n_head=max(4, n_embd // 128 // 4 * 4),
        q_lora_rank=_round_to(n_embd * 1536 / 7168, QK_K, QK_K),
        kv_lora_rank=MLA_KV_LORA_RANK,
        qk_nope_dim=128 if big else 64, qk_rope_dim=MLA_ROPE_DIM, v_head_dim=128 if big else 64,
        n_vocab=n_vocab, ctx=4096)


# What shape_for_size makes; a cached file made by an older version is not reused (resolve's twins).
# 2: deepseek2 with DeepSeek's own MLA latent at every width (issue 16).
SHAPES_VERSION = 2
_WIDTHS = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
_EXPERT_COUNTS = (4, 8, 16, 32, 64)
# LLAMA_MAX_LAYERS in src/llama-hparams.h.
_MAX_LAYERS = 512


def shape_for_size(arch: str, target_bytes: int, dtype: str = "f16") -> Shape:
    """The shape closest to `target_bytes` on disk whose proportions look like a real model.

    For each width (and expert count) the depth is solved from size = fixed + n_layer * per_layer,
    then the vocabulary (up to 4x its usual size) takes up the rest, which is what makes a few MB
    reachable. Among shapes within 5 % it prefers n_layer near n_embd/128 (Llama-3-8B: 4096/128 =
    32; R1: 7168/128 = 56 vs 61), the usual vocabulary, and for deepseek2 16 experts at 256 wide,
    32 at 512-768 and 64 from 1024.
    """
    if arch == "llama":
        build: Callable[[int, int, int, int], Shape] = _llama_at_width
        expert_counts: Sequence[int] = (0,)
        min_layer = 1
    elif arch == "deepseek2":
        build = _deepseek2_at_width
        expert_counts = _EXPERT_COUNTS
        min_layer = 2  # one leading dense block and at least one MoE block
    else:
        raise ConfigError(f"no synthetic generator for architecture {arch!r}", hint="use llama or deepseek2")
    _ggml_type(dtype)

    # (err, score, n_embd, n_layer, n_expert, n_vocab)
    candidates: list[tuple[float, float, int, int, int, int]] = []
    for n_embd in _WIDTHS:
        v0 = _vocab_at_width(n_embd)
        for n_expert in expert_counts:
            base = estimate_bytes(build(n_embd, min_layer, n_expert, v0), dtype)
            per_layer = estimate_bytes(build(n_embd, min_layer + 1, n_expert, v0), dtype) - base
            per_token = (estimate_bytes(build(n_embd, min_layer, n_expert, v0 + 256), dtype) - base) / 256
            depth = min_layer + (target_bytes - base) / per_layer
            for n_layer in {math.floor(depth), math.ceil(depth)}:
                n_layer = min(_MAX_LAYERS, max(min_layer, n_layer))
                if arch == "deepseek2" and n_layer in _DEEPSEEK2_LITE_LAYERS:
                    n_layer = 25 if depth < 26.5 else 28
                size = base + (n_layer - min_layer) * per_layer
                n_vocab = int(v0 + (target_bytes - size) / per_token) // 64 * 64
                n_vocab = min(4 * v0, max(512, n_vocab))
                size += (n_vocab - v0) * per_token
                err = abs(size - target_bytes) / target_bytes
                score = abs(math.log(n_layer / max(2.0, n_embd / 128))) + 0.5 * abs(math.log2(n_vocab / v0))
                if n_expert:
                    ideal_experts = 16 if n_embd < 512 else 32 if n_embd < 1024 else 64
                    score += abs(math.log2(n_expert / ideal_experts))
                candidates.append((err, score, n_embd, n_layer, n_expert, n_vocab))
    close = [c for c in candidates if c[0] <= 0.05]
    best = min(close, key=lambda c: c[1]) if close else min(candidates, key=lambda c: c[0])
    shape = build(*best[2:])
    if abs(estimate_bytes(shape, dtype) - target_bytes) > 0.10 * target_bytes:
        smallest = estimate_bytes(build(_WIDTHS[0], min_layer, min(expert_counts), 512), dtype)
        raise ConfigError(f"no {arch} shape within 10% of {target_bytes} bytes ({dtype})",
                          hint=f"synthetic {arch} models start at about {smallest} bytes")
    return shape


# ---------------------------------------------------------------------------------------------
# Writing


class _RandomTensor:
    """Tensor data made on demand, chunk by chunk.

    GGUFWriter.write_tensor_data (gguf-py 0.17-0.19) only reads `.nbytes` and calls `.tofile(fout)`
    on a little-endian host, so a multi-GB tensor never has to sit in memory whole.
    """

    CHUNK_ELEMENTS = 1 << 22

    def __init__(self, n_elements: int, np_dtype: type, fill: Callable[[int], np.ndarray]):
        self.n_elements = n_elements
        self.nbytes = n_elements * np.dtype(np_dtype).itemsize
        self.np_dtype = np_dtype
        self.fill = fill

    def chunks(self) -> Iterator[np.ndarray]:
        done = 0
        while done < self.n_elements:
            n = min(self.CHUNK_ELEMENTS, self.n_elements - done)
            yield self.fill(n).astype(self.np_dtype, copy=False)
            done += n

    def tofile(self, fout) -> None:
        for chunk in self.chunks():
            chunk.tofile(fout)


def _random_f16(rng: np.random.Generator, n: int, rms: float) -> np.ndarray:
    """Random float16 built from raw bits: ~10x faster than drawing floats, which matters at GBs.

    Sign and 10 mantissa bits are random; the exponent is e0 + (0..3), so |w| spans four octaves
    below 2**(e0-11). RMS = 2**(e0-15) * sqrt(E[m^2] * mean(4**k)) = 2**(e0-15) * sqrt(7/3 * 85/4),
    about 7.04 * 2**(e0-15).
    """
    e0 = min(27, max(1, round(15 + math.log2(rms / 7.04))))
    r = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exponent = ((r >> np.uint16(10)) & np.uint16(3)) + np.uint16(e0)
    return ((r & np.uint16(0x83FF)) | (exponent << np.uint16(10))).view(np.float16)


def _tensor_data(spec: TensorSpec, np_dtype: type, seed: int, index: int) -> _RandomTensor:
    # One generator per tensor, so its bytes depend only on (seed, index), not on sharding.
    rng = np.random.default_rng([seed, index])
    # 1/sqrt(fan_in) keeps each matmul output at unit RMS after the RMS norm before it.
    rms = 1.0 / math.sqrt(spec.ne[0])
    if spec.kind == NORM:
        return _RandomTensor(spec.n_elements, np.float32, lambda n: np.ones(n, np.float32))
    if spec.kind == BIAS:
        return _RandomTensor(spec.n_elements, np.float32, lambda n: np.zeros(n, np.float32))
    if spec.kind == ROUTER:
        return _RandomTensor(spec.n_elements, np.float32, lambda n: _random_f16(rng, n, rms))
    return _RandomTensor(spec.n_elements, np_dtype, lambda n: _random_f16(rng, n, rms))


def _add_tokenizer(w: GGUFWriter, n_vocab: int) -> None:
    # SentencePiece ("llama") vocab: only tokens, scores and types are needed, and byte fallback
    # covers any text. A gpt2 BPE vocab would also need merges and a pre-tokenizer name.
    tokens, scores, types = _vocab(n_vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def _add_common(w: GGUFWriter, shape: Shape, dtype: str) -> None:
    w.add_name(f"synthetic {shape.arch} {n_params(shape) / 1e6:.1f}M")
    w.add_file_type(LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_vocab_size(shape.n_vocab)
    w.add_block_count(shape.n_layer)
    w.add_context_length(shape.ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)


def _add_llama_keys(w: GGUFWriter, s: LlamaShape) -> None:
    w.add_head_count_kv(s.n_head_kv)
    # llama.cpp rejects a llama file whose n_rot differs from the head size (load_hparams).
    w.add_rope_dimension_count(s.head_dim)


def _add_deepseek2_keys(w: GGUFWriter, s: Deepseek2Shape) -> None:
    # As conversion/deepseek.py writes an MLA file: MQA with one latent KV head of kv_lora + rope.
    w.add_head_count_kv(1)
    w.add_key_length(s.kv_lora_rank + s.qk_rope_dim)
    w.add_value_length(s.kv_lora_rank)
    w.add_key_length_mla(s.qk_nope_dim + s.qk_rope_dim)
    w.add_value_length_mla(s.v_head_dim)
    w.add_q_lora_rank(s.q_lora_rank)
    w.add_kv_lora_rank(s.kv_lora_rank)
    w.add_rope_dimension_count(s.qk_rope_dim)
    w.add_leading_dense_block_count(s.n_dense_lead)
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_expert_shared_count(s.n_expert_shared)
    w.add_expert_feed_forward_length(s.n_ff_exp)
    # R1 config.json: routed_scaling_factor 2.5, norm_topk_prob, scoring_func sigmoid.
    w.add_expert_weights_scale(2.5)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID)
    # Older llama.cpp required the yarn log multiplier (0.1 * mscale_all_dim, TAG_DEEPSEEK2_YARN_LOG_MUL_FIX).
    w.add_rope_scaling_type(RopeScalingType.YARN)
    w.add_rope_scaling_factor(s.ctx / s.yarn_orig_ctx)
    w.add_rope_scaling_orig_ctx_len(s.yarn_orig_ctx)
    w.add_rope_scaling_yarn_log_mul(0.1 * 1.0)


def _shard_starts(sizes: Sequence[int], n_shards: int) -> set[int]:
    """Indices that open shards 2..n: byte-balanced, every shard holding at least one tensor."""
    cum = list(itertools.accumulate(sizes))
    starts: list[int] = []
    for k in range(1, n_shards):
        i = bisect.bisect_left(cum, k * cum[-1] / n_shards) + 1
        i = max(i, starts[-1] + 1 if starts else 1)
        starts.append(min(i, len(sizes) - (n_shards - k)))
    return set(starts)


def _write(path: Path, shape: Shape, seed: int, dtype: str, n_shards: int,
           make_parents: bool | None = None) -> list[Path]:
    if dtype not in ("f16", "f32"):
        raise ConfigError(f"cannot write weights as {dtype!r}", hint="write f16 or f32, then quantize()")
    np_dtype = np.float16 if dtype == "f16" else np.float32
    specs = tensor_specs(shape)
    if not 1 <= n_shards <= len(specs):
        raise ConfigError(f"n_shards must be between 1 and {len(specs)}, got {n_shards}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise ConfigError(f"{path} must end in .gguf", hint="llama.cpp finds shards by the -0000N-of-0000M.gguf suffix")
    fsutil.check_target(path, make_parents)

    # Write into a private folder beside the target, then rename each file into place: readers
    # never see a half-written model, and the shard names gguf-py derives from the path stay
    # right. The folder is removed on any exception (Ctrl-C too); a killed writer's is removed by
    # the next write here (fsutil.clean_stale).
    with fsutil.scratch_dir(path.parent, path.name, make_parents=False) as tmp_dir:
        w = GGUFWriter(tmp_dir / path.name, shape.arch)
        _add_common(w, shape, dtype)
        if isinstance(shape, LlamaShape):
            _add_llama_keys(w, shape)
        else:
            _add_deepseek2_keys(w, shape)
        _add_tokenizer(w, shape.n_vocab)

        qtype = GGMLQuantizationType.F16 if dtype == "f16" else GGMLQuantizationType.F32
        sizes = [_tensor_bytes(t, qtype) for t in specs]
        starts = _shard_starts(sizes, n_shards) if n_shards > 1 else set()
        for i, (spec, nbytes) in enumerate(zip(specs, sizes)):
            # add_tensor_info opens a new shard when the current one holds split_max_tensors tensors;
            # setting it per tensor puts the cuts exactly where _shard_starts chose.
            w.split_max_tensors = len(w.tensors[-1]) if i in starts else 0
            t_dtype = np_dtype if spec.kind == WEIGHT else np.float32
            w.add_tensor_info(spec.name, tuple(reversed(spec.ne)), np.dtype(t_dtype), nbytes)
        w.split_max_tensors = 0
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, spec in enumerate(specs):
            w.write_tensor_data(_tensor_data(spec, np_dtype, seed, i))  # type: ignore[arg-type]
        w.close()

        written = w.format_shard_names(tmp_dir / path.name)
        final = [path.parent / p.name for p in written]
        for dst in final:
            fsutil.check_target(dst, make_parents=False)  # before any shard replaces an old one
        for src, dst in zip(written, final):
            fsutil.install(src, dst)
        return final


def write_llama(path: Path | str, shape: LlamaShape, seed: int = 0, dtype: str = "f16",
                n_shards: int = 1, make_parents: bool | None = None) -> list[Path]:
    """Write a dense llama model; returns the files written, the first being what llama.cpp opens.

    With n_shards > 1 the files are NAME-0000k-of-0000n.gguf beside `path`, as llama-gguf-split names them.
    `make_parents`: create a missing folder (None: only inside cputune's cache; fsutil.check_target).
    """
    if not isinstance(shape, LlamaShape):
        raise TypeError(f"expected LlamaShape, got {type(shape).__name__}")
    return _write(Path(path), shape, seed, dtype, n_shards, make_parents)


def write_deepseek2(path: Path | str, shape: Deepseek2Shape, seed: int = 0, dtype: str = "f16",
                    n_shards: int = 1, make_parents: bool | None = None) -> list[Path]:
    """Write a DeepSeek-V3-style MoE model in the MLA layout; returns the files as write_llama does."""
    if not isinstance(shape, Deepseek2Shape):
        raise TypeError(f"expected Deepseek2Shape, got {type(shape).__name__}")
    return _write(Path(path), shape, seed, dtype, n_shards, make_parents)


def write_model(path: Path | str, shape: Shape, seed: int = 0, dtype: str = "f16", n_shards: int = 1,
                make_parents: bool | None = None) -> list[Path]:
    return _write(Path(path), shape, seed, dtype, n_shards, make_parents)


# ---------------------------------------------------------------------------------------------
# Quantizing with the real tool


def quantize(src: Path | str, dst: Path | str, qtype: str, llama_quantize: Path | str,
             threads: int | None = None, make_parents: bool | None = None) -> Path:
    """Run `llama-quantize SRC DST TYPE [THREADS]`, writing DST atomically; qtype is a preset name such as Q4_K_M.

    llama-quantize writes a locked temporary file beside DST (fsutil.scratch_file), removed if it
    fails or cputune is interrupted; it dies with cputune (PR_SET_PDEATHSIG), so a killed
    calibrate leaves no quantize running, and its half-written file goes at the next write there.
    """
    from cputune.launch import die_with_parent

    src, dst = Path(src), Path(dst)
    with fsutil.scratch_file(dst, make_parents) as tmp:
        argv = [str(llama_quantize), str(src), str(tmp), qtype]
        if threads is not None:
            argv.append(str(threads))
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, errors="replace", check=False, preexec_fn=die_with_parent())
        except OSError as e:
            raise ProcessFailed(f"cannot run llama-quantize: {e}", argv, None,
                                hint="build llama.cpp first (`cputune build`)") from e
        if proc.returncode != 0:
            raise process_failed("llama-quantize", argv, proc.returncode, proc.stdout,
                                 f" making {qtype} from {src.name}",
                                 hint="llama-quantize --help lists the type names")
        fsutil.install(tmp, dst)
    return dst


def make_quantized(out: Path | str, arch: str, size_bytes: int, quant: str,
                   llama_quantize: Path | str, seed: int = 0, make_parents: bool | None = None) -> Path:
    """A model of `arch` about `size_bytes` on disk after quantizing to `quant` (a llama-quantize
    preset): the f16 shape is scaled by 16 / the preset's main bits per weight, written next to
    `out`, quantized, and removed. F16/BF16 are written directly.

    `make_parents`: create OUT's missing folder (None: only inside cputune's cache, as the twins
    are; `synth --out` names a folder that must exist)."""
    from cputune.gguf_model import bits_per_weight
    from cputune.quant_rules import preset_types

    out = Path(out)
    preset = preset_types(quant)
    if preset.name in ("F16", "BF16", "F32"):
        return write_model(out, shape_for_size(arch, size_bytes, preset.name.lower()), seed,
                           preset.name.lower(), make_parents=make_parents)[0]
    bpw = bits_per_weight().get(preset.default_type, 8.0)
    shape = shape_for_size(arch, int(size_bytes * 16 / bpw), "f16")
    fsutil.check_target(out, make_parents)  # before minutes of writing, not after
    with fsutil.scratch_dir(out.parent, out.name, make_parents=False) as tmp:
        base = write_model(tmp / "f16.gguf", shape, seed, make_parents=False)[0]
        return quantize(base, out, preset.name, llama_quantize, make_parents=False)
