"""Train, evaluate and use a text classifier: ``train(config) -> metrics``.

Importable functions, no argv parsing (``packrnn.cli`` is the thin command line over them):

- ``train(TrainConfig(...))`` trains a ``SequenceClassifier`` on a text file, evaluates every
  epoch, writes ``metrics.json``, a plot and atomic checkpoints to ``config.output``, resumes
  after a kill, and scales out under ``torchrun`` (DDP).
- ``load_run(directory)`` reads a finished (or interrupted) run back: model, vocabulary,
  labels, tokenizer.
- ``evaluate(run, path)`` scores a labelled file: accuracy, loss, per-class precision, recall
  and F1 with their macro averages, confusion matrix.
- ``predict(run, texts)`` gives each text's label and probability.

Files in the output directory:

==================  =========================================================================
``checkpoint.pt``   model, optimizer, vocabulary, labels, configs, progress, RNG states
``config.json``     the ``TrainConfig`` of the run, for people
``metrics.json``    one entry per finished epoch (see ``EpochMetrics``)
``curves.png``      train and test loss and accuracy per epoch, titled with the model (matplotlib)
==================  =========================================================================

``.packrnn.lock``    held while a training runs (pid, host, start time)
==================  =========================================================================

Only a new or empty directory or a packrnn run is written; the checkpoint carries a checksum and
fingerprints of the data files (see ``packrnn.rundir``).

NOTE [exact resume]
A checkpoint is taken every epoch and every ``checkpoint_every_steps`` optimizer steps. It holds
the number of batches already done in the current epoch and the running sums of that epoch, and
every source of randomness: the batch order of an epoch is a pure function of ``(seed, epoch)``
(the samplers' ``set_epoch``), the DataLoader gets its own generator (so creating one does not
consume the global RNG), and the torch / Python / NumPy RNG states of every rank are saved. On
resume, training rebuilds the same epoch's batches, skips the ones already done and restores the
RNG states, so the run continues with the same numbers as if it had never stopped: the final
weights and metrics equal those of an uninterrupted run (``tests/test_train.py`` checks it).
A fresh run saves a checkpoint of step 0 before anything else, so its directory is a run from
the start; Ctrl-C saves one after the current step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as D
from . import rundir
from .backend import backend_name
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, atomic_write, atomic_write_json,
                         load_checkpoint, save_checkpoint)
from .data import (BucketBatchSampler, Collate, DistributedBucketBatchSampler, LabelMap,
                   TextClassificationDataset, Vocab, get_tokenizer, load_text_classification)
from .models import (CELLS, EXECUTIONS, POOLINGS, DictConfig, ModelConfig, SequenceClassifier,
                     _check_probability)

__all__ = ["TrainConfig", "TrainError", "train", "load_run", "Run", "evaluate", "predict",
           "default_threads", "METRICS_NAME", "PLOT_NAME", "CONFIG_NAME"]

METRICS_NAME = "metrics.json"
PLOT_NAME = "curves.png"
CONFIG_NAME = "config.json"
_RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, CONFIG_NAME)  # all a run writes
_DATA_FILES = ("train_path", "test_path")  # fingerprinted in every checkpoint
FORMATS = ("agnews", "csv", "tsv", "jsonl")

# Fields that may change between a run and its resumption (they do not change the numbers).
_RESUMABLE_CHANGES = frozenset({
    "epochs", "output", "resume", "overwrite", "num_workers", "checkpoint_every_steps",
    "progress", "plot", "threads", "device", "test_path", "eval_batch_size", "allow_data_change",
})


class TrainError(ValueError):
    """A problem with the run's inputs or output directory, explained in one line."""


def _check_pos_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float = math.inf,
                  allow_none: bool = False, low_open: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        if math.isfinite(high):
            bound += f" and <= {high}"
        raise ValueError(f"{name}: expected a number {bound}" + (" or None" if allow_none else "")
                         + f", got {value!r}")


