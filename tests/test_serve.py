"""`cputune serve` and `cputune worker`: the argv from the build's own --help, the memory check, the
checks after start, and the real llama-server / ggml-rpc-server on the tiny generated models."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.core import launch
from cputune.engine import rpc, serve
from cputune.machine import pagecache
from cputune.cli import cli
from cputune.core.errors import ConfigError, EngineError, NetworkError
from cputune.engine.placement import plan_placement
from cputune.engine.rpc import Endpoint, LayerSplit
from cputune.predict.selector import RamNeed
from cputune.machine.topology import discover_topology
from helpers import children, default_sigint

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
HELP = FIXTURES / "llama_help"
GiB, MiB = 1 << 30, 1 << 20
HOST = "127.0.0.1"
NEW_FLAGS = launch.parse_help_flags((HELP / "0c1e57098-llama-server.txt").read_text())
# The option lines of a llama-server from before PR #20834 (2026-07) and before --metrics,
# -tb and --api-key-file, in the layout common/arg.cpp prints (hand-written, not recorded).
OLD_HELP = """\
-t,    --threads N                      number of threads to use during generation (default: -1)
-c,    --ctx-size N                     size of the prompt context (default: 4096, 0 = loaded from model)
--mlock                                 force system to keep model in RAM rather than swapping or compressing
--no-mmap                               do not memory-map model (slower load but may reduce pageouts if
                                        not using mlock)
--numa TYPE                             attempt optimizations that help on some NUMA systems
                                        - distribute: spread execution evenly over all nodes
