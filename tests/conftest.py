"""Session-wide fixtures: the cached llama.cpp build, tiny synthetic models and the recorded machines."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from cputune.model import synth
from helpers import extract_tree

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def llama_bin_dir() -> Path:
    """Directory holding the real llama-quantize / llama-bench / llama-server of the cached build.

    CI runs `cputune build` before the tests, so a missing build is a set-up error, not a skip.
    """
    env = os.environ.get("CPUTUNE_LLAMA_BIN_DIR")
    if env:
        return Path(env)
    from cputune.engine import build

    b = build.find_build()
    if b is None:
        pytest.fail("no cached llama.cpp build: run `cputune build` first (CI does)")
    return b.bin_dir


# --- tiny synthetic models, written and quantized once per run ----------------------------------

from shapes import IK_QTYPE, TINY_DS2, TINY_DS2_IK, TINY_LLAMA, TINY_QTYPES  # noqa: E402,F401


@dataclass(frozen=True)
class TinyModel:
    shape: synth.Shape
    f16: Path
    quantized: dict[str, Path]  # by TINY_QTYPES name

    @property
    def arch(self) -> str:
        return self.shape.arch


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, llama_bin_dir) -> dict[str, TinyModel]:
    """A dense llama and a MoE deepseek2 (2.9 and 6.6 MB in f16), each quantized by the real llama-quantize."""
    d = tmp_path_factory.mktemp("tiny_models")
    quantize = llama_bin_dir / "llama-quantize"
    models = {}
    for shape in (TINY_LLAMA, TINY_DS2):
        f16 = synth.write_model(d / f"{shape.arch}-f16.gguf", shape, seed=1)[0]
        quantized = {q: synth.quantize(f16, d / f"{shape.arch}-{q}.gguf", q.upper(), quantize, threads=2)
                     for q in TINY_QTYPES}
        models[shape.arch] = TinyModel(shape, f16, quantized)
    return models


@pytest.fixture(scope="session")
def ik_build():
    """The cached ik_llama.cpp build (`cputune build --engine ik_llama`, which CI runs first)."""
    from cputune.engine import build

    b = build.find_build(engine="ik_llama")
    if b is None:
        pytest.fail("no cached ik_llama.cpp build: run `cputune build --engine ik_llama` first (CI does)")
    return b


@pytest.fixture(scope="session")
def ik_models(tmp_path_factory, llama_bin_dir, ik_build, tiny_models) -> dict[str, TinyModel]:
    """What ik_llama.cpp runs: TINY_DS2_IK in Q8_0 and Q4_K_M (mainline's llama-quantize, as
    published files are made) and IQ4_KS (ik's), and the tiny llama with IQ4_KS added."""
    d = tmp_path_factory.mktemp("ik_models")
    ik_quantize = ik_build.binary("llama-quantize")
    f16 = synth.write_model(d / "deepseek2-f16.gguf", TINY_DS2_IK, seed=1)[0]
    ds2 = {q: synth.quantize(f16, d / f"deepseek2-{q}.gguf", q.upper(), llama_bin_dir / "llama-quantize", threads=2)
           for q in TINY_QTYPES}
    ds2[IK_QTYPE] = synth.quantize(f16, d / f"deepseek2-{IK_QTYPE}.gguf", IK_QTYPE.upper(), ik_quantize, threads=2)
    llama = tiny_models["llama"]
    dense = dict(llama.quantized)
    dense[IK_QTYPE] = synth.quantize(llama.f16, d / f"llama-{IK_QTYPE}.gguf", IK_QTYPE.upper(), ik_quantize, threads=2)
    return {"deepseek2": TinyModel(TINY_DS2_IK, f16, ds2), "llama": TinyModel(llama.shape, llama.f16, dense)}


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory) -> list[Path]:
    """TINY_LLAMA in two shards named NAME-0000k-of-00002.gguf, as llama-gguf-split names them; load the first."""
    return synth.write_model(tmp_path_factory.mktemp("tiny_split") / "llama-split.gguf", TINY_LLAMA, seed=1,
                             n_shards=2)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh cache root ($XDG_CACHE_HOME) that still sees the one cached llama.cpp build."""
    from cputune.engine import build

    real = build.find_build()
    if real is None:
        pytest.fail("no cached llama.cpp build: run `cputune build` first (CI does)")
    root = tmp_path / "cache" / "cputune"
    root.mkdir(parents=True)
    (root / "builds").symlink_to(real.path.parent)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return root


# --- hwloc's recorded machines, extracted once per run ------------------------------------------

@pytest.fixture(scope="session")
def sysfs_tree(tmp_path_factory):
    """NAME -> the extracted root of tests/fixtures/sysfs/NAME.tar.bz2; each tarball is extracted
    once per run, on first use, and shared by every module (read-only: never write into a tree)."""
    base = tmp_path_factory.mktemp("sysfs")
    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in roots:
            roots[name] = extract_tree(FIXTURES / "sysfs" / f"{name}.tar.bz2", base / name)
        return roots[name]

    return get