@dataclass
class TrainConfig(DictConfig):
    """Everything a training run needs; ``packrnn train`` builds one from its flags."""

    _config_name = "train config"

    # -- data ---------------------------------------------------------------------------------
    train_path: str  # labelled training file
    output: str  # run directory: checkpoint, metrics.json, curves.png, config.json
    test_path: str | None = None  # labelled file evaluated after every epoch; None: no evaluation
    format: str = "agnews"  # "agnews" (label 1-4, title, description; no header), "csv", "jsonl"
    text_column: str | None = None  # csv/jsonl: field(s) with the text, comma-separated; None: "text"
    label_column: str | None = None  # csv/jsonl: field with the label; None: "label"
    delimiter: str | None = None  # csv: field separator; None: tab for .tsv files, else ","
    skip_bad_rows: bool = False  # skip (and count) malformed rows instead of stopping with an error
    tokenizer: str = "basic_english"  # "basic_english" or "split" (whitespace)
    min_freq: int = 1  # vocabulary: keep tokens seen at least this often in the training file
    max_vocab_size: int | None = None  # vocabulary: at most this many entries (specials included)
    max_length: int | None = None  # truncate texts to this many tokens; None: keep all
    # -- model (see ModelConfig) --------------------------------------------------------------
    model: str = "lstm"  # recurrent cell: "rnn", "lstm" or "gru"
    embed_dim: int = 64  # embedding size
    hidden_size: int = 32  # hidden size per direction
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # add a reverse direction
    dropout: float = 0.0  # between recurrent layers and before the linear layer
    embed_dropout: float = 0.0  # on the embedded tokens, before the first recurrent layer
    pooling: str = "last"  # "last" | "mean" | "max" | "mean_padded"
    execution: str = "packed"  # "packed" (real steps only) or "padded" (the lesson's)
    vectors: str | None = None  # word2vec/GloVe text file to initialise the embedding from
    freeze_embedding: bool = False  # keep the embedding fixed
    sparse_embedding: bool = False  # lazy Adam on the embedding: update only the batch's rows
    # -- optimisation -------------------------------------------------------------------------
    batch_size: int = 16  # sequences per batch (per process under torchrun)
    epochs: int = 1  # passes over the training data
    lr: float = 1e-3  # Adam learning rate of the first epoch
    lr_decay: float = 1.0  # multiply the learning rate by this after every epoch (epoch e: lr * lr_decay**e)
    weight_decay: float = 0.0  # Adam weight decay
    grad_clip: float | None = None  # clip the gradient's global norm to this; None: no clipping
    seed: int = 0  # seeds model init, batch order and dropout: same seed, same run
    bucket: bool = False  # batch sequences of similar length together (less padding)
    max_tokens: int | None = None  # with bucket: cap padded tokens (batch x longest) per batch
    eval_batch_size: int = 256  # batch size for evaluation (results do not depend on it when packed)
    # -- run ----------------------------------------------------------------------------------
    checkpoint_every_steps: int | None = None  # also checkpoint every N steps; None: per epoch only
    resume: bool = False  # continue the run in `output` from its last checkpoint
    overwrite: bool = False  # replace an existing run in `output` (only packrnn's own files)
    allow_data_change: bool = False  # resume even if a data file changed since the checkpoint
    num_workers: int = 0  # DataLoader worker processes
    device: str = "auto"  # "auto" (CUDA if available), "cpu", "cuda", "cuda:N"
    threads: int | None = None  # torch.set_num_threads; None: from the work size (default_threads)
    progress: bool = True  # show a tqdm progress bar (main process only)
    plot: bool = True  # write curves.png (skipped with a note if matplotlib is missing)

    def __post_init__(self) -> None:
        for name in ("train_path", "output"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif not isinstance(value, str) or not value:
                raise TypeError(f"{name}: expected a path, got {value!r}")
        for name in ("test_path", "vectors"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name}: expected a path or None, got {value!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "agnews" and (self.text_column or self.label_column):
            raise ValueError("text_column/label_column: expected only with format csv or jsonl, "
                             "got format 'agnews'")
        if self.tokenizer not in ("basic_english", "split"):
            raise ValueError(f"tokenizer: expected 'basic_english' or 'split', got {self.tokenizer!r}")
        if self.model not in CELLS:
            raise ValueError(f"model: expected one of {', '.join(CELLS)}, got {self.model!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution: expected one of {', '.join(EXECUTIONS)}, "
                             f"got {self.execution!r}")
        for name in ("embed_dim", "hidden_size", "num_layers", "batch_size", "epochs",
                     "min_freq", "eval_batch_size"):
            _check_pos_int(name, getattr(self, name))
        for name in ("max_vocab_size", "max_length", "max_tokens", "checkpoint_every_steps",
                     "threads"):
            _check_pos_int(name, getattr(self, name), allow_none=True)
        if self.max_vocab_size is not None and self.max_vocab_size < 2:
            raise ValueError(f"max_vocab_size: expected >= 2 (<pad> and <unk>), got {self.max_vocab_size}")
        _check_pos_int("num_workers", self.num_workers, minimum=0)
        _check_pos_int("seed", self.seed, minimum=0)
        _check_number("lr", self.lr, 0.0, low_open=True)
        _check_number("lr_decay", self.lr_decay, 0.0, 1.0, low_open=True)
        _check_number("weight_decay", self.weight_decay, 0.0)
        _check_number("grad_clip", self.grad_clip, 0.0, allow_none=True, low_open=True)
        for name in ("dropout", "embed_dropout"):
            _check_probability(name, getattr(self, name))
        if self.max_tokens is not None and not self.bucket:
            raise ValueError("max_tokens: expected only together with bucket=True, got bucket=False")
        if self.resume and self.overwrite:
            raise ValueError("resume/overwrite: expected at most one of them, got both")
        if self.pooling == "mean_padded" and self.execution != "padded":
            raise ValueError("pooling: expected 'mean_padded' only with execution='padded', "
                             f"got execution={self.execution!r}")
        if self.sparse_embedding and self.weight_decay:
            raise ValueError("weight_decay: expected 0 with sparse_embedding=True (sparse Adam has "
                             f"no weight decay), got {self.weight_decay}")
        for name in ("bidirectional", "skip_bad_rows", "freeze_embedding", "sparse_embedding",
                     "bucket", "resume",
                     "overwrite", "allow_data_change", "progress", "plot"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")


    def model_config(self, vocab_size: int, num_classes: int, padding_idx: int | None) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size, num_classes=num_classes, embed_dim=self.embed_dim,
            hidden_size=self.hidden_size, cell=self.model, num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=float(self.dropout),
            embed_dropout=float(self.embed_dropout), pooling=self.pooling,
            execution=self.execution, padding_idx=padding_idx,
            freeze_embedding=self.freeze_embedding, sparse_embedding=self.sparse_embedding,
        )


# ----------------------------------------------------------------------------------------------
# data: files -> encoded data sets, batches (packrnn.data does the work)
# ----------------------------------------------------------------------------------------------


class _Truncate:
    """A picklable tokenizer that keeps the first ``max_length`` tokens."""

    def __init__(self, tokenizer: Callable[[str], list[str]], max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text: str) -> list[str]:
        return self.tokenizer(text)[: self.max_length]


def _tokenizer(cfg: TrainConfig) -> Callable[[str], list[str]]:
    tok = get_tokenizer(cfg.tokenizer)
    return _Truncate(tok, cfg.max_length) if cfg.max_length else tok


def _read_options(cfg: TrainConfig, path: str) -> tuple[str, dict[str, Any]]:
    """The packrnn.data format name and reader options for ``path``."""
    fmt, options = cfg.format, {}
    if fmt in ("csv", "tsv"):
        if fmt == "csv" and (cfg.delimiter == "\t" or cfg.delimiter is None
                             and path.lower().endswith(".tsv")):
            fmt = "tsv"
        elif fmt == "csv" and cfg.delimiter is not None:
            options["delimiter"] = cfg.delimiter
        if cfg.text_column:
            options["text_column"] = [c.strip() for c in cfg.text_column.split(",")]
        if cfg.label_column:
            options["label_column"] = cfg.label_column
    elif fmt == "jsonl":
        if cfg.text_column:
            options["text_key"] = [c.strip() for c in cfg.text_column.split(",")]
        if cfg.label_column:
            options["label_key"] = cfg.label_column
    return fmt, options


def _load(cfg: TrainConfig, path: str, vocab: Vocab | None = None,
          label_map: LabelMap | None = None, progress: bool | None = None
          ) -> TextClassificationDataset:
    """Read, tokenize and encode ``path``; builds vocab and labels when not given (training).

    Bad rows raise ``ValueError("<file>:<line>: ...")`` unless ``cfg.skip_bad_rows``; so does a
    label the training file did not have. The data module's warnings about skipped rows are
    replaced by ``train``'s own one-line summary.
    """
    fmt, options = _read_options(cfg, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_text_classification(
            path, fmt, tokenizer=_tokenizer(cfg), vocab=vocab, label_map=label_map,
            min_freq=cfg.min_freq, max_size=cfg.max_vocab_size, skip_bad_rows=cfg.skip_bad_rows,
            progress=progress, **options)


def _collate(cfg: TrainConfig, pad: int) -> Collate:
    return Collate(packed=cfg.execution == "packed", padding_value=pad, batch_first=True)


def _train_sampler(cfg: TrainConfig, ds: TextClassificationDataset, ctx: D.DistContext):
    """Batches of random examples, or of similar lengths with ``bucket`` (NOTE [bucketing]).

    Without ``bucket`` every pool is one batch, i.e. plain random batches.
    """
    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, seed=cfg.seed,
                              pool_size=None if cfg.bucket else cfg.batch_size)
    if ctx.distributed:
        return DistributedBucketBatchSampler(ds.lengths, num_replicas=ctx.world_size,
                                             rank=ctx.rank, **kw)
    return BucketBatchSampler(ds.lengths, **kw)


def _to_device(inputs: Any, device: torch.device) -> Any:
    return inputs.to(device)  # a PackedSequence keeps batch_sizes on the CPU


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


@dataclass
class EpochMetrics:
    """One entry of ``metrics.json`` (one finished epoch)."""

    epoch: int  # 1-based epoch number
    train_loss: float  # mean cross-entropy over the epoch's training samples (all ranks)
    train_accuracy: float  # fraction of the epoch's training samples predicted right
    test_accuracy: float | None  # accuracy on test_path after the epoch; None without one
    seconds: float  # wall time of the epoch's training steps (evaluation excluded)
    samples_per_second: float  # training samples (all ranks) per second of `seconds`
    samples: int = 0  # training samples seen in the epoch (all ranks)
    test_loss: float | None = None  # mean cross-entropy on test_path after the epoch; None without one

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EpochMetrics:
        """One entry of a checkpoint's history or of metrics.json.

        Fields this packrnn does not know (written by a newer one) are ignored; a missing
        required field raises ``ValueError``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"history: expected epoch entries with {required}, got one without "
                             f"{missing}")
        return cls(**{k: v for k, v in d.items() if k in names})


def _rng_state() -> dict[str, Any]:
    """This process's RNG states, storable with torch.save(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _prepare_output(cfg: TrainConfig, ctx: D.DistContext) -> tuple[Path | None, rundir.RunLock]:
    """Check and lock the output directory (main process); returns a checkpoint to resume.

    ``rundir.check_output`` decides: a new or empty directory starts a run, a run is resumed
    or replaced (``resume``/``overwrite``; ``overwrite`` later removes only the files a run
    writes), anything else is refused. Then the directory is locked and the temp files of
    interrupted writes are removed.
    """
    out = Path(cfg.output)
    rundir.check_output(out, _RUN_FILES, resume=cfg.resume, overwrite=cfg.overwrite)  # write nothing first
    out.mkdir(parents=True, exist_ok=True)
    lock = rundir.RunLock.acquire(out)
    try:  # again under the lock: another run may have started meanwhile
        resume = rundir.check_output(out, _RUN_FILES, resume=cfg.resume, overwrite=cfg.overwrite)
        rundir.remove_stale_temp_files(out, _RUN_FILES)
    except BaseException:
        lock.release()
        raise
    if cfg.resume and not resume and ctx.is_main:
        print(f"packrnn: no checkpoint in {str(out)!r} yet; starting the run from the beginning",
              file=sys.stderr)
    return (out / CHECKPOINT_NAME if resume else None), lock


def _clear_run_files(out: Path) -> None:
    for name in _RUN_FILES:
        try:
            (out / name).unlink()
        except FileNotFoundError:
            pass


def _check_data(cfg: TrainConfig, state: Mapping[str, Any] | None, ctx: D.DistContext
                ) -> dict[str, Any]:
    """Fingerprints of the data files; on resume a changed one is refused (``allow_data_change``)."""
    saved = state.get("data_fingerprints", {}) if state is not None else {}
    log = (lambda m: print(m, file=sys.stderr)) if ctx.is_main else (lambda m: None)
    prints = {}
    for name in _DATA_FILES:
        path = getattr(cfg, name)
        if path is None or not os.path.isfile(path):
            continue  # the data loader says what is wrong with it
        same_file = state is not None and state["train_config"].get(name) == path
        prints[name] = rundir.check_fingerprint(name, path, saved.get(name) if same_file else None,
                                                cfg.allow_data_change, log=log)
    return prints


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    diffs = [k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if diffs:
        k = diffs[0]
        raise TrainError(f"resume: expected the same settings as the checkpoint, got {k}={now[k]!r} "
                         f"(checkpoint: {saved.get(k)!r}); use another --output or --overwrite")


def _epoch_batches(sampler: BucketBatchSampler, epoch: int) -> list[list[int]]:
    """The epoch's batches, a pure function of (seed, epoch) (NOTE [exact resume])."""
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler.batches(epoch)]


def train(config: TrainConfig, *, on_step: Callable[[int], None] | None = None) -> list[EpochMetrics]:
    """Train a ``SequenceClassifier`` as ``config`` says; return the metrics of every epoch.

    Writes to ``config.output`` (main process only): ``checkpoint.pt`` after every epoch and
    every ``checkpoint_every_steps`` steps, ``metrics.json`` and ``curves.png`` after every
    epoch, ``config.json`` at the start. With ``resume=True`` continues from the checkpoint with
    the same numbers as an uninterrupted run (NOTE [exact resume]); a run that already finished
    its epochs returns its metrics without training.

    Under ``torchrun`` every process calls ``train`` with the same config: the process group
    is set up from the environment (gloo on CPU, NCCL on GPU), the model is wrapped in DDP, each
    rank trains on its shard of every epoch (``batch_size`` per rank), and metrics are summed
    over ranks, so ``metrics.json`` describes the whole data set.

    Args:
        config: the run's ``TrainConfig``.
        on_step: called with the global step number after every optimizer step (and after
            any checkpoint of that step); for progress hooks and tests.

    Returns:
        one ``EpochMetrics`` per finished epoch, the same list as ``metrics.json``.

    Raises:
        ValueError: a bad row ``"<file>:<line>: ..."`` (unless ``skip_bad_rows``), an empty
            file, a test label unseen in training.
        TrainError (a ValueError): an existing output directory without resume/overwrite, a
            checkpoint that does not match the config, or a loss that is NaN or infinite.
        RunDirError (a ValueError): an output directory that is not a packrnn run, one that
            another training holds (``RunLockedError``), or a data file that changed since the
            checkpoint (see ``packrnn.rundir``).
        CheckpointError (a ValueError): a corrupt or foreign checkpoint to resume from.
        TrainInterrupted (a KeyboardInterrupt): Ctrl-C, after saving a checkpoint.
        DiskFullError (an OSError): no space left; the previous checkpoint is intact.

    >>> metrics = train(TrainConfig(train_path="train.csv", test_path="test.csv",
    ...                             output="runs/lstm", epochs=2))  # doctest: +SKIP
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    cfg = config
    threads = torch.get_num_threads()
    ctx = D.setup(cfg.device)
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        with contextlib.ExitStack() as cleanup:  # the run lock, the Ctrl-C handler
            return _train(cfg, ctx, on_step, cleanup)
    finally:
        torch.set_num_threads(threads)
        D.teardown(ctx)


# NOTE [Training threads]
# A second thread pays only when a step has far more work than a fork/join and, on a busy
# machine, than the wait for a descheduled thread: with a CPU-bound process on the other core of
# a 2-core machine, an epoch of the lesson's model (B = 16, E = 64, H = 32, ~50 MFLOP a step;
# 4,000 rows) took 30-39 s with 2 torch threads and 1.35 s with 1 (0.9 s with the core free).
# So without --threads, training uses one thread below SMALL_STEP_FLOPS of recurrent work per
# step, and torch's default above it (NOTE [Threads] in recurrence.cpp for the kernel's own).
SMALL_STEP_FLOPS = 2e8


def default_threads(model: ModelConfig, batch_size: int, mean_length: float) -> int:
    """torch threads for training ``model`` without ``--threads`` (NOTE [Training threads]).

    Args:
        model: the classifier's configuration.
        batch_size: sequences per step.
        mean_length: mean tokens per sequence.

    Returns:
        1 when a training step's recurrent work (forward and backward, ~6 FLOPs per weight and
        real step) is below ``SMALL_STEP_FLOPS``, else ``torch.get_num_threads()``.

    >>> from packrnn.models import ModelConfig
    >>> default_threads(ModelConfig(vocab_size=60000, num_classes=4), 16, 40.0)  # the lesson's
    1
    """
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[model.cell]
    dirs = 2 if model.bidirectional else 1
    per_step = 0.0
    for layer in range(model.num_layers):
        width = model.embed_dim if layer == 0 else dirs * model.hidden_size
        per_step += dirs * gates * model.hidden_size * (width + model.hidden_size)
    flops = 6.0 * batch_size * mean_length * per_step
    return 1 if flops < SMALL_STEP_FLOPS else torch.get_num_threads()


def _train(cfg: TrainConfig, ctx: D.DistContext, on_step: Callable[[int], None] | None,
           cleanup: contextlib.ExitStack) -> list[EpochMetrics]:
    out = Path(cfg.output)
    if ctx.distributed and ctx.is_main:
        print(f"packrnn: distributed run: {ctx.world_size} processes, backend {ctx.backend}, "
              f"{cfg.batch_size} sequences per batch per process; figures are summed over "
              "processes", file=sys.stderr)
    # Rank 0 decides and tells the others: it writes into `out` soon, and a slower rank must not
    # then mistake the new run's files for an existing run.
    decision: tuple[str, str | None] = ("ok", None)
    if ctx.is_main:
        try:
            path, lock = _prepare_output(cfg, ctx)
            cleanup.callback(lock.release)
            decision = ("ok", None if path is None else str(path))
        except (TrainError, rundir.RunDirError) as e:
            decision = ("error", str(e))
            if not ctx.distributed:
                raise
    decision = D.broadcast_object(ctx, decision)
    if decision[0] == "error":
        raise TrainError(decision[1])
    resume_path = None if decision[1] is None else Path(decision[1])
    state = load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None:
        _check_resume_config(state["train_config"], cfg)
    data_fingerprints = _check_data(cfg, state, ctx)

    # -- data -----------------------------------------------------------------------------------
    progress = None if (cfg.progress and ctx.is_main) else False
    if state is not None:  # the vocabulary and labels the weights were trained with
        train_ds = _load(cfg, cfg.train_path, Vocab.from_dict(state["vocab"]),
                         LabelMap(state["labels"]), progress=progress)
    else:
        train_ds = _load(cfg, cfg.train_path, progress=progress)
    vocab, label_map = train_ds.vocab, train_ds.label_map
    label_names = list(label_map.names)
    test_ds = (_load(cfg, cfg.test_path, vocab, label_map, progress=progress)
               if cfg.test_path else None)
    if ctx.is_main:
        msg = f"packrnn: {len(train_ds)} training texts, {len(label_names)} labels, " \
              f"vocabulary of {len(vocab)}"
        if test_ds is not None:
            msg += f", {len(test_ds)} test texts"
        print(msg, file=sys.stderr)
    # Resolve (and on first use build) the recurrence backend here, not inside the first epoch's
    # timer, and say which one runs.
    backend = "cuDNN" if ctx.device.type == "cuda" else backend_name()
    if ctx.is_main:
        print(f"packrnn: recurrent backend {backend}", file=sys.stderr)
        for ds in (train_ds, test_ds):
            if ds is not None and ds.skipped:
                print(f"packrnn: skipped {len(ds.skipped)} bad rows of {ds.skipped[0].path} "
                      f"(first: {ds.skipped[0]})", file=sys.stderr)
        untrained = _untrained_labels(train_ds, test_ds)
        if untrained:
            print(f"packrnn: warning: {cfg.test_path} has labels no training row has: "
                  + ", ".join(f"{n!r} ({k} rows)" for n, k in untrained.items())
                  + "; the model never learns these classes", file=sys.stderr)

    # -- model and optimizer ----------------------------------------------------------------------
    _seed_everything(cfg.seed)
    mcfg = cfg.model_config(len(vocab), len(label_names), vocab.pad_index)
    if cfg.threads is None and ctx.device.type == "cpu":  # train() restores torch's setting
        mean_length = sum(train_ds.lengths) / max(1, len(train_ds))
        torch.set_num_threads(default_threads(mcfg, cfg.batch_size, mean_length))
        if ctx.is_main:
            print(f"packrnn: {torch.get_num_threads()} thread(s), chosen from the work of a "
                  f"training step (--threads N to choose)", file=sys.stderr)
    model = SequenceClassifier(mcfg)
    if cfg.vectors and state is None:
        found = model.load_vectors(cfg.vectors, vocab.get_itos())
        if ctx.is_main:
            print(f"packrnn: {found} of {len(vocab)} embedding rows from {cfg.vectors}",
                  file=sys.stderr)
    model.to(ctx.device)
    optimizer = _Adam(model, cfg)
    history: list[EpochMetrics] = []
    epoch, step, step_in_epoch = 0, 0, 0
    accum = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        history = _history(state, resume_path)
        epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        accum = dict(state["epoch_accum"])
        rngs = state["rng"]
        if len(rngs) != ctx.world_size:
            raise TrainError(f"resume: expected a checkpoint of a run with {ctx.world_size} "
                             f"process(es), got one with {len(rngs)}")
        _set_rng_state(rngs[ctx.rank])
    else:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs across ranks, repeatably
        if ctx.is_main and cfg.overwrite:
            _clear_run_files(out)
    if state is not None and ctx.is_main:
        # A kill between the epoch's checkpoint and its metrics.json must not lose the epoch:
        # the checkpoint's history is the truth, rewrite the files from it.
        _write_metrics(cfg, out, history)
    D.barrier(ctx)
    if epoch >= cfg.epochs:
        if ctx.is_main:
            print(f"packrnn: the run in {str(out)!r} already finished {epoch} epoch(s)",
                  file=sys.stderr)
        return history
    net: nn.Module = model
    if ctx.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    sampler = _train_sampler(cfg, train_ds, ctx)
    pad = vocab.pad_index if vocab.pad_index is not None else 0
    collate = _collate(cfg, pad)
    packed = cfg.execution == "packed"
    loss_fn = nn.CrossEntropyLoss()

    def checkpoint(epoch_done: int, in_epoch: int, acc: Mapping[str, float]) -> None:
        rngs = D.all_gather_objects(ctx, _rng_state())
        if ctx.is_main:
            save_checkpoint(out / CHECKPOINT_NAME, {
                "model_config": mcfg.to_dict(), "train_config": cfg.to_dict(),
                "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                "vocab": vocab.to_dict(), "labels": label_names,
                "epoch": epoch_done, "step": step, "step_in_epoch": in_epoch,
                "epoch_accum": dict(acc), "history": [asdict(m) for m in history],
                "rng": rngs, "world_size": ctx.world_size, "data_fingerprints": data_fingerprints,
            })
        D.barrier(ctx)

    def interrupted(in_epoch: int, total: int) -> rundir.TrainInterrupted:
        return rundir.TrainInterrupted(
            f"interrupted after step {step} (epoch {epoch + 1}, batch {in_epoch} of {total}); "
            f"checkpoint saved in {str(out)!r}: continue with "
            f"`packrnn train --resume --output {out}`")

    if state is None:
        # The first file is a checkpoint, so the directory is a run from the start
        # (rundir.classify); its RNG states are those the first step starts from.
        checkpoint(0, 0, accum)
        if ctx.is_main:
            atomic_write_json(out / CONFIG_NAME, cfg.to_dict())
    stop = cleanup.enter_context(rundir.StopOnInterrupt())  # Ctrl-C: save after the step

    while epoch < cfg.epochs:
        batches = _epoch_batches(sampler, epoch)
        todo = batches[step_in_epoch:]
        loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=todo, num_workers=cfg.num_workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        bar = _progress(cfg, ctx, total=len(batches), initial=step_in_epoch, epoch=epoch)
        bar_every = max(1, len(batches) // 100)  # distributed: sum the bar's figures this often
        # A function of the epoch alone, so a resumed run gets the same rate (no scheduler state).
        optimizer.set_lr(cfg.lr * cfg.lr_decay ** epoch)
        net.train()
        t0 = time.perf_counter()
        for inputs, lengths, labels in loader:
            inputs, labels = _to_device(inputs, ctx.device), labels.to(ctx.device)
            logits = net(inputs) if packed else net(inputs, lengths)  # (B, C)
            loss = loss_fn(logits, labels)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise TrainError(
                    f"loss: expected a finite number, got {loss_value} at step {step + 1} "
                    f"(epoch {epoch + 1}, batch {step_in_epoch + 1} of {len(batches)}); stopped, "
                    f"the checkpoint in {str(out)!r} holds the steps before it: lower --lr or set "
                    "--grad-clip")
            optimizer.zero_grad()
            loss.backward()
            if cfg.grad_clip is not None:
                _clip_grad_norm(model, cfg.grad_clip)
            optimizer.step()
            n = labels.numel()
            accum["loss_sum"] += loss_value * n
            accum["correct"] += float((logits.detach().argmax(-1) == labels).sum())
            accum["count"] += n
            step += 1
            step_in_epoch += 1
            if bar is not None:
                bar.update(1)
            if cfg.progress and (not ctx.distributed or step_in_epoch % bar_every == 0
                                 or step_in_epoch == len(batches)):
                # every rank joins the sum (same step counts on every rank); rank 0 shows it
                figures = _bar_figures(ctx, accum, accum["seconds"] + time.perf_counter() - t0)
                if bar is not None:
                    bar.set_postfix(figures, refresh=False)
            if cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0 \
                    and step_in_epoch < len(batches):
                now = time.perf_counter()
                checkpoint(epoch, step_in_epoch, {**accum, "seconds": accum["seconds"] + now - t0})
                t0 -= time.perf_counter() - now  # checkpoint time is not training time
            if on_step is not None:
                on_step(step)
            if _stop_requested(ctx, stop):
                checkpoint(epoch, step_in_epoch,
                           {**accum, "seconds": accum["seconds"] + time.perf_counter() - t0})
                raise interrupted(step_in_epoch, len(batches))
        if bar is not None:
            bar.close()
        seconds = accum["seconds"] + time.perf_counter() - t0
        loss_sum, correct, count = D.all_reduce_sum(
            ctx, [accum["loss_sum"], accum["correct"], accum["count"]])
        seconds = max(D.all_reduce_sum(ctx, [seconds])[0] / ctx.world_size, 1e-9)
        test_acc = test_loss = None
        if test_ds is not None:
            scores = _evaluate_dataset(model, test_ds, cfg, ctx)
            test_acc, test_loss = scores["accuracy"], scores["loss"]
        epoch += 1
        history.append(EpochMetrics(
            epoch=epoch, train_loss=loss_sum / max(count, 1), train_accuracy=correct / max(count, 1),
            test_accuracy=test_acc, seconds=seconds, samples_per_second=count / seconds,
            samples=int(count), test_loss=test_loss))
        step_in_epoch = 0
        accum = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}
        checkpoint(epoch, 0, accum)
        if ctx.is_main:
            _write_metrics(cfg, out, history)
            m = history[-1]
            print(f"epoch {m.epoch}: train_loss {m.train_loss:.4f} train_accuracy "
                  f"{m.train_accuracy:.4f} test_loss "
                  f"{'-' if m.test_loss is None else f'{m.test_loss:.4f}'} test_accuracy "
                  f"{'-' if m.test_accuracy is None else f'{m.test_accuracy:.4f}'} "
                  f"({m.seconds:.1f} s, {m.samples_per_second:.0f} samples/s)", file=sys.stderr)
        if epoch < cfg.epochs and _stop_requested(ctx, stop):  # Ctrl-C during evaluation
            raise interrupted(0, len(batches))
    return history


def _stop_requested(ctx: D.DistContext, stop: rundir.StopOnInterrupt) -> bool:
    """Whether Ctrl-C asked to stop; under DDP every rank stops at the same step."""
    if not ctx.distributed:
        return stop.requested
    return D.all_reduce_sum(ctx, [float(stop.requested)])[0] > 0


def _write_metrics(cfg: TrainConfig, out: Path, history: Sequence[EpochMetrics]) -> None:
    atomic_write_json(out / METRICS_NAME, [asdict(m) for m in history])
    if cfg.plot and history:
        _plot(history, out / PLOT_NAME, title=_run_title(cfg))


def _clip_grad_norm(model: nn.Module, max_norm: float) -> None:
    """``clip_grad_norm_`` that also takes sparse gradients (torch's refuses them)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    norms = []
    for p in model.parameters():
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # duplicate rows summed, so the norm is the true one
            norms.append(p.grad.values().norm())
        elif p.grad is not None:
            norms.append(p.grad.norm())
    total = torch.stack(norms).norm()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)


class _Adam:
    """Adam over the model, fused into one pass per parameter where torch supports it.

    The optimizer step over a text model's embedding (vocabulary x E: 43k x 64 on AG News)
    dominates a small model's training step. The fused step does Adam's arithmetic in one pass
    instead of about seven (~6x faster on CPU). With ``sparse_embedding`` the embedding gets
    sparse gradients and ``torch.optim.SparseAdam`` ("lazy Adam": moments and weights of the
    rows in the batch only), another ~6x on the embedding; the other parameters keep Adam.
    """

    def __init__(self, model: SequenceClassifier, cfg: TrainConfig) -> None:
        emb = model.embedding.weight
        sparse = cfg.sparse_embedding and emb.requires_grad
        dense = [p for p in model.parameters() if p.requires_grad and not (sparse and p is emb)]
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            "adam": self._dense(dense, cfg)}
        if sparse:
            self.optimizers["sparse_adam"] = torch.optim.SparseAdam([emb], lr=cfg.lr)

    @staticmethod
    def _dense(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Adam:
        try:
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _progress(cfg: TrainConfig, ctx: D.DistContext, total: int, initial: int, epoch: int):
    if not (cfg.progress and ctx.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="batch", dynamic_ncols=True, leave=True)


def _bar_figures(ctx: D.DistContext, accum: Mapping[str, float], elapsed: float) -> dict[str, str]:
    """The progress bar's loss, accuracy and samples/s of the epoch so far, over all ranks.

    A collective under torchrun: every rank must call it at the same steps.
    """
    loss_sum, correct, count = D.all_reduce_sum(
        ctx, [accum["loss_sum"], accum["correct"], accum["count"]])
    count = max(count, 1.0)
    return {"loss": f"{loss_sum / count:.4f}", "acc": f"{correct / count:.3f}",
            "samples_s": f"{count / max(elapsed, 1e-9):.0f}"}


def _untrained_labels(train_ds: TextClassificationDataset,
                      test_ds: TextClassificationDataset | None) -> dict[str, int]:
    """Labels with test rows but no training row (AG News: a class missing from the training
    file), with their number of test rows: the model never learns them."""
    if test_ds is None:
        return {}
    trained = set(train_ds.labels)
    counts: dict[str, int] = {}
    for y in test_ds.labels:
        if y not in trained:
            name = train_ds.label_map.names[y]
            counts[name] = counts.get(name, 0) + 1
    return counts


def _run_title(cfg: TrainConfig) -> str:
    """The run's model in a few words, e.g. "bidirectional 2-layer LSTM 128, max pooling (runs/x)"."""
    words = ["bidirectional"] if cfg.bidirectional else []
    words += [f"{cfg.num_layers}-layer"] if cfg.num_layers > 1 else []
    words += [f"{cfg.model.upper()} {cfg.hidden_size}, {cfg.pooling} pooling"]
    words += ["(padded)"] if cfg.execution == "padded" else []
    return " ".join(words) + f" ({cfg.output})"


def _plot(history: Sequence[EpochMetrics], path: Path, title: str | None = None) -> None:
    """Loss and accuracy per epoch, train and test, as a PNG (matplotlib Agg, imported lazily)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        print("packrnn: matplotlib is not installed; skipping the plot "
              "(pip install 'packrnn[plot]')", file=sys.stderr)
        return
    epochs = [m.epoch for m in history]
    fig = Figure(figsize=(9, 3.5), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [m.train_loss for m in history], marker="o", label="train")
    if any(m.test_loss is not None for m in history):
        ax1.plot(epochs, [m.test_loss for m in history], marker="o", label="test")
    ax1.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax2.plot(epochs, [m.train_accuracy for m in history], marker="o", label="train")
    if any(m.test_accuracy is not None for m in history):
        ax2.plot(epochs, [m.test_accuracy for m in history], marker="o", label="test")
    ax2.set(title="accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------------------------
# evaluation and prediction
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _evaluate_dataset(model: SequenceClassifier, ds: TextClassificationDataset, cfg: TrainConfig,
                      ctx: D.DistContext | None = None, batch_size: int | None = None
                      ) -> dict[str, Any]:
    """Confusion matrix and derived scores of ``model`` on ``ds`` (sharded over ranks)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    num_classes = model.config.num_classes
    # Sorted by length (little padding); the packed results do not depend on the batching.
    sampler = BucketBatchSampler(ds.lengths, batch_size or cfg.eval_batch_size, shuffle=False)
    batches = sampler.batches(0)
    if ctx is not None and ctx.distributed:
        batches = batches[ctx.rank::ctx.world_size]
    collate = _collate(cfg, model.config.padding_idx or 0)
    packed = cfg.execution == "packed"
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # (true, predicted)
    loss_sum = 0.0
    for batch in batches:
        inputs, lengths, labels = collate([ds[i] for i in batch])
        inputs = _to_device(inputs, device)
        logits = model(inputs) if packed else model(inputs, lengths)  # (B, C)
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels.to(device),
                                                      reduction="sum"))
        pred = logits.argmax(-1).cpu()  # (B,)
        confusion.index_put_((labels, pred), torch.ones(len(batch), dtype=torch.float64),
                             accumulate=True)
    if ctx is not None and ctx.distributed:
        flat = D.all_reduce_sum(ctx, confusion.flatten().tolist() + [loss_sum])
        confusion = torch.tensor(flat[:-1], dtype=torch.float64).view(num_classes, num_classes)
        loss_sum = flat[-1]
    model.train(was_training)
    result = _scores(confusion)
    result["loss"] = loss_sum / result["count"] if result["count"] else float("nan")
    return result


