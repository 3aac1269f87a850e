"""Issue 14's benchmark: long sequences, where torch's packed LSTM slows down and subnormals bite.

    python benchmarks/bench_long.py [--lengths 50,200,1000,4000] [--repeats 3] [--threads 2]
                                    [--packed-limit 60] [--loss last|sum] [--no-memory]

What is measured, side by side in one run, for each longest length T of the sweep:

* inputs: a one-layer LSTM, B=32, E=128, H=128, float32; ``packrnn.bench.scaled_lengths``:
  issue 5's lognormal lengths (median 40, sigma 0.35, ``torch.manual_seed(0)``) scaled so that
  the longest is T; the packed input is built once outside the timing;
* training step: forward + backward with the input requiring grad (``packrnn.bench._Case``).
  The loss is ``h_n.sum()`` (``--loss last``, default): a sequence classifier's loss on the
  last state, whose gradient decays along the sequence and underflows into subnormal floats
  (``--loss sum``: ``output.sum()``, which feeds a gradient into every step). torch keeps
  IEEE subnormals by default, so its steps can meet them too;
* contenders: ``packrnn`` (subnormals flushed in the kernel, the default), ``packrnn kept``
  (the same under ``PACKRNN_KEEP_SUBNORMALS=1``), torch padded (``nn.LSTM`` on the padded
  batch) and torch packed (``nn.LSTM`` on the PackedSequence), same weights. torch packed runs
  only while one step is estimated to stay under ``--packed-limit`` seconds: the estimate is
  its time at the previous length times the squared ratio of the lengths (its backward is
  quadratic in T); longer lengths are skipped, and the script says so and why;
* timing: one warm-up step per contender (two at the first length: the first call of a library
  pays one-off costs), then the best of ``--repeats`` interleaved rounds; a contender whose
  warm-up step took 5 s or more is timed by that step alone. The number reported is time per
  real step: seconds of a step / the sum of the lengths;
* peak memory: of one training step of packrnn and of torch padded, each in a fresh process
  (``packrnn.bench.measure_step_memory``);
* goals (PASS/FAIL lines): packrnn's time per real step varies by at most 1.5x across the
  sweep; at T=1000 packrnn's step is >= 3x faster than torch padded's.

Timings on a shared machine are noisy: the script prints the CPU model and the load average
before and after.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from packrnn import backend  # noqa: E402
from packrnn.bench import (BenchConfig, _Case, cpu_name, load_average,  # noqa: E402
                           measure_step_memory)

LENGTHS = (50, 200, 1000, 4000)
VARIANTS = ("packrnn", "packrnn_kept", "torch_padded", "torch_packed")
LABELS = {"packrnn": "packrnn", "packrnn_kept": "packrnn kept", "torch_padded": "torch padded",
          "torch_packed": "torch packed"}
KEEP_VAR = "PACKRNN_KEEP_SUBNORMALS"
SLOW_STEP_S = 5.0  # a contender this slow is timed by its warm-up step alone
SPREAD_GOAL = 1.5  # packrnn's max / min time per real step across the sweep
PADDED_GOAL_LENGTH, PADDED_GOAL = 1000, 3.0  # torch padded / packrnn at this T


@dataclass
class LengthResult:
    """One length of the sweep."""

    longest: int  # T
    real_steps: int  # sum of the lengths
    padded_steps: int  # T x B
    seconds: dict[str, float]  # variant -> seconds of one training step
    skipped: dict[str, str] = field(default_factory=dict)  # variant -> why it did not run
    memory_mb: dict[str, float] = field(default_factory=dict)  # variant -> peak MB of a step

    def per_real_step_us(self, variant: str) -> float:
        return self.seconds[variant] / self.real_steps * 1e6

    def ratio(self, variant: str) -> float:
        """variant's step time over packrnn's (> 1: packrnn is faster)."""
        return self.seconds[variant] / self.seconds["packrnn"]


def _with_keep(fn: Callable[[], None], value: str) -> Callable[[], None]:
    """fn run with PACKRNN_KEEP_SUBNORMALS=value (the kernel reads it per call), then restored."""
    def run() -> None:
        before = os.environ.get(KEEP_VAR)
        os.environ[KEEP_VAR] = value
        try:
            fn()
        finally:
            if before is None:
                del os.environ[KEEP_VAR]
            else:
                os.environ[KEEP_VAR] = before

    return run


def _seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_length(case: _Case, variants: Sequence[str], repeats: int,
                 first: bool) -> dict[str, float]:
    """Best seconds of one training step per variant (warm-up, then interleaved rounds). The
    first length of a sweep runs every variant once more before, untimed: the first call of a
    library pays one-off costs (loading the kernel, creating oneDNN primitives: seconds)."""
    steps = {}
    for variant in variants:
        kind = "packrnn" if variant.startswith("packrnn") else variant
        step = case.step(kind, train=True)
        if kind == "packrnn":
            step = _with_keep(step, "1" if variant == "packrnn_kept" else "0")
        steps[variant] = step
    if first:
        for fn in steps.values():
            fn()
    warm = {v: _seconds(fn) for v, fn in steps.items()}
    best = {v: s for v, s in warm.items() if s >= SLOW_STEP_S}
    timed = [v for v in variants if v not in best]
    for _ in range(repeats):
        for variant in timed:
            best[variant] = min(best.get(variant, float("inf")), _seconds(steps[variant]))
    return best


def run_long(lengths: Sequence[int] = LENGTHS, repeats: int = 3, threads: int = 2,
             memory: bool = True, packed_limit_s: float = 60.0, loss: str = "last",
             batch: int = 32, input_size: int = 128, hidden_size: int = 128,
             out: Optional[Callable[[str], None]] = print
             ) -> tuple[list[LengthResult], dict[str, Optional[bool]]]:
    """Run the sweep, print the table and the goals with ``out`` (None: silent).

    Returns the results per length and the goals (name -> passed, None if not measured).
    Uses ``threads`` intra-op threads while it runs and restores the previous setting after.
    """
    say = out or (lambda *_: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        say(f"packrnn bench_long: backend {backend.backend_info()}")
        say(f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs visible, "
            f"torch {torch.__version__}, {threads} threads; load average at start "
            f"{load_average()}")
        say(f"LSTM B={batch} E={input_size} H={hidden_size} float32; lengths: lognormal "
            f"(median 40, sigma 0.35) scaled so the longest is T; loss {loss}; best of "
            f"{repeats} interleaved rounds (steps over {SLOW_STEP_S:.0f} s: one)")
        results = _sweep(lengths, repeats, threads, memory, packed_limit_s, loss, batch,
                         input_size, hidden_size, say)
        say("")
        say(format_table(results))
        say("")
        goals = check_goals(results)
        for line in goal_lines(results, goals):
            say(line)
        say(f"load average at end {load_average()}")
        return results, goals
    finally:
        torch.set_num_threads(previous)


def _sweep(lengths, repeats, threads, memory, packed_limit_s, loss, batch, input_size,
           hidden_size, say) -> list[LengthResult]:
    results = []
    packed_seen: Optional[tuple[int, float]] = None  # (T, seconds) of the last torch packed run
    for longest in lengths:
        config = BenchConfig(f"long{longest}", "lstm", batch, input_size, hidden_size,
                             longest=longest, loss=loss)
        case = _Case(config)
        variants = list(VARIANTS)
        skipped = {}
        if packed_seen is not None:
            t_prev, s_prev = packed_seen
            estimate = s_prev * (longest / t_prev) ** 2
            if estimate > packed_limit_s:
                variants.remove("torch_packed")
                skipped["torch_packed"] = (
                    f"estimated {estimate:.1f} s per step from {s_prev:.2f} s at T={t_prev} "
                    f"(its backward is quadratic in T) > the {packed_limit_s:g} s limit")
                say(f"T={longest}: torch packed skipped: {skipped['torch_packed']}")
        seconds = _time_length(case, variants, repeats, first=not results)
        if "torch_packed" in seconds:
            packed_seen = (longest, seconds["torch_packed"])
        result = LengthResult(longest, case.real_steps, case.padded_steps, seconds, skipped)
        if memory:
            for variant in ("packrnn", "torch_padded"):
                result.memory_mb[variant] = measure_step_memory(config, variant, threads)
        say(f"T={longest}: " + ", ".join(
            f"{LABELS[v]} {seconds[v] * 1e3:.1f} ms" for v in VARIANTS if v in seconds))
        results.append(result)
    return results


def format_table(results: Sequence[LengthResult]) -> str:
    """A markdown table: time per real step of each contender, ratios, peak memory."""
    def us(r: LengthResult, variant: str) -> str:
        return f"{r.per_real_step_us(variant):.2f}" if variant in r.seconds else "skipped"

    def ratio(r: LengthResult, variant: str) -> str:
        return f"{r.ratio(variant):.2f}x" if variant in r.seconds else "-"

    lines = ["| T | real / padded steps | us per real step: packrnn, packrnn kept, torch padded, "
             "torch packed | torch padded / packrnn | packrnn kept / packrnn | "
             "torch packed / packrnn | peak MB of a step: packrnn / torch padded |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        mem = "-"
        if r.memory_mb:
            mem = f"{r.memory_mb['packrnn']:.0f} / {r.memory_mb['torch_padded']:.0f}"
        lines.append(
            f"| {r.longest} | {r.real_steps} / {r.padded_steps} | "
            + ", ".join(us(r, v) for v in VARIANTS) + " | "
            + " | ".join(ratio(r, v) for v in ("torch_padded", "packrnn_kept", "torch_packed"))
            + f" | {mem} |")
    return "\n".join(lines)


def check_goals(results: Sequence[LengthResult]) -> dict[str, Optional[bool]]:
    """Issue 14's goals: {"flat": spread <= 1.5x, "vs_padded": >= 3x at T=1000} (None: the
    length it needs was not in the sweep)."""
    per_step = [r.per_real_step_us("packrnn") for r in results]
    at_goal = [r for r in results if r.longest == PADDED_GOAL_LENGTH]
    return {
        "flat": max(per_step) / min(per_step) <= SPREAD_GOAL if per_step else None,
        "vs_padded": at_goal[0].ratio("torch_padded") >= PADDED_GOAL if at_goal else None,
    }


def goal_lines(results: Sequence[LengthResult], goals: dict[str, Optional[bool]]) -> list[str]:
    def verdict(ok: Optional[bool]) -> str:
        return "SKIP" if ok is None else ("PASS" if ok else "FAIL")

    lines = []
    if results:
        per_step = [r.per_real_step_us("packrnn") for r in results]
        lengths = ",".join(str(r.longest) for r in results)
        lines.append(f"{verdict(goals['flat'])}: packrnn's time per real step varies "
                     f"{max(per_step) / min(per_step):.2f}x across T={lengths} "
                     f"({min(per_step):.2f}-{max(per_step):.2f} us; goal <= {SPREAD_GOAL}x)")
    at_goal = [r for r in results if r.longest == PADDED_GOAL_LENGTH]
    if at_goal:
        lines.append(f"{verdict(goals['vs_padded'])}: at T={PADDED_GOAL_LENGTH} packrnn is "
                     f"{at_goal[0].ratio('torch_padded'):.2f}x faster than torch padded "
                     f"(goal >= {PADDED_GOAL}x)")
    else:
        lines.append(f"SKIP: packrnn vs torch padded at T={PADDED_GOAL_LENGTH} (goal >= "
                     f"{PADDED_GOAL}x): T={PADDED_GOAL_LENGTH} is not in --lengths")
    return lines


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints, got {text!r}")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Long sequences: packrnn's LSTM training step against torch.nn, per real "
                    "step, with subnormals flushed and kept (issue 14).")
    parser.add_argument("--lengths", type=_positive_ints, default=list(LENGTHS),
                        help="longest lengths T of the sweep (default 50,200,1000,4000)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--packed-limit", type=float, default=60.0,
                        help="skip torch packed where one step is estimated to take longer "
                             "(seconds, default 60)")
    parser.add_argument("--loss", choices=("last", "sum"), default="last",
                        help="last: h_n.sum() (default); sum: output.sum()")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive int, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    run_long(args.lengths, repeats=args.repeats, threads=args.threads,
             memory=not args.no_memory, packed_limit_s=args.packed_limit, loss=args.loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
