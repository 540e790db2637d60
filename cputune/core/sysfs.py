"""The one place that opens host files under /sys and /proc, through a root that tests re-point.

hwloc's fsroot idea: every discoverer takes a root, so a recorded machine (a tarball of
/sys and /proc) reads exactly like the live one.
"""

from __future__ import annotations

import glob as _glob
from dataclasses import dataclass, field
from pathlib import Path


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse the kernel's list format ("0-3,8,10-11"; Documentation/admin-guide/cputopology.rst)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, _, hi = part.partition("-")
            used = group = None
            # "100-2000:2/25" is the first 2 CPUs of every group of 25 (100,101,125,126,...), not a
            # stride; the kernel wants both numbers (Documentation/admin-guide/kernel-parameters.rst,
            # "cpu lists"; lib/bitmap-str.c, bitmap_parse_region).
            if ":" in hi:
                hi, _, spec = hi.partition(":")
                used_text, _, group_text = spec.partition("/")
                used, group = int(used_text), int(group_text)
            if used is None:
                cpus.update(range(int(lo), int(hi) + 1))
            else:
                for start in range(int(lo), int(hi) + 1, group):
                    cpus.update(range(start, min(start + used, int(hi) + 1)))
        else:
            cpus.add(int(part))
    return tuple(sorted(cpus))


def parse_cpumask(text: str) -> tuple[int, ...]:
    """Parse a hex mask as in /proc/PID/status Cpus_allowed ("ff,ffffffff"), lowest bit = CPU 0."""
    value = int(text.strip().replace(",", "") or "0", 16)
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)


def format_cpulist(cpus) -> str:
    """The inverse of parse_cpulist, with ranges collapsed: (0,1,2,5) -> "0-2,5"."""
    out, run = [], []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@dataclass
class SysRoot:
    """Reads files relative to `root`; a missing file is a fact (None/default), not a crash.

    Files that exist but cannot be read (root-only DMI fields, for instance) are collected in
    `denied` so the caller can turn them into findings instead of errors.
    """

    root: Path = Path("/")
    denied: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.root = Path(self.root)

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def exists(self, p: str) -> bool:
        return self.path(p).exists()

    def text(self, p: str, default: str | None = None) -> str | None:
        try:
            return self.path(p).read_text(errors="replace").strip()
        except PermissionError:
            self.denied.append("/" + p.lstrip("/"))
            return default
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, OSError):
            return default

    def int(self, p: str, default: int | None = None) -> int | None:
        t = self.text(p)
        if t is None:
            return default
        try:
            return int(t.split()[0])
        except (ValueError, IndexError):
            return default

    def cpulist(self, p: str) -> tuple[int, ...] | None:
        t = self.text(p)
        return None if t is None else parse_cpulist(t)

    def glob(self, pattern: str) -> list[str]:
        """Paths matching pattern, returned relative to the root with a leading '/', sorted."""
        base = str(self.root).rstrip("/")
        hits = _glob.glob(base + "/" + pattern.lstrip("/"))
        return sorted("/" + h[len(base):].lstrip("/") for h in hits)

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(x.name for x in self.path(p).iterdir())
        except OSError:
            return []

    def is_live(self) -> bool:
        return self.root.resolve() == Path("/")
