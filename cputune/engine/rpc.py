"""llama.cpp's RPC backend from cputune: worker addresses, the memory a worker reports, and which
layers llama-server gives each box. Separate from serve.py because `worker` needs it too.

The wire format is ggml/src/ggml-rpc/ggml-rpc.cpp @0c1e57098 (protocol 7.0.0): a request is
| cmd (1 byte) | size (u64) | data |, a reply | size (u64) | data |, little-endian, and a
connection starts with HELLO. ggml-rpc-server serves one client at a time, so a query must not
overlap llama-server's connection.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from cputune.core.errors import ConfigError, NetworkError
from cputune.core.checks import shown
from cputune.core.units import is_ascii_int

RPC_CMD_GET_DEVICE_MEMORY = 11
RPC_CMD_HELLO = 14  # static_assert'ed "must be always 14" in ggml-rpc.cpp
RPC_CMD_DEVICE_COUNT = 15
RPC_PROTO_MAJOR = 7
RPC_CONN_CAPS_SIZE = 24  # ggml-rpc/transport.h; all zero: plain TCP, no transport upgrade
DEFAULT_PORT = 50052  # ggml-rpc-server's default (tools/rpc/rpc-server.cpp)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class WorkerMemory:
    """What a worker reports over RPC, summed over its devices.

    ggml's CPU device reports the machine's total RAM as free on Linux ("free system memory is
    ill-defined", ggml-cpu.cpp ggml_backend_cpu_device_get_memory), so free_bytes == total_bytes
    for a CPU worker: cputune treats a worker box as otherwise idle.
    """

    endpoint: Endpoint
    protocol: str
    devices: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True, slots=True)
class LayerSplit:
    """Layers per box: llama-server keeps the first `local_units` repeating layers (and the
    token embeddings) and offloads the rest to the workers in order, the output layer last.

    A unit is one repeating layer or the output layer, as -ngl counts them (n_layer + 1 = all).
    """

    n_units: int
    local_units: int
    worker_units: tuple[int, ...]

    @property
    def n_gpu_layers(self) -> int:
        return self.n_units - self.local_units

    def llama_args(self) -> list[str]:
        """-ngl and --tensor-split: llama_model::load_tensors gives offloaded unit k to the first
        device whose cumulative split share exceeds k/ngl, so integer counts are exact."""
        if self.n_gpu_layers == 0:
            return ["-ngl", "0"]
        return ["-ngl", str(self.n_gpu_layers), "-ts", ",".join(str(u) for u in self.worker_units)]


def check_host(host: str, option: str = "--host") -> str:
    """`host` when it is an IP address or a name this machine resolves; else a ConfigError that
    says so (not, as a failed bind() read as "in use" did, that the port is taken)."""
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"{option} {host!r} is not an address: it must be an IP address or a host "
                          "name, without spaces", hint=f"for example {option} 127.0.0.1, or 0.0.0.0 for "
                          "every interface")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        why = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        raise ConfigError(f"{option} {host!r} is not an IP address or a host name this machine can "
                          f"resolve ({why})", hint=f"for example {option} 127.0.0.1, or 0.0.0.0 for "
                          "every interface") from None
    return host


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """'host:port,host:port' as llama-server's --rpc takes it (one ':' each; no IPv6 literals:
    ggml-rpc.cpp parse_endpoint splits at the first ':')."""
    out = []
    for part in (text or "").split(","):
        part = part.strip()
        host, sep, port = part.partition(":")
        if (not part or not sep or not host or any(c.isspace() for c in host) or ":" in port
                or not is_ascii_int(port) or not 0 < int(port) < 65536):
            raise ConfigError(f"--rpc {shown(text)}: {shown(part)} is not host:port",
                              hint="for example --rpc 192.168.1.20:50052,192.168.1.21:50052")
        out.append(Endpoint(host, int(port)))
    if len(set(out)) != len(out):
        raise ConfigError(f"--rpc {text!r} names a worker twice")
    return tuple(out)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the worker closed the connection")
        buf += chunk
    return buf


def _call(sock: socket.socket, cmd: int, payload: bytes) -> bytes:
    sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return _recv_exact(sock, size)


def query_memory(endpoint: Endpoint, timeout_s: float = 5.0) -> WorkerMemory:
    """HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY for each device, then close."""
    where = str(endpoint)
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s) as s:
            hello = _call(s, RPC_CMD_HELLO, bytes(RPC_CONN_CAPS_SIZE))
            major, minor, patch = hello[0], hello[1], hello[2]
            if major != RPC_PROTO_MAJOR:
                raise NetworkError(f"RPC worker {where} speaks protocol {major}.{minor}.{patch}, "
                                   f"this llama.cpp speaks {RPC_PROTO_MAJOR}.x",
                                   hint="run the worker from the same llama.cpp version (cputune worker)")
            (count,) = struct.unpack("<I", _call(s, RPC_CMD_DEVICE_COUNT, b""))
            free = total = 0
            for dev in range(count):
                f, t = struct.unpack("<QQ", _call(s, RPC_CMD_GET_DEVICE_MEMORY, struct.pack("<I", dev)))
                free, total = free + f, total + t
    except (OSError, ConnectionError, struct.error, IndexError) as e:
        why = "it did not answer in time (is another llama-server connected to it?)" \
            if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        raise NetworkError(f"cannot reach RPC worker {where}: {why}",
                           hint=f"start it there with `cputune worker --host 0.0.0.0 --port {endpoint.port}`"
                           ) from None
    return WorkerMemory(endpoint, f"{major}.{minor}.{patch}", count, free, total)


def split_layers(n_layer: int, capacities_bytes: Sequence[int]) -> LayerSplit:
    """Units (n_layer repeating layers + the output layer) in proportion to each box's capacity,
    capacities_bytes[0] being the local box: largest remainder, ties to the earlier box."""
    n_units = n_layer + 1
    caps = [max(0, int(c)) for c in capacities_bytes]
    total = sum(caps)
    if total == 0:
        return LayerSplit(n_units, n_units, tuple(0 for _ in caps[1:]))
    quotas = [n_units * c / total for c in caps]
    units = [int(q) for q in quotas]
    order = sorted(range(len(caps)), key=lambda i: (-(quotas[i] - units[i]), i))
    for i in order[:n_units - sum(units)]:
        units[i] += 1
    return LayerSplit(n_units, units[0], tuple(units[1:]))
