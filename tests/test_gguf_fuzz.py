"""A GGUF header is untrusted input: corrupt variants of real synth models end in a GGUFError or a
sane profile, never another exception, a hang or a big allocation (issue 13).

The corpus is made here from the f16 files cputune.model.synth writes: truncations at every structural
boundary, seeded byte flips, metadata of the wrong type, nested arrays and absurd counts. The
reader never touches tensor data, so each variant is its (modified) header with the data section
left as a hole (a sparse file): a thousand variants cost a few MB of disk.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from shapes import TINY_DS2, TINY_LLAMA
from gguf import GGUFReader

from cputune.model import modelfiles, synth
from cputune.predict import calibrate
from cputune.model import gguf_model as gm
from cputune.core.errors import CputuneError, GGUFError
from cputune.predict.box import default_settings
from cputune.predict.predictor import MachineBandwidth, predict

U8, I32, U32, F32, BOOL, STRING, ARRAY, U64, F64 = 0, 5, 4, 6, 7, 8, 9, 10, 12
BOX = MachineBandwidth("fuzz", 1, 1, 8, 60.0, 15.0, 1.0, 64 << 30)
CAL = calibrate.default_calibration()
PEAK_BYTES = 16 << 20  # per variant; the old reader's 2^26-layer list alone took 2.6 GB
# Keys profile_from reads as counts: any non-integer there must be refused.
COUNT_KEYS = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
              "attention.key_length", "attention.value_length", "attention.key_length_mla", "expert_count",
              "expert_used_count", "expert_shared_count", "leading_dense_block_count", "context_length",
              "vocab_size")


# --- encoding ----------------------------------------------------------------------------------

def s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key.encode()) + struct.pack("<I", vtype) + payload


def tinfo(name: str, dims, tid: int, offset: int, n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return s(name.encode()) + struct.pack("<I", n) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", tid, offset)


def nested(depth: int) -> bytes:
    """An array of arrays `depth` deep, empty u8 array at the bottom."""
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", U8, 0)


@dataclass(frozen=True)
class Field:
    key: str
    raw: bytes
    vtype: int


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    tid: int
    offset: int  # into the data section
    start: int  # of its info in the file
    end: int


@dataclass(frozen=True)
class Layout:
    """A synth file taken apart by gguf-py's own reader (an independent walk of the same bytes)."""

    path: Path
    header: bytes  # [0, data_offset)
    fields: tuple[Field, ...]
    field_spans: tuple[tuple[int, int], ...]
    tensors: tuple[Tensor, ...]
    data_offset: int
    size: int

    @property
    def n_layer(self) -> int:
        return next(struct.unpack("<I", f.raw[-4:])[0] for f in self.fields if f.key.endswith(".block_count"))

    @property
    def arch(self) -> str:
        return next(f.key.split(".")[0] for f in self.fields if f.key.endswith(".block_count"))

    def build(self, fields=None, tensors=None, n_kv=None, n_tensors=None) -> bytes:
        """A header from raw fields and tensor infos, padded to 32 like GGUFWriter's."""
        fields = [f.raw for f in self.fields] if fields is None else fields
        tensors = [self.header[t.start:t.end] for t in self.tensors] if tensors is None else tensors
        out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                    len(fields) if n_kv is None else n_kv)
        out += b"".join(fields) + b"".join(tensors)
        return out + b"\0" * (-len(out) % 32)

    @property
    def data_bytes(self) -> int:
        return self.size - self.data_offset


def take_apart(path: Path) -> Layout:
    r = GGUFReader(path)
    header = path.read_bytes()[:r.data_offset]
    fields, spans = [], []
    for f in r.fields.values():
        if f.name.startswith("GGUF."):
            continue
        end = f.offset + sum(p.nbytes for p in f.parts)
        fields.append(Field(f.name, header[f.offset:end], int(f.types[0])))
        spans.append((f.offset, end))
    tensors = tuple(Tensor(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset - r.data_offset),
                           t.field.offset, t.field.offset + sum(p.nbytes for p in t.field.parts))
                    for t in r.tensors)
    return Layout(path, header, tuple(fields), tuple(spans), tensors, r.data_offset, path.stat().st_size)


