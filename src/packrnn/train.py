"""Train, evaluate and use a model: ``train(config) -> metrics``; one loop, several tasks.

Importable functions, no argv parsing (``packrnn.cli`` is the thin command line over them):

- ``train(TrainConfig(...))`` trains the model of ``config.task`` on a file, evaluates every
  epoch, writes ``metrics.json``, a plot and atomic checkpoints to ``config.output``, resumes
  after a kill, and scales out under ``torchrun`` (DDP).
- ``load_run(directory)`` reads a finished (or interrupted) run back: model, vocabulary,
  labels, tokenizer.
- ``evaluate(run, path)`` scores a labelled file (classify: accuracy, loss, per-class
  precision, recall and F1 with their macro averages, confusion matrix).
- ``predict(run, texts)`` gives each text's label and probability.

A trainer is a loop plus a task. The loop here (``_Loop``: epochs, steps, checkpoints, exact
resume, DDP, progress bar, ``metrics.json``, ``curves.png``) knows nothing of labels or tags;
a task in ``packrnn.tasks`` supplies data loading, model, loss and metrics
(``packrnn/tasks/base.py`` lists what it must provide; ``classify`` is the text classifier).
What one training step does: ``_Loop._train_step``.

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
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed as D
from . import rundir
from .backend import backend_name
from .checkpoint import (CHECKPOINT_NAME, CheckpointError, atomic_write, atomic_write_json,
                         load_checkpoint, save_checkpoint)
from .data import BucketBatchSampler, DistributedBucketBatchSampler, Vocab
from .models import CELLS, EXECUTIONS, POOLINGS, DictConfig, ModelConfig, _check_probability
from .tasks import TASKS, Task, get_task
from .tasks.base import StepStats, TaskData
from .tasks.classify import tokenizer as _tokenizer

__all__ = ["TrainConfig", "TrainError", "train", "load_run", "Run", "evaluate", "predict",
           "generate", "default_threads", "METRICS_NAME", "PLOT_NAME", "CONFIG_NAME"]

METRICS_NAME = "metrics.json"
PLOT_NAME = "curves.png"
CONFIG_NAME = "config.json"
_RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, CONFIG_NAME)  # all a run writes
_DATA_FILES = ("train_path", "test_path")  # fingerprinted in every checkpoint
FORMATS = ("agnews", "csv", "tsv", "jsonl", "conllu", "conll", "text")
# What each task reads (the first is the command line's default) and which fields only some
# tasks use: such a field must keep its default for the other tasks.
TASK_FORMATS = {"classify": ("agnews", "csv", "tsv", "jsonl"),
                "tag": ("conllu", "conll", "jsonl"),
                "lm": ("text", "agnews", "csv", "tsv", "jsonl")}
_TASK_FIELDS = {
    "pooling": ("classify",), "tagset": ("tag",), "token_column": ("tag",),
    "tag_column": ("tag",), "lowercase": ("tag",), "char_features": ("tag",),
    "char_embed_dim": ("tag",), "char_hidden_size": ("tag",), "level": ("lm",),
    "tie_weights": ("lm",), "vectors": ("classify", "tag"),
    "freeze_embedding": ("classify", "tag"), "sparse_embedding": ("classify", "tag"),
    "max_length": ("classify", "lm"), "bidirectional": ("classify", "tag"),
    "delimiter": ("classify", "tag", "lm"),
    "compile": ("classify",),
}

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
    task: str = "classify"  # what is learnt: "classify" (a label per text), "tag" (a tag per
    #   token) or "lm" (the next token); see packrnn.tasks
    test_path: str | None = None  # labelled file evaluated after every epoch; None: no evaluation
    format: str = "agnews"  # "agnews" (label 1-4, title, description; no header), "csv", "tsv",
    #   "jsonl"; tag: "conllu", "conll" or "jsonl"; lm: "text" (a text per line) or the above
    text_column: str | None = None  # csv/jsonl: field(s) with the text, comma-separated; None: "text"
    #   (tag, jsonl: the key of the token list; None: "tokens")
    label_column: str | None = None  # csv/jsonl: field with the label; None: "label"
    #   (tag, jsonl: the key of the tag list; None: "tags")
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
    # -- tagging (task "tag") and language modelling (task "lm") ------------------------------
    tagset: str = "upos"  # conllu: "upos" (column 4) or "xpos" (column 5)
    token_column: int = 0  # conll: 0-based column of the word (negative: from the end)
    tag_column: int = -1  # conll: 0-based column of the tag (negative: from the end)
    lowercase: bool = False  # tag: look words up lowercased (characters keep their case)
    char_features: bool = False  # tag: add a character-level recurrent layer's word features
    char_embed_dim: int = 16  # tag: character embedding size
    char_hidden_size: int = 32  # tag: character layer's hidden size per direction
    level: str = "char"  # lm: predict characters ("char") or words ("word", by `tokenizer`)
    tie_weights: bool = False  # lm: the output layer reuses the embedding (embed_dim == hidden_size)
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
    # torch.compile the model for training (classify): batches come padded with lengths and the
    # layers run their padded + lengths path, one registered operator per layer (README
    # "Compile, export and serve"); embedding dropout then draws over padded positions
    compile: bool = False
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
        if self.task not in TASKS:
            raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if self.format not in FORMATS:  # the task's formats (classify: the message it always had)
            raise ValueError(f"format: expected one of {', '.join(TASK_FORMATS[self.task])}, "
                             f"got {self.format!r}")
        if self.format not in TASK_FORMATS[self.task]:
            raise ValueError(f"format: expected one of {', '.join(TASK_FORMATS[self.task])} for "
                             f"task {self.task!r}, got {self.format!r}")
        for name, tasks in _TASK_FIELDS.items():
            default = TrainConfig.__dataclass_fields__[name].default
            if self.task not in tasks and getattr(self, name) != default:
                raise ValueError(f"{name}: expected only with task "
                                 f"{' or '.join(repr(t) for t in tasks)}, got task {self.task!r}")
        if self.tagset not in ("upos", "xpos"):
            raise ValueError(f"tagset: expected 'upos' or 'xpos', got {self.tagset!r}")
        if self.level not in ("char", "word"):
            raise ValueError(f"level: expected 'char' or 'word', got {self.level!r}")
        for name in ("token_column", "tag_column"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise TypeError(f"{name}: expected an int column index, got {getattr(self, name)!r}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ValueError("tie_weights: expected embed_dim == hidden_size, got "
                             f"{self.embed_dim} and {self.hidden_size}")
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
                     "min_freq", "eval_batch_size", "char_embed_dim", "char_hidden_size"):
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
                     "bucket", "resume", "lowercase", "char_features", "tie_weights",
                     "overwrite", "allow_data_change", "progress", "plot", "compile"):
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
# batches: the task's data set -> the epoch's batches of indices
# ----------------------------------------------------------------------------------------------


def _train_sampler(cfg: TrainConfig, ds: Any, ctx: D.DistContext):
    """Batches of random examples, or of similar lengths with ``bucket`` (NOTE [bucketing]).

    Without ``bucket`` every pool is one batch, i.e. plain random batches.
    """
    kw: dict[str, Any] = dict(batch_size=cfg.batch_size, max_tokens=cfg.max_tokens, seed=cfg.seed,
                              pool_size=None if cfg.bucket else cfg.batch_size)
    if ctx.distributed:
        return DistributedBucketBatchSampler(ds.lengths, num_replicas=ctx.world_size,
                                             rank=ctx.rank, **kw)
    return BucketBatchSampler(ds.lengths, **kw)


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
    test_loss: float | None = None  # the task's mean loss on test_path after the epoch; None
    #   without one

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
    # A field added after the checkpoint was written had its default value then.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    saved = {**defaults, **saved}
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
    """Train the model of ``config.task`` as ``config`` says; return the metrics of every epoch.

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


