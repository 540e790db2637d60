"""The model catalog and llama-quantize's type rules: hand arithmetic, published sizes, llama.cpp's
own golden type tables, and the real llama-quantize on synthetic models."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cputune.model import synth
from cputune.model.catalog import CatalogModel, catalog_model, catalog_profile, catalog_tensors, load_catalog
from cputune.core.errors import ConfigError, ModelError
from cputune.model.gguf_model import kv_bytes_per_token, read_raw
from cputune.model.quant_rules import (
    OTHER, ATTENTION_KV_B, QuantModel, allows_quantization, category, fallback, preset_types, presets,
    quant_model, tensor_type, tensor_types, use_more_bits,
)

SNAPSHOTS = Path(__file__).parent / "fixtures" / "llama_quant_snapshots"
GB = 1e9
GIB = 2**30


# --- DeepSeek-R1 671B: parameters by hand (shared/reference/deepseek_r1.md 3.2) -----------------

# Per layer, MLA attention: q_a 7168*1536 + q_b 1536*(128*192) + kv_a_mqa 7168*(512+64)
#   + k_b 128*512*128 + v_b 512*128*128 + o 16384*7168 + norms q_a 1536, kv_a 512, attn/ffn 2*7168
R1_ATTN = 11_010_048 + 37_748_736 + 4_128_768 + 8_388_608 + 8_388_608 + 117_440_512 + 1536 + 512 + 2 * 7168
R1_DENSE_FFN = 3 * 7168 * 18432  # 396,361,728
R1_EXPERT = 3 * 7168 * 2048  # 44,040,192
R1_ROUTER = 7168 * 256 + 256  # ffn_gate_inp + exp_probs_b (e_score_correction_bias)
R1_EMBD = 129280 * 7168  # 926,679,040, token_embd and output each


def test_r1_parameters_by_hand():
    assert R1_ATTN == 187_121_664
    total = 61 * R1_ATTN + 3 * R1_DENSE_FFN + 58 * (257 * R1_EXPERT + R1_ROUTER) + 2 * R1_EMBD + 7168
    # active: 8 routed + 1 shared expert per MoE layer, the output head, no embedding lookup
    active = 61 * R1_ATTN + 3 * R1_DENSE_FFN + 58 * (9 * R1_EXPERT + R1_ROUTER) + R1_EMBD + 7168
    assert total == 671_026_419_200  # "671B"
    assert active == 36_625_618_432  # "36.6B (including 0.9B for the output Head)"
    p = catalog_profile("deepseek-r1", "q4_k_m")
    assert (p.total_params, p.active_params) == (total, active)
    assert (p.n_layer, p.n_expert, p.n_expert_used, p.n_dense_lead, p.mla) == (61, 256, 8, 3, True)


def test_kv_bytes_per_token():
    # R1 MLA, V-less cache: 61 layers x (kv_lora 512 + rope 64) x 2 B (f16)
    assert kv_bytes_per_token(catalog_profile("deepseek-r1", "q4_k_m")) == 61 * 576 * 2 == 70_272
    # Llama-3.1-8B shape: 2 (K, V) x 32 layers x 8 KV heads x 128 head dim x 2 B
    assert kv_bytes_per_token(catalog_profile("r1-distill-llama-8b", "q4_k_m")) == 2 * 32 * 8 * 128 * 2 == 131_072
    # q8_0 cache: 34 bytes per 32 elements (ik_llama.cpp PR #259: 1166.62 MiB at 32768 ctx)
    r1_q8 = kv_bytes_per_token(catalog_profile("deepseek-r1", "q4_k_m"), "q8_0")
    assert r1_q8 * 32768 / 2**20 == pytest.approx(1166.62, abs=0.01)


def test_r1_q4_k_m_mix():
    """The mix in shared/reference/deepseek_r1.md 3.5, tensor by tensor."""
    _, tensors = catalog_tensors("deepseek-r1", "q4_k_m")
    t = {x.name: x for x in tensors}
    gate = sum(x.n_bytes for x in tensors if x.name.endswith("ffn_gate_exps.weight"))
    # 58 MoE layers x (7168/256 blocks x 144 B) x 2048 rows x 256 experts
    assert gate == 58 * 28 * 144 * 2048 * 256 == 122_607_894_528
    down = [t[f"blk.{i}.ffn_down_exps.weight"].type_name for i in range(3, 61)]
    # use_more_bits(i, 61): i < 7, i >= 53, or (i - 7) % 3 == 2; of those, layers 3..60 are MoE
    assert (down.count("Q6_K"), down.count("Q4_K")) == (27, 31)
    assert {t[f"blk.{i}.attn_k_b.weight"].type_name for i in range(61)} == {"Q5_0"}  # rows of 128: no Q4_K
    assert t["blk.5.attn_v_b.weight"].type_name == "Q4_K"  # rows of kv_lora 512
    assert t["output.weight"].type_name == "Q6_K" and t["token_embd.weight"].type_name == "Q4_K"
    routers = [x for x in tensors if x.name.endswith("ffn_gate_inp.weight")]
    assert {x.type_name for x in routers} == {"F32"}
    assert sum(x.n_bytes for x in routers) == 58 * 7168 * 256 * 4  # 0.43 GB


# Published R1 file sizes (shared/reference/deepseek_r1.md 5.1): Q4_K_M is Ollama's
# `deepseek-r1:671b` (404 GB); Q8_0 the willitrunai guide's "~711-713 GB" and ik_llama.cpp #296's
# V3-0324 Q8_0 of 666 GiB; BF16 "~1342 GB / 1.34 TB". Q2_K's "~245 GB" is marked "from memory"
# (unverified) in the reference.
@pytest.mark.parametrize("preset, published", [
    ("q4_k_m", 404 * GB),
    ("q8_0", 712 * GB),
    ("q8_0", 666 * GIB),
    ("bf16", 1342 * GB),
    ("q2_k", 245 * GB),
])
def test_r1_file_size_matches_published(preset, published):
    assert catalog_profile("deepseek-r1", preset).file_bytes == pytest.approx(published, rel=0.01)


# The reference's own re-implementation of the rules (deepseek_r1.md 5.1, weights only, GB).
@pytest.mark.parametrize("preset, gb", [
    ("iq1_s", 133.7), ("iq1_m", 149.1), ("iq2_xxs", 174.6), ("q2_k", 244.1), ("q3_k_m", 319.3),
    ("q4_k_m", 404.5), ("q5_k_m", 475.4), ("q6_k", 550.9), ("q8_0", 713.3), ("bf16", 1342.3),
])
def test_r1_weight_bytes_match_reference_arithmetic(preset, gb):
    assert round(catalog_profile("deepseek-r1", preset).weight_bytes / 1e8) / 10 == gb


@pytest.mark.parametrize("preset, active_gb", [("q2_k", 14.5), ("q4_k_m", 22.3), ("q8_0", 39.2)])
def test_r1_bytes_read_per_token(preset, active_gb):
    # experts at 8/256, token_embd one row, the rest whole (deepseek_r1.md 3.5)
    assert catalog_profile("deepseek-r1", preset).active_bytes_per_token / GB == pytest.approx(active_gb, abs=0.05)


# Ollama `deepseek-r1:<size>` tags are Q4_K_M files (deepseek_r1.md 5.2). Exact bytes for 7b and
# 14b come from an Ollama API dump; the others are published rounded, so the computed size must
# round to them.
@pytest.mark.parametrize("model_id, exact", [
    ("r1-distill-qwen-7b", 4_683_075_271),
    ("r1-distill-qwen-14b", 8_988_112_040),
])
def test_distill_q4_k_m_matches_exact_published_bytes(model_id, exact):
    assert catalog_profile(model_id, "q4_k_m").file_bytes == pytest.approx(exact, rel=0.001)


@pytest.mark.parametrize("model_id, published_gb, digits", [
    ("r1-distill-qwen-1.5b", 1.1, 1),
    ("r1-distill-llama-8b", 4.9, 1),
    ("r1-distill-qwen-32b", 20, 0),
    ("r1-distill-llama-70b", 43, 0),
])
def test_distill_q4_k_m_rounds_to_published(model_id, published_gb, digits):
    assert round(catalog_profile(model_id, "q4_k_m").file_bytes / GB, digits) == published_gb


@pytest.mark.parametrize("model_id, params_b, q8_gb, f16_gb", [
    # the reference's computed columns (deepseek_r1.md 5.2)
    ("r1-distill-qwen-1.5b", 1.78, 1.89, 3.55),
    ("r1-distill-qwen-7b", 7.62, 8.09, 15.2),
    ("r1-distill-llama-8b", 8.03, 8.53, 16.1),
    ("r1-distill-qwen-14b", 14.77, 15.70, 29.5),
    ("r1-distill-qwen-32b", 32.76, 34.81, 65.5),
    ("r1-distill-llama-70b", 70.55, 74.97, 141.1),
])
def test_distill_sizes_match_reference_arithmetic(model_id, params_b, q8_gb, f16_gb):
    q8 = catalog_profile(model_id, "q8_0")
    assert q8.total_params / GB == pytest.approx(params_b, abs=0.005)
    assert q8.weight_bytes / GB == pytest.approx(q8_gb, abs=0.005)
    assert catalog_profile(model_id, "f16").weight_bytes / GB == pytest.approx(f16_gb, abs=0.05)


def test_llama_8b_q4_k_m_by_hand():
    # Llama-3.1-8B shape: embd 4096 (16 K-blocks of 256), ff 14336 (56 blocks), kv 1024, vocab 128256.
    # Q4_K = 144 B and Q6_K = 210 B per 256 weights.
    embd = 16 * 144 * 128256  # token_embd Q4_K
    head = 16 * 210 * 128256  # output Q6_K
    per_layer = (2 * 16 * 144 * 4096  # attn_q, attn_output Q4_K
                 + 16 * 144 * 1024  # attn_k Q4_K
                 + 2 * 16 * 144 * 14336  # ffn_gate, ffn_up Q4_K
                 + 2 * 4096 * 4)  # attn_norm, ffn_norm F32
    more = 16 * 210 * 1024 + 56 * 210 * 4096  # attn_v, ffn_down Q6_K where use_more_bits
    less = 16 * 144 * 1024 + 56 * 144 * 4096  # Q4_K otherwise
    # use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2 -> 4 + 4 + 8 = 16 of 32 layers
    assert sum(use_more_bits(i, 32) for i in range(32)) == 16
    total = embd + head + 32 * per_layer + 16 * more + 16 * less + 4096 * 4 + 64 * 4  # + output_norm, rope_freqs
    assert total == 4_912_898_304
    assert catalog_profile("r1-distill-llama-8b", "q4_k_m").weight_bytes == total


# --- the rules, one at a time -------------------------------------------------------------------


def test_use_more_bits_over_r1_depth():
    # n = 61: 61 // 8 = 7, 7 * 61 // 8 = 53; i < 7 (7) + i >= 53 (8) + i = 9, 12 .. 51 (15)
    layers = [i for i in range(61) if use_more_bits(i, 61)]
    assert len(layers) == 30
    assert layers[:9] == [0, 1, 2, 3, 4, 5, 6, 9, 12] and layers[-9:] == [51, 53, 54, 55, 56, 57, 58, 59, 60]


@pytest.mark.parametrize("want, ne0, got", [
    ("Q4_K", 128, "Q5_0"),  # MLA attn_k_b rows are qk_nope 128 long
    ("Q5_K", 128, "Q5_1"),
    ("Q6_K", 128, "Q8_0"),
    ("Q2_K", 128, "Q4_0"),
    ("Q3_K", 64, "Q4_0"),
    ("IQ1_S", 96, "IQ4_NL"),
    ("Q4_K", 520, "F16"),  # 520 % 32 = 8: not even the 32-block fallback fits
    ("Q8_0", 520, "F16"),
    ("Q4_K", 7168, "Q4_K"),
])
def test_fallback(want, ne0, got):
    assert fallback(want, ne0) == got


def test_categories_and_what_stays_float():
    assert category("blk.0.attn_k_b.weight") == OTHER  # not "attn_k.weight": no attn_k rules
    assert category("blk.0.attn_kv_b.weight") == ATTENTION_KV_B  # legacy MLA: attn_v rules
    assert not allows_quantization("blk.3.ffn_gate_inp.weight", (7168, 256))  # router
    assert not allows_quantization("blk.3.exp_probs_b.bias", (256,))
    assert not allows_quantization("blk.0.attn_q_a_norm.weight", (1536,))
    assert not allows_quantization("blk.0.attn_q.weight", (4096, 1))  # ggml_n_dims ignores trailing 1s
    assert allows_quantization("blk.3.ffn_down_exps.weight", (2048, 7168, 256))


def test_tied_embeddings_follow_the_output_rules():
    m = QuantModel("qwen2", n_layer=28, n_head=12, n_head_kv=2)
    # no output.weight: token_embd is the output too, and gets the output's Q6_K under Q4_K_M
    assert tensor_type("token_embd.weight", (1536, 151936), "q4_k_m", m, tied=True) == "Q6_K"
    assert tensor_type("token_embd.weight", (1536, 151936), "q4_k_m", m) == "Q4_K"
    # output rows not a multiple of 256 drop to Q8_0 rather than a 32-block fallback
    assert tensor_type("output.weight", (320, 512), "q4_k_m", m) == "Q8_0"


def test_seventy_b_gets_q5_k_attn_v():
    # LLM_TYPE_70B (llama, 80 layers, GQA): attn_v Q4_K -> Q5_K. use_more_bits(i, 80): i < 10, i >= 70
    # or (i - 10) % 3 == 2, so layer 11 would be Q4_K and layer 0 is Q6_K.
    meta, tensors = catalog_tensors("r1-distill-llama-70b", "q4_k_m")
    t = {x.name: x.type_name for x in tensors}
    assert quant_model(meta).llm_type_70b
    assert not use_more_bits(11, 80) and t["blk.11.attn_v.weight"] == "Q5_K"
    assert t["blk.0.attn_v.weight"] == "Q6_K"


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(ModelError) as e:  # a model that is not there
        catalog_model("deepseek-r2")
    assert "deepseek-r1" in e.value.hint and "r1-distill-llama-70b" in e.value.hint
    with pytest.raises(ConfigError) as e:
        catalog_profile("deepseek-r1", "q4_k_xl")
    assert "q4_k_m" in e.value.hint
    assert catalog_model("DeepSeek-V3").id == "deepseek-r1"
    assert preset_types("Q4_K") == preset_types("q4_k_m")


def test_catalog_tables_are_complete():
    cat = load_catalog()
    assert {"deepseek-r1", "r1-distill-qwen-1.5b", "r1-distill-qwen-7b", "r1-distill-qwen-14b",
            "r1-distill-qwen-32b", "r1-distill-llama-8b", "r1-distill-llama-70b", "qwen3-30b-a3b"} <= set(cat)
    assert all(m.source and m.hf_repo for m in cat.values())


# --- llama.cpp's own golden tables (tests/snapshots of the pinned llama.cpp) ---------------------


def _snapshot(path: Path) -> dict[str, dict[str, str]]:
    """[PRESET] sections -> {tensor: type} for tensors whose type differs from the preset default."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line[1:line.index("]")], {})
        else:
            name, type_name = line.split()
            current[name] = type_name.upper()
    return sections


