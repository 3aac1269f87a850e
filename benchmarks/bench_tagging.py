"""Part-of-speech tagging on UD English-LinES with ``packrnn train --task tag``: accuracy per
seed, and the same tagger packed vs padded.

Run from the repository root (the data set is never copied into the project; its licence is
CC BY-NC-SA)::

    python benchmarks/bench_tagging.py [--data-dir ../shared/data/ud_english_lines] [--threads 2]
    python benchmarks/bench_tagging.py --seeds 0,1,2          # the recommended run per seed
    python benchmarks/bench_tagging.py --compare-padded       # + packed vs padded, same batches
    python benchmarks/bench_tagging.py --limit 200 --epochs 1 # a quick check that it runs

What runs (issue 12, "Goals"):

- **recommended**: ``RECOMMENDED`` below -- a BiLSTM over word embeddings and character
  features (a character BiLSTM per word, run packed), UPOS of ``en_lines-ud-train.conllu``
  (3,457 sentences, 64,684 words), random batches reshuffled every epoch, tested on
  ``en_lines-ud-test.conllu`` (1,121 sentences, 19,984 words) after every epoch. Goal: test
  token accuracy >= 0.95 with <= 120 s of training on 2 cores, for every seed.
- **packed vs padded** (``--compare-padded``): the same tagger, the same seed (so the same
  initial weights and the same batches), once packed (only real steps; the loss a plain
  cross-entropy over the packed rows) and once padded as the classic lesson does (every layer,
  the character layer too, runs over the padded batch; the loss masks the padding). Goal:
  packed >= 2x faster per epoch at the same accuracy.

Times are ``metrics.json``'s ``seconds``: the training loop of an epoch (batching, collate,
forward, backward, optimizer step); reading and encoding the files, the test evaluation and
the checkpoints are excluded. The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
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
from packrnn.train import TrainConfig, train  # noqa: E402

TRAIN, TEST = "en_lines-ud-train.conllu", "en_lines-ud-test.conllu"
# The README's recommended configuration. Kept in one place: the script runs exactly this and
# prints it as a command line.
RECOMMENDED = dict(model="lstm", bidirectional=True, embed_dim=100, hidden_size=128,
                   char_features=True, char_embed_dim=32, char_hidden_size=50, lowercase=True,
                   min_freq=2, embed_dropout=0.3, dropout=0.3, batch_size=32, lr=5e-3,
                   lr_decay=0.75, epochs=8, grad_clip=5.0)
def command(cfg: dict) -> str:
    """The ``packrnn train`` command line for TrainConfig keyword arguments."""
    return train_command(dict(task="tag", train_path=TRAIN, test_path=TEST, **cfg))


def _sentences(path: Path) -> list[str]:
    return [b.strip("\n") + "\n" for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]


def limited(data_dir: Path, limit: int, out: Path) -> Path:
    """A random sample of ``limit`` sentences of each file (a quick check), written to ``out``.

    Run it with ``skip_bad_rows=True``: the test sample may hold a tag the training sample lacks.
    """
    r = random.Random(0)
    for name in (TRAIN, TEST):
        blocks = _sentences(data_dir / name)
        (out / name).write_text("\n".join(r.sample(blocks, min(limit, len(blocks)))) + "\n",
                                encoding="utf-8")
    return out


def run(data_dir: Path, threads: int, seed: int, **cfg) -> dict:
    """One ``train()`` in a temporary run directory: per-epoch seconds and test accuracy."""
    with tempfile.TemporaryDirectory(prefix="bench_tagging_") as out:
        config = TrainConfig(train_path=str(data_dir / TRAIN), test_path=str(data_dir / TEST),
                             output=out, task="tag", format="conllu", tagset="upos",
                             threads=threads, seed=seed, progress=False, plot=False,
                             device="cpu", **cfg)
        with contextlib.redirect_stderr(io.StringIO()):
            history = train(config)
    return {"seconds": [m.seconds for m in history], "acc": [m.test_accuracy for m in history],
            "train_seconds": sum(m.seconds for m in history)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="UPOS tagging on UD English-LinES with packrnn.")
    p.add_argument("--data-dir", type=Path,
                   default=ROOT.parent / "shared" / "data" / "ud_english_lines",
                   help="folder with the LinES .conllu files "
                        "(default: ../shared/data/ud_english_lines)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seeds", default="0", metavar="S,S,...",
                   help="seeds of the recommended run, comma-separated (default: 0)")
    p.add_argument("--epochs", type=int, help="override the recommended number of epochs")
    p.add_argument("--compare-padded", action="store_true",
                   help="also train the same tagger padded (masked loss) on the same batches")
    p.add_argument("--compare-epochs", type=int, default=2,
                   help="epochs of each packed/padded comparison run (default: 2)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="use a random N sentences of each file (a quick check, not a result)")
    args = p.parse_args(argv)
    for name in (TRAIN, TEST):
        if not (args.data_dir / name).is_file():
            p.error(f"--data-dir: expected a folder with {name}, got {str(args.data_dir)!r}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        p.error(f"--seeds: expected integers separated by commas, got {args.seeds!r}")
    cfg = dict(RECOMMENDED)
    if args.epochs:
        cfg["epochs"] = args.epochs
    extra = dict(skip_bad_rows=True) if args.limit else {}

    torch.set_num_threads(args.threads)
    from packrnn.backend import backend_info

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"packrnn backend: {backend_info()}")
    with tempfile.TemporaryDirectory(prefix="bench_tagging_data_") as tmp:
        data_dir = limited(args.data_dir, args.limit, Path(tmp)) if args.limit else args.data_dir
        if args.limit:
            print(f"--limit {args.limit}: a random sample of each file; NOT a result")
        # Untimed warm-up: native kernel load, thread pools, allocator.
        warm = Path(tmp) / "warm"
        warm.mkdir()
        run(limited(args.data_dir, 40, warm), args.threads, 0,
            **dict(cfg, epochs=1, skip_bad_rows=True))
        print(f"load average (1, 5, 15 min) at start: {load_average()}")
        print(f"\nrecommended configuration:\n  {command(cfg)} --output runs/upos")
        passed = []
        for seed in seeds:
            t0 = time.perf_counter()
            r = run(data_dir, args.threads, seed, **cfg, **extra)
            per_epoch = ", ".join(f"{a:.4f} ({s:.1f} s)" for s, a in zip(r["seconds"], r["acc"]))
            ok = r["acc"][-1] >= 0.95 and r["train_seconds"] <= 120.0
            passed.append(ok)
            print(f"  seed {seed}: test accuracy per epoch (epoch time) {per_epoch}; final "
                  f"{r['acc'][-1]:.4f} (>= 0.95) after {r['train_seconds']:.1f} s of training "
                  f"(<= 120 s): {'PASS' if ok else 'FAIL'}  [{time.perf_counter() - t0:.0f} s "
                  "wall]", flush=True)
        print(f"goal (recommended, every seed): {sum(passed)}/{len(passed)} seeds pass: "
              f"{'PASS' if all(passed) else 'FAIL'}")

        if args.compare_padded:
            same = dict(cfg, epochs=args.compare_epochs, lr_decay=1.0)
            print(f"\npacked vs padded: the same tagger, seed {seeds[0]}, same batches, "
                  f"{args.compare_epochs} epoch(s)")
            res = {ex: run(data_dir, args.threads, seeds[0], **dict(same, execution=ex), **extra)
                   for ex in ("packed", "padded")}
            print(f"  {'execution':<10} {'s/epoch':>8} {'test accuracy by epoch':>26}")
            for ex, r in res.items():
                accs = " ".join(f"{a:.4f}" for a in r["acc"])
                print(f"  {ex:<10} {r['train_seconds'] / len(r['seconds']):>8.1f} {accs:>26}")
            ratio = res["padded"]["train_seconds"] / res["packed"]["train_seconds"]
            diff = res["packed"]["acc"][-1] - res["padded"]["acc"][-1]
            ok = ratio >= 2.0 and diff >= -0.005
            print(f"goal (packed >= 2x faster per epoch at the same accuracy): {ratio:.2f}x, "
                  f"accuracy packed - padded {diff:+.4f}: {'PASS' if ok else 'FAIL'}")
    print(f"load average (1, 5, 15 min) at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
