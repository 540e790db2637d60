"""Compiling llama.cpp (or another engine, such as ik_llama.cpp) for one CPU, cached by engine,
source version and flags.

A build takes ~13-17 minutes on 2 cores, so every build lives under
$XDG_CACHE_HOME/cputune/builds/<version>-<flags hash>/ with a manifest; the same key again
returns at once, and a file lock keeps two concurrent builds of one key apart. What differs
between engines (source, targets, option spellings, reported features) is data in
configs/engines.toml, read into an Engine.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cputune import __version__
from cputune.core.data import load_toml
from cputune.core.errors import BuildError, ConfigError, EngineError, ProcessFailed
from cputune.core.fsutil import atomic_write_text, cache_root, expand_home, read_small_text
from cputune.core import launch
from cputune.core.launch import help_flags

MANIFEST = "manifest.json"
SCHEMA = "cputune.engine.build/1"
DEFAULT_ENGINE = "llama.cpp"
SOURCE_MARKER = ".cputune-source.json"  # written last into a fetched tree: it is complete

# system_info names (ggml-cpu.c ggml_cpu_get_features) -> /proc/cpuinfo flag that provides them,
# spelled as the kernel does (arch/x86/include/asm/cpufeatures.h: "avx512vbmi" has no underscore,
# "avx512_vnni" and "avx512_bf16" do).
FEATURE_CPUINFO_FLAG = {
    "AVX": "avx", "AVX2": "avx2", "AVX_VNNI": "avx_vnni", "BMI2": "bmi2", "FMA": "fma",
    "F16C": "f16c", "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8",
}
# A source tarball bigger than this is refused before anything is written (a tar bomb, or the
# wrong file): ik_llama.cpp's snapshot unpacks to 41 MB, llama.cpp's sdist tree to 176 MB.
MAX_TARBALL_BYTES = 4 << 30
MAX_TARBALL_MEMBERS = 200_000


@dataclass(frozen=True, slots=True)
class Engine:
    """One engine as configs/engines.toml describes it (see the key list there)."""

    name: str
    title: str
    commit: str
    fetch: str  # "sdist" | "git"
    binaries: tuple[str, ...]
    libraries: dict  # CMake library target -> path of its .so under the build dir
    base_options: dict
    explicit_options: dict
    isa_options: dict  # system_info feature -> CMake option
    reported_features: tuple[str, ...]
    flags: dict  # setting -> spellings, the first one written
    commit_option: str = ""
    python_binding: bool = False
    git_url: str | None = None
    snapshot_sha256: tuple[str, ...] = ()
    sdist_package: str | None = None
    sdist_version: str | None = None
    sdist_sha256: str | None = None
    sdist_tree: str | None = None
    rpc_server: str = ""  # the RPC worker's binary; "" when the engine's build has none
    repack_types: tuple[str, ...] = ()  # what run-time repacking turns into interleaved rows
    repack_turns_mmap_off: bool = False
    mla_kv_width: int = 0  # the one latent KV width per layer its loader takes (0: any)
    mla_head_multiple: int = 1
    args: dict = field(default_factory=dict)  # program style -> setting -> {value: argv words}
    compiled_out: tuple[str, ...] = ()  # ISA features left out of every build (a known crash)

    @property
    def label_prefix(self) -> str:
        # Mainline keys keep the form they had before there were engines ("0c1e57098-<hash>"),
        # so builds cached then are still found.
        return "" if self.name == DEFAULT_ENGINE else f"{self.name}-"

    @property
    def label(self) -> str:
        """The key label of the pinned source: 'ik_llama-8337e4cd3'."""
        return f"{self.label_prefix}{self.commit[:9]}"

    @property
    def targets(self) -> tuple[str, ...]:
        return self.binaries + tuple(self.libraries)


def engine_names() -> list[str]:
    return list(load_toml("engines.toml")["engines"])


def load_engine(name: str = DEFAULT_ENGINE) -> Engine:
    engines = load_toml("engines.toml")["engines"]
    if name not in engines:
        raise EngineError(f"unknown engine {name!r}", hint="choose one of: " + ", ".join(engines))
    d = dict(engines[name])
    for k in ("binaries", "reported_features", "snapshot_sha256", "repack_types", "compiled_out"):
        d[k] = tuple(d.get(k, ()))
    d["flags"] = {k: tuple(v) for k, v in d.get("flags", {}).items()}
    return Engine(name=name, **d)


def _engine(engine: Engine | str) -> Engine:
    return engine if isinstance(engine, Engine) else load_engine(engine)


def pinned_version() -> str:
    """The llama-cpp-python version whose sdist holds the pinned mainline tree."""
    return load_engine().sdist_version


def pinned_commit() -> str:
    """The pinned mainline commit as manifests and keys carry it (9 digits, as its changelog names it)."""
    return load_engine().commit[:9]


def target_names() -> list[str]:
    return list(load_toml("target_cpus.toml"))


@dataclass(frozen=True, slots=True)
class Source:
    """An engine's source tree and the label that keys its builds."""

    path: Path
    label: str  # "0c1e57098" for the pinned sdist, "ik_llama-8337e4cd3", "src<hash>" for a checkout
    commit: str | None  # the full commit when known
    pinned: bool
    engine: str = DEFAULT_ENGINE


