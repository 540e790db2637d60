"""CPU and NUMA layout of a machine, read from sysfs/procfs through a re-rootable SysRoot.

Kept apart from measurement: everything here is a read of files, so a recorded tree (an hwloc
tarball) or an `lstopo` XML (hwloc_xml.py) describes a box exactly as the live one does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cputune.core.errors import TopologyError
from cputune.core.units import is_ascii_int
from cputune.core.sysfs import MAX_CPUS, SysRoot, format_cpulist, parse_cpulist, parse_cpumask

# The /proc/cpuinfo flag names of the x86 features ggml-cpu dispatches on
# (ggml/src/ggml-cpu/cpu-feats-x86.cpp; kernel names from arch/x86/include/asm/cpufeatures.h).
ISA_FLAGS: tuple[str, ...] = (
    "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "avx512vbmi",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    # not used by the engines' kernels choice, but they tell core generations apart
    # (configs/core_families.csv signatures): Zen 2 added clwb, Zen 3 vaes, Ice Lake avx512ifma.
    "avx512ifma", "avx512_fp16", "vaes", "clwb",
)

# MAX_CPUS, the most logical CPUs (and the highest CPU id + 1) a topology may hold, lives in
# core.sysfs (core cannot import machine): a recorded file claiming more is refused, not walked.
# The most NUMA nodes (and the highest node id + 1): Linux's MAX_NUMNODES at its largest
# CONFIG_NODES_SHIFT (10).
MAX_NUMA_NODES = 1 << 10
# A cache's size: 4 GiB, far above the largest one cache holds (an L3 of 96 MiB on a 3D V-Cache
# CCD; IBM z16's virtual L4 is 2 GiB). The sysfs and hwloc readers both hold sizes to it.
MAX_CACHE_BYTES = 1 << 32

_CPU = "sys/devices/system/cpu"
_NODE = "sys/devices/system/node"


@dataclass(frozen=True, slots=True)
class Package:
    """A socket: its kernel package id, its online CPUs, cores (indexes into Topology.cores), nodes."""

    id: int
    cpus: tuple[int, ...]
    core_indexes: tuple[int, ...]
    node_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NumaNode:
    """A NUMA node. `distances` is the SLIT row, aligned with Topology.nodes (empty when unknown).

    `merged_node_ids` lists the kernel node ids folded into this one; it is (id,) unless the
    firmware table was inconsistent (several nodes claiming the very same CPUs).
    """

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int | None
    mem_free_bytes: int | None
    distances: tuple[int, ...]
    merged_node_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Core:
    """A physical core: `cpus` are its online SMT siblings, lowest first; `core_id` is the
    kernel's topology/core_id, unique only within a package (or a die)."""

    index: int
    package_id: int
    core_id: int | None
    node_id: int | None
    l3_index: int | None
    cpus: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class L3Group:
    """CPUs sharing one last-level L3 (one CCX; one CCD on Zen 3/4/5, two CCX per CCD on Zen 2)."""

    index: int
    package_id: int
    cpus: tuple[int, ...]
    size_bytes: int | None


@dataclass(frozen=True, slots=True)
class Topology:
    cpu_model: str | None
    cpu_vendor: str | None
    packages: tuple[Package, ...]
    nodes: tuple[NumaNode, ...]
    cores: tuple[Core, ...]
    l3_groups: tuple[L3Group, ...]
    online_cpus: tuple[int, ...]
    offline_cpus: tuple[int, ...]
    threads_per_core: int
    allowed_cpus: tuple[int, ...]
    allowed_node_ids: tuple[int, ...]
    cgroup_memory_limit_bytes: int | None
    isa_flags: tuple[str, ...]
    source: str
    notes: tuple[str, ...]
    # x86 "cpu family" and "model" from /proc/cpuinfo: they name the core (configs/core_families.csv)
    # where a VM hides the model name (this project's VM says only "AMD EPYC").
    cpu_family_id: int | None = None
    cpu_model_id: int | None = None
    # The first online CPU's own caches in bytes (L1 data, L1 instruction, L2): with the ISA flags
    # they tell the core family where a VM hides the model numbers too (cores.core_family).
    l1d_bytes: int | None = None
    l1i_bytes: int | None = None
    l2_bytes: int | None = None

    @property
    def smt_on(self) -> bool:
        return self.threads_per_core > 1

    @property
    def node_ids(self) -> tuple[int, ...]:
        return tuple(n.id for n in self.nodes)

    def node(self, node_id: int) -> NumaNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(f"no NUMA node {node_id} (nodes: {list(self.node_ids)})")

    def node_of_cpu(self, cpu: int) -> int | None:
        for n in self.nodes:
            if cpu in n.cpus:
                return n.id
        return None

    def core_of_cpu(self, cpu: int) -> Core | None:
        for c in self.cores:
            if cpu in c.cpus:
                return c
        return None

    def physical_cores_of_node(self, node_id: int) -> tuple[Core, ...]:
        return tuple(c for c in self.cores if c.node_id == node_id)

    def first_thread_per_core(self, cpus: Iterable[int] | None = None) -> tuple[int, ...]:
        """One CPU per physical core among `cpus` (default: the allowed CPUs), for pinning."""
        wanted = set(self.allowed_cpus if cpus is None else cpus)
        picked = []
        for c in self.cores:
            mine = [x for x in c.cpus if x in wanted]
            if mine:
                picked.append(mine[0])
        return tuple(sorted(picked))


