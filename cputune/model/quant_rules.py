"""llama-quantize's per-tensor type choice as pure functions, so a preset's size is known without the file.

A transliteration of src/llama-quant.cpp at the pinned llama.cpp (0c1e57098, vendored in
llama-cpp-python 0.3.36): tensor_allows_quantization, tensor_get_category,
llama_tensor_get_type(_impl), tensor_type_fallback, init_quantize_state_counters, and the order in
which llama-quantize visits tensors (llama_model_loader::weights_map). It covers the default path
of `llama-quantize IN OUT PRESET`: no --pure, no --tensor-type/--output-tensor-type overrides, and
quantize_output_tensor on. Arch-specific rules for archs cputune has no catalog entry for
(glm5-next's Q8_0 floor, bailingmoe3's MXFP4 expert match) are left out.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from gguf.constants import LlamaFileType

from cputune.core.data import load_csv
from cputune.core.errors import ConfigError, ModelError
from cputune.model.gguf_model import type_sizes

# tensor_category in llama-quant.cpp
OUTPUT, TOKEN_EMBD, ATTENTION_QKV, ATTENTION_KV_B, ATTENTION_V, ATTENTION_K, ATTENTION_Q = (
    "output", "token_embd", "attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q")
ATTENTION_OUTPUT, FFN_UP, FFN_GATE, FFN_DOWN, OTHER = "attn_output", "ffn_up", "ffn_gate", "ffn_down", "other"

# tensor_get_category: first substring match wins, in this order. Note "attn_k_b.weight" and
# "attn_v_b.weight" (MLA) match none of the attention patterns and fall to OTHER.
_CATEGORY_BY_SUBSTRING = (
    ("attn_qkv.weight", ATTENTION_QKV),
    ("attn_kv_b.weight", ATTENTION_KV_B),
    ("attn_v.weight", ATTENTION_V),
    ("attn_k.weight", ATTENTION_K),
    ("attn_q.weight", ATTENTION_Q),
    ("attn_output.weight", ATTENTION_OUTPUT),
    ("ffn_up", FFN_UP),
    ("ffn_gate", FFN_GATE),
    ("ffn_down", FFN_DOWN),
)

# tensor_allows_quantization: names containing these stay in their source type.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
# LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight") (src/llama-arch.cpp)
_NEVER_QUANTIZED_NAMES = ("position_embd.weight", "token_types.weight")

_FLOAT_TYPES = ("F32", "F16", "BF16")  # ggml_is_quantized() is false for these
_BLK_RE = re.compile(r"^blk\.(-?\d+)\.")

# Preset groups the rules test with `ftype == A || ftype == B ...`.
_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_IQ2S_M = ("IQ2_S", "IQ2_M")
_IQ1 = ("IQ1_S", "IQ1_M")
_Q5_K_OUTPUT = ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
_ATTN_OUT_8_EXPERT_Q5_K = ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S",
                           "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS")


@dataclass(frozen=True, slots=True)
class Preset:
    name: str  # canonical llama-quantize name (aliases resolved): "Q4_K_M"
    file_type: int  # llama_ftype, written to general.file_type
    default_type: str  # ggml type name every quantizable tensor starts from


@dataclass(frozen=True, slots=True)
class QuantModel:
    """What llama_tensor_get_type reads from the model besides the tensor itself."""

    arch: str
    n_layer: int  # hparams.n_layer_all = block_count (MTP/nextn blocks included)
    n_expert: int = 0
    n_head: int = 0  # layer 0, as hparams.n_head() reads it
    n_head_kv: int = 0
    llm_type_70b: bool = False  # model.type == LLM_TYPE_70B

    @property
    def n_gqa(self) -> int:
        """hparams.n_gqa(): n_head / n_head_kv of layer 0, 0 without KV heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass(frozen=True, slots=True)
class Counters:
    """quantize_state_impl's running counters; llama-quantize bumps them as it visits tensors in order."""

    n_attention_wv: int = 0  # attn_v-like tensors in the model (init_quantize_state_counters)
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def presets() -> dict[str, Preset]:
    """Every llama-quantize preset by upper-case name, aliases (Q4_K -> Q4_K_M) included."""
    out = {}
    for row in load_csv("quant_presets.csv"):
        name = row["alias_of"] or row["preset"]
        out[row["preset"].upper()] = Preset(name, int(LlamaFileType[row["file_type"]]), row["default_type"])
    return out


