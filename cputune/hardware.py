"""Hardware descriptions: configs/hardware/*.toml for boxes not at hand, the probe profile for this one.

Both become the predictor's MachineBandwidth, so `predict`, `select` and `plan` treat a box
being planned and the box being measured the same way. A profile file says which of its
bandwidth figures were measured and which were estimated from the channel arithmetic.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from cputune.data import config_path
from cputune.errors import ConfigError
from cputune.memory import theoretical_peak_gbps
from cputune.predictor import Calibration, MachineBandwidth, Settings

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


def _need(table: dict, key: str, where: str):
    if key not in table:
        raise ConfigError(f"{where}: missing '{key}'",
                          hint="see configs/hardware/README.md for the fields a profile needs")
    return table[key]


def parse_hardware(data: dict, hw_id: str, where: str = "profile") -> HardwareProfile:
    """A profile from its TOML tables; missing bandwidth is estimated from the channel peak."""
    cpu = _need(data, "cpu", where)
    mem = _need(data, "memory", where)
    bw = data.get("bandwidth", {})
    sockets = int(_need(cpu, "sockets", where))
    nps = int(cpu.get("numa_nodes_per_socket", 1))
    channels = int(_need(mem, "channels_per_socket", where))
    mts = int(_need(mem, "mts", where))
    for key, value in (("sockets", sockets), ("numa_nodes_per_socket", nps),
                       ("channels_per_socket", channels), ("mts", mts)):
        if value < 1:
            raise ConfigError(f"{where}: '{key}' must be at least 1, not {value}")
    measured = "node_read_gbps" in bw
    node_bw = float(bw.get("node_read_gbps",
                           ESTIMATED_READ_FRACTION * theoretical_peak_gbps(channels, mts) / nps))
    return HardwareProfile(
        id=hw_id, name=str(data.get("name", hw_id)), cpu_model=str(_need(cpu, "model", where)),
        sockets=sockets, cores_per_socket=int(_need(cpu, "cores_per_socket", where)),
        threads_per_core=int(cpu.get("threads_per_core", 1)), numa_nodes_per_socket=nps,
        l3_groups_per_socket=int(cpu.get("l3_groups_per_socket", 1)),
        isa=tuple(cpu.get("isa", ())), memory_type=str(mem.get("type", "")),
        channels_per_socket=channels, mts=mts,
        dimms=int(mem.get("dimms", channels * sockets)), dimm_gib=int(_need(mem, "dimm_gib", where)),
        node_read_gbps=node_bw,
        core_read_gbps=float(bw.get("core_read_gbps", DEFAULT_CORE_READ_GBPS)),
        remote_ratio=float(bw.get("remote_ratio", DEFAULT_REMOTE_RATIO if sockets > 1 or nps > 1 else 1.0)),
        bandwidth_measured=measured, source=str(data.get("source", "")))


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
        remote_ratio=hw.remote_ratio, mem_bytes=hw.mem_bytes, isa=hw.isa)


def auto_numa(m: MachineBandwidth, need_bytes: int) -> str:
    """serve's `auto` (placement.plan_placement): one node when the model fits in one node's
    memory, else weights interleaved over all nodes (numactl --interleave=all)."""
    if m.nodes <= 1 or need_bytes <= m.mem_bytes // m.nodes:
        return "one-node"
    return "interleave"


def default_threads(m: MachineBandwidth, numa: str) -> int:
    """What serve would use: the physical cores of the nodes the policy spans."""
    return m.cores_per_node if numa == "one-node" else m.cores


def default_settings(m: MachineBandwidth, model, numa: str = "auto", threads: int | None = None,
                     depth: int = 0, cache_type: str = "f16", ctx_tokens: int = 4096) -> Settings:
    """The settings a prediction assumes when the user gives only some of them; `auto` sizes the
    model as serve will load it (mmap, repack copy, KV cache at ctx_tokens)."""
    from cputune.selector import ram_needed

    if numa == "auto":
        need = ram_needed(model, max(ctx_tokens, depth), cache_type, isa=m.isa).total_bytes
        numa = auto_numa(m, need)
    return Settings(threads=threads or default_threads(m, numa), numa=numa, depth=depth,
                    cache_type=cache_type)


def machine_from_profile(profile) -> MachineBandwidth:
    """The predictor's view of a saved probe (cputune.probe.MachineProfile)."""
    t, bw = profile.inventory.topology, profile.bandwidth
    cores_per_node = max(len(t.first_thread_per_core()) // max(len([n for n in t.nodes if n.cpus]), 1), 1)
    node_bw = max(bw.node_read_gbps.values())
    one_core = bw.sweep_read_gbps[0][1] if bw.sweep_read_gbps and bw.sweep_read_gbps[0][0] == 1 \
        else node_bw / cores_per_node
    remote = [g / bw.node_read_gbps[i] for i, _, g in bw.matrix_read_gbps if bw.node_read_gbps.get(i)]
    cpu_nodes = [n for n in t.nodes if n.cpus]
    return MachineBandwidth(
        name=profile.hostname, sockets=len(t.packages), nodes=len(cpu_nodes),
        cores=len(t.first_thread_per_core()), node_read_gbps=node_bw, core_read_gbps=one_core,
        remote_ratio=min(remote) if remote else 1.0,
        mem_bytes=profile.inventory.memory.mem_total_bytes or 0, isa=t.isa_flags)


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
    cal = calibrate.load_calibration()
    return Box(machine_from_profile(profile), cal or calibrate.default_calibration(),
               f"probe profile {path}" + ("" if cal else " (not calibrated: run `cputune calibrate`)"))
