"""Speed (and peak memory) of packrnn's recurrent layers against torch's on CPU.

    packrnn bench [--configs all|NAME,...] [--repeats 5] [--threads 2] [--no-memory]
    python benchmarks/bench_rnn.py [same options]

What is measured (issue 5's protocol):

* inputs: ``B`` sequences with lognormal lengths (median 40, sigma 0.35, rounded, clamped to
  [5, 200]) drawn after ``torch.manual_seed(0)``, features ``randn``; the padded batch is
  ``(T_max, B, E)`` float32, the packed one is ``pack_padded_sequence(..., enforce_sorted=False)``
  done once outside the timing (a data loader delivers it packed); ``BenchConfig.longest``
  scales the same draw so that the longest is that length (``benchmarks/bench_long.py``);
* training step: forward + backward of ``output.sum()`` (packed: ``output.data.sum()``; or of
  ``h_n.sum()`` with ``BenchConfig.loss="last"``) with the input requiring grad; parameter grads
  are reset (not timed) before each step;
* inference: forward under ``torch.no_grad()``;
* contenders: packrnn on the packed input, torch.nn on the padded batch, torch.nn on the packed
  input, same weights; all run in one process, interleaved (one of each per round), and the best
  of ``--repeats`` rounds is kept;
* efficiency: useful FLOP/s of packrnn's training step, ``3 x real steps x G x H x (E + H) x 2``
  per layer and direction, over the best 2048 x 2048 float32 matmul measured in the same run;
* peak memory: extra resident memory of ONE training step over what was resident before it,
  each measured in a fresh subprocess (so allocator caches of one contender do not hide the
  other's); see :func:`measure_step_memory`;
* the machine: the load average at the start and at the end is printed with the table, with a
  warning when other work keeps at least one CPU busy (:data:`BUSY_LOAD`): timings taken
  beside other work are unreliable. Progress (a line per config and per round) goes to stderr.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch.nn.utils import rnn as torch_rnn

__all__ = ["BenchConfig", "BenchResult", "CONFIGS", "lognormal_lengths", "scaled_lengths",
           "matmul_peak", "run_bench", "measure_step_memory", "load_average", "cpu_name", "main"]


@dataclass(frozen=True)
class BenchConfig:
    """One row of the table."""

    name: str  # short id for --configs
    kind: str  # "lstm" | "gru" | "rnn_tanh"
    batch: int  # B
    input_size: int  # E
    hidden_size: int  # H
    num_layers: int = 1
    bidirectional: bool = False
    # the goals: train vs torch padded, train vs torch packed, inference vs torch packed
    goals: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # lengths: None = the protocol above; else the same draw scaled so the longest is this
    # (benchmarks/bench_long.py)
    longest: Optional[int] = None
    # the training step's loss: "sum" = output.sum(); "last" = h_n.sum(), the last state only,
    # as a sequence classifier (its gradient decays along the sequence, into subnormal floats)
    loss: str = "sum"

    def __post_init__(self):
        if self.kind not in ("lstm", "gru", "rnn_tanh"):
            raise ValueError(f"kind: expected 'lstm', 'gru' or 'rnn_tanh', got {self.kind!r}")
        for attr in ("batch", "input_size", "hidden_size", "num_layers"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr}: expected a positive int, got {getattr(self, attr)}")
        if self.longest is not None and self.longest < 1:
            raise ValueError(f"longest: expected None or a positive int, got {self.longest}")
        if self.loss not in ("sum", "last"):
            raise ValueError(f"loss: expected 'sum' or 'last', got {self.loss!r}")

    @property
    def label(self) -> str:
        prefix = f"{self.num_layers}-layer " if self.num_layers > 1 else ""
        prefix += "bidirectional " if self.bidirectional else ""
        kind = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN"}[self.kind]
        return f"{prefix}{kind} B={self.batch} E={self.input_size} H={self.hidden_size}"


CONFIGS = (
    BenchConfig("lstm16", "lstm", 16, 64, 32, goals=(1.0, 5.0, 1.0)),
    BenchConfig("lstm64", "lstm", 64, 128, 128, goals=(2.0, 3.0, 1.2)),
    BenchConfig("lstm256", "lstm", 256, 128, 256, goals=(2.5, 8.0, 1.2)),
    BenchConfig("gru64", "gru", 64, 128, 128, goals=(1.5, 3.0, 1.2)),
    BenchConfig("bilstm64", "lstm", 64, 128, 128, num_layers=2, bidirectional=True,
                goals=(2.0, 3.0, 1.2)),
)
EFFICIENCY_CONFIG = "lstm256"  # the issue asks >= 65 % of the matmul peak for this one
EFFICIENCY_GOAL = 0.65
VARIANTS = ("packrnn", "torch_padded", "torch_packed")
#: Load (runnable processes, 1-minute average) from other work above which the machine is busy.
BUSY_LOAD = 1.0


def lognormal_lengths(batch: int, median: float = 40.0, sigma: float = 0.35,
                      low: int = 5, high: int = 200) -> torch.Tensor:
    """(B,) int64 lengths: round(exp(N(log median, sigma))) clamped to [low, high] (global RNG)."""
    z = torch.randn(batch, dtype=torch.float64)  # (B,)
    lengths = torch.exp(z * sigma + torch.log(torch.tensor(median, dtype=torch.float64)))
    return lengths.round().clamp(low, high).to(torch.int64)


def scaled_lengths(batch: int, longest: int) -> torch.Tensor:
    """(B,) int64 lengths: :func:`lognormal_lengths` scaled so that the longest is ``longest``
    (rounded, at least 1; global RNG)."""
    lengths = lognormal_lengths(batch).to(torch.float64)  # (B,)
    return (lengths * (longest / lengths.max())).round().clamp(1, longest).to(torch.int64)


def useful_flops(config: BenchConfig, real_steps: int) -> float:
    """FLOPs of a training step that real (non-padding) steps need: 3 GEMM passes (forward,
    input grad, weight grad) x 2 FLOPs per multiply-add, summed over layers and directions."""
    gates = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[config.kind]
    dirs = 2 if config.bidirectional else 1
    total = 0.0
    for layer in range(config.num_layers):
        e = config.input_size if layer == 0 else dirs * config.hidden_size
        total += dirs * 3 * real_steps * gates * config.hidden_size * (e + config.hidden_size) * 2
    return total


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of a (size x size) @ (size x size) matmul on this machine now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


class _Case:
    """Inputs and the two modules (same weights) of one config."""

    def __init__(self, config: BenchConfig, seed: int = 0, batch: Optional[int] = None):
        import packrnn

        torch.manual_seed(seed)
        batch = batch or config.batch
        self.config = config
        if config.longest is None:
            self.lengths = lognormal_lengths(batch)  # (B,)
        else:
            self.lengths = scaled_lengths(batch, config.longest)  # (B,)
        steps = int(self.lengths.max())
        self.x = torch.randn(steps, batch, config.input_size)  # (T, B, E) padded, time-major
        self.packed = torch_rnn.pack_padded_sequence(self.x, self.lengths, enforce_sorted=False)
        kwargs = dict(num_layers=config.num_layers, bidirectional=config.bidirectional)
        torch_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}
        ours_cls = {"lstm": packrnn.LSTM, "gru": packrnn.GRU, "rnn_tanh": packrnn.RNN}
        self.torch_module = torch_cls[config.kind](config.input_size, config.hidden_size, **kwargs)
        self.packrnn_module = ours_cls[config.kind](config.input_size, config.hidden_size,
                                                    **kwargs)
        self.packrnn_module.load_state_dict(self.torch_module.state_dict())
        self.real_steps = int(self.lengths.sum())
        self.padded_steps = steps * batch

    def _packed_input(self, requires_grad: bool):
        data = self.packed.data.detach().requires_grad_(requires_grad)  # (N, E)
        return torch_rnn.PackedSequence(data, self.packed.batch_sizes, self.packed.sorted_indices,
                                        self.packed.unsorted_indices)

    def step(self, variant: str, train: bool) -> Callable[[], None]:
        """A closure running one training step (or inference forward) of ``variant``."""
        module = self.packrnn_module if variant == "packrnn" else self.torch_module

        def run() -> None:
            if train:
                for p in module.parameters():
                    p.grad = None
            with torch.set_grad_enabled(train):
                if variant == "torch_padded":
                    out, state = module(self.x.detach().requires_grad_(train))  # (T, B, D*H)
                else:
                    out, state = module(self._packed_input(train))
                    out = out.data  # (N, D*H)
                if self.config.loss == "last":
                    out = state[0] if isinstance(state, tuple) else state  # h_n (L*D, B, H)
                total = out.sum()
                if train:
                    total.backward()

        return run


@dataclass
class BenchResult:
    """Best times (seconds) of one config, and what they mean."""

    config: BenchConfig
    train: dict[str, float]  # variant -> seconds
    infer: dict[str, float]  # variant -> seconds
    real_steps: int
    padded_steps: int
    matmul_flops: float  # best 2048^3 matmul FLOP/s in this run
    memory_mb: dict[str, float] = field(default_factory=dict)  # variant -> peak MB of a step

    @property
    def efficiency(self) -> float:
        """Useful FLOP/s of packrnn's training step as a fraction of the matmul peak."""
        return useful_flops(self.config, self.real_steps) / self.train["packrnn"] / self.matmul_flops

    def ratio(self, phase: str, other: str) -> float:
        times = self.train if phase == "train" else self.infer
        return times[other] / times["packrnn"]


