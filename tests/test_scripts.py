"""scripts/: where set-up installs torch from (never PyPI's CUDA build), and the shell syntax."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
CPU = ["--index-url", "https://download.pytorch.org/whl/cpu"]


def torch_source(tmp_path: Path, **env: str) -> tuple[list[str], str]:
    """Run scripts/torch_source.py with no pip configuration but ``env`` (PIP_* variables)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **env)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "torch_source.py"), "2.13.0"], env=clean,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    *args, why = proc.stdout.splitlines()
    assert why.startswith("# ")
    return args, why[2:]


def fake_torch_wheel(directory: Path, version: str) -> Path:
    """A minimal valid wheel named torch (metadata only), for pip's --dry-run to find."""
    directory.mkdir()
    path = directory / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                    "Tag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return directory


def test_without_local_wheel_or_other_index_torch_comes_from_the_cpu_index(tmp_path):
    args, why = torch_source(tmp_path)
    assert args == CPU and "no local wheel, no other index configured" in why
    # PyPI named explicitly is still PyPI: its Linux torch is the CUDA build
    args, _ = torch_source(tmp_path, PIP_INDEX_URL="https://pypi.org/simple")
    assert args == CPU
    # a find-links directory without torch 2.13.0 is no local wheel
    links = fake_torch_wheel(tmp_path / "other", "2.12.0")
    assert torch_source(tmp_path, PIP_FIND_LINKS=str(links))[0] == CPU


def test_a_local_wheel_or_a_configured_index_is_used_as_configured(tmp_path):
    links = fake_torch_wheel(tmp_path / "wheels", "2.13.0")
    assert torch_source(tmp_path, PIP_FIND_LINKS=str(links)) == \
        ([], "a local torch 2.13.0 wheel (pip's find-links)")
    # nothing is fetched to decide: the configured indexes are only read, never contacted
    assert torch_source(tmp_path, PIP_INDEX_URL="https://mirror.invalid/simple") == \
        ([], "the configured index https://mirror.invalid/simple")
    assert torch_source(tmp_path, PIP_EXTRA_INDEX_URL="file:///nowhere/simple")[0] == []


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
