"""Models known by architecture (configs/models.toml): the GGUF header a preset would have, without the file.

For a catalog id and a llama-quantize preset this builds what gguf_model.read_raw returns for a real
file: the metadata keys llama.cpp's converter writes and every tensor with its ne-order shape and
the type llama-quantize gives it (quant_rules). gguf_model.profile_from then does the per-token
arithmetic, the same code that reads real files.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from cputune.model import architectures, recipes
from cputune.core.data import load_toml
from cputune.core.errors import ConfigError, ModelError
from cputune.model.gguf_model import ModelProfile, TensorInfo, profile_from, tensor_bytes, type_id
from cputune.model.quant_rules import preset_types, presets, quant_model, tensor_types

# The float type convert_hf_to_gguf.py writes 2-D weights in (--outtype bf16 for these bf16/fp8
# checkpoints). Only tensors llama-quantize never touches keep it, and those are F32 here anyway.
SOURCE_TYPE = "BF16"
# conversion/base.py: 1-D tensors, norms and routers (FFN_GATE_INP) are always written as F32.
F32 = "F32"

# GGUF header estimate (ggml docs/gguf.md layout), bytes:
#   per tensor: info record = name (u64 length + ~32 chars) + n_dims u32 + 3 dims u64 + type u32
#     + offset u64 = 8 + 32 + 4 + 24 + 4 + 8 = 80, plus 16 on average padding the data to 32 bytes
#   per vocabulary entry: token (u64 length + ~7 bytes of text) + token type i32 = 19, and one BPE
#     merge (u64 length + ~12 bytes) = 20
#   64 KiB for the remaining keys (chat template, hyperparameters)
HEADER_BYTES_PER_TENSOR = 80 + 16
HEADER_BYTES_PER_TOKEN = 19 + 20
HEADER_BYTES_FIXED = 64 * 1024


@dataclass(frozen=True, slots=True)
class PublishedFile:
    """A published GGUF of a catalog model at one quant: its size, to check the layout against."""

    quant: str
    bytes: int
    source: str


@dataclass(frozen=True, slots=True)
class CatalogModel:
    """One configs/models.toml table: the HF config numbers of a model under its architecture's
    hyperparameter names (configs/architectures/ARCH.toml), checked and with defaults filled."""

    id: str
    name: str
    hf_repo: str
    arch: str
    source: str
    hparams: dict
    aliases: tuple[str, ...] = ()
    files: tuple[PublishedFile, ...] = ()
    note: str = ""
    # Why `files` is empty: no GGUF of this architecture published yet (the layout is then only
    # checked by llama.cpp loading a synthetic model of the same table).
    no_published_file: str = ""

    @property
    def ctx(self) -> int:
        return self.hparams["ctx"]


_META = {"name", "hf_repo", "arch", "source", "aliases", "files", "note", "no_published_file"}


def model_from_table(model_id: str, table: dict, where: str = "configs/models.toml") -> CatalogModel:
    """One model table (models.toml, or the shapes in published_runs.toml) as a CatalogModel."""
    w = f"{where} [{model_id}]"
    arch = table.get("arch")
    if arch not in architectures.load_architectures():
        raise ConfigError(f"{w}: arch {arch!r} is not one of " + ", ".join(architectures.known()))
    for key in ("name", "hf_repo", "source"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise ConfigError(f"{w}: {key} must be a non-empty string")
    aliases = table.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{w}: aliases must be a list of names")
    files = []
    for i, f in enumerate(table.get("files", [])):
        fw = f"{w} files[{i}]"
        if not isinstance(f, dict) or set(f) != {"quant", "bytes", "source"}:
            raise ConfigError(f"{fw}: a published file has quant, bytes and source")
        if type(f["bytes"]) is not int or f["bytes"] <= 0:
            raise ConfigError(f"{fw}: bytes must be a positive integer")
        files.append(PublishedFile(str(f["quant"]), f["bytes"], str(f["source"])))
    hp = architectures.architecture(arch).hparams(
        {k: v for k, v in table.items() if k not in _META}, w)
    return CatalogModel(id=model_id, name=table["name"], hf_repo=table["hf_repo"], arch=arch,
                        source=table["source"], hparams=hp, aliases=tuple(a.lower() for a in aliases),
                        files=tuple(files), note=str(table.get("note", "")),
                        no_published_file=str(table.get("no_published_file", "")))


def load_catalog() -> dict[str, CatalogModel]:
    """Every catalog model by id (aliases not expanded; catalog_model() resolves them)."""
    return _load_catalog()


@functools.lru_cache(maxsize=None)
def _load_catalog() -> dict[str, CatalogModel]:
    return {model_id: model_from_table(model_id, table)
            for model_id, table in load_toml("models.toml").items()}


def catalog_model(model_id: str) -> CatalogModel:
    """The catalog model with this id or alias (case-insensitive); ModelError listing the ids if none."""
    catalog = load_catalog()
    key = model_id.lower()
    for m in catalog.values():
        if key == m.id or key in m.aliases:
            return m
    raise ModelError(f"no model {model_id!r} in the catalog",
                     hint="catalog models: " + ", ".join(
                         m.id + (f" (also {', '.join(m.aliases)})" if m.aliases else "")
                         for m in catalog.values()) + "; or pass a GGUF file")


# ---------------------------------------------------------------------------------------------
# Layout: (name, ne-order shape, source type) per tensor, from the architecture's table.

Layout = list[tuple[str, tuple[int, ...], str]]


def layout(m: CatalogModel) -> Layout:
    """Every tensor the converter writes for the model, with the type it writes it in."""
    return [(t.name, t.ne, F32 if t.is_float32 else (t.source_type or SOURCE_TYPE))
            for t in architectures.architecture(m.arch).tensors(m.hparams)]


def _metadata(m: CatalogModel, file_type: int) -> dict:
    """The GGUF keys convert_hf_to_gguf.py writes that llama.cpp and profile_from read."""
    return {"general.architecture": m.arch, "general.name": m.name, "general.file_type": file_type,
            **architectures.architecture(m.arch).metadata(m.hparams)}


def quant_types(m: CatalogModel, quant: str, as_typed: str | None = None):
    """(preset llama-quantize starts from, recipe or None, {tensor: type}) for `quant`: a
    llama-quantize preset, else a named recipe (configs/quant_recipes.toml: unsloth's UD-*,
    ubergarm's ik mixes) published for this model. `as_typed`: the model name as the user wrote
    it, since releases that share a layout were published with different mixes of one name."""
    rcp = None
    if quant.upper() not in presets():
        rcp = recipes.recipe(quant, as_typed or m.id)
        if rcp is None:
            known = recipes.recipe_names(as_typed or m.id)
            raise ConfigError(f"unknown quant {quant!r} for {m.id}",
                              hint="a llama-quantize preset (q4_k_m, q8_0, iq2_xxs ...)"
                                   + (f", or a recipe published for it: {', '.join(known)}" if known else "")
                                   + "; a published file's exact types: `cputune inspect hf://OWNER/REPO/FILE.gguf`")
    p = preset_types(rcp.base if rcp else quant)
    lay = layout(m)
    qm = quant_model(_metadata(m, p.file_type))
    types = recipes.recipe_types(rcp, lay, qm) if rcp else tensor_types(lay, p.name, qm)
    return p, rcp, types


def catalog_tensors(model: CatalogModel | str, preset: str,
                    as_typed: str | None = None) -> tuple[dict, tuple[TensorInfo, ...]]:
    """(metadata, tensors) of `model` quantized with llama-quantize `preset` (or a named recipe),
    as read_raw would return them."""
    m = catalog_model(model) if isinstance(model, str) else model
    p, _, types = quant_types(m, preset, as_typed)
    meta = _metadata(m, p.file_type)
    tensors = []
    for name, shape, _ in layout(m):
        t = types[name]
        tid = _type_id(t)
        tensors.append(TensorInfo(name, t, tid, shape, math.prod(shape), tensor_bytes(shape, tid)))
    return meta, tuple(tensors)


@functools.lru_cache(maxsize=None)
def _type_id(name: str) -> int:
    return type_id(name)


def header_bytes(n_tensors: int, n_vocab: int) -> int:
    """Estimated GGUF header size: tensor infos and padding, vocabulary and merges, other keys."""
    return (n_tensors * HEADER_BYTES_PER_TENSOR + n_vocab * HEADER_BYTES_PER_TOKEN
            + HEADER_BYTES_FIXED)


def catalog_profile(model: CatalogModel | str, preset: str, as_typed: str | None = None) -> ModelProfile:
    """The ModelProfile of a catalog model at a preset (or recipe), from the same profile_from
    real files use."""
    m = catalog_model(model) if isinstance(model, str) else model
    p, rcp, _ = quant_types(m, preset, as_typed)
    meta, tensors = catalog_tensors(m, preset, as_typed)
    weights = sum(t.n_bytes or 0 for t in tensors)
    meta = dict(meta, **{"general.name": f"{m.name} {rcp.name if rcp else p.name}"})
    return profile_from(meta, tensors, file_bytes=weights + header_bytes(len(tensors), m.hparams["n_vocab"]))
