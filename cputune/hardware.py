"""Hardware descriptions: configs/hardware/*.toml for boxes not at hand, the probe profile for this one.

Both become the predictor's MachineBandwidth, so `predict`, `select` and `plan` treat a box
being planned and the box being measured the same way. A profile file says which of its
bandwidth figures were measured and which were estimated from the channel arithmetic.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cputune import checks, numa_policy
from cputune.cores import core_family
from cputune.data import config_path
from cputune.numa_policy import NumaDecision
from cputune.errors import ConfigError
from cputune.memory import MEMORY_MTS, check_mts, theoretical_peak_gbps
from cputune.predictor import Calibration, MachineBandwidth, Settings, cache_type_name, check_context
from cputune.topology import ISA_FLAGS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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
    ConfigError naming the file, table and key); missing bandwidth is estimated from the channel peak."""
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
        remote_ratio=bw.float("remote_ratio", 1.0,
                              default=DEFAULT_REMOTE_RATIO if sockets > 1 or nps > 1 else 1.0),
        bandwidth_measured=measured, source=data.get("source", ""))


def hardware_dir() -> Path:
    return config_path("hardware")


def list_hardware() -> list[str]:
    return sorted(p.stem for p in hardware_dir().glob("*.toml"))


def load_hardware(spec: str | Path) -> HardwareProfile:
    """A shipped profile by name (`epyc-9655-2s`) or any TOML file by path."""
    path = Path(spec)
    if path.suffix != ".toml" and not path.exists():
        path = hardware_dir() / f"{spec}.toml"
    if not path.is_file():
        raise ConfigError(f"no hardware profile '{spec}'",
                          hint="shipped profiles: " + ", ".join(list_hardware())
                          + "; or give the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    hw = parse_hardware(data, path.stem, where=str(path))
    return HardwareProfile(**{**{f: getattr(hw, f) for f in hw.__slots__}, "path": str(path)})


def machine_from_hardware(hw: HardwareProfile) -> MachineBandwidth:
    return MachineBandwidth(
        name=hw.name, sockets=hw.sockets, nodes=hw.nodes, cores=hw.cores,
        node_read_gbps=hw.node_read_gbps, core_read_gbps=hw.core_read_gbps,
        remote_ratio=hw.remote_ratio, mem_bytes=hw.mem_bytes, isa=hw.isa,
        threads_per_core=hw.threads_per_core, core_family=core_family(hw.cpu_model))


def numa_decision(m: MachineBandwidth, need_bytes: int | None, numa: str = "auto",
                  threads: int | None = None, numactl: bool = True) -> NumaDecision:
    """The one NUMA rule (numa_policy.decide) on a predictor machine: a node offers its share of
    the box's memory."""
    return numa_policy.decide(nodes=m.nodes, cores_per_node=m.cores_per_node, need_bytes=need_bytes,
                              node_bytes=numa_policy.node_bytes_of_box(m.mem_bytes, m.nodes),
                              numactl=numactl, requested=numa, threads=threads,
                              threads_per_core=m.threads_per_core)


def plan_settings(m: MachineBandwidth, model, numa: str = "auto", threads: int | None = None,
                  depth: int = 0, cache_type: str = "f16", ctx_tokens: int = 4096, *,
                  numactl: bool = True, engine: str = "llama.cpp",
                  page_size: str = "2M") -> tuple[Settings, NumaDecision]:
    """The settings a prediction assumes when the user gives only some of them, and the NUMA
    decision behind them; the model is sized as serve will load it (mmap, repack copy, KV cache
    at ctx_tokens)."""
    from cputune.selector import ram_needed

    cache_type = cache_type_name(cache_type)
    check_context(model, depth, f"a depth of {depth} tokens")
    need = ram_needed(model, max(ctx_tokens, depth), cache_type, isa=m.isa).total_bytes
    d = numa_decision(m, need, numa, threads, numactl)
    return Settings(threads=d.threads, numa=d.policy, depth=depth, cache_type=cache_type,
                    engine=engine, page_size=page_size), d


def page_size_of(box: "Box") -> str:
    """The page size predictions assume: huge pages for a described box (what the published runs
    used), this box's own THP setting otherwise ("always" backs the weights with 2 MiB pages once
    llama.cpp copies or repacks them; madvise/never leave 4 KiB ones)."""
    if box.hardware is not None:
        return "2M"
    from cputune import probe

    try:
        thp = probe.load_profile().inventory.memory.thp_enabled
    except Exception:  # an unreadable profile was reported when the box was resolved
        thp = None
    return "2M" if thp == "always" else "4K"


def default_settings(m: MachineBandwidth, model, numa: str = "auto", threads: int | None = None,
                     depth: int = 0, cache_type: str = "f16", ctx_tokens: int = 4096) -> Settings:
    """plan_settings' Settings alone."""
    return plan_settings(m, model, numa, threads, depth, cache_type, ctx_tokens)[0]


def machine_from_profile(profile) -> MachineBandwidth:
    """The predictor's view of a saved probe (cputune.probe.MachineProfile). Its figures are
    checked as a hardware profile's are: a ConfigError names the field (the caller adds the file)."""
    t, bw = profile.inventory.topology, profile.bandwidth

    def gbps(value, field: str) -> float:
        return checks.number(value, f"field profile.bandwidth.{field}", 0, MAX_GBPS, lo_open=True)

    cpu_nodes = [n for n in t.nodes if n.cpus]
    cores = len(t.first_thread_per_core())
    for name, n, hi in (("inventory.topology.packages", len(t.packages), MAX_SOCKETS),
                        ("inventory.topology.nodes (with CPUs)", len(cpu_nodes), MAX_SOCKETS * MAX_NODES_PER_SOCKET),
                        ("inventory.topology.cores", cores, MAX_SOCKETS * MAX_CORES_PER_SOCKET)):
        if not 1 <= n <= hi:
            raise ConfigError(f"field profile.{name} must list from 1 to {hi}, not {n}")
    if not bw.node_read_gbps:
        raise ConfigError("field profile.bandwidth.node_read_gbps is empty")
    node_read = {i: gbps(g, f"node_read_gbps[{i}]") for i, g in bw.node_read_gbps.items()}
    node_bw = max(node_read.values())
    cores_per_node = max(cores // len(cpu_nodes), 1)
    one_core = gbps(bw.sweep_read_gbps[0][1], "sweep_read_gbps[0]") \
        if bw.sweep_read_gbps and bw.sweep_read_gbps[0][0] == 1 else node_bw / cores_per_node
    remote = [gbps(g, f"matrix_read_gbps[{k}]") / node_read[i]
              for k, (i, _, g) in enumerate(bw.matrix_read_gbps) if i in node_read]
    mem = profile.inventory.memory.mem_total_bytes or 0
    checks.number(mem, "field profile.inventory.memory.mem_total_bytes", 0, MAX_SOCKETS * MAX_CHANNELS_PER_SOCKET
                  * MAX_DIMMS_PER_CHANNEL * (MAX_DIMM_GIB * GIB), integer=True)
    return MachineBandwidth(
        name=profile.hostname, sockets=len(t.packages), nodes=len(cpu_nodes),
        cores=cores, node_read_gbps=node_bw, core_read_gbps=min(one_core, node_bw),
        # A remote read measured a little above the local one is noise: the ratio is at most 1.
        remote_ratio=min(min(remote), 1.0) if remote else 1.0,
        mem_bytes=mem, isa=t.isa_flags, threads_per_core=max(t.threads_per_core, 1),
        core_family=core_family(t.cpu_model, t.cpu_vendor, t.cpu_family_id, t.cpu_model_id))


@dataclass(frozen=True, slots=True)
class Box:
    """A machine to predict for, the constants that go with it, and where both came from."""

    machine: MachineBandwidth
    calibration: Calibration
    source: str
    hardware: HardwareProfile | None = None


def resolve_box(spec: str | Path | None) -> Box:
    """--hardware: a shipped name or TOML path; none means this box's saved probe profile.

    A hardware profile gets the constants fitted to published big-server runs; this box gets
    its own `cputune calibrate` fit when there is one, else the shipped starting values.
    """
    from cputune import calibrate, probe

    if spec is not None:
        hw = load_hardware(spec)
        return Box(machine_from_hardware(hw), calibrate.default_calibration("published"),
                   f"hardware profile {hw.path}", hw)
    path = probe.profile_path()
    if not path.exists():
        raise ConfigError("no machine profile: this box has not been probed",
                          hint="run `cputune probe` first, or pass --hardware NAME "
                          f"(one of {', '.join(list_hardware())})")
    profile = probe.load_profile(path)
    if profile.bandwidth is None:
        raise ConfigError(f"{path} has no bandwidth measurement",
                          hint="run `cputune probe` without --no-bandwidth")
    try:
        machine = machine_from_profile(profile)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e.message}", hint=probe.REPROBE) from None
    cal = calibrate.load_calibration()
    return Box(machine, cal or calibrate.default_calibration(),
               f"probe profile {path}" + ("" if cal else " (not calibrated: run `cputune calibrate`)"))