def default_threads(cfg: TrainConfig, mean_length: float) -> int:
    """torch threads for training as ``cfg`` says, without ``threads`` (NOTE [Training threads]).

    Args:
        cfg: the training configuration (cell, sizes, layers, directions, batch size).
        mean_length: mean tokens per training sequence.

    Returns:
        1 when a training step's recurrent work (forward and backward, ~6 FLOPs per weight and
        real step) is below ``SMALL_STEP_FLOPS``, else ``torch.get_num_threads()``.

    >>> cfg = TrainConfig(train_path="train.csv", output="runs/x")  # the lesson's sizes
    >>> default_threads(cfg, 40.0)
    1
    """
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.model]
    dirs = 2 if cfg.bidirectional else 1
    per_step = 0.0
    for layer in range(cfg.num_layers):
        width = cfg.embed_dim if layer == 0 else dirs * cfg.hidden_size
        per_step += dirs * gates * cfg.hidden_size * (width + cfg.hidden_size)
    flops = 6.0 * cfg.batch_size * mean_length * per_step
    return 1 if flops < SMALL_STEP_FLOPS else torch.get_num_threads()


def _train(cfg: TrainConfig, ctx: D.DistContext, on_step: Callable[[int], None] | None,
           cleanup: contextlib.ExitStack) -> list[EpochMetrics]:
    task = get_task(cfg.task)
    if ctx.distributed and ctx.is_main:
        print(f"packrnn: distributed run: {ctx.world_size} processes, backend {ctx.backend}, "
              f"{cfg.batch_size} sequences per batch per process; figures are summed over "
              "processes", file=sys.stderr)
    state = _open_run(cfg, ctx, cleanup)
    data_fingerprints = _check_data(cfg, state, ctx)
    progress = None if (cfg.progress and ctx.is_main) else False
    data = task.load_data(cfg, state, progress)
    # Resolve (and on first use build) the recurrence backend here, not inside the first epoch's
    # timer, and say which one runs.
    backend = "cuDNN" if ctx.device.type == "cuda" else backend_name()
    if ctx.is_main:
        print(f"packrnn: {data.summary}", file=sys.stderr)
        print(f"packrnn: recurrent backend {backend}", file=sys.stderr)
        for ds in (data.train, data.test):
            if ds is not None and ds.skipped:
                print(f"packrnn: skipped {len(ds.skipped)} bad rows of {ds.skipped[0].path} "
                      f"(first: {ds.skipped[0]})", file=sys.stderr)
        for warning in data.warnings:
            print(f"packrnn: warning: {warning}", file=sys.stderr)
    lengths = getattr(data.train, "lengths", None)
    if cfg.threads is None and ctx.device.type == "cpu" and lengths:  # train() restores it
        torch.set_num_threads(default_threads(cfg, sum(lengths) / len(lengths)))
        if ctx.is_main:
            print(f"packrnn: {torch.get_num_threads()} thread(s), chosen from the work of a "
                  "training step (--threads N to choose)", file=sys.stderr)
    return _Loop(cfg, ctx, task, data, state, data_fingerprints).run(on_step, cleanup)