# --------------------------------------------------------------------------------------------
# assembly shared by the sysfs reader and the hwloc XML importer


def small_int(text: str | None) -> int | None:
    """A cpuinfo number such as "25" or "0x19", or None when absent or not a small number."""
    try:
        v = int(str(text).strip(), 0)
    except (TypeError, ValueError):
        return None
    return v if 0 <= v < 4096 else None


def build_topology(
    *,
    cpu_model: str | None,
    cpu_vendor: str | None,
    cpu_family_id: int | None = None,
    cpu_model_id: int | None = None,
    online_cpus: Iterable[int],
    offline_cpus: Iterable[int],
    package_of: Mapping[int, int],
    core_id_of: Mapping[int, int | None],
    siblings_of: Mapping[int, Sequence[int]],
    l3_of: Mapping[int, Sequence[int]],
    l3_size_of: Mapping[int, int | None],
    nodes: Sequence[NumaNode],
    allowed_cpus: Iterable[int],
    allowed_node_ids: Iterable[int] | None,
    cgroup_memory_limit_bytes: int | None,
    isa_flags: Iterable[str],
    source: str,
    notes: Iterable[str] = (),
    l1d_bytes: int | None = None,
    l1i_bytes: int | None = None,
    l2_bytes: int | None = None,
) -> Topology:
    """Group per-CPU facts into cores, L3 groups and packages; every list is sorted."""
    online = tuple(sorted(set(online_cpus)))
    if len(online) > MAX_CPUS:
        raise TopologyError(f"the {source} topology lists {len(online)} online CPUs, more than "
                            f"{MAX_CPUS}", hint="check the file: no machine has that many CPUs")
    on = set(online)
    notes = list(notes)

    # Every CPU of a core (or an L3) usually hands in the very same sibling list; reading each
    # list object once keeps this linear (a 64k-CPU L3 is not read 64k times). The memo keeps
    # the objects themselves, so an id cannot be reused by a list made afresh.
    memo: dict[int, tuple[object, tuple[int, ...], frozenset[int]]] = {}

    def online_part(seq: Sequence[int]) -> tuple[tuple[int, ...], frozenset[int]]:
        hit = memo.get(id(seq))
        if hit is None:
            part = frozenset(seq) & on
            hit = memo[id(seq)] = (seq, tuple(sorted(part)), part)
        return hit[1], hit[2]

    # Cores: a CPU joins the core of the lowest CPU in its sibling set, so a set that one sibling
    # reports and another does not (offlined half of a pair) still yields one core per CPU.
    rep_of: dict[int, int] = {}
    for cpu in online:
        sibs = online_part(siblings_of.get(cpu, ()))[0]
        low = min(sibs[0], cpu) if sibs else cpu
        rep_of[cpu] = rep_of.get(low, low)
    groups: dict[int, list[int]] = {}
    for cpu in online:
        groups.setdefault(rep_of[cpu], []).append(cpu)

    # L3 groups: each CPU's L3 set plus itself; the distinct sets found by identity first (the
    # shared tuple), then by value, so no set is hashed once per member.
    l3_by_id: dict[int, tuple[int, ...]] = {}
    for c in online:
        if c in l3_of:
            cpus, part = online_part(l3_of[c])
            if c not in part:
                cpus = tuple(sorted(part | {c}))
            l3_by_id[id(cpus)] = cpus
    l3_sets = sorted(set(l3_by_id.values()))
    l3_index_of: dict[int, int] = {}
    l3_groups = []
    for i, cpus in enumerate(l3_sets):
        for c in cpus:
            l3_index_of.setdefault(c, i)
        l3_groups.append(L3Group(index=i, package_id=package_of.get(cpus[0], 0), cpus=cpus,
                                 size_bytes=l3_size_of.get(cpus[0])))

    node_of: dict[int, int] = {}
    for n in nodes:
        for c in n.cpus:
            node_of.setdefault(c, n.id)

    cores = []
    for i, rep in enumerate(sorted(groups)):
        cpus = tuple(groups[rep])
        cores.append(Core(index=i, package_id=package_of.get(rep, 0), core_id=core_id_of.get(rep),
                          node_id=node_of.get(rep), l3_index=l3_index_of.get(rep), cpus=cpus))

    cores_of: dict[int, list[Core]] = {}
    for c in cores:
        cores_of.setdefault(c.package_id, []).append(c)
    packages = []
    for pid in sorted(cores_of):
        mine = cores_of[pid]
        pcpus = tuple(sorted(x for c in mine for x in c.cpus))
        pnodes = tuple(sorted({c.node_id for c in mine if c.node_id is not None}))
        packages.append(Package(id=pid, cpus=pcpus, core_indexes=tuple(c.index for c in mine),
                                node_ids=pnodes))

    orphans = [c for c in online if c not in node_of]
    if nodes and orphans:
        notes.append(f"CPUs {_fmt(orphans)} belong to no online NUMA node")

    allowed = tuple(sorted(set(allowed_cpus) & on)) or online
    node_ids = tuple(n.id for n in nodes)
    allowed_nodes = node_ids if allowed_node_ids is None else tuple(
        sorted(set(allowed_node_ids) & set(node_ids))) or node_ids
    present = set(isa_flags)
    return Topology(
        cpu_model=cpu_model,
        cpu_vendor=cpu_vendor,
        cpu_family_id=cpu_family_id,
        cpu_model_id=cpu_model_id,
        packages=tuple(packages),
        nodes=tuple(nodes),
        cores=tuple(cores),
        l3_groups=tuple(l3_groups),
        online_cpus=online,
        offline_cpus=tuple(sorted(set(offline_cpus) - on)),
        threads_per_core=max((len(c.cpus) for c in cores), default=1),
        allowed_cpus=allowed,
        allowed_node_ids=allowed_nodes,
        cgroup_memory_limit_bytes=cgroup_memory_limit_bytes,
        isa_flags=tuple(f for f in ISA_FLAGS if f in present),
        source=source,
        notes=tuple(notes),
        l1d_bytes=_cache_size(l1d_bytes),
        l1i_bytes=_cache_size(l1i_bytes),
        l2_bytes=_cache_size(l2_bytes),
    )


