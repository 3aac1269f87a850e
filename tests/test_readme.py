"""Every python code block of the README runs as written, each on its own (a fresh namespace).

The blocks run in a temporary directory holding a small ``train.csv`` and ``test.csv`` in the
AG News format: the files the README's data and training blocks read. A block that needs any
other external data is skipped, and says so in its first line: ``# needs: <what>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from test_train import write_agnews

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[tuple[str, int, str]]:
    """``(heading, line, code)`` of every fenced python block; ``line`` is where its code starts."""
    blocks, heading, code, start = [], "", None, 0
    for number, line in enumerate(README.read_text(encoding="utf-8").splitlines(), start=1):
        if code is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif code is None and line.strip() == "```python":
            code, start = [], number + 1
        elif code is not None and line.strip() == "```":
            blocks.append((heading, start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8, [b[:2] for b in BLOCKS]


@pytest.mark.parametrize("heading, line, code", BLOCKS,
                         ids=[f"L{line}-{re.sub(r'[^a-z]+', '-', h.lower()).strip('-')}"
                              for h, line, _ in BLOCKS])
def test_readme_block_runs_as_written(heading, line, code, tmp_path, monkeypatch):
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if first.startswith("# needs:"):
        pytest.skip(f"README.md:{line} {first[2:]}")
    write_agnews(tmp_path / "train.csv", 64, 0)
    write_agnews(tmp_path / "test.csv", 16, 1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