def _time_round(cases: dict[str, _Case], configs: Sequence[BenchConfig], train: bool,
                best: dict) -> None:
    for config in configs:
        case = cases[config.name]
        for variant in VARIANTS:
            fn = case.step(variant, train)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            key = (config.name, train, variant)
            best[key] = min(best.get(key, float("inf")), elapsed)


def measure_step_memory(config: BenchConfig, variant: str, threads: int = 2) -> float:
    """Peak extra resident memory (MB) of one training step of ``variant``, in a fresh process.

    The child builds the inputs and modules, runs one step on a 4-sequence batch (loads the
    kernel, starts thread pools), releases freed heap memory, resets the kernel's resident-set
    high-water mark (``/proc/self/clear_refs``), runs one full training step and reports
    ``VmHWM - VmRSS before the step``: everything the step allocated at its peak (activations
    saved for backward, gradients, workspaces), and nothing that existed before it.
    """
    code = ("import sys, json; from packrnn.bench import _memory_child; "
            "print(json.dumps(_memory_child(json.loads(sys.argv[1]), sys.argv[2], "
            "int(sys.argv[3]))))")
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(config)), variant,
                             str(threads)], capture_output=True, text=True, env=env, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"memory child for {config.name}/{variant} failed: "
                           f"{result.stderr.strip()[-500:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1]))


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _memory_child(config_dict: dict, variant: str, threads: int) -> float:
    config_dict["goals"] = tuple(config_dict["goals"])
    config = BenchConfig(**config_dict)
    torch.set_num_threads(threads)
    _Case(config, batch=4).step(variant, True)()  # warm up libraries and thread pools
    case = _Case(config)
    fn = case.step(variant, True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current VmRSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024.0


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_bench(configs: Sequence[BenchConfig] = CONFIGS, repeats: int = 5, threads: int = 2,
              memory: bool = True, out=print, progress=_to_stderr) -> list[BenchResult]:
    """Run the benchmark, print the tables with ``out`` (None: silent), return the results.

    Uses ``threads`` intra-op threads while it runs and restores the previous setting after.
    ``progress`` gets a line per config (warm-up, memory) and per timing round, as it goes
    (default: stderr; None: none). The load average at the start and the end is printed with
    the tables, with a warning when the machine is busy (:data:`BUSY_LOAD`).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_bench(configs, repeats, threads, memory, out or (lambda *_: None),
                          progress or (lambda *_: None))
    finally:
        torch.set_num_threads(previous)


def _load_report(when: str, own: float) -> list[str]:
    """The load-average line(s): ``own`` is this benchmark's share of the 1-minute load."""
    load = _getloadavg()
    if load is None:
        return [f"load average at {when}: unknown on this platform"]
    cpus = os.cpu_count() or 1
    lines = [f"load average at {when}: {_format_load(load)} (1, 5, 15 min) on {cpus} CPUs"]
    other = load[0] - own
    if other >= BUSY_LOAD:
        lines.append(f"WARNING: the machine is busy at the {when} (about {other:.1f} CPUs of "
                     "other work over the last minute): timings taken beside other work are "
                     "unreliable; rerun on an idle machine")
    return lines


def _run_bench(configs: Sequence[BenchConfig], repeats: int, threads: int, memory: bool,
               say: Callable[[str], None], progress: Callable[[str], None]
               ) -> list[BenchResult]:
    from packrnn import backend

    started = time.perf_counter()
    say(f"packrnn bench: backend {backend.backend_info()}")
    say(f"machine: {platform.machine()} {cpu_name()}, {os.cpu_count()} CPUs visible, "
        f"torch {torch.__version__}, {threads} threads")
    for line in _load_report("start", own=0.0):
        say(line)
    say("lengths: lognormal median 40, sigma 0.35, clamped to [5, 200], torch.manual_seed(0); "
        f"best of {repeats} interleaved rounds")

    def note(line: str) -> None:
        progress(f"bench: {line} ({time.perf_counter() - started:.0f} s)")

    cases = {}
    for i, c in enumerate(configs, start=1):  # inputs, then a warm-up: load kernels, fill caches
        cases[c.name] = _Case(c)
        for train in (True, False):
            for variant in VARIANTS:
                cases[c.name].step(variant, train)()
        note(f"[{i}/{len(configs)}] {c.label}: warmed up")
    peak = matmul_peak()
    best: dict = {}
    for r in range(repeats):
        for train in (True, False):
            _time_round(cases, configs, train, best)
        peak = max(peak, matmul_peak(repeats=2))
        note(f"round {r + 1}/{repeats} of every config timed")

    results = []
    for c in configs:
        case = cases[c.name]
        results.append(BenchResult(
            config=c,
            train={v: best[(c.name, True, v)] for v in VARIANTS},
            infer={v: best[(c.name, False, v)] for v in VARIANTS},
            real_steps=case.real_steps, padded_steps=case.padded_steps, matmul_flops=peak))
    if memory:
        for i, r in enumerate(results, start=1):
            for variant in ("packrnn", "torch_padded"):
                r.memory_mb[variant] = measure_step_memory(r.config, variant, threads)
            note(f"[{i}/{len(results)}] {r.config.label}: peak memory measured")

    say(f"matmul peak (2048 x 2048 float32, best in this run): {peak / 1e9:.1f} GFLOP/s")
    # The 1-minute load now includes this benchmark's own `threads` runnable threads, damped
    # as the kernel does it: exponentially with a time constant of one minute.
    own = threads * (1.0 - math.exp(-(time.perf_counter() - started) / 60.0))
    for line in _load_report("end", own=own):
        say(line)
    say("")
    say(format_table(results))
    return results


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``"0.52 0.61 0.70"`` (``"?"`` if unknown)."""
    load = _getloadavg()
    return "?" if load is None else _format_load(load)


def _getloadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()  # (1, 5, 15 minutes)
    except (AttributeError, OSError):  # not on this platform
        return None


def _format_load(load: Sequence[float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def keep_freed_memory() -> str:
    """Ask glibc to keep freed large blocks instead of returning them to the OS; returns what
    was done, for the benchmark's header.

    Contenders timed in one process share its heap: which of them gets freshly mapped pages
    (and pays their page faults on first touch) then depends on what the other freed last, not
    on its own code. With a high mmap and trim threshold neither does (a B = 16 classifier
    training step of torch's took ~40 page faults a step alone in a process, 300-560 beside
    packrnn's, none with this), so the ratios compare compute, not allocator luck.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        ok = libc.mallopt(m_mmap_threshold, 64 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        ok = False
    return ("freed memory kept by glibc (mallopt: mmap threshold 64 MiB, trim threshold 1 GiB)"
            if ok else "allocator left as it is (not glibc)")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def format_table(results: Sequence[BenchResult]) -> str:
    """Markdown tables: ratios against the goals, then the times behind them."""
    def ms(s: float) -> str:
        return f"{s * 1e3:.1f}" if s < 10 else f"{s:.1f} s"

    def ratio(value: float, goal: float) -> str:
        return f"{value:.2f}x {'ok' if value >= goal else 'MISS'} (>= {goal}x)"

    lines = ["| config | train vs torch padded | train vs torch packed | "
             "inference vs torch packed | inference vs torch padded | useful GFLOP/s "
             "(% of matmul) | peak MB of a step: packrnn / torch padded |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        g = r.config.goals
        eff = f"{useful_flops(r.config, r.real_steps) / r.train['packrnn'] / 1e9:.1f} " \
              f"({100 * r.efficiency:.0f} %"
        if r.config.name == EFFICIENCY_CONFIG:
            eff += f", {'ok' if r.efficiency >= EFFICIENCY_GOAL else 'MISS'} >= 65 %"
        eff += ")"
        mem = "-"
        if r.memory_mb:
            a, b = r.memory_mb["packrnn"], r.memory_mb["torch_padded"]
            mem = f"{a:.0f} / {b:.0f} {'ok' if a <= b else 'MISS'}"
        lines.append(
            f"| {r.config.label} | {ratio(r.ratio('train', 'torch_padded'), g[0])} | "
            f"{ratio(r.ratio('train', 'torch_packed'), g[1])} | "
            f"{ratio(r.ratio('infer', 'torch_packed'), g[2])} | "
            f"{r.ratio('infer', 'torch_padded'):.2f}x | {eff} | {mem} |")
    lines += ["", "times in ms (best of the rounds); real / padded steps = the work packing saves",
              "", "| config | real / padded steps | train: packrnn, torch padded, torch packed | "
              "inference: packrnn, torch padded, torch packed |", "|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r.config.label} | {r.real_steps} / {r.padded_steps} | "
            + ", ".join(ms(r.train[v]) for v in VARIANTS) + " | "
            + ", ".join(ms(r.infer[v]) for v in VARIANTS) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of ``packrnn bench`` and ``benchmarks/bench_rnn.py``."""
    parser = argparse.ArgumentParser(
        prog="packrnn bench",
        description="Time packrnn's RNN layers against torch.nn (padded and packed) on CPU.")
    names = [c.name for c in CONFIGS]
    parser.add_argument("--configs", default="all",
                        help=f"comma-separated subset of {', '.join(names)} (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    if args.configs == "all":
        chosen = list(CONFIGS)
    else:
        wanted = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            parser.error(f"--configs: expected names from {', '.join(names)}, got "
                         f"{', '.join(unknown)}")
        chosen = [c for c in CONFIGS if c.name in wanted]
    if args.repeats < 1:
        parser.error(f"--repeats: expected a positive int, got {args.repeats}")
    if args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    run_bench(chosen, repeats=args.repeats, threads=args.threads, memory=not args.no_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
