"""The predictor's machine from a saved probe profile (cputune.machine.probe.MachineProfile): the figures
checked as a hardware profile's are, so a damaged machine.json names its field."""

from __future__ import annotations

from cputune.core import checks
from cputune.core.cores import identify_core
from cputune.core.errors import ConfigError
from cputune.machine.topology import own_caches
from cputune.predict.hardware import (GIB, MAX_CHANNELS_PER_SOCKET, MAX_CORES_PER_SOCKET, MAX_DIMM_GIB,
                              MAX_DIMMS_PER_CHANNEL, MAX_GBPS, MAX_NODES_PER_SOCKET, MAX_SOCKETS)
from cputune.predict.predictor import MachineBandwidth


def machine_from_profile(profile) -> MachineBandwidth:
    """The predictor's view of a saved probe (cputune.machine.probe.MachineProfile). Its figures are
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
    family, told = identify_core(t.cpu_model, t.cpu_vendor, t.cpu_family_id, t.cpu_model_id, t.isa_flags,
                                 own_caches(t))
    return MachineBandwidth(
        name=profile.hostname, sockets=len(t.packages), nodes=len(cpu_nodes),
        cores=cores, node_read_gbps=node_bw, core_read_gbps=min(one_core, node_bw),
        # A remote read measured a little above the local one is noise: the ratio is at most 1.
        remote_ratio=min(min(remote), 1.0) if remote else 1.0,
        mem_bytes=mem, isa=t.isa_flags, threads_per_core=max(t.threads_per_core, 1),
        core_family=family, core_told=told)
