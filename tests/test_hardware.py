"""Hardware profiles, the published-run fit, and resolving the box a prediction is for."""

from __future__ import annotations

import copy
import dataclasses
import re

import statistics

import pytest

from cputune.predict import calibrate, hardware, published
from cputune.predict.box import numa_decision, resolve_box
from cputune.core.errors import ConfigError
from cputune.predict.predictor import Settings, for_box, predict


def test_every_shipped_profile_loads_and_the_reference_box_is_there():
    names = hardware.list_hardware()
    assert "epyc-9655-2s" in names and len(names) >= 5
    for n in names:
        hw = hardware.load_hardware(n)
        assert hw.source and hw.cores == hw.sockets * hw.cores_per_socket
        m = hardware.machine_from_hardware(hw)
        # A node cannot read faster than its channels allow.
        assert m.node_read_gbps <= hw.theoretical_socket_gbps / hw.numa_nodes_per_socket


def test_reference_box_numbers():
    hw = hardware.load_hardware("epyc-9655-2s")
    assert (hw.sockets, hw.cores, hw.nodes) == (2, 192, 2)
    assert hw.mem_bytes == 24 * 32 * 2**30
    assert hw.theoretical_socket_gbps == pytest.approx(12 * 6000 * 8 / 1000)  # 576 GB/s
    assert not hw.bandwidth_measured
    assert hw.node_read_gbps == pytest.approx(hardware.ESTIMATED_READ_FRACTION * 576.0)


def test_measured_bandwidth_is_kept(tmp_path):
    p = tmp_path / "box.toml"
    p.write_text('[cpu]\nmodel = "x"\nsockets = 1\ncores_per_socket = 8\n'
                 '[memory]\nchannels_per_socket = 2\nmts = 5600\ndimm_gib = 32\n'
                 '[bandwidth]\nnode_read_gbps = 70.5\n')
    hw = hardware.load_hardware(p)
    assert hw.bandwidth_measured and hw.node_read_gbps == 70.5
    assert hw.remote_ratio == 1.0 and hw.dimms == 2


@pytest.mark.parametrize("text, message", [
    ("[cpu]\nmodel = 'x'\n", "missing 'memory'"),
    ("[cpu]\nmodel='x'\nsockets=0\ncores_per_socket=1\n[memory]\nchannels_per_socket=1\nmts=1\ndimm_gib=1\n",
     r"\[cpu\] sockets must be a whole number from 1 to 32, not 0"),
    ("not = [toml", "not valid TOML"),
])
def test_bad_profiles_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        hardware.load_hardware(p)


GOOD_BOX = ('name = "box"\n[cpu]\nmodel = "x"\nsockets = 1\ncores_per_socket = 8\n'
            '[memory]\nchannels_per_socket = 2\nmts = 5600\ndimm_gib = 32\n[bandwidth]\nnode_read_gbps = 70.5\n')


@pytest.mark.parametrize("old, new, message", [
    ("cores_per_socket = 8\n", "cores_per_socket = 8\nnodes_per_socket = 4\n",
     r"\[cpu\]: unknown key 'nodes_per_socket'; did you mean 'numa_nodes_per_socket'\?"),
    ("mts = 5600\n", "mts = 5600\nchanels_per_socket = 4\n",
     r"\[memory\]: unknown key 'chanels_per_socket'; did you mean 'channels_per_socket'\?"),
    ("node_read_gbps = 70.5\n", "node_read_gbps = 70.5\nremote = 0.5\nzzz = 1\n",
     r"\[bandwidth\]: unknown key 'remote' \(and 1 more\); did you mean 'remote_ratio'\?"),
    ('name = "box"\n', 'name = "box"\nsorce = "me"\n', r": unknown key 'sorce'; did you mean 'source'\?"),
    ('name = "box"\n', 'name = "box"\n[x9]\nmodel = "none"\n', r": unknown key 'x9'$"),
])
def test_an_unknown_key_in_a_profile_is_refused_naming_it_and_the_file(tmp_path, old, new, message):
    p = tmp_path / "box.toml"
    p.write_text(GOOD_BOX.replace(old, new, 1))
    with pytest.raises(ConfigError, match=re.escape(str(p)) + ".*" + message) as e:
        hardware.load_hardware(p)
    assert "\n" not in e.value.message and "takes" in e.value.hint


