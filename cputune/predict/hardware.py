"""Hardware descriptions: configs/hardware/*.toml for boxes not at hand, the probe profile for this one.

Both become the predictor's MachineBandwidth, so `predict`, `select` and `plan` treat a box
being planned and the box being measured the same way. A profile file says which of its
bandwidth figures were measured and which were estimated from the channel arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cputune.core import checks
from cputune.core.cores import core_family, vendor_of
from cputune.core.data import config_path, read_toml_file
from cputune.core.errors import ConfigError
from cputune.machine.memory import MEMORY_MTS, check_mts, theoretical_peak_gbps
from cputune.predict.predictor import Calibration, MachineBandwidth
from cputune.machine.topology import ISA_FLAGS

GIB = 1 << 30
# When a profile gives no measured bandwidth: the share of the channel peak a read-only probe
# reaches on a whole socket. Median of the measured/theoretical ratios in
# shared/reference/published_measurements.md (GNR 554.8/614.4 = 0.90, TR 221.4/307.2 = 0.72,
# Turin 378.3/409.6 = 0.92, Genoa 359.9/460.8 = 0.78).
ESTIMATED_READ_FRACTION = 0.84
# One core's read bandwidth when the profile does not give it (Little's law class figure;
# shared/reference/hardware.md 3.2: ~24 GB/s per server core, ~36 on Zen 5).
DEFAULT_CORE_READ_GBPS = 24.0
# Remote/local read ratio across sockets when unmeasured: 2x Xeon 6980P MLC 247.8 / 554.8.
DEFAULT_REMOTE_RATIO = 0.45
# The same between nodes of one socket (NPS2/4 on EPYC, SNC on Xeon), shared/reference/hardware.md:
# EPYC 9355P NPS4 reads 107 GB/s from another node against 117.33 from its own (Chips and Cheese);
# Xeon 6980P SNC on, ~94 of ~188 GB/s per node (ubergarm's MLC, ik_llama.cpp discussion #201).
INTRA_SOCKET_REMOTE_RATIO = {"amd": 0.91, "intel": 0.5}


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """One box as configs/hardware/*.toml describes it (units in the names)."""

    id: str
    name: str
    cpu_model: str
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    numa_nodes_per_socket: int
    l3_groups_per_socket: int
    isa: tuple[str, ...]
    memory_type: str
    channels_per_socket: int
    mts: int
    dimms: int
    dimm_gib: int
    node_read_gbps: float
    core_read_gbps: float
    remote_ratio: float
    bandwidth_measured: bool
    source: str
    path: str = ""

    @property
    def theoretical_socket_gbps(self) -> float:
        return theoretical_peak_gbps(self.channels_per_socket, self.mts)

    @property
    def mem_bytes(self) -> int:
        return self.dimms * self.dimm_gib * GIB

    @property
    def nodes(self) -> int:
        return self.sockets * self.numa_nodes_per_socket

    @property
    def cores(self) -> int:
        return self.sockets * self.cores_per_socket


_HINT = "see configs/hardware/README.md for the fields a profile needs"
_REQUIRED = object()
# Every key a profile may have (configs/hardware/README.md): any other is refused, not ignored.
_KEYS = {
    "": ("name", "source", "cpu", "memory", "bandwidth"),
    "cpu": ("model", "sockets", "cores_per_socket", "threads_per_core", "numa_nodes_per_socket",
            "l3_groups_per_socket", "isa"),
    "memory": ("type", "channels_per_socket", "mts", "dimms", "dimm_gib"),
    "bandwidth": ("node_read_gbps", "core_read_gbps", "remote_ratio"),
}
# Upper bounds: each well above the largest box sold, so only a typo trips them. 32 sockets is the
# largest single system image (HPE Superdome Flex); 192 cores per socket the largest x86 CPU
# (EPYC 9965); SMT8 is POWER's; 12 memory channels per socket today's EPYC and Xeon 6 have.
MAX_SOCKETS = 32
MAX_CORES_PER_SOCKET = 1024
MAX_THREADS_PER_CORE = 8
MAX_NODES_PER_SOCKET = 16
MAX_CHANNELS_PER_SOCKET = 32
MAX_DIMMS_PER_CHANNEL = 3  # DDR3/DDR4 boards went to 3 DIMMs per channel, DDR5 boards to 2
MAX_DIMM_GIB = 4096
MAX_GBPS = 10_000.0  # 10 TB/s: above HBM-on-package CPUs (Xeon Max: ~1 TB/s per socket)


class _Table:
    """One TOML table of a profile; every value taken from it is checked (checks.py)."""

    def __init__(self, data: dict, name: str, where: str, required: bool = True):
        value = data.get(name, _REQUIRED if required else {})
        if value is _REQUIRED:
            raise ConfigError(f"{where}: missing '{name}'", hint=_HINT)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: [{name}] must be a table, not {checks.shown(value)}", hint=_HINT)
        self.data, self.prefix = value, f"{where}: [{name}]"
        checks.known_keys(value, _KEYS[name], self.prefix,
                          hint=f"[{name}] takes {', '.join(_KEYS[name])}; {_HINT}")

    def has(self, key: str) -> bool:
        return key in self.data

    def value(self, key: str, default=_REQUIRED):
        """The raw value, the default when absent, a ConfigError when absent and required."""
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.prefix} missing '{key}'", hint=_HINT)
        return default

    def int(self, key: str, lo: int, hi: int, default=_REQUIRED) -> int:
        if key not in self.data and default is not _REQUIRED:
            return default
        return checks.number(self.value(key), f"{self.prefix} {key}", lo, hi, integer=True, hint=_HINT)

    def float(self, key: str, hi: float, default=_REQUIRED, hint: str = _HINT) -> float:
        """A positive figure: above 0, at most `hi`."""
        if key not in self.data and default is not _REQUIRED:
            return default
        return checks.number(self.value(key), f"{self.prefix} {key}", 0, hi, lo_open=True, hint=hint)

    def str(self, key: str, default=_REQUIRED, choices=None) -> str:
        if key not in self.data and default is not _REQUIRED:
            return default
        return checks.text(self.value(key), f"{self.prefix} {key}", choices, hint=_HINT)


def parse_hardware(data: dict, hw_id: str, where: str = "profile") -> HardwareProfile:
    """A profile from its TOML tables, every field checked for type and range (a bad one is a
    ConfigError naming the file, table and key; an unknown key is one too); missing bandwidth is
    estimated from the channel peak."""
    checks.known_keys(data, _KEYS[""], where, hint=f"a profile's top level takes {', '.join(_KEYS[''])}; {_HINT}")
    for key in ("name", "source"):
        if key in data:
            checks.text(data[key], f"{where}: {key}", hint=_HINT)
    cpu, mem = _Table(data, "cpu", where), _Table(data, "memory", where)
    bw = _Table(data, "bandwidth", where, required=False)
    sockets = cpu.int("sockets", 1, MAX_SOCKETS)
    cores = cpu.int("cores_per_socket", 1, MAX_CORES_PER_SOCKET)
    nps = cpu.int("numa_nodes_per_socket", 1, min(MAX_NODES_PER_SOCKET, cores), default=1)
    isa = checks.text_list(cpu.data.get("isa", []), f"{cpu.prefix} isa", ISA_FLAGS,
                           hint="flags as /proc/cpuinfo spells them, e.g. isa = [\"avx2\", \"avx512f\"]")
    mem_type = mem.str("type", default="")
    if mem_type:
        checks.text(mem_type, f"{mem.prefix} type", MEMORY_MTS, hint=_HINT)
    channels = mem.int("channels_per_socket", 1, MAX_CHANNELS_PER_SOCKET)
    mts = check_mts(mem.value("mts"), mem_type, f"{mem.prefix} mts" + (f" of {mem_type}" if mem_type else ""),
                    hint=_HINT)
    peak_node = theoretical_peak_gbps(channels, mts) / nps
    measured = bw.has("node_read_gbps")
    # A node cannot read faster than its channels carry (channels x MT/s x 8 B / nodes per socket).
    node_bw = bw.float("node_read_gbps", min(MAX_GBPS, peak_node), default=ESTIMATED_READ_FRACTION * peak_node,
                       hint=f"{channels} channels x {mts} MT/s x 8 B / {nps} nodes per socket = "
                            f"{peak_node:.1f} GB/s peak per node")
    return HardwareProfile(
        id=hw_id, name=data.get("name", hw_id), cpu_model=cpu.str("model"),
        sockets=sockets, cores_per_socket=cores,
        threads_per_core=cpu.int("threads_per_core", 1, MAX_THREADS_PER_CORE, default=1),
        numa_nodes_per_socket=nps,
        l3_groups_per_socket=cpu.int("l3_groups_per_socket", 1, cores, default=1),
        isa=isa, memory_type=mem_type, channels_per_socket=channels, mts=mts,
        dimms=mem.int("dimms", 1, MAX_DIMMS_PER_CHANNEL * channels * sockets, default=channels * sockets),
        dimm_gib=mem.int("dimm_gib", 1, MAX_DIMM_GIB),
        node_read_gbps=node_bw,
        core_read_gbps=bw.float("core_read_gbps", node_bw, default=min(DEFAULT_CORE_READ_GBPS, node_bw),
                                hint=f"one core reads at most what its node does ({node_bw:.1f} GB/s)"),
        remote_ratio=bw.float("remote_ratio", 1.0, default=default_remote_ratio(sockets, nps, cpu.str("model"))),
        bandwidth_measured=measured, source=data.get("source", ""))


def default_remote_ratio(sockets: int, nodes_per_socket: int, cpu_model: str) -> float:
    """Remote/local read ratio of a profile that does not give one: across sockets on a
    multi-socket box (most of its remote nodes are over the link), else between the nodes one
    socket is split into, which still share its memory fabric (far less so on Xeon's SNC)."""
    if sockets > 1:
        return DEFAULT_REMOTE_RATIO
    if nodes_per_socket > 1:
        # An unknown CPU gets the lower (SNC) figure.
        return INTRA_SOCKET_REMOTE_RATIO["amd" if vendor_of(cpu_model) == "AuthenticAMD" else "intel"]
    return 1.0


def hardware_dir() -> Path:
    return config_path("hardware")


def list_hardware() -> list[str]:
    return sorted(p.stem for p in hardware_dir().glob("*.toml"))


def load_hardware(spec: str | Path) -> HardwareProfile:
    """A shipped profile by name (`epyc-9655-2s`) or any TOML file by path."""
    path = Path(spec)
    if path.suffix != ".toml" and (not path.exists() or path.is_dir()):
        path = hardware_dir() / f"{spec}.toml"
    if not path.exists():
        raise ConfigError(f"no hardware profile '{spec}'",
                          hint="shipped profiles: " + ", ".join(list_hardware())
                          + "; or give the path of a TOML file")
    data = read_toml_file(path, hint="give the path of a hardware profile TOML")
    hw = parse_hardware(data, path.stem, where=str(path))
    return HardwareProfile(**{**{f: getattr(hw, f) for f in hw.__slots__}, "path": str(path)})


def machine_from_hardware(hw: HardwareProfile) -> MachineBandwidth:
    return MachineBandwidth(
        name=hw.name, sockets=hw.sockets, nodes=hw.nodes, cores=hw.cores,
        node_read_gbps=hw.node_read_gbps, core_read_gbps=hw.core_read_gbps,
        remote_ratio=hw.remote_ratio, mem_bytes=hw.mem_bytes, isa=hw.isa,
        threads_per_core=hw.threads_per_core, core_family=core_family(hw.cpu_model))


@dataclass(frozen=True, slots=True)
class Box:
    """A machine to predict for, the constants that go with it, and where both came from."""

    machine: MachineBandwidth
    calibration: Calibration
    source: str
    hardware: HardwareProfile | None = None