-m,    --model FNAME                    model path (default: `models/$filename` with filename from `--hf-file`
--host HOST                             ip address to listen (default: 127.0.0.1)
--port PORT                             port to listen (default: 8080)
"""
OLD_FLAGS = launch.parse_help_flags(OLD_HELP)


# --- flags from --help ----------------------------------------------------------------------------

def test_recorded_help_of_the_pinned_server():
    for flag in ("-t", "-tb", "--threads-batch", "-c", "--numa", "-lm", "--load-mode", "--metrics",
                 "--api-key-file", "--rpc", "-ngl", "-ts", "--host", "--port", "--repack", "-nr", "--no-repack"):
        assert flag in NEW_FLAGS, flag
    # description text and metavars are not options
    assert not {"-1", "-inf", "--numa=distribute", "--cpu-range-draft-x"} & NEW_FLAGS
    assert len(NEW_FLAGS) == 412  # names and aliases of every option this build lists
    assert "--no-mmap" not in NEW_FLAGS and "--mlock" not in NEW_FLAGS  # gone since PR #20834
    rpc_flags = launch.parse_help_flags((HELP / "0c1e57098-ggml-rpc-server.txt").read_text())
    assert {"-H", "--host", "-p", "--port", "-t", "--threads", "-c", "--cache"} <= rpc_flags


IK_HELP = {name: launch.parse_help_flags((HELP / f"8337e4cd3-ik-{name}.txt").read_text())
           for name in ("llama-server", "llama-bench", "llama-sweep-bench")}


def test_recorded_help_of_the_pinned_ik_server():
    flags = IK_HELP["llama-server"]
    # Long-only options are indented 9 columns there; short-and-long ones 2.
    for flag in ("--numa", "--no-mmap", "--mlock", "--metrics", "--api-key-file", "--rpc", "--host", "--port",
                 "-t", "--threads", "-tb", "-c", "-ctx-ckpt", "--ctx-checkpoints", "-fa", "--flash-attn",
                 "-no-fa", "-mla", "--mla-use", "-amb", "-no-fmoe", "-rtr", "--run-time-repack", "-thp"):
        assert flag in flags, flag
    # Names mentioned in a description ("Flash-attn precision under -sm graph") are not options.
    assert not {"-sm", "-fmoe", "-lm", "--load-mode", "--repack"} & flags
    assert len(flags) == 390
    # llama-sweep-bench parses the same common options (gpt_params_parse), plus its own two.
    assert IK_HELP["llama-sweep-bench"] - flags == {"--sweep-stride", "--sweep-memory"}
    bench = IK_HELP["llama-bench"]
    assert {"-fmoe", "-mla", "-rtr", "-mmp", "-gp", "-thp", "-sm", "--split-mode", "--print-overrides"} <= bench
    assert not {"-d", "--n-depth", "-lm", "--repack"} & bench and len(bench) == 89


def test_old_help_has_the_old_load_flags():
    assert OLD_FLAGS == {"-t", "--threads", "-c", "--ctx-size", "--mlock", "--no-mmap", "--numa", "-m",
                         "--model", "--host", "--port"}


def test_live_help_is_parsed_once_per_binary_version(llama_bin_dir):
    binary = llama_bin_dir / "llama-server"
    assert launch.help_flags(binary) == NEW_FLAGS  # the fixture is this build's --help
    before = launch._help_text.cache_info().hits
    launch.help_flags(binary)
    assert launch._help_text.cache_info().hits == before + 1
    assert launch.help_flags(binary.parent / "no-such-binary") == frozenset()


@pytest.mark.parametrize("mode, new, old", [
    ("mmap", ["-lm", "mmap"], []), ("none", ["-lm", "none"], ["--no-mmap"]),
    ("mlock", ["-lm", "mlock"], ["--mlock"]),
])
def test_load_mode_for_either_flag_set(mode, new, old):
    assert serve.load_mode_args(mode, NEW_FLAGS) == new
    assert serve.load_mode_args(mode, OLD_FLAGS) == old


# --- argv ---------------------------------------------------------------------------------------

def one_node_topology():
    return discover_topology(Path("/"))


def req(**kw):
    return serve.ServeRequest(quant="q8_0", **kw)


def test_argv_on_an_old_build_leaves_out_what_it_lacks():
    p = replace(plan_placement(one_node_topology(), "off"), threads=8, threads_batch=16, llama_numa="distribute")
    argv, warnings = serve.server_argv(Path("llama-server"), OLD_FLAGS, Path("m.gguf"), p, req(load_mode="none"))
    assert argv == ["llama-server", "-m", "m.gguf", "--host", HOST, "--port", "8080", "-c", "8192",
                    "-t", "8", "--numa", "distribute", "--no-mmap"]
    assert len(warnings) == 1 and "no --threads-batch" in warnings[0]
    with pytest.raises(EngineError, match="no --api-key-file"):
        serve.server_argv(Path("llama-server"), OLD_FLAGS, Path("m.gguf"), p, req(api_key_file=Path("k")))
    with pytest.raises(EngineError, match="without the RPC backend"):
        serve.server_argv(Path("llama-server"), OLD_FLAGS, Path("m.gguf"), p, req(rpc=(Endpoint("h", 1),)))


def test_argv_with_rpc_key_and_extra_args():
    p = replace(plan_placement(one_node_topology(), "off"), threads=4, threads_batch=4)
    split = LayerSplit(n_units=62, local_units=30, worker_units=(16, 16))
    argv, warnings = serve.server_argv(
        Path("llama-server"), NEW_FLAGS, Path("m.gguf"), p,
        req(api_key_file=Path("/etc/keys"), rpc=(Endpoint("10.0.0.2", 50052), Endpoint("10.0.0.3", 50052)),
            extra_args=("-np", "2", "--jinja")), split)
    assert argv[argv.index("--api-key-file") + 1] == "/etc/keys" and "--metrics" in argv
    assert argv[argv.index("--rpc"):] == ["--rpc", "10.0.0.2:50052,10.0.0.3:50052", "-ngl", "32",
                                          "-ts", "16,16", "-np", "2", "--jinja"]
    assert warnings == []


@pytest.mark.parametrize("extra, ours", [(("-t", "3"), "--threads"), (("--numa=isolate",), "--numa"),
                                         (("--no-mmap",), "--load-mode"), (("-c", "1"), "--ctx")])
def test_extra_args_cannot_override_the_plan(extra, ours):
    with pytest.raises(ConfigError, match="would override the checked plan") as e:
        serve.check_extra_args(extra)
    assert ours in e.value.hint
    r = invoke("serve", "-q", "q8_0", "--dry-run", "--", *extra)  # refused before anything is read
    assert r.exit_code == 1 and r.output.startswith(f"Error: {extra[0].split('=')[0]} after `--`")


def test_environment_that_pins_openmp_is_flagged():
    env, warnings = serve.relevant_env({"PATH": "/bin", "OMP_PROC_BIND": "close", "LLAMA_ARG_CTX_SIZE": "4096",
                                        "HOME": "/root"})
    assert env == {"LLAMA_ARG_CTX_SIZE": "4096", "OMP_PROC_BIND": "close"}
    assert len(warnings) == 1 and warnings[0].startswith("OMP_PROC_BIND=close pins OpenMP threads")


# --- RPC arithmetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_layer, caps, local, workers", [
    # R1 has 61 layers: 62 units with the output layer. 740 : 1000 : 1000 GiB
    #   quotas 16.75, 22.63, 22.63 -> floors 16, 22, 22 (60); remainders .75, .63, .63 -> local, then worker 1
    (61, [740, 1000, 1000], 17, (23, 22)),
    (2, [1, 1, 1], 1, (1, 1)),
    (2, [0, 5, 5], 0, (2, 1)),  # 1.5, 1.5 -> 1, 1; one unit left, ties go to the earlier worker
    (4, [0, 0], 5, (0,)),  # nothing known: everything stays local
])
def test_split_layers_by_capacity(n_layer, caps, local, workers):
    s = rpc.split_layers(n_layer, caps)
    assert (s.local_units, s.worker_units) == (local, workers)
    assert s.local_units + sum(s.worker_units) == n_layer + 1


def test_split_args_give_the_offloaded_units_in_order():
    assert LayerSplit(62, 17, (23, 22)).llama_args() == ["-ngl", "45", "-ts", "23,22"]
    assert LayerSplit(5, 5, (0,)).llama_args() == ["-ngl", "0"]


def test_share_needs_hand_arithmetic():
    need = RamNeed(weights_bytes=600 * GiB, repack_copy_bytes=40 * GiB, kv_bytes=20 * GiB,
                   compute_bytes=2 * GiB, headroom_bytes=2 * GiB, ctx_tokens=32768, cache_type="f16", mmap=True)
    split = LayerSplit(n_units=10, local_units=5, worker_units=(3, 2))
    # local: (600 + 20) x 5/10 + 40 x 5/10 + 2 + 2 = 310 + 20 + 4 = 334 GiB
    # worker 1: 620 x 3/10 + 4 = 190 GiB; worker 2: 620 x 2/10 + 4 = 128 GiB (no repack on a worker)
    assert serve.share_needs(need, split) == [334 * GiB, 190 * GiB, 128 * GiB]


@pytest.mark.parametrize("text, want", [
    ("10.0.0.2:50052", (Endpoint("10.0.0.2", 50052),)),
    ("a:1, b:2", (Endpoint("a", 1), Endpoint("b", 2))),
])
def test_parse_endpoints(text, want):
    assert rpc.parse_endpoints(text) == want


@pytest.mark.parametrize("text", ["host", "host:", ":50052", "h:0", "h:99999", "::1:50052", "h:1,h:1", "h:x"])
def test_bad_endpoints(text):
    with pytest.raises(ConfigError, match="--rpc"):
        rpc.parse_endpoints(text)


def test_unreachable_worker_is_one_clear_error():
    port = launch.free_port(HOST)  # nothing listens there
    with pytest.raises(NetworkError, match=f"cannot reach RPC worker 127.0.0.1:{port}") as e:
        rpc.query_memory(Endpoint(HOST, port), timeout_s=1.0)
    assert f"cputune worker --host 0.0.0.0 --port {port}" in e.value.hint


# --- affinity after start -------------------------------------------------------------------------

def test_affinity_from_recorded_task_status():
    root = FIXTURES / "proc_task"
    threads = serve.thread_affinities(4242, root)
    assert len(threads) == 11 and {t.name for t in threads} == {"llama-server"}
    assert {t.cpus for t in threads} == {(1,)} and threads[0].tid == 4242
    plan = plan_placement(one_node_topology(), "off")
    assert serve.affinity_warning(replace(plan, cpus=(0, 1)), threads) is None
    assert serve.affinity_warning(replace(plan, cpus=(1,)), threads) is None
    w = serve.affinity_warning(replace(plan, cpus=(0,)), threads)
    assert w.startswith("11 of 11 server threads may run outside the planned CPUs 0: 4242 (llama-server) on 1")
    assert "and 7 more" in w


def test_parse_task_status():
    name, cpus = serve.parse_task_status("Name:\tllama-server\nCpus_allowed:\tff\nCpus_allowed_list:\t0-3,8\n")
    assert (name, cpus) == ("llama-server", (0, 1, 2, 3, 8))


# --- page cache -----------------------------------------------------------------------------------

def sample(nodes: dict[int, int], sampled=100):
    return pagecache.CacheSample("m.gguf", sampled * 4096, sampled, sum(nodes.values()), nodes)


@pytest.mark.parametrize("nodes, mem, spread, misplaced, warns", [
    ({0: 100}, [1], False, 1.0, True),  # all cached on node 0, the plan binds node 1
    ({1: 100}, [1], False, 0.0, False),
    ({0: 50, 1: 50}, [0, 1], True, 0.0, False),  # interleaved already
    ({0: 90}, [0, 1], True, 0.45, True),  # 90 cached on node 0: 45 more than an even share
    ({0: 5}, [1], False, 0.05, False),  # 5% cached: too little to matter
    ({}, [0], False, 0.0, False),
])
def test_judge_page_cache(nodes, mem, spread, misplaced, warns):
    v = pagecache.judge([sample(nodes)], mem, spread)
    assert v.misplaced_fraction == pytest.approx(misplaced)
    assert (v.warning is not None) == warns


def test_live_page_cache_sample_and_evict(tmp_path):
    f = tmp_path / "m.gguf"
    with open(f, "wb") as fh:
        fh.write(os.urandom(2 * MiB))
        fh.flush()
        os.fsync(fh.fileno())
    f.read_bytes()
    s = pagecache.sample_file(f)
    if s is None:
        pytest.skip("no move_pages on this architecture")
    assert s.sampled_pages == 2 * MiB // pagecache.PAGE and s.resident_pages == s.sampled_pages
    assert sum(s.pages_by_node.values()) == s.resident_pages
    pagecache.evict([f])
    after = pagecache.sample_file(f)
    if after.resident_pages == after.sampled_pages:
        pytest.skip("this filesystem cannot drop its pages (tmpfs)")
    assert after.resident_pages == 0


# --- memory ---------------------------------------------------------------------------------------

def fake_box(root: Path, node_mem_gib: list[float], cores_per_node: int = 2,
             mem_available_gib: float | None = None) -> Path:
    """A minimal sysfs/procfs tree: len(node_mem_gib) nodes of `cores_per_node` single-thread cores."""
    n = len(node_mem_gib) * cores_per_node
    cpu = root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text(f"0-{n - 1}\n")
    for c in range(n):
        topo = cpu / f"cpu{c}/topology"
        topo.mkdir(parents=True)
        (topo / "core_id").write_text(f"{c}\n")
        (topo / "physical_package_id").write_text(f"{c // cores_per_node}\n")
        (topo / "core_cpus_list").write_text(f"{c}\n")
    for i, gib in enumerate(node_mem_gib):
        d = root / f"sys/devices/system/node/node{i}"
        d.mkdir(parents=True)
        lo = i * cores_per_node
        (d / "cpulist").write_text(f"{lo}-{lo + cores_per_node - 1}\n")
        kb = int(gib * GiB) // 1024
        (d / "meminfo").write_text(f"Node {i} MemTotal:       {kb} kB\nNode {i} MemFree:        {kb - 4096} kB\n"
                                   f"Node {i} Active(file):    1024 kB\nNode {i} Inactive(file):  2048 kB\n"
                                   f"Node {i} KReclaimable:    1024 kB\n")
    total = int(sum(node_mem_gib) * GiB) // 1024
    avail = total if mem_available_gib is None else int(mem_available_gib * GiB) // 1024
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text(f"MemTotal: {total} kB\nMemFree: {avail} kB\nMemAvailable: {avail} kB\n")
    (root / "proc/cpuinfo").write_text("".join(f"processor\t: {c}\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 fma\n\n"
                                               for c in range(n)))
    return root


def test_node_available_bytes_sums_free_and_reclaimable(tmp_path):
    root = fake_box(tmp_path, [2.0, 3.0])
    avail = serve.node_available_bytes(root)
    # MemFree (total - 4 MiB) + Active(file) 1 MiB + Inactive(file) 2 MiB + KReclaimable 1 MiB
    assert avail == {0: 2 * GiB, 1: 3 * GiB}


def test_memory_notes_hugepages_thp_and_mlock(monkeypatch):
    from cputune.machine.memory import HugepagePool
    from cputune.machine.probe import memory_from_topology
    base = memory_from_topology(one_node_topology(), "test")
    mem = replace(base, thp_enabled="madvise",
                  hugepages=(HugepagePool(None, 2 * MiB, 1024, 1024), HugepagePool(0, 2 * MiB, 1024, 1024)))
    warnings, notes = serve.memory_notes(mem, "none", 10 * GiB)
    assert notes[0].startswith("2.0 GiB is reserved as hugetlb pages")  # the node pool is the same pages
    assert "THP is 'madvise'" in notes[1] and warnings == []
    assert serve.memory_notes(replace(mem, hugepages=()), "mmap", GiB) == ([], [])
    monkeypatch.setattr(serve.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(serve.resource, "getrlimit", lambda what: (64 * 1024, 64 * 1024))
    warnings, _ = serve.memory_notes(replace(mem, hugepages=()), "mlock", 10 * GiB)
    assert warnings and warnings[0].startswith("--load-mode mlock: the locked-memory limit is 0.0 GiB")


@pytest.fixture()
def llama_models(tiny_models) -> Path:
    return tiny_models["llama"].quantized["q8_0"].parent


def plan(models: Path, root: Path, **kw):
    return serve.plan_serve(serve.ServeRequest(quant="q8_0", model="llama", models_dir=models, **kw),
                            root, numactl=True)


@pytest.mark.llama
def test_auto_places_the_tiny_model_on_one_node_of_a_two_node_box(llama_models, tmp_path):
    p = plan(llama_models, fake_box(tmp_path, [3.0, 4.0]))
    assert (p.placement.mode, p.placement.node_ids, p.placement.threads) == ("node", (1,), 2)
    assert p.argv[:3] == ("numactl", "--cpunodebind=1", "--membind=1")
    [box] = p.memory.boxes
    assert box.name == "this box (node 1)" and box.available_bytes == 4 * GiB and box.fits
    assert p.page_cache is None  # a recorded tree: the model's pages are this machine's, not its


@pytest.mark.llama
def test_memory_refusal_names_the_numbers(llama_models, tmp_path):
    p = plan(llama_models, fake_box(tmp_path, [1.5, 1.5]), numa="node:0")
    need = p.memory.need
    # the tiny model's bytes are nothing next to the 2 GiB OS headroom selector.ram_needed keeps
    assert need.headroom_bytes == 2 * GiB and need.total_bytes == p.memory.boxes[0].need_bytes > 2 * GiB
    with pytest.raises(serve.InsufficientMemory) as e:
        serve.require_fit(p)
    msg = e.value.message
    assert msg.startswith("llama-q8_0.gguf with a 8192-token context does not fit: this box (node 0) "
                          f"needs {need.total_bytes / GiB:.1f} GiB but has 1.5 GiB available")
    assert "headroom 2.0" in msg and "--numa interleave" in e.value.hint and "--force" in e.value.hint
    serve.require_fit(p, force=True)
    # the same box fits it over both nodes
    both = plan(llama_models, tmp_path, numa="interleave")
    assert both.memory.fits and both.argv[:2] == ("numactl", "--interleave=all")


# --- CLI ------------------------------------------------------------------------------------------

def invoke(*args, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


@pytest.mark.llama
def test_dry_run_json(llama_models):
    r = invoke("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models), "--ctx", "512",
               "--port", "18080", "--dry-run", "--json", "--", "-np", "1", catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.engine.serve/1" and doc["cputune_version"]
    p = doc["plan"]
    assert p["model_path"].endswith("llama-q8_0.gguf") and p["quant"] == "Q8_0"
    assert p["argv"][-2:] == ["-np", "1"] and doc["command"].endswith("--metrics -np 1")
    assert p["argv"][p["argv"].index("--port") + 1] == "18080" and p["url"] == "http://127.0.0.1:18080"
    assert p["placement"]["threads"] >= 1 and p["memory"]["fits"] is True
    assert p["memory"]["need"]["ctx_tokens"] == 512


@pytest.mark.llama
def test_dry_run_table_shows_plan_and_command(llama_models):
    r = invoke("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models), "--dry-run",
               catch_exceptions=False)
    assert r.exit_code == 0
    assert "llama-server plan" in r.stdout and "command:" in r.stdout and "llama-server -m" in r.stdout
    assert "beyond the 2048 tokens the model was trained on" in r.stderr  # --ctx 8192 > n_ctx_train


@pytest.mark.llama
def test_cli_memory_refusal_and_force(llama_models, tmp_path):
    root = fake_box(tmp_path, [1.0])
    args = ["serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models), "--sysfs-root", str(root),
            "--ctx", "2048", "--dry-run"]
    r = invoke(*args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.splitlines()[0].startswith("Error: llama-q8_0.gguf with a 2048-token context does not fit: "
                                               "this box needs 2.0 GiB but has 1.0 GiB available (MemAvailable)")
    assert "hint: " in r.output and "--force" in r.output
    assert invoke(*args, "--force", catch_exceptions=False).exit_code == 0


@pytest.mark.llama
def test_render_plan_with_page_cache_and_workers(llama_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_PROC_BIND", "close")
    mem = rpc.WorkerMemory(Endpoint("10.0.0.2", 50052), "7.0.0", 1, 64 * GiB, 64 * GiB)
    p = serve.plan_serve(serve.ServeRequest(quant="q8_0", model="llama", models_dir=llama_models, ctx_tokens=512,
                                            rpc=(mem.endpoint,)),
                         fake_box(tmp_path, [3.0, 4.0]), numactl=True, query_worker=lambda e: mem)
    assert p.split is not None and p.memory.boxes[1].name == "10.0.0.2:50052"
    assert any(w.startswith("OMP_PROC_BIND=close pins OpenMP threads") for w in p.warnings)
    verdict = pagecache.judge([sample({0: 80})], [1], spread=False)
    from cputune.commands import report
    report.render_serve_plan(replace(p, page_cache=verdict))
    out = capsys.readouterr().out
    assert "page cache: 80% of the model cached (node 0: 80 of 100 sampled pages), 80% on the wrong node" in out
    assert "10.0.0.2:50052" in out and "environment: OMP_PROC_BIND=close" in out
    assert p.command in out.replace("\n", "")


@pytest.mark.parametrize("numa", ["sideways", "node:x", "numactl"])
def test_cli_bad_numa(numa):
    r = invoke("serve", "-q", "q8_0", "--numa", numa)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.splitlines() == [f"Error: unknown --numa '{numa}'",
                                     "hint: choose one of: auto, off, distribute, isolate, interleave, node:N"]


@pytest.mark.llama
def test_cli_missing_node(llama_models, tmp_path):
    r = invoke("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models),
               "--sysfs-root", str(fake_box(tmp_path, [8.0, 8.0])), "--numa", "node:5", "--dry-run")
    assert r.exit_code == 1
    assert r.output.splitlines() == ["Error: --numa node:5: there is no NUMA node 5",
                                     "hint: this machine has nodes 0-1"]


def test_cli_bad_threads():
    r = invoke("serve", "-q", "q8_0", "--threads", "many")
    assert r.exit_code == 1 and r.output.startswith("Error: --threads 'many': give auto or a whole number")


@pytest.mark.llama
def test_cli_model_not_found_lists_what_is_there(llama_models):
    r = invoke("serve", "-q", "iq2_xxs", "--models-dir", str(llama_models), "--dry-run")
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.splitlines()
    assert lines[0] == f"Error: no IQ2_XXS model in {llama_models}"
    assert lines[1].startswith("hint: it holds: ") and "llama-q8_0.gguf [Q8_0]" in lines[1]
    assert "deepseek2-q4_k_m.gguf [Q4_K_M]" in lines[1]


@pytest.mark.llama
def test_cli_model_file_and_split_model(tiny_split):
    # any shard names the split model; -m is its first shard
    r = invoke("serve", "--model", str(tiny_split[1]), "--dry-run", "--json", catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["plan"]["model_path"] == str(tiny_split[0]) and doc["plan"]["quant"] == "F16"
    assert doc["plan"]["shards"] == [str(p) for p in tiny_split]
    assert doc["plan"]["model_label"] == "llama-split-00001-of-00002.gguf (+1 shards)"
    r = invoke("serve", "--model", str(tiny_split[0]), "-q", "q8_0", "--dry-run")
    assert r.exit_code == 1 and "is F16, not Q8_0" in r.output


def test_cli_missing_build(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = invoke("serve", "-q", "q8_0", "--dry-run")
    assert r.exit_code == 1 and r.output.splitlines()[0] == "Error: llama.cpp has not been built yet"
    assert "hint: run `cputune build`" in r.output
    r = invoke("worker", "--dry-run")
    assert r.exit_code == 1 and "run `cputune build`" in r.output


@pytest.mark.llama
def test_cli_port_in_use(llama_models):
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        r = invoke("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models), "--port", str(port))
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: port {port} on 127.0.0.1 is already in use" in r.output
    assert "hint: pick another with --port" in r.output


@pytest.mark.llama
def test_worker_dry_run_json():
    r = invoke("worker", "--port", "50111", "--threads", "1", "--dry-run", "--json", catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.worker/1"
    argv = doc["plan"]["argv"]
    assert Path(argv[len(doc["plan"]["placement"]["numactl_argv"])]).name == "ggml-rpc-server"
    assert argv[-6:] == ["-H", "127.0.0.1", "-p", "50111", "-t", "1"]


def test_worker_refuses_llama_numa_modes():
    r = invoke("worker", "--numa", "distribute")
    assert r.exit_code == 1 and "ggml-rpc-server has no --numa" in r.output


# --- the real llama-server ------------------------------------------------------------------------

def cputune_process(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cputune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)
    proc.seen = []  # stdout read before the end
    return proc


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(check, proc: subprocess.Popen, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"cputune exited with {proc.returncode}:\n{out}\n{err}")
        time.sleep(0.2)
    pytest.fail("timed out")


def healthy(port: int):
    def check():
        try:
            return launch.http_json(f"http://{HOST}:{port}/health", timeout=2)[0] == 200
        except OSError:
            return False
    return check


def ready_line(proc: subprocess.Popen, seen: list[str], timeout_s: float = 60.0) -> str:
    """Read cputune's stdout until it says the server is ready: from then on it forwards signals
    (a signal while the model loads stops everything with "Interrupted.")."""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(fd, 1 << 16)  # below the text wrapper, which is not read from yet
            except BlockingIOError:
                chunk = b""
            seen.append(chunk.decode())
            for line in "".join(seen).splitlines():
                if "is ready at" in line or '"running"' in line:
                    return line
            if proc.poll() is not None and not chunk:
                break
            time.sleep(0.1)
    finally:
        os.set_blocking(fd, True)
    pytest.fail("cputune never said ready:\n" + "".join(seen) + proc.stderr.read())


def stop(proc: subprocess.Popen, sig=signal.SIGINT, timeout_s: float = 30.0) -> tuple[int, str, str]:
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, "".join(getattr(proc, "seen", [])) + (out or ""), err


def complete(port: int, whole_words: bool = False) -> dict:
    """Four tokens from the random-weight model. `whole_words` bans the 256 byte-fallback tokens
    (ids 3-258 in synth's vocabulary): ik_llama.cpp's server answers 500 to a completion that ends
    inside a UTF-8 sequence (its JSON writer refuses the bytes), where mainline's holds them back."""
    payload = {"prompt": "The quick brown fox", "n_predict": 4, "ignore_eos": True, "temperature": 0.0}
    if whole_words:
        payload["logit_bias"] = [[t, False] for t in range(3, 259)]
    code, body = launch.http_json(f"http://{HOST}:{port}/completion", payload, timeout=60)
    assert code == 200, body
    return body


@pytest.mark.llama
def test_serve_answers_and_ctrl_c_leaves_no_orphan(llama_models):
    port = launch.free_port(HOST)
    proc = cputune_process("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models),
                           "--ctx", "512", "--port", str(port), "--", "-np", "1")
    server_pid = None
    try:
        ready_line(proc, proc.seen)
        wait_until(healthy(port), proc)
        [server_pid] = wait_until(lambda: children(proc.pid), proc)
        body = complete(port)
        assert body["tokens_predicted"] == 4 and body["timings"]["predicted_n"] == 4
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:  # --metrics is on
            assert r.status == 200 and "llamacpp:tokens_predicted_total 4" in r.read().decode()
        cmdline = Path(f"/proc/{server_pid}/cmdline").read_text().split("\0")
        assert "--metrics" in cmdline and cmdline[cmdline.index("-c") + 1] == "512"
    finally:
        rc, out, err = stop(proc, signal.SIGINT)
    assert rc == 130, err  # 128 + SIGINT, as a shell reports it, after llama-server's clean stop
    assert f"llama-server is ready at http://127.0.0.1:{port}" in out and f"pid {server_pid}" in out
    assert "Warning" not in err  # the threads' affinity matched the plan
    assert server_pid and not alive(server_pid)
    assert not launch.port_in_use(HOST, port)


@pytest.mark.llama
def test_serve_reports_a_crash_with_exit_code_and_log_tail(llama_models):
    port = launch.free_port(HOST)
    proc = cputune_process("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models),
                           "--ctx", "256", "--port", str(port))
    try:
        ready_line(proc, proc.seen)
        wait_until(healthy(port), proc)
        [server_pid] = wait_until(lambda: children(proc.pid), proc)
        os.kill(server_pid, signal.SIGKILL)
        rc, out, err = stop(proc, sig=None)  # cputune notices by itself
    finally:
        if proc.poll() is None:
            stop(proc)
    assert rc == 1
    assert "Error: llama-server was killed by SIGKILL (signal 9) while serving" in err
    assert "exit code: -9 (SIGKILL)" in err
    assert "last output lines:" in err and "full log: " in err and "Traceback" not in err


@pytest.mark.llama
@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "Interrupted."), (signal.SIGTERM, 143, "Terminated.")])
def test_a_signal_as_the_server_starts_stops_it_with_128_plus_the_signal(llama_models, sig, code, line):
    """Sent the moment llama-server exists, the signal lands while it loads (cputune unwinds and
    stops it: one line) or just after it is ready (forwarded): the same exit status, no orphan."""
    port = launch.free_port(HOST)
    proc = cputune_process("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models),
                           "--ctx", "256", "--port", str(port))
    try:
        [server_pid] = wait_until(lambda: children(proc.pid), proc, timeout_s=60)
    finally:
        rc, out, err = stop(proc, sig)
    assert rc == code, err
    assert "Traceback" not in err and (line in err.splitlines() or "is ready at" in out)
    deadline = time.monotonic() + 10
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(server_pid) and not launch.port_in_use(HOST, port)