def own_caches(t: Topology) -> dict[str, int | None]:
    """The first CPU's own cache sizes in bytes as core_family takes them (l1d, l1i, l2); a size
    outside 1 KiB-1 GiB (a damaged profile) counts as unknown."""
    return {"l1d": _cache_size(t.l1d_bytes), "l1i": _cache_size(t.l1i_bytes), "l2": _cache_size(t.l2_bytes)}


def _cache_size(v: int | None) -> int | None:
    """A per-core cache size in bytes, or None when absent or not a plausible one (1 KiB-1 GiB)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and (1 << 10) <= v <= (1 << 30) else None


def _fmt(cpus: Iterable[int]) -> str:
    return format_cpulist(cpus)


def merge_inconsistent_nodes(nodes: Sequence[NumaNode]) -> tuple[list[NumaNode], list[str]]:
    """Fold nodes that claim the very same CPUs into the lowest id, summing their memory.

    hwloc does the same with its `8em64t-2s2ca2c-buggynuma` tree ("Linux reports 8 NUMA nodes
    containing the (same) entire list of all cores, hence all of them get merged"; hwloc
    tests/hwloc/linux/8em64t-2s2ca2c-buggynuma.test). Memory-only nodes (no CPUs) never merge.
    """
    by_cpus: dict[tuple[int, ...], list[NumaNode]] = {}
    for n in nodes:
        by_cpus.setdefault(n.cpus if n.cpus else ("mem", n.id), []).append(n)  # type: ignore[arg-type]
    if all(len(v) == 1 for v in by_cpus.values()):
        notes = []
        seen: dict[int, int] = {}
        for n in nodes:
            for c in n.cpus:
                if c in seen:
                    notes.append(f"CPU {c} is listed in NUMA nodes {seen[c]} and {n.id}; "
                                 f"it is counted in node {seen[c]}")
                    break
                seen[c] = n.id
        return list(nodes), notes
    keep_ids = sorted(min(m.id for m in group) for group in by_cpus.values())
    out, notes = [], []
    for group in by_cpus.values():
        head = min(group, key=lambda m: m.id)
        ids = tuple(sorted(m.id for m in group))

        def total(attr: str) -> int | None:
            vals = [getattr(m, attr) for m in group]
            return None if any(v is None for v in vals) else sum(vals)

        row = head.distances
        if row and len(row) == len(nodes):
            pos = {m.id: i for i, m in enumerate(nodes)}
            row = tuple(head.distances[pos[k]] for k in keep_ids)
        else:
            row = ()
        out.append(NumaNode(id=head.id, cpus=head.cpus, mem_total_bytes=total("mem_total_bytes"),
                            mem_free_bytes=total("mem_free_bytes"), distances=row,
                            merged_node_ids=ids))
        if len(ids) > 1:
            notes.append(f"NUMA nodes {_fmt(ids)} all list CPUs {_fmt(head.cpus)}: an inconsistent "
                         f"firmware table, merged into node {head.id}")
    out.sort(key=lambda m: m.id)
    return out, notes


# --------------------------------------------------------------------------------------------
# /proc/cpuinfo


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """One dict per processor block of /proc/cpuinfo (keys as printed, values stripped)."""
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            cur[key.strip()] = value.strip()
    if cur:
        blocks.append(cur)
    return [b for b in blocks if "processor" in b]


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# cgroups: which CPUs, nodes and how much memory this process may use


@dataclass(frozen=True, slots=True)
class _CgroupPaths:
    v2: tuple[str, str] | None  # (mount point, path inside the hierarchy)
    cpuset_v1: tuple[str, str, bool] | None  # (mount, path, noprefix)
    memory_v1: tuple[str, str] | None


def _cgroup_paths(sr: SysRoot) -> _CgroupPaths:
    v2_mount = cpuset_mount = memory_mount = None
    noprefix = False
    for line in (sr.text("proc/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _, mnt, fstype, opts = parts[:4]
        optset = set(opts.split(","))
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = mnt
        elif fstype == "cgroup" and "cpuset" in optset:
            cpuset_mount, noprefix = mnt, "noprefix" in optset
        elif fstype == "cpuset":
            # The pre-cgroup cpuset filesystem names its files without the "cpuset." prefix
            # (Documentation/admin-guide/cgroup-v1/cpusets.rst, "noprefix").
            cpuset_mount, noprefix = mnt, True
        if fstype == "cgroup" and "memory" in optset:
            memory_mount = mnt
    v2_path = cpuset_path = memory_path = None
    # /proc/self/cgroup: "hierarchy:controllers:path"; "0::path" is the v2 hierarchy
    # (Documentation/admin-guide/cgroup-v2.rst, "Processes").
    for line in (sr.text("proc/self/cgroup") or "").splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            v2_path = path
        ctl = set(controllers.split(","))
        if "cpuset" in ctl:
            cpuset_path = path
        if "memory" in ctl:
            memory_path = path
    # Older kernels and hwloc's recorded trees only have /proc/self/cpuset (the cpuset's path).
    legacy = sr.text("proc/self/cpuset")
    if legacy:
        cpuset_path = cpuset_path or legacy
        v2_path = v2_path or legacy
    return _CgroupPaths(
        v2=(v2_mount, v2_path) if v2_mount and v2_path else None,
        cpuset_v1=(cpuset_mount, cpuset_path, noprefix) if cpuset_mount and cpuset_path else None,
        memory_v1=(memory_mount, memory_path) if memory_mount and memory_path else None,
    )


def _join(mount: str, path: str, name: str) -> str:
    return "/".join(p.strip("/") for p in (mount, path, name) if p.strip("/"))


def _cgroup_cpuset(sr: SysRoot, cg: _CgroupPaths) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    if cg.v2:
        mnt, path = cg.v2
        cpus = sr.cpulist(_join(mnt, path, "cpuset.cpus.effective"))
        mems = sr.cpulist(_join(mnt, path, "cpuset.mems.effective"))
        if cpus is not None:
            return cpus, mems
    if cg.cpuset_v1:
        mnt, path, noprefix = cg.cpuset_v1
        pre = "" if noprefix else "cpuset."
        for name in (f"{pre}effective_cpus", f"{pre}cpus"):
            cpus = sr.cpulist(_join(mnt, path, name))
            if cpus is not None:
                break
        mems = None
        for name in (f"{pre}effective_mems", f"{pre}mems"):
            mems = sr.cpulist(_join(mnt, path, name))
            if mems is not None:
                break
        return cpus, mems
    return None, None


# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712).
_V1_UNLIMITED = 1 << 62


def _cgroup_memory_limit(sr: SysRoot, cg: _CgroupPaths) -> int | None:
    """The smallest memory limit on the way from this process's cgroup up to the root."""
    limits = []
    for mount, path, name in (
        (*(cg.v2 or ("", "")), "memory.max"),
        (*(cg.memory_v1 or ("", "")), "memory.limit_in_bytes"),
    ):
        if not mount:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            t = sr.text(_join(mount, "/".join(parts[:depth]), name))
            if t and t != "max":
                value = _int_or_none(t)
                if value is not None and value < _V1_UNLIMITED:
                    limits.append(value)
    return min(limits) if limits else None


