"""Sizes and durations as people type them: 2GB, 512MiB, 300M; 10m, 90s, 1h30m."""

from __future__ import annotations

import re

from cputune.errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 10**3, "KIB": 1 << 10, "M": 1 << 20, "MB": 10**6,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 10**9, "GIB": 1 << 30, "T": 1 << 40, "TB": 10**12,
          "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '2GB' (10^9), '2GiB' or '2G' (2^30), '512MiB', '1.5TB' or a plain number."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text), re.I)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read the size {text!r}", hint="write it like 2GB, 512MiB or 300M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds from '10m', '90s', '1h30m', '1.5h' or a plain number of seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(min|[smh]?)", str(text).strip().lower())
    joined = "".join(f"{n}{u}" for n, u in parts)
    if not parts or joined != re.sub(r"\s+", "", str(text).strip().lower()):
        raise ConfigError(f"cannot read the duration {text!r}", hint="write it like 10m, 90s or 1h30m")
    total = sum(float(n) * _SECONDS[u] for n, u in parts)
    if total <= 0:
        raise ConfigError(f"the duration {text!r} is not positive", hint="write it like 10m, 90s or 1h30m")
    return total


def gib_text(n: float | None) -> str:
    """'12.5 GiB', or '?' when the size is unknown."""
    return "?" if n is None else f"{n / (1 << 30):.1f} GiB"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")
