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
    datapath_bits: int  # the width of its vector execution units
    signature: Signature | None  # how it is told by flags and caches alone (None: it cannot be)
    source: str


@dataclass(frozen=True, slots=True)
class Signature:
    """ISA flags a core has and lacks, and the sizes of its own caches in KiB (l1d, l1i, l2)."""
    has: frozenset[str]
    lacks: frozenset[str]
    caches_kib: tuple[tuple[str, int], ...]

    def matches(self, flags: frozenset[str], caches_kib: dict[str, int | None]) -> bool:
        return (self.has <= flags and not (self.lacks & flags)
                and all(caches_kib.get(k) == v for k, v in self.caches_kib))


_CACHES = ("l1d", "l1i", "l2")


def _signature(text: str) -> Signature | None:
    if not text.strip():
        return None
    has, lacks, caches = set(), set(), []
    for tok in text.split():
        key, eq, val = tok.partition("=")
        if eq:
            if key not in _CACHES or not val.isdigit() or not 1 <= int(val) <= 1 << 20:
                raise ValueError(f"core_families.csv: signature term {tok!r} is not l1d/l1i/l2=KiB")
            caches.append((key, int(val)))
        elif tok.startswith("!"):
            lacks.add(tok[1:])
        else:
            has.add(tok)
    if not caches:
        raise ValueError(f"core_families.csv: signature {text!r} names no cache size")
    return Signature(frozenset(has), frozenset(lacks), tuple(caches))


def _ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(";"):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def core_rows() -> tuple[CoreRow, ...]:
    return tuple(CoreRow(r["core"], r["vendor"], int(r["cpu_family"]), _ranges(r["models"]),
                         re.compile(r["model_regex"]), _bits(r["datapath_bits"]),
                         _signature(r["signature"]), r["source"]) for r in load_csv("core_families.csv"))


def _bits(text: str) -> int:
    v = int(text)
    if v not in (128, 256, 512):
        raise ValueError(f"core_families.csv: vector width {v} is not 128, 256 or 512")
    return v


def core_family(cpu_model: str | None = None, vendor: str | None = None, cpu_family: int | None = None,
                model: int | None = None, flags: tuple[str, ...] | frozenset[str] = (),
                caches: dict[str, int | None] | None = None) -> str | None:
    """The core family of a CPU, by its numbers first, its model name second and, where a VM hides
    both, its ISA flags and own cache sizes in bytes (`caches`: l1d, l1i, l2) when exactly one
    family's signature matches them; None if unknown."""
    return identify_core(cpu_model, vendor, cpu_family, model, flags, caches)[0]


def identify_core(cpu_model: str | None = None, vendor: str | None = None, cpu_family: int | None = None,
                  model: int | None = None, flags: tuple[str, ...] | frozenset[str] = (),
                  caches: dict[str, int | None] | None = None) -> tuple[str | None, str]:
    """core_family, and how it was told: "numbers", "name", "caches" or "" (not told)."""
    if vendor and cpu_family is not None and model is not None:
        for r in core_rows():
            if r.vendor == vendor and r.cpu_family == cpu_family and any(a <= model <= b for a, b in r.models):
                return r.core, "numbers"
    if cpu_model:
        for r in core_rows():
            if r.model_regex.search(cpu_model):
                return r.core, "name"
    if vendor and caches:
        kib = {k: v // 1024 if v else None for k, v in caches.items()}
        fl = frozenset(flags)
        hits = [r.core for r in core_rows()
                if r.vendor == vendor and r.signature is not None and r.signature.matches(fl, kib)]
        if len(hits) == 1:
            return hits[0], "caches"
    return None, ""


def vendor_of(cpu_model: str) -> str | None:
    """The x86 vendor ("AuthenticAMD", "GenuineIntel") of a CPU by its model name, from the same
    rows core_family matches; None if no row knows it."""
    return next((r.vendor for r in core_rows() if r.model_regex.search(cpu_model)), None)


def nearest_family(known: set[str] | frozenset[str] | tuple[str, ...], isa: tuple[str, ...] | frozenset[str],
                   vendor: str | None = None, any_isa: bool = False) -> str | None:
    """For a core no table knows: the known family with the same widest vector ISA (AVX-512 or
    AVX2), preferring one of the same vendor; with `any_isa`, one of the other width when none
    has the same (vector_scale converts its rates); None when none is known."""
    wide = "avx512f" in isa
    avx512 = ["zen4", "zen5", "sapphirerapids", "graniterapids", "icelake", "skylake"]
    avx2 = ["zen3", "zen2", "zen1", "broadwell", "haswell", "sierraforest", "skylake"]
    order = avx512 if wide else avx2
    if any_isa:
        order = order + [c for c in (avx2 if wide else avx512) if c not in order]
    if vendor == "GenuineIntel":
        order.sort(key=lambda c: not c.endswith(("rapids", "lake", "well", "forest")))
    return next((c for c in order if c in known), None)


@functools.lru_cache(maxsize=None)
def _by_core() -> dict[str, CoreRow]:
    return {r.core: r for r in core_rows()}


def _row(core: str) -> CoreRow | None:
    return _by_core().get(core)


def vector_scale(target: str, source: str) -> float | None:
    """How fast a `target` core runs llama.cpp's SIMD kernels against a `source` core, from the
    width of their vector units; None when either family is unknown.

    Units narrower than 256 bits take two passes for each AVX2 instruction (Zen 1, E-cores), so
    they do proportionally less; wider ones count as 256: the published fit's per-core prefill
    rates of Zen 5 and Granite Rapids (512-bit units) are Zen 4's (256-bit), and Skylake-SP's
    (512-bit, AVX-512) are below Zen 3's (256-bit, AVX2), so neither the width beyond 256 nor the
    ISA carries over between families. Clock speed is not in it either: a first-order estimate for
    a family no calibration has measured, until `cputune calibrate` measures the box.
    """
    t, s = _row(target), _row(source)
    if t is None or s is None:
        return None
    return min(t.datapath_bits, 256) / min(s.datapath_bits, 256)
