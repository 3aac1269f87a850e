"""Skip the doctests of the optional ONNX modules, with a reason, when their extra is missing."""

from __future__ import annotations

import importlib.util

import pytest

_NEEDS = {"onnx_export.py": ("onnx",), "serve_onnx.py": ("onnx", "onnxruntime")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[module] is None
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        missing = [m for m in _NEEDS.get(item.path.name, ()) if not _installed(m)]
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} "
                                                    "(pip install 'packrnn[onnx]')"))