def test_the_good_box_without_unknown_keys_loads(tmp_path):
    p = tmp_path / "box.toml"
    p.write_text(GOOD_BOX)
    assert hardware.load_hardware(p).node_read_gbps == 70.5


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as e:
        hardware.load_hardware("epyc-9999")
    assert "epyc-9655-2s" in e.value.hint


def test_no_probe_profile_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="has not been probed") as e:
        resolve_box(None)
    assert "cputune probe" in e.value.hint and "--hardware" in e.value.hint


def test_a_hardware_box_gets_the_published_constants_and_its_own_terms():
    """A box with published runs: the pooled constants, times the factors its own runs gave
    (box_terms: bandwidth share and fixed cost), and the leave-one-out range."""
    pub = calibrate.default_calibration("published")
    box = resolve_box("xeon-6980p-2s")
    assert box.calibration == for_box(pub, "xeon-6980p-2s") and "published" in box.calibration.source
    # The 9965's runs (held out of the pooled fit) say its MLC figure undersells it: its box
    # reaches more of the profile's bandwidth at a lower fixed cost than the pooled terms give.
    k = resolve_box("epyc-9965-2s").calibration
    f = pub.box_terms["epyc-9965-2s"]
    assert f["bw"] > 1.2 and f["fixed"] < 1
    assert k.bw_efficiency == pytest.approx(pub.bw_efficiency * f["bw"])
    assert k.overhead_s_per_layer_thread == pytest.approx(pub.overhead_s_per_layer_thread * f["fixed"])
    assert k.tg_error_band == pub.tg_error_band
    assert f"epyc-9965-2s's own runs: bandwidth share x{f['bw']:.2f}" in k.source  # said where it came from


def test_a_box_the_fit_never_saw_gets_the_leave_one_box_out_range(tmp_path):
    pub = calibrate.default_calibration("published")
    assert "epyc-9655-2s" not in pub.fitted_boxes and "xeon-6980p-2s" in pub.fitted_boxes
    new = resolve_box("epyc-9655-2s").calibration  # the reference box: no published runs
    assert new.tg_error_band == pub.tg_error_band_new_box and new.pp_error_band == pub.pp_error_band_new_box
    assert "leave-one-box-out" in new.error_band_source
    # Wider than a fitted box's, and the same constants otherwise.
    assert new.tg_error_band[1] - new.tg_error_band[0] > pub.tg_error_band[1] - pub.tg_error_band[0]
    assert dataclasses.replace(new, tg_error_band=pub.tg_error_band, pp_error_band=pub.pp_error_band,
                               error_band_source=pub.error_band_source) == pub
    assert new.error_band_source == pub.error_band_source_new_box
    # A copy of a fitted box's profile elsewhere is a user's description, not the fitted box.
    copy = tmp_path / "xeon-6980p-2s.toml"
    copy.write_text((hardware.hardware_dir() / "xeon-6980p-2s.toml").read_text())
    assert resolve_box(copy).calibration.tg_error_band == pub.tg_error_band_new_box


def test_box_weights_make_each_box_count_once():
    # Nine runs of one box within 0 %, one run of another 2x slow: by runs the band ignores it,
    # by boxes it is half the weight.
    errs, boxes = [0.0] * 9 + [1.0], ["a"] * 9 + ["b"]
    assert published.error_band(errs) == (pytest.approx(0.95), 1.0)
    assert published.error_band(errs, weights=published.box_weights(boxes)) == (0.5, 1.0)


def test_auto_numa_and_default_threads():
    m = hardware.machine_from_hardware(hardware.load_hardware("epyc-9655-2s"))
    per_node = m.mem_bytes // m.nodes
    assert numa_decision(m, per_node).policy == "one-node"
    assert numa_decision(m, per_node + 1).policy == "interleave"
    assert numa_decision(m, per_node + 1, numactl=False).policy == "distribute"
    assert numa_decision(m, per_node).threads == 96
    assert numa_decision(m, per_node + 1).threads == 192
    # --numa one-node --threads 192 on a 96-core node: its SMT siblings, said so; 400 is capped.
    assert "SMT siblings" in numa_decision(m, 1, "one-node", 192).notes[0]
    d = numa_decision(m, 1, "one-node", 400)
    assert d.threads == 192 and "capped at 192" in d.notes[0]