def preset_types(preset: str) -> Preset:
    """The preset's canonical name, llama_ftype and starting tensor type; ConfigError if unknown."""
    table = presets()
    p = table.get(preset.upper())
    if p is None:
        raise ConfigError(f"unknown quantization preset {preset!r}",
                          hint="use one of llama-quantize's presets: "
                               + ", ".join(n.lower() for n in table))
    return p


def category(name: str) -> str:
    """tensor_get_category (llama-quant.cpp)."""
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for sub, cat in _CATEGORY_BY_SUBSTRING:
        if sub in name:
            return cat
    return OTHER


def is_attn_v_like(cat: str) -> bool:
    """category_is_attn_v: attn_v, fused attn_qkv and legacy MLA attn_kv_b share the attn_v rules."""
    return cat in (ATTENTION_V, ATTENTION_QKV, ATTENTION_KV_B)


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count, and every tensor has at least 1."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization: 2-D/3-D tensors named *weight, minus norms, routers and a deny list."""
    if n_dims(shape) < 2:
        return False
    if not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The lambda in llama_tensor_get_type_impl: the first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@functools.lru_cache(maxsize=None)
def _block_size(type_name: str) -> int:
    for name, block, _ in type_sizes().values():
        if name == type_name:
            return block
    raise ConfigError(f"unknown ggml type {type_name!r}")


# tensor_type_fallback: the type to demote to when ne[0] is not a multiple of the block size.
_FALLBACK = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL",
    "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def fallback(type_name: str, ne0: int) -> str:
    """tensor_type_fallback: a compatible type for rows of ne0 elements (Q4_K -> Q5_0 ... -> F16)."""
    block = _block_size(type_name)
    if ne0 % block == 0:
        return type_name
    out = _FALLBACK.get(type_name)
    if out is None:
        if block > 32:
            raise ConfigError(f"llama-quantize has no fallback from {type_name} for rows of {ne0}",
                              hint="pick another preset")
        out = type_name  # already a 32-block type: the check below turns it into F16
    # "the fallback return type is still not compatible": F16 for rows not a multiple of 32
    return out if ne0 % _block_size(out) == 0 else "F16"


def layer_of(name: str) -> int | None:
    m = _BLK_RE.match(name)
    return int(m.group(1)) if m else None


def visit_order(names: Iterable[str]) -> list[str]:
    """llama_model_loader::weight_name_comparer: by block number (non-block tensors first), then name."""
    def key(n: str):
        layer = layer_of(n)
        return (-1 if layer is None else layer, n)
    return sorted(names, key=key)


def _layer_info(m: QuantModel, counter: int, name: str) -> tuple[int, int]:
    # layer_info lambda: with experts, the layer is parsed from the name ("experts in the FFN of
    # Mixtral-8x7B are not consecutive"); a dense model uses the running counter.
    if max(1, m.n_expert) > 1:
        layer = layer_of(name)
        if layer is None or not 0 <= layer < m.n_layer:
            raise ModelError(f"llama-quantize cannot place tensor {name} in a layer of {m.n_layer}")
        return layer, m.n_layer
    return counter, m.n_layer


