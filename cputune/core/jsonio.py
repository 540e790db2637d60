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
from cputune.core.checks import shown
from cputune.core.errors import ConfigError
from cputune.core.fsutil import atomic_write_text, read_small_text


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


_KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string",
          Path: "a path (a string)"}


def _wrong(where: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"field {where or '(top)'} must be {what}, not {shown(value)}")


# No figure cputune saves comes near these (the largest, a box's memory in bytes, is < 2^50):
# a 400-digit number is refused here, before float() or a division overflows on it, and a
# statistic over 1e308-sized samples cannot overflow to inf.
MAX_PLAIN_INT = 1 << 62
MAX_PLAIN_FLOAT = 1e18


def _scalar(tp: type, value: Any, where: str) -> Any:
    # JSON has one number type: an int field takes only whole numbers, a float field any finite
    # number (json.loads reads NaN and Infinity; plain() never writes them). bool is not an int.
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        big = abs(value) > MAX_PLAIN_INT if isinstance(value, int) else not abs(value) <= MAX_PLAIN_FLOAT
        if big and not (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"field {where} is {shown(value)}, far beyond any figure cputune saves")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, Path) and isinstance(value, str):
        return tp(value)
    if tp is bool and isinstance(value, bool):
        return value
    raise _wrong(where, _KINDS[tp], value)


def _key(tp: Any, key: str, where: str) -> Any:
    """A dict key: JSON keys are strings, so an int key is its digits."""
    if tp is int:
        try:
            return int(key)
        except ValueError:
            raise ConfigError(f"field {where} has the key {shown(key)}, not a whole number") from None
    return from_plain(tp, key, where)


def from_plain(tp: Any, value: Any, where: str = "") -> Any:
    """The inverse of plain() for annotated dataclasses: rebuilds nested dataclasses, tuples,
    dicts with int keys and optionals from their JSON values, checking each value's type on the
    way. A ConfigError names the field path (`inventory.topology.nodes[2].id`) and its type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return from_plain(a, value, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else _wrong(where, " or ".join(_describe(a) for a in args), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _wrong(where, f"an object ({tp.__name__})", value)
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            path = f"{where}.{f.name}" if where else f.name
            if f.name in value:
                kwargs[f.name] = from_plain(hints[f.name], value[f.name], path)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"field {path} is missing")
        return tp(**kwargs)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise _wrong(where, "a list", value)
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [from_plain(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if len(value) != len(args):
            raise _wrong(where, f"a list of {len(args)}", value)
        return tuple(from_plain(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value)
        return {_key(args[0], k, where): from_plain(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if tp in _KINDS:
        return _scalar(tp, value, where)
    return value


def _describe(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return _KINDS.get(tp, getattr(tp, "__name__", str(tp)))


def document(schema: str, **payload: Any) -> dict:
    return {"cputune_version": __version__, "schema": schema, **plain(payload)}


def write_json(path: Path | str, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_json(path: Path | str, schema: str | None = None) -> dict:
    """A saved document, read through fsutil.read_small_text (a regular file of at most 64 MiB:
    never a device, a FIFO or a 4 GB read); every failure is a ConfigError naming the file."""
    path = Path(path)
    redo = "delete it and create it again"
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    text = read_small_text(path, hint=redo)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"cannot read {path}: {e}", hint=redo) from None
    except RecursionError:
        raise ConfigError(f"cannot read {path}: it is nested too deeply to be a cputune document",
                          hint=redo) from None
    if schema and (not isinstance(doc, dict) or doc.get("schema") != schema):
        raise ConfigError(f"{path} is not a {schema} document",
                          hint=redo) from None
    return doc
