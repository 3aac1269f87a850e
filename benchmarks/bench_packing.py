"""Time packrnn's pack_padded_sequence + pad_packed_sequence against torch's, in one process.

    python benchmarks/bench_packing.py [--batch 256] [--steps 200] [--features 128] [--repeats 7]
                                       [--layout both|time|batch]

Input: a float32 ``(T, B, E)`` (``--layout time``) and/or ``(B, T, E)`` (``--layout batch``) batch
whose lengths are
drawn uniformly from ``[1, T]`` (seed 0), UNSORTED, so both libraries run with
``enforce_sorted=False`` (sort + pack + pad back in the original order). Each repeat times
``--number`` back-to-back round trips per library, interleaving packrnn and torch so both see the
same machine load; the best repeat of each is reported, with the ratio packrnn / torch.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.utils.rnn as torch_rnn

import packrnn


def round_trip(lib, x: torch.Tensor, lengths: torch.Tensor, batch_first: bool) -> torch.Tensor:
    packed = lib.pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    padded, _ = lib.pad_packed_sequence(packed, batch_first=batch_first)
    return padded


def best_time(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; return {layout: packrnn/torch time ratio}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="B, sequences per batch")
    parser.add_argument("--steps", type=int, default=200, help="T, padded time steps")
    parser.add_argument("--features", type=int, default=128, help="E, features per step")
    parser.add_argument(
        "--layout", choices=["both", "time", "batch"], default="both",
        help="time: (T, B, E); batch: batch_first (B, T, E); both: one after the other",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per library (best is kept)")
    parser.add_argument("--number", type=int, default=20, help="round trips per repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: fair on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    layouts = {"both": [False, True], "time": [False], "batch": [True]}[args.layout]
    ratios = {}
    for batch_first in layouts:
        ratios["batch_first" if batch_first else "time_major"] = time_layout(args, batch_first)
    return ratios


def time_layout(args: argparse.Namespace, batch_first: bool) -> float:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.steps) if batch_first else (args.steps, args.batch)
    x = torch.randn(shape + (args.features,), generator=gen)
    lengths = torch.randint(1, args.steps + 1, (args.batch,), generator=gen)

    ours = round_trip(packrnn, x, lengths, batch_first)
    theirs = round_trip(torch_rnn, x, lengths, batch_first)
    if not torch.equal(ours, theirs):
        raise SystemExit("packrnn and torch disagree; not timing")

    for lib in (packrnn, torch_rnn):  # warm-up
        best_time(lambda lib=lib: round_trip(lib, x, lengths, batch_first), 3)
    times = {"packrnn": float("inf"), "torch": float("inf")}
    for _ in range(args.repeats):
        for name, lib in (("packrnn", packrnn), ("torch", torch_rnn)):
            t = best_time(lambda lib=lib: round_trip(lib, x, lengths, batch_first), args.number)
            times[name] = min(times[name], t)

    layout = "(B, T, E) batch_first" if batch_first else "(T, B, E)"
    ratio = times["packrnn"] / times["torch"]
    print(
        f"pack_padded_sequence + pad_packed_sequence, B={args.batch} T={args.steps} E={args.features} "
        f"{layout} float32, lengths uniform in [1, {args.steps}] unsorted (sum {int(lengths.sum())}), "
        f"{args.threads} thread(s), best of {args.repeats}x{args.number}"
    )
    print(f"  packrnn: {times['packrnn'] * 1e3:8.3f} ms")
    print(f"  torch:   {times['torch'] * 1e3:8.3f} ms")
    print(f"  ratio packrnn/torch: {ratio:.2f}x (goal <= 1.5x)")
    return ratio

if __name__ == "__main__":
    main()
