"""configs/architectures: each table is checked against the real llama.cpp, which is the proof the
table matches llama-arch.cpp / the model's load_arch_tensors: a tiny model synth writes from it is
quantized by llama-quantize, benchmarked by llama-bench and served by llama-server; the catalog's
models of the architecture are laid out by the same table and match their published files."""

from __future__ import annotations

import re
from dataclasses import replace as dataclasses_replace
from pathlib import Path

import pytest

from cputune.engine import llama_bench
from cputune.model import architectures, catalog, gguf_model, synth
from cputune.core.errors import ConfigError
from cputune.model.gguf_model import read_raw
from cputune.model.quant_rules import quant_model, tensor_types
from helpers import complete, serving

SYNTH_ARCHS = synth.synth_archs()


def tiny_shape(arch: str) -> synth.Shape:
    """The smallest shape of the architecture's own proportions: 256 wide, two blocks past the
    fewest it allows, 8 experts where it has experts."""
    _, experts, min_layer, avoid = synth._synth_rules(arch)
    layers = next(n for n in range(min_layer + 1, min_layer + 10) if n not in avoid)
    return synth.shape_at(arch, 256, layers, 8 if 8 in experts else experts[0], 512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, llama_bin_dir) -> dict[str, tuple[synth.Shape, Path, Path]]:
    """(shape, f16 file, Q4_K_M file by the real llama-quantize) per architecture synth writes."""
    d = tmp_path_factory.mktemp("archs")
    out = {}
    for arch in SYNTH_ARCHS:
        shape = tiny_shape(arch)
        f16 = synth.write_model(d / f"{arch}-f16.gguf", shape, seed=5)[0]
        q = synth.quantize(f16, d / f"{arch}-q4_k_m.gguf", "Q4_K_M", llama_bin_dir / "llama-quantize", threads=2)
        out[arch] = (shape, f16, q)
    return out


def test_the_families_builders_run_have_tables():
    have = set(architectures.known())
    assert {"llama", "qwen2", "deepseek2", "qwen3moe"} <= have
    assert {"llama", "deepseek2", "qwen3moe"} <= set(SYNTH_ARCHS)


@pytest.mark.parametrize("arch", architectures.known())
def test_every_table_lays_out_its_synthetic_or_catalog_shape(arch):
    """Every table evaluates: shapes positive, names unique, roles known, keys for every hparam read."""
    a = architectures.architecture(arch)
    shapes = [tiny_shape(arch).hparams] if arch in SYNTH_ARCHS else []
    shapes += [m.hparams for m in catalog.load_catalog().values() if m.arch == arch]
    assert shapes, f"{arch}: neither synth nor the catalog uses this table"
    for hp in shapes:
        tensors = a.tensors(hp)
        names = [t.name for t in tensors]
        assert len(names) == len(set(names))
        assert all(t.role in architectures.ROLES and min(t.ne) >= 1 for t in tensors)
        assert all(a.role_of(n) is not None for n in names)
        meta = a.metadata(hp)
        assert meta[f"{arch}.block_count"] == hp["n_layer"] and meta[f"{arch}.embedding_length"] == hp["n_embd"]


@pytest.mark.llama
@pytest.mark.parametrize("arch", SYNTH_ARCHS)
def test_llama_quantize_writes_what_the_table_and_rules_say(tiny, arch):
    shape, f16, q = tiny[arch]
    want = {t.name: t.ne for t in shape.tensors()}
    written = read_raw(q)
    assert {t.name: tuple(t.shape) for t in written.tensors} == want
    src = read_raw(f16)
    predicted = tensor_types([(t.name, t.shape, t.type_name) for t in src.tensors], "Q4_K_M",
                             quant_model(src.metadata))
    assert {t.name: t.type_name for t in written.tensors} == predicted
    # The catalog, given the same hyperparameters, lays out the same file.
    m = catalog.CatalogModel(id=arch, name=arch, hf_repo="", arch=arch, source="test", hparams=shape.hparams)
    _, tensors = catalog.catalog_tensors(m, "Q4_K_M")
    assert ({t.name: (t.shape, t.type_name, t.n_bytes) for t in tensors}
            == {t.name: (tuple(t.shape), t.type_name, t.n_bytes) for t in written.tensors})
    # inspect names every tensor's role from the same table
    prof = gguf_model.read_model(q)
    assert prof.arch == arch and prof.n_layer == shape.n_layer
    assert all(architectures.role_of(arch, t.name) for t in written.tensors)
    assert prof.total_params == synth.n_params(shape)


