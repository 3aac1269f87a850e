"""A character language model of AG News titles with ``packrnn train --task lm``: bits per
character on the test titles, time per epoch, generated samples.

Run from the repository root (the data set is never copied into the project)::

    python benchmarks/bench_charlm.py [--data-dir ../shared/data/ag_news] [--threads 2]
    python benchmarks/bench_charlm.py --limit 500 --epochs 1      # a quick check that it runs

The titles of ``train_partial.csv`` (23,395) and ``test.csv`` (7,600) are written one per line
to a temporary folder (outside the project) and read with ``--format text``. Every title is
``<bos> t_1 .. t_n <eos>``: the model is scored on each character and the end of the title;
bits per character = test cross-entropy / ln 2 over those ``n + 1`` predictions. Epoch times are
``metrics.json``'s ``seconds`` (training loop only: reading, test evaluation and checkpoints
excluded). The load average is printed before and after: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from packrnn.bench import load_average  # noqa: E402
from packrnn.cli import train_command  # noqa: E402
from packrnn.train import TrainConfig, evaluate, generate, load_run, train  # noqa: E402

CONFIG = dict(model="lstm", embed_dim=128, hidden_size=128, tie_weights=True, num_layers=1,
              dropout=0.1, batch_size=64, lr=3e-3, lr_decay=0.7, epochs=3, bucket=True,
              grad_clip=1.0)
PREFIXES = ("", "Stocks ", "Apple ", "Red Sox ", "Iraq ")


def command(cfg: dict) -> str:
    """The ``packrnn train`` command line for TrainConfig keyword arguments."""
    return train_command(dict(task="lm", train_path="train_titles.txt",
                              test_path="test_titles.txt", **cfg))


def write_titles(src: Path, dst: Path, limit: int | None) -> int:
    """The titles (2nd column) of an AG News CSV, one per line; returns how many."""
    with open(src, newline="", encoding="utf-8") as f:
        titles = [" ".join(row[1].split()) for row in csv.reader(f) if len(row) == 3]
    titles = [t for t in titles if t][:limit]
    dst.write_text("".join(t + "\n" for t in titles), encoding="utf-8")
    return len(titles)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Character LM of AG News titles with packrnn.")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "ag_news",
                   help="folder with train_partial.csv and test.csv (default: ../shared/data/ag_news)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help=f"override the epochs (default: {CONFIG['epochs']})")
    p.add_argument("--execution", choices=["packed", "padded"], default="packed")
    p.add_argument("--limit", type=int, metavar="N",
                   help="use the first N titles of each file (a quick check, not a result)")
    p.add_argument("--samples", type=int, default=2, help="generated samples per prefix (default: 2)")
    args = p.parse_args(argv)
    for name in ("train_partial.csv", "test.csv"):
        if not (args.data_dir / name).is_file():
            p.error(f"--data-dir: expected a folder with {name}, got {str(args.data_dir)!r}")
    cfg = dict(CONFIG, execution=args.execution)
    if args.epochs:
        cfg["epochs"] = args.epochs
    torch.set_num_threads(args.threads)
    from packrnn.backend import backend_info

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"packrnn backend: {backend_info()}")
    with tempfile.TemporaryDirectory(prefix="bench_charlm_") as tmp:
        tmp = Path(tmp)
        n_train = write_titles(args.data_dir / "train_partial.csv", tmp / "train.txt", args.limit)
        n_test = write_titles(args.data_dir / "test.csv", tmp / "test.txt", args.limit)
        if args.limit:
            print(f"--limit {args.limit}: NOT a result")
        print(f"AG News titles: {n_train} training, {n_test} test; load average (1, 5, 15 min) at "
              f"start: {load_average()}")
        print(f"configuration:\n  {command(cfg)} --output runs/charlm")
        t0 = time.perf_counter()
        config = TrainConfig(train_path=str(tmp / "train.txt"), test_path=str(tmp / "test.txt"),
                             output=str(tmp / "run"), task="lm", format="text", level="char",
                             threads=args.threads, seed=args.seed, progress=False, plot=False,
                             device="cpu", **cfg)
        with contextlib.redirect_stderr(io.StringIO()):
            history = train(config)
        run = load_run(tmp / "run")
        for m in history:
            print(f"  epoch {m.epoch}: train {m.train_loss / 0.6931471805599453:.3f} bits/char, "
                  f"{m.seconds:.1f} s ({m.samples_per_second:.0f} chars/s)")
        result = evaluate(run, tmp / "test.txt")
        print(f"test titles: {result['bits_per_char']:.3f} bits per character (perplexity "
              f"{result['perplexity']:.2f}, next-character accuracy {result['accuracy']:.3f}) "
              f"after {sum(m.seconds for m in history):.1f} s of training, "
              f"{sum(m.seconds for m in history) / len(history):.1f} s per epoch "
              f"[{time.perf_counter() - t0:.0f} s wall]")
        print("samples (temperature 0.8, top-k 20):")
        for i, prefix in enumerate(PREFIXES):
            for k in range(args.samples):
                text = generate(run, prefix, max_new=120, temperature=0.8, top_k=20,
                                seed=args.seed * 1000 + i * 10 + k)
                print(f"  {text}")
    print(f"load average (1, 5, 15 min) at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
