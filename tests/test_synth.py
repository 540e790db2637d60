"""Synthetic GGUF models: read back with gguf-py, then quantized and benchmarked by the real llama.cpp."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, LlamaFileType

from cputune.model import synth
from cputune.core.errors import ConfigError, ProcessFailed

TINY_LLAMA = synth.Shape("llama", n_layer=2, n_embd=256, n_ff=768, n_head=4, n_head_kv=2, n_vocab=512, ctx=2048)
TINY_DS2 = synth.Shape("deepseek2", 
    n_layer=3, n_embd=256, n_ff=768, n_dense_lead=1, n_expert=8, n_expert_used=2, n_expert_shared=1,
    n_ff_exp=256, n_head=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64,
    n_vocab=512, ctx=4096)

# TINY_LLAMA by hand: head_dim 256/4 = 64, kv width 2*64 = 128.
#   embeddings  token_embd + output = 2 * 256*512                                   =   262,144
#   output_norm                                                                      =       256
#   per layer   2 norms 2*256 + q 256*256 + k 256*128 + v 256*128 + o 256*256
#               + gate/up/down 3*256*768 = 512 + 196,608 + 589,824                   =   786,944
LLAMA_PARAMS = 262_144 + 256 + 2 * 786_944
# TINY_DS2 by hand (MLA layout):
#   attention per layer: norms attn/q_a/kv_a/ffn 4*256 = 1,024; q_a 256*256 = 65,536;
#     q_b 256*(4*(64+32)) = 98,304; kv_a_mqa 256*(256+32) = 73,728; k_b 64*256*4 = 65,536;
#     v_b 256*64*4 = 65,536; output (4*64)*256 = 65,536                              =   435,200
#   dense block 0: 3*256*768                                                         =   589,824
#   MoE block: router 256*8 + bias 8 + experts 3*256*256*8 + shared 3*256*256
#              = 2,048 + 8 + 1,572,864 + 196,608                                     = 1,771,528
DS2_PARAMS = 262_144 + 256 + 3 * 435_200 + 589_824 + 2 * 1_771_528
DS2_SHARDS = 3


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("synth")
    split = synth.write_model(d / "ds2-split.gguf", TINY_DS2, seed=7, n_shards=DS2_SHARDS)
    return {
        "llama": synth.write_model(d / "llama.gguf", TINY_LLAMA)[0],
        "deepseek2": synth.write_model(d / "ds2.gguf", TINY_DS2, seed=7)[0],
        "split": split[0],
        "split_files": split,
    }


def kv(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: GGUFReader) -> dict[str, tuple[list[int], Q]]:
    return {t.name: (t.shape.tolist(), t.tensor_type) for t in reader.tensors}


def test_llama_header_and_tensors(models):
    r = GGUFReader(models["llama"])
    assert kv(r, "general.architecture") == "llama"
    assert kv(r, "llama.block_count") == 2
    assert kv(r, "llama.attention.head_count_kv") == 2
    assert kv(r, "llama.rope.dimension_count") == 64
    assert kv(r, "general.file_type") == LlamaFileType.MOSTLY_F16
    assert kv(r, "tokenizer.ggml.model") == "llama"
    assert len(kv(r, "tokenizer.ggml.tokens")) == 512
    assert "<0x0A>" in kv(r, "tokenizer.ggml.tokens")
    t = tensors(r)
    assert t["blk.1.attn_k.weight"] == ([256, 128], Q.F16)
    assert t["blk.1.ffn_down.weight"] == ([768, 256], Q.F16)
    assert t["blk.0.attn_norm.weight"] == ([256], Q.F32)
    assert t["output.weight"] == ([256, 512], Q.F16)
    assert sum(int(x.n_elements) for x in r.tensors) == LLAMA_PARAMS == synth.n_params(TINY_LLAMA)


def test_deepseek2_header_in_mla_layout(models):
    r = GGUFReader(models["deepseek2"])
    expected = {
        "general.architecture": "deepseek2",
        "deepseek2.block_count": 3,
        "deepseek2.leading_dense_block_count": 1,
        "deepseek2.attention.head_count": 4,
        "deepseek2.attention.head_count_kv": 1,
        "deepseek2.attention.key_length": 256 + 32,  # kv_lora + rope
        "deepseek2.attention.value_length": 256,  # kv_lora
        "deepseek2.attention.key_length_mla": 64 + 32,  # nope + rope
        "deepseek2.attention.value_length_mla": 64,
        "deepseek2.attention.q_lora_rank": 256,
        "deepseek2.attention.kv_lora_rank": 256,
        "deepseek2.rope.dimension_count": 32,
        "deepseek2.expert_count": 8,
        "deepseek2.expert_used_count": 2,
        "deepseek2.expert_shared_count": 1,
        "deepseek2.expert_feed_forward_length": 256,
        "deepseek2.expert_gating_func": 2,  # sigmoid
        "deepseek2.rope.scaling.type": "yarn",
    }
    assert {k: kv(r, k) for k in expected} == expected
    assert kv(r, "deepseek2.expert_weights_scale") == pytest.approx(2.5)
    assert kv(r, "deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.1)


def test_deepseek2_tensors(models):
    r = GGUFReader(models["deepseek2"])
    t = tensors(r)
    assert t["blk.0.attn_k_b.weight"] == ([64, 256, 4], Q.F16)  # {nope, kv_lora, n_head}
    assert t["blk.0.attn_v_b.weight"] == ([256, 64, 4], Q.F16)  # {kv_lora, v_dim, n_head}
    assert t["blk.0.attn_q_b.weight"] == ([256, 4 * 96], Q.F16)
    assert t["blk.0.attn_kv_a_mqa.weight"] == ([256, 288], Q.F16)
    assert t["blk.0.attn_output.weight"] == ([256, 256], Q.F16)
    assert "blk.0.attn_kv_b.weight" not in t
    # block 0 is the leading dense block
    assert t["blk.0.ffn_gate.weight"] == ([256, 768], Q.F16)
    assert "blk.0.ffn_gate_exps.weight" not in t and "blk.0.ffn_gate_inp.weight" not in t
    for i in (1, 2):
        assert f"blk.{i}.ffn_gate.weight" not in t
        assert t[f"blk.{i}.ffn_gate_exps.weight"] == ([256, 256, 8], Q.F16)  # n_expert is the last dim
        assert t[f"blk.{i}.ffn_up_exps.weight"] == ([256, 256, 8], Q.F16)
        assert t[f"blk.{i}.ffn_down_exps.weight"] == ([256, 256, 8], Q.F16)
        assert t[f"blk.{i}.ffn_gate_inp.weight"] == ([256, 8], Q.F32)
        assert t[f"blk.{i}.exp_probs_b.bias"] == ([8], Q.F32)
        assert t[f"blk.{i}.ffn_down_shexp.weight"] == ([256, 256], Q.F16)
    assert sum(int(x.n_elements) for x in r.tensors) == DS2_PARAMS == synth.n_params(TINY_DS2)


def test_split_shards_hold_all_tensors(models):
    files = models["split_files"]
    assert [p.name for p in files] == [f"ds2-split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = GGUFReader(models["deepseek2"])
    seen = {}
    for no, path in enumerate(files):
        r = GGUFReader(path)
        assert kv(r, "split.no") == no
        assert kv(r, "split.count") == DS2_SHARDS
        assert kv(r, "split.tensors.count") == len(whole.tensors)
        assert r.tensors, "every shard holds a tensor"
        seen.update({t.name: t.data.tobytes() for t in r.tensors})
    # same seed: the shards carry exactly the single file's tensors, bytes included
    assert seen == {t.name: t.data.tobytes() for t in whole.tensors}
    assert kv(GGUFReader(files[0]), "general.architecture") == "deepseek2"


def test_seed_decides_the_bytes(tmp_path):
    a = synth.write_model(tmp_path / "a.gguf", TINY_LLAMA, seed=3)[0].read_bytes()
    b = synth.write_model(tmp_path / "b.gguf", TINY_LLAMA, seed=3)[0].read_bytes()
    c = synth.write_model(tmp_path / "c.gguf", TINY_LLAMA, seed=4)[0].read_bytes()
    assert a == b != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp left


def test_f32_weights(tmp_path):
    r = GGUFReader(synth.write_model(tmp_path / "f32.gguf", TINY_LLAMA, dtype="f32")[0])
    assert kv(r, "general.file_type") == LlamaFileType.ALL_F32
    assert {t.tensor_type for t in r.tensors} == {Q.F32}
    w = r.tensors[1].data  # blk.0.attn_norm is ones, the rest small and finite
    assert (w == 1).all()
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").data
    assert 0 < abs(q).max() < 1


@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
@pytest.mark.parametrize("target", [6_000_000, 64_000_000, 1_000_000_000, 8_000_000_000])
def test_shape_for_size_is_close_and_proportioned(arch, target):
    s = synth.shape_for_size(arch, target, "f16")
    assert abs(synth.estimate_bytes(s, "f16") - target) <= 0.10 * target
    assert s.n_embd % 256 == 0 and s.n_ff % 256 == 0
    if arch == "llama":
        assert 2.4 <= s.n_ff / s.n_embd <= 3.0
        assert s.n_head_kv < s.n_head and s.n_head % s.n_head_kv == 0
    else:
        assert 4 <= s.n_expert <= 64 and 2 <= s.n_expert_used <= 8 and s.n_expert_used < s.n_expert
        assert (s.n_expert_shared, s.n_dense_lead) == (1, 1)
        assert s.n_ff_exp % 256 == 0 and s.kv_lora_rank % 256 == 0 and s.q_lora_rank % 256 == 0
        assert (s.n_head * s.v_head_dim) % 256 == 0
        # DeepSeek's own latent (K 576 = 512 + 64 rope, V 512), which ik_llama.cpp requires.
        assert (s.kv_lora_rank, s.qk_rope_dim) == (512, 64) and s.n_head % 4 == 0 and synth.ik_loadable(s)
    if target >= 1_000_000_000:
        assert s.n_embd >= 1024 and (arch == "llama" or s.n_expert >= 16)


@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
def test_shape_for_size_matches_the_written_file(arch, tmp_path):
    target = 8_000_000
    shape = synth.shape_for_size(arch, target)
    path = synth.write_model(tmp_path / "m.gguf", shape)[0]
    assert abs(path.stat().st_size - target) <= 0.10 * target
    assert abs(path.stat().st_size - synth.estimate_bytes(shape)) <= 0.01 * target


def test_bad_requests_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="below 259"):
        synth.Shape("llama", n_layer=1, n_embd=256, n_ff=768, n_head=4, n_head_kv=1, n_vocab=100)
    with pytest.raises(ConfigError, match="lite"):
        TINY_DS2.replace(n_layer=27)
    with pytest.raises(ConfigError, match="within 10%"):
        synth.shape_for_size("deepseek2", 1_000_000)
    with pytest.raises(ConfigError):
        synth.write_model(tmp_path / "x.gguf", TINY_LLAMA, dtype="q4_0")


# --- the real llama.cpp -------------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
@pytest.mark.parametrize("qtype, ftype, big_type", [
    ("q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    ("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
])
def test_llama_quantize(models, llama_bin_dir, tmp_path, arch, qtype, ftype, big_type):
    dst = synth.quantize(models[arch], tmp_path / "q.gguf", qtype, llama_bin_dir / "llama-quantize", threads=2)
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]
    r = GGUFReader(dst)
    assert kv(r, "general.file_type") == ftype
    t = tensors(r)
    gate = "blk.1.ffn_gate_exps.weight" if arch == "deepseek2" else "blk.1.ffn_gate.weight"
    assert t[gate][1] == big_type
    assert t["blk.1.ffn_norm.weight"][1] == Q.F32
    if arch == "deepseek2":
        assert t["blk.1.ffn_gate_inp.weight"][1] == Q.F32  # the router is never quantized
        assert t["blk.1.attn_k_b.weight"][0] == [64, 256, 4]
    assert sum(int(x.n_elements) for x in r.tensors) == (LLAMA_PARAMS if arch == "llama" else DS2_PARAMS)


@pytest.mark.llama
def test_llama_quantize_options_reach_the_tool(models, llama_bin_dir, tmp_path):
    """--pure (benchmarks/type_rates.py): every matrix at the one type, the output's Q6_K rule off."""
    plain = tensors(GGUFReader(synth.quantize(models["llama"], tmp_path / "a.gguf", "Q4_K_M",
                                              llama_bin_dir / "llama-quantize")))
    pure = tensors(GGUFReader(synth.quantize(models["llama"], tmp_path / "b.gguf", "Q4_K_M",
                                             llama_bin_dir / "llama-quantize", options=("--pure",))))
    assert plain["output.weight"][1] == Q.Q6_K
    assert {t for n, (_, t) in pure.items() if n.endswith(".weight") and not n.endswith("norm.weight")} == {Q.Q4_K}


@pytest.mark.llama
def test_llama_quantize_failure_is_reported(models, llama_bin_dir, tmp_path):
    with pytest.raises(ProcessFailed) as info:
        synth.quantize(models["llama"], tmp_path / "q.gguf", "NOT_A_TYPE", llama_bin_dir / "llama-quantize")
    e = info.value
    assert e.argv[0].endswith("llama-quantize") and "NOT_A_TYPE" in e.argv
    assert e.returncode not in (0, None)
    assert e.output_tail
    assert list(tmp_path.iterdir()) == []


@pytest.mark.llama
@pytest.mark.parametrize("name, params", [("llama", LLAMA_PARAMS), ("deepseek2", DS2_PARAMS), ("split", DS2_PARAMS)])
def test_llama_bench_runs_the_model(models, llama_bin_dir, name, params):
    argv = [str(llama_bin_dir / "llama-bench"), "-m", str(models[name]), "-p", "16", "-n", "4", "-r", "1",
            "-t", "1", "-o", "json", "-lm", "none"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [(row["n_prompt"], row["n_gen"]) for row in rows] == [(16, 0), (0, 4)]
    for row in rows:
        assert row["avg_ts"] > 0
        assert row["model_n_params"] == params