@pytest.mark.parametrize("model_id, schema", [
    ("deepseek-r1", "deepseek-v3.1.schema"),  # V3.1 has R1's architecture and shapes
    ("r1-distill-llama-70b", "meta-llama-3.1-70b-instruct.schema"),  # same shapes as Llama-3.3-70B
    ("qwen3.5-397b-a17b", "qwen3.5-397b-a17b.schema"),  # bartowski's tensor list: no MTP block
    ("gpt-oss-120b", "gpt-oss-120b.schema"),  # ggml-org's MXFP4 file; the rules see the experts as 3-D weights
    ("glm-4.6v", "glm-4.6v.schema"),  # GLM-4.6V's language model is glm4moe: ggml-org's 46 blocks, no MTP
])
def test_rules_match_llama_cpp_snapshots(model_id, schema):
    sections = _snapshot(SNAPSHOTS / schema)
    assert len(sections) == 33  # every llama_ftype with a default type
    for preset, expected in sections.items():
        p = preset_types(preset)
        _, tensors = catalog_tensors(model_id, preset)
        got = {t.name: t.type_name for t in tensors
               if allows_quantization(t.name, t.shape) and t.type_name != p.default_type}
        assert got == expected, preset


# --- the real llama-quantize on synthetic models -------------------------------------------------