def _impl(name: str, shape: Sequence[int], new_type: str, ftype: str, cat: str, m: QuantModel,
          c: Counters, tied: bool, imatrix: bool) -> tuple[str, Counters]:
    """llama_tensor_get_type_impl, branch for branch; returns the type and the bumped counters."""
    arch = m.arch
    if cat == OUTPUT or (tied and cat == TOKEN_EMBD):
        # Shared token_embd/output (tied) is quantized as the output.
        nx = shape[0]
        if ftype == "MXFP4_MOE":
            new_type = "Q8_0"
        elif arch == "falcon" or nx % _block_size(new_type) != 0:
            new_type = "Q8_0"
        elif ftype in _Q5_K_OUTPUT:
            new_type = "Q5_K"
        elif new_type != "Q8_0":
            new_type = "Q6_K"
        return new_type, c
    if ftype == "MXFP4_MOE":
        # "MoE tensors -> MXFP4, other tensors -> Q8_0": any 3-D tensor counts, MLA's attn_k_b too.
        return ("MXFP4" if len(shape) > 2 and shape[2] > 1 else "Q8_0"), c
    if cat == TOKEN_EMBD:
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            new_type = "Q2_K"
        elif ftype in _IQ2S_M or ftype == "IQ3_XXS":
            new_type = "IQ3_S"
        elif ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            new_type = "Q4_K"
        return new_type, c
    if ftype in _IQ_LOW:
        if is_attn_v_like(cat):
            if m.n_gqa >= 4 or m.n_expert >= 4:
                new_type = "Q4_K"
            else:
                new_type = "IQ3_S" if ftype in _IQ2S_M else "Q2_K"
            return new_type, _bump(c, "i_attention_wv")
        if m.n_expert == 8 and cat == ATTENTION_K:
            return "Q4_K", c
        if cat == FFN_DOWN:
            # counter, not layer: with experts this runs over every ffn_down* tensor
            if c.i_ffn_down < m.n_layer // 8:
                new_type = "IQ3_S" if ftype in _IQ2S_M else "Q2_K"
            return new_type, _bump(c, "i_ffn_down")
        if cat == ATTENTION_OUTPUT:
            if m.n_expert == 8:
                new_type = "Q5_K"
            elif ftype in _IQ1:
                new_type = "IQ2_XXS"
            elif ftype in _IQ2S_M:
                new_type = "IQ3_S"
        return new_type, c
    if is_attn_v_like(cat):
        gqa4 = m.n_gqa >= 4
        if ftype == "Q2_K":
            new_type = "Q4_K" if gqa4 else "Q3_K"
        elif ftype == "Q2_K_S" and gqa4:
            new_type = "Q4_K"
        elif ftype == "IQ3_XXS":
            new_type = "Q4_K" if gqa4 else ("IQ3_S" if not imatrix else "IQ3_XXS")
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa4:
            new_type = "Q4_K"
        elif ftype == "IQ3_M":
            new_type = "Q4_K"
        elif ftype == "Q3_K_M":
            new_type = "Q5_K" if c.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa4:
            new_type = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(c.i_attention_wv, c.n_attention_wv):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and c.i_attention_wv < 4:
            new_type = "Q5_K"
        if m.llm_type_70b and new_type in ("Q3_K", "Q4_K"):
            # "In the 70B model we have 8 heads sharing the same attn_v weights ... more bits"
            new_type = "Q5_K"
        if m.n_expert == 8:
            new_type = "Q8_0"  # "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
        return new_type, _bump(c, "i_attention_wv")
    if cat == ATTENTION_K:
        if m.n_expert == 8:
            new_type = "Q8_0"
        elif ftype == "IQ3_XS":
            new_type = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            new_type = "IQ2_S"
        return new_type, c
    if cat == ATTENTION_Q:
        if ftype == "IQ3_XS":
            new_type = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            new_type = "IQ2_S"
        return new_type, c
    if cat == FFN_DOWN:
        i_layer, n_layer = _layer_info(m, c.i_ffn_down, name)
        if ftype == "Q2_K":
            new_type = "Q3_K"
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new_type = "Q4_K"
        elif ftype == "IQ3_XXS" and not imatrix:
            new_type = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = ("Q5_K" if i_layer < n_layer // 16
                        else "Q4_K" if arch != "falcon" or use_more_bits(i_layer, n_layer) else "Q3_K")
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8
                                   or (m.n_expert == 8 and use_more_bits(i_layer, n_layer))):
            new_type = "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q4_K" if arch == "falcon" else "Q5_K"
        elif ftype == "Q4_K_M":
            if arch == "falcon":
                new_type = ("Q6_K" if i_layer < n_layer // 16
                            else "Q5_K" if use_more_bits(i_layer, n_layer) else "Q4_K")
            elif use_more_bits(i_layer, n_layer):
                new_type = "Q6_K"
        elif i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not imatrix:
            new_type = "Q5_K"
        elif ftype == "Q5_K_M" and use_more_bits(i_layer, n_layer):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and arch != "falcon" and i_layer < n_layer // 8:
            new_type = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and imatrix and i_layer < n_layer // 8:
            # "Guard against craziness in the first few ffn_down layers" (imatrix only)
            new_type = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return new_type, _bump(c, "i_ffn_down")
    if cat == ATTENTION_OUTPUT:
        if arch != "falcon":
            if m.n_expert == 8:
                if ftype in _ATTN_OUT_8_EXPERT_Q5_K:
                    new_type = "Q5_K"
            else:
                new_type = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K",
                            "IQ3_M": "Q4_K"}.get(ftype, new_type)
        elif ftype == "Q3_K_L":
            new_type = "Q4_K"
        return new_type, c
    if cat == ATTENTION_QKV:
        if ftype in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
            new_type = "Q4_K"
        elif ftype == "Q4_K_M":
            new_type = "Q5_K"
        elif ftype == "Q5_K_M":
            new_type = "Q6_K"
        return new_type, c
    if cat in (FFN_GATE, FFN_UP):
        field = "i_ffn_gate" if cat == FFN_GATE else "i_ffn_up"
        i_layer, n_layer = _layer_info(m, getattr(c, field), name)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "IQ3_XXS"
        return new_type, _bump(c, field)
    return new_type, c


