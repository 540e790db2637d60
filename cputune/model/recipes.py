"""Named quantization recipes (configs/quant_recipes.toml): published per-tensor mixes beyond the presets.

A recipe is what its publisher ran: a llama-quantize preset (`base`) for every tensor no rule
names, and an ordered list of (regex on the tensor name, ggml type) rules, the first match winning:
llama-quantize's `--tensor-type PATTERN=TYPE` (src/llama-quant.cpp llama_tensor_get_type: the
first pattern std::regex_search finds in the name sets the type, then the row-size fallback
runs) and ik_llama.cpp's `--custom-q "PATTERN=TYPE,..."`, which ubergarm publishes verbatim. As
in both, a rule only reaches a tensor llama-quantize quantizes at all: norms, routers and 1-D
tensors keep their type whatever a rule says, and no rule applies when the base preset is a
float one (llama-quantize skips the whole per-tensor logic for F16/BF16/F32).

recipe("ud-q2_k_xl", "deepseek-r1") finds one (names are case-insensitive; one name may carry
variants for several releases of a model, told apart by `models`), and
recipe_types(recipe, layout, quant_model(meta)) gives every tensor of a layout its type.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cputune.core.data import config_path, tomllib
from cputune.core.errors import ConfigError, CputuneError
from cputune.model import gguf_model
from cputune.model.gguf_model import type_id, type_sizes
from cputune.model.quant_rules import (QuantModel, allows_quantization, fallback, preset_types, presets,
                                 tensor_types)

RECIPES_FILE = "quant_recipes.toml"
ENGINES = ("llama.cpp", "ik_llama")
_FLOAT_TYPES = ("F32", "F16", "BF16")  # ggml_is_quantized() is false: llama-quantize runs no rules
# published_size_* key -> (bytes per unit, unit as written)
_SIZE_KEYS = {"published_size_bytes": (1, "bytes"), "published_size_gib": (2**30, "GiB"),
              "published_size_gb": (10**9, "GB")}
_REQUIRED = ("engine", "base", "rules", "models", "source")
_OPTIONAL = ("imatrix", "note", *_SIZE_KEYS)

Layout = Sequence[tuple[str, Sequence[int], str]]


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: str  # as published: searched for anywhere in the tensor name (std::regex_search)
    type: str  # ggml type name as gguf_model spells it: "Q4_K", "IQ2_K_R4"
    regex: re.Pattern = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Recipe:
    name: str  # as the table names it: "UD-Q2_K_XL"
    engine: str  # "llama.cpp" or "ik_llama" (ik types load only in ik_llama.cpp)
    base: str  # canonical llama-quantize preset for the tensors no rule names: "Q2_K"
    rules: tuple[Rule, ...]
    models: tuple[str, ...]  # catalog ids / aliases (lower case) of the releases it was published for
    source: str
    published_bytes: int | None = None  # the published file size, converted to bytes
    published_as: str | None = None  # how it was published: "212 GiB", "12.5 GB", "132998282944 bytes"
    imatrix: bool = False  # quantized with an importance matrix (moves a few base-preset rules)
    note: str = ""

    def rule_for(self, name: str) -> Rule | None:
        """The first rule whose pattern is found in the tensor name, else None."""
        for r in self.rules:
            if r.regex.search(name):
                return r
        return None


def load_recipes(path: str | Path | None = None) -> dict[str, tuple[Recipe, ...]]:
    """Every recipe by upper-case name, each name with its variants (one per set of models).

    `path` reads another file in the same format (tests); the default is configs/quant_recipes.toml,
    read once. Any bad field is a ConfigError naming the file, the recipe and the field."""
    if path is None:
        return _load_default()
    return _load(Path(path))


@functools.lru_cache(maxsize=None)
def _load_default() -> dict[str, tuple[Recipe, ...]]:
    return _load(config_path(RECIPES_FILE))


def recipe(name: str, model: str | None = None, path: str | Path | None = None) -> Recipe | None:
    """The recipe called `name` (any case: `ud-q2_k_xl`) published for `model`, None if there is none.

    `model` is the catalog id or alias the user gave (deepseek-r1, deepseek-r1-0528, ...), matched
    against each variant's `models`: pass what the user typed, not the catalog id it resolves to,
    since releases that share a catalog layout (R1 and R1-0528) were published with different
    mixes under the same name. Without a model a name with one variant returns it, and a name with
    several is a ConfigError asking for the model."""
    variants = load_recipes(path).get(name.strip().upper())
    if not variants:
        return None
    if model is None:
        if len(variants) == 1:
            return variants[0]
        raise ConfigError(f"recipe {variants[0].name} was published for several models",
                          hint="name the model: " + ", ".join(m for v in variants for m in v.models))
    key = model.strip().lower()
    for v in variants:
        if key in v.models:
            return v
    return None


def recipe_names(model: str | None = None, path: str | Path | None = None) -> list[str]:
    """The recipe names (as written) published for `model`, or all of them: for a hint."""
    key = model.strip().lower() if model else None
    return sorted({v.name for vs in load_recipes(path).values() for v in vs
                   if key is None or key in v.models})


def recipe_types(rcp: Recipe, layout: Layout, qm: QuantModel) -> dict[str, str]:
    """name -> ggml type for each (name, ne-order shape, source type) of `layout` under the recipe.

    The base preset's types come from quant_rules.tensor_types (llama-quantize's own choice, in
    its visiting order); then each tensor llama-quantize quantizes takes the type of the first rule
    whose pattern it finds in the name, moved by the row-size fallback (tensor_type_fallback) when
    the row does not split into that type's blocks. A rule type with no fallback for the row is a
    ConfigError naming the recipe, the rule and the tensor."""
    layout = [(n, tuple(s), src) for n, s, src in layout]
    out = tensor_types(layout, rcp.base, qm, imatrix=rcp.imatrix)
    if preset_types(rcp.base).default_type in _FLOAT_TYPES:
        return out
    for name, shape, _ in layout:
        if not allows_quantization(name, shape):
            continue
        r = rcp.rule_for(name)
        if r is None:
            continue
        try:
            out[name] = fallback(r.type, shape[0])
        except ConfigError as e:
            raise ConfigError(f"recipe {rcp.name}: rule {r.pattern}={r.type} cannot hold {name} "
                              f"(rows of {shape[0]}): {e.message}") from None
    return out


def unnamed_tensors(rcp: Recipe, layout: Layout) -> list[str]:
    """The tensors llama-quantize would quantize that no rule names: those the base preset types."""
    return [n for n, s, _ in layout if allows_quantization(n, tuple(s)) and rcp.rule_for(n) is None]


# --------------------------------------------------------------------------------------------
# reading and checking the file


def _load(path: Path) -> dict[str, tuple[Recipe, ...]]:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the recipes: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    out: dict[str, list[Recipe]] = {}
    names: dict[str, str] = {}
    preset_names = _preset_names()
    for name, value in doc.items():
        w = f"{path}: [{name}]"
        key = name.strip().upper()
        if not name.strip() or name != name.strip() or re.search(r"[\s,=]", name):
            raise ConfigError(f"{w}: a recipe name is one word without spaces, commas or '='")
        if key in names:
            raise ConfigError(f"{w}: the name repeats [{names[key]}] (names are case-insensitive)")
        if key in preset_names:
            raise ConfigError(f"{w}: the name is llama-quantize's preset {key}, which it would shadow",
                              hint="name the recipe after its publisher's file instead")
        names[key] = name
        if isinstance(value, dict):
            tables = [(w, value)]
        elif isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
            tables = [(f"{path}: [{name} #{i + 1}]", t) for i, t in enumerate(value)]
        else:
            raise ConfigError(f"{w}: a recipe is a table, or an array of tables ([[{name}]]) for "
                              "variants published for different models")
        variants = [_recipe(name, t, tw) for tw, t in tables]
        seen: dict[str, int] = {}
        for i, v in enumerate(variants):
            for m in v.models:
                if m in seen:
                    raise ConfigError(f"{tables[i][0]}: models: {m!r} is also in variant "
                                      f"#{seen[m] + 1}: one name, one recipe per model")
                seen[m] = i
        out[key] = variants
    return {k: tuple(v) for k, v in out.items()}


def _recipe(name: str, t: dict, w: str) -> Recipe:
    unknown = sorted(set(t) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ConfigError(f"{w}: unknown keys {', '.join(unknown)}",
                          hint="a recipe has " + ", ".join(_REQUIRED) + " and optionally "
                               + ", ".join(_OPTIONAL))
    missing = [k for k in _REQUIRED if k not in t]
    if missing:
        raise ConfigError(f"{w}: missing {', '.join(missing)}")

    engine = t["engine"]
    if engine not in ENGINES:
        raise ConfigError(f"{w}: engine: {engine!r} is not one of " + ", ".join(ENGINES))

    base = t["base"]
    if not isinstance(base, str):
        raise ConfigError(f"{w}: base: a llama-quantize preset name, not {base!r}")
    try:
        preset = preset_types(base)
    except ConfigError as e:
        raise ConfigError(f"{w}: base: {e.message}", hint=e.hint) from None
    if preset.default_type in _FLOAT_TYPES:
        raise ConfigError(f"{w}: base: {preset.name} is a float preset, for which llama-quantize "
                          "applies no per-tensor rules")

    rules = t["rules"]
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"{w}: rules: a non-empty list of {{pattern = REGEX, type = GGML_TYPE}}")
    ik_only = _ik_only_types()
    parsed = []
    for i, r in enumerate(rules):
        rw = f"{w}: rules[{i}]"
        if not isinstance(r, dict) or set(r) != {"pattern", "type"}:
            raise ConfigError(f"{rw}: a rule is {{pattern = REGEX, type = GGML_TYPE}}, not {r!r}")
        pattern, tname = r["pattern"], r["type"]
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{rw}: pattern: a non-empty regular expression, not {pattern!r}")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{rw}: pattern {pattern!r} does not compile: {e}") from None
        if not isinstance(tname, str):
            raise ConfigError(f"{rw}: type: a ggml type name, not {tname!r}")
        try:
            canon = type_sizes()[type_id(tname)][0]
        except CputuneError:
            raise ConfigError(f"{rw}: type: {tname!r} is not a ggml type cputune knows",
                              hint="gguf-py's types and configs/ggml_types_extra.csv") from None
        if engine == "llama.cpp" and canon in ik_only:
            raise ConfigError(f"{rw}: type: {canon} exists only in ik_llama.cpp, and the recipe's "
                              "engine is llama.cpp")
        parsed.append(Rule(pattern, canon, regex))

    models = t["models"]
    if (not isinstance(models, list) or not models
            or not all(isinstance(m, str) and m.strip() for m in models)):
        raise ConfigError(f"{w}: models: a non-empty list of catalog model names")
    models = tuple(m.strip().lower() for m in models)
    if len(set(models)) != len(models):
        raise ConfigError(f"{w}: models: a model is listed twice")

    source = t["source"]
    if not isinstance(source, str) or not re.match(r"https?://\S+", source):
        raise ConfigError(f"{w}: source: the URL the recipe was read from, not {source!r}")

    sizes = [k for k in _SIZE_KEYS if k in t]
    if len(sizes) > 1:
        raise ConfigError(f"{w}: {' and '.join(sizes)}: give the size once, as it was published")
    published_bytes = published_as = None
    if sizes:
        k = sizes[0]
        v = t[k]
        if k == "published_size_bytes":
            ok = type(v) is int and v > 0
        else:
            ok = type(v) in (int, float) and math.isfinite(v) and v > 0
        if not ok:
            raise ConfigError(f"{w}: {k}: a positive finite "
                              + ("integer" if k == "published_size_bytes" else "number") + f", not {v!r}")
        unit, unit_name = _SIZE_KEYS[k]
        published_bytes, published_as = round(v * unit), f"{v} {unit_name}"

    imatrix = t.get("imatrix", False)
    if type(imatrix) is not bool:
        raise ConfigError(f"{w}: imatrix: true or false, not {imatrix!r}")
    note = t.get("note", "")
    if not isinstance(note, str):
        raise ConfigError(f"{w}: note: a string, not {note!r}")

    return Recipe(name=name, engine=engine, base=preset.name, rules=tuple(parsed), models=models,
                  source=source, published_bytes=published_bytes, published_as=published_as,
                  imatrix=imatrix, note=note)


@functools.lru_cache(maxsize=None)
def _preset_names() -> frozenset[str]:
    return frozenset(presets())


def _ik_only_types() -> frozenset[str]:
    return gguf_model.ik_only_types()