# --------------------------------------------------------------------------------------------
# sysfs reader


def _size_bytes(text: str | None) -> int | None:
    """Cache sizes as sysfs prints them: "32768K" (Documentation/ABI/testing/sysfs-devices-system-cpu)."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+)\s*([KMG]?)B?", text.strip(), re.I)
    if not m or len(m.group(1)) > 12:
        return None
    size = int(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    # 0 and sizes past any cache made (4 GiB, the bound the hwloc reader uses) are unknown, as
    # text sysfs never prints is: the core family and the L3 groups then come from elsewhere.
    return size if 0 < size <= MAX_CACHE_BYTES else None


def _own_caches(sr: SysRoot, cpu: int) -> dict[str, int | None]:
    """CPU `cpu`'s L1 data, L1 instruction and L2 sizes from its cache/index* directories."""
    out: dict[str, int | None] = {}
    for idx in sr.glob(f"{_CPU}/cpu{cpu}/cache/index*"):
        level, kind = sr.int(f"{idx}/level"), sr.text(f"{idx}/type") or ""
        key = {(1, "Data"): "l1d", (1, "Instruction"): "l1i", (2, "Unified"): "l2"}.get((level, kind.strip()))
        if key and key not in out:
            out[key] = _size_bytes(sr.text(f"{idx}/size"))
    return out


