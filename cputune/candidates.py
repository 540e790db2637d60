"""What select and plan weigh: the quants `--model` names (its GGUF files, else catalog presets) and the box's memory.

The I/O half of selection: it reads headers, the models folder, the catalog and the probe
profile, so that selector.py stays pure arithmetic over what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cputune.catalog import CatalogModel, catalog_model, catalog_profile, load_catalog
from cputune.errors import ConfigError
from cputune.gguf_model import read_model
from cputune.hardware import Box
from cputune.modelfiles import ENV_VAR, ModelFile, matches_model, models_dir, normalize, scan
from cputune.quant_rules import preset_types
from cputune.selector import CATALOG_PRESETS, Candidate, Capacity, capacity_from_machine, capacity_from_memory


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The quants of one model to weigh, and where they came from."""

    label: str
    catalog_id: str | None
    candidates: tuple[Candidate, ...]
    from_catalog: bool
    notes: tuple[str, ...] = ()


def _keys(m: CatalogModel) -> list[str]:
    return [normalize(k) for k in (m.id, m.name, *m.aliases)]


def catalog_match(f: ModelFile, catalog: dict[str, CatalogModel]) -> str | None:
    """The catalog id a file is a quant of: the model whose id, name or alias is the longest one
    in the file name or header name, with the same architecture. "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M"
    holds both "deepseekr1" and "deepseekr1distillqwen7b"; the longer names the distill."""
    text = normalize(f.path.name) + "|" + normalize(f.profile.name or "")
    best, best_len = None, 0
    for m in catalog.values():
        length = max((len(k) for k in _keys(m) if k and k in text), default=0)
        if length > best_len:
            best, best_len = m, length
    return best.id if best is not None and best.arch == f.profile.arch else None


def _from_file(f: ModelFile) -> Candidate:
    return Candidate(f.quant, f.profile, str(f.path), f.n_shards)


def catalog_choice(model_id: str, presets: Sequence[str] = CATALOG_PRESETS,
                   notes: Sequence[str] = ()) -> ModelChoice:
    """A catalog model at llama-quantize presets (ConfigError listing what exists for unknown names)."""
    m = catalog_model(model_id)
    names = [preset_types(p).name for p in presets]
    return ModelChoice(m.name, m.id, tuple(Candidate(n, catalog_profile(m.id, n)) for n in names),
                       True, tuple(notes))


def file_choice(path: Path) -> ModelChoice:
    """One GGUF file (any shard of a split model names all of it)."""
    if not path.is_file():
        raise ConfigError(f"no GGUF file {path}", hint="pass a catalog model name or the path of a .gguf file")
    prof = read_model(path)
    c = Candidate(prof.file_type or "unknown", prof, prof.path or str(path), prof.n_shards)
    return ModelChoice(prof.name or path.name, None, (c,), False)


def resolve_model(model: str, models_dir_option: Path | str | None = None) -> ModelChoice:
    """`--model NAME|FILE` for select: a GGUF path; else the files in the models folder that are
    quants of NAME (a catalog id or alias, or part of a file name); else the catalog's presets."""
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return file_choice(path)
    catalog = load_catalog()
    try:
        cat = catalog_model(model)
    except ConfigError:
        cat = None
    folder = models_dir(models_dir_option)
    files: list[ModelFile] = []
    notes: list[str] = []
    if folder.is_dir() or models_dir_option:
        files, problems = scan(folder)  # an explicit --models-dir that does not exist is an error
        notes += [f"skipped {p}" for p in problems]
    else:
        notes.append(f"no models folder at {folder} (set --models-dir or {ENV_VAR})")
    if cat is not None:
        mine = [f for f in files if catalog_match(f, catalog) == cat.id]
    else:
        mine = [f for f in files if matches_model(f, model)]
    if mine:
        label = cat.name if cat else (mine[0].profile.name or model)
        return ModelChoice(label, cat.id if cat else None, tuple(_from_file(f) for f in mine), False,
                           tuple(notes))
    if cat is not None:
        if folder.is_dir():
            notes.append(f"no GGUF of {cat.name} in {folder}: showing catalog presets "
                         "(sizes from the architecture and llama-quantize's type rules)")
        return catalog_choice(cat.id, notes=notes)
    have = ", ".join(f"{f.path.name} [{f.quant}]" for f in files) or "no GGUF files"
    raise ConfigError(f"no model {model!r} in the catalog or in {folder}",
                      hint="catalog models: " + ", ".join(catalog) + f"; {folder} holds: {have}"
                           "; or pass the path of a GGUF file")


def plan_models(model: str | None, quant: str | None) -> list[ModelChoice]:
    """plan's rows: one catalog model (or a GGUF file) or every catalog model, at one preset or
    the usual presets."""
    presets = [quant] if quant else list(CATALOG_PRESETS)
    if model is None:
        return [catalog_choice(mid, presets) for mid in load_catalog()]
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return [file_choice(path)]
    return [catalog_choice(model, presets)]


def box_capacity(box: Box) -> Capacity:
    """A hardware profile's DIMMs; for this box, the probe's MemTotal less its hugepage pools."""
    if box.hardware is not None:
        return capacity_from_machine(box.machine, box.source)
    from cputune import probe

    mem = probe.load_profile().inventory.memory
    return capacity_from_memory(mem, box.source, fallback_total_bytes=box.machine.mem_bytes)
