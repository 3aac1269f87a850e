"""Which recurrence backend runs: the native C++ kernel when it builds, else the Python one.

The environment variable ``PACKRNN_BACKEND`` chooses:

* ``auto`` (default): ``native`` if the C++ kernel compiles (first use only; cached on disk, see
  ``packrnn._native.build_directory()``) and loads, else ``python`` with ONE warning that says
  why;
* ``native``: the C++ kernel; raises ``RuntimeError`` if it cannot be built;
* ``python``: the pure-PyTorch lean backend (``packrnn._lean``), never compiles anything.

``backend_name()`` says which one runs; ``backend_info()`` adds the details that ``packrnn bench``
prints. ``functional.py`` asks ``backend_name()`` on every call, so the variable can be changed
at run time (the build result is cached per process).

>>> import packrnn
>>> packrnn.backend_name() in ("native", "python")
True
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

import torch

__all__ = ["ENV_VAR", "backend_name", "backend_info", "native_error"]

ENV_VAR = "PACKRNN_BACKEND"
_CHOICES = ("auto", "native", "python")

_lock = threading.Lock()
_native_tried = False
_native_error: Optional[str] = None  # why the native backend is unavailable; None if it loaded
_warned = False


def _requested() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}: expected one of {', '.join(_CHOICES)}, got {value!r}")
    return value


def _summarise(error: BaseException) -> str:
    """One readable line for a build failure (compiler output can be pages long)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    errors = [line for line in lines if "error" in line.lower() and line != first]
    detail = f" ({errors[0][:200]})" if errors else ""
    return f"{type(error).__name__}: {first[:300]}{detail}"


def _try_native() -> Optional[str]:
    """Build/load the native kernel once per process; the reason it failed, or None."""
    global _native_tried, _native_error
    if _native_tried:  # no lock once decided (torch.compile traces this: no context managers)
        return _native_error
    with _lock:
        if not _native_tried:
            try:
                from packrnn import _native

                _native.load_library()
            except Exception as error:  # noqa: BLE001 - any build failure means "fall back"
                _native_error = _summarise(error)
            _native_tried = True
        return _native_error


def native_error() -> Optional[str]:
    """Why the native backend cannot be used (tries to build it first), or None if it can."""
    return _try_native()


def backend_name() -> str:
    """The backend that ``packrnn.functional`` (and so the layers) use on CPU now.

    Returns:
        ``"native"`` or ``"python"``, as chosen by ``PACKRNN_BACKEND`` (see the module doc).

    Raises:
        ValueError: ``PACKRNN_BACKEND`` holds something other than auto, native or python.
        RuntimeError: ``PACKRNN_BACKEND=native`` and the kernel cannot be built.
    """
    global _warned
    requested = _requested()
    if requested == "python":
        return "python"
    error = _try_native()
    if error is None:
        return "native"
    if requested == "native":
        raise RuntimeError(f"{ENV_VAR}=native, but the native backend cannot be built: {error}")
    if not _warned:
        _warned = True
        warnings.warn(
            f"packrnn: native backend unavailable, using the python backend ({error}). "
            f"Set {ENV_VAR}=python to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
    return "python"


def backend_info() -> str:
    """One line for ``packrnn bench``: the backend in use and what it runs on."""
    threads = torch.get_num_threads()
    name = backend_name()
    if name == "native":
        from packrnn import _native

        return (f"native (C++ time loop; {_native.kernel_info()}; torch {torch.__version__}, "
                f"{threads} threads; cache {_native.build_directory()})")
    why = "forced by PACKRNN_BACKEND=python" if _requested() == "python" else native_error()
    return f"python (lean PyTorch time loop; {why}; torch {torch.__version__}, {threads} threads)"
