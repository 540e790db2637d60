"""cputune build: flags, cache keys, the feature check, and the pipeline on a stand-in tree.

The real pinned llama.cpp build is checked at the end (CI builds it before the tests)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from cputune.engine import build
from cputune.core.errors import BuildError, ConfigError

FAKE = Path(__file__).parent / "fixtures" / "fake_llama"
# A real system_info line of this pinned llama.cpp on an AVX2-only EPYC (this CI machine).
SYSINFO_AVX2 = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | "
                "BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")


def test_native_target_leaves_isa_to_march_native():
    opts = dict(build.cmake_options("native"))
    assert opts["GGML_NATIVE"] == "ON"
    assert "GGML_AVX512" not in opts
    assert opts["GGML_OPENMP"] == "ON" and opts["GGML_CPU_REPACK"] == "ON"
    assert opts["CMAKE_BUILD_TYPE"] == "Release"
    assert opts["LLAMA_OPENSSL"] == "OFF" and opts["LLAMA_USE_PREBUILT_UI"] == "OFF"
    # -march=native keeps its ISA, less the AMX kernels that crash at the pinned commit.
    assert opts["CMAKE_C_FLAGS"] == opts["CMAKE_CXX_FLAGS"] == "-U__AMX_INT8__"


def test_explicit_targets_spell_out_every_isa_option():
    zen4 = dict(build.cmake_options("znver4"))
    assert zen4["GGML_NATIVE"] == "OFF"
    assert zen4["GGML_AVX512"] == zen4["GGML_AVX512_BF16"] == zen4["GGML_AVX512_VNNI"] == "ON"
    assert zen4["GGML_AMX_INT8"] == "OFF" and zen4["GGML_AVX_VNNI"] == "OFF"
    spr = dict(build.cmake_options("sapphirerapids"))
    # AMX is asked for, but its kernels crash at the pinned commit (engines.toml compiled_out).
    assert spr["GGML_AMX_INT8"] == spr["GGML_AMX_TILE"] == "OFF" and spr["GGML_AVX_VNNI"] == "ON"
    assert "AMX_INT8" not in build.missing_features("sapphirerapids", {"AVX512": 1}, set())
    generic = dict(build.cmake_options("generic"))
    assert generic["GGML_AVX2"] == "OFF" and generic["GGML_SSE42"] == "ON"


def test_user_cmake_args_win_and_bad_ones_are_refused():
    opts = dict(build.cmake_options("avx2", ["-DGGML_LTO=ON", "-DGGML_AVX2:BOOL=OFF"]))
    assert opts["GGML_LTO"] == "ON" and opts["GGML_AVX2"] == "OFF"
    with pytest.raises(ConfigError, match="-DNAME=VALUE"):
        build.cmake_options("native", ["GGML_LTO=ON"])
    with pytest.raises(ConfigError, match="unknown --target-cpu 'zen9'") as e:
        build.cmake_options("zen9")
    assert "znver4" in e.value.hint


def test_cache_key_follows_source_and_flags():
    src = build.Source(Path("/x"), "0c1e57098", "0c1e57098", True)
    a = build.make_spec(src, "native")
    assert a.key == build.make_spec(src, "native").key
    assert a.key.startswith("0c1e57098-")
    assert a.key != build.make_spec(src, "znver4").key
    assert a.key != build.make_spec(src, "native", ["-DGGML_LTO=ON"]).key
    other = build.Source(Path("/x"), "gitabc", "abc", False)
    assert a.key != build.make_spec(other, "native").key


def test_system_info_parsing_and_missing_feature_check():
    feats = build.parse_system_info(SYSINFO_AVX2)
    assert feats["AVX2"] == 1 and feats["REPACK"] == 1 and "AVX512" not in feats
    host_avx2 = {"avx", "avx2", "fma", "f16c", "bmi2"}
    assert build.missing_features("native", feats, host_avx2) == []
    # A native build on an AVX-512 host whose library reports AVX512 off must fail.
    host_512 = host_avx2 | {"avx512f", "avx512_vnni"}
    assert build.missing_features("native", feats, host_512) == ["AVX512", "AVX512_VNNI"]
    # An explicit target is checked against what it asked for, whatever the host has.
    assert "AVX512_BF16" in build.missing_features("znver4", feats, host_avx2)
    assert build.missing_features("avx2", feats, set()) == []


def test_host_flags_from_cpuinfo_text():
    text = "processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512f\n"
    assert build.host_cpu_flags(text) == {"fpu", "avx2", "avx512f"}


@pytest.fixture()
def fake_source() -> build.Source:
    return build.user_source(FAKE)


def test_pipeline_builds_caches_and_reports_progress(tmp_path, fake_source):
    spec = build.make_spec(fake_source, "avx2")
    seen: list[float] = []
    b = build.build(spec, root=tmp_path, jobs=2, progress=lambda pct, line: seen.append(pct))
    assert not b.cached
    assert b.key == spec.key and b.path == tmp_path / "builds" / spec.key
    assert seen[0] == 0.0 and seen[-1] == 100.0 and any(0 < p < 100 for p in seen)
    assert b.features["AVX2"] == 1
    assert set(b.binaries) == {"llama-server", "llama-bench", "llama-quantize", "llama-cli",
                               "ggml-rpc-server", "llama"}
    m = json.loads((b.path / "manifest.json").read_text())
    assert m["cmake_options"]["GGML_AVX2"] == "ON" and m["system_info"].startswith("CPU :")
    assert (b.path / "build.log").read_text().count("$ cmake") == 2
    again = build.build(spec, root=tmp_path, progress=lambda *a: pytest.fail("rebuilt"))
    assert again.cached and again.key == b.key
    assert [x.key for x in build.list_builds(tmp_path)] == [b.key]


def test_a_damaged_manifest_is_passed_over_like_a_missing_one(tmp_path, fake_source):
    """build --list and every find_build see only manifests cputune wrote: a FIFO there is never
    read (no hang), a list, a field of the wrong kind or a non-finite figure is no build, and
    the good build beside it is still listed."""
    spec = build.make_spec(fake_source, "avx2")
    good = build.build(spec, root=tmp_path, jobs=2)
    doc = json.loads((good.path / "manifest.json").read_text())
    changed = {"built_at": 1, "features": [], "binaries": {"llama-server": 5}, "build_seconds": float("nan"),
               "key": None, "cmake_options": {"GGML_AVX2": [1]}}
    for i, content in enumerate(["[]", '"x"', "{not json", "", "FIFO", "FOLDER", *changed]):
        m = tmp_path / "builds" / f"zz-bad-{i}" / "manifest.json"
        m.parent.mkdir()
        if content == "FIFO":
            os.mkfifo(m)
        elif content == "FOLDER":
            m.mkdir()
        elif content in changed:
            m.write_text(json.dumps({**doc, content: changed[content]}))
        else:
            m.write_text(content)
        assert [b.key for b in build.list_builds(tmp_path)] == [good.key], content


def test_concurrent_builds_of_one_key_compile_once(tmp_path, fake_source):
    spec = build.make_spec(fake_source, "avx2", ["-DFAKE_SYSINFO=CPU : AVX = 1 | AVX2 = 1 | "
                                                 "BMI2 = 1 | FMA = 1 | F16C = 1 |"])
    results = []
    threads = [threading.Thread(target=lambda: results.append(build.build(spec, root=tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.cached for r in results) == [False, True]
    assert (tmp_path / "builds" / spec.key / "build.log").read_text().count("$ cmake --build") == 1


def test_library_without_the_asked_features_fails_the_build(tmp_path, fake_source):
    # A native build whose library reports AVX2 off on this AVX2 host (the ik_llama.cpp trap).
    spec = build.make_spec(fake_source, "native", ["-DFAKE_SYSINFO=CPU : AVX = 1 | AVX2 = 0 |"])
    with pytest.raises(BuildError, match="AVX2 = 0") as e:
        build.build(spec, root=tmp_path)
    assert e.value.log_path.endswith("build.log")
    assert not (tmp_path / "builds" / spec.key / "manifest.json").exists()


def test_cross_build_for_a_cpu_this_host_cannot_run(tmp_path, fake_source):
    host = build.host_cpu_flags()
    lacking = build.host_lacks("sapphirerapids", host)
    assert "AMX_INT8" in lacking or "amx_int8" in host
    spec = build.make_spec(fake_source, "sapphirerapids")
    if lacking:  # the library is not run here; the manifest says so and trusts the flags
        b = build.build(spec, root=tmp_path)
        assert b.system_info.startswith("(not run: this host lacks")
        assert "AMX_INT8" not in b.features and b.features["AVX512"] == 1  # compiled out
    else:  # an AMX host runs the fake library, which reports no AVX-512: refused
        with pytest.raises(BuildError):
            build.build(spec, root=tmp_path)


def test_compile_failure_carries_command_and_log_tail(tmp_path, fake_source):
    spec = build.make_spec(fake_source, "avx2", ["-DCMAKE_C_FLAGS=-DTHIS_IS_BROKEN -include nonexistent.h"])
    with pytest.raises(BuildError) as e:
        build.build(spec, root=tmp_path)
    assert e.value.returncode != 0
    assert "cmake" in e.value.argv[0]
    assert any("nonexistent.h" in line for line in e.value.output_tail)


def test_not_a_llama_tree_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a llama.cpp source tree"):
        build.user_source(tmp_path)


# ---- the real, pinned build (made by `cputune build` before the tests) --------------------

@pytest.fixture(scope="session")
def real_build() -> build.Build:
    b = build.find_build()
    if b is None:
        pytest.fail("no cached llama.cpp build: run `cputune build` first (CI does)")
    return b


def test_real_build_manifest_reports_the_hosts_features(real_build):
    assert real_build.source_commit == build.pinned_commit()
    assert real_build.llama_cpp_python == build.pinned_version()
    host = build.host_cpu_flags()
    left_out = build.load_engine().compiled_out
    for feat, flag in build.FEATURE_CPUINFO_FLAG.items():
        if flag in host:
            assert real_build.features.get(feat, 0) == (0 if feat in left_out else 1), feat
    assert real_build.features.get("OPENMP") == 1 and real_build.features.get("REPACK") == 1
    # On a CPU with AMX the pinned commit's AMX kernels crash (SIGILL/SIGSEGV at the first matmul,
    # an abort on MLA models: configs/engines.toml compiled_out); the real build leaves them out.
    assert real_build.features.get("AMX_INT8", 0) == 0 and "AMX_INT8 = 1" not in real_build.system_info
    for name in ("llama-server", "llama-bench", "llama-quantize", "llama-cli", "ggml-rpc-server"):
        assert real_build.binary(name).exists(), name
    assert (real_build.bin_dir / "libllama.so").exists()


def test_python_binding_loads_the_tuned_library(real_build):
    from cputune.engine import binding

    info = binding.probe_binding()
    assert info["version"] == build.pinned_version()
    assert build.parse_system_info(info["system_info"]) == real_build.features
    lib = binding.package_dir() / "lib" / "libllama.so"
    assert lib.resolve() == (real_build.bin_dir / "libllama.so").resolve()


def test_a_build_step_whose_output_is_not_valid_utf8_streams_to_the_end(tmp_path):
    """With -j2, two compilers' diagnostics interleave in one pipe and a multi-byte quote can be
    split; the strict decoder raised there, and cmake's children then hung on the full pipe."""
    import io
    import sys

    code = ("import sys\n"
            "for i in range(2000):\n"
            "    sys.stdout.buffer.write(b'[ 10%] warning \\xe2\\x80 split\\n')\n"
            "sys.stdout.buffer.write(b'[ 99%] \\xe2\\x80\\x98done\\xe2\\x80\\x99\\n')\n")
    seen = []
    rc = build._stream([sys.executable, "-c", code], io.StringIO(), {}, tmp_path, seen.append)
    assert rc == 0 and len(seen) == 2001
    assert seen[0] == "[ 10%] warning \ufffd split" and seen[-1] == "[ 99%] \u2018done\u2019"


