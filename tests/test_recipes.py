"""Named quantization recipes (configs/quant_recipes.toml): every field checked, rule order, and
the proof that each recipe over the catalog's layout gives its published file size within 2 %."""

from __future__ import annotations

from collections import Counter

import pytest

from cputune.model import catalog
from cputune.core.errors import ConfigError, ModelError
from cputune.model.gguf_model import tensor_bytes, type_id
from cputune.model.quant_rules import QuantModel, allows_quantization, quant_model
from cputune.model.recipes import (
    ENGINES, load_recipes, recipe, recipe_names, recipe_types, unnamed_tensors,
)

GIB = 2**30

GOOD = """
["UD-TEST"]
engine = "llama.cpp"
base = "Q2_K"
models = ["deepseek-r1"]
published_size_gb = 12.5
source = "https://example.org/recipe"
rules = [
  { pattern = 'ffn_down', type = "q6_K" },
  { pattern = 'ffn_.*', type = "q4_K" },
]
"""


def write(tmp_path, text: str):
    p = tmp_path / "recipes.toml"
    p.write_text(text)
    return p


def with_line(line: str, drop: str | None = None) -> str:
    """GOOD with `drop` (a key) removed and `line` added to the table."""
    lines = [ln for ln in GOOD.strip().splitlines() if drop is None or not ln.startswith(drop + " ")]
    return "\n".join(lines[:1] + [line] + lines[1:]) + "\n"


# --- loading and lookup ----------------------------------------------------------------------------

def test_a_good_table_loads(tmp_path):
    path = write(tmp_path, GOOD)
    (r,) = load_recipes(path)["UD-TEST"]
    assert (r.name, r.engine, r.base, r.models) == ("UD-TEST", "llama.cpp", "Q2_K", ("deepseek-r1",))
    assert [(x.pattern, x.type) for x in r.rules] == [("ffn_down", "Q6_K"), ("ffn_.*", "Q4_K")]
    assert r.published_bytes == 12_500_000_000 and r.published_as == "12.5 GB"
    assert r.imatrix is False


def test_lookup_is_case_insensitive_and_by_model(tmp_path):
    path = write(tmp_path, GOOD)
    assert recipe("ud-test", "deepseek-r1", path=path).name == "UD-TEST"
    assert recipe("  Ud-Test ", "DeepSeek-R1", path=path).name == "UD-TEST"
    assert recipe("ud-test", path=path).name == "UD-TEST"  # one variant: no model needed
    assert recipe("ud-test", "deepseek-r1-0528", path=path) is None  # not published for that release
    assert recipe("ud-nothing", "deepseek-r1", path=path) is None
    assert recipe_names(path=path) == ["UD-TEST"]
    assert recipe_names("deepseek-v3", path=path) == []


def test_variants_are_told_apart_by_model(tmp_path):
    two = GOOD.replace('["UD-TEST"]', '[["UD-TEST"]]')
    two += two.replace('"deepseek-r1"', '"deepseek-r1-0528"').replace('"q6_K"', '"q8_0"')
    path = write(tmp_path, two)
    assert len(load_recipes(path)["UD-TEST"]) == 2
    assert recipe("ud-test", "deepseek-r1", path=path).rules[0].type == "Q6_K"
    assert recipe("ud-test", "deepseek-r1-0528", path=path).rules[0].type == "Q8_0"
    with pytest.raises(ConfigError, match="several models") as e:
        recipe("ud-test", path=path)
    assert "deepseek-r1-0528" in e.value.hint


def test_the_shipped_file_loads_and_ud_q2_k_xl_is_found():
    r = recipe("ud-q2_k_xl", "deepseek-r1")
    assert r is not None and r.engine == "llama.cpp" and r.base == "Q2_K"
    assert recipe("iq2_k_r4", "deepseek-r1-0528").engine == "ik_llama"
    assert recipe("iq2_k_r4", "deepseek-v3-0324").published_as == "226.003 GiB"
    assert recipe("q4_k_m", "deepseek-r1") is None  # presets are quant_rules', not recipes


# --- every field checked: the error names the file, the recipe and the field -------------------------

