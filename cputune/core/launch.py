"""Starting and stopping llama.cpp processes: llama-server until /health says ready, and
back down without orphans. Placement decisions are made elsewhere; this runs an argv."""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
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

from cputune.core.errors import EngineError, NetworkError, ProcessFailed, process_failed
from cputune.core.fsutil import cache_root

LOGS_KEPT = 20  # per program: the newest logs of llama-server (or ggml-rpc-server) runs
PR_SET_PDEATHSIG = 1  # include/uapi/linux/prctl.h


def log_dir() -> Path:
    return cache_root() / "logs"


def engine_log_base(program: str) -> Path:
    """Where an engine that keeps its own log file (ik_llama.cpp's common writes llama.log into
    the working directory unless told `--log-file BASE`, adding .log) writes it: the logs folder,
    one file per program, replaced each run, so the user's directory is left as it was."""
    d = log_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{program}-own"


def new_log_path(program: str) -> Path:
    """A fresh log file under the cache's logs/ folder; older ones beyond LOGS_KEPT are removed."""
    d = log_dir()
    d.mkdir(parents=True, exist_ok=True)
    old = sorted(d.glob(f"{program}-*.log"), key=lambda p: p.stat().st_mtime)
    for stale in old[:max(0, len(old) - LOGS_KEPT + 1)]:
        stale.unlink(missing_ok=True)
    return d / f"{program}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def program_name(argv: Sequence[str]) -> str:
    """The llama.cpp program an argv runs, past a `numactl ...` prefix."""
    words = list(argv)
    if words and Path(words[0]).name == "numactl":
        words = [w for w in words[1:] if not w.startswith("-")]
    return Path(words[0]).name if words else "?"


_FLAG = re.compile(r"(?:^|[\s,])(--?[A-Za-z][A-Za-z0-9_-]*)")
# Where an option's names end: two or more spaces after a name or metavar; after a comma the
# list goes on ("-t,    --threads N").
_NAMES_END = re.compile(r"(?<=[^,\s])\s{2,}")
# Option lines start within this many columns; description lines (and their "- value:" lists)
# start at the description column: 40 in mainline, 34 in ik_llama.cpp.
_OPTION_INDENT = 16


def parse_help_flags(text: str) -> frozenset[str]:
    """Every option a llama.cpp program's --help lists, aliases included.

    Mainline's common/arg.cpp prints an option's names (and metavar) from column 0, padded to
    column 40, then the description; a line too long for that column holds names only.
    ik_llama.cpp's common/common.cpp @8337e4cd indents names by 2 columns, and long-only options
    by 9 ("         --numa TYPE"), with descriptions from column 34; its llama-bench, like
    mainline's, indents 2 and may put "(default: ...)" right after a metavar.
    """
    flags = set()
    for line in text.splitlines():
        stripped = line.lstrip()
        if not stripped.startswith("-") or len(line) - len(stripped) >= _OPTION_INDENT:
            continue
        names = _NAMES_END.split(stripped.rstrip(), maxsplit=1)[0]
        flags.update(_FLAG.findall(names))
    return frozenset(flags)


