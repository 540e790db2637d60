"""Plain-words verdicts on a machine, each with the number behind it.

Pure functions over the inventory and the bandwidth summary, so every rule is tested on
recorded machines without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from cputune.core import stats
from cputune.machine.bandwidth import BandwidthSummary, Spread
from cputune.machine.memory import MemoryInfo
from cputune.machine.peak import Peak
from cputune.core.sysfs import format_cpulist
from cputune.machine.topology import Topology
from cputune.core.units import gib_text

# ggml counts nodes up to GGML_NUMA_MAX_NODES = 8 (ggml/src/ggml-cpu/ggml-cpu.c, ggml_numa_init).
GGML_NUMA_MAX_NODES = 8
# Good probes read 80-94% of theoretical on Genoa/Turin (shared/reference/hardware.md 2.3);
# below 60% something is wrong (a channel down, a slow DIMM, a CCD-limited part, a busy box).
LOW_READ_SHARE = 0.60
# A node reading this much less than the median of its peers has a DIMM or channel problem.
NODE_IMBALANCE = 0.80
# Node meminfo totals summing to less than this share of MemTotal: an incomplete node table.
NODE_MEMORY_SHARE = 0.90
SATURATION = 0.90

LEVELS = ("ok", "info", "warn", "bad")


@dataclass(frozen=True, slots=True)
class Finding:
    level: str  # ok | info | warn | bad
    code: str
    message: str
    hint: str | None = None


def topology_findings(t: Topology) -> list[Finding]:
    out: list[Finding] = []
    cpu_nodes = [n for n in t.nodes if n.cpus]
    if not t.isa_flags:
        out.append(Finding("info", "isa", "ISA features unknown (none recorded for this machine)"))
    elif "avx2" not in t.isa_flags:
        out.append(Finding("bad", "no-avx2", "the CPU has no AVX2: llama.cpp's fast CPU kernels "
                           "need at least AVX2 and FMA"))
    elif "avx512f" in t.isa_flags:
        extra = [f for f in ("avx512_vnni", "avx512_bf16", "amx_int8") if f in t.isa_flags]
        out.append(Finding("ok", "isa", "AVX-512 is available" + (f" (with {', '.join(extra)})"
                                                                  if extra else "")))
    else:
        out.append(Finding("info", "isa", "AVX2 and FMA without AVX-512: llama.cpp uses its AVX2 "
                           "kernels (prompt processing is slower than on AVX-512 parts)"))
    if t.smt_on:
        out.append(Finding("info", "smt", f"SMT is on ({t.threads_per_core} threads per core): "
                           f"give llama.cpp {len(t.cores)} threads, one per physical core, not "
                           f"{len(t.online_cpus)}",
                           "decode is memory-bound; a second thread per core adds contention"))
    if len(t.nodes) > GGML_NUMA_MAX_NODES:
        out.append(Finding("warn", "too-many-nodes", f"{len(t.nodes)} NUMA nodes: ggml uses only "
                           f"the first {GGML_NUMA_MAX_NODES} and ignores the CPUs of the rest",
                           "set NPS/SNC to fewer nodes per socket in the BIOS"))
    if t.packages and len(cpu_nodes) > len(t.packages):
        per = len(cpu_nodes) / len(t.packages)
        out.append(Finding("info", "split-sockets", f"each socket is split into {per:g} NUMA nodes "
                           f"(NPS/SNC): {len(cpu_nodes)} nodes on {len(t.packages)} sockets",
                           "llama.cpp's --numa distribute spreads threads over all nodes; weights "
                           "then cross node boundaries"))
    if len(t.packages) > 1 and len(cpu_nodes) == 1 and t.source == "sysfs":
        out.append(Finding("warn", "numa-hidden", f"{len(t.packages)} sockets but one NUMA node: "
                           "memory is interleaved across sockets (or NUMA is off in the BIOS/kernel), "
                           "so no thread can be kept on local memory"))
    memory_only = [n.id for n in t.nodes if not n.cpus]
    if memory_only:
        out.append(Finding("info", "memory-only-nodes", f"NUMA nodes {format_cpulist(memory_only)} "
                           "have memory but no CPUs (HBM, CXL or a flat-mode memory pool)"))
    if t.offline_cpus:
        out.append(Finding("warn", "offline-cpus", f"CPUs {format_cpulist(t.offline_cpus)} are "
                           "offline", "bring them online: echo 1 > /sys/devices/system/cpu/cpuN/online"))
    hidden = sorted(set(t.online_cpus) - set(t.allowed_cpus))
    if hidden:
        out.append(Finding("warn", "cpuset", f"this process may use {len(t.allowed_cpus)} of "
                           f"{len(t.online_cpus)} online CPUs (cpuset/affinity hides "
                           f"{format_cpulist(hidden)})",
                           "run outside the container's or taskset's CPU limit to use them all"))
    if t.cgroup_memory_limit_bytes is not None:
        out.append(Finding("info", "memory-limit", f"a cgroup limits this process to "
                           f"{gib_text(t.cgroup_memory_limit_bytes)} of memory"))
    out += [Finding("warn", "topology", note) for note in t.notes]
    return out


def memory_findings(t: Topology, m: MemoryInfo, peak: Peak | None) -> list[Finding]:
    out: list[Finding] = []
    if len(t.nodes) > 1 and m.numa_balancing:
        out.append(Finding("warn", "numa-balancing", f"numa_balancing is on ({m.numa_balancing}): "
                           "the kernel migrates pages while llama.cpp runs, which llama.cpp itself "
                           "warns impairs performance", "sudo sysctl -w kernel.numa_balancing=0"))
    if m.thp_enabled == "never":
        out.append(Finding("warn", "thp", "transparent hugepages are off (never): every 4 KiB page "
                           "of the weights costs a TLB entry",
                           "echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled"))
    elif m.thp_enabled:
        out.append(Finding("ok", "thp", f"transparent hugepages: {m.thp_enabled}"))
    slow = {g: n for g, n in m.governors.items() if g != "performance"}
    if slow:
        out.append(Finding("warn", "governor", "CPU frequency governor is "
                           + ", ".join(f"{g} on {n} CPUs" for g, n in slow.items())
                           + ", not performance",
                           "sudo cpupower frequency-set -g performance"))
    node_sum = m.node_mem_total_sum_bytes
    if node_sum and m.mem_total_bytes and node_sum < NODE_MEMORY_SHARE * m.mem_total_bytes:
        out.append(Finding("warn", "node-memory", f"NUMA nodes hold {gib_text(node_sum)} but MemTotal "
                           f"is {gib_text(m.mem_total_bytes)}: the node table does not cover all memory "
                           "(common in VMs with hot-plugged memory); per-node sizes use the node figures"))
    if m.dimm_source == "none" and peak is None:
        out.append(Finding("info", "dimms-unknown", f"DIMMs could not be read ({m.dimm_unreadable_reason}); "
                           "the theoretical peak is unknown",
                           "run `sudo cputune probe`, or pass --memory '24x DDR5-6000'"))
    if peak is not None:
        out += _peak_findings(m, peak)
    return out


def _peak_findings(m: MemoryInfo, peak: Peak) -> list[Finding]:
    out = [Finding("info", "peak", f"theoretical peak {peak.total_gbps:.1f} GB/s = {peak.channels} "
                   f"channels x {peak.mts} MT/s x 8 B (from {peak.source})")]
    out += [Finding("info", "peak", n) for n in peak.notes]
    if peak.cpu:
        want = peak.cpu.channels_per_socket
        for i, have in enumerate(peak.channels_per_socket):
            if have < want:
                out.append(Finding("warn", "channels", f"socket {i} has {have} of {want} memory "
                                   f"channels populated: its bandwidth is capped at {have}/{want} "
                                   f"of what the {peak.cpu.family} can do",
                                   "populate every channel with one DIMM of the same size"))
    below = sorted({(d.configured_mts, d.rated_mts) for d in m.dimms
                    if d.configured_mts and d.rated_mts and d.configured_mts < d.rated_mts})
    for configured, rated in below:
        out.append(Finding("warn", "dimm-speed", f"DIMMs rated {rated} MT/s run at {configured} MT/s "
                           f"({configured / rated:.0%})",
                           "check the BIOS memory speed; 2 DIMMs per channel or a CPU limit lowers it"))
    return out


def bandwidth_findings(t: Topology, bw: BandwidthSummary, peak: Peak | None) -> list[Finding]:
    out: list[Finding] = []
    if peak is not None and peak.total_gbps > 0:
        share = bw.read_gbps / peak.total_gbps
        level = "warn" if share < LOW_READ_SHARE else "ok"
        out.append(Finding(level, "read-vs-peak", f"read bandwidth {bw.read_gbps:.1f} GB/s is "
                           f"{share:.0%} of the theoretical {peak.total_gbps:.1f} GB/s"
                           + (" (good probes reach 80-94%)" if level == "warn" else ""),
                           "check for missing or slow DIMMs, a busy machine, or a CPU with too few "
                           "CCDs to fill its channels" if level == "warn" else None))
    else:
        out.append(Finding("info", "read", f"read bandwidth {bw.read_gbps:.1f} GB/s "
                           "(theoretical peak unknown: pass --memory to compare)"))
    s = bw.read_spread
    if s is not None:
        out.append(burst_finding(s, sum(x.varies for x in bw.spreads if x is not s)))
    if len(bw.node_read_gbps) > 1:
        med = stats.summarize(bw.node_read_gbps.values()).median
        for node, gbps in bw.node_read_gbps.items():
            if gbps < NODE_IMBALANCE * med:
                out.append(Finding("warn", "node-imbalance", f"node {node} reads {gbps:.1f} GB/s, "
                                   f"{1 - gbps / med:.0%} below the median node ({med:.1f} GB/s)",
                                   "check that node's DIMMs and channels"))
    if len(bw.sweep_read_gbps) > 1:
        full_cores, full = bw.sweep_read_gbps[-1]
        knee = next(c for c, g in bw.sweep_read_gbps if g >= SATURATION * full)
        if knee < full_cores:
            out.append(Finding("info", "saturation", f"read bandwidth reaches {SATURATION:.0%} of "
                               f"the node's {full:.1f} GB/s with {knee} of {full_cores} cores"))
        one = bw.sweep_read_gbps[0][1]
        out.append(Finding("info", "one-core", f"one core reads {one:.1f} GB/s; the whole node "
                           f"{full:.1f} GB/s ({full / one:.1f}x)"))
    for cpu_node, mem_node, gbps in bw.matrix_read_gbps:
        local = bw.node_read_gbps.get(cpu_node)
        if local:
            out.append(Finding("info", "remote", f"node {cpu_node} reading node {mem_node}'s memory: "
                               f"{gbps:.1f} GB/s, {gbps / local:.0%} of local"))
    return out


def burst_finding(s: Spread, others_varying: int = 0) -> Finding:
    """Whether the read's bursts agree (issue 18): a host whose bandwidth swings between bursts
    is shared or throttling, and a figure from it says which burst it is."""
    bursts = stats.summarize(s.burst_gbps)
    lo, hi = bursts.min, bursts.max
    over = f"{len(s.burst_gbps)} bursts over {max(s.at_s) - min(s.at_s):.0f} s"
    if not s.varies:
        return Finding("ok", "bursts", f"read bandwidth steady over {over}: {lo:.1f}–{hi:.1f} GB/s "
                       f"({s.between:.0%} apart; the trials within one burst vary {s.within:.0%})")
    more = ("" if not others_varying else "; 1 other run varies too" if others_varying == 1
            else f"; {others_varying} other runs vary too")
    return Finding("warn", "bandwidth-varies",
                   f"read bandwidth varies {lo:.1f}–{hi:.1f} GB/s between {over} ({s.between:.0%} apart; "
                   f"the trials within one burst vary {s.within:.0%}): this host is shared or throttling; "
                   f"predictions use the best burst, {s.gbps:.1f} GB/s (median {s.median_gbps:.1f})"
                   + more,
                   "probe again when the host is quiet; `cputune calibrate` and `cputune bench` "
                   "measure read bandwidth just before each run and record it beside the result")


def all_findings(t: Topology, m: MemoryInfo, peak: Peak | None, bw: BandwidthSummary | None,
                 probe_notes: tuple[str, ...] = (), info_notes: tuple[str, ...] = ()) -> list[Finding]:
    """Worst first, so the table and `--json | jq '.findings[0]'` lead with what to fix."""
    out = topology_findings(t) + memory_findings(t, m, peak)
    if bw is not None:
        out += bandwidth_findings(t, bw, peak)
    out += [Finding("warn", "probe", n) for n in probe_notes]
    out += [Finding("info", "probe", n) for n in info_notes]
    order = {lvl: i for i, lvl in enumerate(reversed(LEVELS))}
    return sorted(out, key=lambda f: order[f.level])
