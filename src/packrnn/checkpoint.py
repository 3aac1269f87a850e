"""Checkpoints of a training run: written atomically, read back with clear errors.

A checkpoint is one file, ``checkpoint.pt`` in the run's output directory, holding everything
needed to continue training or to use the model: model and optimizer state, vocabulary,
label names, configs, progress counters and RNG states. See ``save_checkpoint`` for the keys.

NOTE [atomic writes]
Every file a run writes (checkpoint, metrics.json, the plot) is first written to a temporary
file in the same directory, flushed to disk, and then moved over the old one with
``os.replace``, which is atomic on POSIX and Windows. A kill at any moment therefore leaves
either the old complete file or the new complete file, never a torn one, and the previous
checkpoint survives until the new one is complete. A full disk (ENOSPC) during the write is
reported as ``DiskFullError`` naming the file, after the temporary file is removed.

NOTE [checkpoint checksum]
Since format version 2 the file holds an envelope ``{"format", "format_version",
"packrnn_version", "sha256", "payload"}``: ``payload`` is the ``torch.save`` bytes of the training
state (a uint8 tensor) and ``sha256`` their hash. ``torch.save`` files carry no checksum that
``torch.load`` checks, so without this a flipped byte in a weight loads silently; with it
``load_checkpoint`` refuses the file ("corrupt: its sha256 does not match"). Version 1 files
(the state itself, no checksum) are still read.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import pickle
import secrets
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = [
    "CHECKPOINT_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "DiskFullError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
    "is_checkpoint",
]

#: File name of the checkpoint inside a run's output directory.
CHECKPOINT_NAME = "checkpoint.pt"
#: Marker stored in every checkpoint, to recognise files that are not ours.
FORMAT = "packrnn-checkpoint"
#: Bumped whenever the checkpoint layout changes incompatibly.
FORMAT_VERSION = 2
#: Versions this packrnn reads: 1 (no checksum) and 2 (NOTE [checkpoint checksum]).
READABLE_VERSIONS = (1, 2)

# Keys every checkpoint of FORMAT_VERSION has; a file lacking one is incomplete.
REQUIRED_KEYS = (
    "format",
    "format_version",
    "packrnn_version",
    "model_config",
    "train_config",
    "model_state",
    "optimizer_state",
    "vocab",
    "labels",
    "epoch",
    "step",
    "step_in_epoch",
    "epoch_accum",
    "rng",
    "history",
)


class CheckpointError(ValueError):
    """A model directory or checkpoint file is missing, incomplete, corrupt or foreign."""


class DiskFullError(OSError):
    """The device ran out of space while a run's file was written; the previous file is intact."""

    def __str__(self) -> str:
        return str(self.strerror)


def temp_name(name: str) -> str:
    """The temporary file name ``atomic_write`` uses for ``name`` (``packrnn.rundir`` cleans them)."""
    return f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None],
                 what: str | None = None) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file that then replaces ``path``.

    See NOTE [atomic writes]. The temporary file lives in the same directory (``os.replace``
    is only atomic within one file system) and is removed if ``write`` raises.

    Args:
        path: the file to (re)place.
        write: fills the open binary temp file.
        what: names the file in a disk-full error (default: its name).

    Raises:
        DiskFullError: no space left on the device (ENOSPC or EDQUOT, also when torch's
            writer wraps it in a RuntimeError); ``path`` is unchanged.
    """
    path = Path(path)
    existed = path.exists()
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; "xb" honours the umask.
    tmp = path.parent / temp_name(path.name)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if _is_disk_full(e):
            kept = (f"the previous {what or path.name} is intact" if existed
                    else "no partial file was left")
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}; "
                                f"{kept}", str(path)) from e
        raise


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC/EDQUOT, also inside torch's "[enforce fail at inline_container.cc] ..." wrapper."""
    seen = 0
    while e is not None and seen < 8:  # the wrapper keeps the OSError as its context
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see NOTE [atomic writes])."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see NOTE [atomic writes])."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; NaN and infinities become ``null``.

    Python's ``json`` would write bare ``NaN``, which is not JSON (other readers refuse the file).
    """
    atomic_write_text(path, json.dumps(_finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state dict atomically to ``path``, with the sha256 of its bytes.

    The file is the envelope of NOTE [checkpoint checksum]; read it with ``load_checkpoint``.

    Args:
        path: destination file, usually ``<output>/checkpoint.pt``.
        state: must hold every key of ``REQUIRED_KEYS`` except ``format``,
            ``format_version`` and ``packrnn_version``, which are added here. Values must be
            loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
            tuples and dicts of those.

    Raises:
        DiskFullError: no space left on the device; the previous checkpoint is intact.
    """
    from . import __version__

    state = dict(state)
    state["format"] = FORMAT
    state["format_version"] = FORMAT_VERSION
    state["packrnn_version"] = __version__
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"state: expected keys {list(REQUIRED_KEYS)}, missing {missing}")
    inner = io.BytesIO()
    torch.save(state, inner)
    payload = inner.getbuffer()
    envelope = {"format": FORMAT, "format_version": FORMAT_VERSION, "packrnn_version": __version__,
                "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": torch.frombuffer(payload, dtype=torch.uint8)}
    # Serialised in memory, so the file system sees one plain write and a failure is an OSError.
    outer = io.BytesIO()
    torch.save(envelope, outer)
    atomic_write(path, lambda f: f.write(outer.getbuffer()), what="checkpoint")


def find_checkpoint(directory: str | os.PathLike) -> Path:
    """Return the checkpoint path of a run directory, or raise ``CheckpointError`` saying why not."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"model directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"model directory {str(directory)!r} is not a directory")
    path = directory / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"model directory {str(directory)!r} is incomplete: it has no {CHECKPOINT_NAME} "
            "(was training started there and killed before its first checkpoint?)"
        )
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint written by ``save_checkpoint``.

    ``path`` may be the checkpoint file or a run directory holding ``checkpoint.pt``.
    Loads with ``weights_only=True`` (no arbitrary code runs from the file).

    Raises:
        CheckpointError: the directory or file is missing, the file is truncated or corrupt
            (its sha256 does not match, NOTE [checkpoint checksum]), is not a packrnn
            checkpoint, comes from another format version, or lacks keys.
    """
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix != ".pt"):
        path = find_checkpoint(path)
    elif not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    state = _torch_load(path, path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a packrnn checkpoint")
    version = state.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r} (written by packrnn "
            f"{state.get('packrnn_version', '?')}); this packrnn {_version()} reads version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )
    if version >= 2:  # NOTE [checkpoint checksum]
        lacking = [k for k in ("sha256", "payload") if k not in state]
        if lacking:
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it lacks {lacking}")
        payload = state["payload"]
        if not (isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8
                and payload.dim() == 1):
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its payload is not bytes")
        data = payload.numpy().tobytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != state["sha256"]:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is corrupt: its sha256 does not match the one stored "
                f"with it (bytes changed on disk since it was written); restore it from a copy "
                f"or train again")
        state = _torch_load(io.BytesIO(data), path, map_location)
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {str(path)!r} is not a packrnn checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it lacks {missing}")
    return state


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file marked as a packrnn checkpoint (its checksum is not verified).

    Reads only the envelope (memory-mapped), so it is cheap for a large checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything unreadable is not recognisably ours
        return False
    return isinstance(state, dict) and state.get("format") == FORMAT


def _torch_load(source: Any, path: Path, map_location: Any) -> Any:
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be read ({first})"
        ) from e


def _version() -> str:
    from . import __version__

    return __version__
