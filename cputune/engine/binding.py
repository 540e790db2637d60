"""Pointing llama-cpp-python at the tuned library instead of compiling a second llama.cpp.

llama-cpp-python is installed from its sdist with LLAMA_BUILD=OFF (its CMakeLists option), so
it ships no libllama; cputune then links the tuned build's libraries into llama_cpp/lib, where
llama_cpp/llama_cpp.py looks first (LLAMA_CPP_LIB_PATH overrides that directory).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cputune.engine.build import Build, pinned_version
from cputune.core.errors import ProcessFailed

PROBE = r"""
import llama_cpp, json
print(json.dumps({"version": llama_cpp.__version__,
                  "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


@dataclass(frozen=True, slots=True)
class BindingStatus:
    installed_version: str | None
    lib_dir: str | None
    linked: list[str]


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_install_argv(version: str | None = None) -> tuple[list[str], dict]:
    """The pip command (and env) that installs the binding without its own llama.cpp build."""
    argv = [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python",
            f"llama-cpp-python=={version or pinned_version()}"]
    env = dict(os.environ, CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
    return argv, env


def install(version: str | None = None) -> None:
    argv, env = pip_install_argv(version)
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise ProcessFailed("installing llama-cpp-python failed", argv, p.returncode,
                            p.stdout + p.stderr, hint="see the pip output above")


def package_dir() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")  # does not import it (that would load the lib)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def link(build: Build) -> BindingStatus:
    """Symlink the build's shared libraries into llama_cpp/lib (replacing older links)."""
    pkg = package_dir()
    if pkg is None:
        return BindingStatus(installed_version(), None, [])
    lib = pkg / "lib"
    lib.mkdir(exist_ok=True)
    linked = []
    for so in sorted(build.bin_dir.glob("lib*.so*")):
        dst = lib / so.name
        tmp = lib / f".{so.name}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(so)
        os.replace(tmp, dst)
        linked.append(so.name)
    return BindingStatus(installed_version(), str(lib), linked)


def ensure(build: Build) -> BindingStatus:
    if installed_version() != pinned_version():
        install()
    return link(build)


def probe_binding() -> dict:
    """What `import llama_cpp` reports, from a child process (loading the lib is one-way)."""
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise ProcessFailed("llama_cpp could not be imported", [sys.executable, "-c", "import llama_cpp"],
                            p.returncode, p.stdout + p.stderr,
                            hint="run `cputune build --python` to install and link it")
    import json

    return json.loads(p.stdout.strip().splitlines()[-1])
