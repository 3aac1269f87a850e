"""Text classification: one label per text, a ``SequenceClassifier``, cross-entropy over texts.

Files: AG News CSV, CSV/TSV with a header, JSONL (``TrainConfig.format``), read by
``packrnn.data.load_text_classification``. Metrics: accuracy, loss, per-class precision, recall
and F1 with their macro averages, confusion matrix.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..data import (BucketBatchSampler, Collate, LabelMap, TextClassificationDataset, Vocab,
                    get_tokenizer, load_text_classification)
from ..models import ModelConfig, SequenceClassifier
from .base import StepStats, TaskData

if TYPE_CHECKING:
    from ..train import Run, TrainConfig

__all__ = ["ClassifyTask"]


class _Truncate:
    """A picklable tokenizer that keeps the first ``max_length`` tokens."""

    def __init__(self, tokenizer: Callable[[str], list[str]], max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text: str) -> list[str]:
        return self.tokenizer(text)[: self.max_length]


def tokenizer(cfg: TrainConfig) -> Callable[[str], list[str]]:
    """The run's tokenizer, truncating to ``cfg.max_length`` if set."""
    tok = get_tokenizer(cfg.tokenizer)
    return _Truncate(tok, cfg.max_length) if cfg.max_length else tok


def read_options(cfg: TrainConfig, path: str) -> tuple[str, dict[str, Any]]:
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
    fmt, options = read_options(cfg, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_text_classification(
            path, fmt, tokenizer=tokenizer(cfg), vocab=vocab, label_map=label_map,
            min_freq=cfg.min_freq, max_size=cfg.max_vocab_size, skip_bad_rows=cfg.skip_bad_rows,
            progress=progress, **options)


def _collate(cfg: TrainConfig, pad: int, inference: bool = False) -> Collate:
    # Compiled training takes padded ids + lengths: packing has data-dependent shapes. So does
    # inference: an eval-mode classifier on CPU then runs as one operator (NOTE [fused
    # inference] in models.py), and elsewhere packs the batch itself, to the same numbers.
    packed = cfg.execution == "packed" and not cfg.compile and not inference
    return Collate(packed=packed, padding_value=pad, batch_first=True)


def sum_over_ranks(ctx: D.DistContext | None, confusion: Tensor, loss_sum: float
                   ) -> tuple[Tensor, float]:
    """An evaluation's (K, K) confusion matrix and summed loss, summed over the ranks of a
    distributed run (each rank scored its shard); as they are otherwise."""
    if ctx is None or not ctx.distributed:
        return confusion, loss_sum
    flat = D.all_reduce_sum(ctx, confusion.flatten().tolist() + [loss_sum])
    return torch.tensor(flat[:-1], dtype=torch.float64).view(confusion.shape), flat[-1]


class ClassifyTask:
    """One label per text (see ``packrnn.tasks.base.Task`` for the interface)."""

    name = "classify"
    unit = "texts"

    def load_data(self, cfg: TrainConfig, saved: Mapping[str, Any] | None,
                  progress: bool | None) -> TaskData:
        if saved is not None:  # the vocabulary and labels the weights were trained with
            train = _load(cfg, cfg.train_path, Vocab.from_dict(saved["vocab"]),
                          LabelMap(saved["labels"]), progress=progress)
        else:
            train = _load(cfg, cfg.train_path, progress=progress)
        test = (_load(cfg, cfg.test_path, train.vocab, train.label_map, progress=progress)
                if cfg.test_path else None)
        summary = (f"{len(train)} training texts, {len(train.label_map)} labels, "
                   f"vocabulary of {len(train.vocab)}")
        if test is not None:
            summary += f", {len(test)} test texts"
        untrained = untrained_labels(train, test)
        notes = [f"{cfg.test_path} has labels no training row has: "
                    + ", ".join(f"{n!r} ({k} rows)" for n, k in untrained.items())
                    + "; the model never learns these classes"] if untrained else []
        return TaskData(train, test, {"vocab": train.vocab.to_dict(),
                                      "labels": list(train.label_map.names)}, summary, notes)

    def build_model(self, cfg: TrainConfig, data: TaskData) -> SequenceClassifier:
        vocab = data.train.vocab
        model = SequenceClassifier(cfg.model_config(len(vocab), len(data.train.label_map),
                                                    vocab.pad_index))
        return model

    def collate(self, cfg: TrainConfig, data: TaskData) -> Collate:
        pad = data.train.vocab.pad_index
        return _collate(cfg, pad if pad is not None else 0)

    def step(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, StepStats]:
        inputs, lengths, labels = batch
        inputs, labels = inputs.to(device), labels.to(device)
        packed = not isinstance(inputs, Tensor)
        logits = net(inputs) if packed else net(inputs, lengths)  # (B, C)
        loss = nn.functional.cross_entropy(logits, labels)
        n = labels.numel()
        return loss, StepStats(loss_sum=float(loss.detach()) * n,
                               correct=float((logits.detach().argmax(-1) == labels).sum()),
                               count=n)

    @torch.no_grad()
    def evaluate(self, model: SequenceClassifier, dataset: TextClassificationDataset,
                 cfg: TrainConfig, ctx: D.DistContext | None = None,
                 batch_size: int | None = None) -> dict[str, Any]:
        """Confusion matrix, derived scores and mean cross-entropy (``"loss"``) of ``model`` on
        ``dataset`` (sharded over ranks)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        num_classes = model.config.num_classes
        # Sorted by length (little padding); the packed results do not depend on the batching.
        sampler = BucketBatchSampler(dataset.lengths, batch_size or cfg.eval_batch_size,
                                     shuffle=False)
        batches = sampler.batches(0)
        if ctx is not None and ctx.distributed:
            batches = batches[ctx.rank::ctx.world_size]
        collate = _collate(cfg, model.config.padding_idx or 0, inference=True)
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # (true, predicted)
        loss_sum = 0.0
        for batch in batches:
            inputs, lengths, labels = collate([dataset[i] for i in batch])
            logits = model(inputs.to(device), lengths)  # (B, C)
            loss_sum += float(nn.functional.cross_entropy(logits.float(), labels.to(device),
                                                          reduction="sum"))
            pred = logits.argmax(-1).cpu()  # (B,)
            confusion.index_put_((labels, pred), torch.ones(len(batch), dtype=torch.float64),
                                 accumulate=True)
        confusion, loss_sum = sum_over_ranks(ctx, confusion, loss_sum)
        model.train(was_training)
        result = scores(confusion)
        result["loss"] = loss_sum / result["count"] if result["count"] else float("nan")
        return result

    def model_from_state(self, state: Mapping[str, Any]) -> SequenceClassifier:
        model = SequenceClassifier(ModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model_state"])
        check_label_names(state["labels"], model.config.num_classes)
        return model

    def evaluate_file(self, run: Run, cfg: TrainConfig, path: str, batch_size: int
                      ) -> dict[str, Any]:
        ds = _load(cfg, path, run.vocab, LabelMap(run.labels))
        result = self.evaluate(run.model, ds, cfg, batch_size=batch_size)
        result["labels"] = list(run.labels)
        result["skipped"] = len(ds.skipped)
        return result

    @torch.no_grad()
    def predict(self, run: Run, inputs: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
        for i, t in enumerate(inputs):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected a str, got {type(t).__name__}")
        tok = tokenizer(run.config)
        pad = run.vocab.pad_index if run.vocab.pad_index is not None else 0
        collate = _collate(run.config, pad, inference=True)
        device = next(run.model.parameters()).device
        run.model.eval()
        results: list[dict[str, Any]] = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            ids, lengths, _ = collate([torch.tensor(run.vocab(tok(t)), dtype=torch.int64)
                                       for t in chunk])
            logits = run.model(ids.to(device), lengths)  # (B, C)
            probs = torch.softmax(logits.float(), dim=-1).cpu()  # (B, C)
            for t, p in zip(chunk, probs):
                k = int(p.argmax())
                results.append({"text": t, "label": run.labels[k], "probability": float(p[k]),
                                "probabilities": {name: float(q) for name, q in
                                                  zip(run.labels, p)}})
        return results

    def describe(self, cfg: TrainConfig) -> str:
        return f", {cfg.pooling} pooling"


def untrained_labels(train: TextClassificationDataset,
                     test: TextClassificationDataset | None) -> dict[str, int]:
    """Labels with test rows but no training row (AG News: a class missing from the training
    file), with their number of test rows: the model never learns them."""
    if test is None:
        return {}
    trained = set(train.labels)
    counts: dict[str, int] = {}
    for y in test.labels:
        if y not in trained:
            name = train.label_map.names[y]
            counts[name] = counts.get(name, 0) + 1
    return counts


def check_label_names(labels: Sequence[Any], num_classes: int) -> None:
    """A checkpoint's label (or tag) names must name every class of its model."""
    if len(labels) != num_classes:
        raise ValueError(f"labels: expected {num_classes} label names (the model's classes), "
                         f"got {len(labels)}")


def scores(confusion: Tensor) -> dict[str, Any]:
    """Accuracy, per-class precision / recall / F1 and their macro averages from a (true,
    predicted) confusion matrix.

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