def _scores(confusion: Tensor) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 and their macro averages from a confusion matrix.

    Per class: ``None`` where undefined (precision of a class never predicted, recall of a class
    absent from the data, F1 of a class that is neither). Macro averages are over the classes
    that occur in the data or the predictions, an undefined value counting as 0 (as
    scikit-learn's ``average="macro"`` with ``zero_division=0``).
    """
    total = float(confusion.sum())
    tp = confusion.diagonal()  # (C,)
    predicted = confusion.sum(0)  # (C,)
    actual = confusion.sum(1)  # (C,)
    classes = range(len(tp))
    precision = [float(tp[i] / predicted[i]) if predicted[i] > 0 else None for i in classes]
    recall = [float(tp[i] / actual[i]) if actual[i] > 0 else None for i in classes]
    seen = [i for i in classes if actual[i] + predicted[i] > 0]
    f1 = [float(2 * tp[i] / (actual[i] + predicted[i])) if i in seen else None for i in classes]

    def macro(values: list[float | None]) -> float | None:
        return sum(values[i] or 0.0 for i in seen) / len(seen) if seen else None

    return {
        "count": int(total),
        "accuracy": float(tp.sum()) / total if total else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "macro": {"precision": macro(precision), "recall": macro(recall), "f1": macro(f1)},
        "support": [int(a) for a in actual],
        "confusion": confusion.to(torch.int64).tolist(),
    }


@dataclass
class Run:
    """A trained (or interrupted) run read back from its directory by ``load_run``."""

    directory: Path  # the run's output directory
    model: SequenceClassifier  # in eval mode
    vocab: Any  # packrnn.data.Vocab of the training file
    labels: list[str]  # label names; the model's class i is labels[i]
    config: TrainConfig  # the run's training config
    epochs_done: int  # finished epochs
    history: list[EpochMetrics]  # metrics of the finished epochs

    def tokenize(self, text: str) -> list[str]:
        """The run's tokenizer (truncating to ``max_length`` if the run did)."""
        return _tokenizer(self.config)(text)


def load_run(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """Read a run directory written by ``train``: its model, vocabulary, labels and config.

    Raises:
        CheckpointError: the directory is missing, incomplete (no checkpoint), from another
            packrnn format version, or its checkpoint is corrupt or inconsistent (e.g. fewer
            label names than the model has classes). Per-epoch history fields this packrnn does
            not know (a newer one's) are ignored.
    """
    state = load_checkpoint(directory)
    path = Path(directory)
    try:
        mcfg = ModelConfig.from_dict(state["model_config"])
        tcfg = TrainConfig.from_dict(state["train_config"])
        vocab = Vocab.from_dict(state["vocab"])
        model = SequenceClassifier(mcfg)
        model.load_state_dict(state["model_state"])
        labels = [str(n) for n in state["labels"]]
        if len(labels) != mcfg.num_classes:
            raise ValueError(f"labels: expected {mcfg.num_classes} label names (the model's "
                             f"classes), got {len(labels)}")
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint in {str(path)!r} is inconsistent and cannot be used "
                              f"({first})") from e
    history = _history(state, path)
    model.to(device).eval()
    return Run(directory=path, model=model, vocab=vocab, labels=labels,
               config=tcfg, epochs_done=int(state["epoch"]), history=history)


def _history(state: Mapping[str, Any], path: Path) -> list[EpochMetrics]:
    """The checkpoint's metrics per epoch; fields unknown here are ignored (EpochMetrics.from_dict)."""
    try:
        return [EpochMetrics.from_dict(m) for m in state["history"]]
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"checkpoint in {str(path)!r} is inconsistent and cannot be used "
                              f"({e})") from e


