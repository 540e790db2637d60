"""Dataclasses to JSON-ready values, and JSON documents written atomically.

Below report.py so that library modules (probe's machine profile, tune's results) can save
documents without importing the rendering layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from cputune import __version__
from cputune.errors import ConfigError
from cputune.fsutil import atomic_write_text


def plain(obj: Any) -> Any:
    """Dataclasses, paths and tuples -> JSON-ready values (field names kept, as asdict does)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def from_plain(tp: Any, value: Any) -> Any:
    """The inverse of plain() for annotated dataclasses: rebuilds nested dataclasses, tuples,
    dicts with int keys and optionals from their JSON values."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return from_plain(inner[0], value)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(**{f.name: from_plain(hints[f.name], value[f.name])
                     for f in dataclasses.fields(tp) if f.name in value})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(from_plain(args[0], v) for v in value)
        return tuple(from_plain(a, v) for a, v in zip(args, value))
    if origin is list:
        return [from_plain(args[0], v) for v in value]
    if origin is dict:
        return {from_plain(args[0], k): from_plain(args[1], v) for k, v in value.items()}
    if tp is Path:
        return Path(value)
    if tp in (int, float) and isinstance(value, str):
        return tp(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def document(schema: str, **payload: Any) -> dict:
    return {"cputune_version": __version__, "schema": schema, **plain(payload)}


def write_json(path: Path | str, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_json(path: Path | str, schema: str | None = None) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}",
                          hint="delete it and create it again") from None
    if schema and (not isinstance(doc, dict) or doc.get("schema") != schema):
        raise ConfigError(f"{path} is not a {schema} document",
                          hint="delete it and create it again") from None
    return doc