SYNTH = {
    # R1 in miniature: 1 dense + 7 MoE blocks (8 layers give use_more_bits both values), 16 experts
    # (not 8: the Mixtral rules stay off, as for R1's 256), attn_k_b rows of 64 -> fallbacks.
    "deepseek2": synth.Shape(
        "deepseek2",
        n_layer=8, n_embd=256, n_ff=512, n_dense_lead=1, n_expert=16, n_expert_used=2, n_expert_shared=1,
        n_ff_exp=256, n_head=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_dim=64, qk_rope_dim=32,
        v_head_dim=64, n_vocab=512),
    # 8 experts switch on llama.cpp's "8-expert model" rules (attn_output Q5_K, attn_v Q8_0);
    # attn_k_b rows of 48 are not a multiple of 32 -> F16.
    "deepseek2-8x": synth.Shape(
        "deepseek2",
        n_layer=2, n_embd=256, n_ff=512, n_dense_lead=1, n_expert=8, n_expert_used=2, n_expert_shared=1,
        n_ff_exp=256, n_head=4, q_lora_rank=256, kv_lora_rank=256, qk_nope_dim=48, qk_rope_dim=32,
        v_head_dim=64, n_vocab=512),
    # GQA 4:1 and every row a multiple of 256
    "llama": synth.Shape("llama", n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, n_vocab=512),
    # rows of 320 (a multiple of 32, not 256) and 520 (not of 32): every fallback path; no GQA
    "llama-odd": synth.Shape("llama", n_layer=8, n_embd=320, n_ff=520, n_head=5, n_head_kv=5, n_vocab=512),
}
FILE_PRESETS = ("q4_k_m", "q2_k", "q8_0")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, llama_bin_dir) -> dict[tuple[str, str], Path]:
    """Each SYNTH model in f16 and as the real llama-quantize writes it at each FILE_PRESETS."""
    d = tmp_path_factory.mktemp("catalog_synth")
    quantize = llama_bin_dir / "llama-quantize"
    out = {}
    for name, shape in SYNTH.items():
        f16 = synth.write_model(d / f"{name}-f16.gguf", shape, seed=3)[0]
        out[name, "f16"] = f16
        for preset in FILE_PRESETS:
            out[name, preset] = synth.quantize(f16, d / f"{name}-{preset}.gguf", preset.upper(), quantize, threads=2)
    return out


