"""Training step of SequenceClassifier, eager vs torch.compile, side by side in one run.

    python benchmarks/bench_compile.py [--steps 40] [--threads 2] [--configs lesson,recommended]

Two configurations (issue 10's "Measure"):

* ``lesson``: the AG News lesson's size: LSTM embed 64 hidden 32, last-state pooling, B=16;
* ``recommended``: the README's AG News recommendation: BiLSTM embed 128 hidden 128, max
  pooling, embedding dropout 0.4, B=64.

Batches: token ids with AG News-like lengths (lognormal, median 41, sigma 0.275, clamped to
[5, 200]), grouped into batches of similar lengths as the trainer's bucketing sampler does, a
vocabulary of 20,000. One step = forward, cross-entropy, backward, Adam step. Eager runs the
packed path; compiled runs ``torch.compile(model)`` (inductor, dynamic shapes), whose layers take
the padded + lengths path with one ``packrnn::layer_forward`` operator per layer. The two are
timed interleaved over the same batches; the figure is the median step time of each, and the
compile time is the wall time of the compiled model's first steps (first compile and the
recompile for dynamic shapes) minus the steady-state step time. Goal: compiled >= 1.0x eager at
both sizes and >= 1.3x at B=16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from packrnn.bench import cpu_name, load_average
from packrnn.models import ModelConfig, SequenceClassifier

CONFIGS = {
    "lesson": dict(batch=16, config=dict(cell="lstm", embed_dim=64, hidden_size=32,
                                         pooling="last")),
    "recommended": dict(batch=64, config=dict(cell="lstm", embed_dim=128, hidden_size=128,
                                              bidirectional=True, pooling="max",
                                              embed_dropout=0.4)),
}
VOCAB = 20_000


def agnews_like_lengths(count: int, generator: torch.Generator) -> torch.Tensor:
    """(count,) int64 lengths: lognormal, median 41, sigma 0.275, clamped to [5, 200]."""
    normal = torch.randn(count, generator=generator, dtype=torch.float64)
    return (41.0 * torch.exp(0.275 * normal)).round().clamp(5, 200).to(torch.int64)


def bucketed_batches(batch: int, steps: int, seed: int = 0):
    """``steps`` (ids (B, T), lengths (B,)) batches of similar lengths, in random order."""
    g = torch.Generator().manual_seed(seed)
    lengths = agnews_like_lengths(batch * steps, g).sort().values
    batches = []
    for k in range(steps):
        chunk = lengths[k * batch : (k + 1) * batch]
        chunk = chunk[torch.randperm(batch, generator=g)]
        ids = torch.randint(1, VOCAB, (batch, int(chunk.max())), generator=g)
        for b, n in enumerate(chunk.tolist()):
            ids[b, n:] = 0
        batches.append((ids, chunk))
    order = torch.randperm(steps, generator=g).tolist()
    return [batches[i] for i in order]


def make_step(model, optimizer):
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(ids, lengths, labels):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids, lengths), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def run_config(name: str, steps: int) -> dict:
    spec = CONFIGS[name]
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, num_classes=4, padding_idx=0, **spec["config"])
    eager = SequenceClassifier(config).train()
    compiled_model = SequenceClassifier(config).train()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model)
    steps_eager = make_step(eager, torch.optim.Adam(eager.parameters(), lr=1e-3))
    steps_compiled = make_step(compiled, torch.optim.Adam(compiled_model.parameters(), lr=1e-3))
    batches = bucketed_batches(spec["batch"], steps + 4)
    labels = [torch.randint(0, 4, (spec["batch"],), generator=torch.Generator().manual_seed(i))
              for i in range(len(batches))]

    # Warm-up: two eager steps; the compiled model's first steps compile (static, then
    # dynamic shapes), timed as a whole.
    for i in range(2):
        steps_eager(*batches[i], labels[i])
    start = time.perf_counter()
    for i in range(4):
        steps_compiled(*batches[i], labels[i])
    first_four = time.perf_counter() - start

    times = {"eager": [], "compiled": []}
    for i in range(4, len(batches)):
        for variant, fn in (("eager", steps_eager), ("compiled", steps_compiled)):
            start = time.perf_counter()
            fn(*batches[i], labels[i])
            times[variant].append(time.perf_counter() - start)
    eager_s = statistics.median(times["eager"])
    compiled_s = statistics.median(times["compiled"])
    return dict(name=name, batch=spec["batch"], eager=eager_s, compiled=compiled_s,
                compile_s=max(first_four - 4 * compiled_s, 0.0))


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
