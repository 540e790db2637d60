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

from cputune import checks, hardware, probe
from cputune.bandwidth import BandwidthSummary
from cputune.cli import cli
from cputune.errors import ConfigError
from cputune.jsonio import from_plain
from cputune.memory import parse_memory_spec

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
    ("isa = [", 'isa = "avx512f"\nisa_was = [', "[cpu] isa must be a list of strings from: avx2"),
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
    ('name = "', 'name = 7\nname_was = "', "name must be a string, not 7"),
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
