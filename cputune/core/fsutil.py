"""Every file cputune writes goes through here: nothing the user had is lost, half-written or
replaced by something else if cputune dies mid-way or is pointed at the wrong path.

- A file is written to a temporary name beside its target and renamed over it (`os.replace`),
  so a reader sees the old file or the new one, never half of one.
- Only a regular file (or nothing) is replaced. A device, FIFO, socket or folder at the target
  is refused with a WriteError naming it: renaming over /dev/full would put a file where the
  device node was.
- A symbolic link at the target is refused too, not followed (see `check_target`).
- A missing folder is an error for a path the user chose (`--out`, `synth --out`); cputune's own
  cache folders are created (`make_parents`).
- State and settings files are read through `read_small_text` (or `open_regular`): only a
  regular file, opened without blocking, at most MAX_SMALL_FILE_BYTES, so a link to /dev/zero
  or a FIFO in their place is one line, not a 4 GB read or a hang.
- Temporary files and folders are named `.cputune-tmp-PID-XXXXXXXX.NAME` and hold an flock
  while their writer lives. A writer that was killed (SIGKILL, OOM, power) cannot remove its
  own; the next write into the same folder does (`clean_stale`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cputune.core.errors import ConfigError, CputuneError, WriteError

TEMP_PREFIX = ".cputune-tmp-"
_TEMP = re.compile(r"^\.cputune-tmp-(\d+)-")
# Names the temporary files had before TEMP_PREFIX: mkstemp's 8 random characters between the
# target's name and ".tmp"/".gguf", and synth's scratch folders. Without a lock to ask, these are
# only removed from cputune's own cache, and only once they are LEGACY_AGE_S old.
_LEGACY_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.(tmp|gguf)$")
_LEGACY_DIR = re.compile(r"^\.(.+\.|cputune-synth-)[a-z0-9_]{8}$")
LEGACY_AGE_S = 3600.0
# A temporary name is created a moment before its writer locks it; younger entries are left alone.
GRACE_S = 30.0


def home_dir(what: str, hint: str) -> Path:
    """The user's home folder, where `what` (the cache, the config file) lives by default; a
    ConfigError saying why there is none ($HOME unset and this user has no passwd entry, as in a
    container run with an arbitrary uid; or $HOME empty or relative) with `hint`, not
    Path.home()'s RuntimeError or a cache written under "/"."""
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):
        raise ConfigError(f"$HOME is {home!r}, not an absolute path, so there is no home folder for {what}",
                          hint=hint)
    try:
        found = Path.home()
    except (RuntimeError, KeyError):
        raise ConfigError(f"$HOME is not set and user {os.getuid()} has no entry in the password "
                          f"database, so there is no home folder for {what}", hint=hint) from None
    if not found.is_absolute():
        raise ConfigError(f"the home folder {str(found)!r} is not an absolute path, so there is no "
                          f"home folder for {what}", hint=hint)
    return found


def expand_home(value: str, source: str) -> Path:
    """`value` with a leading ~ or ~user made a home folder; ConfigError naming `source` when there
    is none."""
    try:
        return Path(value).expanduser()
    except (RuntimeError, KeyError):  # ~nosuchuser, or ~ with neither $HOME nor a passwd entry
        user = value[1:].split("/", 1)[0]
        why = (f"there is no user {user!r} on this machine, so ~{user} names no folder" if user
               else "~ names no folder here ($HOME is not set)")
        raise ConfigError(f"{source} {value!r}: {why}", hint="give the full path instead") from None