def _predict(src: Path, preset: str) -> dict[str, str]:
    raw = read_raw(src)
    return tensor_types([(t.name, t.shape, t.type_name) for t in raw.tensors], preset, quant_model(raw.metadata))


@pytest.mark.llama
@pytest.mark.parametrize("preset", FILE_PRESETS)
@pytest.mark.parametrize("model", SYNTH)
def test_rules_predict_every_tensor_llama_quantize_writes(synthetic, model, preset):
    written = read_raw(synthetic[model, preset])
    assert {t.name: t.type_name for t in written.tensors} == _predict(synthetic[model, "f16"], preset)


@pytest.mark.llama
def test_synthetic_models_exercise_the_fallbacks(synthetic):
    ds = _predict(synthetic["deepseek2", "f16"], "q4_k_m")
    assert ds["blk.1.attn_k_b.weight"] == "Q5_0" and ds["blk.1.ffn_gate_inp.weight"] == "F32"
    assert ds["blk.0.ffn_down.weight"] == "Q6_K" and ds["blk.2.ffn_down_exps.weight"] == "Q4_K"
    x8 = _predict(synthetic["deepseek2-8x", "f16"], "q4_k_m")
    assert x8["blk.1.attn_k_b.weight"] == "F16" and x8["blk.1.attn_output.weight"] == "Q5_K"
    odd = _predict(synthetic["llama-odd", "f16"], "q2_k")
    assert odd["blk.0.attn_q.weight"] == "Q4_0"  # Q2_K on rows of 320
    assert odd["blk.0.attn_v.weight"] == "Q4_0"  # no GQA: Q3_K, then the fallback
    assert odd["blk.0.ffn_down.weight"] == "F16" and odd["output.weight"] == "Q8_0"


