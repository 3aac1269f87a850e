"""Issue 10 "Measure": the exported ONNX classifier in onnxruntime vs packrnn eager vs torch.

    python benchmarks/bench_onnx.py [--configs lesson,recommended] [--threads N]
                                    [--repeats 7] [--calls 50] [--batch 256] [--quick]

Three ways to run the same trained-size classifier (same weights, evaluation mode):

- **eager**: packrnn's ``SequenceClassifier(ids, lengths)`` under ``torch.inference_mode``
  (packed execution: only the real steps).
- **onnx**: ``packrnn.export_onnx`` of that model in onnxruntime (standard LSTM operators fed
  ``sequence_lens``: only the real steps), inputs ``ids`` and ``lengths``.
- **torch.onnx**: what a torch user can export today: the same weights in a plain
  ``nn.Embedding -> nn.LSTM -> pooling -> nn.Linear`` module on the padded batch, no lengths
  (``torch.onnx.export``, dynamic batch and time), in onnxruntime. It runs every padded
  position, so on a batch of mixed lengths its logits are not the model's (the script prints
  how far they are); at B=1 there is no padding and all three agree.

Configurations: ``lesson`` (LSTM, E=64, H=32, last state; the classic lesson's size) and
``recommended`` (BiLSTM, E=128, H=128, max pooling; README's AG News recommendation), with a
vocabulary of 30,000 and 4 classes (random weights: speed does not depend on training).

Measured: B=1 latency at lengths 40 and 200 (ms per call), and B=256 throughput (sequences/s)
on AG News-like lengths: lognormal with median 41 and sigma 0.275, rounded and clamped to
[5, 200] (a fit to the basic_english token counts of AG News test.csv: median 42, 5 %-95 %
26-63, max 161), ``numpy`` seed 0; the data set is not needed. Each case runs ``--calls``
calls per round, the variants interleaved round by round, and the best of ``--repeats`` rounds
counts. torch and onnxruntime get the same number of intra-op threads (``--threads``, default
torch's current count), and both are printed. Goal (issue 10): the served model at least as
fast as packrnn eager at B=1, at both lengths, for every configuration.

``--split-directions`` (bidirectional configurations) adds an experiment, **onnx 2-node**: the
same file with each bidirectional recurrent node rewritten as a forward and a reverse node
(the same operator and weights, outputs concatenated: identical logits), served with
onnxruntime's parallel executor (``--threads`` inter-op threads, 1 intra-op thread). Why:
onnxruntime's CPU LSTM/GRU run a bidirectional node's directions one after the other and
spread the time loop only over chunks of the batch, so at B=1 extra intra-op threads have
nothing to do, while packrnn runs the two directions on two threads at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from packrnn import ModelConfig, SequenceClassifier, export_onnx  # noqa: E402

VOCAB, CLASSES = 30_000, 4
CONFIGS = {
    "lesson": dict(embed_dim=64, hidden_size=32, cell="lstm", bidirectional=False,
                   pooling="last"),
    "recommended": dict(embed_dim=128, hidden_size=128, cell="lstm", bidirectional=True,
                        pooling="max"),
}


class PlainLSTMClassifier(nn.Module):
    """What a torch user exports today: torch.nn modules on the padded batch, no lengths."""

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        c = model.config
        self.pooling = c.pooling
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        self.rnn = nn.LSTM(c.embed_dim, c.hidden_size, num_layers=c.num_layers,
                           bidirectional=c.bidirectional, batch_first=True)
        self.fc = nn.Linear(c.feature_size, c.num_classes)
        self.load_state_dict(model.state_dict())  # packrnn's parameters have torch's names
        self.dirs = 2 if c.bidirectional else 1

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, (h_n, _) = self.rnn(self.embedding(ids))  # (B, T, D); (layers*dirs, B, H)
        if self.pooling == "last":
            z = torch.cat(list(h_n[-self.dirs:]), dim=-1)  # (B, D): after the padding too
        elif self.pooling == "mean":
            z = out.mean(dim=1)  # (B, D): padding included
        else:
            z = out.amax(dim=1)  # (B, D): padding included
        return self.fc(z)  # (B, C)


def ag_news_lengths(batch: int, seed: int = 0) -> np.ndarray:
    """(B,) int64 lengths like AG News token counts (see the module docstring)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(41.0), 0.275, size=batch))
    return np.clip(np.rint(lengths), 5, 200).astype(np.int64)


