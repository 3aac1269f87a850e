"""checkpoint.py: the sha256 of the payload, disk-full errors, valid JSON, reading version 1."""

from __future__ import annotations

import errno
import io
import json

import pytest
import torch

from packrnn import checkpoint as C
from packrnn.checkpoint import (REQUIRED_KEYS, CheckpointError, DiskFullError, atomic_write_json,
                                is_checkpoint, load_checkpoint, save_checkpoint)


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = {k: 0 for k in REQUIRED_KEYS if k not in ("format", "format_version", "packrnn_version")}
    s["model_state"] = {"w": torch.randn(64, 64, generator=g)}
    s["labels"] = ["a", "b"]
    return s


def test_round_trip_and_recognised(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state())
    got = load_checkpoint(path)
    torch.testing.assert_close(got["model_state"]["w"], state()["model_state"]["w"], rtol=0, atol=0)
    assert got["labels"] == ["a", "b"] and got["format_version"] == C.FORMAT_VERSION == 2
    assert is_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    assert not is_checkpoint(tmp_path / "other.pt") and not is_checkpoint(tmp_path / "text.pt")
    assert not is_checkpoint(tmp_path / "missing.pt")


def test_flipped_bytes_are_detected(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state())
    data = bytearray(path.read_bytes())
    middle = len(data) // 2  # inside the weights: the zip structure stays readable
    for i in range(16):
        data[middle + i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint '.*checkpoint.pt' is corrupt: its sha256 "
                                              r"does not match"):
        load_checkpoint(path)


def test_checksum_covers_the_whole_payload(tmp_path):
    # A well-formed file whose payload was changed after the checksum was taken.
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state(0))
    envelope = torch.load(path, weights_only=True)
    other = io.BytesIO()
    torch.save({**load_checkpoint(path), "labels": ["a", "c"]}, other)
    envelope["payload"] = torch.frombuffer(bytearray(other.getvalue()), dtype=torch.uint8)
    torch.save(envelope, path)
    with pytest.raises(CheckpointError, match=r"is corrupt: its sha256 does not match"):
        load_checkpoint(path)


def test_version_1_files_are_still_read(tmp_path):
    path = tmp_path / "checkpoint.pt"
    old = {**state(), "format": C.FORMAT, "format_version": 1, "packrnn_version": "0.1.0"}
    torch.save(old, path)  # version 1: the state itself, no envelope
    assert load_checkpoint(path)["labels"] == ["a", "b"] and is_checkpoint(path)


def _failing_write(exc: BaseException):
    real_open = open

    class Full(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def writable(self):
            return True

        def write(self, b):
            self.f.write(bytes(b)[:10])
            raise exc

        def flush(self):
            self.f.flush()

        def fileno(self):
            return self.f.fileno()

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def fake_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        return Full(f) if mode == "xb" else f

    return fake_open


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state(0))
    before = path.read_bytes()
    monkeypatch.setattr("builtins.open", _failing_write(exc))
    with pytest.raises(DiskFullError, match=r"^no space left on device while writing .*checkpoint.pt; "
                                            r"the previous checkpoint is intact$") as info:
        save_checkpoint(path, state(1))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # temp file removed


def test_disk_full_inside_torch_writer(tmp_path):
    # torch.save to a file wraps the OSError: "[enforce fail at inline_container.cc:...]".
    path = tmp_path / "metrics.bin"

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(f):
        torch.save({"w": torch.zeros(1000)}, Full())

    with pytest.raises(DiskFullError, match=r"while writing .*metrics.bin; no partial file was left"):
        C.atomic_write(path, write)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through(tmp_path):
    def write(f):
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error") as info:
        C.atomic_write(tmp_path / "x", write)
    assert not isinstance(info.value, DiskFullError)


def test_json_is_always_valid(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, [{"train_loss": float("nan"), "acc": float("inf"), "n": 3,
                              "nested": (1.5, float("-inf"))}])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == [{"train_loss": None, "acc": None, "n": 3, "nested": [1.5, None]}]
