"""Every input other than a GGUF file is checked (issue 13 §3): hardware TOMLs, the saved
machine.json and tuned.json, and the command-line flags. Each bad value gets one line naming it
and what is allowed, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.core import checks, units
from cputune.engine import tune
from cputune.machine import probe
from cputune.predict import hardware
from cputune.machine.bandwidth import BandwidthSummary
from cputune.cli import cli
from cputune.core.errors import ConfigError
from cputune.core.jsonio import from_plain
from cputune.machine.memory import parse_memory_spec

FIXTURES = Path(__file__).parent / "fixtures"
EPYC_9654_XML = FIXTURES / "hwloc" / "AMD-19h-Zen4-2xEpyc-9654.xml"
SHIPPED = Path(__file__).parent.parent / "configs" / "hardware" / "epyc-9654-2s.toml"
PREDICT = ["predict", "-m", "deepseek-r1", "-q", "q4_k_m"]


def run(args):
    return CliRunner().invoke(cli, args)


def refused(r, *needles, code=None):
    """A bad value: non-zero exit (1 for cputune's Error:, 2 for click's usage error), one line
    that names it, and no traceback."""
    assert r.exit_code != 0 and (code is None or r.exit_code == code), r.output
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    line = next(x for x in r.output.splitlines() if x.startswith("Error: "))
    for n in needles:
        assert n in line, (n, r.output)
    return line


# ---- the checker itself ------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["2", True, False, None, [2], {"n": 2}, 2.5, math.nan, math.inf])
def test_a_whole_number_is_an_int_and_not_a_bool(value):
    with pytest.raises(ConfigError, match=r"^sockets must be a whole number from 1 to 32, not "):
        checks.number(value, "sockets", 1, 32, integer=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 0, 0.0, -1, 10_000.5, "1", True])
def test_a_positive_figure_is_finite_and_in_range(value):
    with pytest.raises(ConfigError, match=r"must be a number above 0 and at most 10000, not "):
        checks.number(value, "bw", 0, 10_000, lo_open=True)


def test_the_checker_passes_good_values_through():
    assert checks.number(3, "x", 1, 4, integer=True) == 3
    assert checks.number(3, "x", 0, 4, lo_open=True) == 3.0 and isinstance(checks.number(3, "x"), float)
    assert checks.text_list(["avx2"], "isa", ("avx2", "fma")) == ("avx2",)
    with pytest.raises(ConfigError, match=r"isa must be a list of strings from: avx2, fma, not 'avx2'"):
        checks.text_list("avx2", "isa", ("avx2", "fma"))  # not split into letters


# ---- hardware TOML ---------------------------------------------------------------------------------

GOOD_TOML = SHIPPED.read_text()


def bad_toml(tmp_path, old: str, new: str) -> Path:
    text = GOOD_TOML.replace(old, new, 1)
    assert text != GOOD_TOML, old
    p = tmp_path / "box.toml"
    p.write_text(text)
    return p


SOCKETS, CORES, MTS = "sockets = 2", "cores_per_socket = 96", "mts = 4800"
BAD_FIELDS = [
    (SOCKETS, 'sockets = "two"', "[cpu] sockets must be a whole number from 1 to 32, not 'two'"),
    (SOCKETS, "sockets = 0", "[cpu] sockets must be a whole number from 1 to 32, not 0"),
    (SOCKETS, "sockets = -2", "[cpu] sockets must be"),
    (SOCKETS, "sockets = 100000000", "not 100000000"),
    (SOCKETS, "sockets = true", "[cpu] sockets must be a whole number"),
    (SOCKETS, "sockets = 2.0", "[cpu] sockets must be a whole number"),
    (SOCKETS, "sockets = nan", "[cpu] sockets must be a whole number"),
    (CORES, "cores_per_socket = 0", "[cpu] cores_per_socket must be a whole number from 1 to 1024, not 0"),
    (CORES, "cores_per_socket = -96", "[cpu] cores_per_socket must be"),
    (CORES, "cores_per_socket = 100000", "[cpu] cores_per_socket must be"),
    (CORES, 'cores_per_socket = "96"', "[cpu] cores_per_socket must be"),
    ("threads_per_core = 2", "threads_per_core = 0", "[cpu] threads_per_core must be a whole number from 1 to 8"),
    ("numa_nodes_per_socket = 1", "numa_nodes_per_socket = 0", "[cpu] numa_nodes_per_socket must be"),
    ("numa_nodes_per_socket = 1", "numa_nodes_per_socket = 97", "[cpu] numa_nodes_per_socket must be"),
    ("l3_groups_per_socket = 12", "l3_groups_per_socket = -1", "[cpu] l3_groups_per_socket must be"),
    (re.search(r"^isa = .*$", GOOD_TOML, re.M).group(), 'isa = "avx512f"',
     "[cpu] isa must be a list of strings from: avx2"),
    ("isa = [", 'isa = [1, ', "[cpu] isa[0] must be one of avx2"),
    ("isa = [", 'isa = ["avx512", ', "[cpu] isa[0] must be one of avx2, fma"),
    ('model = "AMD EPYC 9654"', "model = 9654", "[cpu] model must be a string, not 9654"),
    (MTS, "mts = [4800]", "[memory] mts of DDR5 must be a whole number from 2000 to 12000, not [4800]"),
    (MTS, "mts = 0", "[memory] mts of DDR5 must be"),
    (MTS, "mts = -4800", "[memory] mts of DDR5 must be"),
    (MTS, "mts = 48000", "not 48000"),
    (MTS, "mts = 4800.5", "[memory] mts of DDR5 must be a whole number"),
    (MTS, "mts = inf", "not inf"),
    ('type = "DDR5"', 'type = "DDR9"', "[memory] type must be one of DDR3, DDR4, DDR5"),
    ('type = "DDR5"', "type = 5", "[memory] type must be a string, not 5"),
    ("channels_per_socket = 12", "channels_per_socket = 0", "[memory] channels_per_socket must be a whole number "
                                                            "from 1 to 32, not 0"),
    ("channels_per_socket = 12", "channels_per_socket = 33", "[memory] channels_per_socket must be"),
    ("dimms = 24", "dimms = 0", "[memory] dimms must be a whole number from 1 to 72, not 0"),
    ("dimms = 24", "dimms = -24", "[memory] dimms must be"),
    ("dimms = 24", "dimms = 73", "[memory] dimms must be"),
    ("dimm_gib = 64", "dimm_gib = 0", "[memory] dimm_gib must be a whole number"),
    ("dimm_gib = 64", 'dimm_gib = "64GB"', "[memory] dimm_gib must be a whole number"),
    ("node_read_gbps = 359.9", "node_read_gbps = 0.0", "[bandwidth] node_read_gbps must be a number above 0 "
                                                       "and at most 460.8, not 0.0"),
    ("node_read_gbps = 359.9", "node_read_gbps = -174.72", "not -174.72"),
    ("node_read_gbps = 359.9", "node_read_gbps = nan", "not nan"),
    ("node_read_gbps = 359.9", "node_read_gbps = inf", "not inf"),
    ("node_read_gbps = 359.9", "node_read_gbps = 500.0", "at most 460.8, not 500.0"),  # over the channels' peak
    ("node_read_gbps = 359.9", 'node_read_gbps = "fast"', "not 'fast'"),
    ("node_read_gbps = 359.9", "node_read_gbps = 359.9\ncore_read_gbps = 0", "[bandwidth] core_read_gbps must be"),
    ("node_read_gbps = 359.9", "node_read_gbps = 359.9\ncore_read_gbps = 400.0", "at most 359.9, not 400.0"),
    ("node_read_gbps = 359.9", "node_read_gbps = 359.9\nremote_ratio = 0", "[bandwidth] remote_ratio must be a "
                                                                          "number above 0 and at most 1, not 0"),
    ("node_read_gbps = 359.9", "node_read_gbps = 359.9\nremote_ratio = 1.5", "[bandwidth] remote_ratio must be"),
    ("node_read_gbps = 359.9", "node_read_gbps = 359.9\nremote_ratio = -0.4", "[bandwidth] remote_ratio must be"),
    ("[bandwidth]", "[[bandwidth]]", "[bandwidth] must be a table, not [{'node_read_gbps': 359.9}]"),
    (re.search(r"^name = .*$", GOOD_TOML, re.M).group(), "name = 7", "name must be a string, not 7"),
    ("cores_per_socket = ", "cores_per_sockett = 1\ncores_per_socket = ",
     "[cpu]: unknown key 'cores_per_sockett'; did you mean 'cores_per_socket'?"),
]


@pytest.mark.parametrize("old, new, message", BAD_FIELDS)
def test_every_hardware_field_is_checked(tmp_path, old, new, message):
    p = bad_toml(tmp_path, old, new)
    with pytest.raises(ConfigError) as e:
        hardware.load_hardware(p)
    assert e.value.message.startswith(f"{p}: ") and message in e.value.message
    assert "\n" not in e.value.message and e.value.hint


@pytest.mark.parametrize("old, new, message", BAD_FIELDS[::4])
@pytest.mark.parametrize("command", [PREDICT, ["select", "--model", "deepseek-r1"],
                                     ["plan", "--model", "deepseek-r1", "--quant", "q4_k_m"]])
def test_a_bad_hardware_file_is_one_line_on_every_command(tmp_path, command, old, new, message):
    p = bad_toml(tmp_path, old, new)
    refused(run([*command, "--hardware", str(p)]), message, code=1)


def test_the_shipped_profile_still_loads_after_the_checks():
    hw = hardware.load_hardware(SHIPPED)
    assert (hw.sockets, hw.cores, hw.mts, hw.isa[0]) == (2, 192, 4800, "avx2")


# ---- --memory ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("24x DDR9-99999", "the DIMM type must be one of DDR3, DDR4, DDR5"),
    ("24x DDR5-99999", "DDR5 MT/s must be a whole number from 2000 to 12000, not 99999"),
    ("24x DDR4-9000", "DDR4 MT/s must be a whole number from 1066 to 5600, not 9000"),
    ("24x DDR5-100", "DDR5 MT/s must be"),
    ("100000x DDR5-6000", "the DIMM count must be a whole number from 1 to 256, not 100000"),
    ("257x DDR5-6000", "not 257"),
    ("24x DDR5X-6000", "the DIMM type must be one of"),
    ("24x DDR5-6000 0GB", "the DIMM size must be from 1 GiB to 4 TiB, not 0GB"),
    ("24x DDR5-6000 9999TB", "not 9999TB"),
])
def test_memory_spec_bounds_count_type_speed_and_size(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_memory_spec(spec)
    assert e.value.message.startswith(f"memory spec {spec!r}: ") and message in e.value.message
    r = run(["probe", "--hwloc-xml", str(EPYC_9654_XML), "--memory", spec, "--no-save"])
    refused(r, spec, message, code=1)


# ---- machine.json --------------------------------------------------------------------------------

@pytest.fixture
def saved_profile(tmp_path, monkeypatch) -> Path:
    """A machine.json for the recorded 2x EPYC 9654, with bandwidth figures written in (the XML
    carries no measurement), saved where `predict` without --hardware reads it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = probe.run_probe(hwloc_xml=EPYC_9654_XML, memory_spec="24x DDR5-4800")
    bw = BandwidthSummary(isa="avx2", read_gbps=700.0, copy_gbps=None, triad_gbps=None,
                          node_read_gbps={0: 350.0, 1: 350.0},
                          matrix_read_gbps=((0, 0, 350.0), (0, 1, 160.0), (1, 0, 160.0), (1, 1, 350.0)),
                          sweep_read_gbps=((1, 30.0), (96, 350.0)))
    return probe.save_profile(replace(p, bandwidth=bw))


def edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc["profile"])
    path.write_text(json.dumps(doc))


def test_the_saved_profile_predicts(saved_profile):
    r = CliRunner().invoke(cli, PREDICT + ["--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["machine"]["node_read_gbps"] == 350.0


def _set(path: str, value):
    def change(profile):
        *parents, last = path.split(".")
        d = profile
        for k in parents:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[int(last) if isinstance(d, list) else last] = value
    return change


@pytest.mark.parametrize("field, value, message", [
    ("bandwidth.read_gbps", "fast", "field profile.bandwidth.read_gbps must be a finite number, not 'fast'"),
    ("bandwidth.read_gbps", True, "field profile.bandwidth.read_gbps must be a finite number, not True"),
    ("bandwidth.read_gbps", [700], "field profile.bandwidth.read_gbps must be a finite number, not [700]"),
    ("bandwidth.copy_gbps", "x", "field profile.bandwidth.copy_gbps must be"),
    ("bandwidth.node_read_gbps", [350.0], "field profile.bandwidth.node_read_gbps must be an object"),
    ("bandwidth.node_read_gbps", {"zero": 350.0}, "field profile.bandwidth.node_read_gbps has the key 'zero'"),
    ("bandwidth.node_read_gbps", {"0": "350"}, "field profile.bandwidth.node_read_gbps['0'] must be a finite"),
    ("bandwidth.matrix_read_gbps", [[0, 0]], "field profile.bandwidth.matrix_read_gbps[0] must be a list of 3"),
    ("bandwidth.sweep_read_gbps", [[1.5, 30.0]], "field profile.bandwidth.sweep_read_gbps[0][0] must be a whole"),
    ("bandwidth", "none", "field profile.bandwidth must be an object (BandwidthSummary), not 'none'"),
    ("quick", "yes", "field profile.quick must be true or false, not 'yes'"),
    ("quick", 1, "field profile.quick must be true or false, not 1"),
    ("probe_seconds", None, "field profile.probe_seconds must be a finite number, not None"),
    ("hostname", 42, "field profile.hostname must be a string, not 42"),
    ("inventory.topology.nodes", "two", "field profile.inventory.topology.nodes must be a list"),
    ("inventory.memory.mem_total_bytes", 1.5, "field profile.inventory.memory.mem_total_bytes must be a whole"),
    ("inventory.memory.mem_total_bytes", "lots", "field profile.inventory.memory.mem_total_bytes must be"),
])
def test_a_wrong_type_in_machine_json_names_the_field(saved_profile, field, value, message):
    edit(saved_profile, _set(field, value))
    for args in (PREDICT, ["probe", "--show"]):
        r = run(args)
        line = refused(r, str(saved_profile), message, code=1)
        assert line.startswith(f"Error: {saved_profile}: field ")
        assert "hint: re-run `cputune probe`" in r.output


@pytest.mark.parametrize("field, value, message", [
    ("bandwidth.node_read_gbps", {"0": -174.72, "1": 350.0},
     "field profile.bandwidth.node_read_gbps[0] must be a number above 0 and at most 10000, not -174.72"),
    ("bandwidth.node_read_gbps", {"0": 0, "1": 0}, "node_read_gbps[0] must be a number above 0"),
    ("bandwidth.node_read_gbps", {"0": 1e9, "1": 350.0}, "not 1000000000.0"),
    ("bandwidth.node_read_gbps", {}, "field profile.bandwidth.node_read_gbps is empty"),
    ("bandwidth.sweep_read_gbps", [[1, -30.0]], "field profile.bandwidth.sweep_read_gbps[0] must be"),
    ("bandwidth.matrix_read_gbps", [[0, 1, 0.0]], "field profile.bandwidth.matrix_read_gbps[0] must be"),
    ("inventory.topology.packages", [], "field profile.inventory.topology.packages must list from 1 to 32, not 0"),
    ("inventory.memory.mem_total_bytes", -1, "field profile.inventory.memory.mem_total_bytes must be"),
])
def test_an_impossible_figure_in_machine_json_names_the_field(saved_profile, field, value, message):
    edit(saved_profile, _set(field, value))
    r = run(PREDICT)
    refused(r, str(saved_profile), message, code=1)
    assert "hint: re-run `cputune probe`" in r.output


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_in_machine_json_are_refused(saved_profile, literal):
    saved_profile.write_text(re.sub(r'"read_gbps": [0-9.]+', f'"read_gbps": {literal}', saved_profile.read_text(),
                                    count=1))
    refused(run(PREDICT), "field profile.bandwidth.read_gbps must be a finite number", code=1)


def test_a_missing_field_in_machine_json_is_named(saved_profile):
    edit(saved_profile, lambda p: p.pop("hostname"))
    refused(run(PREDICT), f"{saved_profile}: field profile.hostname is missing", code=1)


def test_from_plain_is_strict_about_numbers():
    assert from_plain(float, 3) == 3.0 and isinstance(from_plain(float, 3), float)
    assert from_plain(tuple[int, ...], [1, 2]) == (1, 2)
    assert from_plain(dict[int, float], {"0": 1}) == {0: 1.0}
    for tp, value in ((int, "3"), (int, 3.0), (int, True), (float, "3.5"), (float, math.nan), (bool, 0),
                      (str, 3), (tuple[int, ...], "12"), (dict[int, float], [1.0])):
        with pytest.raises(ConfigError, match=r"^field x must be"):
            from_plain(tp, value, "x")
    # A number no saved figure comes near is refused before float() (OverflowError on 10**400)
    # or a statistic over it (fsum of 1e308 samples) can fail on it.
    for tp, value in ((float, 10**400), (int, 10**400), (float, 1e308), (float, -1e300), (int, 1 << 63),
                      (tuple[float, ...], [1.0, 1e308])):
        with pytest.raises(ConfigError, match=r"far beyond any figure cputune saves"):
            from_plain(tp, value, "x")
    assert from_plain(int, 1 << 50) == 1 << 50 and from_plain(float, 1e15) == 1e15


# ---- tuned.json ----------------------------------------------------------------------------------

def tuned_store(tmp_path) -> tuple[Path, Path]:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 100)

    def kr(kind, best):
        return tune.KindResult(kind, f"{kind}8", tune.Knobs(threads=2), best, 10.0, 11.0, 1.1, (), 1.0, ())
    r = tune.TuneResult(model, 100, "vm", "0c1e57098", 60, 50, 0,
                        (kr("tg", tune.Knobs(threads=1)), kr("pp", tune.Knobs(threads=2))), "2026-01-01")
    store = tmp_path / "tuned.json"
    tune.save(r, store)
    assert tune.tuned_for(model, store) == r
    return model, store


@pytest.mark.parametrize("field, value, message", [
    ("threads", 0, "best.threads must be a whole number from 1 to 4096, not 0"),
    ("threads", -4, "best.threads must be a whole number from 1 to 4096, not -4"),
    ("threads", 100000, "not 100000"),
    ("threads", "4", "best.threads must be a whole number, not '4'"),
    ("threads", 4.5, "best.threads must be a whole number, not 4.5"),
    ("threads", True, "best.threads must be a whole number, not True"),
    ("cache_type", "q4_K", "best.cache_type: unknown KV cache type 'q4_K'"),
    ("cache_type", 8, "best.cache_type must be a string, not 8"),
    ("flash_attn", "maybe", "best.flash_attn must be one of on, off, auto, not 'maybe'"),
    ("numa", "everywhere", "best.numa: unknown --numa 'everywhere'"),
    ("n_ubatch", 0, "best.n_ubatch must be a whole number from 1 to 2048, not 0"),
    ("n_batch", None, "best.n_batch must be a whole number, not None"),
    ("repack", "no", "best.repack must be true or false, not 'no'"),
])
def test_a_wrong_setting_in_tuned_json_names_the_file_and_field(tmp_path, field, value, message):
    model, store = tuned_store(tmp_path)
    doc = json.loads(store.read_text())
    key = str(model.resolve())
    doc["profiles"][key]["results"][0]["best"][field] = value
    store.write_text(json.dumps(doc))
    for read in (lambda: tune.load_all(store), lambda: tune.tuned_for(model, store)):
        with pytest.raises(ConfigError) as e:
            read()
        assert e.value.message.startswith(f"{store}: field profiles[{key!r}].results[0].")
        assert message in e.value.message and "re-run `cputune tune`" in e.value.hint


@pytest.mark.parametrize("field, value, message", [
    ("gain", math.inf, "must be a finite number"),  # json writes Infinity; from_plain refuses it
    ("gain", 0, "results[0].gain must be a number above 0, not 0.0"),
    ("best_tokens_per_s", -3, "results[0].best_tokens_per_s must be a number above 0"),
    ("kind", "xx", "results[0].kind must be one of tg, pp, not 'xx'"),
])
def test_impossible_results_in_tuned_json_are_refused(tmp_path, field, value, message):
    model, store = tuned_store(tmp_path)
    doc = json.loads(store.read_text())
    doc["profiles"][str(model.resolve())]["results"][0][field] = value
    store.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=re.escape(message)):
        tune.tuned_for(model, store)


