"""Distributed training: the same `packrnn train` under torchrun, 2 CPU processes with gloo."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

import packrnn
from packrnn.checkpoint import load_checkpoint
from packrnn.distributed import DistContext, all_reduce_sum, setup
from packrnn.train import evaluate
from test_train import write_agnews

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_context_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == \
           (0, 1, True, False, None)
    assert all_reduce_sum(ctx, [1, 2.5]) == [1.0, 2.5]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"WORLD_SIZE: expected an integer environment variable, got 'two'"):
        setup("cpu")


def test_torchrun_two_processes_gloo(tmp_path):
    train_path = write_agnews(tmp_path / "train.csv", 161, 0)  # odd: shards must still cover it
    test_path = write_agnews(tmp_path / "test.csv", 45, 1)
    out = tmp_path / "run"
    src = str(Path(packrnn.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "PACKRNN_BACKEND": os.environ.get("PACKRNN_BACKEND", "auto")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "packrnn.cli",
           "train", "--train", str(train_path), "--test", str(test_path), "--model", "lstm",
           "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--bucket", "--device", "cpu",
           "--embed-dim", "16", "--hidden-size", "16", "--threads", "1",
           "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only rank 0 wrote, once: the run's files and nothing else (no temp files)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "curves.png",
                                                      "metrics.json"]
    assert proc.stderr.count("epoch 2: train_loss") == 1  # rank 0 prints, rank 1 does not
    assert proc.stderr.count("packrnn: distributed run: 2 processes, backend gloo") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    # the progress bar's final figures are the epoch's, summed over ranks like the epoch line
    for m in metrics:
        bar = [s for s in re.split(r"[\r\n]", proc.stderr) if s.startswith(f"epoch {m['epoch']}/2")]
        assert len(bar) >= 1, proc.stderr[-3000:]
        figures = dict(re.findall(r"(\w+)=([\d.]+)", bar[-1]))
        assert figures["loss"] == f"{m['train_loss']:.4f}" and \
            figures["acc"] == f"{m['train_accuracy']:.3f}", bar[-1]
    # metrics are summed over ranks: every training text counted exactly once per epoch
    assert [m["samples"] for m in metrics] == [161, 161]
    state = load_checkpoint(out)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # the test accuracy reduced over the two shards equals a one-process evaluation
    single = evaluate(out, test_path)
    assert single["count"] == 45
    assert metrics[-1]["test_accuracy"] == pytest.approx(single["accuracy"], abs=1e-12)