def help_text(binary: Path | str) -> str:
    """A llama.cpp program's --help, stdout and stderr (llama-quantize prints it and exits 1),
    cached per file version; "" when it cannot run. Run in a scratch folder: ik_llama.cpp's
    programs write llama.log into the working directory, even for --help."""
    try:
        st = os.stat(binary)
    except OSError:
        return ""
    return _help_text(os.path.abspath(binary), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _help_text(binary: str, mtime_ns: int, size: int) -> str:
    try:
        with tempfile.TemporaryDirectory(prefix="cputune-help-") as scratch:
            p = subprocess.run([binary, "--help"], capture_output=True, text=True, errors="replace",
                               timeout=60, cwd=scratch, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return p.stdout + p.stderr


def help_flags(binary: Path | str) -> frozenset[str]:
    """The options this build of a llama.cpp program takes, from its --help: flags get renamed
    between builds (--no-mmap became --load-mode in PR #20834)."""
    text = help_text(binary)
    return parse_help_flags(text) if text else frozenset()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port now (the bind() error), or None when it can.
    The address family is the host's own (an IPv6 address binds an AF_INET6 socket)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        return e if isinstance(e, OSError) else OSError(errno.EINVAL, str(e))
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e
    return None


def port_in_use(host: str, port: int) -> bool:
    """Something listens on host:port (EADDRINUSE); other bind errors are not "in use"."""
    e = bind_error(host, port)
    return e is not None and e.errno == errno.EADDRINUSE


def check_can_listen(host: str, port: int, option: str = "--port") -> None:
    """A NetworkError with the real cause when nothing could listen on host:port."""
    e = bind_error(host, port)
    if e is None:
        return
    if e.errno == errno.EADDRINUSE:
        raise NetworkError(f"port {port} on {host} is already in use",
                           hint=f"pick another with {option}, or stop what is listening there")
    if e.errno == errno.EADDRNOTAVAIL:
        raise NetworkError(f"cannot listen on {host}: it is not an address of this machine",
                           hint="use 127.0.0.1, 0.0.0.0 (every interface) or an address `ip -brief address` lists")
    if e.errno == errno.EACCES:
        raise NetworkError(f"cannot listen on port {port}: ports below 1024 need root "
                           "(or CAP_NET_BIND_SERVICE)", hint=f"pick a port from 1024 up with {option}")
    if isinstance(e, socket.gaierror):
        raise NetworkError(f"cannot listen on {host!r}: {e.strerror or e}",
                           hint="give an IP address or a host name this machine resolves")
    raise NetworkError(f"cannot listen on {host}:{port}: {e.strerror or e}")


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
    """A running llama-server (or ggml-rpc-server). Use as a context manager, or call stop()."""

    argv: list[str]
    host: str
    port: int
    proc: subprocess.Popen
    log_path: Path
    started_s: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return program_name(self.argv)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def health_state(self) -> str | None:
        """None when /health answers 200; 503 while loading (tools/server/README.md)."""
        try:
            code, _ = http_json(self.url + "/health", timeout=2.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return "starting"
        return None if code == 200 else "loading model"

    def wait_ready(self, timeout_s: float | None = 300.0,
                   progress: Callable[[float, str], None] | None = None,
                   probe: Callable[[], str | None] | None = None) -> None:
        """Poll `probe` (default: /health) until it returns None; it returns a state text before.
        `timeout_s` None waits as long as the process lives (a 700 GB model loads for minutes)."""
        probe = probe or self.health_state
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise process_failed(self.name, self.argv, rc, self.log_tail(), " before it was ready",
                                     log_path=str(self.log_path), hint="read the log lines above")
            state = probe()
            if state is None:
                return
            if progress:
                progress(time.monotonic() - self.started_s, state)
            if deadline is not None and time.monotonic() > deadline:
                self.stop()
                raise ProcessFailed(f"{self.name} was not ready after {timeout_s:.0f} s",
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


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _die_with_parent(prctl) -> Callable[[], None]:
    # Runs in the forked child before exec: the kernel sends SIGTERM when cputune exits, even by
    # SIGKILL, and the setting survives the exec of numactl and of the server (prctl(2)).
    def set_pdeathsig() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return set_pdeathsig


def die_with_parent() -> Callable[[], None]:
    """A Popen preexec_fn: the child gets SIGTERM when cputune dies (llama-bench, llama-quantize)."""
    return _die_with_parent(_libc().prctl)


def start_server(argv: Sequence[str], host: str, port: int, env: dict | None = None,
                 log_path: Path | None = None, die_with_parent: bool = False) -> Server:
    """Start llama-server (argv must already carry --host/--port) in its own process group.

    Without `log_path` the output goes to a new file under the cache's logs/ folder.
    """
    check_can_listen(host, port)
    if log_path is None:
        log_path = new_log_path(program_name(argv))
    preexec = _die_with_parent(_libc().prctl) if die_with_parent else None
    log = open(log_path, "w")
    try:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                preexec_fn=preexec)
    except OSError as e:
        hint = ("install numactl (apt install numactl)" if Path(argv[0]).name == "numactl"
                else "run `cputune build` to (re)build llama.cpp")
        raise EngineError(f"cannot start {argv[0]}: {e.strerror}", hint=hint) from e
    finally:
        log.close()
    return Server(list(argv), host, port, proc, Path(log_path))
