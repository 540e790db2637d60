"""Engines: their data, keys and option spellings, fetching a source (tarball, git), and the
build pipeline on a stand-in ik_llama.cpp tree. The real ik_llama.cpp build is checked at the end
(CI builds it from the vendored snapshot before the tests)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from cputune.core import launch
from cputune.engine import build, engine_args, llama_bench
from cputune.cli import cli
from cputune.core.errors import ConfigError, EngineError, ProcessFailed
from cputune.model.gguf_model import read_model
from cputune.machine.memory import HugepagePool
from cputune.machine.probe import memory_from_topology
from cputune.machine.topology import discover_topology

FAKE_IK = Path(__file__).parent / "fixtures" / "fake_ik_llama"
IK = "ik_llama"
MiB = 1 << 20


# ---- the data -----------------------------------------------------------------------------

def test_every_engine_loads_and_pins_a_full_commit():
    names = build.engine_names()
    assert names[0] == build.DEFAULT_ENGINE == "llama.cpp" and IK in names
    for name in names:
        eng = build.load_engine(name)
        assert re.fullmatch(r"[0-9a-f]{40}", eng.commit), name
        assert eng.binaries and "llama" in eng.libraries, name
        assert set(eng.reported_features) <= set(build.FEATURE_CPUINFO_FLAG), name
        assert set(eng.isa_options) >= set(eng.reported_features), name  # each checked one has a switch
        assert all(spellings and all(s.startswith("-") for s in spellings)
                   for spellings in eng.flags.values()), name
        if eng.fetch == "git":
            assert eng.git_url.startswith("https://")
            assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in eng.snapshot_sha256)
        else:
            assert eng.fetch == "sdist" and re.fullmatch(r"[0-9a-f]{64}", eng.sdist_sha256)
    # The mainline pin as manifests have always carried it, and the sdist that holds it.
    assert build.pinned_commit() == "0c1e57098" and build.pinned_version() == "0.3.36"
    with pytest.raises(EngineError, match="unknown engine 'ik'") as e:
        build.load_engine("ik")
    assert IK in e.value.hint


def test_ik_llama_builds_its_four_programs_with_its_own_option_names():
    ik = build.load_engine(IK)
    assert ik.binaries == ("llama-server", "llama-bench", "llama-sweep-bench", "llama-quantize")
    assert ik.libraries == {"llama": "src/libllama.so"} and not ik.python_binding
    native = dict(build.cmake_options("native", engine=IK))
    assert native["GGML_NATIVE"] == "ON" and native["LLAMA_BUILD_EXAMPLES"] == "ON"
    assert native["LLAMA_CURL"] == "OFF" and native["GGML_OPENMP"] == "ON"
    # Mainline-only options are not passed (ik's CMakeLists.txt warns on unused -D options).
    assert not {"GGML_CPU_REPACK", "LLAMA_BUILD_TOOLS", "LLAMA_OPENSSL", "GGML_RPC"} & set(native)
    zen5 = dict(build.cmake_options("znver5", engine=IK))
    assert zen5["GGML_NATIVE"] == "OFF" and zen5["GGML_AVXVNNI"] == "ON" and zen5["GGML_AVX512_BF16"] == "ON"
    assert not {"GGML_AVX_VNNI", "GGML_BMI2", "GGML_SSE42", "GGML_AMX_INT8"} & set(zen5)
    mainline = dict(build.cmake_options("znver5"))
    assert mainline["GGML_AVX_VNNI"] == "ON" and mainline["GGML_SSE42"] == "ON" and "GGML_AVXVNNI" not in mainline


def test_cache_key_differs_by_engine_and_mainline_keys_are_unchanged():
    main_src = build.Source(Path("/x"), "gitabc", "abc", False)
    ik_src = replace(main_src, engine=IK)
    main, ik = build.make_spec(main_src, "avx2"), build.make_spec(ik_src, "avx2")
    assert main.key != ik.key
    # The same options and targets would still key apart: the engine is part of the blob.
    assert replace(ik, options=main.options, targets=main.targets).key != main.key
    # A mainline key is computed as before engines existed, so cached builds are still found.
    blob = json.dumps({"source": "gitabc", "options": main.options, "extra": (),
                       "targets": main.targets}, sort_keys=True)
    assert main.key == f"gitabc-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    pinned = build.load_engine(IK)
    assert pinned.label == "ik_llama-8337e4cd3" and build.load_engine().label == "0c1e57098"


def test_ik_feature_check_reads_its_system_info_and_skips_what_it_cannot_report():
    # ik's llama_print_system_info (src/llama.cpp @8337e4cd) lists every feature with 0 or 1.
    text = ("AVX = 1 | AVX_VNNI = 0 | AVX2 = 1 | AVX512 = 0 | AVX512_VBMI = 0 | AVX512_VNNI = 0 | "
            "AVX512_BF16 = 0 | FMA = 1 | NEON = 0 | F16C = 1 | SSE3 = 1 | SSSE3 = 1 | ")
    feats = build.parse_system_info(text)
    assert feats["AVX2"] == 1 and feats["AVX512"] == 0 and "BMI2" not in feats
    host_avx2 = {"avx", "avx2", "fma", "f16c", "bmi2"}
    # BMI2 is not in ik's system info, so an AVX2 host with bmi2 passes...
    assert build.missing_features("native", feats, host_avx2, IK) == []
    # ...where mainline's check, which expects BMI2 reported, would not.
    assert build.missing_features("native", feats, host_avx2) == ["BMI2"]
    assert build.missing_features("native", feats, host_avx2 | {"avx512f"}, IK) == ["AVX512"]
    # sapphirerapids asks for AMX too, which ik has no option for: only what it reports is checked.
    assert "AMX_INT8" not in build.missing_features("sapphirerapids", feats, set(), IK)


# ---- source tarballs ----------------------------------------------------------------------

def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _tree_tarball(path: Path, tree: Path = FAKE_IK, top: str = "fake-ik") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(tree, arcname=top)
    return path


BAD_MEMBERS = {
    "climbs out": ([(_member("top/../../evil"), b"x")], "leads outside"),
    "absolute path": ([(_member("/tmp/evil"), b"x")], "an absolute path"),
    "link outside": ([(_member("top/l", tarfile.SYMTYPE, "../../etc/passwd"), None)], "outside the folder"),
    "absolute link": ([(_member("top/l", tarfile.SYMTYPE, "/etc/passwd"), None)], "absolute path"),
    "hard link outside": ([(_member("top/h", tarfile.LNKTYPE, "../etc/passwd"), None)], "outside the folder"),
    "dot-dot inside": ([(_member("top/a/../b"), b"x")], "a '..' in its path"),
    # Each link points inside by its name alone; tarfile's data filter, which resolves x when
    # it checks z, finds that z leaves the folder.
    "link through a link": ([(_member("top/x", tarfile.SYMTYPE, "."), None),
                             (_member("top/z", tarfile.SYMTYPE, "x/../.."), None)], "refusing to unpack it"),
    "path under a link": ([(_member("top/d", tarfile.SYMTYPE, "sub"), None), (_member("top/d/f"), b"x")],
                          "through a link"),
    "device": ([(_member("top/null", tarfile.CHRTYPE), None)], "device or FIFO"),
}


@pytest.mark.parametrize("case", sorted(BAD_MEMBERS))
def test_tarball_that_would_write_outside_its_folder_is_refused_whole(tmp_path, case):
    members, why = BAD_MEMBERS[case]
    tarball = _tar(tmp_path / "bad.tar.gz", [(_member("top/CMakeLists.txt"), b"")] + members)
    root = tmp_path / "cache"
    with pytest.raises(ConfigError, match=why) as e:
        build.fetch_source(IK, tarball, root=root)
    assert str(tarball) in e.value.message
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    # Nothing unpacked and the scratch folder gone; only the fetch lock is left.
    assert all(p.name.endswith(".lock") for p in (root / "src").iterdir())


def test_tarball_size_and_count_limits():
    members = [_member(f"top/f{i}") for i in range(3)]
    for m in members:
        m.size = 10
    assert build.check_tar_members(members, "t", max_members=3, max_bytes=30) == members
    with pytest.raises(ConfigError, match="more than 2 entries"):
        build.check_tar_members(members, "t", max_members=2)
    with pytest.raises(ConfigError, match="more than 29 bytes"):
        build.check_tar_members(members, "t", max_bytes=29)


def test_tarball_of_something_else_is_refused(tmp_path):
    not_tar = tmp_path / "x.tar.gz"
    not_tar.write_bytes(b"not a tarball")
    with pytest.raises(ConfigError, match="cannot unpack it"):
        build.fetch_source(IK, not_tar, root=tmp_path / "cache")
    no_tree = _tar(tmp_path / "empty.tar.gz", [(_member("top/README"), b"hi")])
    with pytest.raises(ConfigError, match="not a llama.cpp source tree"):
        build.fetch_source(IK, no_tree, root=tmp_path / "cache")


def test_known_snapshot_is_the_pinned_source_and_is_unpacked_once(tmp_path):
    tarball = _tree_tarball(tmp_path / "snap.tar.gz")
    sha = hashlib.sha256(tarball.read_bytes()).hexdigest()
    eng = replace(build.load_engine(IK), snapshot_sha256=(sha,))
    root = tmp_path / "cache"
    src = build.fetch_source(eng, tarball, root=root)
    assert src.pinned and src.label == eng.label and src.commit == eng.commit and src.engine == IK
    assert src.path == root / "src" / eng.label and (src.path / "ggml").is_dir()
    marker = src.path / build.SOURCE_MARKER
    stamp = marker.stat().st_mtime_ns
    assert build.fetch_source(eng, tarball, root=root) == src and marker.stat().st_mtime_ns == stamp
    # The pinned tree is the one a git fetch of the pin would use: no second fetch.
    assert build.fetch_source(eng, root=root) == src
    # Any other tarball is a source of its own, keyed by its sha256.
    other = build.fetch_source(IK, tarball, root=root)
    assert not other.pinned and other.label == f"ik_llama-tar{sha[:9]}" and other.commit is None


# ---- the pinned commit from git -----------------------------------------------------------

def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture()
def fake_ik_repo(tmp_path) -> tuple[Path, str]:
    """A git repository holding the stand-in ik tree, two commits deep; the older one is pinned."""
    repo = tmp_path / "ik_llama.cpp"
    shutil.copytree(FAKE_IK, repo)
    _git("init", "-q", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("commit", "-q", "-m", "stand-in ik_llama.cpp", cwd=repo)
    pinned = _git("rev-parse", "HEAD", cwd=repo)
    (repo / "NEWER").write_text("a later commit the pin must not get\n")
    _git("add", "NEWER", cwd=repo)
    _git("commit", "-q", "-m", "newer", cwd=repo)
    return repo, pinned


def test_clone_fetches_the_pinned_commit_and_feeds_the_build(tmp_path, fake_ik_repo):
    repo, pinned = fake_ik_repo
    eng = replace(build.load_engine(IK), git_url=f"file://{repo}", commit=pinned)
    root = tmp_path / "cache"
    src = build.fetch_source(eng, root=root)
    assert src.pinned and src.commit == pinned and src.label == f"ik_llama-{pinned[:9]}"
    assert _git("rev-parse", "HEAD", cwd=src.path) == pinned and not (src.path / "NEWER").exists()
    shutil.rmtree(repo)  # fetched once: the cache answers from now on
    assert build.fetch_source(eng, root=root) == src

    seen: list[float] = []
    b = build.build(build.make_spec(src, "avx2"), root=root, jobs=2, progress=lambda p, line: seen.append(p))
    assert b.engine == IK and b.commit == pinned and b.source_commit == pinned[:9]
    assert b.llama_cpp_python is None and seen[0] == 0.0 and seen[-1] == 100.0
    assert set(b.binaries) == {"llama-server", "llama-bench", "llama-sweep-bench", "llama-quantize", "llama"}
    assert b.binaries["llama"].endswith("build/src/libllama.so")
    assert b.features["AVX2"] == 1 and b.features["AVX512"] == 0
    assert b.quant_types == {"Q4_0": 2, "Q8_0": 7, "IQ4_KS": 139}
    m = json.loads((b.path / "manifest.json").read_text())
    assert m["engine"] == IK and m["commit"] == pinned and m["cmake_options"]["GGML_AVXVNNI"] == "OFF"
    # The commit option is mainline's; ik's build-info reads git itself.
    assert "LLAMA_BUILD_COMMIT" not in (b.path / "build.log").read_text()
    flags = build.program_flags(b)
    assert flags["llama-bench"] == {"threads": "-t", "mla": "-mla", "mmap": "-mmp", "fused_moe": "-fmoe",
                                    "run_time_repack": "-rtr"}
    assert flags["llama-server"]["mla"] == "-mla" and flags["llama-server"]["no_fused_moe"] == "-no-fmoe"
    assert "fused_moe" not in flags["llama-server"] and flags["llama-quantize"] == {}
    assert build.build(build.make_spec(src, "avx2"), root=root).cached


def test_clone_errors_name_the_command_and_what_to_do(tmp_path, fake_ik_repo, monkeypatch):
    repo, pinned = fake_ik_repo
    ik = build.load_engine(IK)
    missing = replace(ik, git_url=f"file://{tmp_path / 'nowhere'}", commit=pinned)
    with pytest.raises(ProcessFailed, match="could not fetch ik_llama.cpp") as e:
        build.fetch_source(missing, root=tmp_path / "cache")
    assert e.value.argv[:2] == ["git", "-C"] and "fetch" in e.value.argv and e.value.returncode != 0
    assert "--source" in e.value.hint and pinned in e.value.hint
    unknown = replace(ik, git_url=f"file://{repo}", commit="0" * 40)
    # The shallow fetch by id fails, the full fetch works, and the commit is not in it.
    with pytest.raises(ProcessFailed, match=f"{re.escape(unknown.git_url)} has no commit {'0' * 40}"):
        build.fetch_source(unknown, root=tmp_path / "cache")
    assert not (tmp_path / "cache" / "src" / unknown.label).exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(EngineError, match="git is not installed") as e:
        build.fetch_source(replace(ik, git_url=f"file://{repo}", commit=pinned), root=tmp_path / "cache")
    assert "--source" in e.value.hint


# ---- the command --------------------------------------------------------------------------

def test_build_command_on_the_ik_stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    args = ["build", "--engine", IK, "--source", str(FAKE_IK), "--target-cpu", "avx2", "--json"]
    r = CliRunner().invoke(cli, args, catch_exceptions=False)
    doc = json.loads(r.stdout)
    assert doc["schema"] == "cputune.engine.build/1" and doc["python_binding"] is None
    assert doc["build"]["engine"] == IK and doc["build"]["features"]["AVX2"] == 1
    assert doc["flags"]["llama-bench"]["mla"] == "-mla"
    assert "building ik_llama.cpp (avx2)" in r.stderr
    again = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert json.loads(again.stdout)["build"]["cached"] is True
    listed = CliRunner().invoke(cli, ["build", "--list"], catch_exceptions=False)
    assert IK in listed.stdout and doc["build"]["key"] in listed.stdout


@pytest.mark.parametrize("args, message", [
    (["--engine", IK, "--python"], "Error: --python links llama-cpp-python to a llama.cpp build, not to ik_llama.cpp"),
    (["--engine", "ik"], "Error: unknown engine 'ik'"),
])
def test_build_command_refusals_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    r = CliRunner().invoke(cli, ["build", *args])
    assert r.exit_code == 1 and r.output.splitlines()[0] == message
    assert "hint:" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "cputune" / "src").exists()  # refused before anything was fetched


# ---- the real ik_llama.cpp build (made by `cputune build --engine ik_llama` before the tests) --

@pytest.fixture(scope="session")
def real_ik_build() -> build.Build:
    b = build.find_build(engine=IK)
    if b is None:
        pytest.fail("no cached ik_llama.cpp build: run `cputune build --engine ik_llama` first "
                    "(scripts/setup.sh --tests does, from ../shared/vendor when it is there)")
    return b


@pytest.mark.llama
def test_real_ik_build_reports_the_hosts_features(real_ik_build):
    ik = build.load_engine(IK)
    assert real_ik_build.engine == IK and real_ik_build.source_label == ik.label
    assert real_ik_build.commit == ik.commit
    host = build.host_cpu_flags()
    for feat in ik.reported_features:
        assert real_ik_build.features.get(feat) == (1 if build.FEATURE_CPUINFO_FLAG[feat] in host else 0), feat
    assert {"IQ4_KS", "IQ2_K", "Q4_K_M", "Q8_0"} <= set(real_ik_build.quant_types)


@pytest.mark.llama
@pytest.mark.parametrize("program, shows", [
    ("llama-bench", "-mla"), ("llama-server", "--mla-use"), ("llama-sweep-bench", "--mla-use"),
    ("llama-quantize", "IQ4_KS"),
])
def test_real_ik_programs_answer_help(real_ik_build, program, shows, tmp_path):
    binary = Path(real_ik_build.binaries[program])
    p = subprocess.run([str(binary), "--help"], check=False, capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)  # ik's common writes llama.log into the working directory
    # llama-bench's print_usage exits 0; llama-quantize's usage, and llama-server's and
    # llama-sweep-bench's through gpt_params_parse (common/common.cpp), exit 1.
    assert p.returncode == (0 if program == "llama-bench" else 1), p.stdout + p.stderr
    assert shows in p.stdout + p.stderr


@pytest.mark.llama
def test_real_ik_build_flags_come_from_its_help(real_ik_build):
    flags = build.program_flags(real_ik_build)
    assert flags["llama-bench"]["mla"] == "-mla" and flags["llama-bench"]["fused_moe"] == "-fmoe"
    assert flags["llama-server"]["mla"] == "-mla" and flags["llama-server"]["run_time_repack"] == "-rtr"
    assert flags["llama-server"]["threads_batch"] == "-tb"


# ---- how each engine spells cputune's settings, and what cputune picks for ik_llama.cpp ---------

HELP = Path(__file__).parent / "fixtures" / "llama_help"


def recorded_flags(name: str) -> frozenset[str]:
    return launch.parse_help_flags((HELP / name).read_text())


def test_every_spelling_is_an_option_of_the_program_it_is_written_for(llama_bin_dir):
    takes = {
        ("llama.cpp", "server"): recorded_flags("0c1e57098-llama-server.txt"),
        ("llama.cpp", "bench"): launch.help_flags(llama_bin_dir / "llama-bench"),
        (IK, "server"): recorded_flags("8337e4cd3-ik-llama-server.txt"),
        (IK, "bench"): recorded_flags("8337e4cd3-ik-llama-bench.txt"),
    }
    for (name, style), flags in takes.items():
        table = build.load_engine(name).args[style]
        assert table, (name, style)
        for setting, values in table.items():
            for value, argv in values.items():
                assert not argv or argv[0] in flags, (name, style, setting, value, argv)


def test_one_setting_is_written_in_each_engines_words():
    main, ik = build.load_engine(), build.load_engine(IK)
    settings = {"flash_attn": "on", "repack": False, "fused_moe": True, "mla": 3, "attn_max_batch": None}
    # Mainline: repacking is on unless --no-repack, and it has no MLA mode or fused-MoE switch.
    argv, missing = engine_args.spell(main, "llama-server", settings)
    assert argv == ["-fa", "on", "--no-repack"]
    assert missing == ["fused_moe on (llama.cpp's llama-server cannot be given it)",
                       "mla 3 (llama.cpp's llama-server cannot be given it)"]
    # ik's server: -rtr turns repacking on (off is the default), fused MoE is on unless -no-fmoe.
    assert engine_args.spell(ik, "llama-server", settings) == (["-fa", "on", "-mla", "3"], [])
    assert engine_args.spell(ik, "llama-server", {"repack": True, "fused_moe": False})[0] == ["-rtr", "-no-fmoe"]
    # ik's llama-bench takes a value for each, and flash attention only as 0|1.
    assert engine_args.spell(ik, "llama-bench", settings)[0] == ["-fa", "1", "-rtr", "0", "-fmoe", "1", "-mla", "3"]
    assert engine_args.spell(ik, "llama-bench", {"flash_attn": "auto"})[1] == [
        "flash_attn auto (ik_llama.cpp's llama-bench cannot be given it)"]
    # llama-sweep-bench parses the server's options; a build whose --help lacks one is said so.
    assert engine_args.spell(ik, "llama-sweep-bench", {"repack": True}, frozenset({"-t"})) == (
        [], ["repack on (this llama-sweep-bench has no -rtr)"])
    assert {"-rtr", "--run-time-repack", "--repack", "-nr", "--no-repack"} <= engine_args.owned_names(ik, "repack") \
        | engine_args.owned_names(main, "repack")


def test_ik_choices_follow_the_model_and_the_box(ik_models):
    ik, main = build.load_engine(IK), build.load_engine()
    ds2 = read_model(ik_models["deepseek2"].quantized["q4_k_m"])
    picked = {c.setting: c for c in engine_args.choose(ik, ds2)}
    assert list(picked) == ["mla", "flash_attn", "attn_max_batch", "fused_moe", "repack"]
    assert picked["mla"].args == ("-mla", "3") and "576-wide latent" in picked["mla"].reason
    assert picked["attn_max_batch"].args == ("-amb", "512")
    assert picked["fused_moe"].args == () and "8 routed experts" in picked["fused_moe"].reason  # the default
    assert picked["repack"].args == ("-rtr",) and "Q4_K" in picked["repack"].reason and "not mmap'd" in picked["repack"].reason
    assert engine_args.loads_into_ram(ik, engine_args.chosen(tuple(picked.values())))
    # Mainline's tables spell none of these, so it gets no choices.
    assert engine_args.choose(main, ds2) == ()
    # A dense model without MLA: only the repack.
    dense = read_model(ik_models["llama"].quantized["q4_k_m"])
    assert [c.setting for c in engine_args.choose(ik, dense)] == ["repack"]
    assert "Q4_K, Q6_K" in engine_args.choose(ik, dense)[0].reason
    # Free huge pages that hold the file: -thp, and no -rtr (it would turn mmap off).
    mem = replace(memory_from_topology(discover_topology(Path("/")), "test"),
                  hugepages=(HugepagePool(None, 2 * MiB, 64, 64),))
    with_pages = {c.setting: c for c in engine_args.choose(ik, ds2, mem)}
    assert with_pages["huge_pages"].args == ("-thp",) and "repack" not in with_pages
    assert "0.1 GiB of 2 MiB huge pages are free" in with_pages["huge_pages"].reason
    assert "huge_pages" not in {c.setting for c in engine_args.choose(ik, ds2, mem, load_mode="none")}
    # A locked load keeps mmap: no run-time repack then.
    assert "repack" not in {c.setting for c in engine_args.choose(ik, ds2, load_mode="mlock")}
    # llama-bench spells each as a value.
    assert {c.setting: c.args for c in engine_args.choose(ik, ds2, program="llama-bench")}["repack"] == ("-rtr", "1")


def test_ik_refuses_an_mla_model_without_deepseeks_head_sizes(tiny_models, ik_models):
    old = read_model(tiny_models["deepseek2"].quantized["q8_0"])  # latent 256 + 32 rope
    with pytest.raises(EngineError, match="cannot load this MLA model: its KV cache is 288 wide") as e:
        engine_args.check_model(build.load_engine(IK), old)
    assert "--engine llama.cpp" in e.value.hint
    engine_args.check_model(build.load_engine(), old)
    engine_args.check_model(build.load_engine(IK), read_model(ik_models["deepseek2"].quantized["q8_0"]))


@pytest.mark.llama
def test_ik_programs_leave_no_llama_log_where_cputune_runs(real_ik_build, tmp_path, monkeypatch):
    """ik_llama.cpp's common writes llama.log into the working directory (even for --help):
    cputune reads --help in a scratch folder and gives the server and sweep-bench a --log-file
    in its logs folder, so the user's directory is left as it was."""
    monkeypatch.chdir(tmp_path)
    sweep = Path(real_ik_build.binaries["llama-sweep-bench"])
    launch._help_text.cache_clear()
    assert "--sweep-stride" in launch.help_text(sweep)
    argv = llama_bench.sweep_argv(sweep, Path("m.gguf"), 2, 16, 32)
    assert argv[argv.index("--log-file") + 1].startswith(str(launch.log_dir()))
    assert list(tmp_path.iterdir()) == []

