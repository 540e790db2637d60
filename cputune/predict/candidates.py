"""What select and plan weigh: the quants `--model` names (its GGUF files, else catalog presets) and the box's memory.

The I/O half of selection: it reads headers, the models folder, the catalog and the probe
profile, so that selector.py stays pure arithmetic over what this returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cputune.model.catalog import catalog_model, catalog_profile, load_catalog
from cputune.predict.hardware import Box
from cputune.model.modelfiles import ModelFile
from cputune.model.resolve import resolve
from cputune.model.quant_rules import preset_types
from cputune.predict.selector import CATALOG_PRESETS, Candidate, Capacity, capacity_from_machine, capacity_from_memory


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The quants of one model to weigh, and where they came from."""

    label: str
    catalog_id: str | None
    candidates: tuple[Candidate, ...]
    from_catalog: bool
    notes: tuple[str, ...] = ()


def _from_file(f: ModelFile) -> Candidate:
    return Candidate(f.quant, f.profile, str(f.path), f.n_shards)


def catalog_choice(model_id: str, presets: Sequence[str] = CATALOG_PRESETS,
                   notes: Sequence[str] = ()) -> ModelChoice:
    """A catalog model at llama-quantize presets (ModelError listing what exists for unknown names)."""
    m = catalog_model(model_id)
    names = [preset_types(p).name for p in presets]
    return ModelChoice(m.name, m.id, tuple(Candidate(n, catalog_profile(m.id, n)) for n in names),
                       True, tuple(notes))


def file_choice(f: ModelFile) -> ModelChoice:
    """One GGUF file (any shard of a split model names all of it)."""
    return ModelChoice(f.profile.name or f.path.name, None, (_from_file(f),), False)


def resolve_model(model: str, models_dir_option: Path | str | None = None) -> ModelChoice:
    """`--model NAME|FILE` for select, by the one resolver (cputune.model.resolve): a GGUF path; else
    the files in the models folder that are quants of NAME; else the catalog's presets."""
    r = resolve(model, None, models_dir_option)
    if r.source == "file":
        return file_choice(r.files[0])
    if r.source == "catalog":
        return catalog_choice(r.catalog_id, notes=r.notes)
    cat = r.catalog
    label = cat.name if cat else (r.files[0].profile.name or model)
    return ModelChoice(label, r.catalog_id, tuple(_from_file(f) for f in r.files), False, r.notes)


def plan_models(model: str | None, quant: str | None) -> list[ModelChoice]:
    """plan's rows: one catalog model (or a GGUF file) or every catalog model, at one preset or
    the usual presets. plan is for a box not built yet, so it does not search the models folder."""
    presets = [quant] if quant else list(CATALOG_PRESETS)
    if model is None:
        return [catalog_choice(mid, presets) for mid in load_catalog()]
    r = resolve(model, None, search_folder=False)
    if r.source == "file":
        return [file_choice(r.files[0])]
    return [catalog_choice(r.catalog_id, presets)]


def box_capacity(box: Box) -> Capacity:
    """A hardware profile's DIMMs; for this box, the probe's MemTotal less its hugepage pools."""
    if box.hardware is not None:
        return capacity_from_machine(box.machine, box.source)
    from cputune.machine import probe

    mem = probe.load_profile().inventory.memory
    return capacity_from_memory(mem, box.source, fallback_total_bytes=box.machine.mem_bytes)
