"""Training step of SequenceClassifier, eager vs torch.compile, side by side in one run.

    python benchmarks/bench_compile.py [--steps 40] [--threads 2] [--configs lesson,recommended]

Two configurations (issue 10's "Measure"):

* ``lesson``: the AG News lesson's size: LSTM embed 64 hidden 32, last-state pooling, B=16;
* ``recommended``: the README's AG News recommendation: BiLSTM embed 128 hidden 128, max
  pooling, embedding dropout 0.4, B=64.

Batches: token ids with AG News-like lengths (lognormal, median 41, sigma 0.275, clamped to
[5, 200]), grouped into batches of similar lengths as the trainer's bucketing sampler does, a
vocabulary of 20,000. One step is the trainer's own (``packrnn.train._Step``, what ``packrnn
train`` runs per batch): the classify task's forward and cross-entropy, the loss read back,
backward, the trainer's Adam (fused), with each variant's batches made by the trainer's
collate for that variant. Eager: packed batches, the default trainer. Compiled: what
``--compile`` does (``packrnn.train.compile_for_training``, NOTE [compiled training]): padded
batches with lengths, the model compiled (inductor, dynamic shapes, torch's dropout RNG), its
layers on the padded + lengths path with one ``packrnn::layer_forward`` operator per layer; the
optimizer step stays the fused Adam. The two are timed interleaved over the same batches; the
figure is the median step time of each, and the compile time is the wall time of the compiled
variant's warm-up steps (its first four and the longest batch: every compilation happens there)
minus the steady-state step time.
Goal: compiled >= 1.0x eager at both sizes and >= 1.3x at B=16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from packrnn.bench import cpu_name, load_average
from packrnn.models import SequenceClassifier
from packrnn.tasks import get_task
from packrnn.tasks.classify import _collate
from packrnn.train import TrainConfig, _Adam, _Step, compile_for_training

CONFIGS = {  # TrainConfig fields
    "lesson": dict(batch_size=16, model="lstm", embed_dim=64, hidden_size=32, pooling="last"),
    "recommended": dict(batch_size=64, model="lstm", embed_dim=128, hidden_size=128,
                        bidirectional=True, pooling="max", embed_dropout=0.4),
}
VOCAB = 20_000


def agnews_like_lengths(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) int64 lengths: lognormal, median 41, sigma 0.275, clamped to [5, 200]."""
    normal = torch.randn(count, generator=generator, dtype=torch.float64)
    return (41.0 * torch.exp(0.275 * normal)).round().clamp(5, 200).to(torch.int64)


def bucketed_items(batch: int, steps: int, seed: int = 0) -> list[list[tuple[torch.Tensor, int]]]:
    """``steps`` batches of ``(ids (L,), label)`` items of similar lengths, in random order."""
    g = torch.Generator().manual_seed(seed)
    lengths = agnews_like_lengths(batch * steps, g).sort().values
    batches = []
    for k in range(steps):
        chunk = lengths[k * batch : (k + 1) * batch]
        chunk = chunk[torch.randperm(batch, generator=g)]
        labels = torch.randint(0, 4, (batch,), generator=g).tolist()
        batches.append([(torch.randint(1, VOCAB, (n,), generator=g), y)
                        for n, y in zip(chunk.tolist(), labels)])
    order = torch.randperm(steps, generator=g).tolist()
    return [batches[i] for i in order]


def trainer_step(cfg: TrainConfig):
    """The trainer's step for ``cfg`` and its collate: what ``packrnn train`` runs per batch."""
    task = get_task("classify")
    torch.manual_seed(cfg.seed)
    model = SequenceClassifier(cfg.model_config(VOCAB, 4, 0)).train()
    net = compile_for_training(model) if cfg.compile else model
    step = _Step(task, model, net, _Adam(model, cfg), cfg.grad_clip)
    return step, _collate(cfg, 0)


def run_config(name: str, steps: int) -> dict:
    fields = dict(train_path="unused", output="unused", **CONFIGS[name])
    variants = {"eager": trainer_step(TrainConfig(**fields)),
                "compiled": trainer_step(TrainConfig(compile=True, **fields))}
    items = bucketed_items(fields["batch_size"], steps + 4)
    batches = {v: [collate(b) for b in items] for v, (_, collate) in variants.items()}
    cpu = torch.device("cpu")

    # Warm-up: two eager steps; the compiled variant's first steps and its step on the longest
    # batch (inductor may specialise once on a size: NOTE [compiled training]) compile, timed
    # as a whole.
    for i in range(2):
        variants["eager"][0](batches["eager"][i], cpu)
    longest = max(range(len(items)), key=lambda i: max(len(ids) for ids, _ in items[i]))
    warm = [0, 1, 2, 3, longest]
    start = time.perf_counter()
    for i in warm:
        variants["compiled"][0](batches["compiled"][i], cpu)
    warm_s = time.perf_counter() - start

    times = {"eager": [], "compiled": []}
    for i in range(4, len(items)):
        for variant, (step, _) in variants.items():
            start = time.perf_counter()
            step(batches[variant][i], cpu)
            times[variant].append(time.perf_counter() - start)
    eager_s = statistics.median(times["eager"])
    compiled_s = statistics.median(times["compiled"])
    return dict(name=name, batch=fields["batch_size"], eager=eager_s, compiled=compiled_s,
                compile_s=max(warm_s - len(warm) * compiled_s, 0.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant (default 40)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--configs", default="lesson,recommended",
                   help=f"comma-separated, of {', '.join(CONFIGS)}")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or args.steps < 1 or args.threads < 1:
        p.error(f"--configs: expected names of {sorted(CONFIGS)}, --steps and --threads >= 1; "
                f"got {args.configs!r}, {args.steps}, {args.threads}")
    torch.set_num_threads(args.threads)
    print(f"# {cpu_name()}; torch {torch.__version__}; {args.threads} threads; load average "
          f"at start {load_average()}")
    print("| config | B | eager ms/step | compiled ms/step | compiled vs eager | goal | "
          "compile time s |")
    print("|---|---|---|---|---|---|---|")
    ok = True
    for name in names:
        r = run_config(name, args.steps)
        ratio = r["eager"] / r["compiled"]
        goal = 1.3 if r["batch"] <= 16 else 1.0
        passed = ratio >= goal
        ok &= passed
        print(f"| {name} | {r['batch']} | {r['eager'] * 1e3:.2f} | {r['compiled'] * 1e3:.2f} | "
              f"{ratio:.2f}x | >= {goal}x {'PASS' if passed else 'FAIL'} | "
              f"{r['compile_s']:.1f} |", flush=True)
    print(f"# load average at end {load_average()}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PACKRNN_BACKEND", "native")
    sys.exit(main())
