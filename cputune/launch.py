"""Starting and stopping llama.cpp processes: llama-server until /health says ready, and
back down without orphans. Placement decisions are made elsewhere; this runs an argv."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cputune.errors import ConfigError, ProcessFailed


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def http_json(url: str, payload: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body or b"{}")
        except ValueError:
            return e.code, {"raw": body.decode(errors="replace")}


@dataclass
class Server:
    """A running llama-server. Use as a context manager, or call stop()."""

    argv: list[str]
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    started_s: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0,
                   progress: Callable[[float, str], None] | None = None) -> None:
        """Poll /health: 503 while loading, 200 when ready (tools/server/README.md)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ProcessFailed(f"llama-server exited with code {rc} before it was ready",
                                    self.argv, rc, self.log_tail(), log_path=str(self.log_path),
                                    hint="read the log lines above")
            try:
                code, _ = http_json(self.url + "/health", timeout=2.0)
                if code == 200:
                    return
                state = "loading model"
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                state = "starting"
            if progress:
                progress(time.monotonic() - self.started_s, state)
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessFailed(f"llama-server was not ready after {timeout_s:.0f} s",
                                    self.argv, None, self.log_tail(), log_path=str(self.log_path))
            time.sleep(0.2)

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM the process group, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(argv: Sequence[str], host: str, port: int, env: dict | None = None,
                 log_path: Path | None = None) -> Server:
    """Start llama-server (argv must already carry --host/--port) in its own process group."""
    if port_in_use(host, port):
        raise ConfigError(f"port {port} on {host} is already in use",
                          hint="pick another with --port, or stop what is listening there")
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="cputune-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log = open(log_path, "w")
    try:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    except OSError as e:
        raise ConfigError(f"cannot start {argv[0]}: {e.strerror}",
                          hint="run `cputune build` to (re)build llama.cpp") from e
    finally:
        log.close()
    return Server(list(argv), host, port, proc, Path(log_path))
