"""What a GGUF model costs to run, read from its header alone (never the weights).

gguf-py's GGUFReader walks every token string in Python (~9 s for a DeepSeek vocabulary), so
this reader walks the header itself and skips array bodies; split files (`-00001-of-0000N`)
are read as one model. A header is untrusted input (issue 13): it is read in chunks, never
whole, and every count, length, offset and hyperparameter it claims is checked against the file
and llama.cpp's own limits before it is used, so a bad file is one GGUFError. The result is a ModelProfile: per-tensor types and bytes, total and
active parameters, bytes read per decoded token (MoE-aware) and KV-cache bytes per token.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from cputune.model import architectures
from cputune.core.data import load_csv
from cputune.core.errors import GGUFError
from cputune.core.fsutil import open_regular

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf-py constants.GGUFValueType; docs/gguf.md in ggml).
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRUCT = {t: struct.Struct("<" + c) for t, c in _SCALAR.items()}
_STRING, _ARRAY = 8, 9
_U32, _U64 = _STRUCT[4], _STRUCT[10]

# What a header may claim, each bound checked before anything is allocated, read or walked.
# The largest real headers are 10-20 MB (DeepSeek's and Gemma 3's vocabularies: tokens, scores,
# types and merges); 16x that is room to spare, and walking it costs a few seconds and one chunk
# of memory whatever the file's size.
MAX_HEADER_BYTES = 256 << 20
CHUNK_BYTES = 1 << 20  # read at a time: the only buffer the walker holds
MAX_KV = 1 << 16  # real models have 30-60 keys
MAX_TENSORS = 1 << 16  # per file; DeepSeek-R1 has 1,025, a 256-expert model in the old per-expert layout ~47k
MAX_KEY_BYTES = 1 << 16
GGML_MAX_NAME = 64  # ggml.h; gguf.cpp refuses a tensor name of 64 bytes or more
GGML_MAX_DIMS = 4  # ggml.h
# Strings in all arrays together: each costs a step of the walk. The biggest vocabularies hold
# ~0.6M (262k tokens; Llama 3's 128k tokens and 280k merges); 8M bounds a crafted header's walk at
# a few seconds.
MAX_STRINGS = 1 << 23
MAX_ARRAY_KEPT = 4096  # longer arrays (vocabularies, merges) are skipped, their length kept
MAX_STRING_KEPT = 1 << 20  # longer strings are skipped, their length kept (chat templates are < 64 KB)
MAX_KEPT_BYTES = 32 << 20  # everything kept together, at ~32 B per Python value plus its text
_KEEP_COST = 32
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8  # name length, 1-byte name, n_dims (0), type, offset
DEFAULT_ALIGNMENT = 32  # gguf.h GGUF_DEFAULT_ALIGNMENT

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
EXPERT_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down|gate_up)_exps\.(weight|bias)$")
LEGACY_EXPERT_RE = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
BLK_RE = re.compile(r"^blk\.(\d+)\.")

CORRUPT_HINT = ("the file is damaged or was not written by llama.cpp's tools: download it again, or "
                "re-convert it with llama.cpp's convert_hf_to_gguf.py")
TRUNCATED_HINT = ("the download is incomplete: download the file again (`wget -c` and "
                  "`huggingface-cli download` resume a partial file)")


@functools.lru_cache(maxsize=None)
def type_sizes() -> dict[int, tuple[str, int, int]]:
    """type id -> (name, elements per block, bytes per block): gguf's table plus newer types."""
    out = {int(t): (GGMLQuantizationType(t).name, b, s) for t, (b, s) in GGML_QUANT_SIZES.items()}
    for row in load_csv("ggml_types_extra.csv"):
        out.setdefault(int(row["id"]), (row["type"], int(row["block_elems"]), int(row["bytes_per_block"])))
    return out


