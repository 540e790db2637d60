"""Sizes, durations and number lists as people type them: 2GB, 512MiB, 300M; 10m, 90s, 1h30m; 4,8,16."""

from __future__ import annotations

import os
import re

from cputune.core.checks import MAX_THREADS, shown
from cputune.core.errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 10**3, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30, "T": 1 << 40, "TB": 10**12,
          "TIB": 1 << 40}


MAX_SIZE_BYTES = 1 << 50  # 1 PiB: more than any box's memory or model file
# A number typed with more digits than this is out of every range cputune takes (int() refuses
# 4300 digits with a ValueError, float() turns 400 nines into inf): said so, never converted.
MAX_DIGITS = 24


def is_ascii_int(text: str) -> bool:
    """'123' (ASCII digits, at most MAX_DIGITS): what int() may safely read. str.isdigit() also
    takes '²', which int() refuses."""
    return isinstance(text, str) and 0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdecimal()


def parse_size(text: str, lo: int = 1, hi: int = MAX_SIZE_BYTES) -> int:
    """Bytes from '2GB' (10^9), '2GiB' or '2G' (2^30), '512MiB', '1.5TB' or a plain number,
    from `lo` to `hi` bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?I?B?)\s*", str(text), re.I | re.ASCII)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read the size {shown(text)}", hint="write it like 2GB, 512MiB or 300M")
    # More digits than any size has: out of range, before float() makes it inf.
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()]) if len(m.group(1)) <= MAX_DIGITS else hi + 1
    if not lo <= n <= hi:
        raise ConfigError(f"the size {shown(text)} must be from {bytes_text(lo)} to {bytes_text(hi)}",
                          hint="write it like 2GB, 512MiB or 300M")
    return n


def bytes_text(n: int) -> str:
    """An exact size in the largest binary unit that divides it: '1 PiB', '512 MiB', '3 bytes'."""
    for unit, size in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return plural(n, "byte")


_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str, hi_s: float | None = None) -> float:
    """Seconds from '10m', '90s', '1h30m', '1.5h' or a plain number of seconds; above 0, at most `hi_s`."""
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)\s*(min|[smh]?)", str(text).strip().lower())
    joined = "".join(f"{n}{u}" for n, u in parts)
    if (not parts or joined != re.sub(r"\s+", "", str(text).strip().lower())
            or any(len(n) > MAX_DIGITS for n, _ in parts)):
        raise ConfigError(f"cannot read the duration {shown(text)}", hint="write it like 10m, 90s or 1h30m")
    total = sum(float(n) * _SECONDS[u] for n, u in parts)
    if total <= 0:
        raise ConfigError(f"the duration {text!r} is not positive", hint="write it like 10m, 90s or 1h30m")
    if hi_s is not None and total > hi_s:
        raise ConfigError(f"the duration {text!r} is longer than {duration_text(hi_s)}",
                          hint="write it like 10m, 90s or 1h30m")
    return total


def duration_text(seconds: float) -> str:
    """'7 days', '2 hours', '90 s': the coarsest unit that is a whole number."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            return plural(int(seconds // size), unit)
    return f"{seconds:g} s"


def parse_int_list(text: str, name: str, lo: int, hi: int, hint: str | None = None) -> tuple[int, ...]:
    """Whole numbers from 'N,N,...' (repeats dropped, order kept), each from lo to hi; a
    ConfigError names the item and `name` (e.g. "thread count")."""
    items = [x.strip() for x in str(text).split(",")]
    out = []
    for x in items:
        if not re.fullmatch(r"[+-]?[0-9]+", x):
            raise ConfigError(f"{name} {x!r} in {text!r} is not a whole number", hint=hint or "write it like 4,8,16")
        n = int(x) if len(x) <= MAX_DIGITS else None
        if n is None or not lo <= n <= hi:
            item = x if n is not None else x[:12] + "..."
            raise ConfigError(f"{name} {item} in {shown(text)} must be from {lo} to {hi}", hint=hint)
        out.append(n)
    return tuple(dict.fromkeys(out))


def parse_threads(text: str, cpus: int | None = None) -> tuple[int, ...]:
    """Thread counts to run here ('1,8,16'): each from 1 to 4x the CPUs this process may use
    (`cpus`, default its affinity mask). More threads than CPUs only oversubscribe them, and a
    count like 100000 makes llama-bench abort."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = min(4 * cpus, MAX_THREADS)
    return parse_int_list(text, "thread count", 1, limit,
                          hint=f"this process may use {plural(cpus, 'CPU')}; give counts from 1 to {limit}, "
                               f"e.g. 1,{cpus}")


def parse_tokens_list(text: str, flag: str) -> tuple[int, ...]:
    """Token counts such as KV-cache depths ('0,1024,4096'), each from 0 to checks.MAX_TOKENS."""
    from cputune.core.checks import MAX_TOKENS

    return parse_int_list(text, f"{flag} value", 0, MAX_TOKENS, hint="for example 0,1024,4096")


def gib_text(n: float | None) -> str:
    """'12.5 GiB', or '?' when the size is unknown."""
    return "?" if n is None else f"{n / (1 << 30):.1f} GiB"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