def _bump(c: Counters, field: str) -> Counters:
    return Counters(**{f: getattr(c, f) + (f == field) for f in Counters.__slots__})


def _step(name: str, shape: Sequence[int], src_type: str, p: Preset, m: QuantModel, c: Counters,
          tied: bool, imatrix: bool) -> tuple[str, Counters]:
    """llama_tensor_get_type: the tensor's new type and the counters after it."""
    if not allows_quantization(name, shape):
        return src_type, c
    new_type = p.default_type
    if new_type in _FLOAT_TYPES:  # ggml_is_quantized(default_type) is false: no rules, no fallback
        return new_type, c
    new_type, c = _impl(name, shape, new_type, p.name, category(name), m, c, tied, imatrix)
    return fallback(new_type, shape[0]), c


def tensor_type(name: str, shape: Sequence[int], preset: str, model: QuantModel,
                counters: Counters = Counters(), *, src_type: str = "F16", tied: bool = False,
                imatrix: bool = False) -> str:
    """The ggml type llama-quantize gives one tensor (shape in ne order), given the counters so far.

    `tied` is true when the model has no output.weight (token_embd then follows the output rules).
    For a whole model use tensor_types(), which visits tensors in llama-quantize's order.
    """
    return _step(name, shape, src_type, preset_types(preset), model, counters, tied, imatrix)[0]


def tensor_types(tensors: Iterable[tuple[str, Sequence[int], str]], preset: str, model: QuantModel,
                 *, imatrix: bool = False) -> dict[str, str]:
    """name -> new type for (name, shape, source type) tensors, as one llama-quantize run assigns them."""
    p = preset_types(preset)
    items = {name: (tuple(shape), src) for name, shape, src in tensors}
    names = visit_order(items)
    # init_quantize_state_counters: attn_v-like tensors are counted by name over the whole model,
    # and a model without output.weight has tied embeddings.
    c = Counters(n_attention_wv=sum(is_attn_v_like(category(n)) for n in names))
    tied = "output.weight" not in items
    out = {}
    for name in names:
        shape, src = items[name]
        out[name], c = _step(name, shape, src, p, model, c, tied, imatrix)
    return out


def _is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int) -> bool:
    # load_arch_hparams of src/models/{llama,qwen2,deci,olmo,jais2}.cpp: the model types that are 70B.
    if arch == "llama":
        return n_expert != 8 and n_layer == 80 and n_head != n_head_kv
    if arch in ("qwen2", "deci", "olmo"):
        return n_layer == 80
    if arch == "jais2":
        return n_layer == 68
    return False


def _layer0(value) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else 0
    return int(value or 0)


def quant_model(meta: dict) -> QuantModel:
    """The QuantModel of a GGUF metadata dict (as read_raw returns it or the catalog builds it)."""
    arch = meta["general.architecture"]
    n_layer = int(meta.get(f"{arch}.block_count", 0))
    n_head = _layer0(meta.get(f"{arch}.attention.head_count", 0))
    # llama_model::load_hparams: head_count_kv defaults to head_count
    n_head_kv = _layer0(meta.get(f"{arch}.attention.head_count_kv", n_head))
    n_expert = int(meta.get(f"{arch}.expert_count", 0) or 0)
    return QuantModel(arch, n_layer, n_expert, n_head, n_head_kv,
                      _is_70b(arch, n_layer, n_head, n_head_kv, n_expert))
