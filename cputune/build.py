"""Compiling llama.cpp for one CPU, cached by source version and flags.

A build takes ~13 minutes on 2 cores, so every build lives under
$XDG_CACHE_HOME/cputune/builds/<version>-<flags hash>/ with a manifest; the same key again
returns at once, and a file lock keeps two concurrent builds of one key apart.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from cputune import __version__
from cputune.data import load_toml
from cputune.errors import BuildError, ConfigError, ProcessFailed
from cputune.fsutil import cache_root, atomic_write_text

MANIFEST = "manifest.json"
SCHEMA = "cputune.build/1"

# system_info names (ggml-cpu.c ggml_cpu_get_features) -> /proc/cpuinfo flag that provides them.
FEATURE_CPUINFO_FLAG = {
    "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "BMI2": "bmi2", "FMA": "fma",
    "F16C": "f16c", "AVX512": "avx512f", "AVX512_VBMI": "avx512_vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
# --target-cpu feature name -> the GGML_* CMake option that switches it on.
FEATURE_OPTION = {
    "AVX": "GGML_AVX", "AVX2": "GGML_AVX2", "BMI2": "GGML_BMI2", "FMA": "GGML_FMA",
    "F16C": "GGML_F16C", "AVX_VNNI": "GGML_AVX_VNNI", "AVX512": "GGML_AVX512",
    "AVX512_VBMI": "GGML_AVX512_VBMI", "AVX512_VNNI": "GGML_AVX512_VNNI",
    "AVX512_BF16": "GGML_AVX512_BF16", "AMX_TILE": "GGML_AMX_TILE",
    "AMX_INT8": "GGML_AMX_INT8", "AMX_BF16": "GGML_AMX_BF16",
}


def pinned_version() -> str:
    return load_toml("llama_cpp.toml")["pin"]["llama_cpp_python"]


def pinned_commit() -> str:
    return load_toml("llama_cpp.toml")["pin"]["llama_cpp_commit"]


def target_names() -> list[str]:
    return list(load_toml("target_cpus.toml"))


@dataclass(frozen=True, slots=True)
class Source:
    """A llama.cpp tree and the label that keys its builds."""

    path: Path
    label: str  # e.g. "0c1e57098" for the pinned sdist, "src-<hash>" for a user checkout
    commit: str | None
    pinned: bool


@dataclass(frozen=True, slots=True)
class BuildSpec:
    source: Source
    target_cpu: str
    options: tuple[tuple[str, str], ...]  # sorted CMake -D options, extra args included
    extra_args: tuple[str, ...]
    targets: tuple[str, ...]

    @property
    def key(self) -> str:
        blob = json.dumps({"source": self.source.label, "options": self.options,
                           "extra": self.extra_args, "targets": self.targets}, sort_keys=True)
        return f"{self.source.label}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class Build:
    """A finished build as its manifest describes it."""

    key: str
    path: Path
    target_cpu: str
    source_label: str
    source_commit: str | None
    llama_cpp_python: str | None
    cmake_options: dict
    compiler: str
    build_seconds: float
    built_at: str
    system_info: str
    features: dict
    binaries: dict
    cached: bool = False

    @property
    def bin_dir(self) -> Path:
        return self.path / "build" / "bin"

    def binary(self, name: str) -> Path:
        return self.bin_dir / name

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["bin_dir"] = str(self.bin_dir)
        return d


# ---- source -------------------------------------------------------------------------------

def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise ProcessFailed(f"{Path(argv[0]).name} failed (exit {p.returncode})", argv,
                            p.returncode, p.stdout + p.stderr)
    return p


def pinned_sdist_sha256() -> str:
    return load_toml("llama_cpp.toml")["pin"]["llama_cpp_python_sdist_sha256"]


def fetch_pinned_source(root: Path | None = None) -> Source:
    """The llama.cpp tree vendored in the pinned llama-cpp-python sdist, fetched with pip once.

    pip prepares an sdist's metadata before it saves it, which needs the sdist's build backend
    (scikit-build-core). pip's build isolation installs that backend into a throwaway
    environment, so the user's venv needs nothing extra; `--no-build-isolation` would look for
    it in the venv and fail on every fresh machine. The sdist is checked against the pinned
    sha256 (`--require-hashes`), so the tree we build is the one we pinned.
    """
    root = root or cache_root()
    version = pinned_version()
    top = root / "src" / f"llama_cpp_python-{version}"
    tree = top / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        (root / "src").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root / "src") as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"llama-cpp-python=={version} "
                           f"--hash=sha256:{pinned_sdist_sha256()}\n")
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  "--require-hashes", "-d", tmp, "-r", str(req)])
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise ConfigError(f"pip did not download the llama-cpp-python {version} sdist",
                                 hint="check that PyPI is reachable")
            unpack = Path(tmp) / "unpack"
            with tarfile.open(sdists[0]) as tf:
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(unpack, **kw)
            if top.exists():
                shutil.rmtree(top)
            os.replace(unpack / top.name, top)
    return Source(path=tree, label=pinned_commit(), commit=pinned_commit(), pinned=True)


def user_source(path: Path) -> Source:
    path = Path(path).expanduser().resolve()
    if not (path / "CMakeLists.txt").exists() or not (path / "ggml").is_dir():
        raise ConfigError(f"{path} is not a llama.cpp source tree (no CMakeLists.txt and ggml/)",
                          hint="pass the top folder of a llama.cpp checkout to --source")
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=9", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or None
    except OSError:
        pass
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    label = f"git{commit}" if commit else f"src{digest}"
    return Source(path=path, label=label, commit=commit, pinned=False)


# ---- flags --------------------------------------------------------------------------------

def cmake_options(target_cpu: str, extra: Iterable[str] = ()) -> tuple[tuple[str, str], ...]:
    """Base options + the target's ISA options + the user's -D args (which win)."""
    targets = load_toml("target_cpus.toml")
    if target_cpu not in targets:
        raise ConfigError(f"unknown --target-cpu {target_cpu!r}",
                          hint="choose one of: " + ", ".join(targets))
    opts = dict(load_toml("llama_cpp.toml")["base_options"])
    t = targets[target_cpu]
    if "options" in t:
        opts.update(t["options"])
    else:
        opts["GGML_NATIVE"] = "OFF"
        opts["GGML_SSE42"] = "ON"
        wanted = set(t.get("features", []))
        for feat, opt in FEATURE_OPTION.items():
            opts[opt] = "ON" if feat in wanted else "OFF"
    for arg in extra:
        m = re.fullmatch(r"-D([A-Za-z0-9_]+)(?::[A-Z]+)?=(.*)", arg)
        if not m:
            raise ConfigError(f"--cmake-arg {arg!r} is not of the form -DNAME=VALUE",
                              hint="for example --cmake-arg -DGGML_LTO=ON")
        opts[m.group(1)] = m.group(2)
    return tuple(sorted(opts.items()))


def make_spec(source: Source, target_cpu: str = "native", extra: Iterable[str] = ()) -> BuildSpec:
    extra = tuple(extra)
    tgt = load_toml("llama_cpp.toml")["targets"]
    return BuildSpec(source=source, target_cpu=target_cpu, options=cmake_options(target_cpu, extra),
                     extra_args=extra, targets=tuple(tgt["binaries"] + tgt["libraries"]))


# ---- feature check ------------------------------------------------------------------------

_SYSINFO_PROBE = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.llama_print_system_info.restype = ctypes.c_char_p
print(lib.llama_print_system_info().decode())
"""


