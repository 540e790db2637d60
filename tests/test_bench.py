"""`cputune bench`: real llama-bench on generated models, predicted beside measured, the history."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.commands import report
from cputune.engine import bench, llama_bench
from cputune.machine import bandwidth, probe
from cputune.model import catalog
from cputune.predict import calibrate
from cputune.cli import cli
from cputune.core.errors import EngineError
from cputune.predict.hardware import Box
from cputune.predict.predictor import MachineBandwidth, Settings, at_read_bandwidth, predict

RECORDED = Path(__file__).parent / "fixtures" / "llama_bench" / "0c1e57098-deepseek2-q8_0.json"


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
    assert doc["schema"] == "cputune.engine.bench/1"
    res = {x["kind"]: x for x in doc["results"]}
    assert set(res) == {"tg", "pp"}
    tg = res["tg"]
    assert len(tg["samples_tokens_per_s"]) == 3 and tg["threads"] == 1
    # The read just before the run, its trials, and the prediction at it (issue 18).
    assert tg["read_gbps"] == max(tg["read_samples_gbps"]) > 0 and tg["predicted_at_read_tokens_per_s"] > 0
    assert tg["min_tokens_per_s"] <= tg["median_tokens_per_s"] <= tg["max_tokens_per_s"]
    assert tg["predicted_tokens_per_s"] > 0 and tg["roofline_tokens_per_s"] > 0
    assert res["pp"]["roofline_tokens_per_s"] is None
    hist = bench.read_history(probed / "bench-history.jsonl")
    assert len(hist) == 2 and hist[0]["model"] == str(path) and hist[0]["read_gbps"] > 0
    # Human table, and a second run appends rather than overwrites.
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "efficiency" in r.stdout and "tg8" in r.stdout and "vs at read" in r.stdout
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


def test_ik_bench_at_depth_uses_gp_for_decode_and_sweep_bench_for_prefill(probed, ik_models):
    path = ik_models["deepseek2"].quantized["q4_k_m"]
    args = ["bench", "-m", str(path), "--engine", "ik_llama", "-t", "1", "--depth", "64", "--n-prompt", "32",
            "--n-gen", "4", "--reps", "2"]
    r = CliRunner().invoke(cli, args + ["--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = {x["kind"]: x for x in json.loads(r.stdout)["results"]}
    assert (res["pp"]["test"], res["tg"]["test"]) == ("pp32 @ d64", "tg4 @ d64")
    for x in res.values():
        assert x["engine"] == "ik_llama" and x["depth"] == 64 and len(x["samples_tokens_per_s"]) == 2
        assert x["build_commit"] == "8337e4cd3"  # its rows say "unknown": the build's commit stands in
    # llama-bench got its -fa 1 -fmoe 1 -rtr 1 spelling, llama-sweep-bench the server's -rtr.
    assert ["-mla", "3"] == res["tg"]["args"][:2] and "-fmoe" in res["tg"]["args"] and "1" in res["tg"]["args"]
    assert "-rtr" in res["pp"]["args"] and "-fmoe" not in res["pp"]["args"]
    assert "why -mla 3: the model has MLA attention" in r.stderr
    # A depth that is not a whole number of prompt windows is said so before anything runs.
    r = CliRunner().invoke(cli, args[:-6] + ["--depth", "50", "--n-prompt", "32", "--n-gen", "0", "--reps", "1"])
    assert r.exit_code == 1 and "must be a multiple of it" in r.output


def test_ik_llama_bench_gp_rows_read_as_decode_at_depth():
    rows = llama_bench.parse_rows(json.dumps([{"test": "tg16@pp256", "n_prompt": 256, "n_gen": 16, "avg_ts": 5.0,
                                               "samples_ts": [5.0], "build_commit": "unknown"}]))
    assert (rows[0].n_prompt, rows[0].n_gen, rows[0].n_depth, rows[0].test) == (0, 16, 256, "tg16 @ d256")
    flags = frozenset({"-gp", "-n"})
    assert llama_bench.depth_args(flags, 256, (0,), (16, 32)) == ((0,), (0,), ["-gp", "256,16", "-gp", "256,32"])
    assert llama_bench.depth_args(frozenset({"-d"}), 256, (32,), (16,)) == ((32,), (16,), ["-d", "256"])
    with pytest.raises(EngineError, match="prefill at depth is measured with llama-sweep-bench"):
        llama_bench.depth_args(flags, 256, (32,), (16,))
    window = '{"n_kv_max": 512, "pp": 32, "tg": 1, "n_kv": 256, "speed_pp": 900.5, "speed_tg": 80.0 }'
    assert llama_bench.parse_sweep(f"loading...\n{window}\n", 256)["speed_pp"] == 900.5


def test_bench_without_a_model_says_what_to_pass(probed):
    r = CliRunner().invoke(cli, ["bench"])
    assert r.exit_code == 1 and "nothing to bench" in r.output and "--twin" in r.output


def test_history_skips_a_cut_line(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text('{"a": 1}\n{"b": \n')
    assert bench.read_history(p) == [{"a": 1}]


def test_a_result_carries_the_read_of_its_moment_and_the_prediction_at_it(tmp_path):
    """A recorded llama-bench row, a real read of this box just before: the result keeps both
    predictions, the profile's and the one at the read bandwidth of the moment."""
    row = next(r for r in llama_bench.parse_rows(RECORDED.read_text()) if r.n_gen)
    model = catalog.catalog_profile("r1-distill-qwen-1.5b", "q8_0")
    box = MachineBandwidth("vm", 1, 1, 2, 30.0, 18.0, 1.0, 24 << 30)
    cal = calibrate.default_calibration()
    read = probe.moment_reader()(row.n_threads)
    gbps = bandwidth.combine_bursts([read]).gbps
    settings = Settings(threads=row.n_threads)
    at_read = predict(model, at_read_bandwidth(box, row.n_threads, gbps), settings, cal)
    r = bench.summarize(row, predict(model, box, settings, cal), read, at_read)
    assert r.read_gbps == gbps == max(r.read_samples_gbps) and len(r.read_samples_gbps) == read.gbps.n
    assert r.predicted_at_read_tokens_per_s == at_read.tg_tokens_per_s
    assert r.vs_predicted_at_read == pytest.approx(r.median_tokens_per_s / at_read.tg_tokens_per_s - 1)
    assert bench.summarize(row, at_read).read_gbps is None and bench.summarize(row, at_read).vs_predicted_at_read is None
    hist = bench.append_history([r], model, "vm", tmp_path / "h.jsonl")
    line = bench.read_history(hist)[0]
    assert line["read_gbps"] == gbps and line["predicted_at_read_tokens_per_s"] == at_read.tg_tokens_per_s
    with report.out.capture() as cap:
        report.render_bench([r], model, Box(box, cal, "test"), None)
    assert f"{gbps:.1f}" in cap.get() and f"{r.vs_predicted_at_read:+.1%}" in cap.get()