def test_a_host_that_is_not_an_address_is_said_so_not_port_in_use():
    for cmd in ("serve", "worker"):
        r = invoke(cmd, "--host", "bad host", "--dry-run", *(("-q", "q8_0") if cmd == "serve" else ()))
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert r.output.splitlines()[0] == ("Error: --host 'bad host' is not an address: it must be an IP "
                                            "address or a host name, without spaces")
        assert "in use" not in r.output
    r = invoke("worker", "--host", "no-such-host.invalid", "--dry-run")
    assert r.exit_code == 1 and "is not an IP address or a host name this machine can resolve" in r.output
    assert rpc.check_host("::1") == "::1" and rpc.check_host("localhost") == "localhost"


def test_a_bind_failure_says_its_real_cause():
    with pytest.raises(NetworkError, match="cannot listen on 192.0.2.1: it is not an address of this machine"):
        launch.check_can_listen("192.0.2.1", 8080)  # TEST-NET-1 (RFC 5737): on no interface here
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(NetworkError, match=f"port {port} on {HOST} is already in use"):
            launch.check_can_listen(HOST, port)
        assert launch.port_in_use(HOST, port) and not launch.port_in_use("192.0.2.1", port)
    with pytest.raises(NetworkError, match="cannot listen on 'bad host'"):
        launch.start_server(["llama-server"], "bad host", 8080)


