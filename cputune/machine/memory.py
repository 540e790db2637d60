"""Memory inventory: totals, THP and hugepage pools, NUMA balancing, governors, DIMMs and channels.

Apart from topology.py because DIMM data comes from other sources (dmidecode, udev's DMI
properties, or a `--memory` spec the user types) and feeds the theoretical-peak arithmetic.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cputune.core import checks
from cputune.core.checks import shown
from cputune.core.data import load_csv
from cputune.core.errors import ConfigError
from cputune.core.sysfs import SysRoot
from cputune.machine.topology import parse_meminfo

# A DDR channel's data bus is 64 bits (ECC bits excluded; a DDR5 channel is two 32-bit
# sub-channels, still 64 bits together): 64 / 8 bytes move per transfer.
BYTES_PER_TRANSFER = 64 // 8

# The memory types a --memory spec or a hardware profile may name, and the MT/s each runs at:
# from JEDEC's slowest bin (or the 2-3 DIMMs-per-channel derating servers apply) to the fastest
# overclocking kits and MRDIMM gen 2 (12800). A speed outside is a typo, not a box.
MEMORY_MTS: dict[str, tuple[int, int]] = {
    "DDR3": (400, 3200), "DDR4": (1066, 5600), "DDR5": (2000, 12000),
    "LPDDR4": (1066, 4800), "LPDDR4X": (1066, 4800), "LPDDR5": (3200, 7500), "LPDDR5X": (4266, 10700),
    "MRDIMM": (6400, 12800),
}
ANY_MTS = (100, 20000)  # when the type is not given
# A --memory spec's DIMM count: 8 sockets x 16 channels x 2 DIMMs per channel = 256.
MAX_SPEC_DIMMS = 8 * 16 * 2
MAX_DIMM_BYTES = 4 << 40  # 4 TiB per DIMM: far above the largest modules sold (256 GB RDIMMs)

@dataclass(frozen=True, slots=True)
class Dimm:
    locator: str | None
    bank_locator: str | None
    size_bytes: int | None
    type: str | None
    rated_mts: int | None
    configured_mts: int | None
    manufacturer: str | None
    part: str | None


@dataclass(frozen=True, slots=True)
class HugepagePool:
    """One hugepage size's pool; node_id None is the system-wide pool."""

    node_id: int | None
    page_bytes: int
    total_pages: int | None
    free_pages: int | None


@dataclass(frozen=True, slots=True)
class NodeMemory:
    node_id: int
    mem_total_bytes: int | None
    mem_free_bytes: int | None


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    mem_total_bytes: int | None
    mem_available_bytes: int | None
    nodes: tuple[NodeMemory, ...]
    thp_enabled: str | None
    thp_defrag: str | None
    hugepages: tuple[HugepagePool, ...]
    numa_balancing: int | None
    governors: dict[str, int]
    kernel_release: str | None
    dimms: tuple[Dimm, ...]
    dimm_slots: int | None
    dimm_source: str  # "dmidecode", "udev" or "none"
    dimm_unreadable_reason: str | None

    @property
    def node_mem_total_sum_bytes(self) -> int | None:
        vals = [n.mem_total_bytes for n in self.nodes]
        return None if not vals or None in vals else sum(vals)


@dataclass(frozen=True, slots=True)
class MemorySpec:
    """What the user says is installed: `--memory "24x DDR5-6000 64GB"`."""

    dimms: int
    type: str
    mts: int
    size_bytes: int | None

    def as_dimms(self) -> tuple[Dimm, ...]:
        return tuple(Dimm(None, None, self.size_bytes, self.type, self.mts, self.mts, None, None)
                     for _ in range(self.dimms))


@dataclass(frozen=True, slots=True)
class ChannelCount:
    """Populated memory channels. `channels` is None when some locator could not be read."""

    channels: int | None
    per_socket: tuple[int, ...]
    max_dimms_per_channel: int
    unparsed_locators: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CpuMemorySpec:
    """A CPU family's memory interface, from configs/cpu_models.csv."""

    family: str
    channels_per_socket: int
    max_mts: int
    memory_type: str
    source: str