def test_a_failing_progress_callback_stops_the_whole_step(tmp_path):
    """An error while reading stops every process of the step (its own group), not cmake alone:
    a compiler cmake started must not live on holding the pipe."""
    import io
    import os
    import sys

    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(f'[ 10%] {c.pid}', flush=True)\n"
            "time.sleep(60)\n")
    pids = []

    def boom(line):
        pids.append(int(line.split()[-1]))
        raise RuntimeError("progress failed")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        build._stream([sys.executable, "-c", code], io.StringIO(), {}, tmp_path, boom)
    assert time.monotonic() - t0 < 30
    for _ in range(50):  # the grandchild is reaped by init once killed
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {pids[0]} outlived the error")


def _no_fetch(*args, **kwargs):
    pytest.fail("the source was fetched before the flags were checked")


@pytest.mark.parametrize("target, extra, message", [
    ("zz", (), "unknown --target-cpu 'zz'"),
    ("native", ("GGML_LTO=ON",), "--cmake-arg 'GGML_LTO=ON' is not of the form -DNAME=VALUE"),
    ("native", ("-DGGML_LTO=ON", "-D=1"), "--cmake-arg '-D=1'"),
])
def test_check_flags_refuses_bad_target_and_cmake_args(target, extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        build.check_flags(target, extra)
    assert exc.value.hint
    build.check_flags("znver4", ("-DGGML_LTO=ON", "-DCMAKE_BUILD_TYPE:STRING=Debug"))  # fine ones pass


@pytest.mark.parametrize("args, message", [
    (["--target-cpu", "zz"], "Error: unknown --target-cpu 'zz'"),
    (["--cmake-arg", "GGML_LTO=ON"], "Error: --cmake-arg 'GGML_LTO=ON' is not of the form -DNAME=VALUE"),
    (["--engine", "ik_llama", "--target-cpu", "zz"], "Error: unknown --target-cpu 'zz'"),
])
def test_build_command_checks_flags_before_fetching(monkeypatch, args, message):
    # The pinned source is a 217 MB download: a typo in a flag must be refused before it.
    from click.testing import CliRunner

    from cputune.cli import cli

    monkeypatch.setattr(build, "fetch_source", _no_fetch)
    monkeypatch.setattr(build, "fetch_pinned_source", _no_fetch)
    monkeypatch.setattr(build, "clone_pinned_source", _no_fetch)
    r = CliRunner().invoke(cli, ["build", *args])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    lines = r.output.splitlines()
    assert lines[0] == message or lines[0].startswith(message + " "), r.output
    assert len([ln for ln in lines if ln.startswith("Error:")]) == 1 and "Traceback" not in r.output
    assert all(ln.startswith(("Error:", "hint:")) for ln in lines), r.output
