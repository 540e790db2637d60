"""The GGUF files a builder has: where the models folder is, what is in it, which file a quant names.

select, serve and bench all resolve `--quant q8_0 [--model NAME]` here, so they agree on which
file that is. Split files count as one model; the quant comes from the header's file type.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cputune.core import checks
from cputune.core.errors import ConfigError, CputuneError
from cputune.core.data import read_toml_file
from cputune.core.fsutil import expand_home, home_dir
from cputune.model.gguf_model import SPLIT_RE, ModelProfile, read_model

ENV_VAR = "CPUTUNE_MODELS_DIR"


def default_dir() -> Path:
    """~/models; a ConfigError saying what to pass when there is no home folder."""
    return home_dir("the models folder (~/models)",
                    f"pass --models-dir DIR or set {ENV_VAR} (or set HOME)") / "models"


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(
        home_dir("the config file (~/.config/cputune/config.toml)",
                 "set HOME to your home folder, or XDG_CONFIG_HOME to the folder of config files") / ".config")
    return Path(base) / "cputune" / "config.toml"


def models_dir(option: Path | str | None = None) -> Path:
    """--models-dir, else $CPUTUNE_MODELS_DIR, else `models_dir` in ~/.config/cputune/config.toml,
    else ~/models."""
    if option:
        return expand_home(str(option), "--models-dir")
    if os.environ.get(ENV_VAR):
        return expand_home(os.environ[ENV_VAR], ENV_VAR)
    try:
        cfg = config_file()
    except ConfigError:
        cfg = None  # no home folder: no ~/.config either, and default_dir() says what to pass
    if cfg is not None and cfg.exists():
        value = read_toml_file(cfg, hint=f"fix or remove {cfg}").get("models_dir")
        if value is not None:
            checks.text(value, f"models_dir in {cfg}", hint='write models_dir = "/path/to/models"')
        if value:
            return expand_home(value, f"models_dir in {cfg}")
    return default_dir()


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One model on disk: its first shard, how many shards, and its header's profile."""

    path: Path  # a remote.Url (a str with .name) for a model read over HTTP: resolve.model_file
    n_shards: int
    quant: str  # llama-quantize preset name as the header records it (Q4_K_M, Q8_0, F16 ...)
    profile: ModelProfile

    @property
    def label(self) -> str:
        return self.path.name if self.n_shards == 1 else f"{self.path.name} (+{self.n_shards - 1} shards)"


def normalize(name: str) -> str:
    """q4_k_m, Q4-K-M and q4km all name the same quant."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def scan(folder: Path) -> tuple[list[ModelFile], list[str]]:
    """Every model under `folder` (first shards only), and one line per file that could not be read."""
    if not folder.is_dir():
        raise ConfigError(f"models folder {folder} does not exist",
                          hint=f"pass --models-dir DIR or set {ENV_VAR}")
    found, problems = [], []
    for path in sorted(folder.rglob("*.gguf")):
        m = SPLIT_RE.match(path.name)
        if m and int(m.group("no")) != 1:
            continue
        try:
            prof = read_model(path)
        except CputuneError as e:
            # "/models/x.gguf is truncated: ..." reads as "x.gguf is truncated: ..."
            msg = e.message
            problems.append(path.name + msg[len(str(path)):] if msg.startswith(str(path))
                            else f"{path.name}: {msg}")
            continue
        except Exception as e:  # noqa: BLE001 - a reader bug must not hide the folder's other models (issue 13)
            problems.append(f"{path.name}: cputune could not read it ({type(e).__name__}: {e}); "
                            "please report this")
            continue
        found.append(ModelFile(path, prof.n_shards, prof.file_type or "unknown", prof))
    return found, problems


# What a folder with no GGUF file to use is said to hold instead: this many names, with why.
SKIPPED_SHOWN = 3
SKIPPED_WALK = 10_000  # entries looked at, whatever the folder holds (the count then says "at least")
PARTIAL_SUFFIXES = (".part", ".partial", ".crdownload", ".download", ".incomplete", ".tmp", ".aria2")


def skipped_text(folder: Path, problems: Sequence[str] = ()) -> str:
    """Why `folder` holds no GGUF file to use: '' when it holds nothing at all, else 'skipped 4:
    x.gguf is truncated: ...; x.gguf.part (an unfinished download); notes.txt (not a .gguf file) and 1
    more'. `problems` are scan's lines for the .gguf files it could not read; the other files
    under the folder (not named *.gguf, or a link to nothing) are looked for here."""
    shown, count = list(problems[:SKIPPED_SHOWN]), len(problems)
    seen, more = 0, False
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        seen += 1  # a folder is an entry too: a tree of empty folders is not walked without end
        for name in sorted(filenames):
            seen += 1
            if seen > SKIPPED_WALK:
                more = True
                break
            path = Path(dirpath) / name
            if name.endswith(".gguf"):
                continue  # scan read it, or said why it could not (a problem above)
            if not path.exists():
                why = "a symbolic link to nothing"
            elif name.lower().endswith(PARTIAL_SUFFIXES):
                why = "an unfinished download"
            elif name.lower().endswith(".gguf"):
                why = "named .GGUF: cputune reads files named *.gguf"
            else:
                why = "not a .gguf file"
            count += 1
            if len(shown) < SKIPPED_SHOWN:
                shown.append(f"{os.path.relpath(path, folder)} ({why})")
        if more:
            break
    if not count:
        return ""
    rest = count - len(shown)
    return (f"skipped {'at least ' if more else ''}{count}: " + "; ".join(shown)
            + (f" and {rest}{'+' if more else ''} more" if rest else " and more" if more else ""))


def matches_model(f: ModelFile, model: str) -> bool:
    want = normalize(model)
    return want in normalize(f.path.name) or want in normalize(f.profile.name or "")
