"""The run directory of ``train``: who may write it, what counts as a run, what a resume trusts.

- ``RunLock``: one training per directory at a time; a lock of a crashed run is taken over.
- ``classify`` / ``check_output``: a directory is written only if it is new, empty, or a packrnn
  run (it holds a packrnn checkpoint); anything else is refused, never written over.
- ``remove_stale_temp_files``: the hidden temp files a kill during an atomic write leaves.
- ``fingerprint`` / ``check_fingerprint``: a resume refuses a data file that changed.
- ``StopOnInterrupt``: Ctrl-C lets the training loop finish its step and save a checkpoint.

NOTE [run lock]
The lock is the file ``.packrnn.lock`` in the run directory, holding the holder's pid, host and
start time as JSON, plus an exclusive ``flock`` on it for as long as the holder lives. It is
created under a temporary name, locked and filled, then hard-linked into place, so nobody sees a
lock file without its content or its flock. ``flock`` is released by the kernel when its
process dies, however it dies, so a lock file whose flock is free was left by a dead process:
on the same host it is taken over with a message. A lock from another host is refused (its flock
may not reach us over a network file system), with the file to remove if that run is gone.
Without ``flock`` (no ``fcntl``, or a file system without locks) a same-host lock is stale when
its pid is not running.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .checkpoint import CHECKPOINT_NAME, is_checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunDirError", "RunLockedError", "RunLock", "classify", "check_output",
           "remove_stale_temp_files", "fingerprint", "check_fingerprint", "StopOnInterrupt",
           "TrainInterrupted"]

LOCK_NAME = ".packrnn.lock"
_HEAD_BYTES = 1 << 20  # the fingerprint hashes the first MiB
_LOCK_TEMP_AGE_S = 60.0  # a lock's temp file lives for microseconds; older ones are leftovers


class RunDirError(ValueError):
    """The output directory cannot be used as asked (not a run, busy, data changed)."""


class RunLockedError(RunDirError):
    """Another training holds the run directory's lock."""


def _say(message: str) -> None:
    print(message, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# the lock (NOTE [run lock])
# ----------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run directory, held until ``release`` (or the process dies).

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with RunLock.acquire(d) as lock:  # a second acquire(d) now raises RunLockedError
    ...     print(lock.path.name)
    .packrnn.lock
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, directory: str | os.PathLike, *,
                log: Callable[[str], None] = _say) -> "RunLock":
        """Take the lock of ``directory`` (which must exist), or raise ``RunLockedError``.

        A stale lock (its holder is dead, same host) is taken over and ``log`` says so.
        """
        path = Path(directory) / LOCK_NAME
        data = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        for _ in range(20):  # only a release racing with us makes a round fail
            fd = _create_locked(path, data)
            if fd is None:
                fd = _take_over(path, data, log)
            if fd is not None:
                return cls(path, fd)
        raise RunLockedError(f"output: could not take the lock {str(path)!r}: other processes "
                             "keep taking and releasing it")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_locked(path: Path, data: bytes) -> int | None:
    """Create the lock file already locked and filled; None if one exists."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        _flock(fd)
        os.write(fd, data)
        os.fsync(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            os.close(fd)
            return None
        except OSError as e:  # no hard links here (FAT, some FUSE): create in place
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            os.close(fd)
            return _create_in_place(path, data)
        return fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _create_in_place(path: Path, data: bytes) -> int | None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        return None
    _flock(fd)
    os.write(fd, data)
    os.fsync(fd)
    return fd


def _take_over(path: Path, data: bytes, log: Callable[[str], None]) -> int | None:
    """Take an existing lock file whose holder is dead, or raise naming the live holder."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None  # released meanwhile: try creating again
    try:
        locked = _try_flock(fd)
        holder = _read_holder(fd)
        if locked is False:
            raise RunLockedError(f"output: directory {str(path.parent)!r} is in use by another "
                                 f"training ({_describe(holder)}); wait for it to end or choose "
                                 "another --output")
        if not _same_file(fd, path):
            os.close(fd)
            return None  # released and recreated meanwhile
        here = socket.gethostname()
        host = holder.get("host")
        if host not in (None, here):
            raise RunLockedError(f"output: directory {str(path.parent)!r} is locked by a training "
                                 f"on another host ({_describe(holder)}) that packrnn cannot check "
                                 f"from here; if that run is over, remove {str(path)!r}")
        if locked is None and _pid_alive(holder.get("pid")):  # no flock: trust the pid
            raise RunLockedError(f"output: directory {str(path.parent)!r} is in use by another "
                                 f"training ({_describe(holder)}); wait for it to end or choose "
                                 "another --output")
        log(f"packrnn: taking over the stale lock of {str(path.parent)!r} "
            f"({_describe(holder)}, no longer running)")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _flock(fd: int) -> None:
    if _try_flock(fd) is False:  # a fresh file nobody else has opened
        raise RunLockedError("output: a fresh lock file is locked by another process")


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: locks unsupported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