def _open_run(cfg: TrainConfig, ctx: D.DistContext, cleanup: contextlib.ExitStack
              ) -> dict[str, Any] | None:
    """Check and lock the output directory; the checkpoint to resume, or None for a fresh run."""
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
    if decision[1] is None:
        return None
    state = load_checkpoint(Path(decision[1]))
    _check_resume_config(state["train_config"], cfg)
    return state


class _Loop:
    """The epoch loop shared by every task: steps, checkpoints, metrics (NOTE [exact resume]).

    It knows nothing of labels or tags: the task (``packrnn.tasks``) turns a batch into a loss
    and ``StepStats``, and scores the test set. Extension points: ``_train_step`` (what one
    step does), ``net`` (the module the steps call: DDP-wrapped under torchrun), ``checkpoint``
    (what a checkpoint holds).
    """

    def __init__(self, cfg: TrainConfig, ctx: D.DistContext, task: Task, data: TaskData,
                 state: Mapping[str, Any] | None, data_fingerprints: dict[str, Any]) -> None:
        self.cfg, self.ctx, self.task, self.data = cfg, ctx, task, data
        self.fresh = state is None
        self.data_fingerprints = data_fingerprints
        self.out = Path(cfg.output)
        _seed_everything(cfg.seed)
        self.model = model = task.build_model(cfg, data)
        if cfg.vectors and state is None:
            tokens = data.state["vocab"]["tokens"]
            found = model.load_vectors(cfg.vectors, tokens)
            if ctx.is_main:
                print(f"packrnn: {found} of {len(tokens)} embedding rows from {cfg.vectors}",
                      file=sys.stderr)
        model.to(ctx.device)
        self.optimizer = _Adam(model, cfg)
        self.history: list[EpochMetrics] = []
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.accum = _empty_accum()
        if state is not None:
            model.load_state_dict(state["model_state"])
            self.optimizer.load_state_dict(state["optimizer_state"])
            self.history = _history(state, self.out)
            self.epoch, self.step = state["epoch"], state["step"]
            self.step_in_epoch = state["step_in_epoch"]
            self.accum = dict(state["epoch_accum"])
            rngs = state["rng"]
            if len(rngs) != ctx.world_size:
                raise TrainError(f"resume: expected a checkpoint of a run with {ctx.world_size} "
                                 f"process(es), got one with {len(rngs)}")
            _set_rng_state(rngs[ctx.rank])
        else:
            torch.manual_seed(cfg.seed + ctx.rank)  # dropout differs across ranks, repeatably
            if ctx.is_main and cfg.overwrite:
                _clear_run_files(self.out)
        if state is not None and ctx.is_main:
            # A kill between the epoch's checkpoint and its metrics.json must not lose the
            # epoch: the checkpoint's history is the truth, rewrite the files from it.
            _write_metrics(cfg, self.out, self.history)
        D.barrier(ctx)
        self.net: nn.Module = model
        if ctx.distributed:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if cfg.compile:  # the training steps only; evaluation runs the model eagerly
            self.net = compile_for_training(self.net)
        self.train_step = _Step(task, model, self.net, self.optimizer, cfg.grad_clip)

    def run(self, on_step: Callable[[int], None] | None,
            cleanup: contextlib.ExitStack) -> list[EpochMetrics]:
        cfg, ctx = self.cfg, self.ctx
        if self.epoch >= cfg.epochs:
            if ctx.is_main:
                print(f"packrnn: the run in {str(self.out)!r} already finished {self.epoch} "
                      "epoch(s)", file=sys.stderr)
            return self.history
        sampler = _train_sampler(cfg, self.data.train, ctx)
        collate = self.task.collate(cfg, self.data)
        if self.fresh:
            # The first file is a checkpoint, so the directory is a run from the start
            # (rundir.classify); its RNG states are those the first step starts from.
            self.checkpoint(0, 0, self.accum)
            if ctx.is_main:
                atomic_write_json(self.out / CONFIG_NAME, cfg.to_dict())
        self.stop = cleanup.enter_context(rundir.StopOnInterrupt())  # Ctrl-C: save after the step
        while self.epoch < cfg.epochs:
            batches = _epoch_batches(sampler, self.epoch)
            self._run_epoch(batches, collate, on_step)
            self._end_epoch()
            if self.epoch < cfg.epochs and self._stop_requested():  # Ctrl-C during evaluation
                raise self._interrupted(0, len(batches))
        return self.history

    def _train_step(self, batch: Any, total: int) -> StepStats:
        """One training step (``_Step``); a loss that is not finite stops the run."""
        loss_value, stats = self.train_step(batch, self.ctx.device)
        if not math.isfinite(loss_value):
            raise TrainError(
                f"loss: expected a finite number, got {loss_value} at step {self.step + 1} "
                f"(epoch {self.epoch + 1}, batch {self.step_in_epoch + 1} of {total}); stopped, "
                f"the checkpoint in {str(self.out)!r} holds the steps before it: lower --lr or "
                "set --grad-clip")
        return stats

    def _run_epoch(self, batches: list[list[int]], collate: Callable,
                   on_step: Callable[[int], None] | None) -> None:
        cfg, accum = self.cfg, self.accum
        loader = torch.utils.data.DataLoader(
            self.data.train, batch_sampler=batches[self.step_in_epoch:],
            num_workers=cfg.num_workers, collate_fn=collate,
            generator=torch.Generator().manual_seed(cfg.seed + self.epoch))
        bar = _progress(cfg, self.ctx, total=len(batches), initial=self.step_in_epoch,
                        epoch=self.epoch)
        bar_every = max(1, len(batches) // 100)  # distributed: sum the bar's figures this often
        # A function of the epoch alone, so a resumed run gets the same rate (no scheduler state).
        self.optimizer.set_lr(cfg.lr * cfg.lr_decay ** self.epoch)
        self.net.train()
        t0 = time.perf_counter()
        for batch in loader:
            stats = self._train_step(batch, len(batches))
            accum["loss_sum"] += stats.loss_sum
            accum["correct"] += stats.correct
            accum["count"] += stats.count
            self.step += 1
            self.step_in_epoch += 1
            if bar is not None:
                bar.update(1)
            if cfg.progress and (not self.ctx.distributed or self.step_in_epoch % bar_every == 0
                                 or self.step_in_epoch == len(batches)):
                # every rank joins the sum (same step counts on every rank); rank 0 shows it
                figures = _bar_figures(self.ctx, accum, accum["seconds"] + time.perf_counter() - t0,
                                       self.task.unit)
                if bar is not None:
                    bar.set_postfix(figures, refresh=False)
            if cfg.checkpoint_every_steps and self.step % cfg.checkpoint_every_steps == 0 \
                    and self.step_in_epoch < len(batches):
                now = time.perf_counter()
                self.checkpoint(self.epoch, self.step_in_epoch,
                                {**accum, "seconds": accum["seconds"] + now - t0})
                t0 -= time.perf_counter() - now  # checkpoint time is not training time
            if on_step is not None:
                on_step(self.step)
            if self._stop_requested():
                self.checkpoint(self.epoch, self.step_in_epoch,
                                {**accum, "seconds": accum["seconds"] + time.perf_counter() - t0})
                raise self._interrupted(self.step_in_epoch, len(batches))
        if bar is not None:
            bar.close()
        accum["seconds"] += time.perf_counter() - t0

    def _end_epoch(self) -> None:
        """Sum the epoch over ranks, score the test set, checkpoint, write metrics."""
        ctx, accum = self.ctx, self.accum
        loss_sum, correct, count = D.all_reduce_sum(
            ctx, [accum["loss_sum"], accum["correct"], accum["count"]])
        seconds = max(D.all_reduce_sum(ctx, [accum["seconds"]])[0] / ctx.world_size, 1e-9)
        test_acc = test_loss = None
        if self.data.test is not None:
            scores = self.task.evaluate(self.model, self.data.test, self.cfg, ctx)
            test_acc, test_loss = scores["accuracy"], scores.get("loss")
        self.epoch += 1
        self.history.append(EpochMetrics(
            epoch=self.epoch, train_loss=loss_sum / max(count, 1),
            train_accuracy=correct / max(count, 1), test_accuracy=test_acc, seconds=seconds,
            samples_per_second=count / seconds, samples=int(count), test_loss=test_loss))
        self.step_in_epoch = 0
        self.accum = _empty_accum()
        self.checkpoint(self.epoch, 0, self.accum)
        if ctx.is_main:
            _write_metrics(self.cfg, self.out, self.history)
            m = self.history[-1]
            rate = "samples/s" if self.task.unit == "texts" else f"{self.task.unit}/s"
            print(f"epoch {m.epoch}: train_loss {m.train_loss:.4f} train_accuracy "
                  f"{m.train_accuracy:.4f} test_loss "
                  f"{'-' if m.test_loss is None else f'{m.test_loss:.4f}'} test_accuracy "
                  f"{'-' if m.test_accuracy is None else f'{m.test_accuracy:.4f}'} "
                  f"({m.seconds:.1f} s, {m.samples_per_second:.0f} {rate})", file=sys.stderr)

    def checkpoint(self, epoch_done: int, in_epoch: int, acc: Mapping[str, float]) -> None:
        """Save everything an exact resume needs (NOTE [exact resume]); every rank calls it."""
        rngs = D.all_gather_objects(self.ctx, _rng_state())
        if self.ctx.is_main:
            save_checkpoint(self.out / CHECKPOINT_NAME, {
                **self.data.state,  # the task's vocabularies: "vocab", "labels", ...
                "model_config": self.model.config.to_dict(),
                "train_config": self.cfg.to_dict(),
                "model_state": self.model.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "epoch": epoch_done, "step": self.step, "step_in_epoch": in_epoch,
                "epoch_accum": dict(acc), "history": [asdict(m) for m in self.history],
                "rng": rngs, "world_size": self.ctx.world_size,
                "data_fingerprints": self.data_fingerprints,
            })
        D.barrier(self.ctx)

    def _stop_requested(self) -> bool:
        """Whether Ctrl-C asked to stop; under DDP every rank stops at the same step."""
        if not self.ctx.distributed:
            return self.stop.requested
        return D.all_reduce_sum(self.ctx, [float(self.stop.requested)])[0] > 0

    def _interrupted(self, in_epoch: int, total: int) -> rundir.TrainInterrupted:
        return rundir.TrainInterrupted(
            f"interrupted after step {self.step} (epoch {self.epoch + 1}, batch {in_epoch} of "
            f"{total}); checkpoint saved in {str(self.out)!r}: continue with "
            f"`packrnn train --resume --output {self.out}`")


class _Step:
    """What one training step does: the task's loss, backward, clipping, the optimizer step.

    ``net`` is what the step calls: the model, DDP-wrapped under torchrun, compiled with
    ``--compile`` (``compile_for_training``); ``model`` is the bare module (clipping).
    ``_Loop`` runs it; ``benchmarks/bench_compile.py`` times it, eager against compiled.
    Returns the loss's value and the batch's ``StepStats``; a loss that is not finite skips
    the update (the loop then stops the run).
    """

    def __init__(self, task: Task, model: nn.Module, net: nn.Module, optimizer: _Adam,
                 grad_clip: float | None) -> None:
        self.task, self.model, self.net = task, model, net
        self.optimizer, self.grad_clip = optimizer, grad_clip

    def __call__(self, batch: Any, device: torch.device) -> tuple[float, StepStats]:
        loss, stats = self.task.step(self.net, batch, device)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return loss_value, stats
        self.optimizer.zero_grad()
        loss.backward()
        if self.grad_clip is not None:
            _clip_grad_norm(self.model, self.grad_clip)
        self.optimizer.step()
        return loss_value, stats


# NOTE [compiled training]
# `--compile` compiles the module the steps call: its forward and, through AOTAutograd, its
# backward, with the recurrent layers as one opaque `packrnn::layer_forward` each. The rest of
# the step stays as in eager training, on purpose:
# - The optimizer step stays torch's fused Adam (`_Adam`): one vectorised pass per parameter
#   already, and the dense update over the embedding is most of a small model's step.
#   Compiling it (torch's "compiling the optimizer" recipe: `torch.compile(opt.step)` over the
#   non-fused Adam, which inductor fuses itself) measured slower on CPU than the fused kernel
#   (lesson size, 1 thread: 7.5 vs 6.3 ms a step), and compiling the fused one changes nothing.
# - `dynamic=True`: batches of every size share one graph from the first call (without it the
#   first call compiles for its exact sizes and the second recompiles). Inductor may still
#   specialise once on a size (e.g. a float sum over more or fewer than 4096 rows), so an
#   epoch compiles at most twice; `tests/test_compile.py` counts.
# - `fallback_random`: dropout draws with torch's generator (`bernoulli_`), as eager does.
#   Inductor's own CPU random numbers cost a Philox call per element in a scalar loop: on the
#   recommended model's embedding dropout (64 x 45 x 128 draws) about 5 ms more a step.
# - Scatter-adds: with more than one thread inductor compiles each as one atomic add per
#   element. The layers sort the batch with gathers both ways (NOTE [Permuting the batch] in
#   rnn.py). The embedding's gradient stays inductor's scatter: ATen's embedding_dense_backward
#   instead (a decomposition removed from the table) measured slower (B=16 lesson batch, 2
#   threads: 0.69 vs 0.44 ms), and so did inductor's kernels on one thread (`cpp.threads=1`:
#   fewer OpenMP regions, but the recommended model's step 0.96x eager instead of 1.03x).
def compile_for_training(net: nn.Module) -> nn.Module:
    """``torch.compile`` of the module a training step calls (NOTE [compiled training])."""
    return torch.compile(net, dynamic=True, options={"fallback_random": True})


def _empty_accum() -> dict[str, float]:
    """The running sums of an epoch (saved in checkpoints as ``epoch_accum``)."""
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "seconds": 0.0}


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

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
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


