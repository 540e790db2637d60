"""Placement plans for recorded machines: the numactl prefix, llama.cpp's --numa and -t/-tb that
`cputune serve` would run with on dual-socket EPYC and Xeon boxes and on hwloc's sysfs trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from cputune.engine import serve
from cputune.core.errors import ConfigError, EngineError
from cputune.machine.hwloc_xml import load_hwloc_xml
from cputune.engine.placement import NumaChoice, llama_visible_nodes, parse_numa, plan_placement
from cputune.core.sysfs import format_cpulist
from cputune.machine.topology import discover_topology
from helpers import SERVER_FLAGS, xml_box

FIXTURES = Path(__file__).parent / "fixtures"
GiB = 1 << 30


def argv_for(p, model="/models/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf"):
    req = serve.ServeRequest(quant="q4_k_m", ctx_tokens=8192, port=8080)
    argv, warnings = serve.server_argv(Path("/opt/llama/bin/llama-server"), SERVER_FLAGS, Path(model), p, req)
    assert warnings == []
    return argv


# --- dual EPYC 9654 (Zen 4, 2 x 96 cores, SMT on), NPS1, 768 GiB per socket -------------------

EPYC_9654 = "AMD-19h-Zen4-2xEpyc-9654"


def test_9654_model_that_fits_one_node_goes_to_the_node_with_more_memory():
    t = xml_box(EPYC_9654, 768)
    # DeepSeek-R1 Q4_K_M: 377 GiB of weights, about 390 GiB with KV cache, compute and headroom
    p = plan_placement(t, "auto", numactl_available=True, numa_balancing=0, need_bytes=390 * GiB,
                       node_available_bytes={0: 700 * GiB, 1: 741 * GiB})
    assert (p.mode, p.node_ids, p.mem_node_ids) == ("node", (1,), (1,))
    assert p.numactl_argv == ("numactl", "--cpunodebind=1", "--membind=1")
    assert p.llama_numa is None  # --numa numactl would let ggml widen the main thread to every CPU
    assert (p.threads, p.threads_batch, p.physical_cores) == (96, 96, 96)
    assert format_cpulist(p.cpus) == "96-191,288-383"  # socket 1's cores and their SMT siblings
    assert "fits in node 1" in p.reason and p.warnings == ()
    assert argv_for(p) == [
        "numactl", "--cpunodebind=1", "--membind=1", "/opt/llama/bin/llama-server",
        "-m", "/models/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf", "--host", "127.0.0.1", "--port", "8080",
        "-c", "8192", "-t", "96", "-tb", "96", "-lm", "mmap", "--metrics"]


def test_9654_model_too_big_for_one_node_is_interleaved_over_both():
    t = xml_box(EPYC_9654, 768)
    # R1 Q8_0: 665 GiB of weights; with a 64k context more than either node has free
    p = plan_placement(t, "auto", numactl_available=True, numa_balancing=1, need_bytes=760 * GiB,
                       node_available_bytes={0: 740 * GiB, 1: 741 * GiB})
    assert (p.mode, p.node_ids, p.mem_node_ids) == ("interleave", (0, 1), (0, 1))
    assert p.numactl_argv == ("numactl", "--interleave=all") and p.llama_numa == "distribute"
    assert (p.threads, p.threads_batch) == (192, 192)
    assert format_cpulist(p.cpus) == "0-383"
    assert "more than any one node has" in p.reason
    assert [w for w in p.warnings if "numa_balancing is on (1)" in w]
    argv = argv_for(p)
    assert argv[:3] == ["numactl", "--interleave=all", "/opt/llama/bin/llama-server"]
    assert argv[argv.index("--numa") + 1] == "distribute" and argv[argv.index("-t") + 1] == "192"


def test_9654_without_numactl_distributes_by_first_touch():
    t = xml_box(EPYC_9654, 768)
    p = plan_placement(t, "auto", numactl_available=False, need_bytes=760 * GiB,
                       node_available_bytes={0: 740 * GiB, 1: 741 * GiB})
    assert (p.mode, p.numactl_argv, p.llama_numa, p.threads) == ("distribute", (), "distribute", 192)
    assert any("numactl is not installed" in w for w in p.warnings)


@pytest.mark.parametrize("numa, mode, numactl, llama_numa, threads, cpus", [
    ("node:0", "node", ("numactl", "--cpunodebind=0", "--membind=0"), None, 96, "0-95,192-287"),
    ("distribute", "distribute", (), "distribute", 192, "0-383"),
    ("isolate", "isolate", (), "isolate", 96, "0-383"),
    ("interleave", "interleave", ("numactl", "--interleave=all"), "distribute", 192, "0-383"),
    ("off", "off", (), None, 192, "0-383"),
])
def test_9654_explicit_modes(numa, mode, numactl, llama_numa, threads, cpus):
    p = plan_placement(xml_box(EPYC_9654, 768), numa, numactl_available=True)
    assert (p.mode, p.numactl_argv, p.llama_numa, p.threads, format_cpulist(p.cpus)) == \
        (mode, numactl, llama_numa, threads, cpus)
    assert p.requested == numa


# --- dual EPYC 7763 (Zen 3, recorded without SMT siblings), 512 GiB per socket ----------------

def test_7763_q8_0_distill_fits_a_node_and_r1_does_not():
    t = xml_box("AMD-19h-Zen3-2xEpyc-7763", 512)
    avail = {0: 500 * GiB, 1: 500 * GiB}
    small = plan_placement(t, "auto", need_bytes=80 * GiB, node_available_bytes=avail)  # a 70B distill Q8_0
    assert (small.mode, small.node_ids, small.threads) == ("node", (0,), 64)  # a tie goes to node 0
    assert small.numactl_argv == ("numactl", "--cpunodebind=0", "--membind=0")
    assert format_cpulist(small.cpus) == "0-63"
    big = plan_placement(t, "auto", need_bytes=713 * GiB, node_available_bytes=avail)
    assert (big.mode, big.threads, big.llama_numa) == ("interleave", 128, "distribute")


# --- dual Xeon Max 9460 (Sapphire Rapids, 2 x 40 cores, SMT on), SNC off -----------------------

def test_xeon_max_9460_node_plan_threads_are_physical_cores():
    t = xml_box("Intel-SapphireRapids-2xXeonMax9460", 256)
    p = plan_placement(t, "node:1", threads_batch=80)
    assert (p.threads, p.threads_batch) == (40, 80)  # -tb may use the SMT siblings for prompts
    assert format_cpulist(p.cpus) == "40-79,120-159"
    assert argv_for(p)[argv_for(p).index("-tb") + 1] == "80"


def test_cascade_lake_interleaved_cpu_numbers():
    # Intel numbers CPUs alternately over the sockets: socket 0 has the even ones.
    p = plan_placement(xml_box("Intel-CascadeLake-2xXeon6230", 96), "node:0")
    assert format_cpulist(p.cpus)[:14] == "0,2,4,6,8,10,1" and p.threads == 20
    assert all(c % 2 == 0 for c in p.cpus)


# --- hwloc's recorded sysfs trees ----------------------------------------------------------------

def test_sparse_node_ids_are_partly_invisible_to_llama_cpp(sysfs_tree):
    # 4 packages x 2 nodes, node ids 0,1,2,33,34,45,72,73: ggml_numa_init stops at node3
    t = discover_topology(sysfs_tree("48amd64-4pa2n6c-sparse"))
    assert llama_visible_nodes(t.node_ids) == (0, 1, 2)
    p = plan_placement(t, "distribute")
    assert p.node_ids == (0, 1, 2) and p.threads == 18  # 3 visible nodes x 6 cores
    assert any("sees nodes 0-2 only" in w and "33-34,45,72-73" in w for w in p.warnings)


def test_eight_nodes_all_visible(sysfs_tree):
    t = discover_topology(sysfs_tree("16amd64-8n2c"))
    p = plan_placement(t, "interleave")
    assert p.node_ids == tuple(range(8)) and p.threads == 16 and p.warnings == ()
    assert p.numactl_argv == ("numactl", "--interleave=all")


def test_cgroup_cpuset_limits_the_plan(sysfs_tree):
    # 4 sockets x 2 nodes, but the recorded process's cpuset allows CPUs 0-5 only
    root = sysfs_tree("32amd64-4s2n4c-cgroup2")
    t = discover_topology(root)
    avail = serve.node_available_bytes(root)
    assert sorted(avail) == list(range(8)) and all(v > 8 * GiB for v in avail.values())
    p = plan_placement(t, "auto", need_bytes=4 * GiB, node_available_bytes=avail)
    assert p.mode == "node" and p.node_ids[0] in (0, 1)
    d = plan_placement(t, "distribute")
    assert (d.node_ids, d.threads, format_cpulist(d.cpus)) == ((0, 1), 6, "0-5")
    with pytest.raises(ConfigError, match=r"node 3 is not allowed to this process \(cpuset\)") as e:
        plan_placement(t, "node:3")
    assert e.value.hint == "nodes with CPUs here: 0-1"


def test_one_online_node_plans_nothing(sysfs_tree):
    # Node 0 is offline; node 1 holds 8 of the 17 online CPUs, the rest are in no online node.
    t = discover_topology(sysfs_tree("offline-cpu0-node0"))
    auto = plan_placement(t, "auto")
    assert (auto.mode, auto.threads) == ("off", 17)
    p = plan_placement(t, "node:1")
    assert (p.numactl_argv, p.threads, format_cpulist(p.cpus)) == ((), 8, "5,7,9,11,13,15,17,19")


# --- validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("auto", NumaChoice("auto")), ("NODE:1", NumaChoice("node", 1)), ("node3", NumaChoice("node", 3)),
    ("interleave", NumaChoice("interleave")), ("off", NumaChoice("off")),
])
def test_parse_numa(text, want):
    assert parse_numa(text) == want


@pytest.mark.parametrize("text", ["", "numactl", "node:", "node:-1", "mirror", "node:N"])
def test_bad_numa_lists_the_modes(text):
    with pytest.raises(ConfigError, match="unknown --numa") as e:
        parse_numa(text)
    assert e.value.hint == "choose one of: auto, off, distribute, isolate, interleave, node:N"


def test_worker_numa_has_no_llama_modes():
    with pytest.raises(ConfigError) as e:
        parse_numa("distribute", worker=True)
    assert "ggml-rpc-server has no --numa" in e.value.hint


def test_missing_node_names_the_existing_ones():
    t = xml_box(EPYC_9654, 768)
    with pytest.raises(ConfigError, match="there is no NUMA node 2") as e:
        plan_placement(t, "node:2")
    assert e.value.hint == "this machine has nodes 0-1"


def test_node_plan_needs_numactl_on_a_multi_node_box():
    with pytest.raises(EngineError, match="needs numactl") as e:
        plan_placement(xml_box(EPYC_9654, 768), "node:0", numactl_available=False)
    assert "apt install numactl" in e.value.hint


def test_one_node_box_needs_no_numactl():
    t = load_hwloc_xml(FIXTURES / "hwloc" / f"{EPYC_9654}.xml")  # as recorded: one node
    for numa in ("node:0", "interleave", "auto"):
        p = plan_placement(t, numa, numactl_available=False)
        assert p.numactl_argv == () and p.threads == 192


def test_oversubscribed_threads_warn():
    p = plan_placement(xml_box(EPYC_9654, 768), "node:0", threads=300)
    assert p.threads == 300 and any("more than the 192 CPUs" in w for w in p.warnings)


def test_worker_auto_interleaves_and_has_no_llama_numa():
    p = plan_placement(xml_box(EPYC_9654, 768), "auto", worker=True)
    assert (p.mode, p.numactl_argv, p.llama_numa, p.threads) == \
        ("interleave", ("numactl", "--interleave=all"), None, 192)
