"""Which core microarchitecture a CPU has: per-core rates are a property of the core, not the box.

configs/core_families.csv maps the x86 vendor/family/model numbers (from /proc/cpuinfo, which a
VM may leave as the only clue) and the model names (a hardware profile's cpu.model) to a family
name such as zen4 or graniterapids; the predictor keeps per-core rate tables by that name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from cputune.core.data import load_csv


@dataclass(frozen=True, slots=True)
class CoreRow:
    core: str
    vendor: str
    cpu_family: int
    models: tuple[tuple[int, int], ...]
    model_regex: re.Pattern
    source: str


def _ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(";"):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def core_rows() -> tuple[CoreRow, ...]:
    return tuple(CoreRow(r["core"], r["vendor"], int(r["cpu_family"]), _ranges(r["models"]),
                         re.compile(r["model_regex"]), r["source"]) for r in load_csv("core_families.csv"))


def core_family(cpu_model: str | None = None, vendor: str | None = None, cpu_family: int | None = None,
                model: int | None = None) -> str | None:
    """The core family of a CPU, by its numbers first and its model name second; None if unknown."""
    if vendor and cpu_family is not None and model is not None:
        for r in core_rows():
            if r.vendor == vendor and r.cpu_family == cpu_family and any(a <= model <= b for a, b in r.models):
                return r.core
    if cpu_model:
        for r in core_rows():
            if r.model_regex.search(cpu_model):
                return r.core
    return None


def vendor_of(cpu_model: str) -> str | None:
    """The x86 vendor ("AuthenticAMD", "GenuineIntel") of a CPU by its model name, from the same
    rows core_family matches; None if no row knows it."""
    return next((r.vendor for r in core_rows() if r.model_regex.search(cpu_model)), None)


def nearest_family(known: set[str] | frozenset[str] | tuple[str, ...], isa: tuple[str, ...] | frozenset[str],
                   vendor: str | None = None) -> str | None:
    """For a core no table knows: the known family with the same widest vector ISA (AVX-512 or
    AVX2), preferring one of the same vendor; None when none is known."""
    wide = "avx512f" in isa
    order = (["zen4", "zen5", "sapphirerapids", "graniterapids", "icelake", "skylake"] if wide else
             ["zen3", "zen2", "zen1", "skylake"])
    if vendor == "GenuineIntel":
        order.sort(key=lambda c: not c.endswith(("rapids", "lake")))
    return next((c for c in order if c in known), None)
