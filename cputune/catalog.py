"""Models known by architecture (configs/models.toml): the GGUF header a preset would have, without the file.

For a catalog id and a llama-quantize preset this builds what gguf_model.read_raw returns for a real
file: the metadata keys llama.cpp's converter writes and every tensor with its ne-order shape and
the type llama-quantize gives it (quant_rules). gguf_model.profile_from then does the per-token
arithmetic, the same code that reads real files.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from cputune.data import load_toml
from cputune.errors import ConfigError, ModelError
from cputune.gguf_model import ModelProfile, TensorInfo, profile_from, tensor_bytes, type_id
from cputune.quant_rules import preset_types, quant_model, tensor_types

# The float type convert_hf_to_gguf.py writes 2-D weights in (--outtype bf16 for these bf16/fp8
# checkpoints). Only tensors llama-quantize never touches keep it, and those are F32 here anyway.
SOURCE_TYPE = "BF16"
# conversion/base.py: 1-D tensors, norms and routers (FFN_GATE_INP) are always written as F32.
F32 = "F32"

# GGUF header estimate (ggml docs/gguf.md layout), bytes:
#   per tensor: info record = name (u64 length + ~32 chars) + n_dims u32 + 3 dims u64 + type u32
#     + offset u64 = 8 + 32 + 4 + 24 + 4 + 8 = 80, plus 16 on average padding the data to 32 bytes
#   per vocabulary entry: token (u64 length + ~7 bytes of text) + token type i32 = 19, and one BPE
#     merge (u64 length + ~12 bytes) = 20
#   64 KiB for the remaining keys (chat template, hyperparameters)
HEADER_BYTES_PER_TENSOR = 80 + 16
HEADER_BYTES_PER_TOKEN = 19 + 20
HEADER_BYTES_FIXED = 64 * 1024


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One configs/models.toml table: the HF config numbers of a model (see the file's header)."""

    id: str
    name: str
    hf_repo: str
    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    ctx: int
    source: str
    tied: bool = False
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    rope_freqs: bool = False
    aliases: tuple[str, ...] = ()
    # deepseek2 (MLA + MoE)
    n_dense_lead: int = 0
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    n_ff_exp: int = 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    expert_weights_scale: float = 1.0
    expert_gating: str = "softmax"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


_ARCHS = ("deepseek2", "qwen2", "llama")
_FIELDS = {f.name for f in dataclasses.fields(CatalogModel)}


def model_from_table(model_id: str, table: dict, where: str = "configs/models.toml") -> CatalogModel:
    """One model table (models.toml, or the shapes in published_runs.toml) as a CatalogModel."""
    unknown = set(table) - _FIELDS
    if unknown:
        raise ConfigError(f"{where} [{model_id}]: unknown keys {', '.join(sorted(unknown))}")
    if table.get("arch") not in _ARCHS:
        raise ConfigError(f"{where} [{model_id}]: arch {table.get('arch')!r} is not one of "
                          + ", ".join(_ARCHS))
    fields = dict(table, id=model_id, aliases=tuple(table.get("aliases", ())))
    try:
        return CatalogModel(**fields)
    except TypeError as e:
        raise ConfigError(f"{where} [{model_id}]: {e}") from None


def load_catalog() -> dict[str, CatalogModel]:
    """Every catalog model by id (aliases not expanded; catalog_model() resolves them)."""
    return {model_id: model_from_table(model_id, table)
            for model_id, table in load_toml("models.toml").items()}


def catalog_model(model_id: str) -> CatalogModel:
    """The catalog model with this id or alias (case-insensitive); ModelError listing the ids if none."""
    catalog = load_catalog()
    key = model_id.lower()
    for m in catalog.values():
        if key == m.id or key in m.aliases:
            return m
    raise ModelError(f"no model {model_id!r} in the catalog",
                     hint="catalog models: " + ", ".join(
                         m.id + (f" (also {', '.join(m.aliases)})" if m.aliases else "")
                         for m in catalog.values()) + "; or pass a GGUF file")


# ---------------------------------------------------------------------------------------------
# Layout: (name, ne-order shape, source type) per tensor, in the order the converter writes them.

Layout = list[tuple[str, tuple[int, ...], str]]


def _layout(m: CatalogModel) -> Layout:
    if m.arch == "deepseek2":
        return _deepseek2_layout(m)
    return _dense_layout(m)