# --- the corpus --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    label: str
    header: bytes
    size: int  # the file's length; past the header it is a hole
    must_fail: str | None = None  # a word the GGUFError must hold; None: an error or a sane profile

    def write(self, path: Path) -> Path:
        with open(path, "wb") as f:
            f.write(self.header[:self.size])
            f.truncate(self.size)
        return path


def truncations(lay: Layout) -> list[Variant]:
    cuts = {0, 1, 3, 4, 5, 8, 12, 16, 20, 24, lay.data_offset - 1, lay.data_offset, lay.data_offset + 1,
            lay.size - 1}
    for a, b in lay.field_spans:
        cuts |= {a, a + 9, b - 1}
    for t in lay.tensors:
        cuts |= {t.start, t.start + 9, t.end - 1}
        cuts.add(lay.data_offset + t.offset + 1)  # inside each tensor's data
    return [Variant(f"cut at {c}", lay.header, c, must_fail="truncated") for c in sorted(cuts) if c < lay.size]


def byte_flips(lay: Layout, rng: random.Random, n: int) -> list[Variant]:
    end = lay.tensors[-1].end
    out = []
    for _ in range(n):
        at = rng.randrange(end)
        b = bytearray(lay.header)
        b[at] ^= rng.randrange(1, 256)
        out.append(Variant(f"flip byte {at}", bytes(b), lay.size))
    return out


def with_field(lay: Layout, key: str, raw: bytes | None, **kw) -> Variant:
    """The header with `key` re-encoded, added or (raw None) dropped; the data section unchanged."""
    fields = [raw if f.key == key else f.raw for f in lay.fields if raw is not None or f.key != key]
    if raw is not None and all(f.key != key for f in lay.fields):
        fields.append(raw)
    header = lay.build(fields)
    return Variant(f"{key} = {raw[len(key) + 8:][:24]!r}" if raw else f"no {key}", header,
                   len(header) + lay.data_bytes, **kw)


def wrong_types(lay: Layout) -> list[Variant]:
    out = []
    arch = lay.arch
    counts = {f"{arch}.{k}" for k in COUNT_KEYS} | {"general.file_type"}
    for f in lay.fields:
        if f.vtype in (STRING, ARRAY, BOOL):
            continue
        strict = "is" if f.key in counts else None
        k = f.key
        for vtype, payload, must in (
                (STRING, s(b"2"), strict), (F32, struct.pack("<f", math.nan), strict),
                (F32, struct.pack("<f", math.inf), strict), (F64, struct.pack("<d", -math.inf), strict),
                (ARRAY, struct.pack("<IQ", U32, 3) + struct.pack("<3I", 2, 2, 2), strict),
                (BOOL, b"\x01", strict), (I32, struct.pack("<i", -3), strict),
                (I32, struct.pack("<i", 0), None), (U32, struct.pack("<I", 1 << 26), None),
                (U64, struct.pack("<Q", 1 << 30), None), (U64, struct.pack("<Q", (1 << 64) - 1), strict)):
            out.append(with_field(lay, k, kv(k, vtype, payload), must_fail=must))
    bc = f"{arch}.block_count"
    out += [with_field(lay, bc, kv(bc, U32, struct.pack("<I", 1 << 26)), must_fail="block_count"),
            with_field(lay, bc, kv(bc, U64, struct.pack("<Q", 1 << 30)), must_fail="block_count"),
            with_field(lay, bc, kv(bc, U32, struct.pack("<I", lay.n_layer + 40)), must_fail="block_count"),
            with_field(lay, bc, None, must_fail="block_count"),
            with_field(lay, "general.architecture", kv("general.architecture", U32, struct.pack("<I", 7)),
                       must_fail="architecture"),
            with_field(lay, "general.architecture", None, must_fail="architecture")]
    for value in (0, 3, 64, 1 << 31):
        out.append(with_field(lay, "general.alignment", kv("general.alignment", U32, struct.pack("<I", value))))
    out.append(with_field(lay, "general.alignment", kv("general.alignment", STRING, s(b"32")),
                          must_fail="alignment"))
    return out


