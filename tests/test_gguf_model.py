"""The GGUF header reader and the per-token arithmetic, on generated files and hand-built headers."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from cputune.model import gguf_model as gm
from cputune.model import synth
from cputune.cli import cli
from cputune.core.errors import GGUFError

F16, F32, Q8_0 = 1, 0, 8
DS = synth.Shape("deepseek2", n_layer=4, n_embd=256, n_ff=512, n_dense_lead=1, n_expert=8,
                          n_expert_used=2, n_expert_shared=1, n_ff_exp=128, n_head=4, q_lora_rank=64,
                          kv_lora_rank=64, qk_nope_dim=32, qk_rope_dim=16, v_head_dim=32, n_vocab=1000)
LLAMA = synth.Shape("llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=1000)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    return {"ds": synth.write_model(d / "ds.gguf", DS, n_shards=2),
            "llama": synth.write_model(d / "llama.gguf", LLAMA)}


def t(name, shape, tid=F16):
    return gm.TensorInfo(name, "F16" if tid == F16 else "F32", tid, shape,
                         __import__("math").prod(shape), gm.tensor_bytes(shape, tid))


def test_split_deepseek2_reads_as_one_model_from_any_shard(files):
    a, b = (gm.read_model(p) for p in files["ds"])
    assert a == b and a.n_shards == 2
    assert a.file_bytes == sum(p.stat().st_size for p in files["ds"])
    assert (a.arch, a.n_layer, a.n_expert, a.n_expert_used, a.n_expert_shared, a.n_dense_lead) == \
        ("deepseek2", 4, 8, 2, 1, 1)
    assert a.mla and a.n_vocab == 1000


def test_deepseek2_active_bytes_follow_the_routing(files):
    m = gm.read_model(files["ds"][0])
    # 3 MoE layers x (gate, up, down) x 256 x 128 x 8 experts x 2 B (f16) = 4,718,592 B of experts.
    assert m.expert_bytes == 3 * 3 * 256 * 128 * 8 * 2
    # Read per token: everything, minus 6/8 of the experts, minus the embedding but one row.
    embd = 256 * 1000 * 2
    assert m.active_bytes_per_token == m.weight_bytes - m.expert_bytes * 6 // 8 - embd + embd // 1000
    assert 0 < m.active_fraction < 1 and m.active_params < m.total_params
    # MLA, V-less: per layer one latent of kv_lora + rope = 64 + 16 elements; 4 layers; f16.
    assert (m.kv_k_elems_per_token, m.kv_v_elems_per_token) == (4 * 80, 0)
    assert gm.kv_bytes_per_token(m) == 4 * 80 * 2
    assert gm.kv_bytes_per_token(m, "q8_0") == pytest.approx(4 * 80 * 34 / 32)


def test_dense_llama_reads_all_but_the_embedding(files):
    m = gm.read_model(files["llama"][0])
    assert not m.is_moe and m.expert_bytes == 0
    embd = 256 * 1000 * 2
    assert m.active_bytes_per_token == m.weight_bytes - embd + embd // 1000
    # GQA: per layer K and V of n_head_kv (2) x head_dim (64); 2 layers.
    assert (m.kv_k_elems_per_token, m.kv_v_elems_per_token) == (2 * 2 * 64, 2 * 2 * 64)
    # FLOPs: 2 x the matrices read per token (output included, embedding lookup not).
    matrices = sum(x.n_params for x in gm.read_raw(files["llama"][0]).tensors
                   if len(x.shape) == 2 and x.name != "token_embd.weight")
    assert m.flops_per_token == 2 * matrices


def header(**extra):
    meta = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
            "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4}
    meta.update(extra)
    return meta


def test_tied_output_is_read_whole():
    tensors = [t("token_embd.weight", (64, 100)), t("blk.0.attn_q.weight", (64, 64)),
               t("blk.1.attn_q.weight", (64, 64))]
    m = gm.profile_from(header(), tensors, file_bytes=0)
    embd = 64 * 100 * 2
    assert m.active_bytes_per_token == embd // 100 + embd + 2 * 64 * 64 * 2


def test_nextn_layers_are_skipped_and_expert_use_may_vary_per_layer():
    # block_count counts the MTP block (llama.cpp's n_layer_all; GLM-4.5: 93 = 92 + 1 nextn)
    meta = header(**{"llama.block_count": 3, "llama.expert_count": 4, "llama.expert_used_count": [1, 2, 2],
                     "llama.nextn_predict_layers": 1})
    tensors = [t("output.weight", (64, 100)), t("blk.0.ffn_up_exps.weight", (64, 32, 4)),
               t("blk.1.ffn_up_exps.weight", (64, 32, 4)), t("blk.2.ffn_up_exps.weight", (64, 32, 4))]
    m = gm.profile_from(meta, tensors, file_bytes=0)
    e = 64 * 32 * 4 * 2
    assert m.active_bytes_per_token == 64 * 100 * 2 + e // 4 + e * 2 // 4  # blk.2 is the MTP block
    assert m.weight_bytes == 64 * 100 * 2 + 3 * e  # still on disk
    assert m.n_layer == 2  # the blocks run per token


def test_unknown_tensor_type_is_reported_not_fatal():
    odd = gm.TensorInfo("blk.0.attn_q.weight", "unknown(250)", 250, (64, 64), 4096, None)
    m = gm.profile_from(header(), [t("output.weight", (64, 100)), odd], file_bytes=0)
    assert m.unknown_types == ("unknown(250)",) and m.weight_bytes == 64 * 100 * 2


LAYERS = [t("output.weight", (64, 100)), t("blk.0.attn_q.weight", (64, 64)), t("blk.1.attn_q.weight", (64, 64))]


@pytest.mark.parametrize("extra, words", [
    ({"llama.attention.head_count_kv": -3840}, "llama.attention.head_count_kv is -3840, outside 0..4,096"),
    ({"llama.block_count": 0}, "llama.block_count is 0, outside 1..512"),
    ({"llama.block_count": 1 << 26}, "llama.block_count is 67108864, outside 1..512"),
    ({"llama.block_count": 40}, "llama.block_count is 40, but the tensors hold blocks 0..1 only"),
    ({"llama.embedding_length": "64"}, "llama.embedding_length is a string ('64'), not an integer"),
    ({"llama.embedding_length": float("nan")}, "llama.embedding_length is a float (nan), not an integer"),
    ({"llama.context_length": True}, "llama.context_length is a boolean (True), not an integer"),
    ({"llama.attention.head_count": [4, 4, 4]}, "an array of 3 values, but the model has 2 layers"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count is 0, but attention needs heads"),
    ({"llama.expert_count": 4, "llama.expert_used_count": 5}, "is 5, more than the model's 4 experts"),
    ({"llama.expert_used_count": 2}, "is 2, more than the model's 0 experts"),
    ({"llama.expert_count": 4}, "but the model routes to 4 experts"),
    ({"llama.leading_dense_block_count": 3}, "llama.leading_dense_block_count is 3, outside 0..2"),
    ({"general.file_type": [1]}, "general.file_type is an array of 1 values, not an integer"),
    ({"general.architecture": "clip"}, "is a vision projector (mmproj), not a language model"),
])
def test_hyperparameters_of_the_wrong_type_or_out_of_range_are_refused(extra, words):
    with pytest.raises(GGUFError, match=re.escape(words)):
        gm.profile_from(header(**extra), LAYERS, file_bytes=0, path="m.gguf")


def test_a_model_without_attention_keys_has_no_kv_cache():
    meta = header()
    del meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    m = gm.profile_from(meta, LAYERS, file_bytes=0)  # a recurrent model (mamba, rwkv) reads this way
    assert (m.n_head, m.kv_k_elems_per_token, m.kv_v_elems_per_token) == (0, 0, 0)


def test_headers_that_size_nothing_are_refused():
    with pytest.raises(GGUFError, match="holds no tensors"):
        gm.profile_from(header(), [], file_bytes=0)
    odd = gm.TensorInfo("blk.0.attn_q.weight", "unknown(250)", 250, (64, 64), 4096, None)
    with pytest.raises(GGUFError, match=re.escape("none of its 1 tensors has a type this cputune knows")):
        gm.profile_from(header(), [odd], file_bytes=0)


def test_bad_files_are_one_clear_error(tmp_path, files):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(GGUFError, match="is not a GGUF file"):
        gm.read_model(tmp_path / "x.gguf")
    data = files["llama"][0].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFError, match="is truncated"):
        gm.read_model(tmp_path / "cut.gguf")
    lone = tmp_path / "m-00001-of-00003.gguf"
    lone.write_bytes(data)
    with pytest.raises(GGUFError, match="missing 2 of 3 shards"):
        gm.read_model(lone)
    with pytest.raises(GGUFError, match="does not exist"):
        gm.read_model(tmp_path / "nope.gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(GGUFError, match="is a folder, not a GGUF file"):
        gm.read_model(tmp_path / "dir.gguf")
    with pytest.raises(GGUFError, match="is a character device, not a GGUF file"):
        gm.read_model("/dev/zero")


def test_long_arrays_are_skipped_but_counted(files, monkeypatch):
    monkeypatch.setattr(gm, "MAX_ARRAY_KEPT", 100)
    raw = gm.read_raw(files["llama"][0])
    assert raw.metadata["tokenizer.ggml.tokens"] == ("<array>", 8, 1000)  # 8 = string


def test_reader_agrees_with_gguf_py(files):
    from gguf import GGUFReader

    for path in files["ds"]:
        ours = {x.name: (x.shape, x.type_id, x.n_bytes) for x in gm.read_raw(path).tensors}
        theirs = {x.name: (tuple(int(v) for v in x.shape), int(x.tensor_type), int(x.n_bytes))
                  for x in GGUFReader(path).tensors}
        assert ours == theirs


def test_cli_inspect(files):
    r = CliRunner().invoke(cli, ["inspect", str(files["ds"][1]), "--json"], catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.model/1" and doc["model"]["n_expert"] == 8
    assert doc["kv_bytes_per_token_f16"] == 640
    table = CliRunner().invoke(cli, ["inspect", str(files["ds"][0])], catch_exceptions=False)
    assert "8 experts, 2 used per token, 1 shared" in table.stdout
    bad = CliRunner().invoke(cli, ["inspect", "/etc/hostname"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: /etc/hostname is not a GGUF file")
    assert "Traceback" not in bad.output


HOSTILE_NAME = "[red]x[/red]\x1b[2J\nfake line"


def test_inspect_shows_a_hostile_general_name_as_written_and_json_keeps_it(tmp_path, monkeypatch):
    """general.name comes from the file: in the table its markup is shown, not applied, and its
    control characters are escapes (an ESC would clear the terminal, a newline fake a row)."""
    monkeypatch.setattr(synth.GGUFWriter, "add_name",
                        lambda self, name: self.add_string("general.name", HOSTILE_NAME))
    (path,) = synth.write_model(tmp_path / "hostile.gguf", LLAMA)
    table = CliRunner().invoke(cli, ["inspect", str(path)], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    assert "\x1b" not in table.stdout and "fake line" not in table.stdout.replace("\\nfake line", "")
    assert "[red]x[/red]\\x1b[2J\\nfake line (llama)" in table.stdout
    doc = json.loads(CliRunner().invoke(cli, ["inspect", str(path), "--json"], catch_exceptions=False).stdout)
    assert doc["model"]["name"] == HOSTILE_NAME
