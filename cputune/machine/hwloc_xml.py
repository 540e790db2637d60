"""Import an `lstopo --of xml` file as a Topology, to describe a box one is not logged into.

Separate from topology.py because it reads hwloc's object tree, not sysfs; both end in the same
build_topology(), so everything downstream treats the two sources alike.
"""

from __future__ import annotations

import itertools
import math
import re
import string
import xml.etree.ElementTree as ET
from pathlib import Path

from cputune.core.checks import shown
from cputune.core.errors import ConfigError, TopologyError
from cputune.core.fsutil import read_small_text
from cputune.core.units import MAX_SIZE_BYTES
from cputune.machine.topology import (MAX_CACHE_BYTES, MAX_CPUS, MAX_NUMA_NODES, NumaNode, Topology, build_topology,
                                      merge_inconsistent_nodes, small_int)

# lstopo's trees are about a dozen objects deep (Machine, Package, Group, Die, L3 ... Core, PU).
MAX_DEPTH = 256
# A Package or Core os_index is the kernel's physical_package_id / core_id, an int; on arm64 it
# may come from firmware (MPIDR, PPTT) and be large, so it is only held to the int range.
MAX_OTHER_ID = 1 << 31
# A NUMA distance: hwloc writes u64s (relative distances, or latencies and bandwidths).
MAX_DISTANCE = 1 << 32
# NUMA nodes partition the CPUs; broken firmware makes every node claim all of them (hwloc's
# 8em64t-2s2ca2c-buggynuma: 8 nodes x 8 CPUs). The sum over nodes is held to 16 x MAX_CPUS.
MAX_NODE_CPUS = 16 * MAX_CPUS
_HINT = "make one with `lstopo --of xml > box.xml` on the machine"
_HEX = frozenset(string.hexdigits)
_ONES = re.compile("1+")


def parse_hwloc_bitmap(text: str | None, limit: int = MAX_CPUS) -> tuple[int, ...] | None:
    """hwloc's bitmap text: 32-bit hex chunks, most significant first ("0x0000fff0,0x0",
    an empty chunk is zero). An infinite set ("0xf...f,...") gives None. A chunk that is not
    1-8 hex digits, or a set bit at `limit` or above, raises ValueError.

    Linear in the text: the chunks are joined into one hex number (not shifted in one by one,
    which copies a growing integer per chunk), and its set bits are read as runs of ones."""
    if text is None or "f...f" in text:
        return None
    digits = []
    for chunk in text.strip().split(","):
        chunk = chunk.strip().lower().removeprefix("0x")
        if len(chunk) > 8 or not _HEX.issuperset(chunk):
            raise ValueError(f"{shown(chunk)} is not a chunk of at most 8 hex digits")
        digits.append(chunk.zfill(8))
    hexa = "".join(digits).lstrip("0")
    if not hexa:
        return ()
    top = 4 * (len(hexa) - 1) + int(hexa[0], 16).bit_length() - 1
    if top >= limit:
        raise ValueError(f"it sets bit {top}, at or above the limit of {limit}")
    low_first = bin(int(hexa, 16))[:1:-1]
    return tuple(itertools.chain.from_iterable(range(*m.span()) for m in _ONES.finditer(low_first)))


def _infos(elem: ET.Element) -> dict[str, str]:
    return {i.get("name", ""): i.get("value", "") for i in elem.findall("info")}


def _is_l3(elem: ET.Element) -> bool:
    # hwloc 2.x names caches by level ("L3Cache"); 1.x writes type="Cache" with depth="3".
    kind = elem.get("type")
    return kind == "L3Cache" or (kind == "Cache" and elem.get("depth") == "3")


def _own_cache(elem: ET.Element) -> str | None:
    """"l1d", "l1i" or "l2" for a per-core cache object, else None. hwloc 2.x: L1Cache, L1iCache,
    L2Cache; 1.x: type="Cache" with depth and cache_type (0 unified, 1 data, 2 instruction)."""
    kind, ctype = elem.get("type"), elem.get("cache_type")
    if kind == "Cache":
        kind = {("1", "1"): "L1Cache", ("1", "0"): "L1Cache", ("1", "2"): "L1iCache",
                ("2", "0"): "L2Cache", ("2", "1"): "L2Cache"}.get((elem.get("depth"), ctype))
    return {"L1Cache": "l1d", "L1iCache": "l1i", "L2Cache": "l2"}.get(kind or "")