def deep_arrays(lay: Layout) -> list[Variant]:
    out = []
    for depth in (2, 8, 5000):
        header = lay.build([f.raw for f in lay.fields] + [kv("test.nested", ARRAY, nested(depth))])
        out.append(Variant(f"arrays nested {depth} deep", header, len(header) + lay.data_bytes,
                           must_fail="array of arrays"))
    return out


def absurd_counts(lay: Layout) -> list[Variant]:
    out = []
    nt, nk = len(lay.tensors), len(lay.fields)
    for n, must in ((0, "no tensors"), (nt - 1, None), (nt + 1, ""), ((1 << 16) + 1, ""), (1 << 40, ""),
                    ((1 << 64) - 1, "")):
        h = lay.build(n_tensors=n)
        out.append(Variant(f"n_tensors {n}", h, len(h) + lay.data_bytes, must_fail=must))
    for n in (0, nk - 1, nk + 1, 1 << 20, 1 << 63):
        h = lay.build(n_kv=n)
        out.append(Variant(f"n_kv {n}", h, len(h) + lay.data_bytes, must_fail=""))
    by_key = {f.key: f for f in lay.fields}
    # Array lengths: the token strings, and a scalar array.
    tok = by_key["tokenizer.ggml.tokens"]
    body = tok.raw[len(tok.key) + 8 + 4 + 4 + 8:]  # after key, type, element type, count
    for n in (1 << 29, 1 << 32, 1 << 40, 1 << 62, (1 << 64) - 1):
        out.append(with_field(lay, tok.key, kv(tok.key, ARRAY, struct.pack("<IQ", STRING, n)) + body,
                              must_fail=""))
    out.append(with_field(lay, tok.key, kv(tok.key, ARRAY, struct.pack("<IQ", STRING, 0)) + body))
    sc = by_key["tokenizer.ggml.scores"]
    body = sc.raw[len(sc.key) + 8 + 4 + 4 + 8:]
    for n in (1 << 40, 1 << 61):
        out.append(with_field(lay, sc.key, kv(sc.key, ARRAY, struct.pack("<IQ", F32, n)) + body, must_fail=""))
    # String lengths: a value, a key.
    arch = by_key["general.architecture"]
    for n in (1 << 40, (1 << 64) - 1):
        out.append(with_field(lay, arch.key, kv(arch.key, STRING, struct.pack("<Q", n) + lay.arch.encode()),
                              must_fail=""))
        out.append(with_field(lay, arch.key, struct.pack("<Q", n) + arch.raw[8:], must_fail=""))
    # Tensor infos: n_dims, dims, type, offset, name length; on the first tensor and a middle one.
    for t in (lay.tensors[0], lay.tensors[len(lay.tensors) // 2]):
        def swap(raw: bytes, t=t) -> bytes:
            return lay.build(tensors=[raw if u is t else lay.header[u.start:u.end] for u in lay.tensors])

        cases = [(f"{t.name} n_dims {n}", tinfo(t.name, t.dims, t.tid, t.offset, n_dims=n), "")
                 for n in (0, 5, 100, (1 << 32) - 1)]
        cases += [(f"{t.name} n_dims 0, no dims", tinfo(t.name, (), t.tid, t.offset), "")]
        cases += [(f"{t.name} dims {d}", tinfo(t.name, (d,) + t.dims[1:], t.tid, t.offset), "")
                  for d in (0, 1 << 60, 1 << 63, (1 << 64) - 1)]
        cases += [(f"{t.name} dims x 2^30", tinfo(t.name, t.dims + (1 << 30,) * (4 - len(t.dims)), t.tid,
                                                   t.offset), "")]
        cases += [(f"{t.name} type {tid}", tinfo(t.name, t.dims, tid, t.offset), None)
                  for tid in (250, 1 << 31)]
        cases += [(f"{t.name} type Q8_0", tinfo(t.name, t.dims, 8, t.offset), "")]
        cases += [(f"{t.name} offset {o}", tinfo(t.name, t.dims, t.tid, o), "")
                  for o in (t.offset + 1, t.offset + 32, 1 << 62)]
        cases += [(f"{t.name} name length 2^63", struct.pack("<Q", 1 << 63) + t.name.encode()
                   + lay.header[t.start + 8 + len(t.name):t.end], "")]
        cases += [(f"{t.name} name 80 bytes", tinfo("x" * 80, t.dims, t.tid, t.offset), "name")]
        for label, raw, must in cases:
            h = swap(raw)
            out.append(Variant(label, h, len(h) + lay.data_bytes, must_fail=must))
    # Hyperparameters out of range, one at a time.
    a = lay.arch
    for key, value, must in ((f"{a}.attention.head_count", -3, "head_count"),
                             (f"{a}.attention.head_count", 0, "head_count"),
                             (f"{a}.embedding_length", 0, "embedding_length"),
                             (f"{a}.attention.head_count_kv", -3840, "head_count_kv"),
                             (f"{a}.expert_used_count", 9, "expert_used_count"),
                             (f"{a}.expert_count", 2000, "expert_count"),
                             (f"{a}.leading_dense_block_count", 7, "leading_dense_block_count"),
                             (f"{a}.block_count", -1, "block_count")):
        out.append(with_field(lay, key, kv(key, I32, struct.pack("<i", value)), must_fail=must))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Layout]:
    d = tmp_path_factory.mktemp("fuzz_bases")
    return {shape.arch: take_apart(synth.write_model(d / f"{shape.arch}.gguf", shape, seed=1)[0])
            for shape in (TINY_LLAMA, TINY_DS2)}


@pytest.fixture(scope="module")
def corpus(bases, tmp_path_factory) -> list[tuple[Path, Variant]]:
    d = tmp_path_factory.mktemp("fuzz_corpus")
    rng = random.Random(13)
    out = []
    for arch, lay in bases.items():
        variants = (truncations(lay) + byte_flips(lay, rng, 160) + wrong_types(lay) + deep_arrays(lay)
                    + absurd_counts(lay))
        out += [(v.write(d / f"{arch}-{i:04d}.gguf"), v) for i, v in enumerate(variants)]
    return out


# --- what every variant must come to -------------------------------------------------------------

def assert_sane(m: gm.ModelProfile) -> None:
    """Every number finite and non-negative, counts in range, and a prediction that is a speed."""
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        vals = v.values() if isinstance(v, dict) else [v] if isinstance(v, (int, float)) else []
        for x in vals:
            assert math.isfinite(x) and x >= 0, (f.name, v)
    assert 1 <= m.n_layer <= gm.MAX_LAYERS and m.n_embd >= 1
    assert m.n_expert_used <= m.n_expert and m.n_dense_lead <= m.n_layer
    assert 0 < m.weight_bytes <= m.file_bytes
    assert 0 < m.active_bytes_per_token <= 2 * m.weight_bytes
    assert math.isfinite(gm.kv_bytes_per_token(m, "q8_0"))
    # cputune predict's path: default settings (auto NUMA sizes the model), then predict.
    p = predict(m, BOX, default_settings(BOX, m), CAL)
    for x in (p.tg_tokens_per_s, p.pp_tokens_per_s, p.bytes_per_token, p.memory_needed_bytes):
        assert math.isfinite(x) and x > 0, p


def outcome(path: Path) -> tuple[str, str]:
    """('ok', '') for a sane profile, ('error', message) for a GGUFError; anything else raises."""
    try:
        m = gm.read_model(path)
    except GGUFError as e:
        assert "\n" not in e.message and path.name in e.message, e.message
        return "error", e.message
    assert_sane(m)
    return "ok", ""


def test_corpus_is_large_and_varied(corpus):
    assert len(corpus) >= 300
    labels = " ".join(v.label for _, v in corpus)
    for word in ("cut at", "flip byte", "nested 5000", "n_tensors", "n_kv", "n_dims 100", "dims 1152921504606846976",
                 "block_count = ", "type 250", "offset"):
        assert word in labels, word


def test_every_variant_is_a_gguf_error_or_a_sane_profile_in_little_memory(corpus):
    failures, peaks, kinds = [], [], {"ok": 0, "error": 0}
    tracemalloc.start()
    try:
        for path, v in corpus:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                kind, message = outcome(path)
            except Exception as e:  # noqa: BLE001 - the point: name every escape, not just the first
                failures.append(f"{v.label}: {type(e).__name__}: {e}")
                continue
            peaks.append((tracemalloc.get_traced_memory()[1] - base, v.label))
            kinds[kind] += 1
            if v.must_fail is not None and (kind != "error" or v.must_fail not in message):
                failures.append(f"{v.label}: expected a GGUFError about {v.must_fail!r}, got {kind} {message!r}")
    finally:
        tracemalloc.stop()
    assert not failures, f"{len(failures)} of {len(corpus)} variants:\n" + "\n".join(failures[:20])
    assert max(peaks)[0] < PEAK_BYTES, max(peaks)
    assert kinds["ok"] and kinds["error"]  # the corpus reaches both ends


def test_unmodified_bases_read_and_truncations_name_the_sizes(bases):
    for lay in bases.values():
        kind, _ = outcome(lay.path)
        assert kind == "ok"
    lay = bases["llama"]
    cut = Variant("", lay.header, lay.data_offset + 100).write(lay.path.with_name("cut.gguf"))
    with pytest.raises(GGUFError) as e:
        gm.read_model(cut)
    want = f"{lay.size / 1e6:.1f} MB expected, {(lay.data_offset + 100) / 1e3:.1f} KB on disk"
    assert e.value.message == f"{cut} is truncated: {want}" and "download" in e.value.hint


def test_scan_reports_each_bad_file_and_goes_on(corpus, bases, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    for path, _ in corpus:
        os.link(path, d / path.name)
    for lay in bases.values():
        shutil.copy(lay.path, d / f"good-{lay.path.name}")
    os.mkfifo(d / "fifo.gguf")
    (d / "folder.gguf").mkdir()
    (d / "loop-a.gguf").symlink_to("loop-b.gguf")
    (d / "loop-b.gguf").symlink_to("loop-a.gguf")
    (d / "dangling.gguf").symlink_to("nowhere.gguf")
    shutil.copy(bases["llama"].path, d / "zero-00001-of-00000.gguf")
    found, problems = modelfiles.scan(d)
    named = {f.path.name for f in found} | {p.split(":")[0].split(" ")[0] for p in problems}
    listed = {p.name for p in d.rglob("*.gguf")}
    assert named == listed and len(found) + len(problems) == len(listed)
    assert {"good-llama.gguf", "good-deepseek2.gguf"} <= {f.path.name for f in found}
    assert not [p for p in problems if "please report" in p], problems
    assert all("\n" not in p for p in problems)
    by_name = {p.split(":")[0].split(" ")[0]: p for p in problems}
    assert "FIFO" in by_name["fifo.gguf"] and "folder" in by_name["folder.gguf"]
    assert "symlink loop" in by_name["loop-a.gguf"] and "does not exist" in by_name["dangling.gguf"]
    assert "shard 1 of 0" in by_name["zero-00001-of-00000.gguf"]


# --- files that are no model at all ----------------------------------------------------------------

def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    result: list = []

    def read():
        try:
            gm.read_model(fifo)
        except CputuneError as e:
            result.append(e)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout=20)
    if t.is_alive():  # release the reader a regression left blocked in open(), then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("read_model blocked on a FIFO")
    assert isinstance(result[0], GGUFError) and "is a FIFO (named pipe), not a GGUF file" in result[0].message


@pytest.mark.parametrize("name, words", [("x-00000-of-00000.gguf", "shard 0 of 0"),
                                         ("x-00003-of-00002.gguf", "shard 3 of 2")])
def test_impossible_split_names(tmp_path, bases, name, words):
    shutil.copy(bases["llama"].path, tmp_path / name)
    with pytest.raises(GGUFError, match=words):
        gm.read_model(tmp_path / name)


def test_a_symlink_loop_is_one_error(tmp_path):
    (tmp_path / "a.gguf").symlink_to("b.gguf")
    (tmp_path / "b.gguf").symlink_to("a.gguf")
    with pytest.raises(GGUFError, match="symlink loop"):
        gm.read_model(tmp_path / "a.gguf")


# --- partial downloads -------------------------------------------------------------------------

def test_a_model_cut_at_65_kb_is_truncated_with_both_sizes(bases, tmp_path):
    src = bases["llama"].path
    cut = tmp_path / "partial.gguf"
    cut.write_bytes(src.read_bytes()[:65536])
    with pytest.raises(GGUFError) as e:
        gm.read_model(cut)
    assert e.value.message == f"{cut} is truncated: {src.stat().st_size / 1e6:.1f} MB expected, 65.5 KB on disk"
    assert "download" in e.value.hint


def test_a_split_model_with_one_short_shard_names_that_shard(tiny_split, tmp_path):
    shards = [shutil.copy(p, tmp_path / p.name) for p in tiny_split]
    short = Path(shards[-1])
    full = short.stat().st_size
    os.truncate(short, full - 4096)
    with pytest.raises(GGUFError) as e:
        gm.read_model(shards[0])
    assert e.value.message.startswith(f"{short} is truncated: ")
    assert "expected" in e.value.message and "on disk" in e.value.message
    assert modelfiles.scan(tmp_path) == ([], [f"{Path(shards[0]).name}: {e.value.message}"])


# --- a multi-GB file in a subprocess: peak RSS and the CLI's one line ------------------------------

RSS_WRAPPER = """
import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120)
print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def cputune_argv() -> list[str]:
    script = Path(sys.executable).with_name("cputune")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cputune"]


def run_measured(*args: str) -> dict:
    """Run `cputune ARGS` as the only child of a fresh Python, so its ru_maxrss is cputune's alone."""
    out = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cputune_argv(), *args], capture_output=True,
                         text=True, timeout=180, check=True)
    return json.loads(out.stdout)


