"""Session-wide fixtures: the cached llama.cpp build and the recorded machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def llama_bin_dir() -> Path:
    """Directory holding the real llama-quantize / llama-bench / llama-server of the cached build.

    CI runs `cputune build` before the tests, so a missing build is a set-up error, not a skip.
    """
    env = os.environ.get("CPUTUNE_LLAMA_BIN_DIR")
    if env:
        return Path(env)
    from cputune import build

    b = build.find_build()
    if b is None:
        pytest.fail("no cached llama.cpp build: run `cputune build` first (CI does)")
    return b.bin_dir
