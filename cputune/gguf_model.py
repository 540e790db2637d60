"""What a GGUF model costs to run, read from its header alone (never the weights).

gguf-py's GGUFReader walks every token string in Python (~9 s for a DeepSeek vocabulary), so
this reader walks the header itself and skips array bodies; split files (`-00001-of-0000N`)
are read as one model. The result is a ModelProfile: per-tensor types and bytes, total and
active parameters, bytes read per decoded token (MoE-aware) and KV-cache bytes per token.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from cputune.data import load_csv
from cputune.errors import GGUFError

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf-py constants.GGUFValueType; docs/gguf.md in ggml).
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_KEPT = 4096  # longer arrays (vocabularies, merges) are skipped, their length kept
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
EXPERT_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
LEGACY_EXPERT_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
BLK_RE = re.compile(r"^blk\.(\d+)\.")


@functools.lru_cache(maxsize=None)
def type_sizes() -> dict[int, tuple[str, int, int]]:
    """type id -> (name, elements per block, bytes per block): gguf's table plus newer types."""
    out = {int(t): (GGMLQuantizationType(t).name, b, s) for t, (b, s) in GGML_QUANT_SIZES.items()}
    for row in load_csv("ggml_types_extra.csv"):
        out.setdefault(int(row["id"]), (row["type"], int(row["block_elems"]), int(row["bytes_per_block"])))
    return out


@functools.lru_cache(maxsize=None)
def bits_per_weight() -> dict[str, float]:
    """type name -> bits per weight (bytes per block x 8 / elements per block)."""
    return {name: size * 8 / block for name, block, size in type_sizes().values()}


def type_id(name: str) -> int:
    for tid, (n, _, _) in type_sizes().items():
        if n.lower() == name.lower():
            return tid
    raise GGUFError(f"unknown ggml type {name!r}",
                    hint="use a ggml type name such as f16, q8_0, q4_0, q4_K")


def tensor_bytes(shape: tuple[int, ...], tid: int) -> int | None:
    """(ne[0] / block) * bytes_per_block * ne[1] * ...; None for an unknown type id."""
    t = type_sizes().get(tid)
    if t is None:
        return None
    _, block, size = t
    return shape[0] // block * size * math.prod(shape[1:])


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    type_name: str
    type_id: int
    shape: tuple[int, ...]  # ggml ne order
    n_params: int
    n_bytes: int | None  # None when the type id is unknown to this cputune


