"""Which quant fits and how fast: RAM arithmetic for llama.cpp on the CPU, pure functions.

ram_needed is shared by `select`, `plan` and `serve`'s refusal, so the number a builder reads
before downloading is the number serve checks before loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from cputune.gguf_model import ModelProfile, kv_bytes_per_token

GIB = 1 << 30
# Types the pinned llama.cpp (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type) copies
# into its CPU_REPACK buffer on x86, and the ISA flag each needs.
X86_REPACK = {"Q4_0": "avx2", "Q4_K": "avx2", "IQ4_NL": "avx2", "MXFP4": "avx2", "Q2_K": "avx512f"}
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
    flags = set(isa)
    return sum(b for t, b in model.matmul_bytes_by_type.items()
               if t in X86_REPACK and X86_REPACK[t] in flags)


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
        kv_bytes=round(kv_bytes_per_token(model, cache_type) * ctx_tokens),
        compute_bytes=compute_buffer_bytes(model, ctx_tokens, n_ubatch, flash_attn),
        headroom_bytes=headroom_bytes, ctx_tokens=ctx_tokens, cache_type=cache_type, mmap=mmap)
