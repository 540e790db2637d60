"""Plain helpers shared by several test modules (fixtures live in conftest.py).

Importable as `helpers` in both import modes: pyproject's [tool.pytest.ini_options] puts tests/ on
sys.path (`pythonpath`). A test module never imports another test module (test_layout.py checks).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import psutil

from cputune.core import launch
from cputune.machine.hwloc_xml import load_hwloc_xml
from cputune.machine.topology import NumaNode, Topology

FIXTURES = Path(__file__).parent / "fixtures"
GiB = 1 << 30


# --- hwloc's recorded sysfs trees (tests/fixtures/sysfs/NAME.tar.bz2) ---------------------------

def check_inside(member: tarfile.TarInfo) -> None:
    """Refuse a member whose name or link target leaves the extracted tree."""
    paths = [member.name]
    if member.issym():  # relative to the link's own folder
        paths.append(posixpath.join(posixpath.dirname(member.name), member.linkname))
    elif member.islnk():  # relative to the archive's root
        paths.append(member.linkname)
    for path in map(posixpath.normpath, paths):
        if path.startswith("/") or path == ".." or path.startswith("../"):
            raise ValueError(f"{member.name} leaves the extracted tree")


def _inside_tree(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # A cheaper filter than "data", which resolves a realpath for each of the 13,000 members;
    # dropping the recorded owners also spares root a user and group lookup per member.
    check_inside(member)
    return member.replace(uid=None, gid=None, uname=None, gname=None, deep=False)


def extract_tree(tarball: Path, dest: Path) -> Path:
    """Extract one recorded tree; returns its top folder (named as hwloc recorded it, which is
    not always the tarball's name). Tests use the session fixture `sysfs_tree`, which calls this
    once per tarball and run."""
    with tarfile.open(tarball) as tf:
        if hasattr(tarfile, "data_filter"):  # extraction filters: Python 3.10.12+, 3.11.4+
            tf.extractall(dest, filter=_inside_tree)
        else:  # pragma: no cover
            for member in tf.getmembers():
                check_inside(member)
            tf.extractall(dest)
    (top,) = [p for p in dest.iterdir() if p.is_dir()]
    return top


# --- live processes: orphan checks ------------------------------------------------------------
# psutil reads /proc/PID/stat for these; it sees only this box's live processes, so recorded /proc
# trees (serve.thread_affinities on tests/fixtures/proc_task) stay with cputune.core.sysfs.SysRoot.

def running(pid: int) -> bool:
    """The process exists and has not exited: a zombie is only waiting for its parent to reap it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def children(pid: int) -> list[int]:
    """Running children of `pid` (none when it has gone)."""
    try:
        kids = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    return [k.pid for k in kids if running(k.pid)]


def process_group(pgid: int) -> list[int]:
    """Running processes of process group `pgid` (psutil has no pgid: os.getpgid asks the kernel)."""
    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and running(p.pid):
                members.append(p.pid)
        except ProcessLookupError:
            continue  # exited while we looked
    return members


# --- placement on lstopo XMLs of modern servers ------------------------------------------------

SERVER_FLAGS = launch.parse_help_flags((FIXTURES / "llama_help" / "0c1e57098-llama-server.txt").read_text())


def nps1(t: Topology, mem_per_node_bytes: int) -> Topology:
    """An lstopo XML made from a CPUID dump has one NUMA node for the whole box (fixtures README);
    booted in NPS1 (AMD) or with SNC off (Intel) the same box has one node per socket."""
    nodes = tuple(NumaNode(id=p.id, cpus=p.cpus, mem_total_bytes=mem_per_node_bytes,
                           mem_free_bytes=mem_per_node_bytes, distances=(10, 32) if p.id == 0 else (32, 10),
                           merged_node_ids=(p.id,)) for p in t.packages)
    return replace(t, nodes=nodes, cores=tuple(replace(c, node_id=c.package_id) for c in t.cores),
                   packages=tuple(replace(p, node_ids=(p.id,)) for p in t.packages),
                   allowed_node_ids=tuple(n.id for n in nodes))


def xml_box(name: str, mem_per_node_gib: int) -> Topology:
    return nps1(load_hwloc_xml(FIXTURES / "hwloc" / f"{name}.xml"), mem_per_node_gib * GiB)


# --- llama-server -------------------------------------------------------------------------------

HOST = "127.0.0.1"


@contextlib.contextmanager
def serving(bin_dir: Path, model: Path, log_path: Path, *extra: str) -> Iterator[launch.Server]:
    port = launch.free_port(HOST)
    argv = [str(bin_dir / "llama-server"), "-m", str(model), "--host", HOST, "--port", str(port),
            "-t", "2", "-c", "256", "-np", "1", *extra]
    server = launch.start_server(argv, HOST, port, log_path=log_path)
    try:
        server.wait_ready(timeout_s=120)
        yield server
    finally:
        server.stop()


def complete(server: launch.Server, n_predict: int = 4) -> dict:
    # ignore_eos: random weights may well sample </s> first; temperature 0 makes the run repeatable.
    code, body = launch.http_json(server.url + "/completion", {
        "prompt": "The quick brown fox", "n_predict": n_predict, "ignore_eos": True, "temperature": 0.0,
        "seed": 1}, timeout=60)
    assert code == 200, body
    return body


def default_sigint() -> None:
    """A Popen preexec_fn: the child starts with SIGINT at its default, as a program started in the
    foreground from a shell does. A test run started in the background without job control
    (`pytest &`, `nohup`, some CI runners) inherits SIGINT ignored, and cputune rightly keeps an
    inherited SIG_IGN, so a test that sends SIGINT would otherwise see it lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