def cache_root() -> Path:
    """Builds, the machine profile and model caches live here (XDG base-directory spec)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(
        home_dir("cputune's cache (~/.cache/cputune)",
                 "set HOME to your home folder, or XDG_CACHE_HOME to the folder to keep the cache in") / ".cache")
    return Path(base) / "cputune"


def in_cache(path: Path | str) -> bool:
    """Whether `path` lies under cache_root() (as written, or with symbolic links resolved)."""
    root = cache_root()
    p = Path(os.path.abspath(path))
    if p.is_relative_to(os.path.abspath(root)):
        return True
    try:
        return p.parent.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


# No file cputune reads whole (machine.json, calibration.json, tuned.json, a hardware TOML,
# config.toml) comes near this: the largest, a tuned.json of many models, is a few hundred KB.
MAX_SMALL_FILE_BYTES = 64 << 20


def open_regular(path: Path | str, hint: str | None = None, *, error: type[CputuneError] = ConfigError,
                 noun: str = "a file", wrong_hint: str = "give the path of a file") -> tuple[int, os.stat_result]:
    """(fd, fstat) of a regular file opened for reading; `error` (ConfigError by default) naming
    `path` for a missing one, a symlink loop, anything else there (a folder, a device, a FIFO, a
    socket: "... is a FIFO (named pipe), not `noun`") or a failed open. It never blocks: a FIFO
    is refused by its stat, and O_NONBLOCK covers one swapped in after it. The one opener of the
    files cputune reads: its state files and settings, model files (error=GGUFError)."""
    path = Path(path)
    try:
        st = os.stat(path)  # before open(): opening some devices (a tape, a watchdog) acts on them
    except FileNotFoundError:
        raise error(f"{path} does not exist", hint=hint or "check the path") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path} is a symlink loop", hint="point the link at the file itself") from None
        raise error(f"cannot read {path} ({e.strerror})", hint=hint) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is {_kind(st.st_mode)}, not {noun}", hint=hint or wrong_hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"cannot read {path} ({e.strerror})", hint=hint) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{path} is {_kind(st.st_mode)}, not {noun}", hint=hint or wrong_hint)
    return fd, st


def read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`, in 1 MiB reads: whatever a file's size claims (a /proc
    file says 0, /dev/zero never ends), memory stays bounded. OSError passes through."""
    chunks, total = [], 0
    while total < limit:
        chunk = os.read(fd, min(1 << 20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_small_text(path: Path | str, limit: int = MAX_SMALL_FILE_BYTES, hint: str | None = None) -> str:
    """The text of a small regular file (a state document, a TOML of settings), read safely:
    open_regular's checks, at most `limit` bytes whatever the file claims (a /proc file says 0),
    UTF-8. Every failure is a ConfigError naming `path`."""
    path = Path(path)
    fd, st = open_regular(path, hint)
    too_big = ConfigError(f"{path} is larger than {limit >> 20} MiB, far more than any file cputune "
                          "reads; it is not one of cputune's files", hint=hint)
    try:
        if st.st_size > limit:
            raise too_big
        data = read_at_most(fd, limit + 1)
        if len(data) > limit:
            raise too_big
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e})", hint=hint) from None
    finally:
        os.close(fd)
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})", hint=hint) from None


def check_target(path: Path | str, make_parents: bool | None = None) -> Path:
    """The checks before anything is written to `path`; returns it as a Path.

    - Its folder must exist, unless `make_parents` (None: only inside cputune's cache, whose
      folders cputune owns; a folder the user named is never invented).
    - Nothing but a regular file may be there. A symbolic link is refused rather than followed:
      writing through it would rename a new file over whatever it points at, possibly outside
      the folder the user looked at (and as root anywhere); replacing the link itself would
      silently cut it. The message names the link's target so the user can pass that instead.
    """
    path = Path(path)
    parent = path.parent
    if make_parents is None:
        make_parents = in_cache(path)
    if make_parents:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise WriteError(f"cannot write {path}: {parent} is not a folder") from None
        except OSError as e:
            raise WriteError(f"cannot create the folder {parent}: {e.strerror}") from None
    elif not parent.is_dir():
        if parent.exists():
            raise WriteError(f"cannot write {path}: {parent} is not a folder")
        raise WriteError(f"folder {parent} does not exist", hint=f"create it first (mkdir -p {parent}) "
                         "or give a path in an existing folder")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        raise WriteError(f"{path} is a symbolic link (to {target}); cputune replaces files whole and "
                         "does not write through links", hint=f"give the file itself ({os.path.realpath(path)}) "
                         "or remove the link")
    if not stat.S_ISREG(st.st_mode):
        raise WriteError(f"{path} is {_kind(st.st_mode)}, not a file; cputune only replaces regular files",
                         hint="give the path of a file to write")
    return path


