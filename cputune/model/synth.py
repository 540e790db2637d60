"""Small, correctly shaped GGUF models with random weights, so llama.cpp can be run and calibrated without downloads."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGML_QUANT_VERSION,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    TokenType,
)

from cputune.core import fsutil
from cputune.model import architectures
from cputune.core.errors import ConfigError, ProcessFailed, process_failed

# SPM vocabularies start <unk>, <s>, </s> (llama-vocab.cpp defaults unk=0, bos=1, eos=2), then the
# 256 byte-fallback pieces "<0x00>".."<0xFF>" that byte_to_token() looks up.
N_SPECIAL_TOKENS = 3
MIN_VOCAB = N_SPECIAL_TOKENS + 256

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


class Shape:
    """A model's hyperparameters under its architecture's table (configs/architectures/ARCH.toml):
    checked when made, defaults filled in, read as attributes (shape.n_embd)."""

    __slots__ = ("arch", "_hp")

    def __init__(self, arch: str, **hparams):
        table = architectures.architecture(arch)
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "_hp", tuple(table.hparams(hparams, f"{arch} shape").items()))

    def __getattr__(self, name: str):
        for k, v in object.__getattribute__(self, "_hp"):
            if k == name:
                return v
        raise AttributeError(f"{self.arch} shape has no {name!r}")

    def __setattr__(self, name, value):
        raise AttributeError("a Shape is immutable: use .replace()")

    def __eq__(self, other) -> bool:
        return isinstance(other, Shape) and (self.arch, self._hp) == (other.arch, other._hp)

    def __hash__(self) -> int:
        return hash((self.arch, self._hp))

    def __repr__(self) -> str:
        given = ", ".join(f"{k}={v!r}" for k, v in self._hp)
        return f"Shape({self.arch!r}, {given})"

    def __reduce__(self):
        return (_shape_from, (self.arch, self._hp))

    @property
    def hparams(self) -> dict:
        return dict(self._hp)

    def replace(self, **changes) -> "Shape":
        """This shape with some hyperparameters changed (derived defaults are recomputed)."""
        table = architectures.architecture(self.arch)
        given = {k: v for k, v in self._hp if k in table.required or k in changes
                 or not isinstance(table.defaults.get(k), architectures.Expr)}
        return Shape(self.arch, **{**given, **changes})

    def tensors(self) -> tuple[architectures.Tensor, ...]:
        return architectures.architecture(self.arch).tensors(self.hparams)

    def metadata(self) -> dict:
        return architectures.architecture(self.arch).metadata(self.hparams)


def _shape_from(arch: str, hp: tuple) -> Shape:
    return Shape(arch, **dict(hp))


def ik_loadable(shape: Shape) -> bool:
    """Whether ik_llama.cpp's loader takes this shape: any but deepseek2, which needs DeepSeek's own
    latent (see MLA_KV_LORA_RANK)."""
    if shape.arch != "deepseek2":
        return True
    return (shape.kv_lora_rank, shape.qk_rope_dim) == (MLA_KV_LORA_RANK, MLA_ROPE_DIM) \
        and shape.n_head % MLA_HEAD_MULTIPLE == 0


def tensor_specs(shape: Shape) -> tuple[architectures.Tensor, ...]:
    """Every tensor of the shape, from its architecture's table."""
    return shape.tensors()


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


def _tensor_bytes(spec: architectures.Tensor, qtype: GGMLQuantizationType) -> int:
    if spec.is_float32:
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
    return data + _header_bytes(shape, specs)


def _header_bytes(shape: Shape, specs) -> int:
    """The header synth writes: each tensor info, the vocabulary, and 4 KiB for the other keys."""
    infos = sum(8 + len(t.name) + 4 + 8 * len(t.ne) + 4 + 8 for t in specs)
    return infos + _vocab_bytes(shape.n_vocab) + 4096


@functools.lru_cache(maxsize=None)
def _vocab_bytes(n_vocab: int) -> int:
    return sum(8 + len(tok.encode()) + 4 + 4 for tok in _vocab(n_vocab)[0])