@dataclass(frozen=True, slots=True)
class BuildSpec:
    source: Source
    target_cpu: str
    options: tuple[tuple[str, str], ...]  # sorted CMake -D options, extra args included
    extra_args: tuple[str, ...]
    targets: tuple[str, ...]

    @property
    def engine(self) -> str:
        return self.source.engine

    @property
    def key(self) -> str:
        d = {"source": self.source.label, "options": self.options, "extra": self.extra_args,
             "targets": self.targets}
        if self.engine != DEFAULT_ENGINE:  # mainline keys stay as they were before engines
            d["engine"] = self.engine
        blob = json.dumps(d, sort_keys=True)
        return f"{self.source.label}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@dataclass(frozen=True, slots=True)
class Build:
    """A finished build as its manifest describes it."""

    key: str
    path: Path
    target_cpu: str
    source_label: str
    source_commit: str | None  # 9 digits
    llama_cpp_python: str | None
    cmake_options: dict
    compiler: str
    build_seconds: float
    built_at: str
    system_info: str
    features: dict
    binaries: dict
    cached: bool = False
    # Manifests written before engines lack these; they were all mainline builds.
    engine: str = DEFAULT_ENGINE
    commit: str | None = None  # the full commit when known
    quant_types: dict = field(default_factory=dict)  # llama-quantize's type name -> ftype id

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
    p = subprocess.run(argv, check=False, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        raise ProcessFailed(f"{Path(argv[0]).name} failed (exit {p.returncode})", argv,
                            p.returncode, p.stdout + p.stderr)
    return p


def pinned_sdist_sha256() -> str:
    return load_engine().sdist_sha256


def fetch_source(engine: Engine | str = DEFAULT_ENGINE, source: Path | str | None = None,
                 root: Path | None = None) -> Source:
    """The tree to build: `source` (a folder, or a tarball unpacked into the cache) when given,
    else the engine's pinned source, fetched into the cache once."""
    eng = _engine(engine)
    root = root or cache_root()
    if source is not None:
        path = expand_home(str(source), "--source")
        if path.is_dir():
            return user_source(path, eng.name)
        if path.is_file():
            return tarball_source(path, eng, root)
        raise ConfigError(f"--source {path}: no such folder or file",
                          hint="pass a source folder or a .tar.gz of one")
    if eng.fetch == "sdist":
        return fetch_pinned_source(root)
    return clone_pinned_source(eng, root)


def fetch_pinned_source(root: Path | None = None) -> Source:
    """The llama.cpp tree vendored in the pinned llama-cpp-python sdist, fetched with pip once.

    pip prepares an sdist's metadata before it saves it, which needs the sdist's build backend
    (scikit-build-core). pip's build isolation installs that backend into a throwaway
    environment, so the user's venv needs nothing extra; `--no-build-isolation` would look for
    it in the venv and fail on every fresh machine. The sdist is checked against the pinned
    sha256 (`--require-hashes`), so the tree we build is the one we pinned.
    """
    eng = load_engine(DEFAULT_ENGINE)
    root = root or cache_root()
    version = eng.sdist_version
    top = root / "src" / f"llama_cpp_python-{version}"
    tree = top / eng.sdist_tree
    if not (tree / "CMakeLists.txt").exists():
        (root / "src").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root / "src") as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{eng.sdist_package}=={version} --hash=sha256:{eng.sdist_sha256}\n")
            _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                  "--require-hashes", "-d", tmp, "-r", str(req)])
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise EngineError(f"pip did not download the llama-cpp-python {version} sdist",
                                  hint="check that PyPI is reachable")
            unpacked = extract_tarball(sdists[0], Path(tmp) / "unpack")
            if top.exists():
                shutil.rmtree(top)
            os.replace(unpacked, top)
    return Source(path=tree, label=eng.label, commit=eng.commit, pinned=True, engine=eng.name)