@dataclass(frozen=True, slots=True)
class RawGGUF:
    path: Path
    version: int
    metadata: dict  # key -> value; long arrays become ("<array>", type, length)
    tensors: tuple[TensorInfo, ...]
    file_bytes: int


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.b, self.o, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.o + n > len(self.b):
            raise GGUFError(f"{self.path} is truncated (header ends at byte {len(self.b)})",
                            hint="the download may be incomplete: compare its size and checksum")
        v = self.b[self.o:self.o + n]
        self.o += n
        return v

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ARRAY_KEPT:
                self.skip_array(etype, count)
                return ("<array>", etype, count)
            return [self.value(etype) for _ in range(count)]
        raise GGUFError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.o}",
                        hint="the file is corrupt or from a newer GGUF version")

    def skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALAR:
            self.take(struct.calcsize(_SCALAR[etype]) * count)
        elif etype == _STRING:
            b, o = self.b, self.o
            unpack_from = struct.unpack_from
            for _ in range(count):  # one length read per string, no decoding
                if o + 8 > len(b):
                    self.o = o
                    self.take(8)
                o += 8 + unpack_from("<Q", b, o)[0]
            self.o = o
            if o > len(b):
                self.take(1)
        else:
            for _ in range(count):
                self.value(etype)


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """Read enough of the file to hold the header, growing the window as needed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        return f.read(min(size, 64 << 20)), size


def read_raw(path: Path | str) -> RawGGUF:
    path = Path(path)
    try:
        data, size = _read_header_bytes(path)
    except FileNotFoundError:
        raise GGUFError(f"{path} does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise GGUFError(f"{path} is a directory, not a GGUF file") from None
    if data[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {data[:4]!r}, not b'GGUF')",
                        hint="cputune reads llama.cpp's GGUF models; convert others with "
                             "llama.cpp's convert_hf_to_gguf.py")
    for window in (len(data), min(size, 1 << 30), size):
        if window > len(data):
            with path.open("rb") as f:
                data = f.read(window)
        try:
            return _parse(data, path, size)
        except GGUFError:
            if window >= size:
                raise
    raise AssertionError("unreachable")


def _parse(data: bytes, path: Path, size: int) -> RawGGUF:
    r = _Reader(data, path)
    r.take(4)
    version = r.unpack("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
    if n_tensors > 1 << 24 or n_kv > 1 << 20:
        raise GGUFError(f"{path}: implausible header ({n_tensors} tensors, {n_kv} keys): corrupt file")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.unpack("<I"))
    tensors = []
    sizes = type_sizes()
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("<I")
        shape = tuple(r.unpack("<Q") for _ in range(n_dims))
        tid = r.unpack("<I")
        r.unpack("<Q")  # offset into the data section
        tname = sizes[tid][0] if tid in sizes else f"unknown({tid})"
        tensors.append(TensorInfo(name, tname, tid, shape, math.prod(shape), tensor_bytes(shape, tid)))
    return RawGGUF(path, version, meta, tuple(tensors), size)


def shard_paths(path: Path | str) -> list[Path]:
    """All shards of a split model given any one of them; [path] for a single file."""
    path = Path(path)
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GGUFError(f"split model {path.name} is missing {len(missing)} of {count} shards "
                        f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''})",
                        hint="download every shard into the same folder")
    return paths


def read_model_files(path: Path | str) -> tuple[RawGGUF, int]:
    """One model from any shard: metadata of the first, tensors of all; and the shard count."""
    paths = shard_paths(path)
    raws = [read_raw(p) for p in paths]
    first = raws[0]
    tensors = tuple(t for r in raws for t in r.tensors)
    return RawGGUF(first.path, first.version, first.metadata, tensors,
                   sum(r.file_bytes for r in raws)), len(paths)


# --------------------------------------------------------------------------------------------
# what a model costs per token


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """A model's per-token costs. Bytes and parameters are for one decoded token at batch 1.

    `active_bytes_per_token`: expert tensors at used/total, router, shared experts, attention and
    the output always, token_embd as one row (a lookup), a tied output read whole, MTP/nextn
    layers skipped. `flops_per_token` = 2 x the active matrix parameters (no attention-score
    term: that grows with depth, see attn_flops_per_ctx_token).
    """

    path: str | None
    name: str | None
    arch: str
    file_type: str | None
    n_shards: int
    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_ctx_train: int | None
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_dense_lead: int
    mla: bool
    file_bytes: int
    weight_bytes: int
    expert_bytes: int
    total_params: int
    active_params: int  # without the embedding lookup
    active_bytes_per_token: int
    flops_per_token: int
    kv_k_elems_per_token: int  # summed over layers
    kv_v_elems_per_token: int
    attn_flops_per_ctx_token: int  # extra FLOPs per decoded token per token already in context
    bytes_by_type: dict[str, int]
    unknown_types: tuple[str, ...]
    active_bytes_by_type: dict[str, int] = field(default_factory=dict)
    # The routed experts' part of active_bytes_by_type: llama.cpp runs them through
    # mul_mat_id, whose speed per type differs from the dense mul_mat's.
    expert_active_bytes_by_type: dict[str, int] = field(default_factory=dict)
    # The logits matrix (output.weight, or a tied token_embd): prompt processing multiplies it
    # for the batch's last token only, so prefill must not count it per token.
    output_bytes: int = 0
    output_type: str | None = None
    output_params: int = 0
    # Matrices a mul_mat reads (>= 2-D, not the embedding lookup): what the CPU repack copies.
    matmul_bytes_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def active_fraction(self) -> float:
        return self.active_bytes_per_token / self.weight_bytes if self.weight_bytes else 0.0


def cache_type_bytes(cache_type: str) -> float:
    """Bytes per element of a KV-cache type (f16 2, q8_0 34/32, q4_0 18/32 ...)."""
    tid = type_id(cache_type)
    _, block, size = type_sizes()[tid]
    return size / block


def kv_bytes_per_token(model: ModelProfile, cache_type: str = "f16",
                       cache_type_v: str | None = None) -> float:
    """Σ_layers (K elems x size(type_k) + V elems x size(type_v)); src/llama-kv-cache.cpp."""
    return (model.kv_k_elems_per_token * cache_type_bytes(cache_type)
            + model.kv_v_elems_per_token * cache_type_bytes(cache_type_v or cache_type))


def _per_layer(value, n_layer: int) -> list[int]:
    """A hyperparameter that GGUF stores as a scalar or a per-layer array."""
    if isinstance(value, list):
        vals = [int(v) for v in value]
        return (vals + [vals[-1]] * n_layer)[:n_layer] if vals else [0] * n_layer
    return [int(value or 0)] * n_layer


def profile_from(meta: dict, tensors: tuple[TensorInfo, ...] | list[TensorInfo], *, file_bytes: int,
                 path: str | None = None, n_shards: int = 1) -> ModelProfile:
    """The per-token arithmetic on a header (a real file's, or one the catalog builds)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path or 'model'}: no general.architecture key",
                        hint="the file is not a llama.cpp model")

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    n_layer = int(key("block_count", 0))
    n_embd = int(key("embedding_length", 0))
    heads = _per_layer(key("attention.head_count", 0), n_layer)
    heads_kv = _per_layer(key("attention.head_count_kv", key("attention.head_count", 0)), n_layer)
    n_head = max(heads, default=0)
    head_dim = n_embd // n_head if n_head else 0
    k_len = int(key("attention.key_length", head_dim))
    v_len = int(key("attention.value_length", head_dim))
    mla = key("attention.key_length_mla") is not None
    n_expert = int(key("expert_count", 0) or 0)
    used = _per_layer(key("expert_used_count", 0), n_layer)
    nextn = int(key("nextn_predict_layers", 0) or 0)
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_vocab = int(key("vocab_size", 0) or (embd.shape[1] if embd and len(embd.shape) > 1 else 0))
    tied = not any(t.name == "output.weight" for t in tensors)

    weight_bytes = expert_bytes = total = active = 0
    active_bytes = 0.0
    flops_params = 0.0
    by_type: dict[str, int] = {}
    matmul_by_type: dict[str, int] = {}
    active_by_type: dict[str, float] = {}
    expert_active_by_type: dict[str, float] = {}
    output_bytes = output_params = 0
    output_type = None
    unknown = set()
    for t in tensors:
        nbytes = t.n_bytes or 0
        if t.n_bytes is None:
            unknown.add(t.type_name)
        weight_bytes += nbytes
        total += t.n_params
        by_type[t.type_name] = by_type.get(t.type_name, 0) + nbytes
        if len(t.shape) >= 2 and t.name != "token_embd.weight":
            matmul_by_type[t.type_name] = matmul_by_type.get(t.type_name, 0) + nbytes
        m = BLK_RE.match(t.name)
        layer = int(m.group(1)) if m else None
        if layer is not None and nextn and layer >= n_layer:
            continue  # MTP/nextn block: only read when speculative MTP decoding is on
        share = 1.0
        if EXPERT_RE.match(t.name) or LEGACY_EXPERT_RE.match(t.name):
            expert_bytes += nbytes
            if n_expert:
                share = used[layer if layer is not None and layer < n_layer else 0] / n_expert
            expert_active_by_type[t.type_name] = expert_active_by_type.get(t.type_name, 0) + nbytes * share
        if t.name == "token_embd.weight":
            rows = t.shape[1] if len(t.shape) > 1 else 1
            active_bytes += nbytes / rows  # one row per token
            # A row lookup is a copy, not a dot product: no compute cost by type.
            if tied:  # output = token_embd^T, read whole for the logits
                output_bytes, output_type, output_params = nbytes, t.type_name, t.n_params
                active_bytes += nbytes
                active_by_type[t.type_name] = active_by_type.get(t.type_name, 0) + nbytes
                active += t.n_params
                flops_params += t.n_params
            continue
        if t.name == "output.weight":
            output_bytes, output_type, output_params = nbytes, t.type_name, t.n_params
        active_bytes += nbytes * share
        active_by_type[t.type_name] = active_by_type.get(t.type_name, 0) + nbytes * share
        active += round(t.n_params * share)
        if len(t.shape) >= 2:
            flops_params += t.n_params * share

    if mla:
        # MLA as llama.cpp runs it: K is the compressed latent (kv_lora + rope) with one KV head and
        # no V (the V-less cache, PR #19067); scores and the value mix work on the latent per head.
        k_elems = [k_len * hk for hk in heads_kv]
        v_elems = [0] * n_layer
        v_lat = int(key("attention.value_length", 0))
        attn = sum(2 * h * (k_len + v_lat) for h in heads)
    else:
        k_elems = [k_len * hk for hk in heads_kv]
        v_elems = [v_len * hk for hk in heads_kv]
        attn = sum(2 * h * (k_len + v_len) for h in heads)
    ftype = meta.get("general.file_type")
    return ModelProfile(
        path=path, name=meta.get("general.name"), arch=arch,
        file_type=_file_type_name(ftype), n_shards=n_shards, n_layer=n_layer, n_embd=n_embd,
        n_vocab=n_vocab, n_head=n_head, n_ctx_train=key("context_length"), n_expert=n_expert,
        n_expert_used=max(used, default=0), n_expert_shared=int(key("expert_shared_count", 0) or 0),
        n_dense_lead=int(key("leading_dense_block_count", 0) or 0), mla=mla,
        file_bytes=file_bytes, weight_bytes=weight_bytes, expert_bytes=expert_bytes,
        total_params=total, active_params=active, active_bytes_per_token=round(active_bytes),
        flops_per_token=round(2 * flops_params), kv_k_elems_per_token=sum(k_elems),
        kv_v_elems_per_token=sum(v_elems), attn_flops_per_ctx_token=attn,
        bytes_by_type=dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        unknown_types=tuple(sorted(unknown)),
        active_bytes_by_type={k: round(v) for k, v in sorted(active_by_type.items(), key=lambda kv: -kv[1])},
        expert_active_bytes_by_type={k: round(v) for k, v in expert_active_by_type.items()},
        output_bytes=output_bytes, output_type=output_type, output_params=output_params,
        matmul_bytes_by_type=dict(sorted(matmul_by_type.items(), key=lambda kv: -kv[1])),
    )


def _file_type_name(ftype) -> str | None:
    if ftype is None:
        return None
    try:
        from gguf.constants import LlamaFileType
        return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown({ftype})"


def read_model(path: Path | str) -> ModelProfile:
    """The ModelProfile of a GGUF file (any shard of a split model names the whole model)."""
    raw, n = read_model_files(path)
    return profile_from(raw.metadata, raw.tensors, file_bytes=raw.file_bytes, path=str(raw.path),
                        n_shards=n)