@pytest.mark.llama
def test_sigterm_is_forwarded(llama_models):
    port = launch.free_port(HOST)
    proc = cputune_process("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models),
                           "--ctx", "256", "--port", str(port), "--json")
    try:
        ready_line(proc, proc.seen)
        wait_until(healthy(port), proc)
        [server_pid] = wait_until(lambda: children(proc.pid), proc)
    finally:
        rc, out, _ = stop(proc, signal.SIGTERM)
    assert rc == 143 and not alive(server_pid)  # 128 + SIGTERM: a supervisor sees it was stopped
    assert not launch.port_in_use(HOST, port)
    doc = json.loads(out)
    assert doc["running"]["pid"] == server_pid and doc["running"]["url"] == f"http://127.0.0.1:{port}"


@pytest.mark.llama
def test_affinity_check_sees_a_live_mismatch(llama_models, llama_bin_dir, tmp_path):
    topo = discover_topology(Path("/"))
    if len(topo.allowed_cpus) < 2:
        pytest.skip("needs two CPUs")
    first, second = topo.allowed_cpus[:2]
    port = launch.free_port(HOST)
    argv = ["taskset", "-c", str(second), str(llama_bin_dir / "llama-server"), "-m",
            str(llama_models / "llama-q8_0.gguf"), "--port", str(port), "-c", "256", "-np", "1"]
    server = launch.start_server(argv, HOST, port, log_path=tmp_path / "server.log")
    try:
        server.wait_ready(60)
        p = plan_placement(topo, "off")
        assert serve.check_affinity(server, p) is None
        w = serve.check_affinity(server, replace(p, cpus=(first,)))
        assert w and f"on {second}" in w and "may run outside the planned CPUs" in w
    finally:
        server.stop()