def _as_run(run: Run | str | os.PathLike) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def evaluate(run: Run | str | os.PathLike, path: str | os.PathLike, *,
             format: str | None = None, text_column: str | None = None,
             label_column: str | None = None, skip_bad_rows: bool | None = None,
             batch_size: int = 256) -> dict[str, Any]:
    """Score a trained run on a labelled file.

    The file is read like the run's training file (format and columns from the run's config)
    unless ``format`` / ``text_column`` / ``label_column`` say otherwise.

    Returns:
        ``{"count", "accuracy", "loss", "labels", "precision", "recall", "f1", "macro",
        "support", "confusion", "skipped"}``: per-class lists in the order of ``labels``;
        ``confusion[i][j]`` counts texts of label ``i`` predicted as ``j``; precision / recall /
        F1 are ``None`` for a class never predicted / absent / neither; ``macro`` holds the
        macro averages ``{"precision", "recall", "f1"}`` over the classes that occur in the
        data or the predictions (an undefined value counts as 0, as scikit-learn's);
        ``loss`` is the mean cross-entropy.

    Raises:
        ValueError: a bad row or a label the run never saw in training
            (``"<file>:<line>: ..."``), an empty file.
        CheckpointError: see ``load_run``.
    """
    run = _as_run(run)
    _check_pos_int("batch_size", batch_size)
    changes = {k: v for k, v in (("format", format), ("text_column", text_column),
                                 ("label_column", label_column),
                                 ("skip_bad_rows", skip_bad_rows)) if v is not None}
    cfg = dataclasses.replace(run.config, **changes) if changes else run.config
    ds = _load(cfg, os.fspath(path), run.vocab, LabelMap(run.labels))
    result = _evaluate_dataset(run.model, ds, cfg, batch_size=batch_size)
    result["labels"] = list(run.labels)
    result["skipped"] = len(ds.skipped)
    return result