# --- the published big-server runs ------------------------------------------------------------

def test_published_runs_resolve_to_catalog_models_and_profiles():
    runs = published.load_published_runs()
    assert len(runs) >= 100
    assert {r.hardware for r in runs} <= set(hardware.list_hardware())
    r1 = [r for r in runs if r.model_id == "deepseek-r1"]
    assert r1 and all(r.model.is_moe for r in r1)
    assert all(r.source for r in runs)  # every row says where it was published
    assert {r.machine.core_family for r in runs} >= {"graniterapids", "zen3", "zen4", "zen5"}
    # The rows the newer physics needs: depth, long prompts, 4 KiB pages, SMT, two sockets.
    assert any(r.depth >= 8192 for r in runs) and any(r.pp_tokens >= 8192 for r in runs)
    assert any(r.hugepages == "4K" for r in runs) and any(r.threads > r.machine.cores for r in runs)
    assert any(r.numa != "one-node" and r.machine.nodes > 1 for r in runs)


def test_unmeasured_remote_ratio_depends_on_what_separates_the_nodes():
    """Across sockets the link's 0.45; nodes of one socket share its fabric: EPYC NPS4 0.91,
    Xeon SNC 0.5 (shared/reference/hardware.md); one node reads only locally."""
    assert hardware.default_remote_ratio(2, 4, "AMD EPYC 9755") == hardware.DEFAULT_REMOTE_RATIO
    assert hardware.default_remote_ratio(1, 8, "AMD EPYC 9374F") == 0.91
    assert hardware.default_remote_ratio(1, 3, "Intel Xeon 6980P") == 0.5
    assert hardware.default_remote_ratio(1, 1, "AMD EPYC 9554") == 1.0
    assert hardware.machine_from_hardware(hardware.load_hardware("epyc-9374f")).remote_ratio == 0.91


def test_a_published_date_is_checked_and_reaches_the_prediction(monkeypatch):
    """A row's date is its build's upper bound (which repacks it had); a malformed one is refused."""
    runs = {r.row: r for r in published.load_published_runs(held_out=True)}
    assert runs[235].settings().build_date == "2025-01-30" and runs[236].settings().repack is False
    real = published.load_toml

    def bad(name):
        data = copy.deepcopy(real(name))  # the loader caches what it read: change a copy
        data["run"][0]["date"] = "30/01/2025"
        return data

    monkeypatch.setattr(published, "load_toml", bad)
    with pytest.raises(ValueError, match="date must be YYYY-MM-DD, not '30/01/2025'"):
        published.load_published_runs()


def test_held_out_rows_are_apart_from_the_fit():
    """Rows marked held_out = true (a box and model no fit sees) load on their own, resolve to a
    profile and a catalog model, and are not among the rows the fit is made of."""
    fitted = published.load_published_runs()
    apart = published.load_published_runs(held_out=True)
    assert apart and {r.row for r in apart}.isdisjoint({r.row for r in fitted})
    assert {r.hardware for r in apart}.isdisjoint({r.hardware for r in fitted})
    # -ub as published reaches the prediction (sweep-bench -ub 4096 rows 232-234).
    assert {r.settings().n_ubatch for r in apart} == {512, 4096}
    cal = calibrate.default_calibration("published")
    assert all(p > 0 and m > 0 for _, _, p, m in published.figures(apart, cal))