@functools.lru_cache(maxsize=None)
def meta_bytes() -> dict[int, tuple[int, int]]:
    """type id -> (bytes per row, bytes per tensor) a type stores beside its blocks: ik_llama.cpp's
    per-row scales (type_traits row_meta_size: IQ4_KS 4, IQ2_KS 2) and I2_S's 32-byte tail."""
    sizes = {int(t) for t in GGML_QUANT_SIZES}
    return {int(r["id"]): (int(r["row_meta_bytes"]), int(r["tensor_meta_bytes"]))
            for r in load_csv("ggml_types_extra.csv")
            if int(r["id"]) not in sizes and (int(r["row_meta_bytes"]) or int(r["tensor_meta_bytes"]))}


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)
def ik_only_types() -> frozenset[str]:
    """Tensor types only ik_llama.cpp has (configs/ggml_types_extra.csv rows from its source)."""
    return frozenset(r["type"].upper() for r in load_csv("ggml_types_extra.csv")
                     if r["source"].startswith("ik_llama"))


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
    """(row meta + ne[0] / block * bytes_per_block) * ne[1] * ... + tensor meta (ggml.c
    ggml_nbytes); None for an unknown type id."""
    t = type_sizes().get(tid)
    if t is None:
        return None
    _, block, size = t
    row, tail = meta_bytes().get(tid, (0, 0))
    return (row + shape[0] // block * size) * math.prod(shape[1:]) + tail


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


def _size_text(n: int) -> str:
    """Bytes in the decimal units a download page shows: 19.0 MB, 65.5 KB."""
    for unit, k in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def _sizes_text(want: int, have: int) -> tuple[str, str]:
    a, b = _size_text(want), _size_text(have)
    return (a, b) if a != b else (f"{want:,} B", f"{have:,} B")


def _where(path) -> str:
    """Where a file's bytes are, for a truncation message: a Path is on disk; a URL (remote.Url) on
    its server."""
    return "on disk" if isinstance(path, Path) else "on the server"


def _truncated_data(path: Path, need: int, size: int) -> GGUFError:
    want, have = _sizes_text(need, size)
    return GGUFError(f"{path} is truncated: {want} expected, {have} {_where(path)}", hint=TRUNCATED_HINT)


class _Reader:
    """Walks a GGUF header straight from a binary file object (seek and read: a local file, or
    remote.RangeFile over HTTP), one chunk at a time.

    Memory stays at one chunk plus what is kept (scalars, short arrays, short strings) whatever the
    file's size, and every length the header claims is checked against the bytes left before it
    is read or skipped; nothing is read at or past MAX_HEADER_BYTES, and skipped bytes are never
    read at all.
    """

    def __init__(self, f: BinaryIO, size: int, path: Path):
        self.f, self.size, self.path = f, size, path
        self.end = min(size, MAX_HEADER_BYTES)  # nothing past this is ever read
        self.buf, self.base, self.p = b"", 0, 0  # buf holds file bytes [base, base + len(buf))
        self.kept = 0
        self.strings = 0

    def tell(self) -> int:
        return self.base + self.p

    def left(self) -> int:
        return self.size - self.tell()

    def overrun(self, n: int, what: str) -> GGUFError:
        """The error for a field of n bytes that does not fit: a short file, or a corrupt length."""
        pos = self.tell()
        if n > MAX_HEADER_BYTES:  # no real header holds it: the length itself is garbage
            return GGUFError(f"{self.path}: {what} at byte {pos} claims {n:,} bytes: corrupt header",
                             hint=CORRUPT_HINT)
        if pos + n > self.size:
            return GGUFError(f"{self.path} is truncated: its header runs past the end of the file "
                             f"({_size_text(self.size)} {_where(self.path)})", hint=TRUNCATED_HINT)
        return GGUFError(f"{self.path}: {what} at byte {pos} would make the header larger than "
                         f"{MAX_HEADER_BYTES >> 20} MiB: corrupt header", hint=CORRUPT_HINT)

    def need(self, n: int, what: str = "a field") -> None:
        """Make the buffer hold n bytes at the cursor."""
        if self.p + n <= len(self.buf):
            return
        pos = self.tell()
        if pos + n > self.end:
            raise self.overrun(n, what)
        rest = self.buf[self.p:]
        want = min(max(n, CHUNK_BYTES), self.end - pos) - len(rest)
        try:
            self.f.seek(pos + len(rest))
            chunk = self.f.read(want)
            # A read may return less than asked (remote.RangeFile's first, small requests): read
            # on until the field is whole or the file ends.
            while len(rest) + len(chunk) < n and (more := self.f.read(want - len(chunk))):
                chunk += more
        except OSError as e:
            raise GGUFError(f"{self.path} cannot be read ({e.strerror})") from None
        self.buf, self.base, self.p = rest + chunk, pos, 0
        if len(self.buf) < n:  # shorter than fstat said: cut while we read it
            raise GGUFError(f"{self.path} is truncated: it shrank while being read", hint=TRUNCATED_HINT)

    def skip(self, n: int, what: str = "a field") -> None:
        if self.p + n <= len(self.buf):
            self.p += n
            return
        pos = self.tell()
        if pos + n > self.end:
            raise self.overrun(n, what)
        self.buf, self.base, self.p = b"", pos + n, 0

    def take(self, n: int, what: str = "a field") -> bytes:
        self.need(n, what)
        v = self.buf[self.p:self.p + n]
        self.p += n
        return v

    def u32(self) -> int:
        self.need(4)
        v = _U32.unpack_from(self.buf, self.p)[0]
        self.p += 4
        return v

    def u64(self) -> int:
        self.need(8)
        v = _U64.unpack_from(self.buf, self.p)[0]
        self.p += 8
        return v

    def name(self, limit: int, what: str) -> str:
        """A key or tensor name: short, so a longer length is corruption, not a string to skip."""
        n = self.u64()
        if n > limit:
            raise GGUFError(f"{self.path}: {what} at byte {self.tell() - 8} is {n:,} bytes long "
                            f"(at most {limit:,}): corrupt header", hint=CORRUPT_HINT)
        return self.take(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str):
        if vtype in _STRUCT:
            st = _STRUCT[vtype]
            self.need(st.size)
            v = st.unpack_from(self.buf, self.p)[0]
            self.p += st.size
            return v
        if vtype == _STRING:
            return self.string(key)
        if vtype == _ARRAY:
            return self.array(key)
        raise GGUFError(f"{self.path}: key {key!r} has unknown GGUF value type {vtype}",
                        hint="the file is corrupt or from a newer GGUF version")

    def string(self, key: str):
        n = self.u64()
        if n > MAX_STRING_KEPT or self.kept + _KEEP_COST + n > MAX_KEPT_BYTES:
            self.skip(n, f"the string of key {key!r}")
            return ("<string>", n)
        self.kept += _KEEP_COST + n
        return self.take(n, f"the string of key {key!r}").decode("utf-8", errors="replace")

    def array(self, key: str):
        etype, count = self.u32(), self.u64()
        what = f"the array of key {key!r} ({count:,} values)"
        if etype == _ARRAY:
            # gguf.cpp's reader refuses nested arrays, so no llama.cpp model holds one; refusing them
            # here bounds the walk's depth at one.
            raise GGUFError(f"{self.path}: key {key!r} holds an array of arrays, which llama.cpp cannot "
                            "read: corrupt header", hint=CORRUPT_HINT)
        if etype == _STRING:
            elem = 8  # at least its length
        elif etype in _STRUCT:
            elem = _STRUCT[etype].size
        else:
            raise GGUFError(f"{self.path}: the array of key {key!r} has unknown GGUF value type {etype}",
                            hint="the file is corrupt or from a newer GGUF version")
        if count * elem > self.left():
            raise self.overrun(count * elem, what)
        if etype == _STRING:
            self.strings += count
            if self.strings > MAX_STRINGS:
                raise GGUFError(f"{self.path}: {what} brings the header's strings past {MAX_STRINGS:,}: "
                                "corrupt header", hint=CORRUPT_HINT)
        keep = count <= MAX_ARRAY_KEPT and self.kept + count * _KEEP_COST <= MAX_KEPT_BYTES
        if etype == _STRING:
            if keep:
                self.kept += count * _KEEP_COST
                return [self.string(key) for _ in range(count)]
            self.skip_strings(count, what)
        elif keep:
            self.kept += count * _KEEP_COST
            self.need(count * elem, what)
            vals = list(struct.unpack_from(f"<{count}{_SCALAR[etype]}", self.buf, self.p))
            self.p += count * elem
            return vals
        else:
            self.skip(count * elem, what)
        return ("<array>", etype, count)

    def skip_strings(self, count: int, what: str) -> None:
        """Step over count strings reading only their lengths: the vocabulary's hot loop."""
        unpack_from = _U64.unpack_from
        while count:
            buf, p, end = self.buf, self.p, len(self.buf)
            while count and p + 8 <= end:
                q = p + 8 + unpack_from(buf, p)[0]
                if q > end:
                    break
                p, count = q, count - 1
            self.p = p
            if count:  # a string across the chunk's end, or longer than a chunk
                self.skip(self.u64(), what)
                count -= 1


def read_raw(path: Path | str) -> RawGGUF:
    """The header of one GGUF file, every claim in it checked against the file (see _Reader)."""
    path = Path(path)
    fd, st = open_regular(path, error=GGUFError, noun="a GGUF file", wrong_hint="pass the .gguf model file itself")
    with os.fdopen(fd, "rb", buffering=0) as f:
        return read_raw_from(f, st.st_size, path)


def read_raw_from(f: BinaryIO, size: int, path) -> RawGGUF:
    """The header of one GGUF file of `size` bytes read from `f` (seek/read), named `path` in
    errors and in the result: the one parser for a local file and a remote one."""
    r = _Reader(f, size, path)
    magic = r.take(min(4, size))
    if len(magic) < 4 and GGUF_MAGIC.startswith(magic):
        raise GGUFError(f"{path} is truncated: {size} B {_where(path)}", hint=TRUNCATED_HINT)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                        hint="cputune reads llama.cpp's GGUF models; convert others with "
                             "llama.cpp's convert_hf_to_gguf.py")
    return _parse(r, path, size)


