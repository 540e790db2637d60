"""Theoretical DRAM bandwidth: which channels are populated, at what speed, from which source.

Apart from memory.py (which reads what the machine says) because here several sources are
reconciled: dmidecode or udev DIMM records, a `--memory` spec the user typed, and the CPU
family's channel count from configs/cpu_models.csv.
"""

from __future__ import annotations

from dataclasses import dataclass

from cputune.machine.memory import (CpuMemorySpec, MemoryInfo, MemorySpec, count_channels,
                            cpu_memory_spec, theoretical_peak_gbps)
from cputune.machine.topology import Topology


@dataclass(frozen=True, slots=True)
class Peak:
    channels_per_socket: tuple[int, ...]
    mts: int
    per_socket_gbps: tuple[float, ...]
    total_gbps: float
    source: str  # dmidecode | udev | --memory
    cpu: CpuMemorySpec | None
    notes: tuple[str, ...]

    @property
    def channels(self) -> int:
        return sum(self.channels_per_socket)


def _spread(n: int, sockets: int) -> tuple[int, ...]:
    """n channels over sockets as evenly as a board can hold them (first sockets get the rest)."""
    return tuple(n // sockets + (1 if i < n % sockets else 0) for i in range(sockets))


def peak_bandwidth(topology: Topology, memory: MemoryInfo, spec: MemorySpec | None = None) -> Peak | None:
    """Peak = populated channels x MT/s x 8 B, per socket; None when no DIMM data and no spec."""
    sockets = max(len(topology.packages), 1)
    cpu = cpu_memory_spec(topology.cpu_model)
    cap = cpu.channels_per_socket * sockets if cpu else None
    notes: list[str] = []
    if spec is not None:
        source, mts = "--memory", spec.mts
        channels = min(spec.dimms, cap) if cap else spec.dimms
        if cap and spec.dimms > cap:
            notes.append(f"{spec.dimms} DIMMs on {cap} channels: 2 DIMMs per channel add capacity, "
                         "not bandwidth")
        per_socket = _spread(channels, sockets)
    elif memory.dimms:
        source = memory.dimm_source
        speeds = [d.configured_mts or d.rated_mts for d in memory.dimms]
        if not all(speeds):
            return None
        # The slowest DIMM sets the pace: a controller runs all its channels at one speed.
        mts = min(speeds)
        counted = count_channels(memory.dimms, sockets)
        if counted.channels is not None:
            per_socket = counted.per_socket
        else:
            n = min(len(memory.dimms), cap) if cap else len(memory.dimms)
            per_socket = _spread(n, sockets)
            notes.append("DIMM locators not understood (" + ", ".join(counted.unparsed_locators[:3])
                         + "): channels assumed to be one per DIMM")
    else:
        return None
    per_socket_gbps = tuple(theoretical_peak_gbps(c, mts) for c in per_socket)
    return Peak(channels_per_socket=tuple(per_socket), mts=mts, per_socket_gbps=per_socket_gbps,
                total_gbps=sum(per_socket_gbps), source=source, cpu=cpu, notes=tuple(notes))