def _bar_figures(ctx: D.DistContext, accum: Mapping[str, float], elapsed: float,
                 unit: str = "texts") -> dict[str, str]:
    """The progress bar's loss, accuracy and rate of the epoch so far, over all ranks.

    A collective under torchrun: every rank must call it at the same steps. ``unit``: the
    task's (``Task.unit``); texts are shown as samples/s, tokens as tokens/s.
    """
    loss_sum, correct, count = D.all_reduce_sum(
        ctx, [accum["loss_sum"], accum["correct"], accum["count"]])
    count = max(count, 1.0)
    rate = "samples_s" if unit == "texts" else f"{unit}_s"
    return {"loss": f"{loss_sum / count:.4f}", "acc": f"{correct / count:.3f}",
            rate: f"{count / max(elapsed, 1e-9):.0f}"}


def _run_title(cfg: TrainConfig) -> str:
    """The run's model in a few words, e.g. "bidirectional 2-layer LSTM 128, max pooling (runs/x)"."""
    words = ["bidirectional"] if cfg.bidirectional else []
    words += [f"{cfg.num_layers}-layer"] if cfg.num_layers > 1 else []
    words += [f"{cfg.model.upper()} {cfg.hidden_size}{get_task(cfg.task).describe(cfg)}"]
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
# reading a run back: evaluation and prediction (the task does the work)
# ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A trained (or interrupted) run read back from its directory by ``load_run``."""

    directory: Path  # the run's output directory
    model: nn.Module  # in eval mode: a SequenceClassifier for task "classify"
    vocab: Any  # packrnn.data.Vocab of the training file
    labels: list[str]  # label (or tag) names; the model's class i is labels[i]
    config: TrainConfig  # the run's training config
    epochs_done: int  # finished epochs
    history: list[EpochMetrics]  # metrics of the finished epochs
    char_vocab: Any = None  # task "tag" with char_features: the characters' Vocab

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
        tcfg = TrainConfig.from_dict(state["train_config"])
        vocab = Vocab.from_dict(state["vocab"])
        model = get_task(tcfg.task).model_from_state(state)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint in {str(path)!r} is inconsistent and cannot be used "
                              f"({first})") from e
    history = _history(state, path)
    model.to(device).eval()
    chars = state.get("char_vocab")
    return Run(directory=path, model=model, vocab=vocab, labels=[str(n) for n in state["labels"]],
               config=tcfg, epochs_done=int(state["epoch"]), history=history,
               char_vocab=Vocab.from_dict(chars) if chars else None)


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
        ``loss`` is the mean cross-entropy. A tagger (task ``"tag"``) counts tokens and adds
        ``"macro_f1"`` (``macro["f1"]``); a language model (``"lm"``) returns ``{"count", "loss",
        "perplexity", "bits_per_token", "accuracy", "level", "skipped"}`` (and
        ``"bits_per_char"`` at character level).

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
    return get_task(cfg.task).evaluate_file(run, cfg, os.fspath(path), batch_size)