# --------------------------------------------------------------------------------------------
# parsers (pure)

_UNKNOWN = {"", "unknown", "not specified", "none", "other", "<out of spec>", "not provided",
            "no module installed", "undefined", "[empty]"}
_UNITS = {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return None if value.lower() in _UNKNOWN else value


def _mts(value: str | None) -> int | None:
    # dmidecode before 3.3 labelled this SMBIOS field "MHz" although it holds MT/s
    # (dmidecode commit "Use MT/s for memory speed", SMBIOS 3.1.1 renamed the unit).
    m = re.match(r"\s*(\d+)", value or "")
    return int(m.group(1)) or None if m else None


def parse_dmidecode(text: str) -> list[Dimm]:
    """Populated DIMMs from `dmidecode -t 17` output (empty slots are skipped)."""
    dimms = []
    for block in re.split(r"\n(?=Handle 0x)", text):
        if "DMI type 17," not in block:
            continue
        f: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.strip().partition(":")
            if sep:
                f.setdefault(key.strip(), value.strip())
        size = _clean(f.get("Size"))
        if size is None:
            continue
        m = re.fullmatch(r"(\d+)\s*([KMGT]?B)", size, re.I)
        configured = next((v for k, v in f.items() if k.startswith("Configured") and "Speed" in k), None)
        dimms.append(Dimm(
            locator=_clean(f.get("Locator")),
            bank_locator=_clean(f.get("Bank Locator")),
            size_bytes=int(m.group(1)) * _UNITS[m.group(2).lower()] if m else None,
            type=_clean(f.get("Type")),
            rated_mts=_mts(f.get("Speed")),
            configured_mts=_mts(configured),
            manufacturer=_clean(f.get("Manufacturer")),
            part=_clean(f.get("Part Number")),
        ))
    return dimms


def parse_udev_dmi(text: str) -> tuple[list[Dimm], int | None]:
    """Populated DIMMs and the slot count from udev's DMI properties.

    Accepts `udevadm info -q property -p /sys/devices/virtual/dmi/id` output (KEY=value) and the
    udev database file /run/udev/data/+dmi:id (E:KEY=value); the keys are written by systemd's
    dmi_memory_id (src/udev/dmi_memory_id/dmi_memory_id.c), SIZE in bytes.
    """
    props: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip().removeprefix("E:")
        key, sep, value = line.partition("=")
        if sep:
            props[key] = value
    devices: dict[int, dict[str, str]] = {}
    for key, value in props.items():
        m = re.fullmatch(r"MEMORY_DEVICE_(\d+)_(\w+)", key)
        if m:
            devices.setdefault(int(m.group(1)), {})[m.group(2)] = value
    dimms = []
    for _, d in sorted(devices.items()):
        size = _mts(d.get("SIZE"))
        if d.get("PRESENT") == "0" or not size:
            continue
        dimms.append(Dimm(
            locator=_clean(d.get("LOCATOR")),
            bank_locator=_clean(d.get("BANK_LOCATOR")),
            size_bytes=size,
            # Some systemd versions print <OUT OF SPEC> for DDR5 (its table ends at HBM2).
            type=_clean(d.get("TYPE")),
            rated_mts=_mts(d.get("SPEED_MTS")),
            configured_mts=_mts(d.get("CONFIGURED_SPEED_MTS")),
            manufacturer=_clean(d.get("MANUFACTURER")),
            part=_clean(d.get("PART_NUMBER")),
        ))
    slots = _mts(props.get("MEMORY_ARRAY_NUM_DEVICES"))
    return dimms, slots if slots is not None else (len(devices) or None)


_SPEC = re.compile(
    r"""\s*(?P<n>[0-9]{1,9})\s*[x×*]\s*
        (?P<type>(?:LP)?DDR[0-9][A-Z]?|MRDIMM)\s*[-\s]\s*(?P<mts>[0-9]{3,5})(?:\s*MT/?s)?
        (?:\s+(?P<size>[0-9]{1,9})\s*(?P<unit>[GT])(?:i?B)?)?\s*""",
    re.I | re.X | re.ASCII,
)


def parse_memory_spec(spec: str) -> MemorySpec:
    """Read "24x DDR5-6000", "12x DDR5-4800 64GB" or "24xDDR5-6000" (sizes are binary: JEDEC
    module capacities, so "64GB" = 64 GiB)."""
    m = _SPEC.fullmatch(spec or "")
    if not m or int(m.group("n")) == 0:
        raise ConfigError(
            f"cannot read memory spec {shown(spec)}",
            hint="expected 'COUNTx TYPE-MT/s [SIZE]', e.g. '24x DDR5-6000' or '12x DDR5-4800 64GB'",
        )
    size = None
    if m.group("size"):
        size = int(m.group("size")) << (30 if m.group("unit").upper() == "G" else 40)
    kind = m.group("type").upper()
    where = f"memory spec {spec!r}:"
    hint = "e.g. '24x DDR5-6000' or '12x DDR5-4800 64GB'"
    checks.number(int(m.group("n")), f"{where} the DIMM count", 1, MAX_SPEC_DIMMS, integer=True, hint=hint)
    checks.text(kind, f"{where} the DIMM type", MEMORY_MTS, hint=hint)
    mts = check_mts(int(m.group("mts")), kind, f"{where} {kind} MT/s", hint=hint)
    if size is not None and not 1 << 30 <= size <= MAX_DIMM_BYTES:
        raise ConfigError(f"{where} the DIMM size must be from 1 GiB to {MAX_DIMM_BYTES >> 40} TiB, "
                          f"not {m.group('size')}{m.group('unit')}B", hint=hint)
    return MemorySpec(dimms=int(m.group("n")), type=kind, mts=mts, size_bytes=size)


def check_mts(mts, kind: str | None, name: str, hint: str | None = None) -> int:
    """MT/s within what `kind` runs at (MEMORY_MTS; any type when kind is empty)."""
    lo, hi = MEMORY_MTS.get((kind or "").upper(), ANY_MTS)
    return checks.number(mts, name, lo, hi, integer=True, hint=hint)


# Locator spellings seen on servers, each giving (socket, channel[, slot]):
_LOCATOR_PATTERNS = (
    # AMD boards (ASRock Rack, Gigabyte): "DIMM_P0_A0", "DIMM_P1_L1".
    re.compile(r"DIMM[_\s]*P(?P<s>\d+)[_\s]*(?P<c>[A-P])(?P<d>\d*)$", re.I),
    # Bank locators on the same boards: "P0 CHANNEL A", "P1_CHANNEL_L".
    re.compile(r"P(?P<s>\d+)[_\s]*CHANNEL[_\s]*(?P<c>[A-P0-9]+)$", re.I),
    # Supermicro AMD bank locator: "P0_Node0_Channel0_Dimm0".
    re.compile(r"P(?P<s>\d+)[_\s]*Node(?P<n>\d+)[_\s]*Channel(?P<c>\w+?)[_\s]*Dimm(?P<d>\d+)$", re.I),
    # Intel reference/Supermicro/Lenovo: "CPU1_DIMM_A1", "CPU0_DIMM_B2", "P1-DIMMA1", "P2_DIMMB2".
    re.compile(r"(?:CPU|P)(?P<s>\d+)[-_\s]*DIMM[_\s]*(?P<c>[A-P])(?P<d>\d*)$", re.I),
    # Single-socket boards: "DIMM_A1", "DIMMB2", "ChannelA-DIMM0".
    re.compile(r"DIMM[_\s]*(?P<c>[A-P])(?P<d>\d+)$", re.I),
    re.compile(r"Channel[_\s]*(?P<c>[A-P])[-_\s]*DIMM(?P<d>\d+)$", re.I),
)


def dimm_channel(dimm: Dimm) -> tuple[str | None, str] | None:
    """(socket label or None, channel label) from the locator or bank locator, else None."""
    for text in (dimm.locator, dimm.bank_locator):
        for pat in _LOCATOR_PATTERNS:
            m = pat.search((text or "").strip())
            if m:
                g = m.groupdict()
                channel = m.group("c").upper()
                if g.get("n") is not None:
                    channel = f"{g['n']}-{channel}"
                return g.get("s"), channel
    return None


def count_channels(dimms: list[Dimm] | tuple[Dimm, ...], sockets: int) -> ChannelCount:
    """Count populated channels, not DIMMs: two DIMMs on one channel count once."""
    per: dict[tuple[str | None, str], int] = {}
    unparsed = []
    for d in dimms:
        ch = dimm_channel(d)
        # Without a socket in the locator the channel is only unambiguous on one socket.
        if ch is None or (ch[0] is None and sockets > 1):
            unparsed.append(d.locator or d.bank_locator or "?")
            continue
        per[ch] = per.get(ch, 0) + 1
    labels = sorted({s for s, _ in per}, key=lambda s: (s is None, int(s) if s else 0))
    per_socket = [0] * max(sockets, len(labels))
    for (s, _), _n in per.items():
        per_socket[labels.index(s)] += 1
    return ChannelCount(
        channels=None if unparsed else len(per),
        per_socket=tuple(per_socket),
        max_dimms_per_channel=max(per.values(), default=0),
        unparsed_locators=tuple(unparsed),
    )


def theoretical_peak_gbps(channels: int, mts: float) -> float:
    """Peak DRAM bandwidth in GB/s (10^9 B/s) = channels × MT/s × 10^6 × 8 B / 10^9."""
    return channels * mts * 1e6 * BYTES_PER_TRANSFER / 1e9


@functools.lru_cache(maxsize=None)
def _cpu_model_rows() -> tuple[tuple[re.Pattern, CpuMemorySpec], ...]:
    return tuple((re.compile(r["model_regex"]), CpuMemorySpec(
        family=r["family"], channels_per_socket=int(r["channels_per_socket"]),
        max_mts=int(r["max_mts"]), memory_type=r["memory_type"], source=r["source"]))
        for r in load_csv("cpu_models.csv"))


def cpu_memory_spec(cpu_model: str | None) -> CpuMemorySpec | None:
    """The memory interface of a CPU by its model name, or None for a model not in the table."""
    if not cpu_model:
        return None
    for pat, spec in _cpu_model_rows():
        if pat.search(cpu_model):
            return spec
    return None


# --------------------------------------------------------------------------------------------
# discovery


def _bracketed(text: str | None) -> str | None:
    """The active choice of a sysfs selector: "always [madvise] never" -> "madvise"."""
    if not text:
        return None
    # Choices are not all words: THP defrag offers "defer+madvise"
    # (Documentation/admin-guide/mm/transhuge.rst).
    m = re.search(r"\[([^\]\s]+)\]", text)
    return m.group(1) if m else text.split()[0]


def _pools(sr: SysRoot, base: str, node_id: int | None) -> list[HugepagePool]:
    out = []
    for d in sr.glob(f"{base}/hugepages-*kB"):
        m = re.search(r"/hugepages-([0-9]{1,9})kB$", d)
        if not m or not int(m.group(1)):
            continue  # not a pool the kernel names (hugepages-<size>kB)
        kb = int(m.group(1))
        out.append(HugepagePool(node_id=node_id, page_bytes=kb * 1024,
                                total_pages=sr.int(f"{d}/nr_hugepages"),
                                free_pages=sr.int(f"{d}/free_hugepages")))
    return sorted(out, key=lambda p: p.page_bytes)


def _run(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


@dataclass
class _DimmRead:
    dimms: list[Dimm] = field(default_factory=list)
    slots: int | None = None
    source: str = "none"
    reason: str | None = None


def _read_dimms(sr: SysRoot, dmidecode_text: str | None, udev_text: str | None) -> _DimmRead:
    live = sr.is_live()
    why: list[str] = []
    # (1) dmidecode -t 17 has everything, but it reads /sys/firmware/dmi/tables/DMI (mode 0400).
    if dmidecode_text is None and live:
        if os.geteuid() != 0:
            why.append("dmidecode needs root")
        elif shutil.which("dmidecode") is None:
            why.append("dmidecode is not installed")
        else:
            dmidecode_text = _run(["dmidecode", "-t", "17"])
            if dmidecode_text is None:
                why.append("`dmidecode -t 17` failed")
    elif dmidecode_text is None:
        why.append("no dmidecode output recorded with this tree")
    if dmidecode_text:
        dimms = parse_dmidecode(dmidecode_text)
        if dimms:
            return _DimmRead(dimms, dmidecode_text.count("DMI type 17,"), "dmidecode")
        why.append("dmidecode lists no populated DIMM")
    # (2) udev's decoded DMI properties, world-readable: its database file, else udevadm.
    if udev_text is None:
        udev_text = sr.text("run/udev/data/+dmi:id")
    if udev_text is None and live and shutil.which("udevadm"):
        udev_text = _run(["udevadm", "info", "-q", "property", "-p", "/sys/devices/virtual/dmi/id"])
    if udev_text:
        dimms, slots = parse_udev_dmi(udev_text)
        if dimms:
            return _DimmRead(dimms, slots, "udev")
        why.append("udev's DMI properties list no memory device")
    else:
        why.append("no udev DMI properties (/run/udev/data/+dmi:id)")
    # (3) nothing readable: say why, so the finding can ask for dmidecode or --memory.
    return _DimmRead(reason="; ".join(why))


def discover_memory(root: Path | str = Path("/"), *, dmidecode_text: str | None = None,
                    udev_text: str | None = None) -> MemoryInfo:
    """Read memory settings under `root`; DIMMs from the given texts, else (live only) from
    `dmidecode -t 17` when root, else from udev's DMI properties."""
    sr = SysRoot(Path(root))
    meminfo = parse_meminfo(sr.text("proc/meminfo") or "")
    nodes, pools = [], _pools(sr, "sys/kernel/mm/hugepages", None)
    node_dir = "sys/devices/system/node"
    for nid in sorted(int(d[4:]) for d in sr.listdir(node_dir) if re.fullmatch(r"node\d+", d)):
        nm = parse_meminfo(sr.text(f"{node_dir}/node{nid}/meminfo") or "")
        nodes.append(NodeMemory(nid, nm.get("MemTotal"), nm.get("MemFree")))
        pools += _pools(sr, f"{node_dir}/node{nid}/hugepages", nid)
    governors: dict[str, int] = {}
    for p in sr.glob("sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"):
        g = sr.text(p)
        if g:
            governors[g] = governors.get(g, 0) + 1
    d = _read_dimms(sr, dmidecode_text, udev_text)
    return MemoryInfo(
        mem_total_bytes=meminfo.get("MemTotal"),
        mem_available_bytes=meminfo.get("MemAvailable"),
        nodes=tuple(nodes),
        thp_enabled=_bracketed(sr.text("sys/kernel/mm/transparent_hugepage/enabled")),
        thp_defrag=_bracketed(sr.text("sys/kernel/mm/transparent_hugepage/defrag")),
        hugepages=tuple(pools),
        numa_balancing=sr.int("proc/sys/kernel/numa_balancing"),
        governors=dict(sorted(governors.items())),
        kernel_release=sr.text("proc/sys/kernel/osrelease"),
        dimms=tuple(d.dimms),
        dimm_slots=d.slots,
        dimm_source=d.source,
        dimm_unreadable_reason=d.reason,
    )
