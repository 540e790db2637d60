"""`cputune predict`, `synth` and `calibrate` end to end: real models, real llama.cpp tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.machine import probe
from cputune.predict import calibrate
from cputune.cli import cli
from cputune.model.gguf_model import read_model


def run(args, **kw):
    return CliRunner().invoke(cli, args, **kw)


def test_predict_catalog_model_on_the_reference_box_without_a_file():
    r = run(["predict", "--model", "deepseek-r1", "--quant", "q4_k_m", "--hardware",
             "configs/hardware/epyc-9655-2s.toml", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.predict/1"
    p, s = doc["prediction"], doc["settings"]
    assert doc["model"]["path"] is None and doc["model"]["file_type"] == "Q4_K_M"
    # 377 GiB of weights would fit in one 384 GiB node, but not with the repacked copy that
    # mmap keeps (selector.ram_needed): auto interleaves over both sockets, as serve will.
    assert doc["model"]["weight_bytes"] < 384 * 2**30 and s["numa"] == "interleave"
    assert s["threads"] == 192 and p["nodes_used"] == 2
    assert p["tg_tokens_per_s"] > 0 and p["bottleneck"] in ("memory", "compute", "overhead")
    assert p["roofline_tg_tokens_per_s"] >= p["tg_tokens_per_s"]


def test_predict_a_generated_file_on_a_profile(tiny_models):
    path = tiny_models["deepseek2"].quantized["q8_0"]
    r = run(["predict", "-m", str(path), "--hardware", "ryzen-7950x", "--threads", "4",
             "--depth", "1000", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["settings"] == {**doc["settings"], "threads": 4, "depth": 1000, "numa": "one-node"}
    assert doc["model"]["path"] == str(path)
    r = run(["predict", "-m", str(path), "--hardware", "ryzen-7950x"], catch_exceptions=False)
    assert "decode (tg)" in r.output and "tokens/s" in r.output


@pytest.mark.parametrize("args, message", [
    (["-m", "deepseek-r1", "-q", "q9_9"], "unknown quant 'q9_9' for deepseek-r1"),
    (["-m", "deepseek-r1"], "--quant is needed"),
    (["-m", "llama-9000", "-q", "q8_0"], "no model 'llama-9000'"),
    (["-m", "deepseek-r1", "-q", "q8_0", "--hardware", "nope"], "no hardware profile 'nope'"),
])
def test_predict_errors_are_one_line(args, message):
    r = run(["predict", *args])
    assert r.exit_code == 1
    assert r.output.splitlines()[0].startswith("Error: ") and message in r.output
    assert "Traceback" not in r.output


def test_predict_file_and_wrong_quant(tiny_models):
    r = run(["predict", "-m", str(tiny_models["llama"].quantized["q8_0"]), "-q", "q4_k_m",
             "--hardware", "ryzen-7950x"])
    assert r.exit_code == 1 and "is Q8_0, not Q4_K_M" in r.output


def test_synth_writes_a_quantized_deepseek2_of_the_asked_size(tmp_path, llama_bin_dir):
    out = tmp_path / "ds2.gguf"
    r = run(["synth", "--arch", "deepseek2", "--size", "24MiB", "--quant", "q4_k_m", "--out", str(out),
             "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = read_model(out)
    assert m.arch == "deepseek2" and m.file_type == "Q4_K_M" and m.is_moe
    assert 0.75 * 24 * 2**20 <= out.stat().st_size <= 1.25 * 24 * 2**20
    assert [p.name for p in tmp_path.iterdir()] == ["ds2.gguf"]  # no f16 left behind
    assert json.loads(r.stdout)["model"]["n_expert"] == m.n_expert


def test_calibrate_needs_a_probe_first(own_cache):
    r = run(["calibrate"])
    assert r.exit_code == 1 and "cputune probe" in r.output


def test_calibrate_fits_and_saves_beside_the_profile(own_cache, tmp_path):
    assert run(["probe", "--quick"], catch_exceptions=False).exit_code == 0
    r = run(["calibrate", "--arch", "llama", "--size", "24MiB", "--quant", "q8_0", "--threads", "1",
             "--reps", "1", "--passes", "1", "--depths", "0,256", "--work-dir", str(tmp_path / "models"),
             "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert Path(doc["saved_to"]) == own_cache / "calibration.json"
    # One model, one thread count, two depths (llama-bench -d): a point each.
    assert [p["depth"] for p in doc["points"]] == [0, 256] and doc["points"][0]["tg_tokens_per_s"] > 0
    assert doc["points"][0]["read_gbps"] == max(doc["points"][0]["read_gbps_samples"]) > 0  # issue 18
    cal = calibrate.load_calibration(own_cache / "calibration.json")
    assert "llama-bench runs" in cal.source
    # predict now uses it.
    r = run(["predict", "-m", "r1-distill-qwen-1.5b", "-q", "q8_0", "--json"], catch_exceptions=False)
    assert json.loads(r.stdout)["calibration_source"] == cal.source


def test_measure_keeps_every_run_of_every_sweep_and_fits_the_best(tiny_models, llama_bin_dir, tmp_path):
    path = tiny_models["llama"].quantized["q8_0"]
    seen = []
    reads = []

    def read_now(threads):  # this box's real read, counted
        reads.append(threads)
        return probe.moment_reader()(threads)

    points = calibrate.measure(llama_bin_dir / "llama-bench", [path], (1, 2), n_prompt=8, n_gen=4,
                               reps=2, passes=2, progress=lambda i, n, text: seen.append((i, n, text)),
                               read_now=read_now)
    assert [(p.threads, len(p.tg_samples), len(p.pp_samples)) for p in points] == [(1, 4, 4), (2, 4, 4)]
    assert reads == [1, 2, 1, 2]  # before the model's runs, at each thread count, in each sweep
    for p in points:
        assert p.tg_tokens_per_s == max(p.tg_samples) and p.pp_tokens_per_s == max(p.pp_samples)
        assert len(p.read_gbps_samples) == 2 and p.read_gbps == max(p.read_gbps_samples)
    assert calibrate.read_range(points)[2][2] == 2
    assert [s[:2] for s in seen] == [(0, 2), (1, 2), (2, 2)] and "sweep 2/2" in seen[1][2]
    calibrate.save_points(points, tmp_path / "points.json")
    back = calibrate.load_points(tmp_path / "points.json")
    assert [(p.tg_samples, p.pp_tokens_per_s, p.read_gbps, p.read_gbps_samples) for p in back] == \
        [(p.tg_samples, p.pp_tokens_per_s, p.read_gbps, p.read_gbps_samples) for p in points]


def test_a_named_recipe_predicts_from_its_published_types():
    """`--quant ud-q2_k_xl` is unsloth's mix (configs/quant_recipes.toml), not a preset: its size
    is the recipe's published one, and its name is what predict reports."""
    from cputune.model import catalog, recipes

    r = run(["predict", "-m", "deepseek-r1", "-q", "ud-q2_k_xl", "--hardware", "epyc-9655-2s", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    rcp = recipes.recipe("ud-q2_k_xl", "deepseek-r1")
    assert doc["model"]["name"].endswith("UD-Q2_K_XL")
    assert doc["model"]["weight_bytes"] == pytest.approx(rcp.published_bytes, rel=0.02)
    assert doc["model"]["weight_bytes"] < catalog.catalog_profile("deepseek-r1", "q3_k_m").weight_bytes


def test_ik_only_types_need_the_ik_engine():
    r = run(["predict", "-m", "deepseek-r1-0528", "-q", "iq2_k_r4", "--hardware", "epyc-9655-2s"])
    assert r.exit_code == 1 and "only ik_llama.cpp loads" in r.output and "--engine ik_llama" in r.output
    assert "Traceback" not in r.output
    ok = run(["predict", "-m", "deepseek-r1-0528", "-q", "iq2_k_r4", "--hardware", "epyc-9655-2s",
              "--engine", "ik_llama"])
    assert ok.exit_code == 0 and "IQ2_K_R4" in ok.output


def test_an_unknown_quant_names_the_recipes_published_for_the_model():
    r = run(["predict", "-m", "deepseek-r1-0528", "-q", "q4_k_xl", "--hardware", "epyc-9655-2s"])
    assert r.exit_code == 1 and "IQ2_K_R4" in r.output and "cputune inspect hf://" in r.output


def test_predict_says_when_the_other_attention_path_is_faster_at_depth():
    r = run(["predict", "-m", "r1-distill-llama-8b", "-q", "q4_k_m", "--hardware", "epyc-9655-2s",
             "--depth", "16384", "--json"])
    doc = json.loads(r.stdout)
    assert doc["settings"]["flash_attn"] is True
    assert doc["with_other_flash_attn"]["tg_tokens_per_s"] > doc["prediction"]["tg_tokens_per_s"]
    text = run(["predict", "-m", "r1-distill-llama-8b", "-q", "q4_k_m", "--hardware", "epyc-9655-2s",
                "--depth", "16384"])
    assert "flash attention off decodes" in text.output and "-fa off" in text.output
    off = run(["predict", "-m", "deepseek-r1", "-q", "q4_k_m", "--hardware", "epyc-9655-2s",
               "--depth", "4096", "--flash-attn", "off"])
    assert off.exit_code == 0 and "flash attention on decodes" in off.output  # MLA needs it on
