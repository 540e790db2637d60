"""The GGUF files a builder has: where the models folder is, what is in it, which file a quant names.

select, serve and bench all resolve `--quant q8_0 [--model NAME]` here, so they agree on which
file that is. Split files count as one model; the quant comes from the header's file type.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cputune.errors import ConfigError, GGUFError
from cputune.gguf_model import SPLIT_RE, ModelProfile, read_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_VAR = "CPUTUNE_MODELS_DIR"
DEFAULT_DIR = Path.home() / "models"


def config_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cputune" / "config.toml"


def models_dir(option: Path | str | None = None) -> Path:
    """--models-dir, else $CPUTUNE_MODELS_DIR, else `models_dir` in ~/.config/cputune/config.toml,
    else ~/models."""
    if option:
        return Path(option).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cfg = config_file()
    if cfg.is_file():
        try:
            value = tomllib.loads(cfg.read_text()).get("models_dir")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg}: not valid TOML ({e})") from None
        if value:
            return Path(value).expanduser()
    return DEFAULT_DIR


@dataclass(frozen=True, slots=True)
class ModelFile:
    """One model on disk: its first shard, how many shards, and its header's profile."""

    path: Path
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
        except GGUFError as e:
            problems.append(f"{path.name}: {e.message}")
            continue
        found.append(ModelFile(path, prof.n_shards, prof.file_type or "unknown", prof))
    return found, problems


def matches_model(f: ModelFile, model: str) -> bool:
    want = normalize(model)
    return want in normalize(f.path.name) or want in normalize(f.profile.name or "")


def find(folder: Path, quant: str, model: str | None = None) -> ModelFile:
    """The one file in `folder` holding `quant` (of `model`); ConfigError listing what is there."""
    files, _ = scan(folder)
    quant = quant.upper()
    pool = [f for f in files if model is None or matches_model(f, model)]
    hits = [f for f in pool if normalize(f.quant) == normalize(quant)]
    if len(hits) == 1:
        return hits[0]
    have = ", ".join(f"{f.label} [{f.quant}]" for f in files) or "no GGUF files"
    if not hits:
        what = f"{quant}" + (f" of '{model}'" if model else "")
        raise ConfigError(f"no {what} model in {folder}", hint=f"it holds: {have}")
    raise ConfigError(f"{len(hits)} {quant} models in {folder}: "
                      + ", ".join(f.label for f in hits),
                      hint="pass --model NAME (part of the file name) to pick one")


def resolve_model(model: str, quant: str | None) -> ModelProfile:
    """--model as a GGUF path (any shard), or a catalog id with --quant a llama-quantize preset."""
    from cputune.catalog import catalog_model, catalog_profile

    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.exists():
        prof = read_model(path)
        if quant and prof.file_type and normalize(prof.file_type) != normalize(quant):
            raise ConfigError(f"{path.name} is {prof.file_type}, not {quant.upper()}",
                              hint="drop --quant when --model is a file")
        return prof
    m = catalog_model(model)
    if not quant:
        raise ConfigError(f"--quant is needed with the catalog model {m.id}",
                          hint="for example --quant q4_k_m (any llama-quantize preset)")
    return catalog_profile(m, quant)


def bench_target(model: str | None, quant: str | None, folder: Path | str | None,
                 twin_size: str | None, llama_quantize: Path) -> Path:
    """The file `bench` measures: --model FILE; --model NAME --quant Q from the models folder;
    or, with --twin SIZE, a synthetic model of that architecture and quant, cached by shape."""
    from cputune import synth
    from cputune.fsutil import cache_root
    from cputune.units import parse_size

    if twin_size:
        if model and Path(model).expanduser().exists():
            prof = read_model(Path(model).expanduser())
            arch, quant = prof.arch, quant or prof.file_type
        else:
            from cputune.catalog import catalog_model
            arch = catalog_model(model).arch if model else "llama"
        if not quant:
            raise ConfigError("--twin needs --quant (or a --model file to copy it from)")
        arch = "deepseek2" if arch == "deepseek2" else "llama"
        size = parse_size(twin_size)
        out = cache_root() / "twins" / f"{arch}-{size}-{normalize(quant)}.gguf"
        if not out.exists():
            synth.make_quantized(out, arch, size, quant.upper(), llama_quantize)
        return out
    if not model and not quant:
        raise ConfigError("nothing to bench", hint="pass --model FILE, --quant Q (a file in the "
                          "models folder), or --twin SIZE --quant Q for a synthetic model")
    if model and Path(model).expanduser().is_file():
        return Path(model).expanduser()
    if not quant:
        raise ConfigError(f"--quant is needed to pick a file of '{model}'",
                          hint="for example --quant q4_k_m; or pass the GGUF file itself")
    return find(models_dir(folder), quant, model).path