def test_inspect_of_a_corrupt_8_gb_file_stays_small(bases, tmp_path):
    lay = bases["llama"]
    tok = next(f for f in lay.fields if f.key == "tokenizer.ggml.tokens")
    body = tok.raw[len(tok.key) + 24:]
    huge_vocab = lay.build([kv(tok.key, ARRAY, struct.pack("<IQ", STRING, 1 << 29)) + body if f is tok else f.raw
                            for f in lay.fields])
    files = {
        # a vocabulary of 2^29 strings over a hole of zeros: each reads as an empty string
        "huge-vocab.gguf": huge_vocab,
        # a preallocated download: half the header, then zeros (the old reader re-read such a
        # file with a 1 GiB window, then whole)
        "prealloc.gguf": lay.header[:lay.field_spans[len(lay.fields) // 2][0] + 5],
        # one key more than the header holds: the first tensor info read as a key
        "extra-key.gguf": lay.build(n_kv=len(lay.fields) + 1),
    }
    for name, header in files.items():
        path = tmp_path / name
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(8 << 30)
        r = run_measured("inspect", str(path))
        assert r["rc"] == 1, r
        lines = r["stderr"].splitlines()
        assert lines[0].startswith(f"Error: {path}") and len(lines) <= 2, r["stderr"]
        assert "Traceback" not in r["stderr"] + r["stdout"]
        assert r["maxrss_kib"] < 200 << 10, (name, r["maxrss_kib"])