def _check_tree(path: Path, what: str) -> None:
    if not (path / "CMakeLists.txt").exists() or not (path / "ggml").is_dir():
        raise ConfigError(f"{what} is not a llama.cpp source tree (no CMakeLists.txt and ggml/)",
                          hint="pass the top folder of a llama.cpp checkout, or a tarball of one, "
                               "to --source")


def user_source(path: Path, engine: str = DEFAULT_ENGINE) -> Source:
    path = Path(path).expanduser().resolve()
    _check_tree(path, str(path))
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"],
                                check=False, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        pass
    prefix = _engine(engine).label_prefix
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    label = f"{prefix}git{commit[:9]}" if commit else f"{prefix}src{digest}"
    return Source(path=path, label=label, commit=commit, pinned=False, engine=engine)


def _read_json_object(path: Path) -> dict | None:
    """A small JSON object cputune wrote in its cache (a manifest, a source marker), or None for
    anything else there: missing, not a regular file (never a blocking read of a FIFO), too
    large, not JSON, not an object."""
    try:
        d = json.loads(read_small_text(path, limit=1 << 20))
    except (ConfigError, ValueError, RecursionError):
        return None
    return d if isinstance(d, dict) else None


def _read_marker(tree: Path) -> dict | None:
    return _read_json_object(tree / SOURCE_MARKER)


