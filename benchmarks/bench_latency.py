"""Latency of the LSTM classifier: one sequence and small batches, packrnn vs torch vs onnxruntime.

    python benchmarks/bench_latency.py [--threads 2] [--repeats 7] [--quick] [--no-onnx]
    python benchmarks/bench_latency.py --contention [--data-dir ../shared/data/ag_news]
    python benchmarks/bench_latency.py --breakdown [--no-onnx]

The model (issue 13): token ids -> ``Embedding(V=20000, E)`` -> LSTM (H, 1 or 2 layers, uni- or
bidirectional) -> the last layer's final state (both directions) -> ``Linear(D*H, 4)``. E = 64
at H = 32 and E = 128 at H = 128 and 256 (the round-1 benchmark's shapes: lstm16, lstm64,
lstm256). Contenders, same weights:

* **packrnn, padded ids + lengths**: ``SequenceClassifier(...)(ids, lengths)``, the call a
  service makes for one text (packed execution: real steps only);
* **packrnn, packed**: the same model on a ``PackedSequence`` of ids (packed outside the timing,
  as a data loader delivers it);
* **torch padded**: ``nn.Embedding`` -> ``nn.LSTM`` on the padded batch -> ``h_n`` -> linear
  (the lesson's padded classifier; at B = 1 with no padding it is the same function);
* **onnxruntime**: torch's own ONNX export (TorchScript exporter) of the torch model with
  ``pack_padded_sequence``, i.e. ONNX ``LSTM`` nodes with ``sequence_lens``, run by
  onnxruntime with ``--threads`` intra-op threads (skipped with a message when onnx or
  onnxruntime is not importable: ``pip install packrnn[onnx]``).

Sections: (1) B = 1 at lengths 40 and 200, H = 32, 128, 256, uni/bi, 1/2 layers, inference;
(2) B = 16 (lognormal lengths, median 40, as ``packrnn bench``): inference against torch padded
and onnxruntime, and a training step (forward, cross-entropy, backward) against torch padded
(in a process of its own, away from onnxruntime's threads: ``training_times``).
Every time is the best of ``--repeats`` interleaved rounds (one of each contender per round);
a round times enough calls to last ~20 ms. Ratios and PASS/FAIL are against issue 13's goals.

``--contention``: the B = 16 training step and one AG News epoch of the lesson's size (the
lesson's plain-torch recipe vs ``packrnn train``, through ``bench_agnews.py``'s code paths),
first alone, then with a CPU-bound process pinned to another core (``os.sched_setaffinity``);
prints each one's slowdown factor (busy / alone). The goal: packrnn's is no worse than torch's.
The step runs with ``--threads`` torch threads for both; the epochs as a user runs them: the
lesson with ``--threads``, ``packrnn train`` with its own default (one thread for this model).
Without ``--data-dir`` data, the epoch runs on a synthetic AG News-format file of the same size
(lognormal lengths, median 40 words).

``--breakdown``: where one B = 1 call's time goes, and where the B = 16 training step's goes,
on one thread (see ``breakdown`` and ``train_breakdown``).

Timings on a shared machine are noisy: the script prints the load average at start and end.
The contenders share one process, so it asks glibc to keep freed memory
(``packrnn.bench.keep_freed_memory``): otherwise whichever step allocated after the other's
frees paid page faults for fresh pages (torch's B = 16 training step: 300-560 a step).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import packrnn  # noqa: E402
from packrnn.bench import (cpu_name, keep_freed_memory, load_average,  # noqa: E402
                           lognormal_lengths)
from packrnn.models import ModelConfig, SequenceClassifier  # noqa: E402

VOCAB = 20_000
CLASSES = 4
# issue 13's goals
GOAL_B1_VS_TORCH = 1.0  # torch padded time / packrnn time, at every B = 1 point
GOAL_B1_VS_ORT = 1.5  # packrnn time / onnxruntime time, at most
GOAL_B16_INFER_VS_TORCH = 1.5
GOAL_B16_INFER_VS_ORT = 1.0  # onnxruntime time / packrnn time
GOAL_B16_TRAIN_VS_TORCH = 1.5


def embed_size(hidden: int) -> int:
    """E for a hidden size: the round-1 benchmark's shapes (E=64 at H=32, else E=128)."""
    return 64 if hidden <= 32 else 128


