"""fsutil: writes replace regular files only, refuse links and missing folders, and clean up
what killed writers leave."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cputune.core import fsutil
from cputune.model import synth
from cputune.core.errors import ConfigError, WriteError
from cputune.core.fsutil import atomic_write_text, clean_stale, scratch_dir, scratch_file
from helpers import children, running

ROOT = Path(__file__).resolve().parent.parent


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A cache root of the test's own, outside tmp_path's folders the tests write into."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# --- what may be replaced --------------------------------------------------------------------------

def test_writes_a_new_file_and_replaces_a_regular_one(tmp_path):
    p = tmp_path / "r.html"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two" and entries(tmp_path) == ["r.html"]


def test_a_fifo_is_refused_and_stays_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(WriteError) as e:
        atomic_write_text(fifo, "x")
    assert str(e.value) == f"{fifo} is a FIFO (named pipe), not a file; cputune only replaces regular files"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and entries(tmp_path) == ["pipe"]


def test_a_character_device_is_refused_and_stays_a_device(tmp_path):
    if os.geteuid() == 0:
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    else:  # mknod needs root; then /dev/null itself, which a non-root rename could not replace anyway
        dev = Path("/dev/null")
    before = os.lstat(dev)
    with pytest.raises(WriteError, match=f"^{dev} is a character device, not a file"):
        atomic_write_text(dev, "x")
    after = os.lstat(dev)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    if dev.parent == tmp_path:
        assert entries(tmp_path) == ["null"]  # no temporary file left beside it


def test_a_folder_and_a_socket_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(WriteError, match="d is a folder, not a file"):
        atomic_write_text(tmp_path / "d", "x")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock"))
        with pytest.raises(WriteError, match="sock is a socket, not a file"):
            atomic_write_text(tmp_path / "sock", "x")
    assert stat.S_ISSOCK(os.lstat(tmp_path / "sock").st_mode)


def test_a_symlink_is_refused_not_followed_and_not_replaced(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("mine")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(WriteError) as e:
        atomic_write_text(link, "new")
    assert str(e.value).startswith(f"{link} is a symbolic link (to {target})")
    assert str(target) in e.value.hint
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_text() == "mine"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(WriteError, match="is a symbolic link"):
        atomic_write_text(dangling, "new")
    assert not (tmp_path / "nowhere").exists()


def test_a_missing_folder_is_an_error_not_created(tmp_path):
    with pytest.raises(WriteError) as e:
        atomic_write_text(tmp_path / "no" / "such" / "r.html", "x")
    assert str(e.value) == f"folder {tmp_path / 'no' / 'such'} does not exist"
    assert "mkdir -p" in e.value.hint and not (tmp_path / "no").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="file is not a folder"):
        atomic_write_text(tmp_path / "file" / "r.html", "x")
    assert isinstance(e.value, ConfigError)  # cli.py reports it as one line


def test_cache_folders_are_created_and_make_parents_says_so_elsewhere(tmp_path):
    cached = fsutil.cache_root() / "twins" / "deeper" / "m.json"
    atomic_write_text(cached, "{}")  # cputune's own folder: made as needed
    assert cached.read_text() == "{}"
    atomic_write_text(tmp_path / "a" / "b.txt", "x", make_parents=True)
    assert (tmp_path / "a" / "b.txt").read_text() == "x"
    with pytest.raises(WriteError, match="does not exist"):
        atomic_write_text(fsutil.cache_root() / "other" / "x.json", "{}", make_parents=False)


def test_a_cache_root_behind_a_symlink_is_still_the_cache(tmp_path, monkeypatch):
    real = tmp_path / "real-cache"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "linked"))
    assert fsutil.in_cache(real / "cputune" / "machine.json")
    assert not fsutil.in_cache(tmp_path / "report.html")


# --- temporary files -------------------------------------------------------------------------------

def stale_name(pid: int = 999999, name: str = "deepseek2-512M-q4_k_m.gguf") -> str:
    return f"{fsutil.TEMP_PREFIX}{pid}-abcd1234.{name}"


def test_unlocked_old_temporaries_are_removed_at_the_next_write(tmp_path):
    stale = tmp_path / stale_name()
    stale.write_bytes(b"half a model")
    stale_dir = tmp_path / stale_name(name="m.gguf")
    (stale_dir).mkdir()
    (stale_dir / "m.gguf").write_bytes(b"shard")
    young = tmp_path / stale_name(name="young.gguf")
    young.write_bytes(b"just made")
    for p in (stale, stale_dir):
        age(p, 120)
    atomic_write_text(tmp_path / "points.json", "{}")
    assert entries(tmp_path) == sorted(["points.json", young.name])  # young: its writer may not have locked it yet


def test_a_locked_temporary_is_kept(tmp_path):
    busy = tmp_path / stale_name()
    busy.write_bytes(b"being written")
    age(busy, 3600)
    with open(busy, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # what a live writer holds
        assert clean_stale(tmp_path) == [] and busy.exists()
    assert clean_stale(tmp_path) == [busy] and not busy.exists()


def test_old_style_temporaries_go_from_the_cache_only(tmp_path):
    legacy = ".deepseek2-512M-q4_k_m.k3j9x0ab.gguf"  # mkstemp's name before TEMP_PREFIX
    legacy_dir = ".llama-512M-f16.x_19ab2c"  # synth's scratch folder before it
    user = tmp_path / "mine"
    cache = fsutil.cache_root() / "calibration-models"
    for d in (user, cache):
        d.mkdir(parents=True)
        (d / legacy).write_bytes(b"x")
        (d / legacy_dir).mkdir()
        (d / ".config.settings").write_bytes(b"not ours")  # a file: only folders had such names
        for name in (legacy, legacy_dir, ".config.settings"):
            age(d / name, 2 * fsutil.LEGACY_AGE_S)
    assert clean_stale(user) == []
    assert sorted(clean_stale(cache)) == sorted([cache / legacy, cache / legacy_dir])
    assert entries(cache) == [".config.settings"]


def test_scratch_file_and_dir_are_removed_on_ctrl_c(tmp_path):
    with pytest.raises(KeyboardInterrupt), scratch_file(tmp_path / "m.gguf") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(fsutil.TEMP_PREFIX) and tmp.name.endswith(".m.gguf")
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError), scratch_dir(tmp_path, "m.gguf") as d:
        (d / "m-00001-of-00002.gguf").write_bytes(b"partial")
        raise RuntimeError("disk on fire")
    assert entries(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from cputune.core import fsutil
with fsutil.scratch_file(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"26 MB of q4_k_m, pretend")
    os.kill(os.getpid(), signal.SIGKILL)  # no finally runs
"""


