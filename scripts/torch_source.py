"""Where scripts/bootstrap.sh installs torch from, so that set-up never pulls a CUDA build.

    python scripts/torch_source.py 2.13.0

prints the extra arguments for ``pip install torch==2.13.0``, one per line (nothing: pip's own
configuration is used), and a last line ``# <why>`` for the set-up's progress message. Run it
with the Python whose pip will install (the virtual environment's): it reads that pip's
configuration (config files and ``PIP_*`` variables). On Linux, PyPI's torch wheels bundle CUDA
(gigabytes, useless without a GPU), so:

1. a ``torch==VERSION`` wheel that pip finds without any index (its ``find-links``: a local
   wheel directory) -> use it: no extra arguments;
2. else an index other than PyPI is configured (``index-url`` / ``extra-index-url``) -> that
   is the machine owner's choice: no extra arguments;
3. else PyTorch's CPU index explicitly: ``--index-url https://download.pytorch.org/whl/cpu``
   (it also serves torch's dependencies).

Nothing is downloaded here: check 1 is a ``pip install --dry-run --no-index``, check 2 reads
``pip config list``.
"""

from __future__ import annotations

import subprocess
import sys

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = {"https://pypi.org/simple", "https://pypi.python.org/simple", "https://pypi.org/simple/",
        "https://pypi.python.org/simple/"}


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=300)


def local_wheel(version: str) -> bool:
    """True when pip finds ``torch==version`` without an index (find-links only)."""
    result = _pip("install", "--dry-run", "--no-index", "--no-deps", "--ignore-installed",
                  "--disable-pip-version-check", "--quiet", f"torch=={version}")
    return result.returncode == 0


def other_indexes() -> list[str]:
    """Indexes other than PyPI in pip's configuration (files and PIP_* variables)."""
    result = _pip("config", "list")
    found = []
    for line in result.stdout.splitlines():  # e.g. global.index-url='https://...'
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] not in ("index-url", "extra-index-url"):
            continue
        for url in value.strip().strip("'\"").split():
            if url not in PYPI:
                found.append(url)
    return found


def torch_source(version: str) -> tuple[list[str], str]:
    """``(extra pip arguments, why)`` for installing ``torch==version`` (see the module doc)."""
    if local_wheel(version):
        return [], f"a local torch {version} wheel (pip's find-links)"
    indexes = other_indexes()
    if indexes:
        return [], f"the configured index {indexes[0]}"
    return ["--index-url", CPU_INDEX], f"PyTorch's CPU index {CPU_INDEX} (no local wheel, no " \
                                       "other index configured)"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/torch_source.py VERSION", file=sys.stderr)
        return 2
    args, why = torch_source(argv[0])
    for arg in args:
        print(arg)
    print(f"# {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
