"""Access to the data tables in configs/ (installed as cputune.configs), parsed once."""

from __future__ import annotations

import csv
import functools
import sys
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_path(name: str) -> Path:
    return Path(str(resources.files("cputune.configs").joinpath(name)))


@functools.lru_cache(maxsize=None)
def load_toml(name: str) -> dict:
    with config_path(name).open("rb") as f:
        return tomllib.load(f)


@functools.lru_cache(maxsize=None)
def load_csv(name: str) -> tuple[dict, ...]:
    with config_path(name).open(newline="") as f:
        return tuple(csv.DictReader(row for row in f if not row.startswith("#")))
