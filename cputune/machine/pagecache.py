"""Which NUMA node holds a model file's cached pages, and evicting them, before a server maps it.

A GGUF already in the page cache stays on the node an earlier run faulted it into: numactl's
--membind and --interleave only steer new pages, so a cached model can be read from the wrong
socket for the whole run (llama.cpp's --numa help and #1437 say to drop caches first). Reading
the node takes syscalls (mincore, move_pages) on a mapping of the file, not a /proc file, so it
lives here, apart from the sysfs readers; judge() is the pure part.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PAGE = mmap.PAGESIZE
SAMPLE_PAGES = 2048  # per file: a few ms of syscalls, ±2% on the fractions
MISPLACED_WARN_FRACTION = 0.10
# move_pages(2) has no libc wrapper; syscall numbers from arch/*/entry/syscalls (x86_64: 279).
_SYS_MOVE_PAGES = {"x86_64": 279, "aarch64": 239, "ppc64le": 301, "s390x": 310}
_PROT_READ, _MAP_SHARED, _MADV_RANDOM = 0x1, 0x01, 1


@dataclass(frozen=True, slots=True)
class CacheSample:
    """Sampled pages of one file: how many are in the page cache, and on which node."""

    path: str
    file_bytes: int
    sampled_pages: int
    resident_pages: int
    pages_by_node: dict[int, int]


@dataclass(frozen=True, slots=True)
class CacheVerdict:
    sampled_pages: int
    resident_fraction: float
    pages_by_node: dict[int, int]
    misplaced_fraction: float  # of all sampled pages: cached where the plan does not want them
    warning: str | None


@functools.lru_cache(maxsize=1)
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.syscall.restype = ctypes.c_long
    return libc


def sample_file(path: Path | str, max_pages: int = SAMPLE_PAGES) -> CacheSample | None:
    """Up to `max_pages` evenly spaced pages: resident (mincore) and, for those, their node
    (move_pages with no target nodes reports where each page is). None where unsupported."""
    nr = _SYS_MOVE_PAGES.get(platform.machine())
    if nr is None:
        return None
    size = os.path.getsize(path)
    n_pages = (size + PAGE - 1) // PAGE
    if n_pages == 0:
        return CacheSample(str(path), size, 0, 0, {})
    step = max(1, n_pages // max_pages)
    picks = list(range(0, n_pages, step))[:max_pages]
    libc = _libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            # No readahead around the pages touched below: only already-cached pages get mapped.
            libc.madvise(addr, n_pages * PAGE, _MADV_RANDOM)
            vec = ctypes.create_string_buffer(1)
            resident = []
            for p in picks:
                if libc.mincore(addr + p * PAGE, PAGE, vec) == 0 and vec.raw[0] & 1:
                    resident.append(p)
            nodes: dict[int, int] = {}
            if resident:
                for p in resident:  # a minor fault maps the cached page; move_pages needs a PTE
                    ctypes.string_at(addr + p * PAGE, 1)
                count = len(resident)
                pages = (ctypes.c_void_p * count)(*[addr + p * PAGE for p in resident])
                status = (ctypes.c_int * count)()
                rc = libc.syscall(ctypes.c_long(nr), ctypes.c_int(0), ctypes.c_ulong(count), pages,
                                  None, status, ctypes.c_int(0))
                if rc != 0:
                    return None
                for s in status:
                    if s >= 0:
                        nodes[s] = nodes.get(s, 0) + 1
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return CacheSample(str(path), size, len(picks), len(resident), nodes)


def evict(paths: Iterable[Path | str]) -> None:
    """Drop the files' clean, unmapped pages from the page cache, as `vmtouch -e` does:
    posix_fadvise(DONTNEED) needs no root and leaves every other file's cache alone."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def judge(samples: Sequence[CacheSample], mem_node_ids: Sequence[int], spread: bool) -> CacheVerdict:
    """Misplaced = cached pages outside `mem_node_ids`, plus, when the plan spreads the weights
    (interleave/distribute), each node's pages beyond an even share of the cached ones."""
    sampled = sum(s.sampled_pages for s in samples)
    resident = sum(s.resident_pages for s in samples)
    by_node: dict[int, int] = {}
    for s in samples:
        for n, c in s.pages_by_node.items():
            by_node[n] = by_node.get(n, 0) + c
    wanted = set(mem_node_ids)
    outside = sum(c for n, c in by_node.items() if n not in wanted)
    excess = 0.0
    if spread and wanted:
        share = sum(c for n, c in by_node.items() if n in wanted) / len(wanted)
        excess = sum(max(0.0, c - share) for n, c in by_node.items() if n in wanted)
    misplaced = (outside + excess) / sampled if sampled else 0.0
    warning = None
    if misplaced > MISPLACED_WARN_FRACTION:
        where = ", ".join(f"node {n}: {100 * c / sampled:.0f}%" for n, c in sorted(by_node.items()))
        target = ("spread evenly over nodes " if spread else "on node") + \
            f"{'s' if len(wanted) > 1 and not spread else ''} {', '.join(map(str, sorted(wanted)))}"
        warning = (f"{100 * misplaced:.0f}% of the model is cached on the wrong node ({where} of its "
                   f"pages; the plan wants them {target}): cached pages stay where an earlier run "
                   "put them, so the server would read them across sockets")
    return CacheVerdict(sampled, resident / sampled if sampled else 0.0, by_node, misplaced, warning)