def _size_attr(path: Path, elem: ET.Element) -> int | None:
    """A cache object's cache_size in bytes; None when absent or 0 (hwloc writes 0 for a size it
    does not know). Anything else but a whole number up to MAX_CACHE_BYTES is refused, as every
    other id and size here is: a damaged size would otherwise be used, or dropped without a word."""
    text = elem.get("cache_size")
    if text is None:
        return None
    return _whole(path, _where(elem), "cache_size", text, MAX_CACHE_BYTES + 1) or None


def _bad(path: Path, where: str, attr: str, value: str | None, want: str) -> TopologyError:
    return TopologyError(f"{path}: {where} has {attr}={shown(value)}, which is not {want}",
                         hint=f"fix or remove that value, or {_HINT}")


def _whole(path: Path, where: str, attr: str, text: str | None, hi: int) -> int:
    """A decimal attribute (or element text) from 0 to hi - 1."""
    t = (text or "").strip()
    if not t.isascii() or not t.isdigit() or len(t) > 20 or int(t) >= hi:
        raise _bad(path, where, attr, text, f"a whole number from 0 to {hi - 1}")
    return int(t)


def _real(path: Path, where: str, attr: str, text: str | None, lo_open: bool = False) -> float:
    """A finite, non-negative (or, lo_open, positive) float attribute."""
    try:
        v = float(text or "")
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v < 0 or (lo_open and v == 0):
        raise _bad(path, where, attr, text, "a finite number " + ("above 0" if lo_open else "of at least 0"))
    return v


def _bitmap(path: Path, elem: ET.Element, attr: str, limit: int = MAX_CPUS) -> tuple[int, ...] | None:
    text = elem.get(attr)
    try:
        return parse_hwloc_bitmap(text, limit)
    except ValueError as exc:
        raise TopologyError(f"{path}: {_where(elem)} has {attr}={shown(text)}, not an hwloc bitmap "
                            f"of ids below {limit}: {exc}", hint=f"fix or remove that value, or {_HINT}") from None


def _where(elem: ET.Element) -> str:
    kind, os_index = elem.get("type") or elem.tag, elem.get("os_index")
    return f"the {kind} object" + (f" with os_index={shown(os_index)}" if os_index is not None else "")


def _distances(path: Path, root: ET.Element, gp_to_os: dict[str, int],
               node_ids: list[int]) -> dict[int, tuple[int, ...]]:
    """NUMA distance rows by node id, from <distances2> (hwloc 2) or <distances> (hwloc 1)."""
    for d in root.iter("distances2"):
        if d.get("type") != "NUMANode":
            continue
        idx_text = " ".join(e.text or "" for e in d.findall("indexes")).split()
        vals = [_whole(path, "a NUMANode <distances2>", "u64values", v, MAX_DISTANCE)
                for e in d.findall("u64values") for v in (e.text or "").split()]
        if d.get("indexing") == "gp":
            ids = [gp_to_os.get(i) for i in idx_text]
        else:
            ids = [_whole(path, "a NUMANode <distances2>", "indexes", i, MAX_NUMA_NODES) for i in idx_text]
        n = len(ids)
        if n == 0 or len(vals) != n * n or None in ids or sorted(ids) != node_ids:
            continue
        pos = {nid: k for k, nid in enumerate(ids)}
        return {a: tuple(vals[pos[a] * n + pos[b]] for b in node_ids) for a in node_ids}
    for d in root.iter("distances"):
        lat = [_real(path, "a <distances> latency", "value", e.get("value", "0")) for e in d.findall("latency")]
        base = _real(path, "<distances>", "latency_base", d.get("latency_base", "1"), lo_open=True)
        n = len(node_ids)
        if len(lat) == n * n and n:
            # hwloc 1.x stores latencies normalised to the base, in logical (= sorted os) order.
            if max(lat) * base >= MAX_DISTANCE:
                raise _bad(path, "<distances>", "latency_base", d.get("latency_base"),
                           f"a base that keeps every latency times it below {MAX_DISTANCE}")
            return {a: tuple(round(lat[i * n + j] * base) for j in range(n))
                    for i, a in enumerate(node_ids)}
    return {}


