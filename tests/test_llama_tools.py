"""The real llama-quantize, llama-bench and llama-server on the tiny synthetic models, through cputune's wrappers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, LlamaFileType

from cputune.core import launch
from cputune.engine import llama_bench
from cputune.model import synth
from cputune.core.errors import ProcessFailed, describe_exit, exit_message, process_failed
from helpers import HOST, complete, process_group, serving

FIXTURES = Path(__file__).parent / "fixtures"


def kv(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tensor_types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


# --- llama-quantize -----------------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
def test_q8_0_quantizes_every_weight_and_keeps_the_rest_f32(tiny_models, arch):
    m = tiny_models[arch]
    r = GGUFReader(m.quantized["q8_0"])
    assert kv(r, "general.file_type") == LlamaFileType.MOSTLY_Q8_0
    assert kv(r, "general.architecture") == arch
    got = {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in r.tensors}
    # norms, the router and its bias stay F32: llama-quant.cpp quantizes only 2-D/3-D tensors, never ffn_gate_inp
    want = {s.name: (Q.F32 if s.is_float32 else Q.Q8_0, s.ne) for s in synth.tensor_specs(m.shape)}
    assert got == want


# Q4_K_M as src/llama-quant.cpp (llama_tensor_get_type) decides it for these shapes:
#   - most weights Q4_K;
#   - ffn_down and attn_v Q6_K in "use_more_bits" layers: i >= 7*n_layer/8, i.e. block 1 of 2;
#   - output.weight Q6_K always;
#   - attn_output Q5_K in models with 8 or more experts;
#   - attn_k_b rows are 64 long, not a multiple of QK_K = 256: tensor_type_fallback() gives Q5_0,
#     and llama-quantize warns "ncols 64 not divisible by 256 ... falling back to q5_0".
Q4_K_M_TYPES = {
    "llama": {
        "token_embd.weight": Q.Q4_K, "output.weight": Q.Q6_K, "output_norm.weight": Q.F32,
        "blk.0.attn_q.weight": Q.Q4_K, "blk.0.attn_v.weight": Q.Q4_K, "blk.1.attn_v.weight": Q.Q6_K,
        "blk.0.ffn_gate.weight": Q.Q4_K, "blk.0.ffn_down.weight": Q.Q4_K, "blk.1.ffn_down.weight": Q.Q6_K,
        "blk.1.ffn_norm.weight": Q.F32,
    },
    "deepseek2": {
        "token_embd.weight": Q.Q4_K, "output.weight": Q.Q6_K,
        "blk.0.attn_q_a.weight": Q.Q4_K, "blk.0.attn_kv_a_mqa.weight": Q.Q4_K, "blk.0.attn_v_b.weight": Q.Q4_K,
        "blk.0.attn_k_b.weight": Q.Q5_0, "blk.1.attn_k_b.weight": Q.Q5_0,
        "blk.0.attn_output.weight": Q.Q5_K,
        "blk.0.ffn_down.weight": Q.Q4_K,  # the leading dense block
        "blk.1.ffn_gate_exps.weight": Q.Q4_K, "blk.1.ffn_up_exps.weight": Q.Q4_K,
        "blk.1.ffn_down_exps.weight": Q.Q6_K, "blk.1.ffn_down_shexp.weight": Q.Q6_K,
        "blk.1.ffn_gate_shexp.weight": Q.Q4_K,
        "blk.1.ffn_gate_inp.weight": Q.F32, "blk.1.exp_probs_b.bias": Q.F32, "blk.1.attn_kv_a_norm.weight": Q.F32,
    },
}


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
def test_q4_k_m_mix_and_fallback(tiny_models, arch):
    m = tiny_models[arch]
    r = GGUFReader(m.quantized["q4_k_m"])
    assert kv(r, "general.file_type") == LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type for t in r.tensors}
    assert {name: types[name] for name in Q4_K_M_TYPES[arch]} == Q4_K_M_TYPES[arch]
    assert sum(int(t.n_elements) for t in r.tensors) == synth.n_params(m.shape)
    # smaller than q8_0, which is smaller than f16
    sizes = [m.quantized["q4_k_m"].stat().st_size, m.quantized["q8_0"].stat().st_size, m.f16.stat().st_size]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3


# --- llama-bench --------------------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["llama", "deepseek2"])
def test_llama_bench_rows(tiny_models, llama_bin_dir, arch):
    m = tiny_models[arch]
    argv = llama_bench.bench_argv(llama_bin_dir / "llama-bench", m.quantized["q8_0"], threads=(2,),
                                  n_prompt=(16,), n_gen=(4,), reps=1)
    rows = llama_bench.run(argv, timeout_s=120)
    assert [r.test for r in rows] == ["pp16", "tg4"]
    for r in rows:
        assert r.avg_ts > 0 and len(r.samples_ts) == len(r.samples_ns) == 1
        assert r.model_type == f"{arch} ?B Q8_0"  # "?B": no size class for a 1-3 M parameter model
        assert r.model_n_params == synth.n_params(m.shape)
        assert r.model_filename == str(m.quantized["q8_0"])  # the -m argument as given
        assert r.n_threads == 2
        assert (r.load_mode, r.use_mmap) == ("mmap", True)
        assert r.build_commit


@pytest.mark.llama
def test_llama_bench_without_mmap(tiny_models, llama_bin_dir):
    m = tiny_models["llama"]
    assert llama_bench.takes_load_mode(llama_bin_dir / "llama-bench")  # the pinned build is past PR #20834
    argv = llama_bench.bench_argv(llama_bin_dir / "llama-bench", m.quantized["q4_k_m"], threads=(1,),
                                  n_prompt=(), n_gen=(2,), reps=1, mmap=False)
    assert argv[argv.index("-lm") + 1] == "none"
    [row] = llama_bench.run(argv, timeout_s=120)
    assert (row.test, row.load_mode, row.use_mmap, row.n_threads) == ("tg2", "none", False, 1)
    assert row.model_type == "llama ?B Q4_K - Medium"


@pytest.mark.llama
def test_split_model_benches_like_the_single_file(tiny_models, tiny_split, llama_bin_dir):
    assert [p.name for p in tiny_split] == ["llama-split-00001-of-00002.gguf", "llama-split-00002-of-00002.gguf"]
    bench = llama_bin_dir / "llama-bench"
    rows = {}
    for name, path in (("single", tiny_models["llama"].f16), ("split", tiny_split[0])):
        [rows[name]] = llama_bench.run(llama_bench.bench_argv(bench, path, threads=(1,), n_prompt=(8,), n_gen=(),
                                                              reps=1), timeout_s=120)
    assert rows["split"].model_n_params == rows["single"].model_n_params == synth.n_params(tiny_models["llama"].shape)
    # llama-bench reports the bytes of all tensors, summed over the shards
    assert rows["split"].model_size_bytes == rows["single"].model_size_bytes
    assert rows["split"].model_type == "llama ?B F16" and rows["split"].avg_ts > 0


@pytest.mark.llama
def test_llama_bench_failure_is_reported(tmp_path, llama_bin_dir):
    argv = llama_bench.bench_argv(llama_bin_dir / "llama-bench", tmp_path / "missing.gguf", n_prompt=(8,),
                                  n_gen=(), reps=1)
    with pytest.raises(ProcessFailed) as info:
        llama_bench.run(argv, timeout_s=60)
    assert info.value.returncode not in (0, None)
    assert info.value.argv == argv and info.value.output_tail


@pytest.mark.llama
def test_a_crashed_llama_bench_names_the_signal_and_the_assert(tiny_models, llama_bin_dir):
    """`-t 0` makes the pinned llama-bench abort in ggml_graph_compute (GGML_ASSERT n_threads > 0)."""
    argv = llama_bench.bench_argv(llama_bin_dir / "llama-bench", tiny_models["llama"].f16, threads=(0,),
                                  n_prompt=(8,), n_gen=(), reps=1)
    with pytest.raises(ProcessFailed) as info:
        llama_bench.run(argv, timeout_s=120)
    e = info.value
    assert e.returncode == -signal.SIGABRT
    assert re.fullmatch(r"llama-bench was killed by SIGABRT \(signal 6\): ggml-cpu\.c:\d+: "
                        r"GGML_ASSERT\(cplan->n_threads > 0\) failed", e.message), e.message
    assert "exit code: -6 (SIGABRT)" in e.details()
    assert e.output_tail[-1].endswith("GGML_ASSERT(cplan->n_threads > 0) failed")  # no backtrace after it


@pytest.mark.llama
def test_a_backtrace_after_the_assert_is_left_out(tiny_models, llama_bin_dir):
    """Run as the user might, with ggml's backtrace on (gdb, else backtrace_symbols): the reason
    is still the assert line, and the dump after it is not shown."""
    argv = llama_bench.bench_argv(llama_bin_dir / "llama-bench", tiny_models["llama"].f16, threads=(0,),
                                  n_prompt=(8,), n_gen=(), reps=1)
    env = {k: v for k, v in os.environ.items() if k != "GGML_NO_BACKTRACE"}
    p = subprocess.run(argv, capture_output=True, text=True, errors="replace", env=env, timeout=120, check=False)
    raw = (p.stdout + p.stderr).splitlines()
    at = next(i for i, line in enumerate(raw) if "GGML_ASSERT(" in line)
    assert p.returncode == -signal.SIGABRT and len(raw) > at + 1  # something was printed after it
    e = process_failed("llama-bench", argv, p.returncode, p.stdout + p.stderr)
    assert e.message.endswith("GGML_ASSERT(cplan->n_threads > 0) failed")
    assert e.output_tail[-1] == raw[at]


ABORTING = ("import os, sys; print('[]'); print('/x/y/ops.cpp:12: GGML_ASSERT(ne0 > 0) failed', file=sys.stderr);"
            "sys.stderr.flush(); print('#0  0x00007f in wait4 ()', file=sys.stderr); sys.stderr.flush(); os.abort()")


def test_the_one_exit_helper_names_signals_and_reasons():
    """llama_bench.run on a stand-in that aborts; and the wording for codes and unnamed signals."""
    with pytest.raises(ProcessFailed) as info:
        llama_bench.run([sys.executable, "-c", ABORTING], timeout_s=60)
    assert info.value.message == "llama-bench was killed by SIGABRT (signal 6): ops.cpp:12: GGML_ASSERT(ne0 > 0) failed"
    assert info.value.output_tail == ["[]", "/x/y/ops.cpp:12: GGML_ASSERT(ne0 > 0) failed"]
    assert describe_exit(1) == "exited with code 1" and describe_exit(-9) == "was killed by SIGKILL (signal 9)"
    assert describe_exit(-77) == "was killed by signal 77"
    assert exit_message("llama-server", 1, "load: ok\nmain: error: failed to load model 'm.gguf'\nbye",
                        " before it was ready") == ("llama-server exited with code 1 before it was ready: "
                                                    "main: error: failed to load model 'm.gguf'")
    out = "terminate called after throwing an instance of 'std::runtime_error'\n  what():  bad shape\n#1 frame"
    assert exit_message("llama-server", -6, out) == "llama-server was killed by SIGABRT (signal 6): what():  bad shape"
    assert exit_message("llama-bench", -9, "loading\n") == "llama-bench was killed by SIGKILL (signal 9)"


def test_missing_llama_bench_is_a_process_failure(tmp_path):
    binary = tmp_path / "llama-bench"
    assert not llama_bench.takes_load_mode(binary)
    with pytest.raises(ProcessFailed, match="cannot run llama-bench") as info:
        llama_bench.run(llama_bench.bench_argv(binary, tmp_path / "m.gguf"))
    assert info.value.returncode is None and info.value.hint


def test_bench_argv_spells_mmap_for_either_flag_set():
    new = llama_bench.bench_argv(Path("llama-bench"), Path("m.gguf"), mmap=False, load_mode=True)
    old = llama_bench.bench_argv(Path("llama-bench"), Path("m.gguf"), mmap=False, load_mode=False)
    assert new[new.index("-lm") + 1] == "none" and "-mmp" not in new
    assert old[old.index("-mmp") + 1] == "0" and "-lm" not in old


def test_parse_rows_recorded_from_the_pinned_build():
    # `llama-bench -m deepseek2-q8_0.gguf -p 16 -n 4 -r 2 -t 2 -o json -lm mmap` on TINY_DS2, build 0c1e57098
    rows = llama_bench.parse_rows((FIXTURES / "llama_bench" / "0c1e57098-deepseek2-q8_0.json").read_text())
    assert [r.test for r in rows] == ["pp16", "tg4"]
    pp = rows[0]
    assert (pp.model_type, pp.model_n_params, pp.model_size_bytes) == ("deepseek2 ?B Q8_0", 3_297_544, 3_516_448)
    assert (pp.load_mode, pp.use_mmap) == ("mmap", True)
    assert pp.flash_attn is None  # recorded as -1: "-fa auto" leaves the choice to llama.cpp
    assert pp.build_commit == "0c1e57098" and len(pp.samples_ts) == len(pp.samples_ns) == 2


def test_parse_rows_before_load_mode():
    # The row fields before PR #20834 (llama_cpp_cpu.md A1): use_mmap and a boolean flash_attn.
    [row] = llama_bench.parse_rows(json.dumps([{"use_mmap": False, "flash_attn": True, "n_gen": 128}]))
    assert (row.load_mode, row.use_mmap, row.flash_attn, row.test) == ("none", False, True, "tg128")


# --- llama-server -------------------------------------------------------------------------------


@pytest.mark.llama
@pytest.mark.parametrize("arch, qtype", [("llama", "q8_0"), ("deepseek2", "q4_k_m")])
def test_server_completes_and_stops_cleanly(tiny_models, llama_bin_dir, tmp_path, arch, qtype):
    m = tiny_models[arch]
    # -lv 4 lets the loader's print_info lines (hyperparameters) into the log
    with serving(llama_bin_dir, m.quantized[qtype], tmp_path / "server.log", "-lv", "4") as server:
        pid, port = server.proc.pid, server.port
        assert server.pids() == [pid] and process_group(pid) == [pid]
        body = complete(server)
        assert isinstance(body["content"], str)
        assert body["tokens_predicted"] == 4 and body["stop_type"] == "limit"
        assert body["timings"]["predicted_n"] == 4 and body["timings"]["predicted_ms"] > 0
        code, models = launch.http_json(server.url + "/v1/models", timeout=10)
        assert code == 200
        assert models["data"][0]["meta"]["n_params"] == synth.n_params(m.shape)
        assert models["data"][0]["meta"]["n_vocab"] == m.shape.n_vocab
    assert server.proc.returncode == 0  # SIGTERM: llama-server shuts down and exits 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert process_group(pid) == []
    assert not launch.port_in_use(HOST, port)

    info = dict(re.findall(r"print_info: (\w+)\s+= (.+)", server.log_path.read_text()))
    assert info["arch"] == arch
    assert info["n_layer"] == str(m.shape.n_layer)
    if arch == "deepseek2":
        expected = {"n_expert": m.shape.n_expert, "n_expert_used": m.shape.n_expert_used,
                    "n_expert_shared": m.shape.n_expert_shared, "n_layer_dense_lead": m.shape.n_dense_lead,
                    "n_lora_q": m.shape.q_lora_rank, "n_lora_kv": m.shape.kv_lora_rank}
        assert {k: int(info[k]) for k in expected} == expected


@pytest.mark.llama
def test_server_loads_the_split_model(tiny_models, tiny_split, llama_bin_dir, tmp_path):
    with serving(llama_bin_dir, tiny_split[0], tmp_path / "server.log") as server:
        assert complete(server, n_predict=2)["tokens_predicted"] == 2
        _, models = launch.http_json(server.url + "/v1/models", timeout=10)
        assert models["data"][0]["meta"]["n_params"] == synth.n_params(tiny_models["llama"].shape)


@pytest.mark.llama
def test_server_that_cannot_load_fails_wait_ready(tiny_models, llama_bin_dir, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_models["llama"].f16.read_bytes()[:100_000])  # header whole, tensor data cut
    port = launch.free_port(HOST)
    argv = [str(llama_bin_dir / "llama-server"), "-m", str(truncated), "--host", HOST, "--port", str(port)]
    server = launch.start_server(argv, HOST, port, log_path=tmp_path / "server.log")
    try:
        with pytest.raises(ProcessFailed, match="exited with code") as info:
            server.wait_ready(timeout_s=60)
    finally:
        server.stop()
    e = info.value
    assert e.returncode not in (0, None) and e.argv == argv
    assert any("failed to load model" in line for line in e.output_tail)
    assert e.log_path == str(tmp_path / "server.log")
    assert process_group(server.proc.pid) == []