class TorchClassifier(nn.Module):
    """The same classifier in plain torch: padded (``packed=False``) or packed LSTM input."""

    def __init__(self, hidden: int, layers: int, bidirectional: bool, packed: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, embed_size(hidden), padding_idx=0)
        self.rnn = nn.LSTM(embed_size(hidden), hidden, layers, batch_first=True,
                           bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), CLASSES)
        self.dirs = 2 if bidirectional else 1
        self.packed = packed
        # torch 2.13's TorchScript ONNX exporter fails ("vector::_M_range_check") on a 1-layer
        # LSTM over packed input whose output rows are unused; for the export, such a model
        # also returns its padded output (an ONNX output that is not fetched).
        self.export_output = False

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        emb = self.embedding(ids)  # (B, T, E)
        if self.packed:
            emb = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        out, (h_n, _) = self.rnn(emb)  # (L*D, B, H)
        if self.dirs == 1:
            logits = self.fc(h_n[-1])
        else:
            logits = self.fc(torch.cat([h_n[-2], h_n[-1]], -1))  # (B, C)
        if self.export_output:
            return logits, pad_packed_sequence(out, batch_first=True)[0]
        return logits


class Models:
    """packrnn's classifier and its torch twins (same weights) for one shape."""

    def __init__(self, hidden: int, layers: int, bidirectional: bool, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.packrnn = SequenceClassifier(ModelConfig(
            vocab_size=VOCAB, num_classes=CLASSES, embed_dim=embed_size(hidden),
            hidden_size=hidden, num_layers=layers, bidirectional=bidirectional))
        self.torch_padded = TorchClassifier(hidden, layers, bidirectional, packed=False)
        self.torch_padded.load_state_dict(self.packrnn.state_dict())
        self.torch_packed = TorchClassifier(hidden, layers, bidirectional, packed=True)
        self.torch_packed.load_state_dict(self.packrnn.state_dict())
        for m in (self.packrnn, self.torch_padded, self.torch_packed):
            m.eval()


def make_batch(batch: int, length: Optional[int], seed: int = 0):
    """(ids (B, T) int64 padded with 0, lengths (B,)): all ``length`` long, or lognormal."""
    torch.manual_seed(seed)
    lengths = (torch.full((batch,), length, dtype=torch.int64) if length is not None
               else lognormal_lengths(batch))
    steps = int(lengths.max())
    ids = torch.randint(1, VOCAB, (batch, steps))
    ids[torch.arange(steps).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return ids, lengths


# ----------------------------------------------------------------------------------------------
# onnxruntime peer

def onnx_status() -> Optional[str]:
    """None if onnx and onnxruntime import, else why not."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as error:
        return f"onnxruntime column skipped: {error} (pip install 'packrnn[onnx]')"
    return None


def ort_session(model: TorchClassifier, ids: torch.Tensor, lengths: torch.Tensor, threads: int):
    """torch's ONNX export of ``model`` (TorchScript exporter: ONNX LSTM with sequence_lens),
    loaded in an onnxruntime session; returns a closure running it on (ids, lengths)."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    model.export_output = model.rnn.num_layers == 1  # see TorchClassifier
    try:
        with quiet_stderr(), warnings_off():
            torch.onnx.export(model, (ids, lengths), buffer, dynamo=False,
                              input_names=["ids", "lengths"],
                              output_names=["logits", "output"][: 1 + model.export_output])
    finally:
        model.export_output = False
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options,
                                   providers=["CPUExecutionProvider"])
    feed = {"ids": ids.numpy(), "lengths": lengths.numpy()}
    return lambda: session.run(["logits"], feed)[0]


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (the exporter's C++ shape-inference warnings) for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------
# timing

def calibrate(fn: Callable[[], object], target: float = 0.02) -> int:
    """Calls per round so that a round lasts about ``target`` seconds."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(2000, int(target / once)))


# Pause before each contender's round: onnxruntime's intra-op threads spin after a run (its
# default), and OpenMP's after a parallel region; without it, the contender timed next shares
# the 2 cores with them (the first contender of each round read up to 2x slow).
SETTLE_S = 0.05


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best mean seconds per call over ``repeats`` interleaved rounds, per contender."""
    counts = {name: calibrate(fn) for name, fn in fns.items()}
    best = {name: math.inf for name in fns}
    names = list(fns)
    for r in range(repeats):
        # rotate the order: no contender always runs right after the same one (onnxruntime's
        # workers can still be spinning after SETTLE_S, and slowed whoever came next)
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            for _ in range(counts[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / counts[name])
    return best


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.1f} s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------------------------
# sections

def inference_fns(models: Models, ids, lengths, threads: int, with_ort: bool):
    packed_ids = packrnn.pack_padded_sequence(ids, lengths, batch_first=True,
                                              enforce_sorted=False)
    fns = {
        "packrnn": lambda: models.packrnn(ids, lengths),
        "packrnn packed": lambda: models.packrnn(packed_ids),
        "torch padded": lambda: models.torch_padded(ids, lengths),
    }
    if with_ort:
        fns["onnxruntime"] = ort_session(models.torch_packed, ids, lengths, threads)
    return fns


def check_same(models: Models, fns: dict, ids, lengths) -> float:
    """Largest |logit difference| between packrnn and the packed peers (torch packed, ORT)."""
    with torch.no_grad():
        ours = models.packrnn(ids, lengths)
        diffs = [(ours - models.torch_packed(ids, lengths)).abs().max().item()]
        if "onnxruntime" in fns:
            diffs.append((ours - torch.from_numpy(fns["onnxruntime"]())).abs().max().item())
    return max(diffs)


def single_sequence(args, with_ort: bool) -> bool:
    """Section 1: B = 1. Returns whether every goal passed."""
    print("\n## B = 1 inference (padded ids + lengths; times are per call)\n")
    print("| H | E | T | layers | dir | packrnn | packrnn packed | torch padded | onnxruntime | "
          "torch / packrnn (>= 1.0) | packrnn / ort (<= 1.5) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok_all = True
    for hidden in args.hidden:
        for length in args.lengths:
            for layers in args.layers:
                for bidirectional in (False, True):
                    models = Models(hidden, layers, bidirectional)
                    ids, lengths = make_batch(1, length)
                    fns = inference_fns(models, ids, lengths, args.threads, with_ort)
                    diff = check_same(models, fns, ids, lengths)
                    with torch.no_grad():
                        t = best_times(fns, args.repeats)
                    r_torch = t["torch padded"] / t["packrnn"]
                    ok = r_torch >= GOAL_B1_VS_TORCH
                    cells = [fmt(t["packrnn"]), fmt(t["packrnn packed"]), fmt(t["torch padded"])]
                    ort_cell = ratio_ort = "-"
                    if "onnxruntime" in t:
                        r_ort = t["packrnn"] / t["onnxruntime"]
                        ok = ok and r_ort <= GOAL_B1_VS_ORT
                        ort_cell, ratio_ort = fmt(t["onnxruntime"]), \
                            f"{r_ort:.2f}x {verdict(r_ort <= GOAL_B1_VS_ORT)}"
                    ok_all = ok_all and ok
                    note = f" (logits differ by {diff:.1e})" if diff > 1e-4 else ""
                    print(f"| {hidden} | {embed_size(hidden)} | {length} | {layers} | "
                          f"{'bi' if bidirectional else 'uni'} | {' | '.join(cells)} | "
                          f"{ort_cell} | {r_torch:.2f}x {verdict(r_torch >= GOAL_B1_VS_TORCH)} | "
                          f"{ratio_ort}{note} |", flush=True)
    return ok_all


def train_step_fn(model: nn.Module, ids, lengths, labels) -> Callable[[], None]:
    """Forward, cross-entropy, backward (gradients reset untimed-cheaply with set_to_none)."""
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(ids, lengths), labels).backward()

    return step


def training_setup(hidden: int, batch: int):
    """The B = ``batch`` training step (1 layer, uni, lognormal lengths, seeded): returns
    ``(models, (ids, lengths, labels), {"packrnn": step, "torch padded": step})``."""
    models = Models(hidden, 1, False)
    ids, lengths = make_batch(batch, None)
    labels = torch.randint(0, CLASSES, (batch,))
    steps = {"packrnn": train_step_fn(models.packrnn, ids, lengths, labels),
             "torch padded": train_step_fn(models.torch_padded, ids, lengths, labels)}
    return models, (ids, lengths, labels), steps


def _training_times(hidden: int, batch: int, repeats: int, threads: int) -> dict[str, float]:
    """Best seconds of the B = ``batch`` training step, packrnn and torch padded (run in a
    process of its own by ``training_times``)."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    return best_times(training_setup(hidden, batch)[2], repeats)


def training_times(hidden: int, args) -> dict[str, float]:
    """The training step's times, measured in a fresh process. In the inference section's
    process, an onnxruntime session that had just run (that section's contender) slowed
    packrnn's step, which hands work to a second thread, by 1.2-1.3x and torch's hardly
    (2.3 -> 2.8-3.0 ms; the step has no onnxruntime contender). Same seeds, so the same model
    and batch as the inference rows."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_training_times, (hidden, args.batch, args.repeats, args.threads))


def small_batches(args, with_ort: bool) -> bool:
    """Section 2: B = 16 inference and training. Returns whether every goal passed."""
    print(f"\n## B = {args.batch}: lognormal lengths (median 40), 1 layer, unidirectional\n")
    print("| H | E | infer packrnn | infer torch padded | infer onnxruntime | "
          f"infer vs torch (>= {GOAL_B16_INFER_VS_TORCH}) | infer vs ort (>= {GOAL_B16_INFER_VS_ORT}) | "
          f"train packrnn | train torch padded | train vs torch (>= {GOAL_B16_TRAIN_VS_TORCH}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ok_all = True
    for hidden in args.hidden:
        models = Models(hidden, 1, False)
        ids, lengths = make_batch(args.batch, None)
        fns = inference_fns(models, ids, lengths, args.threads, with_ort)
        fns.pop("packrnn packed")
        with torch.no_grad():
            t = best_times(fns, args.repeats)
        del fns  # the onnxruntime session
        train = training_times(hidden, args)
        r_infer = t["torch padded"] / t["packrnn"]
        r_train = train["torch padded"] / train["packrnn"]
        ok = r_infer >= GOAL_B16_INFER_VS_TORCH and r_train >= GOAL_B16_TRAIN_VS_TORCH
        ort_cell = ratio_ort = "-"
        if "onnxruntime" in t:
            r_ort = t["onnxruntime"] / t["packrnn"]
            ok = ok and r_ort >= GOAL_B16_INFER_VS_ORT
            ort_cell, ratio_ort = fmt(t["onnxruntime"]), \
                f"{r_ort:.2f}x {verdict(r_ort >= GOAL_B16_INFER_VS_ORT)}"
        ok_all = ok_all and ok
        print(f"| {hidden} | {embed_size(hidden)} | {fmt(t['packrnn'])} | "
              f"{fmt(t['torch padded'])} | {ort_cell} | "
              f"{r_infer:.2f}x {verdict(r_infer >= GOAL_B16_INFER_VS_TORCH)} | {ratio_ort} | "
              f"{fmt(train['packrnn'])} | {fmt(train['torch padded'])} | "
              f"{r_train:.2f}x {verdict(r_train >= GOAL_B16_TRAIN_VS_TORCH)} |", flush=True)
    return ok_all


# ----------------------------------------------------------------------------------------------
# where the time goes

def cpu_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best mean CPU seconds of the calling thread per call (``time.thread_time``): for
    single-threaded calls it does not count the time the OS gives the core to someone else,
    so it is steadier than wall time on a shared machine."""
    counts = {name: calibrate(fn) for name, fn in fns.items()}
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()
            for _ in range(counts[name]):
                fn()
            best[name] = min(best[name], (time.thread_time() - start) / counts[name])
    return best


@contextlib.contextmanager
def one_thread():
    """torch on one thread for a while: the breakdowns time the calling thread's CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def breakdown(args, with_ort: bool) -> None:
    """Section 3 (issue 13: "say where the remaining time goes"): one B = 1 call, 1 layer,
    unidirectional, on ONE thread, cut into its parts:

    * **Python**: the classifier's call minus its fused operator's (``classifier_infer``,
      NOTE [fused inference]): the module call, the checks that choose the fused path, the
      operator's Python wrapper;
    * **around the layer**: the fused operator minus the stacked layer operator
      (``stack_forward``) on the embedded rows: packing, the embedding rows, the head;
    * **op fixed**: the stacked operator on a ONE-step sequence minus that step's projection:
      the dispatcher, argument checks, allocations, the state copies;
    * **projection**: the input projection of all T rows (one GEMM);
    * **time loop**: the rest of the operator's time, per step (the matrix-vector product
      h @ w_hh^T and the fused gate update).
    """
    from packrnn import _native

    print("\n## Where a B = 1 call's time goes (1 layer, uni, 1 thread, thread CPU time)\n")
    print("| H | T | packrnn call | Python | around the layer | op fixed | projection | "
          "time loop | per step | torch padded | onnxruntime |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with one_thread():
        for hidden in args.hidden:
            for length in args.lengths:
                models = Models(hidden, 1, False)
                ids, lengths = make_batch(1, length)
                layer = models.packrnn.rnn
                weights = [w.detach() for w in layer._flat_weights]
                with torch.no_grad():
                    emb = models.packrnn.embedding(ids)[0]  # (T, E)
                ops = _native._ops()

                def op(rows: torch.Tensor):
                    sizes = torch.ones(rows.shape[0], dtype=torch.int64)
                    return lambda: ops.stack_forward("lstm", sizes, rows, weights, None, None, 1,
                                                     False, True, False)

                model = models.packrnn
                flat = [w.detach() for w in model.rnn._flat_weights]
                table, head = model.embedding.weight.detach(), model.fc

                def fused():
                    return _native.classifier_infer(
                        mode="lstm", ids=ids, lengths=lengths, embedding=table, weights=flat,
                        fc_weight=head.weight, fc_bias=head.bias, num_layers=1,
                        bidirectional=False, bias=True, pooling="last")

                fns = {"call": lambda: model(ids, lengths), "fused": fused, "op": op(emb),
                       "op1": op(emb[:1].clone()),
                       "proj": lambda: torch.addmm(weights[2], emb, weights[0].t()),
                       "proj1": lambda: torch.addmm(weights[2], emb[:1], weights[0].t()),
                       "torch": lambda: models.torch_padded(ids, lengths)}
                if with_ort:
                    fns["ort"] = ort_session(models.torch_packed, ids, lengths, 1)
                with torch.no_grad():
                    t = cpu_times(fns, args.repeats)
                fixed = max(t["op1"] - t["proj1"], 0.0)
                loop = max(t["op"] - fixed - t["proj"], 0.0)
                cells = [fmt(t["call"]), fmt(t["call"] - t["fused"]),
                         fmt(t["fused"] - t["op"]), fmt(fixed), fmt(t["proj"]),
                         fmt(loop), f"{loop / length * 1e6:.1f} us", fmt(t["torch"]),
                         fmt(t["ort"]) if "ort" in t else "-"]
                print(f"| {hidden} | {length} | {' | '.join(cells)} |", flush=True)


def train_breakdown(args) -> None:
    """Section 4: where the B = ``--batch`` training step's time goes, on ONE thread (thread
    CPU time), for packrnn and torch padded side by side. Each step is cut into:

    * **embedding**: the embedding's forward and its dense (V, E) gradient alone, on the rows
      each model embeds (packrnn: the packed real steps through ``models.embed``, the same
      index_select, zero fill and index_add_ its fused training node runs in C++; torch: every
      padded position through ``nn.Embedding``); a dense gradient starts as V x E zeros, so most
      of this is the same 5 MB write on both sides (V = 20,000, E = 64);
    * **head + loss**: the linear head and cross-entropy, forward and backward, on (B, H)
      features (the same work for both);
    * **the rest**: the step minus those two: packing, the recurrent layer forward and backward
      (kernel, GEMMs), pooling, and the Python and autograd engine around them (packrnn: one
      autograd node for all of it, NOTE [fused training] in ``packrnn.models``).

    The last column is the best ratio the step could reach if packrnn's rest cost nothing.
    """
    from packrnn.models import embed

    print(f"\n## Where a B = {args.batch} training step's time goes (1 layer, uni, 1 thread, "
          "thread CPU time)\n")
    print("| H | step: packrnn / torch padded | embedding | head + loss | the rest | "
          "step ratio | rest ratio | ratio if packrnn's rest were free |")
    print("|---|---|---|---|---|---|---|---|")
    with one_thread():
        for hidden in args.hidden:
            models, (ids, lengths, labels), steps = training_setup(hidden, args.batch)
            ours, theirs = models.packrnn, models.torch_padded
            rows = packrnn.pack_padded_sequence(ids, lengths, batch_first=True,
                                                enforce_sorted=False).data  # (N,) ids
            grad_rows = torch.randn(rows.shape[0], embed_size(hidden))
            grad_padded = torch.randn(*ids.shape, embed_size(hidden))
            features = torch.randn(args.batch, hidden, requires_grad=True)
            loss_fn = nn.CrossEntropyLoss()

            def embedding(model, lookup, ids_, grad):  # lookup: as each model's forward
                def run():
                    model.embedding.weight.grad = None
                    lookup(model.embedding, ids_).backward(grad)
                return run

            def head():
                ours.fc.zero_grad(set_to_none=True)
                loss_fn(ours.fc(features), labels).backward()

            t = cpu_times({"ours": steps["packrnn"], "theirs": steps["torch padded"],
                           "ours emb": embedding(ours, embed, rows, grad_rows),
                           "theirs emb": embedding(theirs, nn.Embedding.__call__, ids,
                                                   grad_padded),
                           "head": head}, args.repeats)
            rest_ours = t["ours"] - t["ours emb"] - t["head"]
            rest_theirs = t["theirs"] - t["theirs emb"] - t["head"]
            cells = [f"{fmt(t['ours'])} / {fmt(t['theirs'])}",
                     f"{fmt(t['ours emb'])} / {fmt(t['theirs emb'])}", fmt(t["head"]),
                     f"{fmt(rest_ours)} / {fmt(rest_theirs)}",
                     f"{t['theirs'] / t['ours']:.2f}x", f"{rest_theirs / rest_ours:.2f}x",
                     f"{t['theirs'] / (t['ours emb'] + t['head']):.2f}x"]
            print(f"| {hidden} | {' | '.join(cells)} |", flush=True)
            for m in (ours, theirs):
                m.eval()


# ----------------------------------------------------------------------------------------------
# contention

def _burn(cpu: int) -> None:
    """A CPU-bound loop pinned to ``cpu`` (the child process of ``busy_core``)."""
    os.sched_setaffinity(0, {cpu})
    x = 0
    while True:
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF


@contextlib.contextmanager
def busy_core(active: bool):
    """With ``active``: a CPU-bound process pinned to the last CPU this process may use."""
    if not active:
        yield None
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--contention: needs at least 2 CPUs, got "
                         f"{len(cpus)} ({cpus}) in this process's affinity set")
    proc = multiprocessing.get_context("spawn").Process(target=_burn, args=(cpus[-1],),
                                                        daemon=True)
    proc.start()
    time.sleep(0.5)  # let it run
    try:
        yield cpus[-1]
    finally:
        proc.terminate()
        proc.join()


def synthetic_agnews(folder: Path, rows: int, test_rows: int, seed: int = 0) -> Path:
    """An AG News-format pair (train_partial.csv, test.csv) of random words with lognormal
    lengths (median 40 words): the lesson's epoch at its size when the real data is absent."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(30_000)]

    def write(name: str, count: int) -> None:
        with open(folder / name, "w", encoding="utf-8") as f:
            for _ in range(count):
                length = max(5, min(200, round(math.exp(rng.gauss(math.log(40), 0.35)))))
                text = " ".join(rng.choice(words) for _ in range(length))
                f.write(f'"{rng.randint(1, 4)}","{text}",""\n')

    write("train_partial.csv", rows)
    write("test.csv", test_rows)
    return folder


def contention(args) -> bool:
    """Slowdown factors (busy / alone) of the B = 16 training step and a lesson-size epoch."""
    import bench_agnews
    import lesson_recipe

    from packrnn.train import TrainConfig, default_threads

    print("\n## Contention: a CPU-bound process pinned to another core\n")
    lesson = TrainConfig(train_path="train.csv", output="unused")  # the lesson's sizes
    print(f"threads: the B = {args.batch} step and the lesson (plain torch) "
          f"{torch.get_num_threads()}; packrnn train its default, "
          f"{default_threads(lesson, 40.0)} for this model")
    _, _, steps = training_setup(32, args.batch)

    with tempfile.TemporaryDirectory(prefix="bench_latency_") as tmp:
        data_dir = args.data_dir
        if data_dir is None or not (data_dir / "train_partial.csv").is_file():
            rows = args.epoch_rows or 23_395
            print(f"AG News data not found at {data_dir}: a synthetic file of {rows:,} rows "
                  "(lognormal lengths, median 40 words)")
            data_dir = synthetic_agnews(Path(tmp), rows, 200)
        elif args.epoch_rows:
            subset = Path(tmp)
            with open(data_dir / "train_partial.csv", encoding="utf-8") as f:
                head = [next(f) for _ in range(args.epoch_rows)]
            (subset / "train_partial.csv").write_text("".join(head), encoding="utf-8")
            with open(data_dir / "test.csv", encoding="utf-8") as f:
                (subset / "test.csv").write_text("".join(next(f) for _ in range(200)),
                                                 encoding="utf-8")
            data_dir = subset
        lesson_data = lesson_recipe.load_lesson_data(data_dir / "train_partial.csv",
                                                     data_dir / "test.csv")
        same = dict(model="lstm", embed_dim=64, hidden_size=32, execution="packed",
                    batch_size=16, epochs=1, lr=1e-3, pooling="last")

        def epoch_torch() -> float:
            torch.manual_seed(0)
            model = lesson_recipe.LSTMPackedClassifier(len(lesson_data.vocab))
            return lesson_recipe.train_epoch(model, lesson_data, seed=0)["seconds"]

        def epoch_packrnn() -> float:
            # packrnn train's own default threads (NOTE [Training threads] in packrnn.train),
            # as a user runs it; the lesson runs with torch's, as the lesson does
            with contextlib.redirect_stderr(io.StringIO()):
                result = bench_agnews.run_packrnn(data_dir, None, 0, **same)
            return result["epoch_seconds"][0]

        results = {}
        for busy in (False, True):
            with busy_core(busy) as cpu:
                where = f"busy (CPU {cpu} pinned)" if busy else "alone"
                t = best_times(steps, args.repeats)
                results[("step", busy)] = t
                results[("epoch", busy)] = {"packrnn": epoch_packrnn(),
                                            "torch padded": epoch_torch()}
                print(f"{where}: training step packrnn {fmt(t['packrnn'])}, torch padded "
                      f"{fmt(t['torch padded'])}; epoch packrnn "
                      f"{fmt(results[('epoch', busy)]['packrnn'])}, lesson (plain torch) "
                      f"{fmt(results[('epoch', busy)]['torch padded'])}", flush=True)

    print("\n| measure | packrnn slowdown | torch slowdown | goal (packrnn <= torch) |")
    print("|---|---|---|---|")
    ok_all = True
    for what, label in (("step", f"B={args.batch} training step (H=32, E=64)"),
                        ("epoch", "AG News epoch, lesson size (packrnn train vs lesson)")):
        alone, busy = results[(what, False)], results[(what, True)]
        ours = busy["packrnn"] / alone["packrnn"]
        theirs = busy["torch padded"] / alone["torch padded"]
        ok_all = ok_all and ours <= theirs
        print(f"| {label} | {ours:.2f}x | {theirs:.2f}x | {verdict(ours <= theirs)} |")
    return ok_all


# ----------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads and onnxruntime intra-op threads (default: 2)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds, best kept")
    p.add_argument("--batch", type=int, default=16, help="B of the small-batch section")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: H=32, length 40, 1 layer, 2 rounds")
    p.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime column")
    p.add_argument("--breakdown", action="store_true",
                   help="only the time breakdowns: a B = 1 call (Python, op fixed cost, "
                        "projection, loop) and the B = 16 training step (embedding, head, rest)")
    p.add_argument("--contention", action="store_true",
                   help="only the contention section (slowdown beside a CPU-bound process)")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data" / "ag_news",
                   help="AG News folder for --contention (default: ../shared/data/ag_news)")
    p.add_argument("--epoch-rows", type=int, default=0,
                   help="--contention: train on the first N rows only (default: all)")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.batch < 1 or args.epoch_rows < 0:
        p.error("--threads, --repeats and --batch: expected positive ints, --epoch-rows >= 0")
    args.hidden, args.lengths, args.layers = (32, 128, 256), (40, 200), (1, 2)
    if args.quick:
        args.hidden, args.lengths, args.layers, args.repeats = (32,), (40,), (1,), 2

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; packrnn backend: {packrnn.backend_info()}")
    print(f"load average (1, 5, 15 min) at start: {load_average()}")
    print(keep_freed_memory())
    ok = True
    if args.contention:
        ok = contention(args)
    elif args.breakdown:
        why = onnx_status() if not args.no_onnx else "--no-onnx"
        breakdown(args, why is None)
        train_breakdown(args)
    else:
        why = None if not args.no_onnx else "onnxruntime column skipped: --no-onnx"
        why = why or onnx_status()
        if why:
            print(why)
        else:
            import onnxruntime

            print(f"onnxruntime {onnxruntime.__version__}, {args.threads} intra-op threads")
        ok_single = single_sequence(args, why is None)
        ok = small_batches(args, why is None) and ok_single
    print(f"\nload average (1, 5, 15 min) at end: {load_average()}")
    if not args.breakdown:
        print(f"all goals: {verdict(ok)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