def _parse(r: _Reader, path: Path, size: int) -> RawGGUF:
    version = r.u32()
    if version not in (2, 3):
        if version & 0xFFFF == 0 and (version >> 24) in (2, 3):  # gguf.cpp: host/model endianness
            raise GGUFError(f"{path} is a big-endian GGUF file", hint="this machine reads little-endian models")
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)",
                        hint="GGUF v1 files predate llama.cpp's current format: convert the model again")
    n_tensors, n_kv = r.u64(), r.u64()
    for n, most, least, what in ((n_kv, MAX_KV, _MIN_KV_BYTES, "metadata keys"),
                                 (n_tensors, MAX_TENSORS, _MIN_TENSOR_INFO_BYTES, "tensors")):
        if n > most:
            raise GGUFError(f"{path}: the header claims {n:,} {what} (at most {most:,}): corrupt header",
                            hint=CORRUPT_HINT)
        if n * least > r.left():
            raise r.overrun(n * least, f"the list of {n:,} {what}")
    meta: dict = {}
    for i in range(n_kv):
        key = r.name(MAX_KEY_BYTES, f"the name of key {i}")
        if not key:
            raise GGUFError(f"{path}: key {i} has an empty name: corrupt header", hint=CORRUPT_HINT)
        if key in meta:
            raise GGUFError(f"{path}: key {key!r} appears twice: corrupt header", hint=CORRUPT_HINT)
        meta[key] = r.value(r.u32(), key)

    sizes = type_sizes()
    infos = []  # (TensorInfo, data offset)
    names = set()
    for i in range(n_tensors):
        name = r.name(GGML_MAX_NAME - 1, f"the name of tensor {i}")
        if name in names:
            raise GGUFError(f"{path}: tensor {name!r} appears twice: corrupt header", hint=CORRUPT_HINT)
        names.add(name)
        n_dims = r.u32()
        if n_dims > GGML_MAX_DIMS:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims:,} dimensions (ggml has at most "
                            f"{GGML_MAX_DIMS}): corrupt header", hint=CORRUPT_HINT)
        # n_dims 0 is a scalar: gguf.cpp reads it as ne = (1, 1, 1, 1).
        shape = tuple(r.u64() for _ in range(n_dims)) or (1,)
        n_params = 1
        for d in shape:
            n_params *= d
            if d < 1 or n_params >= 1 << 63:  # gguf.cpp: every ne an int64, and so their product
                raise GGUFError(f"{path}: tensor {name!r} has the impossible shape {list(shape)}: "
                                "corrupt header", hint=CORRUPT_HINT)
        tid = r.u32()
        if tid in sizes:
            tname, block, _ = sizes[tid]
            if shape[0] % block:  # gguf.cpp refuses a row that is not whole blocks
                raise GGUFError(f"{path}: tensor {name!r} ({tname}) has rows of {shape[0]} elements, not "
                                f"a multiple of its block of {block}: corrupt header", hint=CORRUPT_HINT)
        else:
            tname = f"unknown({tid})"
        offset = r.u64()
        infos.append((TensorInfo(name, tname, tid, shape, n_params, tensor_bytes(shape, tid)), offset))

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    # gguf.cpp: a u32 and a power of 2.
    if type(alignment) is not int or not 0 < alignment < 1 << 32 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment is {_describe(alignment)}, not a power of 2: "
                        "corrupt header", hint=CORRUPT_HINT)
    data_start = -(-r.tell() // alignment) * alignment if infos else r.tell()
    # gguf.cpp requires each tensor to start where the one before ends, padded to the alignment;
    # after a type this cputune does not know, only the order can be checked.
    expected, prev, data_end = 0, 0, 0
    for i, (t, offset) in enumerate(infos):
        if offset % alignment or offset < prev or (expected is not None and offset != expected):
            want = f"{expected:,}" if expected is not None else f"a multiple of {alignment} after {prev:,}"
            raise GGUFError(f"{path}: tensor {t.name!r} has its data at offset {offset:,}, expected {want}: "
                            "corrupt header", hint=CORRUPT_HINT)
        prev = offset
        if t.n_bytes is None:
            # Its size is unknown, but no ggml type packs a weight in under a bit (IQ1_S: 1.56).
            least = -(-t.n_params // 8)
            if i + 1 < len(infos) and offset + least > infos[i + 1][1]:
                raise GGUFError(f"{path}: tensor {t.name!r} ({t.type_name}) claims {t.n_params:,} weights in "
                                f"{infos[i + 1][1] - offset:,} bytes: corrupt header", hint=CORRUPT_HINT)
            expected = None
            data_end = max(data_end, offset + least)
        else:
            expected = offset + -(-t.n_bytes // alignment) * alignment
            data_end = max(data_end, offset + t.n_bytes)
    # llama-model-loader.h: "tensor data is not within the file bounds, model is corrupted or incomplete".
    if data_start + data_end > size:
        raise _truncated_data(path, data_start + data_end, size)
    return RawGGUF(path, version, meta, tuple(t for t, _ in infos), size)


def shard_names(name: str) -> list[str]:
    """The file names of every shard of a split model given any one's name; [name] for one file."""
    m = SPLIT_RE.match(name)
    if not m:
        return [name]
    no, count = int(m.group("no")), int(m.group("count"))
    if not 1 <= no <= count:
        raise GGUFError(f"{name} names shard {no} of {count}, which cannot exist",
                        hint="split models are named NAME-00001-of-0000N.gguf, counting from 1")
    return [f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def shard_paths(path: Path | str) -> list[Path]:
    """All shards of a split model given any one of them; [path] for a single file."""
    path = Path(path)
    names = shard_names(path.name)
    if len(names) == 1:
        return [path]
    count = len(names)
    paths = [path.with_name(n) for n in names]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise GGUFError(f"split model {path.name} is missing {len(missing)} of {count} shards "
                        f"({', '.join(missing[:3])}{'…' if len(missing) > 3 else ''})",
                        hint="download every shard into the same folder")
    return paths


def read_model_files(path: Path | str) -> tuple[RawGGUF, int]:
    """One model from any shard: metadata of the first, tensors of all; and the shard count."""
    return merge_shards([read_raw(p) for p in shard_paths(path)])


def merge_shards(raws: list[RawGGUF]) -> tuple[RawGGUF, int]:
    """The shards of one split model (first to last) as one: metadata of the first, tensors of
    all, each shard's split.no checked; and the shard count."""
    # llama-model-loader.cpp: split.count in the first file (0 or 1 after llama-gguf-split --merge),
    # split.no in each shard, counted from 0.
    count = raws[0].metadata.get("split.count")
    if count is not None and (type(count) is not int or max(count, 1) != len(raws)):
        raise GGUFError(f"{raws[0].path.name}: split.count is {_describe(count)}, but its name makes it "
                        f"shard 1 of {len(raws)}", hint="a shard was renamed or comes from another download")
    for i, raw in enumerate(raws[1:], 1):
        no = raw.metadata.get("split.no", i)
        if type(no) is not int or no != i:
            raise GGUFError(f"{raw.path.name}: split.no is {_describe(no)}, but its name makes it shard "
                            f"{i + 1} of {len(raws)} (split.no {i})",
                            hint="a shard was renamed or comes from another download")
    first = raws[0]
    tensors = tuple(t for r in raws for t in r.tensors)
    if len(raws) > 1 and len({t.name for t in tensors}) < len(tensors):
        raise GGUFError(f"split model {first.path.name}: a tensor appears in two shards",
                        hint="the shards come from different downloads: download them again")
    return RawGGUF(first.path, first.version, first.metadata, tensors,
                   sum(r.file_bytes for r in raws)), len(raws)


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
    # Bytes by the role the architecture's table gives each tensor (configs/architectures/);
    # "unknown" for a tensor the table does not have, or every tensor of an arch without a table.
    bytes_by_role: dict[str, int] = field(default_factory=dict)
    roles_from_table: bool = False
    # Sliding-window (gpt-oss) or chunked (llama4) layers attend to n_swa tokens at most; the
    # swa_* parts are those layers' share of the kv_* and attn_* totals above.
    n_swa: int = 0
    swa_kv_k_elems_per_token: int = 0
    swa_kv_v_elems_per_token: int = 0
    swa_attn_flops_per_ctx_token: int = 0
    # The cache's layout, which an engine's attention cost depends on beside its FLOPs: KV heads
    # of a layer (the most any layer has; 1 for MLA's shared latent) and a K row's elements per
    # head. A token's K rows of all KV heads sit side by side, so one head's rows are
    # n_head_kv x key_length elements apart.
    n_head_kv: int = 0
    key_length: int = 0

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
    """Σ_layers (K elems x size(type_k) + V elems x size(type_v)); src/llama-kv-cache.cpp.
    Every layer's: a window layer holds this per token only up to its window (kv_cache_bytes)."""
    return (model.kv_k_elems_per_token * cache_type_bytes(cache_type)
            + model.kv_v_elems_per_token * cache_type_bytes(cache_type_v or cache_type))


def _swa_kv_bytes_per_token(model: ModelProfile, cache_type: str, cache_type_v: str | None) -> float:
    return (model.swa_kv_k_elems_per_token * cache_type_bytes(cache_type)
            + model.swa_kv_v_elems_per_token * cache_type_bytes(cache_type_v or cache_type))


# llama-kv-cache-iswa.cpp sizes a window layer's cache for the window plus one ubatch
# (n_swa * n_seq + n_ubatch, padded); 512 is the default ubatch.
SWA_CACHE_SLACK_TOKENS = 512


def kv_cache_bytes(model: ModelProfile, n_ctx: int, cache_type: str = "f16",
                   cache_type_v: str | None = None) -> float:
    """The KV cache of a context of n_ctx tokens: full-attention layers hold every token, window
    layers at most their window (plus a ubatch)."""
    swa = _swa_kv_bytes_per_token(model, cache_type, cache_type_v)
    full = kv_bytes_per_token(model, cache_type, cache_type_v) - swa
    return full * n_ctx + swa * min(n_ctx, model.n_swa + SWA_CACHE_SLACK_TOKENS)


def kv_read_bytes(model: ModelProfile, depth: int, cache_type: str = "f16",
                  cache_type_v: str | None = None) -> float:
    """KV bytes one decoded token reads with `depth` tokens in the cache."""
    swa = _swa_kv_bytes_per_token(model, cache_type, cache_type_v)
    full = kv_bytes_per_token(model, cache_type, cache_type_v) - swa
    return full * depth + swa * min(depth, model.n_swa)


def attn_flops_at(model: ModelProfile, depth: float) -> float:
    """Attention FLOPs of one token against `depth` cached tokens (window layers see n_swa at most)."""
    swa = model.swa_attn_flops_per_ctx_token
    return (model.attn_flops_per_ctx_token - swa) * depth + swa * min(depth, model.n_swa)


def kv_rows_at(model: ModelProfile, depth: float) -> float:
    """K rows (one per KV head, layer and cached token) a token's attention walks at `depth`:
    window layers see n_swa tokens at most."""
    if model.key_length < 1:
        return 0.0
    swa = model.swa_kv_k_elems_per_token / model.key_length
    return (model.kv_k_elems_per_token / model.key_length - swa) * depth + swa * min(depth, model.n_swa)


def _describe(v) -> str:
    """A header value as an error message names it."""
    if isinstance(v, bool):
        return f"a boolean ({v})"
    if isinstance(v, float):
        return f"a float ({v!r})"
    if isinstance(v, str):
        return f"a string ({v[:24]!r})"
    if isinstance(v, list):
        return f"an array of {len(v)} values"
    if isinstance(v, tuple) and v and v[0] == "<array>":
        return f"an array of {v[2]:,} values"
    if isinstance(v, tuple) and v and v[0] == "<string>":
        return f"a string of {v[1]:,} bytes"
    return repr(v)


# Hyperparameter bounds: llama.cpp's own where it has one (src/llama-hparams.h), else far beyond
# any model published (the widest have n_embd 16384, 128 heads, head_dim 576, 262k tokens).
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_EMBD = 1 << 20
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 16
MAX_VOCAB = 1 << 24
MAX_CTX = (1 << 32) - 1  # n_ctx_train is a uint32_t
# block_count may exceed the highest blk.N tensor by this much (a hand-built header, a block of no
# weights); what matters is that no per-layer list outgrows the tensors it describes.
LAYER_SLACK = 2


class _Hparams:
    """Typed, range-checked reads of a header's `{arch}.*` keys: a wrong type or an absurd value is a
    GGUFError naming the file and the key, never a number the arithmetic goes on with."""

    def __init__(self, meta: dict, arch: str, where: str):
        self.meta, self.arch, self.where = meta, arch, where

    def bad(self, key: str, v, why: str) -> GGUFError:
        return GGUFError(f"{self.where}: {key} is {_describe(v)}, {why}", hint=CORRUPT_HINT)

    def check(self, key: str, v, lo: int, hi: int) -> int:
        if type(v) is not int:  # bool is an int subclass: GGUF's bool is no count either
            raise self.bad(key, v, "not an integer")
        if not lo <= v <= hi:
            raise self.bad(key, v, f"outside {lo}..{hi:,}")
        return v

    def int(self, name: str, lo: int, hi: int, default=None, *, arch: bool = True):
        key = f"{self.arch}.{name}" if arch else name
        v = self.meta.get(key)
        return default if v is None else self.check(key, v, lo, hi)

    def required(self, name: str, lo: int, hi: int, hint: str | None = None) -> int:
        key = f"{self.arch}.{name}"
        if key not in self.meta:
            raise GGUFError(f"{self.where}: no {key} key", hint=hint or CORRUPT_HINT)
        return self.int(name, lo, hi)

    def per_layer(self, name: str, n_layer: int, lo: int, hi: int, default: list[int]) -> list[int]:
        """A scalar for every layer, or one value per layer (llama-model-loader's get_key_or_arr)."""
        key = f"{self.arch}.{name}"
        v = self.meta.get(key)
        if v is None:
            return default
        if isinstance(v, (list, tuple)) and not (isinstance(v, tuple) and v[0] == "<string>"):
            n = len(v) if isinstance(v, list) else v[2]
            if n != n_layer:
                raise self.bad(key, v, f"but the model has {n_layer} layers (llama.cpp needs one value each)")
            return [self.check(key, x, lo, hi) for x in v]
        return [self.check(key, v, lo, hi)] * n_layer


def profile_from(meta: dict, tensors: tuple[TensorInfo, ...] | list[TensorInfo], *, file_bytes: int,
                 path: str | None = None, n_shards: int = 1) -> ModelProfile:
    """The per-token arithmetic on a header (a real file's, or one the catalog builds)."""
    where = path or "model"
    arch = meta.get("general.architecture")
    if arch is None:
        raise GGUFError(f"{where}: no general.architecture key", hint="the file is not a llama.cpp model")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{where}: general.architecture is {_describe(arch)}, not a name", hint=CORRUPT_HINT)
    if arch == "clip":
        raise GGUFError(f"{where} is a vision projector (mmproj), not a language model",
                        hint="pass the language model's GGUF; llama-server takes this one as --mmproj")
    if not tensors:
        raise GGUFError(f"{where} holds no tensors", hint="pass a model file with its weights")
    hp = _Hparams(meta, arch, where)

    blocks = [int(m.group(1)) for t in tensors if (m := BLK_RE.match(t.name))]
    n_layer = hp.required("block_count", 1, MAX_LAYERS,
                          hint=f"is {where} a llama.cpp language model? {CORRUPT_HINT}")
    if blocks and n_layer > max(blocks) + 1 + LAYER_SLACK:
        raise hp.bad(f"{arch}.block_count", n_layer, f"but the tensors hold blocks 0..{max(blocks)} only")
    n_embd = hp.required("embedding_length", 1, MAX_EMBD)
    # No head_count: a recurrent model (mamba, rwkv) with no attention and no KV cache.
    heads = hp.per_layer("attention.head_count", n_layer, 0, MAX_HEADS, [0] * n_layer)
    if f"{arch}.attention.head_count" in meta and max(heads) < 1:
        raise hp.bad(f"{arch}.attention.head_count", meta[f"{arch}.attention.head_count"], "but attention needs heads")
    heads_kv = hp.per_layer("attention.head_count_kv", n_layer, 0, MAX_HEADS, heads)
    n_head = max(heads)
    head_dim = n_embd // n_head if n_head else 0
    k_len = hp.int("attention.key_length", 1, MAX_HEAD_DIM, head_dim)
    v_len = hp.int("attention.value_length", 1, MAX_HEAD_DIM, head_dim)
    mla = hp.int("attention.key_length_mla", 1, MAX_HEAD_DIM) is not None
    # llama-model.cpp load_hparams: n_expert <= LLAMA_MAX_EXPERTS, 0 < max used <= n_expert, none
    # used without experts.
    n_expert = hp.int("expert_count", 0, MAX_EXPERTS, 0)
    used = hp.per_layer("expert_used_count", n_layer, 0, MAX_EXPERTS, [0] * n_layer)
    if max(used) > n_expert:
        raise hp.bad(f"{arch}.expert_used_count", meta.get(f"{arch}.expert_used_count"),
                     f"more than the model's {n_expert} experts ({arch}.expert_count)")
    if n_expert and max(used) < 1:
        raise hp.bad(f"{arch}.expert_used_count", meta.get(f"{arch}.expert_used_count"),
                     f"but the model routes to {n_expert} experts")
    n_expert_shared = hp.int("expert_shared_count", 0, MAX_EXPERTS, 0)
    n_dense_lead = hp.int("leading_dense_block_count", 0, n_layer, 0)
    # block_count counts the MTP (nextn) blocks at the end; llama.cpp runs n_layer_all - nextn
    # of them per token (llama_hparams::n_layer) and keeps no KV cache for the rest.
    nextn = hp.int("nextn_predict_layers", 0, n_layer - 1, 0)
    n_run = n_layer - nextn
    n_ctx_train = hp.int("context_length", 1, MAX_CTX)
    ftype = hp.int("general.file_type", 0, (1 << 32) - 1, arch=False)
    name = meta.get("general.name")
    if name is not None and not isinstance(name, str):
        raise hp.bad("general.name", name, "not a name")
    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_vocab = hp.int("vocab_size", 1, MAX_VOCAB) or (embd.shape[1] if embd and len(embd.shape) > 1 else 0)
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
    table = architectures.load_architectures().get(arch)
    by_role: dict[str, int] = {}
    for t in tensors:
        nbytes = t.n_bytes or 0
        role = (table.role_of(t.name) if table else None) or "unknown"
        by_role[role] = by_role.get(role, 0) + nbytes
        if t.n_bytes is None:
            unknown.add(t.type_name)
        weight_bytes += nbytes
        total += t.n_params
        by_type[t.type_name] = by_type.get(t.type_name, 0) + nbytes
        if len(t.shape) >= 2 and t.name != "token_embd.weight":
            matmul_by_type[t.type_name] = matmul_by_type.get(t.type_name, 0) + nbytes
        m = BLK_RE.match(t.name)
        layer = int(m.group(1)) if m else None
        if layer is not None and layer >= n_run:
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

    heads, heads_kv = heads[:n_run], heads_kv[:n_run]
    swa, n_swa = table.swa_layers(meta, n_layer) if table else ([False] * n_layer, 0)
    swa = swa[:n_run]
    k_elems = [k_len * hk for hk in heads_kv]
    if mla:
        # MLA as llama.cpp runs it: K is the compressed latent (kv_lora + rope) with one KV head and
        # no V (the V-less cache, PR #19067); scores and the value mix work on the latent per head.
        v_elems = [0] * n_run
        v_mix = hp.int("attention.value_length", 1, MAX_HEAD_DIM, 0)
    else:
        v_elems = [v_len * hk for hk in heads_kv]
        v_mix = v_len
    per_layer_attn = [2 * h * (k_len + v_mix) for h in heads]
    attn = sum(per_layer_attn)
    swa_k = sum(k for k, w in zip(k_elems, swa) if w)
    swa_v = sum(v for v, w in zip(v_elems, swa) if w)
    swa_attn = sum(a for a, w in zip(per_layer_attn, swa) if w)
    if not weight_bytes:
        raise GGUFError(f"{where}: none of its {len(tensors)} tensors has a type this cputune knows "
                        f"({', '.join(sorted(unknown)[:3])})", hint="upgrade cputune to size this model")
    if round(active_bytes) < 1:
        raise GGUFError(f"{where}: no tensor is read per token (every one is an MTP layer or an unused "
                        "expert): corrupt header", hint=CORRUPT_HINT)
    return ModelProfile(
        path=path, name=name, arch=arch,
        file_type=_file_type_name(ftype), n_shards=n_shards, n_layer=n_run, n_embd=n_embd,
        n_vocab=n_vocab, n_head=n_head, n_ctx_train=n_ctx_train, n_expert=n_expert,
        n_expert_used=max(used, default=0), n_expert_shared=n_expert_shared,
        n_dense_lead=n_dense_lead, mla=mla,
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
        bytes_by_role=dict(sorted(by_role.items(), key=lambda kv: -kv[1])), roles_from_table=table is not None,
        n_swa=n_swa if any(swa) else 0, swa_kv_k_elems_per_token=swa_k, swa_kv_v_elems_per_token=swa_v,
        swa_attn_flops_per_ctx_token=swa_attn,
        n_head_kv=1 if mla else max(heads_kv, default=0), key_length=k_len,
    )


def _file_type_name(ftype: int | None) -> str | None:
    if ftype is None:
        return None
    try:
        return LlamaFileType(ftype).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown({ftype})"


def read_model(path: Path | str) -> ModelProfile:
    """The ModelProfile of a GGUF file (any shard of a split model names the whole model)."""
    return profile_of(*read_model_files(path))


def profile_of(raw: RawGGUF, n_shards: int = 1) -> ModelProfile:
    """The ModelProfile of a header read (merge_shards' result, for a split model)."""
    return profile_from(raw.metadata, raw.tensors, file_bytes=raw.file_bytes, path=str(raw.path),
                        n_shards=n_shards)