def _mode_for(path: Path) -> int:
    """The file's own mode when it exists, else what open() would give under the umask: mkstemp's
    0600 would otherwise make every rewritten report or model private."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _lock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a filesystem without flock: the pid in the name and the age still say whose it is


def _owner_gone(entry: Path, st: os.stat_result) -> bool:
    """A temporary entry nobody holds: its flock can be taken (the writer's fd died with it)."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        # No locks here: a pid that is not running on this box, and a day without a write.
        m = _TEMP.match(entry.name)
        return bool(m) and not _pid_alive(int(m.group(1))) and time.time() - st.st_mtime > 86400
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(entry: Path, st: os.stat_result) -> bool:
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True


def clean_stale(folder: Path | str) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `folder`; returns them.

    An entry is stale when no live process holds its lock. Entries younger than GRACE_S are kept
    (their writer may not have locked them yet). Older-style names (before TEMP_PREFIX) are only
    removed inside cputune's cache, once LEGACY_AGE_S old.
    """
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    legacy_ok = None
    now = time.time()
    removed = []
    for name in names:
        ours = name.startswith(TEMP_PREFIX)
        if not ours and not (_LEGACY_FILE.match(name) or _LEGACY_DIR.match(name)):
            continue
        entry = folder / name
        try:
            st = os.lstat(entry)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode) or now - st.st_mtime < GRACE_S:
            continue
        if not ours and not (_LEGACY_DIR if stat.S_ISDIR(st.st_mode) else _LEGACY_FILE).match(name):
            continue
        if ours:
            stale = _owner_gone(entry, st)
        else:
            if legacy_ok is None:
                legacy_ok = in_cache(folder / "x")
            stale = legacy_ok and now - st.st_mtime > LEGACY_AGE_S
        if stale and _remove(entry, st):
            removed.append(entry)
    return removed


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


@contextmanager
def scratch_file(target: Path | str, make_parents: bool | None = None) -> Iterator[Path]:
    """A locked, empty temporary file beside `target` (checked as check_target does), for a writer
    that is another program (llama-quantize). Move it into place with `install`; whatever is
    left at the end, an exception or Ctrl-C included, is removed."""
    target = check_target(target, make_parents)
    clean_stale(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix="." + target.name,
                                   dir=target.parent)
    except OSError as e:
        raise WriteError(f"cannot write in {target.parent}: {e.strerror}") from None
    _lock(fd)
    try:
        os.fchmod(fd, _mode_for(target))
        yield Path(tmp)
    finally:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def scratch_dir(folder: Path | str, label: str, make_parents: bool | None = None) -> Iterator[Path]:
    """A locked temporary folder in `folder` for files made together (shards; a model to
    quantize), removed with everything in it at the end, an exception or Ctrl-C included."""
    folder = Path(folder)
    check_target(folder / label, make_parents)
    clean_stale(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), suffix="." + label, dir=folder))
    except OSError as e:
        raise WriteError(f"cannot write in {folder}: {e.strerror}") from None
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    _lock(fd)
    try:
        yield tmp
    finally:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def install(tmp: Path | str, target: Path | str) -> Path:
    """Rename a finished temporary file over `target` (same folder), after check_target once more."""
    target = check_target(target, make_parents=False)
    try:
        os.replace(tmp, target)
    except OSError as e:
        raise WriteError(f"cannot write {target}: {e.strerror}") from None
    return target


def atomic_write_bytes(path: Path | str, data: bytes, make_parents: bool | None = None) -> None:
    """Write `data` to `path` whole or not at all, keeping an existing file's mode.

    `make_parents`: create missing folders (None, the default: only inside cputune's cache).
    Raises WriteError for a missing folder, a target that is not a regular file, a symbolic link,
    or a failed write (ENOSPC, EACCES ...), naming the path; the old file is then untouched.
    """
    path = check_target(path, make_parents)
    mode = _mode_for(path)
    clean_stale(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix="." + path.name, dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror}") from None
    try:
        _lock(fd)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            install(tmp, path)  # still locked: clean_stale in another process leaves it alone
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str, make_parents: bool | None = None) -> None:
    atomic_write_bytes(path, text.encode(), make_parents)
