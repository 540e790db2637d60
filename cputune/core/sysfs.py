"""The one place that opens host files under /sys and /proc, through a root that tests re-point.

hwloc's fsroot idea: every discoverer takes a root, so a recorded machine (a tarball of
/sys and /proc) reads exactly like the live one.
"""

from __future__ import annotations

import glob as _glob
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cputune.core.checks import shown
from cputune.core.errors import TopologyError
from cputune.core.fsutil import read_at_most


# The most logical CPUs, and the highest CPU id + 1, a list or mask may name: 8x Linux's largest
# NR_CPUS on x86-64 (8192, CONFIG_MAXSMP). cputune.machine.topology holds its topologies to it too.
MAX_CPUS = 1 << 16


def _too_many(text: str, what: str) -> TopologyError:
    return TopologyError(f"the CPU list {shown(text.strip())} {what}",
                         hint="check the file it was read from: no machine has that many CPUs")


def parse_cpulist(text: str) -> tuple[int, ...]:
    """Parse the kernel's list format ("0-3,8,10-11"; Documentation/admin-guide/cputopology.rst).
    A CPU id of MAX_CPUS or more, or more than MAX_CPUS CPUs named in all, is a TopologyError
    before any range is built: "0-4000000000" would be a list of four billion. So is text that is
    not a list (a word, a reversed range "7-0", a group form "0-7:2" without its group size or with
    a size of 0), which the kernel itself refuses (lib/bitmap-str.c)."""
    try:
        return _parse_cpulist(text)
    except ValueError as e:
        raise TopologyError(f"the CPU list {shown(text.strip()[:80])} is not in the kernel's list format "
                            f"('0-3,8,10-11'): {e}", hint="check the file it was read from") from None


def _parse_cpulist(text: str) -> tuple[int, ...]:
    cpus: set[int] = set()
    named = 0
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        ranges = _part_ranges(part)
        if ranges and ranges[-1].stop > MAX_CPUS:
            raise _too_many(text, f"names CPU {ranges[-1].stop - 1}, above the highest cputune handles ({MAX_CPUS - 1})")
        named += sum(len(r) for r in ranges)
        if named > MAX_CPUS:  # repeats ("0-65535,0-65535,...") would cost the work of that many
            raise _too_many(text, f"names more than the {MAX_CPUS} CPUs cputune handles")
        for r in ranges:
            cpus.update(r)
    return tuple(sorted(cpus))


def _part_ranges(part: str) -> list[range]:
    """One comma-separated part of a CPU list as ranges, in order; ValueError when it is none."""
    if "-" not in part:
        cpu = int(part)
        if cpu < 0:
            raise ValueError(f"{part!r} is not a CPU number")
        return [range(cpu, cpu + 1)]
    lo, _, hi = part.partition("-")
    used = group = None
    # "100-2000:2/25" is the first 2 CPUs of every group of 25 (100,101,125,126,...), not a
    # stride; the kernel wants both numbers (Documentation/admin-guide/kernel-parameters.rst,
    # "cpu lists"; lib/bitmap-str.c, bitmap_parse_region).
    if ":" in hi:
        hi, _, spec = hi.partition(":")
        used_text, _, group_text = spec.partition("/")
        used, group = int(used_text), int(group_text)
    first, last = int(lo), int(hi)
    if first < 0 or last < first:
        raise ValueError(f"{part!r} is not a range from a lower CPU to a higher one")
    if last >= MAX_CPUS:  # before a range is built: the caller names it
        return [range(last, last + 1)]
    if group is None:
        return [range(first, last + 1)]
    if not 0 < used <= group:
        raise ValueError(f"{part!r} must use 1 to the group's size of CPUs per group")
    return [range(start, min(start + used, last + 1)) for start in range(first, last + 1, group)]


def parse_cpumask(text: str) -> tuple[int, ...]:
    """Parse a hex mask as in /proc/PID/status Cpus_allowed ("ff,ffffffff"), lowest bit = CPU 0;
    a bit at MAX_CPUS or above is a TopologyError, as in parse_cpulist."""
    digits = text.strip().replace(",", "") or "0"
    try:
        if not digits.isascii() or len(digits) > MAX_CPUS // 4 + 1:  # more hex digits than CPUs
            raise ValueError
        value = int(digits, 16)
    except ValueError:
        raise TopologyError(f"the CPU mask {shown(text.strip())} is not a hex mask like ff,ffffffff",
                            hint="check the file it was read from") from None
    if value.bit_length() > MAX_CPUS:
        raise TopologyError(f"the CPU mask {shown(text.strip())} names CPU {value.bit_length() - 1}, above "
                            f"the highest cputune handles ({MAX_CPUS - 1})",
                            hint="check the file it was read from: no machine has that many CPUs")
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


# The largest file read from sysfs or /proc: /proc/cpuinfo of a 512-CPU box is about 1 MB.
MAX_FILE_BYTES = 16 << 20


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
        """The file's text (at most MAX_FILE_BYTES), or `default` when it is missing, unreadable or
        not a regular file: a FIFO or device planted in a recorded tree is never opened for
        a blocking read, and a link to /dev/zero is not read without end."""
        path = self.path(p)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return default
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            self.denied.append("/" + p.lstrip("/"))
            return default
        except OSError:
            return default
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return default
            return read_at_most(fd, MAX_FILE_BYTES).decode(errors="replace").strip()
        except PermissionError:
            self.denied.append("/" + p.lstrip("/"))
            return default
        except OSError:
            return default
        finally:
            os.close(fd)

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