@pytest.mark.llama
def test_rpc_on_loopback_with_two_workers(llama_models):
    ports = [launch.free_port(HOST) for _ in range(2)]
    workers = [cputune_process("worker", "--port", str(p), "--threads", "1") for p in ports]
    serve_proc = None
    try:
        for p, w in zip(ports, workers):
            assert f"RPC worker is ready at 127.0.0.1:{p}" in ready_line(w, w.seen)
            mem = rpc.query_memory(Endpoint(HOST, p))
            assert mem.devices == 1 and mem.total_bytes > 0 and mem.protocol.startswith("7.")
        http = launch.free_port(HOST)
        serve_proc = cputune_process("serve", "-q", "q8_0", "-m", "llama", "--models-dir", str(llama_models),
                                     "--ctx", "256", "--port", str(http),
                                     "--rpc", ",".join(f"127.0.0.1:{p}" for p in ports), "--", "-lv", "4")
        ready_line(serve_proc, serve_proc.seen)
        wait_until(healthy(http), serve_proc)
        [server_pid] = wait_until(lambda: children(serve_proc.pid), serve_proc)
        assert complete(http)["tokens_predicted"] == 4
        log = Path(os.readlink(f"/proc/{server_pid}/fd/1")).read_text()
        # each worker holds layers: llama.cpp names RPC devices RPC0, RPC1 in --rpc order
        assert "offloaded 2/3 layers" in log or "offloaded 3/3 layers" in log
        buffers = [line for line in log.splitlines() if "model buffer size" in line]
        assert len(buffers) == 3 and "CPU_Mapped" in buffers[0], buffers
        for p in ports:  # RPC buffer types are named after their endpoint
            assert any(f"[127.0.0.1:{p}] model buffer size" in line for line in buffers), buffers
        cmdline = Path(f"/proc/{server_pid}/cmdline").read_text().split("\0")
        assert cmdline[cmdline.index("--rpc") + 1] == f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        assert cmdline[cmdline.index("-ts") + 1] == "1,1"
    finally:
        results = [stop(p) for p in ([serve_proc] if serve_proc else []) + workers]
    # 128 + SIGINT for serve and both workers, as a shell reports a program Ctrl-C ended
    assert [rc for rc, _, _ in results] == [130, 130, 130], [(rc, err) for rc, _, err in results]
    worker_children = [children(w.pid) for w in workers]
    assert worker_children == [[], []]
    for p in ports:
        assert not launch.port_in_use(HOST, p)