def predict(run: Run | str | os.PathLike, texts: Sequence[Any], batch_size: int = 256
            ) -> list[dict[str, Any]]:
    """Label each text: ``[{"text", "label", "probability", "probabilities"}, ...]``.

    ``probability`` is the softmax probability of the predicted ``label``;
    ``probabilities`` maps every label to its probability. A text with no known tokens is
    still classified (from the model's state for an empty or all-<unk> sequence).

    A tagger (task ``"tag"``) takes sentences (a str split on whitespace, or a list of
    tokens) and returns ``[{"tokens", "tags", "probabilities"}, ...]``, one tag and its
    probability per token. A language model has no ``predict``: see ``generate``.
    """
    run = _as_run(run)
    if isinstance(texts, str):
        raise TypeError("texts: expected a list of str, got a str (wrap it in a list)")
    return get_task(run.config.task).predict(run, list(texts), batch_size)


def generate(run: Run | str | os.PathLike, prefix: str = "", max_new: int = 100, *,
             temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> str:
    """Continue ``prefix`` with a trained language model (task ``"lm"``); returns the whole text.

    The prefix is split like the training texts (characters, or words by the run's tokenizer;
    unknown units become ``<unk>``), then ``LanguageModel.generate`` samples up to ``max_new``
    units step by step, stopping at ``<eos>``. Characters are joined as they are, words with
    spaces.

    Args:
        run: a ``Run`` or its directory. prefix (str): the start of the text. Default: "".
        max_new (int): at most this many new characters or words. Default: 100.
        temperature (float): > 0 samples, 0 is greedy. Default: 1.0.
        top_k (int, optional): sample among the likeliest ``top_k`` only.
        seed (int, optional): same seed, same text.

    >>> generate("runs/charlm", "Stocks ", max_new=40, seed=0)  # doctest: +SKIP
    'Stocks rise as oil prices fall'
    """
    run = _as_run(run)
    if run.config.task != "lm":
        raise ValueError(f"run: expected a run of task 'lm', got task {run.config.task!r}")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix: expected a str, got {type(prefix).__name__}")
    from .data.language_modeling import split_text

    units = split_text(prefix, run.config.level, _tokenizer(run.config))
    new = run.model.generate(run.vocab(units), max_new, temperature=temperature, top_k=top_k,
                             seed=seed)
    words = run.vocab.lookup_tokens(new)
    if run.config.level == "char":
        return prefix + "".join(words)
    return " ".join([prefix.rstrip(), *words]).strip() if prefix.strip() else " ".join(words)