def bench_result(samples: tuple[float, ...]) -> tuple[bench.BenchResult, Box]:
    """The recorded decode row with its samples swapped (hyperfine's MockExecutor: the statistics
    and the table are what is tested, not llama-bench)."""
    row = next(r for r in llama_bench.parse_rows(RECORDED.read_text()) if r.n_gen)
    row = dataclasses.replace(row, samples_ts=samples, avg_ts=sum(samples) / len(samples))
    model = catalog.catalog_profile("r1-distill-qwen-1.5b", "q8_0")
    box = MachineBandwidth("vm", 1, 1, 2, 30.0, 18.0, 1.0, 24 << 30)
    cal = calibrate.default_calibration()
    return bench.summarize(row, predict(model, box, Settings(threads=row.n_threads), cal)), Box(box, cal, "test")


def test_one_repetition_has_no_sigma(monkeypatch):
    """llama-bench -r 1: σ is None in the JSON (it was 0.0) and the table says one run, not ± 0.00."""
    r, box = bench_result((6774.53,))
    assert r.stddev_tokens_per_s is None and r.median_tokens_per_s == r.min_tokens_per_s == 6774.53
    assert report.plain(r)["stddev_tokens_per_s"] is None
    model = catalog.catalog_profile("r1-distill-qwen-1.5b", "q8_0")
    monkeypatch.setattr(report.out, "width", 200)  # each cell on one line
    with report.out.capture() as out, report.err.capture() as err:
        report.render_bench([r], model, box, None)
    assert "6774.53 (1 run)" in out.get() and "± 0.00" not in out.get() and "varied" not in err.get()


def test_an_outlying_repetition_is_flagged_on_stderr(monkeypatch):
    r, box = bench_result((100.0, 98.0, 102.0, 99.0, 101.0, 80.0))
    model = catalog.catalog_profile("r1-distill-qwen-1.5b", "q8_0")
    monkeypatch.setattr(report.out, "width", 200)  # each cell on one line
    with report.out.capture() as out, report.err.capture() as err:
        report.render_bench([r], model, box, None)
    assert f"{r.median_tokens_per_s:.2f} ± {r.stddev_tokens_per_s:.2f}" in out.get()
    assert "80.00 … 102.00" in out.get()
    warning = " ".join(err.get().split())  # rich wraps stderr at its width
    assert "1 of 6 runs is a statistical outlier (modified Z > 3.5): 80.00 t/s" in warning
    assert "--reps" in warning


def test_the_history_is_only_appended_to_a_regular_file_and_a_cut_line_is_ended(tmp_path):
    """A FIFO, a symbolic link or a folder where the history goes is a WriteError naming it (no
    hang on the FIFO, nothing written through the link); a last line a crash left without its
    newline is ended first, so the record after it stays readable."""
    from cputune.core.errors import WriteError

    r, _ = bench_result((10.0, 11.0))
    model = catalog.catalog_profile("r1-distill-qwen-1.5b", "q8_0")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    (tmp_path / "dir.jsonl").mkdir()
    for bad, what in ((fifo, "not a regular file"), (link, "symbolic link"), (tmp_path / "dir.jsonl", "not a regular")):
        with pytest.raises(WriteError, match=what) as e:
            bench.append_history([r], model, "vm", bad)
        assert str(bad) in e.value.message
    assert target.read_text() == "keep\n"

    hist = tmp_path / "h.jsonl"
    bench.append_history([r], model, "vm", hist)
    with hist.open("a") as f:
        f.write('{"at": "2026-12-03T00:00:00+00:00", "machine": "vm", "mo')  # cut off mid-line
    bench.append_history([r], model, "vm", hist)
    loaded = bench.load_history(hist)
    assert len(loaded.records) == 2 and loaded.skipped == 1
