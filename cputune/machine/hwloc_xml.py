"""Import an `lstopo --of xml` file as a Topology, to describe a box one is not logged into.

Separate from topology.py because it reads hwloc's object tree, not sysfs; both end in the same
build_topology(), so everything downstream treats the two sources alike.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

from cputune.core.errors import TopologyError
from cputune.machine.topology import NumaNode, Topology, build_topology, merge_inconsistent_nodes, small_int


def parse_hwloc_bitmap(text: str | None) -> tuple[int, ...] | None:
    """hwloc's bitmap text: 32-bit hex chunks, most significant first ("0x0000fff0,0x0",
    an empty chunk is zero). An infinite set ("0xf...f,...") gives None."""
    if text is None or "f...f" in text:
        return None
    value = 0
    for chunk in text.strip().split(","):
        chunk = chunk.strip().lower().removeprefix("0x")
        value = (value << 32) | (int(chunk, 16) if chunk else 0)
    return tuple(i for i in range(value.bit_length()) if value >> i & 1)


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


def _size_attr(elem: ET.Element) -> int | None:
    """An object's cache_size in bytes, or None when absent or not a number."""
    text = (elem.get("cache_size") or "").strip()
    return int(text) if text.isdigit() and len(text) < 16 else None


def _distances(root: ET.Element, gp_to_os: dict[str, int], node_ids: list[int]) -> dict[int, tuple[int, ...]]:
    """NUMA distance rows by node id, from <distances2> (hwloc 2) or <distances> (hwloc 1)."""
    for d in root.iter("distances2"):
        if d.get("type") != "NUMANode":
            continue
        idx_text = " ".join(e.text or "" for e in d.findall("indexes")).split()
        vals = [int(v) for e in d.findall("u64values") for v in (e.text or "").split()]
        if d.get("indexing") == "gp":
            ids = [gp_to_os.get(i) for i in idx_text]
        else:
            ids = [int(i) for i in idx_text]
        n = len(ids)
        if n == 0 or len(vals) != n * n or None in ids or sorted(ids) != node_ids:
            continue
        pos = {nid: k for k, nid in enumerate(ids)}
        return {a: tuple(vals[pos[a] * n + pos[b]] for b in node_ids) for a in node_ids}
    for d in root.iter("distances"):
        lat = [float(e.get("value", "0")) for e in d.findall("latency")]
        base = float(d.get("latency_base", "1"))
        n = len(node_ids)
        if len(lat) == n * n and n:
            # hwloc 1.x stores latencies normalised to the base, in logical (= sorted os) order.
            return {a: tuple(round(lat[i * n + j] * base) for j in range(n))
                    for i, a in enumerate(node_ids)}
    return {}


def load_hwloc_xml(path: Path | str) -> Topology:
    """Read an hwloc XML topology (v1 or v2 format) into the same Topology discover_topology gives."""
    path = Path(path)
    try:
        tree = ET.parse(path)
    except (OSError, ET.ParseError) as exc:
        raise TopologyError(f"cannot read hwloc XML {path}: {exc}",
                            hint="make one with `lstopo --of xml > box.xml` on the machine") from exc
    root = tree.getroot()
    machine = root.find("object")
    if root.tag != "topology" or machine is None:
        raise TopologyError(f"{path} is not an hwloc topology (no <topology><object>)",
                            hint="make one with `lstopo --of xml > box.xml` on the machine")

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

    def visit(elem: ET.Element, pkg: int, core: tuple[int, int | None] | None, l3: int | None) -> None:
        nonlocal model, vendor
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
        if kind == "Package" and os_index is not None:
            pkg = int(os_index)
        elif kind == "Core":
            core = (next(counter), int(os_index) if os_index is not None else None)
        elif _is_l3(elem):
            l3 = next(counter)
            l3_size[l3] = _size_attr(elem)
        elif _own_cache(elem) and _own_cache(elem) not in own:
            own[_own_cache(elem)] = _size_attr(elem)
        elif kind == "NUMANode" and os_index is not None:
            mem = elem.get("local_memory")
            raw_nodes.append((int(os_index), parse_hwloc_bitmap(elem.get("cpuset")),
                              int(mem) if mem else None, elem))
            if elem.get("gp_index"):
                gp_to_os[elem.get("gp_index")] = int(os_index)
        elif kind == "PU" and os_index is not None:
            cpu = int(os_index)
            package_of[cpu] = pkg
            key, cid = core if core is not None else (next(counter), None)
            core_key_of[cpu] = key
            core_id_of[cpu] = cid
            if l3 is not None:
                l3_key_of[cpu] = l3
        for child in elem.findall("object"):
            visit(child, pkg, core, l3)

    visit(machine, 0, None, None)
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
    dist = _distances(root, gp_to_os, node_ids)
    nodes = []
    for nid, cpus, mem, elem in sorted(raw_nodes, key=lambda r: r[0]):
        if cpus is None:  # hwloc 1.x nests PUs under their NUMANode instead
            cpus = tuple(int(p.get("os_index")) for p in elem.iter("object")
                         if p.get("type") == "PU" and p.get("os_index") is not None)
        nodes.append(NumaNode(id=nid, cpus=tuple(c for c in cpus if c in package_of),
                              mem_total_bytes=mem, mem_free_bytes=None,
                              distances=dist.get(nid, ()), merged_node_ids=(nid,)))
    if not nodes:
        nodes = [NumaNode(id=0, cpus=tuple(online), mem_total_bytes=None, mem_free_bytes=None,
                          distances=(10,), merged_node_ids=(0,))]
    nodes, notes = merge_inconsistent_nodes(nodes)

    complete = parse_hwloc_bitmap(machine.get("complete_cpuset")) or ()
    allowed = parse_hwloc_bitmap(machine.get("allowed_cpuset"))
    allowed_nodes = parse_hwloc_bitmap(machine.get("allowed_nodeset"))
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