def _dense_layout(m: CatalogModel) -> Layout:
    # src/models/llama.cpp and qwen2.cpp load_arch_tensors: q/k/v/o, SwiGLU FFN; qwen2 adds q/k/v biases.
    hd, kv = m.head_dim, m.n_head_kv * m.head_dim
    out: Layout = [("token_embd.weight", (m.n_embd, m.n_vocab), SOURCE_TYPE)]
    if m.rope_freqs:
        out.append(("rope_freqs.weight", (hd // 2,), F32))
    for i in range(m.n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (m.n_embd,), F32),
            (b + "attn_q.weight", (m.n_embd, m.n_head * hd), SOURCE_TYPE),
            (b + "attn_k.weight", (m.n_embd, kv), SOURCE_TYPE),
            (b + "attn_v.weight", (m.n_embd, kv), SOURCE_TYPE),
        ]
        if m.qkv_bias:
            out += [(b + "attn_q.bias", (m.n_head * hd,), F32), (b + "attn_k.bias", (kv,), F32),
                    (b + "attn_v.bias", (kv,), F32)]
        out += [
            (b + "attn_output.weight", (m.n_head * hd, m.n_embd), SOURCE_TYPE),
            (b + "ffn_norm.weight", (m.n_embd,), F32),
            (b + "ffn_gate.weight", (m.n_embd, m.n_ff), SOURCE_TYPE),
            (b + "ffn_up.weight", (m.n_embd, m.n_ff), SOURCE_TYPE),
            (b + "ffn_down.weight", (m.n_ff, m.n_embd), SOURCE_TYPE),
        ]
    out.append(("output_norm.weight", (m.n_embd,), F32))
    if not m.tied:
        out.append(("output.weight", (m.n_embd, m.n_vocab), SOURCE_TYPE))
    return out


def _deepseek2_layout(m: CatalogModel) -> Layout:
    # src/models/deepseek2.cpp::load_arch_tensors, MLA layout (attn_kv_b split into 3-D attn_k_b and
    # attn_v_b since PR #12801), separate gate/up experts as conversion/deepseek.py writes R1
    # (shared/reference/deepseek_r1.md 3.3).
    qk_head = m.qk_nope_dim + m.qk_rope_dim
    ff_sh = m.n_ff_exp * m.n_expert_shared
    out: Layout = [("token_embd.weight", (m.n_embd, m.n_vocab), SOURCE_TYPE)]
    for i in range(m.n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (m.n_embd,), F32),
            (b + "attn_q_a_norm.weight", (m.q_lora_rank,), F32),
            (b + "attn_kv_a_norm.weight", (m.kv_lora_rank,), F32),
            (b + "attn_q_a.weight", (m.n_embd, m.q_lora_rank), SOURCE_TYPE),
            (b + "attn_q_b.weight", (m.q_lora_rank, m.n_head * qk_head), SOURCE_TYPE),
            (b + "attn_kv_a_mqa.weight", (m.n_embd, m.kv_lora_rank + m.qk_rope_dim), SOURCE_TYPE),
            (b + "attn_k_b.weight", (m.qk_nope_dim, m.kv_lora_rank, m.n_head), SOURCE_TYPE),
            (b + "attn_v_b.weight", (m.kv_lora_rank, m.v_head_dim, m.n_head), SOURCE_TYPE),
            (b + "attn_output.weight", (m.n_head * m.v_head_dim, m.n_embd), SOURCE_TYPE),
            (b + "ffn_norm.weight", (m.n_embd,), F32),
        ]
        if i < m.n_dense_lead:
            out += [
                (b + "ffn_gate.weight", (m.n_embd, m.n_ff), SOURCE_TYPE),
                (b + "ffn_up.weight", (m.n_embd, m.n_ff), SOURCE_TYPE),
                (b + "ffn_down.weight", (m.n_ff, m.n_embd), SOURCE_TYPE),
            ]
        else:
            out += [
                (b + "ffn_gate_inp.weight", (m.n_embd, m.n_expert), F32),
                (b + "exp_probs_b.bias", (m.n_expert,), F32),
                (b + "ffn_gate_exps.weight", (m.n_embd, m.n_ff_exp, m.n_expert), SOURCE_TYPE),
                (b + "ffn_up_exps.weight", (m.n_embd, m.n_ff_exp, m.n_expert), SOURCE_TYPE),
                (b + "ffn_down_exps.weight", (m.n_ff_exp, m.n_embd, m.n_expert), SOURCE_TYPE),
                (b + "ffn_gate_shexp.weight", (m.n_embd, ff_sh), SOURCE_TYPE),
                (b + "ffn_up_shexp.weight", (m.n_embd, ff_sh), SOURCE_TYPE),
                (b + "ffn_down_shexp.weight", (ff_sh, m.n_embd), SOURCE_TYPE),
            ]
    out.append(("output_norm.weight", (m.n_embd,), F32))
    if not m.tied:
        out.append(("output.weight", (m.n_embd, m.n_vocab), SOURCE_TYPE))
    return out


def _metadata(m: CatalogModel, file_type: int) -> dict:
    """The GGUF keys convert_hf_to_gguf.py writes that llama.cpp and profile_from read."""
    a = m.arch
    meta = {
        "general.architecture": a,
        "general.name": m.name,
        "general.file_type": file_type,
        f"{a}.block_count": m.n_layer,
        f"{a}.context_length": m.ctx,
        f"{a}.embedding_length": m.n_embd,
        f"{a}.feed_forward_length": m.n_ff,
        f"{a}.attention.head_count": m.n_head,
        f"{a}.attention.head_count_kv": m.n_head_kv,
        f"{a}.rope.freq_base": m.rope_theta,
        f"{a}.vocab_size": m.n_vocab,
    }
    if a == "deepseek2":
        # conversion/deepseek.py, MLA file: one latent KV head of kv_lora + rope, V = the latent
        # (shared/reference/deepseek_r1.md 3.3).
        meta.update({
            f"{a}.attention.head_count_kv": 1,
            f"{a}.attention.key_length": m.kv_lora_rank + m.qk_rope_dim,
            f"{a}.attention.value_length": m.kv_lora_rank,
            f"{a}.attention.key_length_mla": m.qk_nope_dim + m.qk_rope_dim,
            f"{a}.attention.value_length_mla": m.v_head_dim,
            f"{a}.attention.q_lora_rank": m.q_lora_rank,
            f"{a}.attention.kv_lora_rank": m.kv_lora_rank,
            f"{a}.rope.dimension_count": m.qk_rope_dim,
            f"{a}.leading_dense_block_count": m.n_dense_lead,
            f"{a}.expert_count": m.n_expert,
            f"{a}.expert_used_count": m.n_expert_used,
            f"{a}.expert_shared_count": m.n_expert_shared,
            f"{a}.expert_feed_forward_length": m.n_ff_exp,
            f"{a}.expert_weights_scale": m.expert_weights_scale,
            f"{a}.expert_weights_norm": True,
            # llama_expert_gating_func_type: 1 softmax, 2 sigmoid
            f"{a}.expert_gating_func": 2 if m.expert_gating == "sigmoid" else 1,
        })
    else:
        meta[f"{a}.rope.dimension_count"] = m.head_dim
    return meta


def catalog_tensors(model: CatalogModel | str, preset: str) -> tuple[dict, tuple[TensorInfo, ...]]:
    """(metadata, tensors) of `model` quantized with llama-quantize `preset`, as read_raw would return them."""
    m = catalog_model(model) if isinstance(model, str) else model
    p = preset_types(preset)
    meta = _metadata(m, p.file_type)
    layout = _layout(m)
    types = tensor_types(layout, p.name, quant_model(meta))
    tensors = []
    for name, shape, _ in layout:
        t = types[name]
        tid = _type_id(t)
        tensors.append(TensorInfo(name, t, tid, shape, math.prod(shape), tensor_bytes(shape, tid)))
    return meta, tuple(tensors)


@functools.lru_cache(maxsize=None)
def _type_id(name: str) -> int:
    return type_id(name)


def header_bytes(n_tensors: int, n_vocab: int) -> int:
    """Estimated GGUF header size: tensor infos and padding, vocabulary and merges, other keys."""
    return (n_tensors * HEADER_BYTES_PER_TENSOR + n_vocab * HEADER_BYTES_PER_TOKEN
            + HEADER_BYTES_FIXED)


def catalog_profile(model: CatalogModel | str, preset: str) -> ModelProfile:
    """The ModelProfile of a catalog model at a preset, from the same profile_from real files use."""
    m = catalog_model(model) if isinstance(model, str) else model
    meta, tensors = catalog_tensors(m, preset)
    weights = sum(t.n_bytes or 0 for t in tensors)
    meta = dict(meta, **{"general.name": f"{m.name} {preset_types(preset).name}"})
    return profile_from(meta, tensors, file_bytes=weights + header_bytes(len(tensors), m.n_vocab))