def _vocab_at_width(n_embd: int) -> int:
    # 32768 from 4096 wide up (Llama 2: 32000 at 4096), 512 at the 256 width tests use.
    return min(32768, max(512, n_embd * n_embd // 512))


@functools.lru_cache(maxsize=None)
def _synth_rules(arch: str) -> tuple[dict, tuple[int, ...], int, tuple[int, ...]]:
    """An architecture's [synth] table: hyperparameters as expressions of the width `w`, `layers`,
    `experts` and `vocab`; the expert counts to try; the fewest layers; layer counts to avoid."""
    table = architectures.architecture(arch)
    where = f"configs/architectures/{arch}.toml [synth]"
    rules = table.synth.get("shape")
    if not rules:
        note = f": {table.synth_note}" if table.synth_note else ""
        raise ConfigError(f"no synthetic generator for architecture {arch!r}{note}",
                          hint="synthetic models: " + ", ".join(synth_archs()))
    exprs = {k: architectures.Expr(v, f"{where}.shape.{k}") if isinstance(v, str) else v
             for k, v in rules.items()}
    experts = tuple(int(e) for e in table.synth.get("experts", (0,)))
    return exprs, experts, int(table.synth.get("min_layer", 1)), tuple(table.synth.get("avoid_layers", ()))


def synth_archs() -> tuple[str, ...]:
    """The architectures synth can write (a [synth.shape] table in their file)."""
    return tuple(a for a, t in sorted(architectures.load_architectures().items()) if t.synth.get("shape"))


def shape_at(arch: str, w: int, layers: int, experts: int, vocab: int) -> Shape:
    """The architecture's synthetic shape at width w, depth `layers`, `experts` and `vocab`."""
    exprs = _synth_rules(arch)[0]
    env = {"w": w, "layers": layers, "experts": experts, "vocab": vocab}
    return Shape(arch, **{k: e(env) if isinstance(e, architectures.Expr) else e for k, e in exprs.items()})


# What shape_for_size makes; a cached file made by an older version is not reused (resolve's twins).
# 2: deepseek2 with DeepSeek's own MLA latent at every width (issue 16).
# 3: shapes from configs/architectures (same shapes for llama and deepseek2; the writer's keys
#    follow the tables).
# 4: make_quantized sizes a quantized model by llama-quantize's rules, not the preset's main type.
SHAPES_VERSION = 4
_WIDTHS = (256, 512, 768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
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
    _, expert_counts, min_layer, avoid = _synth_rules(arch)

    def build(w: int, layers: int, experts: int, vocab: int) -> Shape:
        return shape_at(arch, w, layers, experts, vocab)

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
                if n_layer in avoid:  # deepseek2: 26/27 blocks read as a "lite" model
                    n_layer = min((n for n in range(n_layer - len(avoid) - 1, n_layer + len(avoid) + 2)
                                   if n not in avoid and n >= min_layer), key=lambda n: abs(n - depth))
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


def _tensor_data(spec: architectures.Tensor, np_dtype: type, seed: int, index: int) -> _RandomTensor:
    # One generator per tensor, so its bytes depend only on (seed, index), not on sharding.
    rng = np.random.default_rng([seed, index])
    # 1/sqrt(fan_in) keeps each matmul output at unit RMS after the RMS norm before it.
    rms = 1.0 / math.sqrt(spec.ne[0])
    t = np.float32 if spec.is_float32 else np_dtype
    if spec.fill == "ones":
        return _RandomTensor(spec.n_elements, t, lambda n: np.ones(n, t))
    if spec.fill == "zeros":
        return _RandomTensor(spec.n_elements, t, lambda n: np.zeros(n, t))
    return _RandomTensor(spec.n_elements, t, lambda n: _random_f16(rng, n, rms))


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


_VALUE_TYPES = {"u32": GGUFValueType.UINT32, "i32": GGUFValueType.INT32, "f32": GGUFValueType.FLOAT32,
                "bool": GGUFValueType.BOOL, "str": GGUFValueType.STRING}


def _value_type(value, declared: str | None) -> GGUFValueType:
    if declared:
        return _VALUE_TYPES[declared]
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def _add_arch_keys(w: GGUFWriter, shape: Shape) -> None:
    """The `{arch}.*` keys of the architecture's table, typed as the converter writes them."""
    declared = architectures.architecture(shape.arch).key_types()
    for key, value in shape.metadata().items():
        if isinstance(value, list):
            vt = _value_type(value[0], declared.get(key))
            if vt in (GGUFValueType.UINT32, GGUFValueType.INT32):
                vt = GGUFValueType.INT32  # get_key_or_arr reads int arrays (gguf-py writes INT32)
            w.add_key_value(key, [float(v) if vt == GGUFValueType.FLOAT32 else v for v in value],
                            GGUFValueType.ARRAY, sub_type=vt)
        else:
            vt = _value_type(value, declared.get(key))
            w.add_key_value(key, float(value) if vt == GGUFValueType.FLOAT32 else value, vt)


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
        _add_arch_keys(w, shape)
        _add_tokenizer(w, shape.n_vocab)

        qtype = GGMLQuantizationType.F16 if dtype == "f16" else GGMLQuantizationType.F32
        sizes = [_tensor_bytes(t, qtype) for t in specs]
        starts = _shard_starts(sizes, n_shards) if n_shards > 1 else set()
        for i, (spec, nbytes) in enumerate(zip(specs, sizes)):
            # add_tensor_info opens a new shard when the current one holds split_max_tensors tensors;
            # setting it per tensor puts the cuts exactly where _shard_starts chose.
            w.split_max_tensors = len(w.tensors[-1]) if i in starts else 0
            t_dtype = np.float32 if spec.is_float32 else np_dtype
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


def write_model(path: Path | str, shape: Shape, seed: int = 0, dtype: str = "f16", n_shards: int = 1,
                make_parents: bool | None = None) -> list[Path]:
    """Write a model of `shape`; returns the files written, the first being what llama.cpp opens.

    With n_shards > 1 the files are NAME-0000k-of-0000n.gguf beside `path`, as llama-gguf-split names them.
    `make_parents`: create a missing folder (None: only inside cputune's cache; fsutil.check_target).
    """
    if not isinstance(shape, Shape):
        raise TypeError(f"expected a synth.Shape, got {type(shape).__name__}")
    return _write(Path(path), shape, seed, dtype, n_shards, make_parents)


# ---------------------------------------------------------------------------------------------
# Quantizing with the real tool


def quantize(src: Path | str, dst: Path | str, qtype: str, llama_quantize: Path | str,
             threads: int | None = None, make_parents: bool | None = None,
             options: Sequence[str] = ()) -> Path:
    """Run `llama-quantize [OPTIONS] SRC DST TYPE [THREADS]`, writing DST atomically; qtype is a
    preset name such as Q4_K_M (or, with `--pure`, one ggml type for every tensor).

    llama-quantize writes a locked temporary file beside DST (fsutil.scratch_file), removed if it
    fails or cputune is interrupted; it dies with cputune (PR_SET_PDEATHSIG), so a killed
    calibrate leaves no quantize running, and its half-written file goes at the next write there.
    """
    from cputune.core.launch import die_with_parent

    src, dst = Path(src), Path(dst)
    with fsutil.scratch_file(dst, make_parents) as tmp:
        argv = [str(llama_quantize), *options, str(src), str(tmp), qtype]
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


def quantized_bytes(shape: Shape, preset: str) -> int:
    """The file size llama-quantize `preset` makes of this shape's f16 file: every tensor at the
    type quant_rules (its rules, transliterated) gives it, plus the header."""
    from cputune.model.gguf_model import tensor_bytes, type_id
    from cputune.model.quant_rules import quant_model, tensor_types

    specs = shape.tensors()
    meta = {"general.architecture": shape.arch, **shape.metadata()}
    layout = [(t.name, t.ne, "F32" if t.is_float32 else "F16") for t in specs]
    types = tensor_types(layout, preset, quant_model(meta))
    data = sum(GGUFWriter.ggml_pad(tensor_bytes(t.ne, type_id(types[t.name])) or 0, 32) for t in specs)
    return data + _header_bytes(shape, specs)


def quantized_shape(arch: str, size_bytes: int, preset: str) -> Shape:
    """The f16 shape that llama-quantize `preset` turns into about `size_bytes`. The preset's
    main type is a first guess: rows it cannot hold fall back to wider types (gpt-oss's 2880-wide
    rows: Q4_K -> Q5_0) and some tensors keep more bits, so the f16 target is rescaled by the size
    the quantizer's rules give the shape, twice at most."""
    from cputune.model.gguf_model import bits_per_weight
    from cputune.model.quant_rules import preset_types

    p = preset_types(preset)
    target = int(size_bytes * 16 / bits_per_weight().get(p.default_type, 8.0))
    shape = shape_for_size(arch, target, "f16")
    for _ in range(2):
        got = quantized_bytes(shape, p.name)
        if abs(got - size_bytes) <= 0.05 * size_bytes:
            break
        target = int(target * size_bytes / got)
        shape = shape_for_size(arch, target, "f16")
    return shape


def make_quantized(out: Path | str, arch: str, size_bytes: int, quant: str,
                   llama_quantize: Path | str, seed: int = 0, make_parents: bool | None = None) -> Path:
    """A model of `arch` about `size_bytes` on disk after quantizing to `quant` (a llama-quantize
    preset): the f16 shape quantized_shape picks is written next to `out`, quantized, and
    removed. F16/BF16 are written directly.

    `make_parents`: create OUT's missing folder (None: only inside cputune's cache, as the twins
    are; `synth --out` names a folder that must exist)."""
    from cputune.model.quant_rules import preset_types

    out = Path(out)
    preset = preset_types(quant)
    if preset.name in ("F16", "BF16", "F32"):
        return write_model(out, shape_for_size(arch, size_bytes, preset.name.lower()), seed,
                           preset.name.lower(), make_parents=make_parents)[0]
    return quantize_shape(out, quantized_shape(arch, size_bytes, preset.name), preset.name, llama_quantize,
                          seed, make_parents)


def quantize_shape(out: Path | str, shape: Shape, quant: str, llama_quantize: Path | str, seed: int = 0,
                   make_parents: bool | None = None) -> Path:
    """`shape` written in f16 beside `out`, quantized to `quant` (a llama-quantize preset name)
    into `out`, and the f16 file removed, also when quantizing fails."""
    out = Path(out)
    fsutil.check_target(out, make_parents)  # before minutes of writing, not after
    with fsutil.scratch_dir(out.parent, out.name, make_parents=False) as tmp:
        base = write_model(tmp / "f16.gguf", shape, seed, make_parents=False)[0]
        return quantize(base, out, quant, llama_quantize, make_parents=False)