def make_batch(lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """(B, T) int64 ids padded with 0 after each length, T = max(lengths)."""
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(2, VOCAB, size=(len(lengths), int(lengths.max())), dtype=np.int64)
    ids[np.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0
    return ids


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle onnxruntime threads spin by default, which takes the cores from torch's calls
    # interleaved with them in this process; they sleep here, as torch's do.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def split_directions(path: Path, out: Path) -> bool:
    """Write ``path`` with every bidirectional LSTM/GRU/RNN node as a forward and a reverse node
    (``--split-directions``); False if it has none."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    nodes, split = [], False
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in ("LSTM", "GRU", "RNN") or attrs.get("direction") != b"bidirectional":
            nodes.append(node)
            continue
        split = True
        ys, states = [], []
        for d, direction in enumerate(("forward", "reverse")):
            inputs = list(node.input)
            for k in (1, 2, 3):  # W, R, B: (dirs, ...) -> this direction's (1, ...)
                array = numpy_helper.to_array(weights[node.input[k]])[d:d + 1]
                inputs[k] = f"{node.input[k]}_{direction}"
                model.graph.initializer.append(numpy_helper.from_array(array, inputs[k]))
            one = dict(attrs, direction=direction)
            if "activations" in one:  # the first half is the forward direction's
                n = len(one["activations"]) // 2
                one["activations"] = one["activations"][d * n:(d + 1) * n]
            outs = [f"{o}_{direction}" for o in node.output]
            nodes.append(helper.make_node(node.op_type, inputs, outs,
                                          name=f"{node.name}_{direction}", **one))
            ys.append(outs[0])
            states.append(outs[1])
        nodes.append(helper.make_node("Concat", ys, [node.output[0]], axis=1))  # (T, 2, B, H)
        nodes.append(helper.make_node("Concat", states, [node.output[1]], axis=0))  # (2, B, H)
    if not split:
        return False
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return True


def parallel_session(path: Path, threads: int):
    """onnxruntime's parallel executor: ``threads`` inter-op threads, 1 intra-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_plain(plain: PlainLSTMClassifier, path: Path) -> None:
    import warnings

    example = torch.randint(2, VOCAB, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (example,), str(path), input_names=["ids"],
                          output_names=["logits"], dynamic_axes={"ids": {0: "B", 1: "T"}},
                          opset_version=17, dynamo=False)


def best_time(runners: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict:
    """Seconds per call of each runner: best of ``repeats`` rounds of ``calls`` calls, the
    runners interleaved round by round (after one warm-up call each)."""
    for run in runners.values():
        run()
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def bench_config(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=VOCAB, num_classes=CLASSES,
                                           **CONFIGS[name])).eval()
    plain = PlainLSTMClassifier(model).eval()
    ours_path, plain_path = tmp / f"{name}.onnx", tmp / f"{name}_torch.onnx"
    start = time.perf_counter()
    export_onnx(model, ours_path)
    export_s = time.perf_counter() - start
    export_plain(plain, plain_path)
    ours, theirs = session(ours_path, args.threads), session(plain_path, args.threads)
    split_path = tmp / f"{name}_split.onnx"
    split = (parallel_session(split_path, args.threads)
             if args.split_directions and split_directions(ours_path, split_path) else None)

    def runners(ids: np.ndarray, lengths: np.ndarray) -> dict[str, Callable[[], object]]:
        ids_t, lengths_t = torch.from_numpy(ids), torch.from_numpy(lengths)

        def eager():
            with torch.inference_mode():
                return model(ids_t, lengths_t).numpy()

        result = {"eager": eager,
                  "onnx": lambda: ours.run(["logits"], {"ids": ids, "lengths": lengths})[0],
                  "torch.onnx": lambda: theirs.run(["logits"], {"ids": ids})[0]}
        if split is not None:
            result["onnx 2-node"] = lambda: split.run(["logits"],
                                                      {"ids": ids, "lengths": lengths})[0]
        return result

    rows = {}
    for length in (40, 200):
        lengths = np.array([length], dtype=np.int64)
        ids = make_batch(lengths)
        rs = runners(ids, lengths)
        outs = {k: r() for k, r in rs.items()}
        diff = max(float(np.abs(outs[k] - outs["eager"]).max()) for k in outs if k != "eager")
        rows[f"B=1 L={length}"] = (best_time(rs, args.repeats, args.calls), diff)
    lengths = ag_news_lengths(args.batch)
    ids = make_batch(lengths)
    rs = runners(ids, lengths)
    outs = {k: r() for k, r in rs.items()}
    rows[f"B={args.batch}"] = (best_time(rs, args.repeats, max(1, args.calls // 10)),
                               {k: float(np.abs(outs[k] - outs["eager"]).max())
                                for k in outs if k != "eager"})
    return {"export_s": export_s, "rows": rows, "size_mb": ours_path.stat().st_size / 1e6,
            "lengths": lengths}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="lesson,recommended",
                   help=f"comma-separated among {', '.join(CONFIGS)} (default: both)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads for torch and onnxruntime (default: torch's, "
                        f"{torch.get_num_threads()})")
    p.add_argument("--repeats", type=int, default=7, help="rounds; the best counts (default: 7)")
    p.add_argument("--calls", type=int, default=50,
                   help="calls per round at B=1; a tenth of it at the large batch (default: 50)")
    p.add_argument("--batch", type=int, default=256, help="throughput batch (default: 256)")
    p.add_argument("--split-directions", action="store_true",
                   help="also time the bidirectional layers as two nodes under onnxruntime's "
                        "parallel executor (see the module docstring)")
    p.add_argument("--quick", action="store_true",
                   help="check that the script works: 2 rounds of 3 calls, batch 32")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.calls, args.batch = 2, 3, 32
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: expected names among {', '.join(CONFIGS)}, got {args.configs!r}")
    try:
        import onnxruntime as ort
    except ImportError:
        p.error("needs onnx and onnxruntime: pip install 'packrnn[onnx]'")

    torch.set_num_threads(args.threads)
    print(f"threads: torch {torch.get_num_threads()}, onnxruntime intra-op {args.threads} "
          f"(inter-op 1); torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"best of {args.repeats} interleaved rounds; {args.calls} calls per round at B=1, "
          f"{max(1, args.calls // 10)} at B={args.batch}")
    goal_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = bench_config(name, args, Path(tmp))
            lengths = r["lengths"]
            print(f"\n{name}: {CONFIGS[name]}, vocab {VOCAB}; export_onnx {r['export_s']:.2f} s, "
                  f"{r['size_mb']:.1f} MB")
            print(f"  {'case':<12} {'eager':>10} {'onnx':>10} {'torch.onnx':>11}   "
                  f"{'eager/onnx':>10} {'torch.onnx/onnx':>15}")
            for case, (t, diff) in r["rows"].items():
                if case.startswith("B=1 "):
                    cells = [f"{t[k] * 1e3:8.3f}ms" for k in ("eager", "onnx", "torch.onnx")]
                    goal_ok &= t["onnx"] <= t["eager"]
                else:
                    cells = [f"{args.batch / t[k]:7.0f}/s" for k in ("eager", "onnx", "torch.onnx")]
                print(f"  {case:<12} {cells[0]:>10} {cells[1]:>10} {cells[2]:>11}   "
                      f"{t['eager'] / t['onnx']:9.2f}x {t['torch.onnx'] / t['onnx']:14.2f}x")
                if "onnx 2-node" in t:
                    two = t["onnx 2-node"]
                    cell = (f"{two * 1e3:.3f}ms" if case.startswith("B=1 ")
                            else f"{args.batch / two:.0f}/s")
                    print(f"  {'':<12} onnx 2-node (parallel executor): {cell}, "
                          f"eager/2-node {t['eager'] / two:.2f}x")
            b1 = max(d for c, (_, d) in r["rows"].items() if c.startswith("B=1 "))
            big = r["rows"][f"B={args.batch}"][1]
            print(f"  max |logits - eager|: B=1 {b1:.1e} (all three); B={args.batch} onnx "
                  f"{big['onnx']:.1e}, torch.onnx {big['torch.onnx']:.1e} (it runs the padding: "
                  f"lengths {int(lengths.min())}-{int(lengths.max())}, mean "
                  f"{lengths.mean():.1f}, padded to {int(lengths.max())})")
    print(f"\ngoal: served model at least as fast as packrnn eager at B=1: "
          f"{'PASS' if goal_ok else 'FAIL'}")
    return 0 if goal_ok else 1


if __name__ == "__main__":
    sys.exit(main())
