"""Checkpoints of a training run: written atomically, read back with clear errors.

A checkpoint is one file, ``checkpoint.pt`` in the run's output directory, holding everything
needed to continue training or to use the model: model and optimizer state, vocabulary,
label names, configs, progress counters and RNG states. See ``save_checkpoint`` for the keys.

NOTE [atomic writes]
Every file a run writes (checkpoint, metrics.json, the plot) is first written to a temporary
file in the same directory, flushed to disk, and then moved over the old one with
``os.replace``, which is atomic on POSIX and Windows. A kill at any moment therefore leaves
either the old complete file or the new complete file, never a torn one, and the previous
checkpoint survives until the new one is complete.
"""

from __future__ import annotations

import io
import json
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
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "find_checkpoint",
]

#: File name of the checkpoint inside a run's output directory.
CHECKPOINT_NAME = "checkpoint.pt"
#: Marker stored in every checkpoint, to recognise files that are not ours.
FORMAT = "packrnn-checkpoint"
#: Bumped whenever the checkpoint layout changes incompatibly.
FORMAT_VERSION = 1

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


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temp file that then replaces ``path``.

    See NOTE [atomic writes]. The temporary file lives in the same directory (``os.replace``
    is only atomic within one file system) and is removed if ``write`` raises.
    """
    path = Path(path)
    # Not tempfile.mkstemp: its 0600 mode would survive the rename; "xb" honours the umask.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see NOTE [atomic writes])."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see NOTE [atomic writes])."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Save a training state dict atomically to ``path``.

    Args:
        path: destination file, usually ``<output>/checkpoint.pt``.
        state: must hold every key of ``REQUIRED_KEYS`` except ``format``,
            ``format_version`` and ``packrnn_version``, which are added here. Values must be
            loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists,
            tuples and dicts of those.
    """
    from . import __version__

    state = dict(state)
    state["format"] = FORMAT
    state["format_version"] = FORMAT_VERSION
    state["packrnn_version"] = __version__
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"state: expected keys {list(REQUIRED_KEYS)}, missing {missing}")
    atomic_write(path, lambda f: torch.save(state, f))


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
        CheckpointError: the directory or file is missing, the file is truncated or corrupt,
            is not a packrnn checkpoint, comes from another format version, or lacks keys.
    """
    path = Path(path)
    if path.is_dir() or (not path.exists() and path.suffix != ".pt"):
        path = find_checkpoint(path)
    elif not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, KeyError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated and cannot be read ({first})"
        ) from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a packrnn checkpoint")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version!r} (written by packrnn "
            f"{state.get('packrnn_version', '?')}); this packrnn {_version()} reads version "
            f"{FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: it lacks {missing}")
    return state


def _version() -> str:
    from . import __version__

    return __version__