def test_a_killed_writers_file_is_removed_by_the_next_write(tmp_path):
    r = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "m.gguf")],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    [left] = tmp_path.iterdir()
    assert left.name.startswith(fsutil.TEMP_PREFIX) and left.read_bytes().startswith(b"26 MB")
    assert clean_stale(tmp_path) == []  # too young: a live writer may be between mkstemp and flock
    age(left, 120)
    atomic_write_text(tmp_path / "other.json", "{}")
    assert entries(tmp_path) == ["other.json"]


FAKE_QUANTIZE = """#!/bin/sh
echo "partial" > "$2"
echo started > "$(dirname "$2")/started"
exec sleep 60
"""

SLOW_QUANTIZE = """
import sys
from cputune.model import synth
synth.quantize(sys.argv[1], sys.argv[2], "Q4_K_M", sys.argv[3])
"""


def test_killed_quantize_leaves_no_process_and_its_file_goes_next_time(tmp_path):
    """A SIGKILLed cputune while llama-quantize writes: the tool dies with it (PR_SET_PDEATHSIG),
    and its temporary file is removed by the next write into the folder."""
    tool = tmp_path / "llama-quantize"
    tool.write_text(FAKE_QUANTIZE)
    tool.chmod(0o755)
    out = tmp_path / "models"
    out.mkdir()
    src = tmp_path / "f16.gguf"
    src.write_bytes(b"GGUF")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZE, str(src), str(out / "m-q4_k_m.gguf"), str(tool)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 30
        while not (out / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        sleeper = children(proc.pid)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in sleeper):
        assert time.monotonic() < deadline, "llama-quantize outlived cputune"
        time.sleep(0.05)
    (out / "started").unlink()
    [left] = out.iterdir()
    assert left.name.startswith(fsutil.TEMP_PREFIX) and left.name.endswith(".m-q4_k_m.gguf")
    age(left, 120)
    synth.write_model(out / "next-f16.gguf", synth.Shape("llama", n_layer=1, n_embd=256, n_ff=256, n_head=2,
                                                                n_head_kv=2, n_vocab=300, ctx=64))
    assert entries(out) == ["next-f16.gguf"]


# --- synth's writers -------------------------------------------------------------------------------

TINY = synth.Shape("llama", n_layer=1, n_embd=256, n_ff=256, n_head=2, n_head_kv=2, n_vocab=300, ctx=64)


def test_synth_keeps_user_paths_strict_and_refuses_a_link(tmp_path):
    with pytest.raises(WriteError, match="does not exist"):
        synth.write_model(tmp_path / "missing" / "m.gguf", TINY)
    assert not (tmp_path / "missing").exists()
    (tmp_path / "link.gguf").symlink_to(tmp_path / "elsewhere.gguf")
    with pytest.raises(WriteError, match="symbolic link"):
        synth.write_model(tmp_path / "link.gguf", TINY)
    assert entries(tmp_path) == ["link.gguf"]  # no scratch folder left
    twins = fsutil.cache_root() / "twins"
    [made] = synth.write_model(twins / "llama-1-f16.gguf", TINY)  # the cache's folder is made
    assert made.stat().st_size > 0 and entries(twins) == ["llama-1-f16.gguf"]
