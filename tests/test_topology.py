"""Topology from recorded machines: hwloc's sysfs tarballs (golden JSON, cross-checked against
hwloc's own reading of each tree), hwloc's lstopo XMLs of modern servers, and the live machine."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

from cputune.core import cores, sysfs
from cputune.core.errors import TopologyError
from cputune.machine.hwloc_xml import load_hwloc_xml, parse_hwloc_bitmap
from cputune.machine.memory import HugepagePool, discover_memory
from cputune.commands.report import plain
from cputune.core.sysfs import parse_cpulist, parse_cpumask
from cputune.machine.topology import (
    MAX_CPUS,
    NumaNode,
    Topology,
    build_topology,
    discover_topology,
    merge_inconsistent_nodes,
    own_caches,
    parse_cpuinfo,
    parse_meminfo,
)
from helpers import check_inside

FIXTURES = Path(__file__).parent / "fixtures"
SYSFS = FIXTURES / "sysfs"
HWLOC = FIXTURES / "hwloc"
TREES = sorted(p.name.removesuffix(".tar.bz2") for p in SYSFS.glob("*.tar.bz2"))
CONSOLES = sorted(p.stem for p in SYSFS.glob("*.console"))
XMLS = sorted(p.stem for p in HWLOC.glob("*.xml"))
GiB, MiB, KiB = 1 << 30, 1 << 20, 1 << 10


@pytest.mark.parametrize("kind, name, link, ok", [
    (tarfile.SYMTYPE, "t/sys/devices/system/node/node0/cpu0", ".", True),
    (tarfile.SYMTYPE, "t/sys/class/dmi/id/subsystem", "../../../../class/dmi", True),
    (tarfile.SYMTYPE, "t/sys/class/dmi/id/subsystem", "../../../../../../etc", False),
    (tarfile.SYMTYPE, "t/proc/self", "/proc/self", False),
    (tarfile.REGTYPE, "../evil", "", False),
    (tarfile.REGTYPE, "/etc/passwd", "", False),
    (tarfile.LNKTYPE, "t/a", "t/b", True),
    (tarfile.LNKTYPE, "t/a", "../b", False),
])
def test_extraction_stays_inside_the_tree(kind, name, link, ok):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    if ok:
        check_inside(member)
    else:
        with pytest.raises(ValueError, match="leaves the extracted tree"):
            check_inside(member)


def test_fixture_set_is_complete():
    assert len(TREES) == 9 and len(CONSOLES) == 7 and len(XMLS) == 5
    assert (SYSFS / "COPYING").is_file() and (HWLOC / "COPYING").is_file()


@lru_cache(maxsize=None)
def _topology_of_tree(root: Path) -> Topology:
    return discover_topology(root)


@pytest.fixture(scope="session")
def topo(sysfs_tree):
    return lambda name: _topology_of_tree(sysfs_tree(name))


@lru_cache(maxsize=None)
def xml_topology(name: str) -> Topology:
    return load_hwloc_xml(HWLOC / f"{name}.xml")


# --------------------------------------------------------------------------------------------
# golden files (hwloc's way: CPUTUNE_UPDATE_GOLDEN=1 rewrites them; review the diff)


def _dump(value) -> str:
    text = json.dumps(value, indent=2)
    # Lists of numbers or strings on one line, so a 384-CPU machine stays readable in a diff.
    # Only the layout's own newlines are touched: JSON strings cannot hold a raw newline.
    return re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]",
                  lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text) + "\n"


def check_golden(path: Path, value) -> None:
    if os.environ.get("CPUTUNE_UPDATE_GOLDEN") == "1":
        path.write_text(_dump(value))
    if not path.exists():
        pytest.fail(f"no golden file {path.name}: run with CPUTUNE_UPDATE_GOLDEN=1, then review it")
    assert json.loads(_dump(value)) == value  # the layout itself must not change a value
    assert value == json.loads(path.read_text()), f"differs from {path.name}"


@pytest.mark.parametrize("name", TREES)
def test_sysfs_golden(topo, name):
    check_golden(SYSFS / f"{name}.topology.json", plain(topo(name)))


@pytest.mark.parametrize("name", XMLS)
def test_xml_golden(name):
    check_golden(HWLOC / f"{name}.topology.json", plain(xml_topology(name)))


# --------------------------------------------------------------------------------------------
# hwloc's own reading (NAME.console, lstopo's text output) as an independent truth


@dataclass
class HwlocObj:
    type: str
    os_index: int | None
    attrs: str
    parent: HwlocObj | None = None
    children: list[HwlocObj] = field(default_factory=list)

    def pus(self) -> frozenset[int]:
        if self.type == "PU":
            return frozenset({self.os_index})
        return frozenset().union(*(c.pus() for c in self.children))


_OBJ = re.compile(
    r"^(?P<indent>\s*)(?P<type>\w+) L#\d+(?: \((?:P#(?P<os>\d+))?\s*(?P<attrs>.*)\))?$")
_SIZE = re.compile(r"\bsize=(\d+)(KiB|MiB|GiB)\b")


def read_console(name: str) -> tuple[str, HwlocObj]:
    """The console text and its object tree (by indentation), rooted at the Machine."""
    text = (SYSFS / f"{name}.console").read_text()
    machine = HwlocObj("Machine", 0, "")
    stack: list[tuple[int, HwlocObj]] = [(-1, machine)]
    for line in text.splitlines():
        m = _OBJ.match(line)
        if not m:
            continue
        indent = len(m.group("indent"))
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        obj = HwlocObj(m.group("type"), int(m.group("os")) if m.group("os") else None,
                       m.group("attrs") or "", parent)
        parent.children.append(obj)
        stack.append((indent, obj))
    return text, machine


def _walk(obj: HwlocObj):
    yield obj
    for c in obj.children:
        yield from _walk(c)


@pytest.mark.parametrize("name", CONSOLES)
def test_counts_match_hwloc_console(topo, name):
    text, _ = read_console(name)
    t = topo(name)

    def count(kind: str) -> int:
        return len(re.findall(rf"^\s*{kind} L#", text, re.M))

    assert count("Package") == len(t.packages)
    assert count("NUMANode") == len(t.nodes)
    assert count("Core") == len(t.cores)
    assert count("PU") == len(t.online_cpus)
    assert count("L3Cache") == len(t.l3_groups)


@pytest.mark.parametrize("name", CONSOLES)
def test_layout_matches_hwloc_console(topo, name):
    """Beyond counts: which PU sits in which package, core, L3 and NUMA node; which are offline."""
    text, machine = read_console(name)
    t = topo(name)
    objs = list(_walk(machine))
    assert {o.os_index for o in objs if o.type == "PU"} == set(t.online_cpus)
    assert {o.os_index: o.pus() for o in objs if o.type == "Package"} == \
        {p.id: frozenset(p.cpus) for p in t.packages}
    assert {o.pus() for o in objs if o.type == "Core"} == {frozenset(c.cpus) for c in t.cores}
    # hwloc 2 hangs a NUMA node under the object whose CPUs it holds.
    assert {o.os_index: o.parent.pus() for o in objs if o.type == "NUMANode"} == \
        {n.id: frozenset(n.cpus) for n in t.nodes}
    l3 = set()
    for o in objs:
        if o.type == "L3Cache":
            num, unit = _SIZE.search(o.attrs).groups()
            l3.add((o.pus(), int(num) * {"KiB": KiB, "MiB": MiB, "GiB": GiB}[unit]))
    assert l3 == {(frozenset(g.cpus), g.size_bytes) for g in t.l3_groups}
    m = re.search(r"^\d+ processors not represented in topology: (\S+)", text, re.M)
    mask = int(m.group(1).replace(",", "").replace("0x", ""), 16) if m else 0
    assert {i for i in range(mask.bit_length()) if mask >> i & 1} == set(t.offline_cpus)


# --------------------------------------------------------------------------------------------
# the interesting trees, by hand


def test_offline_cpus_and_half_offline_smt_pairs(topo):
    t = topo("16em64t-4s2c2t-offlines")
    assert t.offline_cpus == (2, 5, 13, 14)
    assert t.online_cpus == (0, 1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 15)
    # SMT siblings are N and N+8; a core whose other thread is offline keeps one CPU.
    assert [c.cpus for c in t.cores] == [(0, 8), (1, 9), (3, 11), (4, 12), (6,), (7, 15), (10,)]
    assert t.core_of_cpu(8).cpus == (0, 8)
    assert t.threads_per_core == 2 and t.smt_on
    assert {p.id: p.cpus for p in t.packages} == {
        0: (0, 4, 8, 12), 1: (1, 9), 2: (6, 10), 3: (3, 7, 11, 15)}
    # 6 and 10 share package 2 but not a core (core_id 1 and 0): one pinning slot each.
    assert t.first_thread_per_core() == (0, 1, 3, 4, 6, 7, 10)
    assert [g.size_bytes for g in t.l3_groups] == [4 * MiB] * 4
    assert t.node_ids == (0,) and t.nodes[0].cpus == t.online_cpus


def test_all_online_twin_of_the_offlines_tree(topo):
    t = topo("16em64t-4s2c2t")
    assert t.offline_cpus == () and len(t.online_cpus) == 16
    assert [c.cpus for c in t.cores] == [(n, n + 8) for n in range(8)]
    assert t.first_thread_per_core() == tuple(range(8))


def test_cgroup2_cpuset_restricts_allowed_cpus(sysfs_tree, topo):
    root = sysfs_tree("32amd64-4s2n4c-cgroup2")
    t = topo("32amd64-4s2n4c-cgroup2")
    # The tree's own files: /proc/self/cpuset names the cgroup, mounted at /cgroup/unified (v2).
    cg = (root / "proc/self/cpuset").read_text().strip()
    assert cg == "/uid_2008/job_15389/step_0"
    assert "none /cgroup/unified cgroup2 rw 0 0" in (root / "proc/mounts").read_text()
    step = root / "cgroup/unified" / cg.lstrip("/")
    assert (step / "cpuset.cpus.effective").read_text().strip() == "0-5"
    assert (step / "cpuset.mems.effective").read_text().strip() == "0-5"

    assert t.online_cpus == tuple(range(32))
    assert t.allowed_cpus == (0, 1, 2, 3, 4, 5)
    assert t.allowed_node_ids == (0, 1, 2, 3, 4, 5)
    assert t.first_thread_per_core() == (0, 1, 2, 3, 4, 5)
    # 4 sockets x 2 nodes x 4 cores, no SMT; the memory cgroup is v1 but this process's path in
    # it is not recorded, so no limit is claimed.
    assert len(t.packages) == 4 and len(t.nodes) == 8 and len(t.cores) == 32
    assert t.threads_per_core == 1
    assert t.cgroup_memory_limit_bytes is None


def test_sparse_node_ids(topo):
    t = topo("48amd64-4pa2n6c-sparse")
    assert t.node_ids == (0, 1, 2, 33, 34, 45, 72, 73)
    assert [n.cpus for n in t.nodes] == [tuple(range(6 * i, 6 * i + 6)) for i in range(8)]
    assert {p.id: p.node_ids for p in t.packages} == {
        0: (0, 1), 1: (2, 33), 2: (34, 45), 3: (72, 73)}
    assert t.node_of_cpu(18) == 33 and t.node(73).cpus == tuple(range(42, 48))
    assert [c.cpus[0] for c in t.physical_cores_of_node(33)] == list(range(18, 24))
    with pytest.raises(KeyError, match="no NUMA node 3"):
        t.node(3)
    # SLIT rows are aligned with t.nodes (positions, not ids): 10 on the diagonal, symmetric.
    d = [n.distances for n in t.nodes]
    assert all(len(row) == 8 for row in d)
    assert all(d[i][i] == 10 for i in range(8))
    assert all(d[i][j] == d[j][i] for i in range(8) for j in range(8))
    assert t.node(33).distances == (22, 16, 16, 10, 16, 16, 22, 22)
    assert t.notes == ()


def test_buggy_numa_table_is_merged_into_one_node(sysfs_tree, topo):
    root = sysfs_tree("8em64t-2s2ca2c-buggynuma")
    t = topo("8em64t-2s2ca2c-buggynuma")
    # The kernel lists 8 nodes, each claiming all 8 CPUs (hwloc merges them the same way).
    for i in range(8):
        assert (root / f"sys/devices/system/node/node{i}/cpulist").read_text().strip() == "0-7"
    (node,) = t.nodes
    assert node.id == 0 and node.merged_node_ids == tuple(range(8))
    assert node.cpus == tuple(range(8)) and node.distances == (10,)
    # Memory is summed over the merged nodes; the sum is read here from the tree's own files.
    node_dir = root / "sys/devices/system/node"
    total = sum(parse_meminfo((node_dir / f"node{i}/meminfo").read_text())["MemTotal"]
                for i in range(8))
    assert node.mem_total_bytes == total == 16775724 * KiB
    assert t.notes == ("NUMA nodes 0-7 all list CPUs 0-7: an inconsistent firmware table, "
                       "merged into node 0",)
    assert t.allowed_node_ids == (0,)
    assert {p.id: p.cpus for p in t.packages} == {0: (0, 2, 4, 6), 1: (1, 3, 5, 7)}


def test_offline_cpu0_and_offline_node0(topo):
    t = topo("offline-cpu0-node0")
    assert t.offline_cpus == (0, 1, 2, 3, 21, 22, 23)
    assert t.online_cpus == tuple(range(4, 21))
    assert t.node_ids == (1,)
    # node1/distance is "21 10": a row printed while node 0 was online, indexed by node id.
    assert t.nodes[0].distances == (10,)
    assert t.nodes[0].cpus == tuple(range(5, 20, 2))
    assert {p.id: p.node_ids for p in t.packages} == {0: (), 1: (1,)}
    assert t.packages[0].cpus == tuple(range(4, 21, 2))
    assert t.core_of_cpu(4).node_id is None and t.node_of_cpu(4) is None
    assert t.notes == ("CPUs 4,6,8,10,12,14,16,18,20 belong to no online NUMA node",)
    assert t.cpu_model == "Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz"
    assert t.isa_flags == ("avx2", "fma", "f16c")  # Haswell: no AVX-512
    assert [g.size_bytes for g in t.l3_groups] == [30 * MiB] * 2


def test_hugepage_pools_of_a_recorded_tree(sysfs_tree, topo):
    root = sysfs_tree("2i386-2t-hugepagesizecount")
    m = discover_memory(root)
    # hwloc edited this tree to a 16 GiB page size (more than 32 bits of bytes) to catch overflow.
    assert m.hugepages == (
        HugepagePool(node_id=None, page_bytes=2048 * KiB, total_pages=1, free_pages=0),
        HugepagePool(node_id=None, page_bytes=16777216 * KiB, total_pages=1, free_pages=0),
    )
    assert m.hugepages[1].page_bytes == 16 * GiB
    assert m.mem_total_bytes == 400016779264 * KiB
    assert m.nodes == ()  # no sys/devices/system/node in this tree
    t = topo("2i386-2t-hugepagesizecount")
    # Without node folders the whole machine is one node holding /proc/meminfo's memory.
    assert t.node_ids == (0,) and t.nodes[0].mem_total_bytes == m.mem_total_bytes
    assert [c.cpus for c in t.cores] == [(0, 1)] and t.threads_per_core == 2


def test_fake_tree_without_proc(topo):
    t = topo("64fake-4n2s2ca2c2t")
    assert t.cpu_model is None and t.isa_flags == ()
    assert len(t.packages) == 8 and len(t.cores) == 32 and t.threads_per_core == 2
    assert [n.cpus for n in t.nodes] == [tuple(range(16 * i, 16 * i + 16)) for i in range(4)]
    assert all(n.mem_total_bytes == GiB and n.distances == () for n in t.nodes)
    assert t.core_of_cpu(4).cpus == (0, 4)


# --------------------------------------------------------------------------------------------
# lstopo XMLs of modern servers

@dataclass(frozen=True)
class Box:
    model: str
    packages: int
    cores: int
    pus: int
    threads_per_core: int
    l3_groups: int
    l3_bytes: int
    pus_per_l3: int
    sibling_of_pu0: int | None


XML_EXPECTED = {
    "AMD-19h-Zen4-2xEpyc-9654": Box(
        "AMD EPYC 9654 96-Core Processor", packages=2, cores=192, pus=384, threads_per_core=2,
        l3_groups=24, l3_bytes=32 * MiB, pus_per_l3=16, sibling_of_pu0=192),
    # This dump has no SMT siblings: 128 PUs on 128 cores.
    "AMD-19h-Zen3-2xEpyc-7763": Box(
        "AMD EPYC 7763 64-Core Processor", packages=2, cores=128, pus=128, threads_per_core=1,
        l3_groups=16, l3_bytes=32 * MiB, pus_per_l3=8, sibling_of_pu0=None),
    # Zen 1: four dies of two 3-core CCXs per socket, 8 MiB of L3 per CCX.
    "AMD-17h-Zen-2xEpyc-7451": Box(
        "AMD EPYC 7451 24-Core Processor", packages=2, cores=48, pus=96, threads_per_core=2,
        l3_groups=16, l3_bytes=8 * MiB, pus_per_l3=6, sibling_of_pu0=48),
    "Intel-CascadeLake-2xXeon6230": Box(
        "Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz", packages=2, cores=40, pus=80,
        threads_per_core=2, l3_groups=2, l3_bytes=int(27.5 * MiB), pus_per_l3=40,
        sibling_of_pu0=40),
    "Intel-SapphireRapids-2xXeonMax9460": Box(
        "Intel (R) Xeon (R) CPU Max 9460", packages=2, cores=80, pus=160, threads_per_core=2,
        l3_groups=2, l3_bytes=int(97.5 * MiB), pus_per_l3=80, sibling_of_pu0=80),
}


def test_every_xml_has_expectations():
    assert sorted(XML_EXPECTED) == XMLS


@pytest.mark.parametrize("name", XMLS)
def test_xml_layout(name):
    want = XML_EXPECTED[name]
    t = xml_topology(name)
    assert t.cpu_model == want.model and t.source == "hwloc-xml"
    assert len(t.packages) == want.packages and len(t.cores) == want.cores
    assert len(t.online_cpus) == want.pus and t.threads_per_core == want.threads_per_core
    assert all(len(p.core_indexes) == want.cores // want.packages for p in t.packages)
    assert len(t.l3_groups) == want.l3_groups
    assert {(len(g.cpus), g.size_bytes) for g in t.l3_groups} == {(want.pus_per_l3, want.l3_bytes)}
    per_package = [len([g for g in t.l3_groups if g.package_id == p.id]) for p in t.packages]
    assert per_package == [want.l3_groups // want.packages] * want.packages
    sib = want.sibling_of_pu0
    assert t.core_of_cpu(0).cpus == ((0,) if sib is None else (0, sib))
    # A CPUID dump carries no NUMA data: one node holds every PU.
    assert t.node_ids == (0,) and t.nodes[0].cpus == t.online_cpus
    assert t.offline_cpus == () and t.allowed_cpus == t.online_cpus and t.notes == ()


def test_epyc_9654_smt_numbering():
    t = xml_topology("AMD-19h-Zen4-2xEpyc-9654")
    # PUs 0-191 are the first threads, 192-383 their SMT siblings, socket 0 first.
    assert all(c.cpus == (c.index, c.index + 192) for c in t.cores)
    assert t.first_thread_per_core() == tuple(range(192))
    assert t.packages[0].cpus == tuple(range(96)) + tuple(range(192, 288))
    assert t.l3_groups[0].cpus == tuple(range(8)) + tuple(range(192, 200))
    assert t.cpu_vendor == "AuthenticAMD"


@pytest.mark.parametrize("name", XMLS)
def test_xml_matches_its_own_object_tree(name):
    """The importer against a direct walk of the XML: PUs per package, core and L3."""
    root = ET.parse(HWLOC / f"{name}.xml").getroot()
    t = xml_topology(name)

    def pus(elem) -> frozenset[int]:
        return frozenset(int(e.get("os_index")) for e in elem.iter("object")
                         if e.get("type") == "PU")

    objs = list(root.iter("object"))
    assert {int(e.get("os_index")): pus(e) for e in objs if e.get("type") == "Package"} == \
        {p.id: frozenset(p.cpus) for p in t.packages}
    assert {pus(e) for e in objs if e.get("type") == "Core"} == {frozenset(c.cpus) for c in t.cores}
    assert {(pus(e), int(e.get("cache_size"))) for e in objs if e.get("type") == "L3Cache"} == \
        {(frozenset(g.cpus), g.size_bytes) for g in t.l3_groups}
    # parse_hwloc_bitmap against every PU's and core's own cpuset attribute.
    for e in objs:
        if e.get("type") == "PU":
            assert parse_hwloc_bitmap(e.get("cpuset")) == (int(e.get("os_index")),)
        elif e.get("type") == "Core":
            assert parse_hwloc_bitmap(e.get("cpuset")) == tuple(sorted(pus(e)))


@pytest.mark.parametrize("text, cpus", [
    ("0x00000001", (0,)),
    ("0x0000fff0,0x0", tuple(range(36, 48))),  # the high chunk comes first
    ("0x00000001,,,,,,0x0", (192,)),           # an empty chunk is zero
    ("0xffffffff", tuple(range(32))),
    ("0x0", ()),
])
def test_parse_hwloc_bitmap(text, cpus):
    assert parse_hwloc_bitmap(text) == cpus


@pytest.mark.parametrize("text", ["0xf...f", "0xf...f,0x00000003", None])
def test_parse_hwloc_bitmap_infinite_or_missing(text):
    assert parse_hwloc_bitmap(text) is None


_PU = "<object type='PU' os_index='0'/>"


def _box(inner: str = _PU, machine: str = "", after: str = "") -> str:
    return f"<topology><object type='Machine' {machine}>{inner}</object>{after}</topology>"


def _node(attrs: str) -> str:
    return f"<object type='NUMANode' {attrs}/>"


_NODE0 = _node("os_index='0' cpuset='0x1'")
_NODES01 = _node("os_index='0' cpuset='0x1'") + _node("os_index='1' cpuset='0x2'") + \
    "<object type='PU' os_index='0'/><object type='PU' os_index='1'/>"


def _dist2(indexes: str = "0 1", values: str = "10 20 20 10") -> str:
    return (f"<distances2 type='NUMANode' nbobjs='2' kind='5' indexing='os'><indexes length='3'>{indexes}"
            f"</indexes><u64values length='11'>{values}</u64values></distances2>")


def _dist1(base: str = "10", values: tuple[str, ...] = ("1", "2.1", "2.1", "1")) -> str:
    lat = "".join(f"<latency value='{v}'/>" for v in values)
    return f"<distances nbobjs='2' relative_depth='1' latency_base='{base}'>{lat}</distances>"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read hwloc XML"),
    ("<topology", "cannot read hwloc XML"),
    ("<lstopo><object type='Machine'/></lstopo>", "is not an hwloc topology"),
    ("<topology><object type='Machine'><object type='Package' os_index='0'/></object></topology>",
     "lists no PU objects"),
    # every id and size is a whole number in range, else one error naming attribute and value
    (_box(f"<object type='Package' os_index='x'><object type='Core'>{_PU}</object></object>"),
     "Package object has os_index='x'"),
    (_box(f"<object type='Core' os_index='1.5'>{_PU}</object>"), "Core object has os_index='1.5'"),
    (_box("<object type='PU' os_index='x'/>"), "PU object has os_index='x'"),
    (_box("<object type='PU' os_index='-1'/>"), "PU object has os_index='-1'"),
    (_box(f"<object type='PU' os_index='{10**30}'/>"), f"PU object has os_index='{10**30}'"),
    (_box("<object type='PU' os_index='65536'/>"), "os_index='65536', which is not a whole number from 0 to 65535"),
    (_box(_node("os_index='x'") + _PU), "NUMANode object has os_index='x'"),
    (_box(_node("os_index='-5'") + _PU), "NUMANode object has os_index='-5'"),
    (_box(_node("os_index='1024'") + _PU), "NUMANode object has os_index='1024'"),
    (_box(_node("os_index='0'") + _node("os_index='0'") + _PU), "two NUMANode objects have os_index=0"),
    (_box(_node("os_index='0' local_memory='-1'") + _PU), "os_index='0' has local_memory='-1'"),
    (_box(_node("os_index='0' local_memory='x'") + _PU), "local_memory='x'"),
    (_box(_node(f"os_index='0' local_memory='{1 << 60}'") + _PU), f"local_memory='{1 << 60}'"),
    # cache sizes: a whole number of bytes up to 4 GiB, on every cache object
    (_box(f"<object type='L3Cache' cache_size='-1'>{_PU}</object>"),
     "L3Cache object has cache_size='-1', which is not a whole number from 0 to 4294967296"),
    (_box(f"<object type='L3Cache' cache_size='32MB'>{_PU}</object>"), "L3Cache object has cache_size='32MB'"),
    (_box(f"<object type='L3Cache' cache_size='{10**15}'>{_PU}</object>"), f"cache_size='{10**15}'"),
    (_box(f"<object type='L2Cache' cache_size='1e6'>{_PU}</object>"), "L2Cache object has cache_size='1e6'"),
    (_box(f"<object type='Cache' depth='1' cache_type='2' cache_size='x'>{_PU}</object>"),
     "Cache object has cache_size='x'"),
    (_box(f"<object type='L1Cache' cache_size='32768'>{_PU}</object>"
          "<object type='L1Cache' cache_size='nan'><object type='PU' os_index='1'/></object>"),
     "L1Cache object has cache_size='nan'"),
    # bitmaps: hex chunks of at most 32 bits, no id at or above the cap
    (_box(_node("os_index='0' cpuset='0xq'") + _PU), "NUMANode object with os_index='0' has cpuset='0xq'"),
    (_box(_node("os_index='0' cpuset='0x123456789'") + _PU), "cpuset='0x123456789'"),
    (_box(machine="allowed_nodeset='0xq'"), "Machine object has allowed_nodeset='0xq'"),
    (_box(machine="allowed_nodeset='0x1,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,"
                  "0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0,0x0'"),
     "allowed_nodeset=.*sets bit 1024"),
    (_box(machine="allowed_cpuset='0x1" + ",0x0" * 2048 + "'"), "allowed_cpuset=.*sets bit 65536"),
    (_box(machine="complete_cpuset='0x-1'"), "complete_cpuset='0x-1'"),
    # NUMA distances: hwloc 2's u64 matrix and hwloc 1's float latencies times a base
    (_box(_NODES01, after=_dist2(values="10 x 20 10")), "<distances2> has u64values='x'"),
    (_box(_NODES01, after=_dist2(values="10 -20 20 10")), "u64values='-20'"),
    (_box(_NODES01, after=_dist2(indexes="0 -1")), "<distances2> has indexes='-1'"),
    (_box(_NODES01, after=_dist1(base="nan")), "<distances> has latency_base='nan'"),
    (_box(_NODES01, after=_dist1(base="0")), "latency_base='0'"),
    (_box(_NODES01, after=_dist1(values=("1", "inf", "2", "1"))), "latency has value='inf'"),
    (_box(_NODES01, after=_dist1(values=("1", "x", "2", "1"))), "latency has value='x'"),
    (_box(_NODES01, after=_dist1(values=("1", "-2", "2", "1"))), "latency has value='-2'"),
    (_box(_NODES01, after=_dist1(values=("1", "1e300", "2", "1"))), "latency_base='10'"),
    # a tree far deeper than lstopo writes: refused, not a RecursionError
    (_box("<object type='Group'>" * 5000 + _PU + "</object>" * 5000), "nested more than 256 deep"),
])
def test_bad_hwloc_xml(tmp_path, content, message):
    path = tmp_path / "box.xml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TopologyError, match=message) as exc:
        load_hwloc_xml(path)
    assert exc.value.hint and "lstopo" in exc.value.hint
    assert str(path) in exc.value.message and "\n" not in exc.value.message


def test_hwloc_xml_reads_good_values_around_the_checks(tmp_path):
    # The checks keep what real files hold: a deep-ish tree, memory sizes, both distance formats.
    path = tmp_path / "box.xml"
    path.write_text(_box("<object type='Group'>" * 200 + _node("os_index='0' cpuset='0x1' local_memory='0'")
                         + _PU + "</object>" * 200))
    t = load_hwloc_xml(path)
    assert t.online_cpus == (0,) and t.nodes[0].mem_total_bytes == 0
    for after, rows in ((_dist2(), ((10, 20), (20, 10))), (_dist1(), ((10, 21), (21, 10)))):
        path.write_text(_box(_NODES01, after=after))
        assert tuple(n.distances for n in load_hwloc_xml(path).nodes) == rows


def test_hwloc_cache_sizes_around_the_checks(tmp_path):
    path = tmp_path / "box.xml"
    path.write_text(_box(f"<object type='L3Cache' cache_size='{1 << 32}'><object type='L2Cache' cache_size='0'>"
                         f"<object type='L1Cache' cache_size=' 49152 '>{_PU}</object></object></object>"))
    t = load_hwloc_xml(path)
    assert t.l3_groups[0].size_bytes == 1 << 32 and t.l2_bytes is None and t.l1d_bytes == 49152


def test_hwloc_huge_cpuset_is_refused_at_once(tmp_path):
    # 1.1 MB of all-ones chunks: once a quadratic bigint shift, now one linear pass and the cap.
    path = tmp_path / "box.xml"
    path.write_text(_box(_node("os_index='0' cpuset='" + ",".join(["0xffffffff"] * 100_000) + "'") + _PU))
    with pytest.raises(TopologyError, match="cpuset=.*at or above the limit of 65536"):
        load_hwloc_xml(path)


def test_hwloc_nodes_claiming_all_cpus_many_times_are_refused(tmp_path):
    full = "0x1" + ",0xffffffff" * 2047  # ids 0..65504: under the CPU cap, but 1024 nodes of them
    path = tmp_path / "box.xml"
    path.write_text(_box("".join(_node(f"os_index='{i}' cpuset='{full}'") for i in range(1024)) + _PU))
    with pytest.raises(TopologyError, match="NUMANode cpusets list more than 1048576 CPUs"):
        load_hwloc_xml(path)


def test_hwloc_more_pus_than_the_cap_are_refused(tmp_path):
    path = tmp_path / "box.xml"
    path.write_text(_box("".join(f"<object type='PU' os_index='{i}'/>" for i in range(200_000))))
    with pytest.raises(TopologyError, match="PU object has os_index='65536'"):
        load_hwloc_xml(path)


def test_one_core_and_l3_of_16k_pus_groups_in_linear_time(tmp_path):
    # Every PU of a core or L3 shares one member list; grouping used to copy it once per PU
    # (16,000 PUs took 25 s). Now each list is read once.
    n = 16_384
    pus = "".join(f"<object type='PU' os_index='{i}'/>" for i in range(n))
    path = tmp_path / "box.xml"
    path.write_text(_box(f"<object type='Package' os_index='3'><object type='L3Cache' cache_size='1024'>"
                         f"<object type='Core' os_index='0'>{pus}</object></object></object>"))
    t = load_hwloc_xml(path)
    assert len(t.online_cpus) == n and len(t.cores) == 1 and len(t.cores[0].cpus) == n
    assert [g.cpus for g in t.l3_groups] == [tuple(range(n))] and t.packages[0].id == 3


def test_build_topology_refuses_more_cpus_than_the_cap():
    n = MAX_CPUS + 1
    with pytest.raises(TopologyError, match=f"lists {n} online CPUs, more than {MAX_CPUS}"):
        build_topology(cpu_model=None, cpu_vendor=None, online_cpus=range(n), offline_cpus=(),
                       package_of={}, core_id_of={}, siblings_of={}, l3_of={}, l3_size_of={},
                       nodes=(), allowed_cpus=(), allowed_node_ids=None,
                       cgroup_memory_limit_bytes=None, isa_flags=(), source="sysfs")


@pytest.mark.parametrize("text, message", [
    ("0xq", "'q' is not a chunk"),
    ("0x123456789", "at most 8 hex digits"),
    ("0x1" + ",0x0" * 2048, "sets bit 65536"),
    (",".join(["0xffffffff"] * 100_000), "sets bit 3199999"),
])
def test_parse_hwloc_bitmap_refuses(text, message):
    with pytest.raises(ValueError, match=message):
        parse_hwloc_bitmap(text)


def test_parse_hwloc_bitmap_is_linear_in_leading_zero_chunks():
    assert parse_hwloc_bitmap("0x0," * 200_000 + "0x80000001") == (0, 31)
    assert parse_hwloc_bitmap("0x1,0x0", limit=33) == (32,)


# --------------------------------------------------------------------------------------------
# pure helpers


def test_merge_inconsistent_nodes_folds_identical_cpu_sets():
    def node(i, cpus, mem, row):
        return NumaNode(id=i, cpus=cpus, mem_total_bytes=mem, mem_free_bytes=None,
                        distances=row, merged_node_ids=(i,))

    nodes = [node(0, (0, 1), 4 * GiB, (10, 10, 20, 30)),
             node(1, (0, 1), 4 * GiB, (10, 10, 20, 30)),
             node(2, (2, 3), 8 * GiB, (20, 20, 10, 30)),
             node(3, (), 16 * GiB, (30, 30, 30, 10))]  # memory-only (CXL, HBM): never merged
    merged, notes = merge_inconsistent_nodes(nodes)
    assert [(n.id, n.merged_node_ids, n.mem_total_bytes) for n in merged] == [
        (0, (0, 1), 8 * GiB), (2, (2,), 8 * GiB), (3, (3,), 16 * GiB)]
    # Rows keep the columns of the surviving ids 0, 2, 3.
    assert [n.distances for n in merged] == [(10, 20, 30), (20, 10, 30), (30, 30, 10)]
    assert notes == ["NUMA nodes 0-1 all list CPUs 0-1: an inconsistent firmware table, "
                     "merged into node 0"]


def test_merge_inconsistent_nodes_only_notes_a_partial_overlap():
    nodes = [NumaNode(0, (0, 1), None, None, (), (0,)), NumaNode(1, (1, 2), None, None, (), (1,))]
    merged, notes = merge_inconsistent_nodes(nodes)
    assert merged == nodes
    assert notes == ["CPU 1 is listed in NUMA nodes 0 and 1; it is counted in node 0"]


def test_parse_meminfo_node_and_proc_forms():
    text = ("Node 0 MemTotal:       8386704 kB\nNode 0 MemFree:  100 kB\n"
            "HugePages_Total:       4\nHugepagesize:       2048 kB\nbogus line\n")
    assert parse_meminfo(text) == {"MemTotal": 8386704 * KiB, "MemFree": 100 * KiB,
                                   "HugePages_Total": 4, "Hugepagesize": 2 * MiB}


def test_parse_cpuinfo_blocks():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2\n\n"
            "processor\t: 1\nvendor_id\t: AuthenticAMD\n\n\n"
            "Hardware\t: not a processor block\n")
    blocks = parse_cpuinfo(text)
    assert [b["processor"] for b in blocks] == ["0", "1"]
    assert blocks[0]["flags"] == "fpu avx2"


# --------------------------------------------------------------------------------------------
# bad roots and the live machine


def test_root_that_is_not_a_sysfs_tree(tmp_path):
    with pytest.raises(TopologyError) as exc:
        discover_topology(tmp_path)
    assert str(exc.value) == f"{tmp_path} is not a sysfs tree: it has no sys/devices/system/cpu"
    assert "hwloc tarball" in exc.value.hint


def test_root_that_is_a_file(tmp_path):
    f = tmp_path / "sys"
    f.write_text("")
    with pytest.raises(TopologyError, match="is not a sysfs tree"):
        discover_topology(f)


def test_root_with_an_empty_cpu_folder(tmp_path):
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    with pytest.raises(TopologyError, match="no online CPU"):
        discover_topology(tmp_path)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux sysfs")


@linux_only
def test_live_machine_topology():
    t = discover_topology("/")
    affinity = os.sched_getaffinity(0)
    assert t.source == "sysfs"
    assert len(t.nodes) >= 1 and len(t.packages) >= 1 and len(t.cores) >= 1
    assert set(t.online_cpus) >= affinity
    # /proc/self/status is this very process: its Cpus_allowed_list is our affinity.
    assert set(t.allowed_cpus) == affinity
    assert len(t.online_cpus) <= (os.cpu_count() or 0)
    assert not set(t.online_cpus) & set(t.offline_cpus)
    # Cores and packages partition the online CPUs.
    in_cores = [c for core in t.cores for c in core.cpus]
    assert sorted(in_cores) == list(t.online_cpus)
    assert sorted(c for p in t.packages for c in p.cpus) == list(t.online_cpus)
    assert 1 <= t.threads_per_core <= 8
    in_nodes = [c for n in t.nodes for c in n.cpus]
    assert len(in_nodes) == len(set(in_nodes)) and set(in_nodes) <= set(t.online_cpus)
    assert set(t.allowed_node_ids) <= set(t.node_ids)
    assert set(t.first_thread_per_core()) <= affinity
    assert all(g.size_bytes is None or g.size_bytes > 0 for g in t.l3_groups)
    json.dumps(plain(t))


@linux_only
def test_live_machine_memory():
    m = discover_memory("/")
    assert m.mem_total_bytes and m.mem_total_bytes > 0
    assert m.mem_available_bytes is None or 0 < m.mem_available_bytes <= m.mem_total_bytes
    assert all(n.mem_total_bytes is None or n.mem_total_bytes > 0 for n in m.nodes)
    assert m.thp_enabled in (None, "always", "madvise", "never")
    for pool in m.hugepages:
        assert pool.page_bytes & (pool.page_bytes - 1) == 0  # a power of two
        assert pool.total_pages is None or pool.total_pages >= 0
    assert m.dimm_source in ("dmidecode", "udev", "none")
    assert (m.dimm_source == "none") == bool(m.dimm_unreadable_reason)
    t = discover_topology("/")
    assert {n.node_id for n in m.nodes} >= set(t.node_ids) or not m.nodes
    json.dumps(plain(m))


@pytest.mark.parametrize("text, cpus", [
    ("0-3,8,10-11\n", (0, 1, 2, 3, 8, 10, 11)),
    ("", ()),
    # used/group form: the first 2 CPUs of every group of 5 (kernel-parameters.rst, "cpu lists").
    ("0-11:2/5", (0, 1, 5, 6, 10, 11)),
    ("100-160:2/25,1", (1, 100, 101, 125, 126, 150, 151)),
])
def test_parse_cpulist(text, cpus):
    assert parse_cpulist(text) == cpus


@pytest.mark.parametrize("text, message", [
    ("0-4000000000", "names CPU 4000000000, above the highest cputune handles (65535)"),
    ("70000", "names CPU 70000, above"),
    ("0-4000000000:1/2", "names CPU 4000000000, above"),
    ("0-65535,0-65535", "names more than the 65536 CPUs cputune handles"),
    (",".join(["0-60000"] * 1000), "names more than the 65536 CPUs"),  # refused before 60M updates
])
def test_parse_cpulist_refuses_more_cpus_than_any_machine_before_building_them(text, message):
    with pytest.raises(TopologyError, match=re.escape(message)) as e:
        parse_cpulist(text)
    assert "no machine has that many CPUs" in e.value.hint
    assert len(parse_cpulist(f"0-{MAX_CPUS - 1}")) == MAX_CPUS == sysfs.MAX_CPUS


def test_parse_cpumask_refuses_a_bit_beyond_max_cpus():
    assert parse_cpumask("1" + "0" * (MAX_CPUS // 4 - 1)) == (MAX_CPUS - 4,)
    with pytest.raises(TopologyError, match=f"names CPU {MAX_CPUS}, above"):
        parse_cpumask("1" + "0" * (MAX_CPUS // 4))


@pytest.mark.parametrize("text", ["0-7:2", "0-7:2/0", "0-7:3/2", "7-0", "zero", "0-3,x", "1--3", "0-", "0-7:/4"])
def test_parse_cpulist_refuses_what_is_not_a_cpu_list_in_one_line(text):
    with pytest.raises(TopologyError, match="is not in the kernel's list format") as e:
        parse_cpulist(text)
    assert "\n" not in e.value.message and e.value.hint


# --------------------------------------------------------------------------------------------
# the core family where a VM hides the CPU's model (cores.identify_core's signatures)

# What each recorded box's cores have: its vendor, the flags its generation added (these lstopo
# files carry no flags), and the family its name and numbers say.
RECORDED_CORES = {
    "AMD-17h-Zen-2xEpyc-7451": ("AuthenticAMD", ("avx2", "fma"), "zen1"),
    "AMD-19h-Zen3-2xEpyc-7763": ("AuthenticAMD", ("avx2", "fma", "vaes", "clwb"), "zen3"),
    "AMD-19h-Zen4-2xEpyc-9654": ("AuthenticAMD", ("avx2", "avx512f", "avx512ifma", "vaes", "clwb"), "zen4"),
    "Intel-CascadeLake-2xXeon6230": ("GenuineIntel", ("avx2", "avx512f", "avx512_vnni", "clwb"), "skylake"),
    "Intel-SapphireRapids-2xXeonMax9460": ("GenuineIntel", ("avx512f", "avx512ifma", "avx512_fp16",
                                                            "amx_tile", "vaes", "clwb"), "sapphirerapids"),
}


@pytest.mark.parametrize("name", sorted(RECORDED_CORES))
def test_recorded_boxes_name_their_core_by_caches_alone(name):
    t = xml_topology(name)
    vendor, flags, family = RECORDED_CORES[name]
    assert t.l1d_bytes and t.l1i_bytes and t.l2_bytes  # read from the L1Cache/L1iCache/L2Cache objects
    # By its numbers (hwloc's CPUFamilyNumber/CPUModelNumber) and its name, as before ...
    assert cores.identify_core(t.cpu_model, t.cpu_vendor, t.cpu_family_id, t.cpu_model_id) == (family, "numbers")
    assert cores.identify_core(t.cpu_model) == (family, "name")
    # ... and with both hidden, as a KVM guest may show it, by its own caches and flags.
    assert cores.identify_core(None, vendor, 6 if vendor == "GenuineIntel" else 25, 250, flags,
                               own_caches(t)) == (family, "caches")


def test_a_vm_that_hides_a_granite_rapids_core_is_told_by_its_caches(tmp_path):
    # This project's VM on 2026-12-02: KVM says "Intel(R) Xeon(R) Processor", family 6 model 167
    # (no Xeon has it), with Redwood Cove's 64 KiB L1i and 2 MiB L2.
    cpu = tmp_path / "sys/devices/system/cpu"
    flags = "fpu sse2 avx avx2 fma f16c avx512f avx512dq avx512ifma clwb avx512bw avx512vl vaes " \
            "avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("".join(
        f"processor\t: {i}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
        f"model name\t: Intel(R) Xeon(R) Processor\nphysical id\t: 0\ncore id\t\t: {i}\nflags\t\t: {flags}\n\n"
        for i in range(2)))
    (cpu).mkdir(parents=True)
    (cpu / "online").write_text("0-1\n")
    for i in range(2):
        (cpu / f"cpu{i}/topology").mkdir(parents=True)
        (cpu / f"cpu{i}/topology/core_cpus_list").write_text(f"{i}\n")
        for k, (level, kind, size) in enumerate(((1, "Data", "48K"), (1, "Instruction", "64K"),
                                                 (2, "Unified", "2048K"), (3, "Unified", "491520K"))):
            d = cpu / f"cpu{i}/cache/index{k}"
            d.mkdir(parents=True)
            (d / "level").write_text(f"{level}\n")
            (d / "type").write_text(f"{kind}\n")
            (d / "size").write_text(f"{size}\n")
            (d / "shared_cpu_list").write_text("0-1\n" if level == 3 else f"{i}\n")
    t = discover_topology(tmp_path)
    assert (t.l1d_bytes, t.l1i_bytes, t.l2_bytes) == (48 * KiB, 64 * KiB, 2 * MiB)
    assert cores.core_family(t.cpu_model, t.cpu_vendor, t.cpu_family_id, t.cpu_model_id) is None
    assert cores.identify_core(t.cpu_model, t.cpu_vendor, t.cpu_family_id, t.cpu_model_id, t.isa_flags,
                               own_caches(t)) == ("graniterapids", "caches")
    # Sapphire Rapids' Golden Cove has half the L1i; a Zen 4 has no AMX; an L2 no row has: unknown.
    assert cores.core_family(vendor="GenuineIntel", flags=t.isa_flags,
                             caches={**own_caches(t), "l1i": 32 * KiB}) == "sapphirerapids"
    assert cores.core_family(vendor="GenuineIntel", flags=t.isa_flags, caches={**own_caches(t), "l2": 3 * MiB}) is None
    assert cores.core_family(vendor="AuthenticAMD", flags=t.isa_flags, caches=own_caches(t)) is None


def test_a_damaged_cache_size_counts_as_unknown():
    t = dataclasses.replace(xml_topology("AMD-19h-Zen4-2xEpyc-9654"), l2_bytes=-1, l1d_bytes=1 << 40)
    assert own_caches(t) == {"l1d": None, "l1i": 32 * KiB, "l2": None}
    assert cores.core_family(vendor="AuthenticAMD", flags=("avx512f",), caches=own_caches(t)) is None


@pytest.mark.parametrize("text, size", [
    ("32768K", 32 << 20), ("1M", 1 << 20), ("512 KB", 512 << 10), ("4G", 4 << 30),
    ("0K", None), ("5G", None), ("99999999999999999999G", None), ("-1K", None), ("big", None), ("", None),
])
def test_a_sysfs_cache_size_outside_what_a_cache_holds_is_unknown(text, size):
    from cputune.machine import topology

    assert topology._size_bytes(text) == size


def test_a_planted_sysfs_tree_is_read_without_hanging_or_crashing(tmp_path):
    """A recorded tree (--sysfs-root) with a FIFO for a meminfo, a link to /dev/zero for a
    cpulist, a distance row that is not numbers, a cpumap that is not hex behind a missing
    cpulist, a folder named like a hugepage pool and a superscript digit in meminfo: each fact
    is unknown or one TopologyError, never a hang, a ValueError or an unbounded read."""
    from helpers import extract_tree

    root = extract_tree(Path(__file__).parent / "fixtures" / "sysfs" / "16amd64-8n2c.tar.bz2", tmp_path / "tree")
    node = root / "sys/devices/system/node"
    (node / "node1/meminfo").unlink()
    os.mkfifo(node / "node1/meminfo")
    (node / "node2/distance").write_text("10 x 20\n")
    (node / "node3/meminfo").write_text("Node 3 MemTotal: \u00b2 kB\nNode 3 MemFree: 5 kB\n")
    (root / "sys/kernel/mm/hugepages").mkdir(parents=True, exist_ok=True)
    (root / "sys/kernel/mm/hugepages/hugepages-xkB").mkdir()
    (root / "sys/devices/system/cpu/online").unlink()
    (root / "sys/devices/system/cpu/online").symlink_to("/dev/zero")
    t = discover_topology(root)  # the FIFO is not opened, /dev/zero is not a regular file
    assert t.node(1).mem_total_bytes is None and t.node(3).mem_total_bytes is None
    assert t.node(0).mem_total_bytes == 8587984896 and t.node(2).mem_total_bytes == 8589934592
    assert t.node(2).distances == () and t.node(1).distances == (20, 10, 20, 20, 20, 20, 20, 20)
    assert len(t.online_cpus) == 16  # online unread: every CPU folder counts
    assert discover_memory(root).hugepages == ()
    (node / "node0/cpulist").unlink()
    (node / "node0/cpumap").write_text("zz\n")
    with pytest.raises(TopologyError, match="not a hex mask"):
        discover_topology(root)
