"""`cputune probe` as a library call: inventory, bandwidth runs, findings, the saved machine profile.

Orchestration only: reading lives in topology/memory, arithmetic in peak/bandwidth/findings.
The profile is what predict, select and serve read later, so it is written atomically.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cputune.core import stats
from cputune.machine import bandwidth, findings
from cputune.machine.bandwidth import BandwidthPlan, BandwidthSummary, Layout, Measurement
from cputune.core.errors import ConfigError
from cputune.machine.findings import Finding
from cputune.core.fsutil import cache_root
from cputune.core.jsonio import document, from_plain, read_json, write_json
from cputune.machine.memory import MemoryInfo, NodeMemory, discover_memory, parse_memory_spec
from cputune.machine.peak import Peak, peak_bandwidth
from cputune.core.sysfs import SysRoot
from cputune.core.cores import identify_core
from cputune.machine.topology import Topology, discover_topology, own_caches

SCHEMA = "cputune.machine/1"
REPROBE = "re-run `cputune probe` to write it again"


@dataclass(frozen=True, slots=True)
class Inventory:
    topology: Topology
    memory: MemoryInfo
    peak: Peak | None
    memory_spec: str | None


@dataclass(frozen=True, slots=True)
class MachineProfile:
    hostname: str
    created_at: str
    inventory: Inventory
    bandwidth: BandwidthSummary | None
    measurements: tuple[Measurement, ...]
    probe_notes: tuple[str, ...]
    findings: tuple[Finding, ...]
    probe_seconds: float
    quick: bool


def profile_path() -> Path:
    return cache_root() / "machine.json"


def take_inventory(root: Path | str = Path("/"), memory_spec: str | None = None,
                   hwloc_xml: Path | str | None = None, dmidecode_text: str | None = None,
                   udev_text: str | None = None) -> Inventory:
    """Topology from sysfs (or an lstopo XML), memory settings, and the theoretical peak."""
    spec = parse_memory_spec(memory_spec) if memory_spec else None
    if hwloc_xml is not None:
        from cputune.machine.hwloc_xml import load_hwloc_xml
        topo = load_hwloc_xml(hwloc_xml)
        mem = memory_from_topology(topo, "an lstopo XML carries no DIMM records")
    else:
        topo = discover_topology(root)
        mem = discover_memory(root, dmidecode_text=dmidecode_text, udev_text=udev_text)
    return Inventory(topo, mem, peak_bandwidth(topo, mem, spec), memory_spec)


def memory_from_topology(t: Topology, reason: str) -> MemoryInfo:
    """What a topology alone says about memory (node sizes), for machines we only have a file of."""
    nodes = tuple(NodeMemory(n.id, n.mem_total_bytes, n.mem_free_bytes) for n in t.nodes)
    sizes = [n.mem_total_bytes for n in t.nodes]
    total = None if None in sizes else sum(sizes)
    return MemoryInfo(mem_total_bytes=total, mem_available_bytes=None, nodes=nodes, thp_enabled=None,
                      thp_defrag=None, hugepages=(), numa_balancing=None, governors={},
                      kernel_release=None, dimms=(), dimm_slots=None, dimm_source="none",
                      dimm_unreadable_reason=reason)


def spread_over_l3(t: Topology, cpus: tuple[int, ...]) -> tuple[int, ...]:
    """Order CPUs round-robin over L3 groups so the first k threads sit on k different CCDs:
    one EPYC CCD cannot pull a socket's bandwidth (hardware.md 3.2)."""
    by_l3: dict[int, list[int]] = {}
    for cpu in cpus:
        core = t.core_of_cpu(cpu)
        key = core.l3_index if core is not None and core.l3_index is not None else -1
        by_l3.setdefault(key, []).append(cpu)
    queues = [sorted(v) for _, v in sorted(by_l3.items())]
    out = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return tuple(out)


def make_layout(t: Topology, m: MemoryInfo, numa: bool = True) -> Layout:
    """One CPU per physical core per allowed node, spread over L3 groups; caches; free memory."""
    allowed = set(t.allowed_cpus)
    node_cores, node_llc, node_free = {}, {}, {}
    for n in t.nodes:
        if n.id not in t.allowed_node_ids:
            continue
        cpus = t.first_thread_per_core(c for c in n.cpus if c in allowed)
        if not cpus:
            continue
        node_cores[n.id] = spread_over_l3(t, cpus)
        node_llc[n.id] = sum(g.size_bytes or 0 for g in t.l3_groups if set(g.cpus) & set(n.cpus))
        free = n.mem_free_bytes
        if free is None:
            free = (m.mem_available_bytes or 0) // max(len(t.nodes), 1)
        node_free[n.id] = free
    used = {c for cs in node_cores.values() for c in cs}
    llc = sum(g.size_bytes or 0 for g in t.l3_groups if set(g.cpus) & used)
    available = m.mem_available_bytes or sum(node_free.values())
    if t.cgroup_memory_limit_bytes is not None:
        available = min(available, t.cgroup_memory_limit_bytes)
    return Layout(node_cores=node_cores, llc_bytes=llc, node_llc_bytes=node_llc,
                  node_free_bytes=node_free, mem_available_bytes=available, numa=numa)


def plan(inv: Inventory, root: Path | str = Path("/"), quick: bool = False) -> BandwidthPlan:
    numa = SysRoot(Path(root)).exists("sys/devices/system/node/node0")
    return bandwidth.plan_probe(make_layout(inv.topology, inv.memory, numa), quick=quick)