# lstopo's XML of a 2-socket, 384-thread box is about 1 MB.
MAX_XML_BYTES = 64 << 20


def load_hwloc_xml(path: Path | str) -> Topology:
    """Read an hwloc XML topology (v1 or v2 format) into the same Topology discover_topology gives."""
    path = Path(path)
    try:
        # Bounded and never blocking (a FIFO, a device, a multi-GB file): fsutil's reader.
        root = ET.fromstring(read_small_text(path, limit=MAX_XML_BYTES, hint=_HINT).encode())
    except ConfigError as exc:
        raise TopologyError(f"cannot read hwloc XML: {exc.message}", hint=exc.hint or _HINT) from None
    except ET.ParseError as exc:
        raise TopologyError(f"cannot read hwloc XML {path}: {exc}", hint=_HINT) from None
    machine = root.find("object")
    if root.tag != "topology" or machine is None:
        raise TopologyError(f"{path} is not an hwloc topology (no <topology><object>)", hint=_HINT)

    counter = itertools.count()
    package_of: dict[int, int] = {}
    core_id_of: dict[int, int | None] = {}
    core_key_of: dict[int, int] = {}
    l3_key_of: dict[int, int] = {}
    l3_size: dict[int, int | None] = {}
    raw_nodes: list[tuple[int, tuple[int, ...] | None, int | None, ET.Element]] = []
    gp_to_os: dict[str, int] = {}
    model = vendor = None
    flags: list[str] = []
    own: dict[str, int | None] = {}  # the first per-core caches' sizes (l1d, l1i, l2)
    numbers: dict[str, int | None] = {}
    seen_nodes: set[int] = set()
    listed = 0  # CPUs named by all NUMANode cpusets together

    # Depth first with an explicit stack (a tree nested thousands deep must not hit Python's
    # recursion limit), children in document order; each entry carries what its parents set.
    stack: list[tuple[ET.Element, int, tuple[int, int | None] | None, int | None, int]] = [
        (machine, 0, None, None, 1)]
    while stack:
        elem, pkg, core, l3, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise TopologyError(f"{path}: objects are nested more than {MAX_DEPTH} deep",
                                hint=f"this is not an lstopo tree; {_HINT}")
        kind = elem.get("type")
        os_index = elem.get("os_index")
        infos = _infos(elem)
        model = model or (infos.get("CPUModel") or "").strip() or None
        vendor = vendor or infos.get("CPUVendor") or None
        # x86 hwloc records cpuid's numbers too (CPUFamilyNumber, CPUModelNumber): they name the core.
        for k, key in (("family", "CPUFamilyNumber"), ("model", "CPUModelNumber")):
            if numbers.get(k) is None:
                numbers[k] = small_int(infos.get(key))
        # hwloc has no ISA field; a user may add one with `hwloc-annotate ... info CPUFlags "..."`.
        if not flags and infos.get("CPUFlags"):
            flags.extend(infos["CPUFlags"].split())
        where = f"a {kind} object"  # for its os_index; _where(elem) names it for other attributes
        if kind == "Package" and os_index is not None:
            pkg = _whole(path, where, "os_index", os_index, MAX_OTHER_ID)
        elif kind == "Core":
            core = (next(counter),
                    _whole(path, where, "os_index", os_index, MAX_OTHER_ID) if os_index is not None else None)
        elif _is_l3(elem):
            l3 = next(counter)
            l3_size[l3] = _size_attr(path, elem)
        elif _own_cache(elem):  # every one's size is checked; the first of each kind is kept
            own.setdefault(_own_cache(elem), _size_attr(path, elem))
        elif kind == "NUMANode" and os_index is not None:
            nid = _whole(path, where, "os_index", os_index, MAX_NUMA_NODES)
            if nid in seen_nodes:
                raise TopologyError(f"{path}: two NUMANode objects have os_index={nid}",
                                    hint=f"remove one, or {_HINT}")
            seen_nodes.add(nid)
            mem = elem.get("local_memory")
            node_cpus = _bitmap(path, elem, "cpuset")
            listed += len(node_cpus or ())
            if listed > MAX_NODE_CPUS:
                raise TopologyError(f"{path}: the NUMANode cpusets list more than {MAX_NODE_CPUS} "
                                    f"CPUs together (at os_index={nid})",
                                    hint=f"this is not an lstopo tree; {_HINT}")
            raw_nodes.append((nid, node_cpus,
                              _whole(path, _where(elem), "local_memory", mem, MAX_SIZE_BYTES + 1) if mem else None,
                              elem))
            if elem.get("gp_index"):
                gp_to_os[elem.get("gp_index")] = nid
        elif kind == "PU" and os_index is not None:
            cpu = _whole(path, where, "os_index", os_index, MAX_CPUS)
            package_of[cpu] = pkg
            key, cid = core if core is not None else (next(counter), None)
            core_key_of[cpu] = key
            core_id_of[cpu] = cid
            if l3 is not None:
                l3_key_of[cpu] = l3
        stack.extend((child, pkg, core, l3, depth + 1) for child in reversed(elem.findall("object")))

    if not package_of:
        raise TopologyError(f"{path} lists no PU objects", hint="export it again with plain `lstopo --of xml`")

    online = sorted(package_of)
    members: dict[int, list[int]] = {}
    for cpu, key in core_key_of.items():
        members.setdefault(key, []).append(cpu)
    l3_members: dict[int, list[int]] = {}
    for cpu, key in l3_key_of.items():
        l3_members.setdefault(key, []).append(cpu)

    node_ids = sorted({nid for nid, *_ in raw_nodes})
    dist = _distances(path, root, gp_to_os, node_ids)
    nodes = []
    for nid, cpus, mem, elem in sorted(raw_nodes, key=lambda r: r[0]):
        if cpus is None:  # hwloc 1.x nests PUs under their NUMANode instead
            cpus = tuple(_whole(path, "a PU", "os_index", p.get("os_index"), MAX_CPUS)
                         for p in elem.iter("object")
                         if p.get("type") == "PU" and p.get("os_index") is not None)
        nodes.append(NumaNode(id=nid, cpus=tuple(sorted(package_of.keys() & cpus)),
                              mem_total_bytes=mem, mem_free_bytes=None,
                              distances=dist.get(nid, ()), merged_node_ids=(nid,)))
    if not nodes:
        nodes = [NumaNode(id=0, cpus=tuple(online), mem_total_bytes=None, mem_free_bytes=None,
                          distances=(10,), merged_node_ids=(0,))]
    nodes, notes = merge_inconsistent_nodes(nodes)

    complete = _bitmap(path, machine, "complete_cpuset") or ()
    allowed = _bitmap(path, machine, "allowed_cpuset")
    allowed_nodes = _bitmap(path, machine, "allowed_nodeset", MAX_NUMA_NODES)
    return build_topology(
        cpu_model=model,
        cpu_vendor=vendor,
        cpu_family_id=numbers.get("family"),
        cpu_model_id=numbers.get("model"),
        online_cpus=online,
        offline_cpus=set(complete) - set(online),
        package_of=package_of,
        core_id_of=core_id_of,
        siblings_of={c: members[core_key_of[c]] for c in online},
        l3_of={c: l3_members[l3_key_of[c]] for c in online if c in l3_key_of},
        l3_size_of={c: l3_size[l3_key_of[c]] for c in online if c in l3_key_of},
        nodes=nodes,
        allowed_cpus=allowed if allowed is not None else online,
        allowed_node_ids=allowed_nodes,
        cgroup_memory_limit_bytes=None,
        isa_flags=flags,
        source="hwloc-xml",
        notes=notes,
        l1d_bytes=own.get("l1d"), l1i_bytes=own.get("l1i"), l2_bytes=own.get("l2"),
    )
