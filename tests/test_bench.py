"""`cputune bench`: real llama-bench on generated models, predicted beside measured, the history."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cputune import bench
from cputune.cli import cli


@pytest.fixture
def probed(own_cache):
    """The fresh cache with a quick probe saved in it (bench predicts for this box)."""
    assert CliRunner().invoke(cli, ["probe", "--quick"], catch_exceptions=False).exit_code == 0
    return own_cache


def test_bench_a_file_reports_spread_prediction_and_appends_history(probed, tiny_models):
    path = tiny_models["llama"].quantized["q8_0"]
    args = ["bench", "-m", str(path), "--threads", "1", "--n-prompt", "32", "--n-gen", "8", "--reps", "3"]
    r = CliRunner().invoke(cli, args + ["--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.bench/1"
    res = {x["kind"]: x for x in doc["results"]}
    assert set(res) == {"tg", "pp"}
    tg = res["tg"]
    assert len(tg["samples_tokens_per_s"]) == 3 and tg["threads"] == 1
    assert tg["min_tokens_per_s"] <= tg["median_tokens_per_s"] <= tg["max_tokens_per_s"]
    assert tg["predicted_tokens_per_s"] > 0 and tg["roofline_tokens_per_s"] > 0
    assert res["pp"]["roofline_tokens_per_s"] is None
    hist = bench.read_history(probed / "bench-history.jsonl")
    assert len(hist) == 2 and hist[0]["model"] == str(path)
    # Human table, and a second run appends rather than overwrites.
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "efficiency" in r.stdout and "tg8" in r.stdout
    assert len(bench.read_history(probed / "bench-history.jsonl")) == 4


def test_bench_finds_the_quant_in_the_models_folder(probed, tiny_models, tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    (d / "tiny-Q4_K_M.gguf").write_bytes(tiny_models["llama"].quantized["q4_k_m"].read_bytes())
    r = CliRunner().invoke(cli, ["bench", "-q", "q4_k_m", "--models-dir", str(d), "-t", "1",
                                 "--n-prompt", "0", "--n-gen", "4", "--reps", "1", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["model"].endswith("tiny-Q4_K_M.gguf")
    r = CliRunner().invoke(cli, ["bench", "-q", "q2_k", "--models-dir", str(d)])
    assert r.exit_code == 1 and "no Q2_K model" in r.output and "tiny-Q4_K_M.gguf" in r.output


def test_bench_twin_is_synthesized_once(probed):
    args = ["bench", "-m", "deepseek-r1", "-q", "q4_k_m", "--twin", "16MiB", "-t", "1",
            "--n-prompt", "0", "--n-gen", "4", "--reps", "1", "--json"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    twins = list((probed / "twins").glob("*.gguf"))
    assert len(twins) == 1 and twins[0].name.startswith("deepseek2-")
    mtime = twins[0].stat().st_mtime_ns
    assert CliRunner().invoke(cli, args, catch_exceptions=False).exit_code == 0
    assert twins[0].stat().st_mtime_ns == mtime


def test_bench_without_a_model_says_what_to_pass(probed):
    r = CliRunner().invoke(cli, ["bench"])
    assert r.exit_code == 1 and "nothing to bench" in r.output and "--twin" in r.output


def test_history_skips_a_cut_line(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"a": 1}\n{"b": \n')
    assert bench.read_history(p) == [{"a": 1}]