def read_system_info(bin_dir: Path) -> str:
    """The built library's own system_info line (llama_print_system_info), run in a child
    process so a broken library cannot take cputune down with it."""
    lib = bin_dir / "libllama.so"
    p = subprocess.run([sys.executable, "-c", _SYSINFO_PROBE, str(lib)],
                       capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise BuildError("the built libllama.so could not report its features",
                         [sys.executable, "-c", "<llama_print_system_info>", str(lib)],
                         p.returncode, p.stdout + p.stderr)
    return p.stdout.strip()


def parse_system_info(text: str) -> dict[str, int]:
    """'CPU : SSE3 = 1 | AVX2 = 1 | ...' -> {'SSE3': 1, 'AVX2': 1, ...}."""
    return {k: int(v) for k, v in re.findall(r"([A-Z][A-Z0-9_]*) = (\d+)", text)}


def host_cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    m = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    return set(m.group(1).split()) if m else set()


def missing_features(target_cpu: str, features: Mapping[str, int], host_flags: set[str]) -> list[str]:
    """Features the flags asked for (and, for native, the host has) that the binary reports off.

    ik_llama.cpp's docs warn a build can silently fall back to the AVX2 path; this catches it.
    """
    t = load_toml("target_cpus.toml")[target_cpu]
    if "features" in t:
        wanted = [f for f in t["features"] if f in FEATURE_CPUINFO_FLAG]
    else:
        wanted = [f for f, flag in FEATURE_CPUINFO_FLAG.items() if flag in host_flags]
    return [f for f in wanted if features.get(f, 0) != 1]


def host_lacks(target_cpu: str, host_flags: set[str]) -> list[str]:
    """Features an explicit target asks for that this host cannot run (a cross build)."""
    t = load_toml("target_cpus.toml")[target_cpu]
    return [f for f in t.get("features", [])
            if f in FEATURE_CPUINFO_FLAG and FEATURE_CPUINFO_FLAG[f] not in host_flags]


# ---- the build ----------------------------------------------------------------------------

def _compiler_version() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else cc
    return "unknown"


def _load_manifest(path: Path, cached: bool = False) -> Build | None:
    try:
        d = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    fields = {f.name for f in dataclasses.fields(Build)}
    d = {k: v for k, v in d.items() if k in fields}
    d["path"] = path
    d["cached"] = cached
    try:
        return Build(**d)
    except TypeError:
        return None


def list_builds(root: Path | None = None) -> list[Build]:
    builds_dir = (root or cache_root()) / "builds"
    out = [b for p in sorted(builds_dir.glob("*")) if (b := _load_manifest(p, cached=True))]
    return sorted(out, key=lambda b: b.built_at, reverse=True)


def default_target() -> str:
    """The build other commands use: native, unless CPUTUNE_TARGET_CPU says (the Docker image)."""
    return os.environ.get("CPUTUNE_TARGET_CPU") or "native"


def find_build(target_cpu: str | None = None, root: Path | None = None) -> Build | None:
    """The cached build of the pinned source for target_cpu with no extra args, if any."""
    target_cpu = target_cpu or default_target()
    root = root or cache_root()
    src = Source(path=root / "src", label=pinned_commit(), commit=pinned_commit(), pinned=True)
    spec = make_spec(src, target_cpu)
    return _load_manifest(root / "builds" / spec.key, cached=True)


ProgressFn = Callable[[float, str], None]
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _stream(argv: list[str], log, env: dict, cwd: Path, on_line: Callable[[str], None]) -> int:
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert p.stdout is not None
    try:
        for line in p.stdout:
            log.write(line)
            on_line(line.rstrip("\n"))
    except BaseException:
        p.terminate()
        p.wait()
        raise
    return p.wait()


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def build(spec: BuildSpec, root: Path | None = None, jobs: int | None = None,
          progress: ProgressFn | None = None, force: bool = False) -> Build:
    """Configure and compile spec, or return the cached build of its key."""
    root = root or cache_root()
    progress = progress or (lambda pct, line: None)
    for tool in ("cmake", "make") if not shutil.which("ninja") else ("cmake",):
        if not shutil.which(tool):
            raise ConfigError(f"{tool} is not installed; it is needed to build llama.cpp",
                              hint="sudo apt-get install -y cmake build-essential")
    bdir = root / "builds" / spec.key
    if not force and (b := _load_manifest(bdir, cached=True)):
        return b
    bdir.mkdir(parents=True, exist_ok=True)
    with open(root / "builds" / f"{spec.key}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # a concurrent build of this key finishes first
        if not force and (b := _load_manifest(bdir, cached=True)):
            return b
        (bdir / MANIFEST).unlink(missing_ok=True)
        return _build_locked(spec, bdir, root, jobs or os.cpu_count() or 1, progress)


def _build_locked(spec: BuildSpec, bdir: Path, root: Path, jobs: int, progress: ProgressFn) -> Build:
    log_path = bdir / "build.log"
    env = dict(os.environ)
    if shutil.which("ccache"):
        # Paths under the cache root are hashed relative to the build dir, so a build of a new
        # key (same depth) reuses objects compiled for another one (ccache docs: base_dir).
        env.setdefault("CCACHE_BASEDIR", str(root))
    configure = ["cmake", "-S", str(spec.source.path), "-B", str(bdir / "build")]
    configure += [f"-D{k}={v}" for k, v in spec.options]
    if spec.source.commit:
        configure.append(f"-DLLAMA_BUILD_COMMIT={spec.source.commit}")
    compile_ = ["cmake", "--build", str(bdir / "build"), "-j", str(jobs), "--target", *spec.targets]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        progress(0.0, "configuring")
        rc = _stream(configure, log, env, bdir, lambda line: None)
        if rc != 0:
            raise BuildError("CMake could not configure llama.cpp", configure, rc,
                             _tail(log_path), log_path=str(log_path),
                             hint="read the log; a missing compiler or cmake is the usual cause")

        def on_line(line: str) -> None:
            m = _PERCENT.match(line)
            if m:
                progress(float(m.group(1)), line)

        rc = _stream(compile_, log, env, bdir, on_line)
        if rc != 0:
            raise BuildError("compiling llama.cpp failed", compile_, rc, _tail(log_path),
                             log_path=str(log_path))
    seconds = time.monotonic() - t0
    progress(100.0, "checking the built library")
    bin_dir = bdir / "build" / "bin"
    host = host_cpu_flags()
    lacking = host_lacks(spec.target_cpu, host)
    if lacking:
        # Built for another CPU: its code may not run here (SIGILL), so trust the flags.
        system_info = f"(not run: this host lacks {', '.join(lacking)})"
        features = {f: 1 for f in load_toml("target_cpus.toml")[spec.target_cpu]["features"]}
    else:
        system_info = read_system_info(bin_dir)
        features = parse_system_info(system_info)
    missing = missing_features(spec.target_cpu, features, host)
    if missing:
        raise BuildError(
            f"the built library reports {', '.join(m + ' = 0' for m in missing)} although "
            f"--target-cpu {spec.target_cpu} asked for it", compile_, 0, system_info,
            log_path=str(log_path), hint="check the compiler supports these ISA extensions")
    binaries = {}
    for t in spec.targets:
        for cand in (bin_dir / t, bin_dir / f"lib{t}.so"):
            if cand.exists():
                binaries[t] = str(cand)
    manifest = {
        "schema": SCHEMA, "cputune_version": __version__, "key": spec.key,
        "target_cpu": spec.target_cpu, "source_label": spec.source.label,
        "source_commit": spec.source.commit, "source_path": str(spec.source.path),
        "llama_cpp_python": pinned_version() if spec.source.pinned else None,
        "cmake_options": dict(spec.options), "extra_args": list(spec.extra_args),
        "compiler": _compiler_version(), "ccache": bool(shutil.which("ccache")),
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "system_info": system_info,
        "features": features, "binaries": binaries,
    }
    atomic_write_text(bdir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    b = _load_manifest(bdir)
    assert b is not None
    return b


def require_build(target_cpu: str | None = None) -> Build:
    b = find_build(target_cpu)
    if b is None:
        raise ConfigError("llama.cpp has not been built yet", hint="run `cputune build` (about 15 "
                          "minutes on 2 cores; cached afterwards)")
    return b