def test_shipped_published_constants_match_the_runs():
    """The shipped [published] fit against the runs it was fitted on: decode within 10 % (median),
    30 % for 90 % of the runs and 80 % for all, prefill within 15 % (median). The runs the physics
    does not yet explain are named in the closing notes and printed by the benchmark (mainline
    small-expert MoE on a desktop, rows 214-215, decodes faster than the big-box MoE bandwidth
    share allows). The held-out errors
    (leave-one-out) are benchmarks/predict_accuracy.py --published-only's job: it takes a minute."""
    runs = published.load_published_runs()
    cal = calibrate.default_calibration("published")
    rows = published.figures(runs, cal)
    tg = sorted(abs(p / m - 1) for r, k, p, m in rows if k == "tg")
    pp = [abs(p / m - 1) for r, k, p, m in rows if k == "pp"]
    assert statistics.median(tg) <= 0.10 and tg[int(0.9 * len(tg))] <= 0.30 and max(tg) <= 0.80
    assert statistics.median(pp) <= 0.15
    lo, hi = cal.tg_error_band
    assert 0.5 < lo < 1 < hi < 2 and "leave-one-out" in cal.error_band_source


def test_a_boxs_own_runs_give_its_terms_and_nothing_else():
    """fit_box_terms holds the pooled constants and finds, from one box's decode runs, the factors
    that made them: runs made by bw x1.3 and fixed x0.8 give those back (a little toward 1, the
    pooled terms, from the prior), and a box without decode runs gets no terms."""
    pooled = dataclasses.replace(calibrate.default_calibration("published"), box_terms={})
    runs = [r for r in published.load_published_runs(held_out=True) if r.hardware == "epyc-9965-2s"]
    truth = dataclasses.replace(pooled, box_terms={"epyc-9965-2s": {"bw": 1.3, "fixed": 0.8}})
    made = [dataclasses.replace(r, tg_tokens_per_s=p) for r, k, p, _ in published.figures(runs, truth) if k == "tg"]
    got = published.fit_box_terms(made, pooled)["epyc-9965-2s"]
    assert got["bw"] == pytest.approx(1.3, rel=0.05) and got["fixed"] == pytest.approx(0.8, rel=0.1)
    assert published.fit_box_terms([dataclasses.replace(r, tg_tokens_per_s=None) for r in made], pooled) == {}
    # The pooled fit never carries box terms, whatever it starts from.
    assert published.fit_published(published.load_published_runs()[:20], truth, warm=truth).box_terms == {}


@pytest.mark.parametrize("terms, message", [
    ({"epyc-9965-2s": {"bw": 0.0}}, "box_terms.epyc-9965-2s.bw must be one of bw, fixed with a factor in 0.2..5.0"),
    ({"epyc-9965-2s": {"speed": 1.1}}, "box_terms.epyc-9965-2s.speed must be one of bw, fixed"),
    ({"x": {"fixed": float("nan")}}, "field box_terms['x']['fixed'] must be a finite number, not nan"),
])
def test_a_wrong_box_term_is_refused_in_one_line(terms, message):
    section = dict(calibrate.load_toml("calibration.toml")["published"], box_terms=terms)
    with pytest.raises(ConfigError, match=re.escape(message)):
        calibrate.calibration_from(section, "calibration.toml [published]")


def test_refit_reproduces_the_shipped_constants():
    runs = published.load_published_runs()
    cal = published.fit_published(runs, calibrate.default_calibration())
    shipped = calibrate.default_calibration("published")
    for f in ("bw_efficiency", "moe_bw_efficiency", "overhead_s_per_layer", "ik_tg_factor", "serial_share"):
        assert getattr(cal, f) == pytest.approx(getattr(shipped, f), rel=0.02), f


def test_error_band_is_the_central_quantiles_of_measured_over_predicted():
    # Predicted 10 % high half the time and 10 % low the other half: measured = predicted x 1/1.1 .. 1/0.9.
    lo, hi = published.error_band([0.1] * 5 + [-0.1] * 5)
    assert lo == pytest.approx(1 / 1.1) and hi == pytest.approx(1 / 0.9)
    assert published.error_band([]) == (1.0, 1.0)


def test_reference_box_r1_prediction_is_in_the_published_range():
    """R1 Q4_K on one 12-channel socket: the published single-socket runs are 8.5-10 t/s."""
    box = resolve_box("epyc-9655-2s")
    from cputune.model.catalog import catalog_profile
    m = catalog_profile("deepseek-r1", "Q4_K_M")
    p = predict(m, box.machine, Settings(threads=96), box.calibration)
    assert 6 <= p.tg_tokens_per_s <= 14
    assert p.bottleneck == "memory"
