"""One checker for values read from files and flags (type, finite, range), so every bad value is
refused in the same words: `<name> must be <what is allowed>, not <value>`.

A leaf beside errors.py: hardware TOMLs, the saved JSON documents and the CLI's option types all
call it, and none of them has to know the others' wording.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable

from cputune.core.errors import ConfigError

# The most threads any option or saved setting may name: 8x ggml's own affinity-mask size
# (GGML_MAX_N_THREADS = 512, ggml/include/ggml.h), room for a box being planned, not a typo's 100000.
MAX_THREADS = 4096
# The most tokens a context, depth or test may hold: 2^24 = 16.8M, above the longest trained
# context published (Llama 4 Scout, 10M).
MAX_TOKENS = 1 << 24


def shown(value: Any, limit: int = 40) -> str:
    """A value as the message quotes it: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# What a terminal would act on rather than show: C0/C1 controls (ESC starts a CSI sequence that can
# clear the screen or retitle the window), format characters (U+202E turns the rest of a line
# backwards), line and paragraph separators, and the lone surrogates a non-UTF-8 file name decodes to.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
                          r"\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]")


def printable(value: Any, *, markup: bool = True) -> str:
    """`value` as text safe to put in front of a person: a model's general.name, an architecture,
    a TOML key or a file path comes from a file, and may hold "\\x1b[2J" or a newline. Each such
    character becomes its repr escape (\\x1b, \\n, \\u202e), as `shown()` writes it, but without
    the quotes and without doubling backslashes, so a plain name reads as itself. With `markup`
    (the default: text going into a rich table, title or print) rich markup is escaped too, so
    "[red]x[/red]" is shown as written; plain-text output (click.echo) passes markup=False."""
    text = _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], str(value))
    if markup:
        from rich.markup import escape  # here, not at the top: core stays a light leaf

        text = escape(text)
    return text


def range_text(lo: float | None, hi: float | None, *, integer: bool = False, lo_open: bool = False) -> str:
    """'a whole number from 1 to 32', 'a number above 0 and at most 10000', 'a finite number'."""
    kind = "a whole number" if integer else "a number"
    if lo is not None and hi is not None and not lo_open:
        return f"{kind} from {lo:g} to {hi:g}"
    parts = []
    if lo is not None:
        parts.append(f"above {lo:g}" if lo_open else f"at least {lo:g}")
    if hi is not None:
        parts.append(f"at most {hi:g}")
    return f"{kind} " + " and ".join(parts) if parts else ("a whole number" if integer else "a finite number")


def finite(value: Any) -> bool:
    """A real number that is not NaN or infinite (a bool is not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None, *,
           integer: bool = False, lo_open: bool = False, hint: str | None = None) -> int | float:
    """`value` when it is a number (a bool is not one), finite, whole if `integer`, and within
    [lo, hi] (lo excluded with lo_open); else a ConfigError naming `name` and the range."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    real = whole or isinstance(value, float)
    ok = (whole if integer else real) and (whole or math.isfinite(value))
    if ok:
        ok = ((lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi))
    if not ok:
        raise ConfigError(f"{name} must be {range_text(lo, hi, integer=integer, lo_open=lo_open)}, "
                          f"not {shown(value)}", hint=hint)
    return float(value) if not integer else value


def text(value: Any, name: str, choices: Iterable[str] | None = None, *, hint: str | None = None) -> str:
    """`value` when it is a string (and one of `choices`, if given)."""
    options = tuple(choices) if choices is not None else None
    if not isinstance(value, str) or (options is not None and value not in options):
        what = "one of " + ", ".join(options) if options is not None else "a string"
        raise ConfigError(f"{name} must be {what}, not {shown(value)}", hint=hint)
    return value


def text_list(value: Any, name: str, choices: Iterable[str] | None = None, *,
              hint: str | None = None) -> tuple[str, ...]:
    """A list of strings (each one of `choices`, if given) as a tuple. A bare string is refused
    rather than read letter by letter."""
    options = tuple(choices) if choices is not None else None
    if not isinstance(value, (list, tuple)):
        what = "a list of strings" + (f" from: {', '.join(options)}" if options else "")
        raise ConfigError(f"{name} must be {what}, not {shown(value)}", hint=hint)
    return tuple(text(v, f"{name}[{i}]", options, hint=hint) for i, v in enumerate(value))


def known_keys(data: dict, known: Iterable[str], where: str, *, hint: str | None = None) -> None:
    """Refuse a key of `data` not in `known`, naming it and where it is, with the nearest known
    key when one is close (a misspelt `nodes_per_socket` would otherwise be ignored, and its
    default used without a word). Only the first unknown key, in sorted order, is named."""
    allowed = tuple(known)
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        key = unknown[0]
        # A key the unknown one is part of first ('nodes_per_socket' is 'numa_nodes_per_socket'
        # shortened, though difflib finds 'cores_per_socket' closer), else difflib's nearest.
        within = [k for k in allowed if key in k]
        close = within if len(within) == 1 else difflib.get_close_matches(key, allowed, n=1)
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"{where}: unknown key {shown(key)}{more}"
                          + (f"; did you mean {shown(close[0])}?" if close else ""),
                          hint=hint or "known keys: " + ", ".join(allowed))
