"""Findings and the theoretical peak: each rule fires on the number behind it, and only then."""

from __future__ import annotations

import dataclasses

import pytest

from cputune.machine import bandwidth, findings as fd
from cputune.machine.bandwidth import BandwidthSummary
from cputune.machine.memory import Dimm, MemoryInfo, NodeMemory, parse_memory_spec
from cputune.machine.peak import peak_bandwidth
from cputune.machine.topology import NumaNode, build_topology

GIB = 1 << 30


def machine(nodes=2, sockets=2, cores_per_node=4, smt=1, model="AMD EPYC 9655 96-Core Processor",
            allowed=None, flags=("avx2", "fma", "f16c", "avx512f")):
    """A hand-built topology: `nodes` nodes spread evenly over `sockets`, one L3 per node."""
    cpus_per_node = cores_per_node * smt
    ncpu = nodes * cpus_per_node
    node_objs, package_of, siblings_of, l3_of = [], {}, {}, {}
    for n in range(nodes):
        cpus = tuple(range(n * cpus_per_node, (n + 1) * cpus_per_node))
        node_objs.append(NumaNode(n, cpus, 64 * GIB, 60 * GIB, (), (n,)))
        for i, c in enumerate(cpus):
            package_of[c] = c * sockets // ncpu
            siblings_of[c] = tuple(cpus[(i // smt) * smt:(i // smt + 1) * smt])
            l3_of[c] = cpus
    return build_topology(
        cpu_model=model, cpu_vendor="AuthenticAMD", online_cpus=range(ncpu), offline_cpus=(),
        package_of=package_of, core_id_of={}, siblings_of=siblings_of, l3_of=l3_of,
        l3_size_of={c: 32 << 20 for c in range(ncpu)}, nodes=node_objs,
        allowed_cpus=allowed if allowed is not None else range(ncpu), allowed_node_ids=None,
        cgroup_memory_limit_bytes=None, isa_flags=flags, source="sysfs")


def memory(topo, **kw):
    base = MemoryInfo(mem_total_bytes=sum(n.mem_total_bytes for n in topo.nodes),
                      mem_available_bytes=100 * GIB,
                      nodes=tuple(NodeMemory(n.id, n.mem_total_bytes, n.mem_free_bytes) for n in topo.nodes),
                      thp_enabled="madvise", thp_defrag="madvise", hugepages=(), numa_balancing=0,
                      governors={"performance": len(topo.online_cpus)}, kernel_release="6.8",
                      dimms=(), dimm_slots=None, dimm_source="none", dimm_unreadable_reason="needs root")
    return dataclasses.replace(base, **kw)


def codes(found, level=None):
    return {f.code for f in found if level is None or f.level == level}


def dimm(socket, channel, configured=6000, rated=6000):
    return Dimm(f"DIMM_P{socket}_{channel}1", f"P{socket} CHANNEL {channel}", 64 * GIB, "DDR5",
                rated, configured, None, None)


def test_peak_from_spec_on_the_reference_box():
    t = machine()
    peak = peak_bandwidth(t, memory(t), parse_memory_spec("24x DDR5-6000"))
    # 12 channels x 6000e6 transfers/s x 8 B = 576.0 GB/s per socket; two sockets 1152.0.
    assert peak.channels_per_socket == (12, 12)
    assert peak.per_socket_gbps == pytest.approx((576.0, 576.0))
    assert peak.total_gbps == pytest.approx(1152.0) and peak.source == "--memory"


def test_two_dimms_per_channel_add_capacity_not_bandwidth():
    t = machine()
    peak = peak_bandwidth(t, memory(t), parse_memory_spec("48x DDR5-4800"))
    assert peak.channels == 24 and peak.total_gbps == pytest.approx(24 * 4800e6 * 8 / 1e9)
    assert "2 DIMMs per channel" in peak.notes[0]


def test_peak_from_dimm_records_uses_the_slowest_configured_speed():
    t = machine()
    dimms = tuple(dimm(s, c) for s in (0, 1) for c in "ABCDEFGH")  # 8 of 12 channels each
    dimms += (dimm(1, "I", configured=5600),)
    peak = peak_bandwidth(t, memory(t, dimms=dimms, dimm_source="dmidecode"))
    assert peak.channels_per_socket == (8, 9) and peak.mts == 5600
    found = fd.memory_findings(t, memory(t, dimms=dimms, dimm_source="dmidecode"), peak)
    channel_msgs = [f.message for f in found if f.code == "channels"]
    assert channel_msgs[0].startswith("socket 0 has 8 of 12 memory channels populated")
    assert any("rated 6000 MT/s run at 5600 MT/s" in f.message for f in found)


def test_no_dimm_data_and_no_spec_says_how_to_get_a_peak():
    t = machine()
    m = memory(t)
    assert peak_bandwidth(t, m) is None
    f = next(f for f in fd.memory_findings(t, m, None) if f.code == "dimms-unknown")
    assert "needs root" in f.message and "--memory" in f.hint


def test_numa_balancing_matters_only_with_several_nodes():
    two, one = machine(nodes=2), machine(nodes=1, sockets=1)
    assert "numa-balancing" in codes(fd.memory_findings(two, memory(two, numa_balancing=1), None), "warn")
    assert "numa-balancing" not in codes(fd.memory_findings(one, memory(one, numa_balancing=1), None))
    assert "numa-balancing" not in codes(fd.memory_findings(two, memory(two), None))


def test_memory_settings_findings():
    t = machine()
    found = fd.memory_findings(t, memory(t, thp_enabled="never", governors={"powersave": 8}), None)
    assert {"thp", "governor"} <= codes(found, "warn")
    # Node tables covering a third of MemTotal (this VM's case) are called out.
    short = memory(t, mem_total_bytes=3 * 128 * GIB)
    f = next(f for f in fd.memory_findings(t, short, None) if f.code == "node-memory")
    assert "128.0 GiB" in f.message and "384.0 GiB" in f.message


def test_topology_findings():
    assert "smt" in codes(fd.topology_findings(machine(smt=2)))
    smt = next(f for f in fd.topology_findings(machine(smt=2)) if f.code == "smt")
    assert "give llama.cpp 8 threads" in smt.message and "not 16" in smt.message
    nps4 = fd.topology_findings(machine(nodes=8, sockets=2))
    assert "split into 4 NUMA nodes" in next(f.message for f in nps4 if f.code == "split-sockets")
    assert "too-many-nodes" not in codes(nps4)
    assert "too-many-nodes" in codes(fd.topology_findings(machine(nodes=16, sockets=2)), "warn")
    hidden = fd.topology_findings(machine(allowed=range(4)))
    assert "may use 4 of 8 online CPUs" in next(f.message for f in hidden if f.code == "cpuset")
    assert "no-avx2" in codes(fd.topology_findings(machine(flags=("f16c",))), "bad")  # Ivy Bridge
    assert "numa-hidden" in codes(fd.topology_findings(machine(nodes=1, sockets=2)), "warn")


def bw(read, nodes=None, sweep=()):
    return BandwidthSummary("avx2", read, None, None, nodes or {0: read / 2, 1: read / 2}, (), sweep)


def test_read_bandwidth_against_the_peak():
    t = machine()
    peak = peak_bandwidth(t, memory(t), parse_memory_spec("24x DDR5-6000"))
    good = next(f for f in fd.bandwidth_findings(t, bw(1000.0), peak) if f.code == "read-vs-peak")
    assert good.level == "ok" and "87% of the theoretical 1152.0 GB/s" in good.message
    low = next(f for f in fd.bandwidth_findings(t, bw(500.0), peak) if f.code == "read-vs-peak")
    assert low.level == "warn" and "43%" in low.message


def test_node_imbalance_and_saturation():
    t = machine()
    found = fd.bandwidth_findings(t, bw(500.0, {0: 300.0, 1: 200.0, 2: 300.0}), None)
    assert [f.message for f in found if f.code == "node-imbalance"] == [
        "node 1 reads 200.0 GB/s, 33% below the median node (300.0 GB/s)"]
    sweep = ((1, 40.0), (2, 80.0), (4, 200.0), (8, 210.0))
    found = fd.bandwidth_findings(t, bw(420.0, sweep=sweep), None)
    assert "with 4 of 8 cores" in next(f.message for f in found if f.code == "saturation")


def test_all_findings_are_worst_first():
    t = machine(flags=("f16c",), smt=2)
    found = fd.all_findings(t, memory(t, numa_balancing=1), None, None, ("arrays too small",))
    levels = [fd.LEVELS.index(f.level) for f in found]
    assert levels == sorted(levels, reverse=True) and found[0].level == "bad"


# The host of issue 18: one 2-thread read (512 MiB per thread, 12 trials) called three times a
# few seconds apart read 29.4, then 59.0, then 56.8 GB/s at best. Trials in GB/s, the first slow.
ISSUE_RUN = bandwidth.Run("node 0", "node", "read", (0, 1), (0, 0), 512 << 20, 12, 0, 0)
ISSUE_TRIALS = (
    (14.1, 29.4, 29.1, 28.9, 29.3, 28.8, 29.0, 29.2, 28.7, 29.1, 28.9, 29.0),
    (30.2, 58.4, 59.0, 58.1, 57.9, 58.8, 58.6, 58.3, 57.8, 58.9, 58.2, 58.5),
    (29.8, 56.8, 56.1, 55.9, 56.5, 56.3, 55.6, 56.7, 56.0, 56.4, 55.8, 56.2),
)


def replayed(trials, run=ISSUE_RUN, every_s=4.0):
    """The bursts as bandwidth.measure would have made them from the kernel's seconds."""
    n = run.bytes_per_array // 8
    per_trial = 8 * n * len(run.cpus)
    return [dataclasses.replace(bandwidth.from_seconds(run, "avx2", [per_trial / (g * 1e9) for g in rates],
                                                       1.0 * n * len(run.cpus), n), burst=k, at_s=every_s * k)
            for k, rates in enumerate(trials)]


def test_bimodal_bursts_are_a_finding_with_the_figure_used():
    t = machine(nodes=1, sockets=1, cores_per_node=2)
    bw_ = bandwidth.summarize_measurements(replayed(ISSUE_TRIALS))
    assert bw_.read_gbps == pytest.approx(59.0) and bw_.node_read_gbps[0] == pytest.approx(59.0)
    assert bw_.read_spread.median_gbps == pytest.approx(56.8)
    f = next(f for f in fd.bandwidth_findings(t, bw_, None) if f.code == "bandwidth-varies")
    assert f.level == "warn"
    assert f.message.startswith("read bandwidth varies 29.4–59.0 GB/s between 3 bursts over 8 s")
    assert "this host is shared or throttling; predictions use the best burst, 59.0 GB/s (median 56.8)" \
        in f.message
    assert "(50% apart; the trials within one burst vary 2%)" in f.message  # (59.0 - 29.4) / 59.0


def test_steady_bursts_say_so():
    t = machine(nodes=1, sockets=1, cores_per_node=2)
    steady = tuple(ISSUE_TRIALS[1] for _ in range(3))
    found = fd.bandwidth_findings(t, bandwidth.summarize_measurements(replayed(steady)), None)
    assert "bandwidth-varies" not in codes(found)
    ok = next(f for f in found if f.code == "bursts")
    assert ok.level == "ok" and "steady over 3 bursts over 8 s: 59.0–59.0 GB/s" in ok.message
    # A profile without bursts (one measurement per run, as before issue 18) has no such finding.
    once = bandwidth.summarize_measurements(replayed(ISSUE_TRIALS[:1]))
    assert once.spreads == () and not codes(fd.bandwidth_findings(t, once, None)) & {"bursts", "bandwidth-varies"}