@pytest.mark.llama
@pytest.mark.parametrize("arch", SYNTH_ARCHS)
def test_llama_bench_runs_every_synthetic_architecture(tiny, llama_bin_dir, arch):
    shape, _, q = tiny[arch]
    rows = llama_bench.run(llama_bench.bench_argv(llama_bin_dir / "llama-bench", q, threads=(2,),
                                                  n_prompt=(16,), n_gen=(4,), reps=1))
    assert [r.test for r in rows] == ["pp16", "tg4"]
    assert all(r.avg_ts > 0 for r in rows)
    assert rows[0].model_n_params == synth.n_params(shape)


@pytest.mark.llama
@pytest.mark.parametrize("arch", SYNTH_ARCHS)
def test_llama_server_completes_with_every_synthetic_architecture(tiny, llama_bin_dir, tmp_path, arch):
    shape, _, q = tiny[arch]
    with serving(llama_bin_dir, q, tmp_path / "server.log", "-lv", "4") as server:
        body = complete(server)
        assert body["tokens_predicted"] == 4 and isinstance(body["content"], str)
    info = dict(re.findall(r"print_info: (\w+)\s+= (.+)", server.log_path.read_text()))
    assert info["arch"] == arch and info["n_layer"] == str(shape.n_layer)
    if "n_expert" in shape.hparams:
        assert int(info["n_expert"]) == shape.n_expert and int(info["n_expert_used"]) == shape.n_expert_used


CATALOG_FILES = [(m.id, f) for m in catalog.load_catalog().values() for f in m.files]


@pytest.mark.parametrize("model_id, published", CATALOG_FILES,
                         ids=[f"{mid}-{f.quant}" for mid, f in CATALOG_FILES])
def test_catalog_sizes_are_within_two_percent_of_published_files(model_id, published):
    prof = catalog.catalog_profile(model_id, published.quant)
    assert abs(prof.file_bytes - published.bytes) <= 0.02 * published.bytes, (
        f"{model_id} {published.quant}: {prof.file_bytes / 1e9:.2f} GB laid out, "
        f"{published.bytes / 1e9:.2f} GB published ({published.source})")


def test_every_new_family_in_the_catalog_has_a_published_size():
    for m in catalog.load_catalog().values():
        if m.arch not in ("llama", "qwen2"):
            assert m.files or len(m.no_published_file) > 20, (
                f"{m.id}: give it a published file size (files = [...]) to test the layout on, or say "
                "why there is none (no_published_file)")


# --- the table format ---------------------------------------------------------------------------

BASE = {"arch": "toy", "source": "test", "required": ["n_layer", "n_embd", "n_vocab"],
        "layer": [{"name": "blk.{i}.w.weight", "ne": ["n_embd", "n_embd"], "role": "ffn"}]}