@torch.no_grad()
def predict(run: Run | str | os.PathLike, texts: Sequence[str], batch_size: int = 256
            ) -> list[dict[str, Any]]:
    """Label each text: ``[{"text", "label", "probability", "probabilities"}, ...]``.

    ``probability`` is the softmax probability of the predicted ``label``;
    ``probabilities`` maps every label to its probability. A text with no known tokens is
    still classified (from the model's state for an empty or all-<unk> sequence).
    """
    run = _as_run(run)
    if isinstance(texts, str):
        raise TypeError("texts: expected a list of str, got a str (wrap it in a list)")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected a str, got {type(t).__name__}")
    tokenizer = _tokenizer(run.config)
    pad = run.vocab.pad_index if run.vocab.pad_index is not None else 0
    collate = _collate(run.config, pad)
    packed = run.config.execution == "packed"
    device = next(run.model.parameters()).device
    run.model.eval()
    results: list[dict[str, Any]] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        inputs, lengths, _ = collate([torch.tensor(run.vocab(tokenizer(t)), dtype=torch.int64)
                                      for t in chunk])
        inputs = _to_device(inputs, device)
        logits = run.model(inputs) if packed else run.model(inputs, lengths)  # (B, C)
        probs = torch.softmax(logits.float(), dim=-1).cpu()  # (B, C)
        for t, p in zip(chunk, probs):
            k = int(p.argmax())
            results.append({"text": t, "label": run.labels[k], "probability": float(p[k]),
                            "probabilities": {name: float(q) for name, q in zip(run.labels, p)}})
    return results