# --- ik_llama.cpp's llama-server --------------------------------------------------------------------

IK = "ik_llama"


def listening(port: int) -> bool:
    """Something accepts connections on the port. (ik_llama.cpp's server closes its connections
    itself and, unlike mainline's, does not set SO_REUSEADDR, so its TIME-WAIT sockets keep the port
    from being bound for a minute: launch.port_in_use would say yes with nothing left running.)"""
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except OSError:
        return False
    return True


def sub(argv, words) -> bool:
    return any(list(argv[i:i + len(words)]) == list(words) for i in range(len(argv)))


@pytest.mark.llama
def test_ik_dry_run_gives_deepseek_its_options_each_with_why(ik_models, tiny_models):
    path = ik_models["deepseek2"].quantized["q4_k_m"]
    args = ("serve", "-m", str(path), "--engine", IK, "--no-tuned", "--ctx", "512", "--dry-run")
    doc = json.loads(invoke(*args, "--json", catch_exceptions=False).stdout)
    p = doc["plan"]
    argv = p["argv"]
    assert p["engine"] == IK and "/ik_llama-8337e4cd3-" in argv[0]
    for words in (["-mla", "3"], ["-fa", "on"], ["-amb", "512"], ["-rtr"], ["--metrics"], ["-c", "512"]):
        assert sub(argv, words), words
    assert "-lm" not in argv and "--no-mmap" not in argv  # mmap is its default; -rtr turns it off itself
    why = {c["setting"]: c["reason"] for c in p["choices"]}
    assert list(why) == ["mla", "flash_attn", "attn_max_batch", "fused_moe", "repack"]
    assert "8 routed experts" in why["fused_moe"] and "read into RAM, not mmap'd" in why["repack"]
    # -rtr reads the weights into RAM and repacks them there: one copy, no page cache to keep.
    assert p["memory"]["need"]["mmap"] is False and p["memory"]["need"]["repack_copy_bytes"] == 0
    table = invoke(*args, catch_exceptions=False).stdout
    assert "ik_llama.cpp" in table and "why -mla 3: the model has MLA attention" in table
    assert "why fused_moe on (the default, nothing written): 8 routed experts" in table
    # A dense llama gets only the repack; what the user gives after `--` is theirs.
    dense = json.loads(invoke("serve", "-m", str(ik_models["llama"].quantized["q4_k_m"]), "--engine", IK,
                              "--no-tuned", "--dry-run", "--json", "--", "-rtr", catch_exceptions=False).stdout)
    assert dense["plan"]["choices"] == [] and dense["plan"]["argv"].count("-rtr") == 1
    assert not sub(dense["plan"]["argv"], ["-mla", "3"])