BAD = [
    (with_line('engine = "vllm"', drop="engine"), "engine"),
    (with_line('base = "Q9_K"', drop="base"), "base"),
    (with_line('base = 4', drop="base"), "base"),
    (with_line('base = "F16"', drop="base"), "base"),
    (GOOD[:GOOD.index("rules = [")] + "rules = []\n", "rules"),
    (GOOD[:GOOD.index("rules = [")] + "rules = 'ffn_down=q6_K'\n", "rules"),
    (GOOD.replace("{ pattern = 'ffn_down', type = \"q6_K\" }", "{ pattern = 'ffn_down' }"), "rules[0]"),
    (GOOD.replace("{ pattern = 'ffn_down', type = \"q6_K\" }",
                  "{ pattern = 'ffn_down', type = \"q6_K\", note = \"x\" }"), "rules[0]"),
    (GOOD.replace("'ffn_down'", "'ffn_(down'"), "rules[0]: pattern"),
    (GOOD.replace("'ffn_down'", "''"), "rules[0]: pattern"),
    (GOOD.replace('"q6_K"', '"q9_K"'), "rules[0]: type"),
    (GOOD.replace('"q4_K"', '"iq4_ks"'), "rules[1]: type"),  # an ik_llama type, engine llama.cpp
    (with_line('models = []', drop="models"), "models"),
    (with_line('models = ["deepseek-r1", 3]', drop="models"), "models"),
    (with_line('models = ["deepseek-r1", "DeepSeek-R1"]', drop="models"), "models"),
    (with_line('source = "see the blog"', drop="source"), "source"),
    (with_line('published_size_gb = -1', drop="published_size_gb"), "published_size_gb"),
    (with_line('published_size_gb = 0', drop="published_size_gb"), "published_size_gb"),
    (with_line('published_size_gb = inf', drop="published_size_gb"), "published_size_gb"),
    (with_line('published_size_gb = nan', drop="published_size_gb"), "published_size_gb"),
    (with_line('published_size_gb = true', drop="published_size_gb"), "published_size_gb"),
    (with_line('published_size_bytes = 12.5', drop="published_size_gb"), "published_size_bytes"),
    (with_line('published_size_gib = 12'), "published_size_gib"),  # two sizes
    (with_line('imatrix = "yes"'), "imatrix"),
    (with_line('note = 3'), "note"),
    (with_line('url = "https://example.org"'), "unknown keys url"),
    (GOOD.replace('engine = "llama.cpp"\n', ""), "missing engine"),
]


@pytest.mark.parametrize("text, field", BAD, ids=[f for _, f in BAD])
def test_a_bad_field_is_a_config_error_naming_file_recipe_and_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipes(path)
    msg = str(e.value)
    assert str(path) in msg and "[UD-TEST]" in msg and field in msg, msg


@pytest.mark.parametrize("text, what", [
    (GOOD.replace('["UD-TEST"]', '["Q4_K_M"]'), "preset"),  # a recipe may not shadow a preset
    (GOOD.replace('["UD-TEST"]', '["UD TEST"]'), "one word"),
    (GOOD + GOOD.replace('["UD-TEST"]', '["ud-test"]'), "repeats"),
    ('"UD-TEST" = 3\n', "table"),
    (GOOD.replace('["UD-TEST"]', '[["UD-TEST"]]') * 2, "variant #1"),  # one model in two variants
    ("[UD-TEST\n", "not valid TOML"),
])
def test_bad_tables(tmp_path, text, what):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=what) as e:
        load_recipes(path)
    assert str(path) in str(e.value)


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_recipes(tmp_path / "none.toml")


def test_engines_are_the_two_names():
    assert ENGINES == ("llama.cpp", "ik_llama")


# --- what recipe_types does with the rules -----------------------------------------------------------

TINY = [
    ("token_embd.weight", (256, 1000), "BF16"),
    ("blk.0.attn_norm.weight", (256,), "F32"),
    ("blk.0.attn_k_b.weight", (128, 512, 4), "BF16"),
    ("blk.0.ffn_down.weight", (512, 256), "BF16"),
    ("blk.0.ffn_up.weight", (256, 512), "BF16"),
    ("output.weight", (256, 1000), "BF16"),
]
TINY_QM = QuantModel("llama", n_layer=1, n_head=4, n_head_kv=4)