@contextmanager
def _fetch_lock(root: Path, label: str) -> Iterator[None]:
    """Held while the tree `label` is looked at and fetched: a second cputune waits, then finds
    it, instead of unpacking it again over the one the first is building from."""
    (root / "src").mkdir(parents=True, exist_ok=True)
    with open(root / "src" / f".{label}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _install_tree(tree: Path, dest: Path, marker: dict) -> None:
    """Move a finished tree to `dest` (replacing an incomplete one), marked complete."""
    (tree / SOURCE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tree, dest)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_tar_members(members: Iterable[tarfile.TarInfo], what: str,
                      max_members: int = MAX_TARBALL_MEMBERS,
                      max_bytes: int = MAX_TARBALL_BYTES) -> list[tarfile.TarInfo]:
    """The members of a source tarball, refused whole (ConfigError, naming the member) when one
    has an absolute path or a `..` in it, goes through a link in the archive, is a link whose
    target is outside the tree, or is a device or FIFO; or when there are more or bigger members
    than a source tree has. Unpacking then applies tarfile's "data" filter (PEP 706), which
    resolves links as they are made and catches what a look at the names alone cannot."""
    out, links, total = [], set(), 0

    def refuse(m: tarfile.TarInfo, why: str) -> ConfigError:
        return ConfigError(f"{what}: refusing to unpack {m.name!r}: {why}",
                           hint="pass a source tarball made with `git archive` or `tar czf`")

    for m in members:
        if len(out) >= max_members:
            raise ConfigError(f"{what}: more than {max_members} entries; not a source tarball")
        if m.name.startswith("/") or re.match(r"[A-Za-z]:", m.name):
            raise refuse(m, "an absolute path")
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise refuse(m, "a '..' in its path leads outside the folder")
        if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
            raise refuse(m, "its path goes through a link in the archive")
        if m.issym() or m.islnk():
            if m.linkname.startswith("/"):
                raise refuse(m, f"a link to the absolute path {m.linkname!r}")
            # A symbolic link's target is relative to its folder, a hard link's to the top.
            start = parts[:-1] if m.issym() else []
            depth = len(start)
            for p in (p for p in m.linkname.split("/") if p not in ("", ".")):
                depth += -1 if p == ".." else 1
                if depth < 0:
                    raise refuse(m, f"a link to {m.linkname!r}, outside the folder")
            links.add("/".join(parts))
        elif not (m.isreg() or m.isdir()):
            raise refuse(m, "not a file, folder or link (a device or FIFO)")
        total += m.size if m.isreg() else 0
        if total > max_bytes:
            raise ConfigError(f"{what}: unpacks to more than {max_bytes} bytes; not a source tarball")
        out.append(m)
    return out


def extract_tarball(path: Path, into: Path) -> Path:
    """Unpack a source tarball into the folder `into` (checked first, see check_tar_members);
    returns the tree in it: `into` itself or its one top folder."""
    if not hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
        raise ConfigError("this Python's tarfile has no 'data' filter, so a tarball cannot be "
                          "unpacked safely", hint="unpack it yourself and pass the folder to --source")
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(path) as tf:
            members = check_tar_members(tf, str(path))
            tf.extractall(into, members=members, filter="data")
    except tarfile.FilterError as e:
        raise ConfigError(f"{path}: refusing to unpack it: {e}",
                          hint="pass a source tarball made with `git archive` or `tar czf`") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ConfigError(f"{path}: cannot unpack it ({e})",
                          hint="pass a .tar.gz (or .tar.xz, .tar.bz2, .tar) of a source tree") from e
    entries = list(into.iterdir())
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def tarball_source(path: Path, engine: Engine | str = DEFAULT_ENGINE, root: Path | None = None) -> Source:
    """A source tarball unpacked into the cache's src/ once. A tarball whose sha256 is one of
    the engine's known snapshots is the pinned source (same tree, same key as a git fetch)."""
    eng = _engine(engine)
    root = root or cache_root()
    path = Path(path).expanduser().resolve()
    sha = _sha256_file(path)
    pinned = sha in eng.snapshot_sha256
    label = eng.label if pinned else f"{eng.label_prefix}tar{sha[:9]}"
    dest = root / "src" / label
    with _fetch_lock(root, label):
        marker = _read_marker(dest) or {}
        # The pinned tree may have come from git instead; the same commit is the same tree.
        have = marker.get("commit") == eng.commit if pinned else marker.get("sha256") == sha
        if not have:
            with tempfile.TemporaryDirectory(dir=root / "src", prefix=f".{label}-") as tmp:
                tree = extract_tarball(path, Path(tmp) / "unpack")
                _check_tree(tree, str(path))
                _install_tree(tree, dest, {"from": str(path), "sha256": sha,
                                           "commit": eng.commit if pinned else None})
    return Source(path=dest, label=label, commit=eng.commit if pinned else None, pinned=pinned,
                  engine=eng.name)


def _git(argv: list[str], what: str, hint: str) -> str:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")  # fail, never ask for a password
    p = subprocess.run(["git", *argv], check=False, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise ProcessFailed(what, ["git", *argv], p.returncode, p.stdout + p.stderr, hint=hint)
    return p.stdout.strip()


def clone_pinned_source(engine: Engine | str, root: Path | None = None) -> Source:
    """A checkout of the engine's pinned commit from its git URL, in the cache's src/ once.

    Only that commit is fetched (`fetch --depth 1 URL COMMIT`: GitHub and git's protocol v2
    serve a commit by id); a server that refuses that gets a full fetch of its branches."""
    eng = _engine(engine)
    root = root or cache_root()
    dest = root / "src" / eng.label
    with _fetch_lock(root, eng.label):
        if (_read_marker(dest) or {}).get("commit") != eng.commit:
            _clone(eng, dest)
    return Source(path=dest, label=eng.label, commit=eng.commit, pinned=True, engine=eng.name)


def _clone(eng: Engine, dest: Path) -> None:
    if not shutil.which("git"):
        raise EngineError(f"git is not installed; it is needed to fetch {eng.title}",
                          hint=f"sudo apt-get install -y git, or pass --source with a checkout or "
                               f"tarball of {eng.title} {eng.commit}")
    hint = (f"check that {eng.git_url} can be reached from here, or pass --source with a "
            f"checkout or tarball of commit {eng.commit}")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        tree = Path(tmp) / "tree"
        _git(["init", "-q", str(tree)], "git init failed", hint)
        try:
            _git(["-C", str(tree), "fetch", "-q", "--depth", "1", eng.git_url, eng.commit],
                 f"could not fetch {eng.title} {eng.commit[:9]} from {eng.git_url}", hint)
        except ProcessFailed as shallow:
            try:
                _git(["-C", str(tree), "fetch", "-q", eng.git_url, "+refs/heads/*:refs/remotes/origin/*"],
                     f"could not fetch {eng.title} from {eng.git_url}", hint)
            except ProcessFailed:
                raise shallow from None  # the first error says why (a host not found, a bad id)
        _git(["-C", str(tree), "checkout", "-q", "--detach", eng.commit],
             f"{eng.git_url} has no commit {eng.commit}", hint)
        head = _git(["-C", str(tree), "rev-parse", "HEAD"], "git rev-parse failed", hint)
        if head != eng.commit:
            raise EngineError(f"the checkout of {eng.git_url} is at {head}, not {eng.commit}", hint=hint)
        _check_tree(tree, f"{eng.git_url} at {eng.commit[:9]}")
        _install_tree(tree, dest, {"from": eng.git_url, "commit": eng.commit})


# ---- flags --------------------------------------------------------------------------------

def cmake_options(target_cpu: str, extra: Iterable[str] = (),
                  engine: Engine | str = DEFAULT_ENGINE) -> tuple[tuple[str, str], ...]:
    """Base options + the target's ISA options + the user's -D args (which win)."""
    eng = _engine(engine)
    targets = load_toml("target_cpus.toml")
    if target_cpu not in targets:
        raise ConfigError(f"unknown --target-cpu {target_cpu!r}",
                          hint="choose one of: " + ", ".join(targets))
    opts = dict(eng.base_options)
    t = targets[target_cpu]
    if "options" in t:
        opts.update(t["options"])
    else:
        opts.update(eng.explicit_options)
        wanted = set(t.get("features", []))
        for feat, opt in eng.isa_options.items():
            opts[opt] = "ON" if feat in wanted and feat not in eng.compiled_out else "OFF"
    for arg in extra:
        m = re.fullmatch(r"-D([A-Za-z0-9_]+)(?::[A-Z]+)?=(.*)", arg)
        if not m:
            raise ConfigError(f"--cmake-arg {arg!r} is not of the form -DNAME=VALUE",
                              hint="for example --cmake-arg -DGGML_LTO=ON")
        opts[m.group(1)] = m.group(2)
    return tuple(sorted(opts.items()))


def check_flags(target_cpu: str, extra: Iterable[str] = (), engine: Engine | str = DEFAULT_ENGINE) -> None:
    """Refuse an unknown --target-cpu or a malformed --cmake-arg (ConfigError) with cmake_options'
    own checks, so a caller can do it before fetching a source it would then not build."""
    cmake_options(target_cpu, extra, engine)


def make_spec(source: Source, target_cpu: str = "native", extra: Iterable[str] = ()) -> BuildSpec:
    extra = tuple(extra)
    eng = load_engine(source.engine)
    return BuildSpec(source=source, target_cpu=target_cpu,
                     options=cmake_options(target_cpu, extra, eng), extra_args=extra,
                     targets=eng.targets)


# ---- feature check ------------------------------------------------------------------------

_SYSINFO_PROBE = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.llama_print_system_info.restype = ctypes.c_char_p
print(lib.llama_print_system_info().decode())
"""


def read_system_info(lib: Path) -> str:
    """The built library's own system_info line (llama_print_system_info), run in a child
    process so a broken library cannot take cputune down with it. `lib` is the libllama.so, or
    (as before engines) the folder holding it."""
    lib = Path(lib)
    if lib.is_dir():
        lib = lib / "libllama.so"
    p = subprocess.run([sys.executable, "-c", _SYSINFO_PROBE, str(lib)],
                       check=False, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise BuildError(f"the built {lib.name} could not report its features",
                         [sys.executable, "-c", "<llama_print_system_info>", str(lib)],
                         p.returncode, p.stdout + p.stderr)
    return p.stdout.strip()


def parse_system_info(text: str) -> dict[str, int]:
    """'CPU : SSE3 = 1 | AVX2 = 1 | ...' (ik_llama.cpp: 'AVX = 1 | AVX_VNNI = 0 | ...') ->
    {'SSE3': 1, 'AVX2': 1, ...}."""
    return {k: int(v) for k, v in re.findall(r"([A-Z][A-Z0-9_]*) = (\d+)", text)}


def host_cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    m = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    return set(m.group(1).split()) if m else set()


def missing_features(target_cpu: str, features: Mapping[str, int], host_flags: set[str],
                     engine: Engine | str = DEFAULT_ENGINE) -> list[str]:
    """Features the flags asked for (and, for native, the host has) that the binary reports off.

    ik_llama.cpp's docs warn a build can silently fall back to the AVX2 path; this catches it.
    Only the features the engine's system info reports are checked (ik_llama.cpp has no BMI2).
    """
    reported = set(_engine(engine).reported_features)
    t = load_toml("target_cpus.toml")[target_cpu]
    if "features" in t:
        wanted = [f for f in t["features"] if f in FEATURE_CPUINFO_FLAG]
    else:
        wanted = [f for f, flag in FEATURE_CPUINFO_FLAG.items() if flag in host_flags]
    out = _engine(engine).compiled_out
    return [f for f in wanted if f in reported and f not in out and features.get(f, 0) != 1]


def host_lacks(target_cpu: str, host_flags: set[str]) -> list[str]:
    """Features an explicit target asks for that this host cannot run (a cross build)."""
    t = load_toml("target_cpus.toml")[target_cpu]
    return [f for f in t.get("features", [])
            if f in FEATURE_CPUINFO_FLAG and FEATURE_CPUINFO_FLAG[f] not in host_flags]


# ---- what the built programs take ---------------------------------------------------------

def help_text(binary: Path) -> str:
    """A program's --help, stdout and stderr (launch.help_text: the one place that runs it)."""
    return launch.help_text(binary)


def resolve_flags(engine: Engine | str, takes: frozenset[str]) -> dict[str, str]:
    """The engine's settings a program takes -> the spelling to write (its first listed one
    that `takes`, the options its --help lists, has); settings it lacks are left out."""
    out = {}
    for setting, spellings in _engine(engine).flags.items():
        if any(s in takes for s in spellings):
            out[setting] = next(s for s in spellings if s in takes)
    return out


def program_flags(b: Build) -> dict[str, dict[str, str]]:
    """Each program of a build -> {setting: spelling} for the engine's settings it takes, read
    from its --help now (launch.help_flags, once per binary version), as serve reads them."""
    eng = load_engine(b.engine)
    return {name: resolve_flags(eng, help_flags(b.binaries[name]))
            for name in eng.binaries if name in b.binaries}


_QUANT_TYPE = re.compile(r"^\s*(\d+)\s+or\s+([A-Za-z0-9_]+)\s+:", re.MULTILINE)


def parse_quant_types(text: str) -> dict[str, int]:
    """llama-quantize --help's "Allowed quantization types" ('  2  or  Q4_0    : ...', as
    examples/quantize/quantize.cpp and tools/quantize/quantize.cpp print them) -> {'Q4_0': 2}."""
    return {name: int(num) for num, name in _QUANT_TYPE.findall(text)}


# ---- the build ----------------------------------------------------------------------------

def _compiler_version() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            out = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else cc
    return "unknown"


_OPT = (str, type(None))
# What each manifest field may hold (what write_manifest writes); a manifest with any other is
# not a build cputune made, and is passed over like a missing one.
_MANIFEST_FIELDS = {"key": str, "target_cpu": str, "source_label": str, "source_commit": _OPT,
                    "llama_cpp_python": _OPT, "cmake_options": dict, "compiler": str,
                    "build_seconds": (int, float), "built_at": str, "system_info": str,
                    "features": dict, "binaries": dict, "engine": str, "commit": _OPT, "quant_types": dict}
_MANIFEST_VALUES = {"cmake_options": (str, int, bool), "features": (str, int, bool), "binaries": (str,),
                    "quant_types": (int,)}


def _load_manifest(path: Path, cached: bool = False) -> Build | None:
    d = _read_json_object(path / MANIFEST)
    if d is None:
        return None
    d = {k: v for k, v in d.items() if k in _MANIFEST_FIELDS}
    for k, v in d.items():
        kinds = _MANIFEST_FIELDS[k]
        if not isinstance(v, kinds) or isinstance(v, bool):  # no field is a bare true/false
            return None
        if isinstance(v, dict) and not all(isinstance(x, str) and isinstance(y, _MANIFEST_VALUES[k])
                                           for x, y in v.items()):
            return None
    if isinstance(d.get("build_seconds"), float) and not math.isfinite(d["build_seconds"]):
        return None
    d["path"] = path
    d["cached"] = cached
    try:
        return Build(**d)
    except TypeError:  # a field it must have is missing
        return None


def list_builds(root: Path | None = None) -> list[Build]:
    builds_dir = (root or cache_root()) / "builds"
    out = [b for p in sorted(builds_dir.glob("*")) if (b := _load_manifest(p, cached=True))]
    return sorted(out, key=lambda b: b.built_at, reverse=True)


def default_target() -> str:
    """The build other commands use: native, unless CPUTUNE_TARGET_CPU says (the Docker image)."""
    return os.environ.get("CPUTUNE_TARGET_CPU") or "native"


def find_build(target_cpu: str | None = None, root: Path | None = None,
               engine: str = DEFAULT_ENGINE) -> Build | None:
    """The cached build of the engine's pinned source for target_cpu with no extra args, if any."""
    target_cpu = target_cpu or default_target()
    root = root or cache_root()
    eng = load_engine(engine)
    src = Source(path=root / "src", label=eng.label, commit=eng.commit, pinned=True, engine=eng.name)
    spec = make_spec(src, target_cpu)
    return _load_manifest(root / "builds" / spec.key, cached=True)


ProgressFn = Callable[[float, str], None]
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _stream(argv: list[str], log, env: dict, cwd: Path, on_line: Callable[[str], None]) -> int:
    """Run a build step, copying its output to the log and each line to `on_line`.

    Compiler output is decoded with errors replaced: with -j2, two compilers' diagnostics share
    one pipe, and a write split mid-character (ik_llama.cpp's build prints 16 MB of warnings
    with UTF-8 quotes) made the strict decoder raise, after which cmake's children blocked on
    the full pipe and the build hung. The step runs in its own process group, so an error or a
    Ctrl-C stops every compiler it started, not cmake alone."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    p = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, encoding="utf-8", errors="replace", bufsize=1,
                         start_new_session=True)
    assert p.stdout is not None
    try:
        for line in p.stdout:
            log.write(line)
            on_line(line.rstrip("\n"))
    except BaseException:
        _stop_group(p)
        raise
    return p.wait()


def _stop_group(p: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group, SIGKILL after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


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
    bdir = root / "builds" / spec.key
    if not force and (b := _load_manifest(bdir, cached=True)):
        return b
    for tool in ("cmake", "make") if not shutil.which("ninja") else ("cmake",):
        if not shutil.which(tool):
            raise EngineError(f"{tool} is not installed; it is needed to build llama.cpp",
                              hint="sudo apt-get install -y cmake build-essential")
    bdir.mkdir(parents=True, exist_ok=True)
    with open(root / "builds" / f"{spec.key}.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # a concurrent build of this key finishes first
        if not force and (b := _load_manifest(bdir, cached=True)):
            return b
        (bdir / MANIFEST).unlink(missing_ok=True)
        return _build_locked(spec, bdir, root, jobs or os.cpu_count() or 1, progress)


def _build_locked(spec: BuildSpec, bdir: Path, root: Path, jobs: int, progress: ProgressFn) -> Build:
    eng = load_engine(spec.engine)
    log_path = bdir / "build.log"
    env = dict(os.environ)
    if shutil.which("ccache"):
        # Paths under the cache root are hashed relative to the build dir, so a build of a new
        # key (same depth) reuses objects compiled for another one (ccache docs: base_dir).
        env.setdefault("CCACHE_BASEDIR", str(root))
    configure = ["cmake", "-S", str(spec.source.path), "-B", str(bdir / "build")]
    configure += [f"-D{k}={v}" for k, v in spec.options]
    if spec.source.commit and eng.commit_option:
        configure.append(f"-D{eng.commit_option}={spec.source.commit[:9]}")
    compile_ = ["cmake", "--build", str(bdir / "build"), "-j", str(jobs), "--target", *spec.targets]
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        progress(0.0, "configuring")
        rc = _stream(configure, log, env, bdir, lambda line: None)
        if rc != 0:
            raise BuildError(f"CMake could not configure {eng.title}", configure, rc,
                             _tail(log_path), log_path=str(log_path),
                             hint="read the log; a missing compiler or cmake is the usual cause")

        def on_line(line: str) -> None:
            m = _PERCENT.match(line)
            if m:
                progress(float(m.group(1)), line)

        rc = _stream(compile_, log, env, bdir, on_line)
        if rc != 0:
            raise BuildError(f"compiling {eng.title} failed", compile_, rc, _tail(log_path),
                             log_path=str(log_path))
    seconds = time.monotonic() - t0
    progress(100.0, "checking the built library")
    build_dir = bdir / "build"
    host = host_cpu_flags()
    lacking = host_lacks(spec.target_cpu, host)
    if lacking:
        # Built for another CPU: its code may not run here (SIGILL), so trust the flags.
        system_info = f"(not run: this host lacks {', '.join(lacking)})"
        features = {f: 1 for f in load_toml("target_cpus.toml")[spec.target_cpu]["features"]
                    if f in eng.reported_features and f not in eng.compiled_out}
    else:
        system_info = read_system_info(build_dir / eng.libraries["llama"])
        features = parse_system_info(system_info)
    missing = missing_features(spec.target_cpu, features, host, eng)
    if missing:
        raise BuildError(
            f"the built library reports {', '.join(m + ' = 0' for m in missing)} although "
            f"--target-cpu {spec.target_cpu} asked for it", compile_, 0, system_info,
            log_path=str(log_path), hint="check the compiler supports these ISA extensions")
    binaries = {t: str(build_dir / "bin" / t) for t in eng.binaries if (build_dir / "bin" / t).exists()}
    binaries.update({t: str(build_dir / p) for t, p in eng.libraries.items() if (build_dir / p).exists()})
    quant_types = {}
    if not lacking and "llama-quantize" in binaries:  # its --help lists the types it makes
        quant_types = parse_quant_types(help_text(Path(binaries["llama-quantize"])))
    manifest = {
        "schema": SCHEMA, "cputune_version": __version__, "key": spec.key, "engine": eng.name,
        "target_cpu": spec.target_cpu, "source_label": spec.source.label,
        "source_commit": spec.source.commit[:9] if spec.source.commit else None,
        "commit": spec.source.commit, "source_path": str(spec.source.path),
        "llama_cpp_python": eng.sdist_version if spec.source.pinned and eng.fetch == "sdist" else None,
        "cmake_options": dict(spec.options), "extra_args": list(spec.extra_args),
        "compiler": _compiler_version(), "ccache": bool(shutil.which("ccache")),
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "system_info": system_info,
        "features": features, "binaries": binaries, "quant_types": quant_types,
    }
    atomic_write_text(bdir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    b = _load_manifest(bdir)
    assert b is not None
    return b


def require_build(target_cpu: str | None = None, engine: str = DEFAULT_ENGINE) -> Build:
    b = find_build(target_cpu, engine=engine)
    if b is None:
        eng = load_engine(engine)
        flag = "" if engine == DEFAULT_ENGINE else f" --engine {engine}"
        raise EngineError(f"{eng.title} has not been built yet",
                          hint=f"run `cputune build{flag}` (about 15 minutes on 2 cores; "
                               "cached afterwards)")
    return b