def moment_reader(root: Path | str = Path("/")) -> Callable[[int], Measurement]:
    """Read bandwidth of this box now at `threads` pinned threads (bandwidth.moment_run), for
    calibrate and bench to measure just before each llama-bench run (issue 18). The layout is
    taken once, from the live topology and free memory."""
    t = discover_topology(root)
    numa = SysRoot(Path(root)).exists("sys/devices/system/node/node0")
    layout = make_layout(t, discover_memory(root), numa)
    return lambda threads: bandwidth.checked(bandwidth.measure(bandwidth.moment_run(layout, threads)))


def run_probe(root: Path | str = Path("/"), quick: bool = False, measure: bool = True,
              memory_spec: str | None = None, hwloc_xml: Path | str | None = None,
              progress: Callable[[int, int, str], None] | None = None) -> MachineProfile:
    """The whole probe. Bandwidth runs only on the live machine this process runs on."""
    t0 = time.monotonic()
    inv = take_inventory(root, memory_spec, hwloc_xml)
    live = hwloc_xml is None and SysRoot(Path(root)).is_live()
    ms: list[Measurement] = []
    notes: list[str] = []
    skipped: tuple[str, ...] = ()
    bw = None
    if measure and not live:
        skipped = ("bandwidth not measured: the topology describes another machine",)
    elif measure:
        p = plan(inv, root, quick)
        notes += p.notes
        ms = bandwidth.run_plan(p, progress)
        bw = bandwidth.summarize_measurements(ms)
    found = findings.all_findings(inv.topology, inv.memory, inv.peak, bw, tuple(notes), skipped)
    return MachineProfile(
        hostname=socket.gethostname() if live else (Path(hwloc_xml or root).name or "recorded"),
        created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        inventory=inv, bandwidth=bw, measurements=tuple(ms), probe_notes=tuple(notes),
        findings=tuple(found), probe_seconds=time.monotonic() - t0, quick=quick)


def profile_document(profile: MachineProfile) -> dict:
    return document(SCHEMA, profile=profile)


def save_profile(profile: MachineProfile, path: Path | str | None = None) -> Path:
    path = Path(path) if path else profile_path()
    write_json(path, profile_document(profile))
    return path


def load_profile(path: Path | str | None = None) -> MachineProfile:
    """The saved profile, as the dataclasses it was written from."""
    path = Path(path) if path else profile_path()
    if not path.exists():
        raise ConfigError(f"no machine profile at {path}", hint="run `cputune probe` first")
    doc = read_json(path, SCHEMA)
    if "profile" not in doc:
        raise ConfigError(f"{path}: field profile is missing", hint=REPROBE)
    try:
        return from_plain(MachineProfile, doc["profile"], "profile")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", hint=REPROBE) from None
    except (TypeError, ValueError) as e:  # a value the dataclasses refuse
        raise ConfigError(f"{path} is damaged or from another cputune version ({e})", hint=REPROBE) from None



def summary_rows(p: MachineProfile) -> list[tuple[str, str]]:
    """The profile's headline as (label, text) pairs: the terminal table and the report file both
    show these."""
    from cputune.core.units import gib_text, plural

    inv, t, m = p.inventory, p.inventory.topology, p.inventory.memory
    bw, peak = p.bandwidth, inv.peak
    l3 = t.l3_groups
    l3_text = (f"{len(l3)} x {(l3[0].size_bytes or 0) / (1 << 20):.0f} MiB ({len(l3[0].cpus)} CPUs each)"
               if l3 else "none")
    if peak:
        mem_text = (f"{peak.channels} channels x {peak.mts} MT/s = {peak.total_gbps:.1f} GB/s peak "
                    f"(from {peak.source})")
    else:
        mem_text = "DIMMs unknown (pass --memory '24x DDR5-6000')"
    fam, told = identify_core(t.cpu_model, t.cpu_vendor, t.cpu_family_id, t.cpu_model_id, t.isa_flags,
                              own_caches(t))
    core_text = {"numbers": f"{fam} (by its family/model numbers)", "name": f"{fam} (by its model name)",
                 "caches": f"{fam} (by its caches and ISA flags: the CPU hides its model)"}.get(
        told, "unknown (predictions take the nearest calibrated family)")
    rows = [
        ("cpu", f"{t.cpu_model or '?'}"),
        ("core family", core_text),
        ("layout", f"{plural(len(t.packages), 'socket')}, {plural(len(t.nodes), 'NUMA node')}, "
                   f"{plural(len(t.cores), 'core')}, {plural(len(t.online_cpus), 'CPU')} "
                   f"(SMT {'on' if t.smt_on else 'off'})"),
        ("L3 groups", l3_text),
        ("ISA", " ".join(t.isa_flags) or "-"),
        ("memory", f"{gib_text(m.mem_total_bytes)} total, {gib_text(m.mem_available_bytes)} available"),
        ("DIMMs", mem_text),
        ("kernel", f"{m.kernel_release or '?'}; THP {m.thp_enabled or '?'}; numa_balancing "
                   f"{'?' if m.numa_balancing is None else m.numa_balancing}"),
    ]
    if bw:
        share = f" ({bw.read_gbps / peak.total_gbps:.0%} of peak)" if peak and peak.total_gbps else ""
        s = bw.read_spread
        bursts = (f"; best of {len(s.burst_gbps)} bursts, {stats.range_text(stats.summarize(s.burst_gbps), 1)}"
                  f" (median {s.median_gbps:.1f})" if s else "")
        rows.append(("read bandwidth", f"{bw.read_gbps:.1f} GB/s{share}, {bw.isa} kernels{bursts}"))
    return rows