def tiny(tmp_path, rules: str, base: str = "Q2_K"):
    text = GOOD.replace('base = "Q2_K"', f'base = "{base}"')
    text = text[:text.index("rules = [")] + "rules = [\n" + rules + "\n]\n"
    return recipe("ud-test", "deepseek-r1", path=write(tmp_path, text))


def test_first_matching_rule_wins(tmp_path):
    down_first = tiny(tmp_path, "{ pattern = 'ffn_down', type = \"q6_K\" },\n{ pattern = 'ffn_', type = \"q4_K\" },")
    types = recipe_types(down_first, TINY, TINY_QM)
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.0.ffn_up.weight"] == "Q4_K"
    broad_first = tiny(tmp_path, "{ pattern = 'ffn_', type = \"q4_K\" },\n{ pattern = 'ffn_down', type = \"q6_K\" },")
    assert recipe_types(broad_first, TINY, TINY_QM)["blk.0.ffn_down.weight"] == "Q4_K"


def test_the_pattern_is_searched_not_matched_whole(tmp_path):
    # llama-quantize uses std::regex_search: 'output\.weight' also names blk.N.attn_output.weight,
    # which is why ubergarm's recipes put the attention rules first.
    r = tiny(tmp_path, "{ pattern = 'down', type = \"q8_0\" },")
    assert recipe_types(r, TINY, TINY_QM)["blk.0.ffn_down.weight"] == "Q8_0"
    anchored = tiny(tmp_path, "{ pattern = '^down', type = \"q8_0\" },")
    assert recipe_types(anchored, TINY, TINY_QM)["blk.0.ffn_down.weight"] != "Q8_0"


def test_unnamed_tensors_keep_the_base_presets_type_and_norms_are_never_touched(tmp_path):
    r = tiny(tmp_path, "{ pattern = '.*', type = \"q8_0\" },")
    types = recipe_types(r, TINY, TINY_QM)
    assert types["blk.0.attn_norm.weight"] == "F32"  # a rule reaches only what llama-quantize quantizes
    assert types["output.weight"] == "Q8_0"
    only_ffn = tiny(tmp_path, "{ pattern = 'ffn_', type = \"q8_0\" },")
    types = recipe_types(only_ffn, TINY, TINY_QM)
    assert types["output.weight"] == "Q6_K"  # llama-quantize's Q2_K preset puts the output at Q6_K
    assert unnamed_tensors(only_ffn, TINY) == ["token_embd.weight", "blk.0.attn_k_b.weight", "output.weight"]


def test_a_rule_type_falls_back_on_rows_it_cannot_hold(tmp_path):
    r = tiny(tmp_path, "{ pattern = 'attn_k_b', type = \"q6_K\" },")  # 128-wide rows, 256-blocks
    assert recipe_types(r, TINY, TINY_QM)["blk.0.attn_k_b.weight"] == "Q8_0"  # tensor_type_fallback
    text = GOOD.replace('"llama.cpp"', '"ik_llama"')
    text = text[:text.index("rules = [")] + "rules = [{ pattern = 'attn_k_b', type = \"iq4_ks\" }]\n"
    r = recipe("ud-test", "deepseek-r1", path=write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"recipe UD-TEST: rule attn_k_b=IQ4_KS cannot hold blk\.0\.attn_k_b"):
        recipe_types(r, TINY, TINY_QM)


# --- the proof: each recipe over the catalog's layout gives its published size -----------------------

# Models a recipe names that the catalog does not know yet (kept honest: a typo is not in here).
NOT_IN_CATALOG: set[str] = set()


def shipped():
    return [(r, m) for vs in load_recipes().values() for r in vs for m in r.models]


def n_vocab(m) -> int:
    return getattr(m, "n_vocab", None) or m.hparams["n_vocab"]


def layout_and_types(r, model_id: str):
    """The catalog's layout of `model_id` (catalog_tensors at the base preset) and the recipe's types."""
    meta, tensors = catalog.catalog_tensors(model_id, r.base)
    layout = [(t.name, t.shape, t.type_name) for t in tensors]
    return tensors, layout, recipe_types(r, layout, quant_model(meta))