def _cpu_dirs(sr: SysRoot) -> list[int]:
    return sorted(int(d[3:]) for d in sr.listdir(_CPU) if re.fullmatch(r"cpu\d+", d))


def _online_cpus(sr: SysRoot, dirs: list[int]) -> tuple[int, ...]:
    # cpu/online is the kernel's own list (Documentation/ABI/testing/sysfs-devices-system-cpu) ...
    listed = sr.cpulist(f"{_CPU}/online")
    if listed is not None and listed:
        return listed
    # ... old kernels lack it: read each cpuN/online; a CPU without that file cannot be
    # unplugged and is online (Documentation/core-api/cpu_hotplug.rst).
    return tuple(c for c in dirs if sr.int(f"{_CPU}/cpu{c}/online", 1) == 1)


def _mask_or_list(sr: SysRoot, base: str, list_name: str, mask_name: str, must_hold: int | None = None):
    """A CPU set from NAME_list, else from the hex NAME mask (kernels before 2.6.2x had masks only).

    When `must_hold` is given, a list that does not contain that CPU is stale (a CPU always
    shares its own cache; hwloc's hand-edited 64fake tree has such lists) and the mask is used.
    """
    cpus = sr.cpulist(f"{base}/{list_name}") if list_name else None
    if cpus and (must_hold is None or must_hold in cpus):
        return cpus
    mask = sr.text(f"{base}/{mask_name}")
    if mask:
        return parse_cpumask(mask)
    return cpus or None