# ----------------------------------------------------------------------------------------------
# what the directory holds
# ----------------------------------------------------------------------------------------------


def _temp_pattern(names: Iterable[str]) -> re.Pattern[str]:
    # checkpoint.atomic_write's temp names: .<name>.<pid>.<8 hex>.tmp
    alternatives = "|".join(re.escape(n) for n in names)
    return re.compile(rf"^\.(?:{alternatives})\.\d+\.[0-9a-f]{{8}}\.tmp$")


_LOCK_TEMP = re.compile(rf"^{re.escape(LOCK_NAME)}\.\d+\.[0-9a-f]{{8}}\.tmp$")


def _leftover(name: str, pattern: re.Pattern[str]) -> bool:
    """packrnn's own bookkeeping files: the lock, its temp files, atomic-write temp files."""
    return name == LOCK_NAME or bool(_LOCK_TEMP.match(name) or pattern.match(name))


def classify(directory: str | os.PathLike, names: Iterable[str]) -> str:
    """What ``directory`` is, for ``train``'s output.

    Args:
        directory: the output directory.
        names: the file names a run writes (their temp files are packrnn's own).

    Returns:
        ``"absent"``; ``"empty"`` (nothing but packrnn's lock and temp files); ``"run"`` (it
        holds a packrnn checkpoint); ``"foreign"`` (anything else: never written over).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> classify(d, ["config.json"]), classify(d / "new", ["config.json"])
    ('empty', 'absent')
    >>> _ = (d / "config.json").write_text("{}")  # a user's file, no checkpoint
    >>> classify(d, ["config.json"])
    'foreign'
    """
    d = Path(directory)
    if not d.exists():
        return "absent"
    if is_checkpoint(d / CHECKPOINT_NAME):
        return "run"
    pattern = _temp_pattern(names)
    if all(_leftover(p.name, pattern) for p in d.iterdir()):
        return "empty"
    return "foreign"


def check_output(directory: str | os.PathLike, names: Iterable[str], *, resume: bool,
                 overwrite: bool) -> bool:
    """Decide whether a run may write ``directory``; True: resume its checkpoint.

    New and empty directories are fine (a fresh run); a run is resumed with ``resume``,
    replaced with ``overwrite`` and otherwise refused; a directory that is not a run is always
    refused, so a user's own ``config.json`` or ``metrics.json`` is never written over.

    Raises:
        RunDirError: the directory may not be used, with what to do instead.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise RunDirError(f"output: expected a directory, got an existing file {str(d)!r}")
    kind = classify(d, names)
    if kind == "run":
        if resume:
            return True
        if overwrite:
            return False
        raise RunDirError(f"output: directory {str(d)!r} already exists and is not empty; "
                          "pass --resume to continue its run or --overwrite to replace it")
    if kind == "foreign":
        pattern = _temp_pattern(names)
        others = sorted(p.name for p in d.iterdir() if not _leftover(p.name, pattern))
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        asked = " to resume" if resume else " to overwrite" if overwrite else ""
        raise RunDirError(f"output: expected a new or empty directory or a packrnn run{asked}, "
                          f"got {str(d)!r} holding other files ({shown}) and no packrnn "
                          f"{CHECKPOINT_NAME}; nothing was changed: choose another --output")
    return False


def remove_stale_temp_files(directory: str | os.PathLike, names: Iterable[str],
                            log: Callable[[str], None] = _say) -> list[str]:
    """Remove the temp files of atomic writes that a kill interrupted; returns their names.

    Call it only while holding the directory's ``RunLock``: then no live run is writing them.
    Only packrnn's own names are touched (``.<name>.<pid>.<hex>.tmp`` for ``names``, and lock
    temp files older than a minute).
    """
    pattern = _temp_pattern(names)
    removed, size = [], 0
    now = time.time()
    for p in Path(directory).iterdir():
        try:
            st = p.lstat()
            if pattern.match(p.name) or (_LOCK_TEMP.match(p.name)
                                         and now - st.st_mtime > _LOCK_TEMP_AGE_S):
                p.unlink()
                removed.append(p.name)
                size += st.st_size
        except FileNotFoundError:
            continue
    if removed:
        log(f"packrnn: removed {len(removed)} stale temporary file(s) of interrupted writes "
            f"({size / 1e6:.1f} MB) from {str(directory)!r}")
    return sorted(removed)


# ----------------------------------------------------------------------------------------------
# data fingerprints
# ----------------------------------------------------------------------------------------------


# (key, label) of the fingerprint's fields, in the order a message names changes
_FIELDS = (("lines", "lines"), ("size", "bytes"), ("head_sha256", "sha256 of the first MiB"),
           ("mtime_ns", "modified time"))


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size, modification time, line count and sha256 of the first MiB of a data file.

    >>> import tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "d.txt")
    >>> _ = open(f, "w").write("a\\nb\\nc")
    >>> fp = fingerprint(f)
    >>> fp["lines"], fp["size"]
    (3, 5)
    """
    p = Path(path)
    st = p.stat()
    lines, last, head = 0, b"\n", hashlib.sha256()
    with open(p, "rb") as f:
        first = True
        while chunk := f.read(_HEAD_BYTES):
            if first:
                head.update(chunk)
                first = False
            lines += chunk.count(b"\n")
            last = chunk[-1:]
    if last != b"\n":
        lines += 1  # a last line without its newline
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "lines": lines,
            "head_sha256": head.hexdigest()}