@pytest.mark.llama
def test_ik_refuses_what_its_build_cannot_do(tiny_models):
    old = tiny_models["deepseek2"].quantized["q8_0"]  # MLA latent 256 + 32: ik's loader would abort
    r = invoke("serve", "-m", str(old), "--engine", IK, "--dry-run")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.splitlines()[0].startswith("Error: ik_llama.cpp cannot load this MLA model: its KV cache is 288")
    r = invoke("worker", "--engine", IK, "--dry-run")
    assert r.exit_code == 1 and r.output.splitlines()[0].startswith("Error: worker: ik_llama.cpp has no RPC backend")
    assert "--engine llama.cpp" in r.output
    r = invoke("serve", "-m", str(old), "--engine", IK, "--rpc", "127.0.0.1:50052", "--dry-run")
    assert r.exit_code == 1 and "serve --rpc: ik_llama.cpp has no RPC backend" in r.output
    r = invoke("serve", "-m", str(old), "--engine", "ik", "--dry-run")
    assert r.exit_code == 1 and r.output.splitlines()[0] == "Error: unknown engine 'ik'"


@pytest.mark.llama
@pytest.mark.parametrize("arch, quant", [(a, q) for a in ("deepseek2", "llama") for q in ("q8_0", "q4_k_m", "iq4_ks")])
def test_ik_server_answers_with_its_options(ik_models, arch, quant):
    path = ik_models[arch].quantized[quant]
    port = launch.free_port(HOST)
    plan = serve.plan_serve(serve.ServeRequest(quant=None, model=str(path), engine=IK, tuned=False, ctx_tokens=256,
                                               port=port, extra_args=("-np", "1")), Path("/"), numactl=True)
    server = serve.start(plan, timeout_s=120)
    try:
        assert healthy(port)()
        body = complete(port, whole_words=True)
        assert body["tokens_predicted"] == 4
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_text().split("\0")
        assert "-rtr" in cmdline and sub(cmdline, ["-mla", "3"]) == (arch == "deepseek2")
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Adjusted mainline llama.cpp MLA tensors" in log if arch == "deepseek2" else True
    assert "error: unknown argument" not in log and "invalid argument" not in log
    assert not alive(server.pid) and not listening(port)


@pytest.mark.llama
def test_ik_serve_answers_and_ctrl_c_leaves_no_orphan(ik_models):
    folder = ik_models["deepseek2"].quantized["q4_k_m"].parent
    port = launch.free_port(HOST)
    proc = cputune_process("serve", "--engine", IK, "-q", "q4_k_m", "-m", "deepseek2", "--models-dir", str(folder),
                           "--no-tuned", "--ctx", "512", "--port", str(port), "--", "-np", "1")
    server_pid = None
    try:
        ready_line(proc, proc.seen)
        wait_until(healthy(port), proc)
        [server_pid] = wait_until(lambda: children(proc.pid), proc)
        assert complete(port, whole_words=True)["tokens_predicted"] == 4
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:  # --metrics reached it
            assert r.status == 200
    finally:
        rc, out, err = stop(proc, signal.SIGINT)
    assert rc == 130, err
    assert "llama-server is ready at" in out and "why -mla 3:" in out and "deepseek2-q4_k_m.gguf" in out
    assert server_pid and not alive(server_pid) and not children(proc.pid) and not listening(port)