def test_serve_says_what_is_wrong_with_tuned_json(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model, _ = tuned_store(tmp_path)
    store = tune.tuned_path()
    store.parent.mkdir(parents=True)
    doc = json.loads((tmp_path / "tuned.json").read_text())
    doc["profiles"][str(model.resolve())]["results"][0]["best"]["threads"] = "many"
    store.write_text(json.dumps(doc))
    with pytest.raises(ConfigError) as e:
        tune.tuned_for(model)
    assert f"{store}: field " in e.value.message and "--no-tuned" in e.value.hint


# ---- flags ---------------------------------------------------------------------------------------

HW = ["--hardware", "epyc-9655-2s"]
SYNTH = ["synth", "--arch", "llama", "--out", "x.gguf"]
BAD_FLAGS = [
    # thread lists run here by llama-bench: bench and calibrate
    *[(["bench", "--threads", v], "--threads", msg) for v, msg in [
        ("a,b", "thread count 'a' in 'a,b' is not a whole number"), ("0", "thread count 0 in '0' must be from 1"),
        ("-4", "thread count -4"), ("100000", "thread count 100000 in '100000' must be from 1 to"),
        ("4,,8", "thread count '' in '4,,8'"), ("1.5", "thread count '1.5'"), ("", "thread count ''"),
        ("nan", "thread count 'nan'")]],
    *[(["calibrate", "--threads", v], "--threads", f"in {v!r}") for v in ("x", "0", "99999", "2;4")],
    # one thread count for a described box
    *[([*PREDICT, *HW, "--threads", v], "--threads", "") for v in ("0", "-1", "100000", "two", "1.5")],
    *[(["select", "--model", "deepseek-r1", *HW, "-t", v], "--threads", "") for v in ("0", "5000")],
    *[(["serve", "--dry-run", "--threads", v], "--threads", v) for v in ("0", "-3", "100000", "x")],
    *[(["serve", "--dry-run", "--threads-batch", v], "--threads-batch", v) for v in ("0", "100000")],
    *[(["worker", "--dry-run", "--threads", v], "--threads", v) for v in ("0", "9999")],
    # finite speeds
    *[(["select", "--model", "deepseek-r1", *HW, "--min-tps", v], "--min-tps", v)
      for v in ("nan", "inf", "-inf", "0", "-5", "2000000", "fast")],
    *[(["plan", "--model", "deepseek-r1", "--target-tps", v], "--target-tps", v) for v in ("inf", "nan", "0", "-1")],
    # KV cache types: one check for predict, select, plan and tune
    *[([*PREDICT, *HW, "--cache-type", v], "", f"unknown KV cache type {v!r}")
      for v in ("q4_K", "q8", "f64", "", "Q4_K_M")],
    *[(["select", "--model", "deepseek-r1", *HW, "--cache-type", v], "", f"unknown KV cache type {v!r}")
      for v in ("q4_K", "xx")],
    *[(["plan", "--model", "deepseek-r1", "--cache-type", v], "", f"unknown KV cache type {v!r}")
      for v in ("q4_K",)],
    *[(["tune", "--cache-types", v], "", msg) for v, msg in [
        ("f16,q4_K", "unknown KV cache type 'q4_K'"), (",", "no KV cache type in ','"), ("fp16", "'fp16'")]],
    # sizes
    *[([*SYNTH, "--size", v], "--size", msg) for v, msg in [
        ("0", "the size '0' must be from 1 byte to 1 PiB"), ("0GB", "the size '0GB'"), ("-2GB", "cannot read"),
        ("99999TB", "the size '99999TB' must be"), ("2XB", "cannot read the size '2XB'"), ("nan", "cannot read")]],
    *[(["calibrate", "--size", v], "--size", f"size {v!r}") for v in ("0", "lots")],
    *[(["bench", "--twin", v], "--twin", f"size {v!r}") for v in ("0", "big", "-1")],
    *[([*SYNTH, "--size", "2GB", "--seed", v], "--seed", v) for v in ("-1", "99999999999", "x")],
    # tune's budget
    *[(["tune", "--budget", v], "--budget", msg) for v, msg in [
        ("0s", "the duration '0s' is not positive"), ("0", "is not positive"), ("-1m", "cannot read the duration"),
        ("soon", "cannot read the duration 'soon'"), ("nan", "cannot read"), ("inf", "cannot read"),
        ("1e9h", "cannot read"), ("999999h", "the duration '999999h' is longer than 7 days")]],
    # token counts, context sizes, repetitions
    *[([*PREDICT, *HW, "--depth", v], "--depth", "") for v in ("-1", "x", "99999999999")],
    *[(["bench", "--depth", v], "--depth", "") for v in ("-5", "1e9")],
    *[(["bench", "--n-prompt", v], "--n-prompt", "") for v in ("-1", "999999999")],
    *[(["tune", "--n-gen", v], "--n-gen", "") for v in ("0", "-1", "999999999")],
    *[(["select", "--model", "deepseek-r1", *HW, "--ctx", v], "--ctx", "") for v in ("0", "-8192", "999999999")],
    *[(["serve", "--dry-run", "--ctx", v], "--ctx", "") for v in ("0", "999999999")],
    *[(["bench", "--reps", v], "--reps", "") for v in ("0", "100000")],
    *[(["calibrate", "--passes", v], "--passes", "") for v in ("0", "1000")],
    *[(["build", "--jobs", v], "--jobs", "") for v in ("0", "100000")],
    *[(["serve", "--dry-run", "--port", v], "--port", "") for v in ("0", "65536", "http")],
    # numbers with more digits than int() takes (4300) or float() keeps finite (400 nines)
    (["bench", "--threads", "1" * 5000], "", "thread count 111111111111..."),
    ([*SYNTH, "--size", "9" * 400], "", "the size '9999"),
    (["tune", "--budget", "9" * 400], "", "cannot read the duration '9999"),
    (["serve", "--dry-run", "--numa", "node:" + "1" * 5000], "", "unknown --numa 'node:1111"),
    (["serve", "--dry-run", "--rpc", "h:\u00b2"], "", "is not host:port"),
    (["serve", "--dry-run", "--rpc", "h:" + "1" * 5000], "", "is not host:port"),
    (["probe", "--no-bandwidth", "--memory", "1" * 5000 + "x DDR5-6000"], "", "cannot read memory spec '1111"),
]


@pytest.mark.parametrize("args, flag, message", BAD_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_a_bad_flag_is_refused_in_one_line_naming_it(tmp_path, monkeypatch, args, flag, message):
    """`flag` is named in the line unless the message says what the value is (a KV cache type)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: refused before any of it is read
    monkeypatch.chdir(tmp_path)
    r = run(args)
    line = refused(r, flag, message)  # `message` quotes the bad value (or the bad item of a list)
    if not message:
        value = args[args.index(flag) + 1] if flag in args else args[args.index("-t") + 1]
        assert value in line, line


@pytest.mark.parametrize("args", [["inspect", ""], ["predict", "-m", "", "-q", "q4_k_m", *HW],
                                  ["select", "--model", "", *HW], ["plan", "--model", ""]],
                         ids=lambda a: a[0])
def test_an_empty_model_argument_is_one_line_saying_so(tmp_path, monkeypatch, args):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # "" is not read as "." (this folder)
    line = refused(run(args), "the model argument is empty")
    assert "is a folder" not in line


def test_a_depth_beyond_the_trained_context_is_refused_naming_n_ctx_train():
    r = run([*PREDICT, *HW, "--depth", "200000"])
    refused(r, "a depth of 200000 tokens is beyond the context", "(n_ctx_train 163840 tokens)", code=1)
    assert run([*PREDICT, *HW, "--depth", "163840"]).exit_code == 0


def test_bench_and_tune_count_the_test_tokens_with_the_depth():
    from cputune.model.catalog import catalog_profile
    from cputune.cli import check_test_context

    prof = catalog_profile("deepseek-r1", "q4_k_m")
    check_test_context(prof, 163840 - 256, n_prompt=256, n_gen=32)
    with pytest.raises(ConfigError, match=r"^--depth 163700 \+ --n-prompt 256 = 163956 tokens is beyond the "
                                          r"context .* \(n_ctx_train 163840 tokens\)"):
        check_test_context(prof, 163700, n_prompt=256, n_gen=32)
    with pytest.raises(ConfigError, match=r"--n-gen 300 = 164000 tokens"):
        check_test_context(prof, 163700, n_prompt=0, n_gen=300)


def test_thread_lists_are_bounded_by_the_cpus_this_process_may_use():
    assert units.parse_threads("1,4,4,2", cpus=2) == (1, 4, 2)
    assert units.parse_threads("8", cpus=2) == (8,)  # oversubscribing 4x is allowed
    with pytest.raises(ConfigError, match=r"^thread count 9 in '9' must be from 1 to 8$") as e:
        units.parse_threads("9", cpus=2)
    assert "2 CPUs" in e.value.hint
    assert units.parse_threads("4096", cpus=100000) == (4096,)
    with pytest.raises(ConfigError):
        units.parse_threads("4097", cpus=100000)  # checks.MAX_THREADS caps a huge box too


def test_the_flag_checks_pass_good_values():
    r = CliRunner().invoke(cli, ["select", "--model", "deepseek-r1", *HW, "--min-tps", "2.5", "--cache-type", "Q8_0",
                                 "--ctx", "4096", "-t", "96", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["selection"]["settings"]["cache_type"] == "q8_0"
    r = CliRunner().invoke(cli, ["plan", "--model", "deepseek-r1", "--quant", "q4_k_m", "--target-tps", "10",
                                 "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output


# ---- tune's budget -------------------------------------------------------------------------------

class Clocked:
    """A scripted llama-bench on a fake clock: each run costs (reps + 1) x `rep_s` seconds."""

    def __init__(self, speed: float = 10.0, rep_s: float = 1.0):
        self.speed, self.rep_s, self.now, self.calls = speed, rep_s, 0.0, []

    def clock(self) -> float:
        return self.now

    def __call__(self, k, reps):
        self.calls.append((k, reps))
        self.now += (reps + 1) * self.rep_s
        return [self.speed * (1.2 if k.threads == 4 else 1.0)] * reps, (reps + 1) * self.rep_s


def kind_job(kind="tg", n_tokens=10, predict=lambda k: 10.0):
    space = tune.Space(placements=tuple((t, "off") for t in (8, 4, 2)), n_ubatch=(512,), flash_attn=("auto",),
                       repack=(True, False), cache_types=("f16",), notes=())
    return tune.KindJob(kind, n_tokens, 0, tune.Knobs(threads=8), space, predict)


def test_a_budget_shorter_than_one_baseline_is_refused_before_running():
    fake = Clocked()
    # tg10 at a predicted 10 t/s: (3 reps + warmup) x 1 s = 4 s of baseline; a 1 s budget cannot hold it.
    with pytest.raises(ConfigError, match=r"a budget of 1 s is shorter than one baseline .*tg10: about 4 s") as e:
        tune.tune_kinds([kind_job()], lambda job: fake, 1.0, clock=fake.clock)
    assert "--budget 40s" in e.value.hint and fake.calls == []


def test_a_budget_spent_on_the_baseline_measures_nothing_else_and_says_so():
    fake = Clocked(rep_s=2.0)  # twice as slow as predicted: the 4 s predicted baseline takes 8 s
    results, notes = tune.tune_kinds([kind_job("tg"), kind_job("pp")], lambda job: fake, 5.0, clock=fake.clock)
    assert [r.kind for r in results] == ["tg"] and len(fake.calls) == 1  # the baseline, then nothing
    assert any("budget was spent on the baseline" in n for n in results[0].notes)
    assert notes == ["pp was not tuned: 0 s of the 5 s budget was left, and its baseline needs about 4 s"]
    assert results[0].best == results[0].default and results[0].gain == 1.0


@pytest.mark.parametrize("budget", [12.0, 20.0, 45.0, 90.0, 400.0])
def test_no_run_starts_that_would_pass_the_budget(budget):
    fake = Clocked()
    results, notes = tune.tune_kinds([kind_job("tg"), kind_job("pp")], lambda job: fake, budget, clock=fake.clock)
    assert fake.now <= budget  # the runs cost what was predicted, so none overran
    assert results and all(r.trials[0].stage == "baseline" for r in results)


class Slowing(Clocked):
    """From the fifth run on, every repetition takes 5 s instead of 1 s (another job started)."""

    def __call__(self, k, reps):
        if len(self.calls) >= 4:
            self.rep_s = 5.0
        return super().__call__(k, reps)


@pytest.mark.parametrize("budget", [30.0, 60.0, 80.0])
def test_runs_that_get_slower_are_scheduled_by_what_they_take_now(budget):
    fake = Slowing()
    r = tune.tune_kind(kind_job(), fake, budget, clock=fake.clock)
    assert fake.now <= budget  # estimated from the baseline alone, the 30 s budget ran to 50 s


def test_a_winner_with_no_budget_left_to_confirm_it_is_not_kept():
    fake = Slowing()
    r = tune.tune_kind(kind_job(), fake, 30.0, clock=fake.clock)
    assert any(t.knobs.threads == 4 and t.outcome == "best" for t in r.trials)  # the search's winner...
    assert r.best == r.default and r.gain == 1.0  # ...never ran beside the defaults, so it is not kept
    assert not any(t.stage == "confirm" for t in r.trials)
    assert any("was not run alternately with the defaults (no budget left)" in n for n in r.notes)


@pytest.mark.llama
def test_bench_and_tune_refuse_a_depth_beyond_the_trained_context(own_cache, tiny_models):
    assert run(["probe", "--quick"]).exit_code == 0
    path = str(tiny_models["llama"].quantized["q8_0"])  # trained context 2048 (conftest TINY_LLAMA)
    r = run(["bench", "-m", path, "--depth", "2000", "--n-gen", "16"])
    refused(r, "--depth 2000 + --n-prompt 256 = 2256 tokens is beyond the context", "(n_ctx_train 2048 tokens)",
            code=1)
    r = run(["tune", "-m", path, "--depth", "2040", "--for", "tg", "--n-gen", "16"])
    refused(r, "--depth 2040 + --n-gen 16 = 2056 tokens", "(n_ctx_train 2048 tokens)", code=1)


# ---- names from files are shown, not acted on --------------------------------------------------

@pytest.mark.parametrize("raw, markup, plain", [
    ("[red]x[/red]", r"\[red]x\[/red]", "[red]x[/red]"),
    ("a\x1b[2Jb\nc\td", r"a\x1b[2Jb\nc\td", r"a\x1b[2Jb\nc\td"),
    ("left\u202eright", r"left\u202eright", r"left\u202eright"),
    ("bad\udcffbyte", r"bad\udcffbyte", r"bad\udcffbyte"),
    ("DeepSeek-R1 日本 é /models/a\\b.gguf", "DeepSeek-R1 日本 é /models/a\\b.gguf",
     "DeepSeek-R1 日本 é /models/a\\b.gguf"),
])
def test_printable_escapes_control_characters_and_markup(raw, markup, plain):
    assert checks.printable(raw) == markup
    assert checks.printable(raw, markup=False) == plain


def test_an_error_quoting_a_hostile_name_prints_it_escaped_on_one_line(tmp_path):
    folder = tmp_path / "evil\x1b[2J\nname"
    folder.mkdir()
    r = run(["inspect", str(folder / "missing.gguf")])
    line = refused(r, code=1)
    assert "\x1b" not in r.output and "evil\\x1b[2J\\nname" in line, r.output


LONG = "a" * 300


@pytest.mark.parametrize("args", [["inspect", f"{LONG}.gguf"], ["inspect", f"/tmp/{LONG}/m.gguf"],
                                  [*PREDICT, "--hardware", f"{LONG}.toml"],
                                  ["report", "-o", f"{LONG}.html", "--no-charts"]],
                         ids=("model", "model folder", "hardware", "report"))
def test_a_path_the_system_refuses_is_one_line_naming_it(tmp_path, monkeypatch, args):
    """A name of 300 bytes (ENAMETOOLONG) fails inside pathlib before cputune's own checks:
    still one line that names the path and why, exit 1, no traceback."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    line = refused(run(args), "File name too long")
    assert "aaaaaaaa" in line
