"""rundir.py: the run lock, what counts as a run, stale temp files, data fingerprints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from packrnn.checkpoint import CHECKPOINT_NAME, REQUIRED_KEYS, save_checkpoint
from packrnn.rundir import (LOCK_NAME, RunDirError, RunLock, RunLockedError, StopOnInterrupt,
                            check_fingerprint, check_output, classify, fingerprint,
                            remove_stale_temp_files)

NAMES = (CHECKPOINT_NAME, "metrics.json", "curves.png", "config.json")


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(directory, pid: int, host: str | None = None) -> None:
    (directory / LOCK_NAME).write_text(json.dumps(
        {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}))


def make_run(directory) -> None:
    directory.mkdir(exist_ok=True)
    state = {k: 0 for k in REQUIRED_KEYS if k not in ("format", "format_version", "packrnn_version")}
    save_checkpoint(directory / CHECKPOINT_NAME, state)


# -- the lock -------------------------------------------------------------------------------------


def test_second_lock_names_the_holder(tmp_path):
    with RunLock.acquire(tmp_path) as lock:
        holder = json.loads(lock.path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=rf"output: directory .* is in use by another "
                                                 rf"training \(pid {os.getpid()} on host "
                                                 rf"{socket.gethostname()}, started .*\)"):
            RunLock.acquire(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # released
    RunLock.acquire(tmp_path).release()  # and free again
    assert list(tmp_path.iterdir()) == []


def test_lock_held_by_another_process(tmp_path):
    code = ("import sys, time; from packrnn.rundir import RunLock; "
            f"l = RunLock.acquire({str(tmp_path)!r}); print('held', flush=True); "
            "sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"in use by another training \(pid {p.pid} on"):
            RunLock.acquire(tmp_path)
    finally:
        p.kill()  # dies holding the lock: its flock goes, the file stays
        p.wait()
    messages = []
    with RunLock.acquire(tmp_path, log=messages.append):
        pass
    assert messages == [f"packrnn: taking over the stale lock of {str(tmp_path)!r} (pid {p.pid} "
                        f"on host {socket.gethostname()}, started " + messages[0].split("started ")[1]]
    assert "no longer running" in messages[0]


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    messages = []
    lock = RunLock.acquire(tmp_path, log=messages.append)
    assert len(messages) == 1 and f"stale lock of {str(tmp_path)!r} (pid {pid} on host" in messages[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_refused(tmp_path):
    write_lock(tmp_path, 12345, host="elsewhere")
    with pytest.raises(RunLockedError, match=r"locked by a training on another host \(pid 12345 on "
                                             r"host elsewhere, .*\) .* remove '.*\.packrnn\.lock'"):
        RunLock.acquire(tmp_path)


def test_without_flock_a_live_pid_keeps_its_lock(tmp_path, monkeypatch):
    import packrnn.rundir as R

    monkeypatch.setattr(R, "fcntl", None)
    write_lock(tmp_path, os.getpid())  # alive
    with pytest.raises(RunLockedError, match=rf"in use by another training \(pid {os.getpid()}"):
        RunLock.acquire(tmp_path)
    write_lock(tmp_path, dead_pid())
    RunLock.acquire(tmp_path, log=lambda m: None).release()


# -- is it a run? ---------------------------------------------------------------------------------


def test_classify(tmp_path):
    assert classify(tmp_path / "new", NAMES) == "absent"
    assert classify(tmp_path, NAMES) == "empty"
    (tmp_path / ".checkpoint.pt.123.0a1b2c3d.tmp").write_bytes(b"x")
    (tmp_path / LOCK_NAME).write_text("{}")
    assert classify(tmp_path, NAMES) == "empty"  # packrnn's leftovers only
    (tmp_path / "config.json").write_text('{"mine": 1}')
    assert classify(tmp_path, NAMES) == "foreign"
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not ours")
    assert classify(tmp_path, NAMES) == "foreign"
    make_run(tmp_path)
    assert classify(tmp_path, NAMES) == "run"


@pytest.mark.parametrize("resume, overwrite", [(True, False), (False, True), (False, False)])
def test_a_directory_that_is_not_a_run_is_refused(tmp_path, resume, overwrite):
    (tmp_path / "config.json").write_text('{"mine": 1}')
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match=r"output: expected a new or empty directory or a packrnn "
                                          r"run.* holding other files \(config.json, metrics.json\) "
                                          r"and no packrnn checkpoint.pt; nothing was changed"):
        check_output(tmp_path, NAMES, resume=resume, overwrite=overwrite)


def test_check_output_decisions(tmp_path):
    assert check_output(tmp_path / "new", NAMES, resume=True, overwrite=False) is False
    assert check_output(tmp_path, NAMES, resume=False, overwrite=False) is False  # empty
    make_run(tmp_path / "run")
    assert check_output(tmp_path / "run", NAMES, resume=True, overwrite=False) is True
    assert check_output(tmp_path / "run", NAMES, resume=False, overwrite=True) is False
    with pytest.raises(RunDirError, match=r"already exists and is not empty; pass --resume"):
        check_output(tmp_path / "run", NAMES, resume=False, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=r"output: expected a directory, got an existing file"):
        check_output(tmp_path / "file", NAMES, resume=True, overwrite=False)


# -- stale temp files -----------------------------------------------------------------------------


def test_remove_stale_temp_files_only_ours(tmp_path):
    ours = [".checkpoint.pt.4242.0123abcd.tmp", ".metrics.json.1.ffffffff.tmp",
            ".curves.png.99.00000000.tmp"]
    kept = [".checkpoint.pt.tmp", "notes.tmp", ".mine.json.1.0123abcd.tmp", "checkpoint.pt",
            ".checkpoint.pt.12.xyz.tmp"]
    for name in ours + kept:
        (tmp_path / name).write_bytes(b"x" * 1000)
    young_lock_temp = f"{LOCK_NAME}.77.0123abcd.tmp"
    (tmp_path / young_lock_temp).write_text("{}")
    old_lock_temp = tmp_path / f"{LOCK_NAME}.78.0123abcd.tmp"
    old_lock_temp.write_text("{}")
    os.utime(old_lock_temp, (0, 0))
    messages = []
    removed = remove_stale_temp_files(tmp_path, NAMES, log=messages.append)
    assert removed == sorted(ours + [old_lock_temp.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + [young_lock_temp])
    assert messages == [f"packrnn: removed 4 stale temporary file(s) of interrupted writes (0.0 MB) "
                        f"from {str(tmp_path)!r}"]
    assert remove_stale_temp_files(tmp_path, NAMES, log=messages.append) == []
    assert len(messages) == 1


# -- data fingerprints ----------------------------------------------------------------------------


def test_fingerprint_counts_lines_and_hashes_the_head(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(b"a\nb\n")
    fp = fingerprint(f)
    assert (fp["size"], fp["lines"]) == (4, 2)
    f.write_bytes(b"a\nb\nc")  # last line without newline
    assert fingerprint(f)["lines"] == 3
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (1 << 20) + b"\ny\n")
    a = fingerprint(big)
    big.write_bytes(b"x" * (1 << 20) + b"\nz\n")  # beyond the first MiB: same head hash
    b = fingerprint(big)
    assert a["head_sha256"] == b["head_sha256"] and (a["lines"], b["lines"]) == (2, 2)
    f.write_bytes(b"")
    assert fingerprint(f)["lines"] == 0


def test_changed_data_is_refused_unless_allowed(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("".join(f"row {i}\n" for i in range(3000)))
    saved = fingerprint(f)
    assert check_fingerprint("train_path", f, saved, allow_change=False) == saved  # unchanged
    f.write_text("".join(f"row {i}\n" for i in range(1000)))
    with pytest.raises(RunDirError, match=r"train_path: expected the data file the checkpoint was "
                                          r"trained on, but '.*train.csv' changed \(lines 3000 -> "
                                          r"1000, bytes 25890 -> 7890, sha256 of the first MiB "
                                          r"differs(, modified time .*)?\); resuming would mix two "
                                          r"data sets: pass --allow-data-change"):
        check_fingerprint("train_path", f, saved, allow_change=False)
    messages = []
    now = check_fingerprint("train_path", f, saved, allow_change=True, log=messages.append)
    assert now == fingerprint(f) and "warning: train_path" in messages[0]
    assert check_fingerprint("train_path", f, None, allow_change=False) == now  # old checkpoint
    os.utime(f, ns=(now["mtime_ns"] + 10**9, now["mtime_ns"] + 10**9))  # touched only
    with pytest.raises(RunDirError, match=r"changed \(modified time .* -> .*\)"):
        check_fingerprint("train_path", f, now, allow_change=False)


# -- Ctrl-C ---------------------------------------------------------------------------------------


def test_first_ctrl_c_is_a_request_the_second_stops(monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    messages = []
    with StopOnInterrupt(log=messages.append) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and messages == [
            "packrnn: interrupted: saving a checkpoint after the current step (Ctrl-C again to "
            "stop at once)"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN)  # a background job
    installed = []
    monkeypatch.setattr(signal, "signal", lambda *a: installed.append(a))
    with StopOnInterrupt() as stop:
        pass
    assert installed == []