@pytest.mark.llama
@pytest.mark.parametrize("model", ["deepseek2", "llama"])
def test_catalog_builds_the_file_llama_quantize_writes(synthetic, model):
    """A CatalogModel with the synthetic shape gives the real file's tensors, types and bytes."""
    s = SYNTH[model]
    # One table per architecture: the synthetic shape's hyperparameters are the catalog's, unchanged.
    m = CatalogModel(id=model, name=model, hf_repo="", arch=s.arch, source="test", hparams=s.hparams)
    for preset in FILE_PRESETS:
        written = read_raw(synthetic[model, preset])
        meta, tensors = catalog_tensors(m, preset)
        assert quant_model(meta) == quant_model(written.metadata)
        assert meta["general.file_type"] == written.metadata["general.file_type"]
        assert ({t.name: (t.shape, t.type_name, t.n_bytes) for t in tensors}
                == {t.name: (t.shape, t.type_name, t.n_bytes) for t in written.tensors})


# `llama-quantize --dry-run` prints each tensor's new type without writing (or needing an imatrix):
# "[  57/  75] blk.5.ffn_up.weight  - [ 256, 512, 1, 1], type =    f16, size = 0.25 MiB -> 0.02 MiB (iq1_s)"
# and no "(type)" when the tensor keeps its type (llama-quant.cpp, llama_model_quantize_impl).
_DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^(]*(?:\((\w+)\))?\s*$")
DRY_RUN_PRESETS = sorted({p.name for p in presets().values()} - {p.upper() for p in FILE_PRESETS})


@pytest.mark.llama
@pytest.mark.parametrize("model", SYNTH)
def test_rules_predict_every_other_preset_in_a_dry_run(synthetic, llama_bin_dir, model):
    src = synthetic[model, "f16"]
    for preset in DRY_RUN_PRESETS:
        proc = subprocess.run([str(llama_bin_dir / "llama-quantize"), "--dry-run", str(src), preset],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout[-2000:]
        seen = {}
        for line in proc.stdout.splitlines():
            m = _DRY_RUN_LINE.match(line)
            if m:
                seen[m.group(1)] = (m.group(3) or m.group(2)).upper()
        assert seen == _predict(src, preset), preset
