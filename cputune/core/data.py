"""Access to the data tables in configs/ (installed as cputune.configs), parsed once, and the
one reader of a user's own TOML files (a hardware profile, config.toml)."""

from __future__ import annotations

import csv
import functools
import sys
from importlib import resources
from pathlib import Path

from cputune.core.errors import ConfigError
from cputune.core.fsutil import read_small_text

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


def read_toml_file(path: Path, hint: str | None = None) -> dict:
    """A user's TOML file, read through fsutil.read_small_text (a regular file of at most 64 MiB,
    never blocking); a ConfigError naming the file when it cannot be read or parsed."""
    text = read_small_text(path, hint=hint)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply)") from None