def computed_bytes(r, model_id: str) -> int:
    m = catalog.catalog_model(model_id)
    tensors, _, types = layout_and_types(r, model_id)
    return (sum(tensor_bytes(t.shape, type_id(types[t.name])) for t in tensors)
            + catalog.header_bytes(len(tensors), n_vocab(m)))


@pytest.mark.parametrize("r, model", shipped(), ids=[f"{r.name}-{m}" for r, m in shipped()])
def test_recipe_size_over_the_catalog_layout_is_the_published_size(r, model):
    try:
        catalog.catalog_model(model)
    except ModelError:
        assert model in NOT_IN_CATALOG, f"{r.name}: model {model!r} is not a catalog id or alias"
        pytest.skip(f"{model} is not in the catalog yet")
    assert r.published_bytes, f"{r.name}: no published size to check"
    got = computed_bytes(r, model)
    err = got / r.published_bytes - 1
    assert abs(err) < 0.02, f"{r.name} on {model}: {got / GIB:.3f} GiB vs {r.published_as} ({err:+.2%})"


def test_every_shipped_recipe_has_a_published_size_and_a_source():
    for r, _ in shipped():
        assert r.published_bytes and r.source.startswith("https://"), r.name


@pytest.mark.parametrize("r, model", [(r, m) for r, m in shipped() if r.engine == "ik_llama"],
                         ids=[f"{r.name}-{m}" for r, m in shipped() if r.engine == "ik_llama"])
def test_ik_recipes_name_every_quantized_tensor_so_their_stand_in_base_types_nothing(r, model):
    _, layout, _ = layout_and_types(r, model)
    assert unnamed_tensors(r, layout) == []


def test_ud_q2_k_xl_on_r1_gives_the_type_counts_of_the_real_file():
    # ik_llama.cpp PR #259, DeepSeek-R1-UD-Q2_K_XL: f32 361, q2_K 171, q3_K 3, q4_K 306, q6_K 184
    # in a file with one attn_kv_b per block (Q6_K) where the catalog has attn_k_b + attn_v_b: the
    # v_b halves stand for it, the k_b halves (Q8_0 by the row fallback) are left out.
    r = recipe("UD-Q2_K_XL", "deepseek-r1")
    tensors, _, types = layout_and_types(r, "deepseek-r1")
    counts = Counter(types[t.name] for t in tensors if "attn_k_b" not in t.name)
    assert counts == {"F32": 361, "Q2_K": 171, "Q3_K": 3, "Q4_K": 306, "Q6_K": 184}


def test_iq2_k_r4_on_v3_0324_gives_the_type_counts_of_the_real_file():
    # ubergarm/DeepSeek-V3-0324-GGUF README log: f32 361, q8_0 612, iq2_k_r4 116, iq3_k_r4 58 in
    # 1147 tensors, 61 of them the attn_kv_b (q8_0) that the catalog's layout has not.
    r = recipe("IQ2_K_R4", "deepseek-v3-0324")
    tensors, _, types = layout_and_types(r, "deepseek-v3-0324")
    assert len(tensors) + 61 == 1147
    assert Counter(types[t.name] for t in tensors) == {"F32": 361, "Q8_0": 612 - 61, "IQ2_K_R4": 116,
                                                       "IQ3_K_R4": 58}


def test_quantized_tensors_all_get_a_quantized_type_under_every_recipe():
    for r, model in shipped():
        _, layout, types = layout_and_types(r, model)
        for name, shape, _ in layout:
            if allows_quantization(name, shape):
                assert types[name] not in ("F32", "F16", "BF16"), (r.name, name)


def test_mix_iq4_k_on_qwen3_30b_gives_the_published_type_counts():
    # ubergarm/Qwen3-30B-A3B-GGUF README: f32 241, q8_0 6, iq4_k 96, iq5_k 48, iq6_k 188
    r = recipe("mix-iq4_k", "qwen3-30b-a3b")
    tensors, _, types = layout_and_types(r, "qwen3-30b-a3b")
    assert Counter(types[t.name] for t in tensors) == {"F32": 241, "Q8_0": 6, "IQ4_K": 96, "IQ5_K": 48,
                                                       "IQ6_K": 188}
