"""The probe as a library and as `cputune probe`: layout, a real quick run, the saved profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.machine import bandwidth, probe
from cputune.cli import cli
from cputune.core.errors import ConfigError
from cputune.machine.hwloc_xml import load_hwloc_xml
from cputune.machine.topology import discover_topology

FIXTURES = Path(__file__).parent / "fixtures"
EPYC_9654 = FIXTURES / "hwloc" / "AMD-19h-Zen4-2xEpyc-9654.xml"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "cputune"


def test_threads_spread_over_ccds_first():
    t = load_hwloc_xml(EPYC_9654)
    cpus = probe.spread_over_l3(t, t.first_thread_per_core())
    assert len(cpus) == 192  # one per physical core, no SMT sibling
    first = [t.core_of_cpu(c).l3_index for c in cpus[:24]]
    assert sorted(first) == list(range(24))  # 24 threads on 24 different CCDs
    assert all(t.core_of_cpu(c).cpus[0] == c for c in cpus)


def test_layout_of_this_machine_has_one_cpu_per_core():
    t = discover_topology("/")
    inv = probe.take_inventory("/")
    lay = probe.make_layout(t, inv.memory)
    picked = [c for cs in lay.node_cores.values() for c in cs]
    assert len(picked) == len({t.core_of_cpu(c).index for c in picked})
    assert set(picked) <= set(t.allowed_cpus)
    assert lay.llc_bytes >= max(g.size_bytes or 0 for g in t.l3_groups)


def test_quick_probe_measures_saves_and_reads_back(cache):
    profile = probe.run_probe(quick=True)
    bw = profile.bandwidth
    assert bw.read_gbps > 0 and all(m.checksum_ok for m in profile.measurements)
    assert set(bw.node_read_gbps) == {n.id for n in profile.inventory.topology.nodes if n.cpus}
    # Every burst is kept, spread over the run (issue 18): no timing asserted, only the order.
    bursts = [m for m in profile.measurements if m.run.name == "node 0"]
    assert [m.burst for m in bursts] == list(range(bandwidth.QUICK_BURSTS))
    assert [m.at_s for m in bursts] == sorted(m.at_s for m in bursts)
    s = bw.read_spread
    assert len(s.burst_gbps) == bandwidth.QUICK_BURSTS and s.gbps == max(s.burst_gbps) == bw.read_gbps
    assert s.rule == bandwidth.FIGURE_RULE
    assert {"bursts", "bandwidth-varies"} & {f.code for f in profile.findings}
    path = probe.save_profile(profile)
    assert path == cache / "machine.json"
    assert probe.load_profile() == profile  # every dataclass survives the JSON round trip


def test_a_profile_from_before_bursts_still_loads(cache):
    """Profiles saved before issue 18 have one measurement per run and no spreads."""
    doc = json.loads((FIXTURES / "profiles" / "vm-before-bursts.json").read_text())
    cache.mkdir(parents=True)
    (cache / "machine.json").write_text(json.dumps(doc))
    p = probe.load_profile()
    assert p.bandwidth.spreads == () and p.bandwidth.read_spread is None
    assert p.measurements[0].burst == 0 and p.bandwidth.read_gbps == doc["profile"]["bandwidth"]["read_gbps"]
    assert "best of" not in dict(probe.summary_rows(p))["read bandwidth"]


def test_moment_reader_reads_this_box_at_a_thread_count():
    m = probe.moment_reader()(1)
    assert m.run.kind == "moment" and len(m.run.cpus) == 1 and m.checksum_ok
    assert m.gbps.n == bandwidth.MOMENT_NTIMES - 1 and m.best_gbps > 0


def test_a_damaged_profile_is_a_clear_error(cache):
    with pytest.raises(ConfigError, match="no machine profile"):
        probe.load_profile()
    cache.mkdir(parents=True)
    (cache / "machine.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        probe.load_profile()


def test_recorded_machine_gets_inventory_but_no_measurement(cache):
    profile = probe.run_probe(hwloc_xml=EPYC_9654, memory_spec="24x DDR5-4800")
    assert profile.bandwidth is None and profile.measurements == ()
    assert profile.inventory.peak.total_gbps == pytest.approx(24 * 4800e6 * 8 / 1e9)
    assert any(f.code == "probe" and f.level == "info" for f in profile.findings)


def test_cli_probe_json_and_show(cache):
    r = CliRunner().invoke(cli, ["probe", "--quick", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.machine/1"
    assert doc["profile"]["bandwidth"]["read_gbps"] > 0
    assert doc["profile"]["measurements"][0]["gbps"]["samples"]  # raw samples for scripts
    # Every burst, and the figure each burst-sampled run stands for, with its rule.
    assert [m["burst"] for m in doc["profile"]["measurements"] if m["run"]["name"] == "node 0"] == \
        list(range(bandwidth.QUICK_BURSTS))
    spread = doc["profile"]["bandwidth"]["spreads"][0]
    assert len(spread["burst_gbps"]) == bandwidth.QUICK_BURSTS and spread["rule"].startswith("best burst")
    assert spread["gbps"] == doc["profile"]["bandwidth"]["read_gbps"] and "median_gbps" in spread
    shown = CliRunner().invoke(cli, ["probe", "--show", "--json"], catch_exceptions=False)
    assert json.loads(shown.stdout) == doc
    table = CliRunner().invoke(cli, ["probe", "--show"], catch_exceptions=False)
    assert "read bandwidth" in table.stdout and "Findings" in table.stdout
    assert f"best of {bandwidth.QUICK_BURSTS} bursts" in table.stdout and "bursts (median)" in table.stdout


def test_cli_probe_of_an_lstopo_file(cache):
    r = CliRunner().invoke(cli, ["probe", "--hwloc-xml", str(EPYC_9654), "--memory", "24x DDR5-4800"],
                           catch_exceptions=False)
    assert r.exit_code == 0
    assert "2 sockets, 1 NUMA node, 192 cores, 384 CPUs (SMT on)" in r.stdout
    assert "921.6 GB/s peak" in r.stdout
    assert not (cache / "machine.json").exists()  # nothing measured, nothing saved


@pytest.mark.parametrize("args, message", [
    (["--memory", "lots"], "Error: cannot read memory spec 'lots'"),
    (["--sysfs-root", "/nonexistent-root"], "Error: /nonexistent-root is not a sysfs tree"),
    (["--show"], "Error: no machine profile at"),
])
def test_cli_probe_errors_are_one_line(cache, args, message):
    r = CliRunner().invoke(cli, ["probe", *args])
    assert r.exit_code == 1
    assert r.output.splitlines()[0].startswith(message)
    assert "hint:" in r.output and "Traceback" not in r.output
