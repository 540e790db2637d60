"""The C kernels compute the right thing on every ISA this CPU has; the planner follows STREAM's
rules and the memory caps; figures are sane against numpy in the same process."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest

from cputune import _bwprobe
from cputune.machine import bandwidth as bw
from cputune.core.errors import ProbeError

MIB = 1 << 20
CPU = min(os.sched_getaffinity(0))


@pytest.mark.parametrize("isa", bw.available_isas())
@pytest.mark.parametrize("kernel", bw.KERNELS)
def test_kernels_leave_the_expected_values(isa, kernel):
    fn = getattr(_bwprobe, f"{kernel}_{isa}")
    seconds, checksum, n = fn((CPU,), (-1,), 4 * MIB + 8, 3)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    assert n == (4 * MIB) // 8  # rounded down to whole 512-byte groups
    assert checksum == bw.EXPECTED_PER_ELEMENT[kernel] * n


def test_kernels_split_work_over_threads_and_nodes():
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    seconds, checksum, n = _bwprobe.read_scalar(cpus, (0,) * len(cpus), 1 * MIB, 2)
    assert checksum == n * len(cpus)


def test_pinning_does_not_leak_into_the_caller():
    before = os.sched_getaffinity(0)
    _bwprobe.read_scalar((CPU,), (-1,), MIB, 1)
    assert os.sched_getaffinity(0) == before


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="equally long"):
        _bwprobe.read_scalar((0, 1), (0,), MIB, 1)
    with pytest.raises(ValueError, match="ntimes"):
        _bwprobe.read_scalar((0,), (0,), MIB, 0)
    with pytest.raises(OSError) as e:
        _bwprobe.read_scalar((4095,), (-1,), MIB, 1)  # no such CPU here
    assert e.value.filename == "sched_setaffinity"
    with pytest.raises(OSError) as e:
        _bwprobe.read_scalar((CPU,), (63,), MIB, 1)  # no such node here
    assert e.value.filename == "mbind"


def test_isa_list_is_best_first_and_always_has_scalar():
    isas = bw.available_isas()
    assert isas[-1] == "scalar"
    assert isas == sorted(isas, key=["avx512", "avx2", "scalar"].index)
    flags = open("/proc/cpuinfo").read()
    assert ("avx512" in isas) == (" avx512f" in flags)


def test_array_size_follows_stream_rule_within_the_cap():
    # 2 x 384 MiB of L3 (dual EPYC 9654): each array >= 4 x 768 MiB = 3 GiB over 192 threads.
    per, note = bw.array_bytes(768 * MIB, 192, 3, cap_bytes=600 << 30)
    assert per * 192 >= 4 * 768 * MIB - 192 * 4096 and note is None
    # Tiny box: the 256 MiB floor applies.
    per, note = bw.array_bytes(32 * MIB, 2, 1, cap_bytes=8 << 30)
    assert per == 128 * MIB and note is None
    # Short of memory: the cap wins and the broken rule is said.
    per, note = bw.array_bytes(768 * MIB, 1, 3, cap_bytes=3 << 30)
    assert per == (1 << 30) and "4 x cache rule" in note


def two_node_layout() -> bw.Layout:
    # Cores listed spread across L3 groups, as the topology orders them.
    return bw.Layout(node_cores={0: (0, 8, 1, 9), 1: (16, 24, 17, 25)}, llc_bytes=128 * MIB,
                     node_llc_bytes={0: 64 * MIB, 1: 64 * MIB},
                     node_free_bytes={0: 64 << 30, 1: 64 << 30}, mem_available_bytes=120 << 30)


def test_plan_covers_nodes_machine_matrix_and_sweep():
    plan = bw.plan_probe(two_node_layout())
    kinds = [(r.kind, r.name, r.kernel) for r in plan.runs]
    assert ("node", "node 1", "triad") in kinds and ("machine", "all nodes", "copy") in kinds
    matrix = [r for r in plan.runs if r.kind == "matrix"]
    assert [(r.cpu_node, r.mem_node) for r in matrix] == [(0, 1), (1, 0)]
    assert matrix[0].cpus == (0, 8, 1, 9) and matrix[0].mem_nodes == (1, 1, 1, 1)
    sweep = [r for r in plan.runs if r.kind == "sweep"]
    assert [r.cpus for r in sweep] == [(0,), (0, 8)]  # 4 cores is the node run itself
    machine = [r for r in plan.runs if r.kind == "machine"][0]
    assert machine.mem_nodes == (0, 0, 0, 0, 1, 1, 1, 1)
    quick = bw.plan_probe(two_node_layout(), quick=True)
    assert {r.kernel for r in quick.runs} == {"read"} and {r.kind for r in quick.runs} == {"node", "machine"}


def test_plan_without_numa_leaves_placement_to_first_touch():
    lay = bw.Layout({0: (0, 1)}, 32 * MIB, {0: 32 * MIB}, {}, 16 << 30, numa=False)
    assert all(set(r.mem_nodes) == {-1} for r in bw.plan_probe(lay).runs)
    with pytest.raises(ProbeError):
        bw.plan_probe(bw.Layout({}, 0, {}, {}, 0))


def test_measurement_counts_bytes_the_stream_way():
    run = bw.Run("node 0", "node", "triad", (CPU,), (-1,), 8 * MIB, 4)
    m = bw.measure(run, "scalar")
    assert m.checksum_ok and not m.nt_stores
    assert m.bytes_per_trial == 24 * m.elements_per_thread
    assert m.gbps.n == 3  # the first trial is not counted (STREAM: best after the first)
    assert m.best_gbps == pytest.approx(m.bytes_per_trial / min(m.seconds[1:]) / 1e9)


def test_probe_read_is_sane_against_numpy_in_the_same_process():
    """Not a speed assertion: a factor-of-4 band catches a kernel that reads the wrong amount."""
    a = np.ones(64 * MIB // 8)
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        t.append(time.perf_counter() - t0)
    numpy_gbps = a.nbytes / min(t) / 1e9
    run = bw.Run("node 0", "node", "read", (CPU,), (-1,), 64 * MIB, 5)
    probe_gbps = bw.measure(run).best_gbps
    assert numpy_gbps / 4 < probe_gbps < numpy_gbps * 8


# --- bursts (issue 18) ----------------------------------------------------------------------------

def test_plan_spreads_read_bursts_over_the_probe():
    plan = bw.plan_probe(two_node_layout())
    steps = plan.schedule()
    repeated = [r for r in plan.runs if bw.is_burst_sampled(r)]
    assert {(r.kind, r.kernel) for r in repeated} == {("node", "read"), ("machine", "read"), ("sweep", "read")}
    for r in plan.runs:
        mine = [s for s in steps if s.run == r]
        assert len(mine) == (bw.BURSTS if r in repeated else 1)
        if r in repeated:  # round k starts no earlier than k x 12 s / 4
            assert [s.not_before_s for s in mine] == [k * bw.SPAN_S / (bw.BURSTS - 1) for k in range(bw.BURSTS)]
    # Copy, triad and the matrix fill the gaps between rounds, none after the last.
    rounds = [i for i, s in enumerate(steps) if s.run == repeated[0]]
    assert all(bw.is_burst_sampled(s.run) for s in steps[rounds[-1]:])
    assert sum(not bw.is_burst_sampled(s.run) for s in steps[:rounds[1]]) > 0
    quick = bw.plan_probe(two_node_layout(), quick=True).schedule()
    assert [s.not_before_s for s in quick if s.run.name == "node 0"] == [0.0, 1.0, 2.0, 3.0]


class Clock:
    """A clock that moves only when slept on or when a kernel 'runs' (0.25 s each)."""

    def __init__(self):
        self.t, self.slept = 100.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.slept.append(round(s, 6))
        self.t += s


def recorded_burst(run: bw.Run, best_gbps: float, spread: float = 0.02, ntimes: int = 12) -> bw.Measurement:
    """A read burst as the kernel returns it: `ntimes` trials whose best (after the first, slow
    one) reads best_gbps and the slowest `spread` less."""
    n = run.bytes_per_array // 8
    per_trial = 8 * n * len(run.cpus)
    rates = [best_gbps * (1 - spread * i / (ntimes - 2)) for i in range(ntimes - 1)]
    seconds = [per_trial / (0.5 * best_gbps * 1e9)] + [per_trial / (r * 1e9) for r in rates]
    return bw.from_seconds(run, "avx2", seconds, 1.0 * n * len(run.cpus), n)


# The issue's host: the same read (2 pinned threads, 512 MiB per thread, best of 12) gave 29.4,
# then 59.0, then 56.8 GB/s in three calls a few seconds apart.
ISSUE_RUN = bw.Run("node 0", "node", "read", (0, 1), (0, 0), 512 * MIB, 12, 0, 0)
ISSUE_BURSTS = (29.4, 59.0, 56.8)


def test_run_plan_waits_for_each_burst_and_keeps_every_one():
    plan = bw.plan_probe(bw.Layout({0: (0, 1)}, 32 * MIB, {0: 32 * MIB}, {0: 8 << 30}, 16 << 30), quick=True)
    clock, figures = Clock(), iter([30.0, 58.0, 31.0, 57.0])

    def kernel(run):
        clock.t += 0.25
        return recorded_burst(run, next(figures))

    ms = bw.run_plan(plan, measure_fn=kernel, clock=clock, sleep=clock.sleep)
    assert [(m.burst, m.at_s) for m in ms] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    assert clock.slept == [0.75, 0.75, 0.75]
    s = bw.summarize_measurements(ms)
    assert s.read_gbps == pytest.approx(58.0)
    assert s.read_spread.burst_gbps == pytest.approx((30.0, 58.0, 31.0, 57.0)) and s.read_spread.varies


def test_bimodal_bursts_give_the_best_and_say_they_disagree():
    ms = [dataclasses.replace(recorded_burst(ISSUE_RUN, g), burst=k, at_s=4.0 * k)
          for k, g in enumerate(ISSUE_BURSTS)]
    s = bw.combine_bursts(ms)
    assert s.burst_gbps == pytest.approx(ISSUE_BURSTS) and s.at_s == (0.0, 4.0, 8.0)
    assert s.gbps == pytest.approx(59.0) and s.median_gbps == pytest.approx(56.8)
    assert s.between == pytest.approx((59.0 - 29.4) / 59.0) and s.within == pytest.approx(0.02)
    assert s.varies and s.rule.startswith("best burst")
    # Bursts within 4 % of each other, trials within 2 %: steady.
    steady = bw.combine_bursts([recorded_burst(ISSUE_RUN, g) for g in (58.0, 59.0, 56.8)])
    assert not steady.varies and steady.gbps == pytest.approx(59.0)
    # Bursts 20 % apart, but trials inside each burst spread 30 %: noise, not phases.
    noisy = bw.combine_bursts([recorded_burst(ISSUE_RUN, g, spread=0.3) for g in (47.0, 59.0)])
    assert not noisy.varies
    # One burst: nothing to compare.
    assert not bw.combine_bursts(ms[:1]).varies


def test_moment_run_takes_the_first_cores_in_probe_order():
    lay = two_node_layout()
    one = bw.moment_run(lay, 1)
    assert one.cpus == (0,) and one.mem_nodes == (0,) and one.kind == "moment" and one.name == "1 core now"
    two = bw.moment_run(lay, 2)
    assert two.cpus == (0, 8) and two.bytes_per_array * 2 >= bw.QUICK_FLOOR_BYTES - 2 * 4096
    six = bw.moment_run(lay, 6)  # past node 0's four cores: node 1's, each on its own memory
    assert six.cpus == (0, 8, 1, 9, 16, 24) and six.mem_nodes == (0, 0, 0, 0, 1, 1)
    assert bw.moment_run(lay, 99).cpus == tuple(c for n in (0, 1) for c in lay.node_cores[n])
    flat = bw.Layout({0: (0, 1)}, 32 * MIB, {0: 32 * MIB}, {}, 16 << 30, numa=False)
    assert bw.moment_run(flat, 2).mem_nodes == (-1, -1)
    m = bw.checked(bw.measure(dataclasses.replace(bw.moment_run(flat, 1), cpus=(CPU,), bytes_per_array=8 * MIB)))
    assert m.best_gbps > 0 and m.gbps.n == bw.MOMENT_NTIMES - 1
