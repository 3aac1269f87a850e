"""``packrnn demo``: the main job, on built-in data (no download), in about a minute on 2 cores.

1. The reference material's "hello" example: one-hot characters h, e, l, o through
   ``packrnn.RNN(4, 2, batch_first=True)``: input (3, 5, 4) -> output (3, 5, 2); then the same
   batch with lengths, packed.
2. The classic "hihello" character RNN: learn to predict "ihello" from "hihell" (one-hot
   characters through ``packrnn.RNN``, a linear layer, cross-entropy per step), printed step by
   step, then generate from "h" one step at a time carrying the hidden state.
3. A synthetic text task in which word order matters: every text holds the two marker words
   ``alpha`` and ``omega`` once each among distractor words, lengths 1 to 200; the label is the
   marker that comes first. Both labels have the same words, so a bag-of-words model is at chance
   (shown). A packrnn LSTM classifier is trained with ``packrnn.train`` twice, on packed input
   (only real steps) and on the padded batch as the classic lesson does, and the demo prints
   their speed and accuracy side by side.
4. ``packrnn.train.predict`` on two texts with the same words in a different order.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["main", "hello", "hihello", "make_order_task", "MARKERS", "LABELS"]

MARKERS = ("alpha", "omega")
LABELS = ("alpha-first", "omega-first")
# Distractors: 40 everyday words; none is a marker.
WORDS = ("the a of and to in is was for on with as at by from it this that be are or an have "
         "not but all can one two new time year day way man world life hand part place case "
         "week").split()


def hello() -> torch.Tensor:
    """Run the "hello" example; prints and returns the (3, 5, 2) output."""
    from . import RNN, pack_padded_sequence, pad_packed_sequence

    h, e, l, o = ([1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0])
    inputs = torch.tensor([[h, e, l, l, o], [e, o, l, l, l], [l, l, e, e, l]])  # (B=3, T=5, E=4)
    torch.manual_seed(0)
    rnn = RNN(input_size=4, hidden_size=2, batch_first=True)
    out, h_n = rnn(inputs)  # (3, 5, 2), (1, 3, 2)
    print("1. the 'hello' example: one-hot h, e, l, o -> packrnn.RNN(4, 2, batch_first=True)")
    print(f"   words 'hello', 'eolll', 'lleel' -> input {tuple(inputs.shape)} -> output "
          f"{tuple(out.shape)}, h_n {tuple(h_n.shape)}")
    for word, row in zip(("hello", "eolll", "lleel"), out):
        print(f"   {word}: " + " ".join(f"({a:+.3f},{b:+.3f})" for a, b in row.tolist()))
    lengths = [5, 3, 2]  # 'hello', 'eol', 'll'
    packed = pack_padded_sequence(inputs, lengths, batch_first=True, enforce_sorted=False)
    p_out, p_h = rnn(packed)
    padded, _ = pad_packed_sequence(p_out, batch_first=True)
    same = torch.allclose(padded[0], out[0]) and torch.allclose(p_h[0, 1], padded[1, 2])
    print(f"   packed with lengths {lengths}: data {tuple(packed.data.shape)}, batch_sizes "
          f"{packed.batch_sizes.tolist()} -> h_n at each word's own last letter "
          f"({'matches' if same else 'DIFFERS FROM'} the padded run's steps)")
    return out


def hihello(max_steps: int = 100, seed: int = 0) -> str:
    """Train the classic "hihello" character RNN, printing every step; returns the text it
    generates from "h" once trained (``"hihello"`` when it has learnt)."""
    from . import RNN

    chars = ["h", "i", "e", "l", "o"]
    x_ids = torch.tensor([chars.index(c) for c in "hihell"])  # (T,) = (6,)
    y_ids = torch.tensor([chars.index(c) for c in "ihello"])  # the next character at each step
    one_hot = torch.eye(len(chars))
    torch.manual_seed(seed)
    rnn = RNN(input_size=5, hidden_size=8, batch_first=True)
    fc = nn.Linear(8, 5)
    opt = torch.optim.Adam([*rnn.parameters(), *fc.parameters()], lr=0.1)
    print("\n2. the 'hihello' character RNN: one-hot h, i, e, l, o -> packrnn.RNN(5, 8) -> "
          "linear -> the next character")
    print("   input 'hihell' (1, 6, 5), target 'ihello': cross-entropy at every step")
    for step in range(1, max_steps + 1):
        out, _ = rnn(one_hot[x_ids][None])  # (1, 6, 8)
        logits = fc(out[0])  # (6, 5): one prediction per step
        loss = nn.functional.cross_entropy(logits, y_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        guess = "".join(chars[i] for i in logits.argmax(-1).tolist())
        print(f"   step {step:3d}  loss {float(loss.detach()):.4f}  predicted {guess!r}")
        if guess == "ihello" and float(loss.detach()) < 0.1:
            break
    # Generation: feed one character, keep the state, feed back the prediction.
    with torch.no_grad():
        text, h, c = "h", None, chars.index("h")
        for _ in range(6):
            out, h = rnn(one_hot[c][None, None], h)  # (1, 1, 8): one step, state carried in h
            c = int(fc(out[0, -1]).argmax())
            text += chars[c]
    print(f"   generated from 'h' one step at a time, carrying the hidden state: {text!r}")
    return text


def make_order_task(n: int, seed: int, max_length: int = 200) -> list[dict[str, str]]:
    """``n`` texts of 1..max_length words; label: which marker comes first.

    Lengths are uniform in [1, max_length]; a text of one word is just a marker. Otherwise
    both markers appear once, at random positions, among random distractor words.
    """
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        length = r.randint(1, max_length)
        first = r.randrange(2)
        words = [r.choice(WORDS) for _ in range(length)]
        if length == 1:
            words[0] = MARKERS[first]
        else:
            i, j = sorted(r.sample(range(length), 2))
            words[i], words[j] = MARKERS[first], MARKERS[1 - first]
        rows.append({"text": " ".join(words), "label": LABELS[first]})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _bag_of_words_accuracy(train_rows, test_rows, epochs: int, seed: int) -> float:
    """Mean-of-embeddings + linear classifier (no word order): the baseline at chance."""
    vocab = {w: i for i, w in enumerate(sorted(set(WORDS) | set(MARKERS)))}

    def encode(rows):
        ids = [torch.tensor([vocab[w] for w in r["text"].split()]) for r in rows]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return torch.cat(ids), offsets, torch.tensor([LABELS.index(r["label"]) for r in rows])

    torch.manual_seed(seed)
    bag = nn.EmbeddingBag(len(vocab), 16, mode="mean")
    fc = nn.Linear(16, 2)
    opt = torch.optim.Adam([*bag.parameters(), *fc.parameters()], lr=0.01)
    ids, offsets, y = encode(train_rows)
    for _ in range(epochs * 20):  # full-batch steps: plenty for a linear model
        loss = nn.functional.cross_entropy(fc(bag(ids, offsets)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, offsets, y = encode(test_rows)
    with torch.no_grad():
        return float((fc(bag(ids, offsets)).argmax(-1) == y).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; ``argv`` are its options (see ``packrnn demo --help``)."""
    from .backend import backend_name
    from .train import TrainConfig, predict, train

    from .cli import _Parser  # one-line usage errors, like the other commands

    p = _Parser(prog="packrnn demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--train-size", type=int, default=8000, help="training texts (default: 8000)")
    p.add_argument("--test-size", type=int, default=1000, help="test texts (default: 1000)")
    p.add_argument("--max-length", type=int, default=200, help="longest text (default: 200)")
    p.add_argument("--epochs", type=int, default=3, help="(default: 3)")
    p.add_argument("--hidden-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--seed", type=int, default=0)
    # One thread: at this size a time step's matrix multiply is too small to split, and
    # threads that meet at every step stall when other processes share the cores.
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--output", metavar="DIR", help="keep the data and runs here (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = p.parse_args(list(argv) if argv is not None else None)
    for name in ("train_size", "test_size", "max_length", "epochs", "hidden_size", "batch_size",
                 "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(a, name)}")
    if a.max_length < 2:
        p.error(f"--max-length: expected at least 2 (two markers), got {a.max_length}")

    start = time.perf_counter()
    print(f"packrnn demo (backend: {backend_name()}, {a.threads} thread(s))\n")
    hello()
    hihello()

    root = Path(a.output) if a.output else Path(tempfile.mkdtemp(prefix="packrnn-demo-"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        train_rows = make_order_task(a.train_size, a.seed, a.max_length)
        test_rows = make_order_task(a.test_size, a.seed + 1, a.max_length)
        _write_jsonl(root / "train.jsonl", train_rows)
        _write_jsonl(root / "test.jsonl", test_rows)
        print(f"\n3. word order matters: {a.train_size} training / {a.test_size} test texts, "
              f"1-{a.max_length} words, label = which of {MARKERS[0]!r} / {MARKERS[1]!r} comes first")
        print(f"   e.g. {train_rows[0]['label']}: {train_rows[0]['text'][:90]}"
              f"{'...' if len(train_rows[0]['text']) > 90 else ''}")
        bow = _bag_of_words_accuracy(train_rows, test_rows, a.epochs, a.seed)
        print(f"   bag of words (mean of embeddings, no order): test accuracy {bow:.3f} "
              "(chance: 0.5)\n")
        results = {}
        for execution in ("packed", "padded"):
            label = ("packed: only the real steps" if execution == "packed"
                     else "padded: every position, as the lesson")
            print(f"   LSTM classifier, {label}")
            cfg = TrainConfig(
                train_path=str(root / "train.jsonl"), test_path=str(root / "test.jsonl"),
                output=str(root / f"run-{execution}"), format="jsonl", model="lstm",
                embed_dim=16, hidden_size=a.hidden_size, batch_size=a.batch_size, epochs=a.epochs, lr=0.01,
                grad_clip=1.0, pooling="last", execution=execution, seed=a.seed,
                overwrite=True, threads=a.threads, progress=not a.no_progress, plot=True)
            results[execution] = train(cfg)
        print("\n   results (same model, data, batches and seed):")
        print(f"   {'execution':<10} {'s/epoch':>8} {'samples/s':>10} {'test accuracy by epoch':>24}")
        for execution, metrics in results.items():
            secs = sum(m.seconds for m in metrics) / len(metrics)
            sps = sum(m.samples for m in metrics) / sum(m.seconds for m in metrics)
            accs = " ".join(f"{m.test_accuracy:.3f}" for m in metrics)
            print(f"   {execution:<10} {secs:>8.2f} {sps:>10.0f} {accs:>24}")
        speed = (sum(m.seconds for m in results["padded"]) /
                 max(sum(m.seconds for m in results["packed"]), 1e-9))
        print(f"   packed is {speed:.2f}x the speed of padded here (padding is "
              f"{_waste(train_rows, a.batch_size):.0%} of a random batch of {a.batch_size})")

        words = [r for r in WORDS[:8]]
        a_first = " ".join([MARKERS[0]] + words + [MARKERS[1]] + words)
        o_first = " ".join([MARKERS[1]] + words + [MARKERS[0]] + words)
        print("\n4. predictions of the packed model (same words, different order):")
        for r in predict(root / "run-packed", [a_first, o_first]):
            print(f"   {r['label']:<12} p={r['probability']:.3f}  {r['text'][:70]}...")
        if a.output:
            print(f"\nruns, metrics.json and curves.png are in {root}")
    finally:
        if not a.output:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0


def _waste(rows: list[dict[str, str]], batch_size: int) -> float:
    """Fraction of padding in random batches of ``batch_size`` (one epoch, seeded)."""
    from .data import padding_waste

    lengths = [len(r["text"].split()) for r in rows]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return padding_waste(batches, lengths).waste


if __name__ == "__main__":
    sys.exit(main())