def check_fingerprint(name: str, path: str | os.PathLike, saved: Mapping[str, Any] | None,
                      allow_change: bool, log: Callable[[str], None] = _say
                      ) -> dict[str, Any]:
    """Compare ``path`` with its fingerprint from the checkpoint; returns the current one.

    Args:
        name: the config field naming the file (``"train_path"``), for messages.
        path: the data file now.
        saved: its fingerprint in the checkpoint; None (an older checkpoint): no check.
        allow_change: warn instead of refusing a changed file.

    Raises:
        RunDirError: the file changed and ``allow_change`` is False.
    """
    now = fingerprint(path)
    if not saved:
        return now
    changed = [(key, label) for key, label in _FIELDS if saved.get(key) != now[key]]
    if not changed:
        return now
    details = ", ".join(_change(key, label, saved.get(key), now[key]) for key, label in changed)
    if allow_change:
        log(f"packrnn: warning: {name} {str(path)!r} changed since the checkpoint ({details}); "
            "resuming anyway (allow_data_change)")
        return now
    raise RunDirError(f"{name}: expected the data file the checkpoint was trained on, but "
                      f"{str(path)!r} changed ({details}); resuming would mix two data sets: "
                      "pass --allow-data-change (allow_data_change=True) to resume anyway")


def _change(key: str, label: str, old: Any, new: Any) -> str:
    if key == "head_sha256":
        return f"{label} differs"
    if key == "mtime_ns":
        old, new = (_time_ns(t) if isinstance(t, int) else t for t in (old, new))
    return f"{label} {old} -> {new}"


def _time_ns(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t // 10**9)) + \
        f".{t // 10**6 % 1000:03d}"


# ----------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------


class TrainInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C after saving a checkpoint of its finished steps."""


class StopOnInterrupt:
    """Within ``with``: the first SIGINT (Ctrl-C) only sets ``requested``; a second one raises.

    A ``KeyboardInterrupt`` raised mid-step could leave the optimizer half-way through its
    update; instead the loop checks ``requested`` between steps, saves a checkpoint and raises
    ``TrainInterrupted``. Outside the main thread, or when SIGINT is ignored (a background
    job), nothing is installed.

    >>> with StopOnInterrupt() as stop:
    ...     stop.requested
    False
    """

    def __init__(self, log: Callable[[str], None] = _say) -> None:
        self.requested = False
        self._log = log
        self._previous: Any = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous is not signal.SIG_IGN:
                self._previous = signal.SIG_DFL if previous is None else previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log("packrnn: interrupted: saving a checkpoint after the current step "
                  "(Ctrl-C again to stop at once)")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