@pytest.mark.parametrize("change, message", [
    ({"source": ""}, "says where its shapes come from"),
    ({"layer": [{"name": "blk.{i}.w.weight", "ne": ["n_embd", "__import__('os')"], "role": "ffn"}]},
     "only min, max, round_to may be called"),
    ({"layer": [{"name": "blk.{i}.w.weight", "ne": ["n_embd.real"], "role": "ffn"}]}, "Attribute is not allowed"),
    ({"layer": [{"name": "blk.{i}.w.weight", "ne": ["n_hidden"], "role": "ffn"}]}, "not a hyperparameter of toy"),
    ({"layer": [{"name": "blk.{i}.w.weight", "ne": ["n_embd"], "role": "mystery"}]}, "role 'mystery'"),
    ({"layer": [{"name": "w.weight", "ne": ["n_embd"], "role": "ffn"}]}, "per-layer tensors are named"),
    ({"layer": []}, "per-layer tensors"),
    ({"required": ["n_layer", "n_embd"]}, "n_vocab must be required"),
    ({"keys": {"x": [1, 2]}}, "a key's value is"),
    ({"surprise": 1}, "unknown keys surprise"),
])
def test_bad_tables_are_one_clear_error(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        architectures.parse_architecture({**BASE, **change}, "toy.toml")


def test_hyperparameters_are_checked_by_type_range_and_the_tables_checks():
    a = architectures.architecture("llama")
    good = dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=512)
    assert a.hparams(good)["head_dim"] == 64
    for bad, message in [({"n_layer": 0}, "n_layer must be positive"), ({"n_embd": 256.0}, "not a int"),
                         ({"n_head_kv": 3}, "multiple of n_head_kv"), ({"tied": 1}, "not a bool"),
                         ({"n_experts": 8}, "not llama hyperparameters"), ({"n_layer": True}, "not a int")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            a.hparams({**good, **bad})
    with pytest.raises(ConfigError, match="needs n_vocab"):
        a.hparams({k: v for k, v in good.items() if k != "n_vocab"})


def test_expressions_evaluate_only_arithmetic():
    e = architectures.Expr("round_to(w * 2.7, 256) if w >= 1024 else max(1, w // 4)", "test")
    assert e({"w": 4096}) == 11008 and e({"w": 256}) == 64
    with pytest.raises(ConfigError, match="fails"):
        architectures.Expr("w // 0", "test")({"w": 1})


# --- sliding-window layers ----------------------------------------------------------------------

def test_window_layers_cap_the_cache_and_the_attention_at_depth():
    """A table's [attention] rules (llama_hparams::set_swa_pattern) mark every other layer as
    windowed: the KV cache and attention work of those layers stop growing at the window."""
    a = architectures.parse_architecture({
        **BASE, "required": ["n_layer", "n_embd", "n_vocab"], "attention": {"swa_pattern": 2, "swa_window": 128},
    }, "toy.toml")
    assert a.swa_layers({}, 4) == ([True, False, True, False], 128)
    assert a.swa_layers({"toy.attention.sliding_window": 64}, 4)[1] == 64
    assert a.swa_layers({"toy.attention.sliding_window_pattern": [True, True, False, False]}, 4)[0] == [
        True, True, False, False]
    prof = gguf_model.read_model(synth.write_model(
        Path(__import__("tempfile").mkdtemp()) / "l.gguf", tiny_shape("llama"))[0])
    half = dataclasses_replace(prof, n_swa=128, swa_kv_k_elems_per_token=prof.kv_k_elems_per_token // 2,
                               swa_kv_v_elems_per_token=prof.kv_v_elems_per_token // 2,
                               swa_attn_flops_per_ctx_token=prof.attn_flops_per_ctx_token // 2)
    per_tok = gguf_model.kv_bytes_per_token(prof)
    assert gguf_model.kv_cache_bytes(prof, 10_000) == per_tok * 10_000
    assert gguf_model.kv_cache_bytes(half, 10_000) == pytest.approx(
        per_tok / 2 * 10_000 + per_tok / 2 * (128 + gguf_model.SWA_CACHE_SLACK_TOKENS))
    assert gguf_model.kv_read_bytes(half, 100) == pytest.approx(per_tok * 100)  # inside the window
    assert gguf_model.attn_flops_at(half, 4096) == pytest.approx(
        prof.attn_flops_per_ctx_token / 2 * (4096 + 128))


def test_inspect_gives_bytes_by_role_from_the_table(tiny):
    shape, _, q = tiny["deepseek2"]
    prof = gguf_model.read_model(q)
    assert prof.roles_from_table and "unknown" not in prof.bytes_by_role
    assert sum(prof.bytes_by_role.values()) == prof.weight_bytes
    assert prof.bytes_by_role["expert"] == prof.expert_bytes


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["gpt-oss", "qwen3moe"])
def test_synth_sizes_a_quantized_model_by_the_quantizer_rules(tmp_path, llama_bin_dir, arch):
    """`synth --size 24MB --quant q4_k_m` lands near 24 MB although gpt-oss's 2880-style rows
    fall back from Q4_K to Q5_0: the size comes from llama-quantize's rules for the shape, and
    quantized_bytes says what the real llama-quantize writes."""
    want = 24 << 20
    shape = synth.quantized_shape(arch, want, "Q4_K_M")
    path = synth.make_quantized(tmp_path / f"{arch}.gguf", arch, want, "q4_k_m",
                                llama_bin_dir / "llama-quantize", make_parents=False)
    got = path.stat().st_size
    assert abs(got - want) <= 0.10 * want, f"{got / want:.2f}x the asked size"
    assert synth.quantized_bytes(shape, "Q4_K_M") == pytest.approx(got, rel=0.01)
