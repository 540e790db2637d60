"""ik_llama.cpp's tensor types in the type table: read with their real bytes, mainline's unchanged."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from cputune.model import gguf_model as gm
from cputune.core.data import load_csv

F16, Q8_0 = 1, 8
IQ4_KS, IQ2_K, IQ2_KS, Q8_K_R8, I2_S = 144, 137, 145, 399, 36  # ik_llama.cpp ggml.h enum ggml_type


def _s(b: str) -> bytes:
    return struct.pack("<Q", len(b.encode())) + b.encode()


def write_gguf(path: Path, tensors: list[tuple[str, tuple[int, ...], int, int]]) -> Path:
    """A GGUF v3 written byte by byte (not by the reader under test): a one-layer llama whose
    tensors are (name, ne, raw type id, data bytes), each at the next 32-byte boundary."""
    kvs = [("general.architecture", 8, _s("llama")), ("general.name", 8, _s("ik")),
           ("llama.block_count", 4, struct.pack("<I", 1)),
           ("llama.embedding_length", 4, struct.pack("<I", 256)),
           ("llama.attention.head_count", 4, struct.pack("<I", 4))]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    head += b"".join(_s(k) + struct.pack("<I", t) + v for k, t, v in kvs)
    offset, infos = 0, b""
    for name, ne, tid, nbytes in tensors:
        infos += _s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        infos += struct.pack("<IQ", tid, offset)
        offset += -(-nbytes // 32) * 32
    head += infos
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + b"\0" * offset)
    return path


def test_an_ik_gguf_is_read_with_each_types_real_bytes(tmp_path):
    # ik_llama.cpp ggml.c type_traits: IQ4_KS is 136 B per 256 weights plus a 4-byte float scale
    # per row (row_meta_size 4); IQ2_K 76 B per 256 and no row scale; IQ2_KS 70 B plus 2 per row;
    # Q8_K_R8 is sizeof(block_q8_k_r8) / 8 = 2064 / 8 = 258 B per 256.
    want = {"blk.0.ffn_down.weight": ((512, 256), IQ4_KS, (4 + 512 // 256 * 136) * 256),
            "blk.0.ffn_up.weight": ((256, 512), IQ2_K, 256 // 256 * 76 * 512),
            "blk.0.ffn_gate.weight": ((256, 512), IQ2_KS, (2 + 70) * 512),
            "blk.0.attn_q.weight": ((256, 256), Q8_K_R8, 258 * 256),
            "blk.0.attn_k.weight": ((256, 64), I2_S, 256 * 64 // 4 + 32),  # ggml_nbytes: n/4 + 32
            "output.weight": ((256, 1000), Q8_0, 256 // 32 * 34 * 1000),
            "token_embd.weight": ((256, 1000), F16, 256 * 2 * 1000)}
    path = write_gguf(tmp_path / "ik.gguf", [(n, ne, tid, b) for n, (ne, tid, b) in want.items()])
    raw = gm.read_raw(path)  # every tensor where the one before ends: the sizes are exact
    got = {t.name: (t.type_name, t.n_bytes) for t in raw.tensors}
    assert got == {"blk.0.ffn_down.weight": ("IQ4_KS", 70_656), "blk.0.ffn_up.weight": ("IQ2_K", 38_912),
                   "blk.0.ffn_gate.weight": ("IQ2_KS", 36_864), "blk.0.attn_q.weight": ("Q8_K_R8", 66_048),
                   "blk.0.attn_k.weight": ("I2_S", 4_128), "output.weight": ("Q8_0", 272_000),
                   "token_embd.weight": ("F16", 512_000)}
    assert {n: b for n, (_, b) in got.items()} == {n: b for n, (_, _, b) in want.items()}
    m = gm.read_model(path)
    assert m.unknown_types == () and m.bytes_by_type["IQ4_KS"] == 70_656
    assert m.weight_bytes == sum(b for _, _, b in want.values())


def test_mainline_types_keep_gguf_pys_sizes_and_names():
    sizes = gm.type_sizes()
    for t, (block, size) in GGML_QUANT_SIZES.items():
        assert sizes[int(t)] == (GGMLQuantizationType(t).name, block, size)
        assert int(t) not in gm.meta_bytes()
    assert gm.tensor_bytes((4096, 4096), Q8_0) == 4096 // 32 * 34 * 4096


def test_the_extra_table_puts_no_two_types_at_one_id():
    rows = load_csv("ggml_types_extra.csv")
    ids = [int(r["id"]) for r in rows]
    assert len(ids) == len(set(ids))
    assert len({r["type"].lower() for r in rows}) == len(rows)
    mainline = {int(t) for t in GGML_QUANT_SIZES}
    names = {t.name.lower() for t in GGMLQuantizationType}
    for r in rows:
        # A gguf-py upgrade that takes one of these ids (or names) would silently shadow the row:
        # the CSV header's collision rule then needs a decision.
        assert int(r["id"]) not in mainline, r
        assert r["type"].lower() not in names, r
        assert "ggml.c" in r["source"], r
    ik = {r["type"] for r in rows if r["source"].startswith("ik_llama.cpp")}
    assert {"IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K", "IQ4_KS", "IQ2_KS", "IQ2_KL", "IQ1_KT",
            "IQ2_KT", "IQ3_KT", "IQ4_KT", "Q8_K_R8", "IQ4_KS_R4", "Q4_0_R8", "IQ4_XS_R8"} <= ik


@pytest.mark.parametrize("name, tid, bpw", [("IQ4_KS", IQ4_KS, 4.25), ("IQ2_K", IQ2_K, 2.375),
                                             ("IQ4_KT", 155, 4.0), ("Q8_K_R8", Q8_K_R8, 8.0625)])
def test_ik_type_names_resolve(name, tid, bpw):
    assert gm.type_id(name.lower()) == tid
    assert gm.bits_per_weight()[name] == bpw