def _read_nodes(sr: SysRoot, online: tuple[int, ...], meminfo: dict[str, int]) -> tuple[list[NumaNode], list[str]]:
    ids = sorted(int(d[4:]) for d in sr.listdir(_NODE) if re.fullmatch(r"node\d+", d))
    if not ids:
        # No NUMA support compiled in, or a kernel too old to say: one node holds everything.
        return [NumaNode(id=0, cpus=online, mem_total_bytes=meminfo.get("MemTotal"),
                         mem_free_bytes=meminfo.get("MemFree"), distances=(10,),
                         merged_node_ids=(0,))], []
    on = set(online)
    nodes, notes = [], []
    for nid in ids:
        base = f"{_NODE}/node{nid}"
        # nodeN/cpulist, else the nodeN/cpumap mask; never the nodeN/cpuM links, which recorded
        # trees store as links to "." (hwloc fixtures README).
        cpus = _mask_or_list(sr, base, "cpulist", "cpumap") or ()
        mem = parse_meminfo(sr.text(f"{base}/meminfo") or "")
        words = (sr.text(f"{base}/distance") or "").split()
        # A row that is not all small whole numbers is unknown (dropped below), not a crash.
        row = tuple(int(x) for x in words) if all(is_ascii_int(x) and len(x) <= 6 for x in words) else ()
        nodes.append(NumaNode(id=nid, cpus=tuple(c for c in cpus if c in on),
                              mem_total_bytes=mem.get("MemTotal"), mem_free_bytes=mem.get("MemFree"),
                              distances=row, merged_node_ids=(nid,)))
    # The kernel prints one distance per online node, in id order (drivers/base/node.c,
    # node_read_distance) → a row as long as the highest id + 1, with the smallest value at the
    # node's own id, is indexed by id (a node online when the row was printed but absent now,
    # as in hwloc's offline-cpu0-node0 tree) → anything else cannot be mapped and is dropped.
    if any(n.distances and len(n.distances) != len(nodes) for n in nodes):
        by_id = all(len(n.distances) > ids[-1] and n.distances[n.id] == min(n.distances)
                    for n in nodes)
        if not by_id:
            notes.append("NUMA distance rows do not match the node count; distances ignored")
        nodes = [NumaNode(n.id, n.cpus, n.mem_total_bytes, n.mem_free_bytes,
                          tuple(n.distances[i] for i in ids) if by_id else (), n.merged_node_ids)
                 for n in nodes]
    nodes, merge_notes = merge_inconsistent_nodes(nodes)
    return nodes, notes + merge_notes


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo or nodeN/meminfo ("Node 0 MemTotal:  8386704 kB") as bytes by key."""
    out = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        key = key.split()[-1]
        vals = rest.split()
        if not vals or not is_ascii_int(vals[0]):
            continue
        mult = 1024 if len(vals) > 1 and vals[1].lower() == "kb" else 1
        out[key] = int(vals[0]) * mult
    return out


def discover_topology(root: Path | str = Path("/")) -> Topology:
    """Read the CPU/NUMA layout under `root` (the live machine, or an extracted sysfs tarball)."""
    sr = SysRoot(Path(root))
    if not sr.exists(_CPU):
        raise TopologyError(
            f"{root} is not a sysfs tree: it has no sys/devices/system/cpu",
            hint="give a folder holding sys/ and proc/ (e.g. an extracted hwloc tarball), or /",
        )
    dirs = _cpu_dirs(sr)
    online = _online_cpus(sr, dirs)
    if not online:
        # A Topology without CPUs would only fail later, in whatever divides by the core count.
        raise TopologyError(
            f"{root} has no online CPU under sys/devices/system/cpu (no cpu/online, no cpuN/)",
            hint="give a complete tree: extract the whole sysfs tarball, or use /",
        )
    present = sr.cpulist(f"{_CPU}/present") or tuple(dirs)
    blocks = parse_cpuinfo(sr.text("proc/cpuinfo") or "")
    info_of = {_int_or_none(b.get("processor")): b for b in blocks}
    first = blocks[0] if blocks else {}
    meminfo = parse_meminfo(sr.text("proc/meminfo") or "")

    package_of: dict[int, int] = {}
    core_id_of: dict[int, int | None] = {}
    siblings_of: dict[int, tuple[int, ...]] = {}
    l3_of: dict[int, tuple[int, ...]] = {}
    l3_size_of: dict[int, int | None] = {}
    by_cpuinfo_core: dict[tuple[str | None, str | None], list[int]] = {}
    for cpu in online:
        info = info_of.get(cpu, {})
        by_cpuinfo_core.setdefault((info.get("physical id"), info.get("core id")), []).append(cpu)
    for cpu in online:
        topo = f"{_CPU}/cpu{cpu}/topology"
        info = info_of.get(cpu, {})
        # physical_package_id (-1 on some firmware: no package info) → cpuinfo "physical id" → 0.
        pkg = sr.int(f"{topo}/physical_package_id")
        if pkg is None or pkg < 0:
            pkg = _int_or_none(info.get("physical id")) or 0
        package_of[cpu] = pkg
        core_id_of[cpu] = sr.int(f"{topo}/core_id", _int_or_none(info.get("core id")))
        # SMT siblings: core_cpus_list (Linux 5.6+, Documentation/admin-guide/cputopology.rst)
        # → thread_siblings_list, its deprecated name → thread_siblings, the hex mask of kernels
        # before lists existed → cpuinfo CPUs sharing "physical id" and "core id" → alone.
        sibs = (sr.cpulist(f"{topo}/core_cpus_list")
                or _mask_or_list(sr, topo, "thread_siblings_list", "thread_siblings"))
        if not sibs and info.get("core id") is not None:
            sibs = tuple(by_cpuinfo_core[(info.get("physical id"), info.get("core id"))])
        siblings_of[cpu] = tuple(sibs or (cpu,))
        # L3: the cache/indexN whose level is 3 (index numbering varies by CPU), from
        # shared_cpu_list, else the shared_cpu_map mask (Documentation/ABI/testing/sysfs-devices-system-cpu).
        for idx in sr.glob(f"{_CPU}/cpu{cpu}/cache/index*"):
            if sr.int(f"{idx}/level") == 3 and (sr.text(f"{idx}/type") or "Unified") != "Instruction":
                shared = _mask_or_list(sr, idx, "shared_cpu_list", "shared_cpu_map", must_hold=cpu)
                if shared:
                    l3_of[cpu] = shared
                    l3_size_of[cpu] = _size_bytes(sr.text(f"{idx}/size"))
                break

    own = _own_caches(sr, online[0]) if online else {}
    nodes, notes = _read_nodes(sr, online, meminfo)

    # Allowed CPUs: /proc/self/status (the live process's affinity, cgroup included)
    # → the cgroup cpuset files (recorded trees) → every online CPU.
    status = {}
    for line in (sr.text("proc/self/status") or "").splitlines():
        k, _, v = line.partition(":")
        status[k.strip()] = v.strip()
    cg = _cgroup_paths(sr)
    cg_cpus, cg_mems = _cgroup_cpuset(sr, cg)
    if "Cpus_allowed_list" in status:
        allowed = parse_cpulist(status["Cpus_allowed_list"])
    elif cg_cpus is not None:
        allowed = cg_cpus
    else:
        allowed = online
    if "Mems_allowed_list" in status:
        allowed_nodes = parse_cpulist(status["Mems_allowed_list"])
    else:
        allowed_nodes = cg_mems

    return build_topology(
        cpu_model=first.get("model name") or first.get("cpu model") or None,
        cpu_vendor=first.get("vendor_id") or first.get("CPU implementer") or None,
        cpu_family_id=small_int(first.get("cpu family")),
        cpu_model_id=small_int(first.get("model")),
        online_cpus=online,
        offline_cpus=set(present) - set(online),
        package_of=package_of,
        core_id_of=core_id_of,
        siblings_of=siblings_of,
        l3_of=l3_of,
        l3_size_of=l3_size_of,
        nodes=nodes,
        allowed_cpus=allowed,
        allowed_node_ids=allowed_nodes,
        cgroup_memory_limit_bytes=_cgroup_memory_limit(sr, cg),
        isa_flags=first.get("flags", "").split(),
        l1d_bytes=own.get("l1d"), l1i_bytes=own.get("l1i"), l2_bytes=own.get("l2"),
        source="sysfs",
        notes=notes,
    )
