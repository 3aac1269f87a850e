"""Sequence tagging: a tag per token, a ``SequenceTagger``, cross-entropy over the real tokens.

Files: CoNLL-U (UPOS or XPOS), CoNLL columns, JSONL token/tag lists (``packrnn.data.tagging``).
The loss of a packed batch is ``cross_entropy(logits.data, targets.data)``: the rows are the
real tokens, targets aligned row for row (NOTE [aligned targets] in ``packrnn.data.collate``);
a padded batch masks its padding with ``IGNORE_INDEX``. Metrics: token accuracy, loss (mean
cross-entropy per token), per-tag precision / recall / F1 with their macro averages, confusion
matrix.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..data import (IGNORE_INDEX, BucketBatchSampler, LabelMap, TaggingDataset, TokenBatch,
                    TokenCollate, Vocab, load_tagging)
from ..data.collate import Batch
from ..packing import pad_packed_sequence
from ..tagger import SequenceTagger, TaggerConfig
from .base import StepStats, TaskData
from .classify import check_label_names, scores, sum_over_ranks

if TYPE_CHECKING:
    from ..train import Run, TrainConfig

__all__ = ["TagTask", "token_cross_entropy", "tag_scores"]


def _load(cfg: TrainConfig, path: str, vocab: Vocab | None = None, tag_map: LabelMap | None = None,
          char_vocab: Vocab | None = None) -> TaggingDataset:
    options: dict[str, Any] = {}
    if cfg.format == "conllu":
        options["tagset"] = cfg.tagset
    elif cfg.format == "conll":
        options.update(token_column=cfg.token_column, tag_column=cfg.tag_column,
                       delimiter=cfg.delimiter)
    else:  # jsonl
        options.update(tokens_key=cfg.text_column or "tokens", tags_key=cfg.label_column or "tags")
    with warnings.catch_warnings():  # train() prints its own one-line summary of skipped rows
        warnings.simplefilter("ignore", UserWarning)
        return load_tagging(path, cfg.format, vocab=vocab, tag_map=tag_map, char_vocab=char_vocab,
                            chars=cfg.char_features, lowercase=cfg.lowercase,
                            min_freq=cfg.min_freq, max_size=cfg.max_vocab_size,
                            skip_bad_rows=cfg.skip_bad_rows, **options)


def token_cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over real tokens and the mask of those tokens.

    ``logits`` (M, C) and ``targets`` (M,): the ``.data`` of a packed batch (every row real)
    or a flattened padded batch whose padding holds ``IGNORE_INDEX``. An empty batch (all
    sequences of length 0) gives a zero loss that still backpropagates.
    """
    real = targets != IGNORE_INDEX  # (M,)
    if not bool(real.any()):
        return logits.sum() * 0.0, real
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX), real


def _on(batch: TokenBatch, device: torch.device) -> TokenBatch:
    chars = batch.chars
    if chars is not None:
        chars = Batch(chars.inputs.to(device), chars.lengths, None)
    return TokenBatch(batch.inputs.to(device), batch.lengths, batch.targets.to(device), chars)


def _forward(net: nn.Module, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """Logits (M, K) and targets (M,) of a packed batch (M = N) or a padded one (M = B*T)."""
    if isinstance(batch.inputs, Tensor):  # padded, batch first
        logits = net(batch.inputs, batch.lengths, chars=batch.chars)  # (B, T, K)
        return logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1)
    return net(batch.inputs, chars=batch.chars).data, batch.targets.data  # (N, K), (N,)


class TagTask:
    """One tag per token (see ``packrnn.tasks.base.Task`` for the interface)."""

    name = "tag"
    unit = "tokens"

    def load_data(self, cfg: TrainConfig, saved: Mapping[str, Any] | None,
                  progress: bool | None) -> TaskData:
        if saved is not None:  # the vocabularies the weights were trained with
            char_vocab = saved.get("char_vocab")
            train = _load(cfg, cfg.train_path, Vocab.from_dict(saved["vocab"]),
                          LabelMap(saved["labels"]),
                          Vocab.from_dict(char_vocab) if char_vocab else None)
        else:
            train = _load(cfg, cfg.train_path)
        test = (_load(cfg, cfg.test_path, train.vocab, train.tag_map, train.char_vocab)
                if cfg.test_path else None)
        summary = (f"{len(train)} training sentences ({train.num_tokens} tokens), "
                   f"{len(train.tag_map)} tags, vocabulary of {len(train.vocab)}")
        if train.char_vocab is not None:
            summary += f", {len(train.char_vocab)} characters"
        if test is not None:
            summary += f", {len(test)} test sentences ({test.num_tokens} tokens)"
        state = {"vocab": train.vocab.to_dict(), "labels": list(train.tag_map.names),
                 "char_vocab": train.char_vocab.to_dict() if train.char_vocab else None}
        return TaskData(train, test, state, summary)

    def build_model(self, cfg: TrainConfig, data: TaskData) -> SequenceTagger:
        train: TaggingDataset = data.train
        chars = train.char_vocab
        return SequenceTagger(TaggerConfig(
            vocab_size=len(train.vocab), num_tags=len(train.tag_map), embed_dim=cfg.embed_dim,
            hidden_size=cfg.hidden_size, cell=cfg.model, num_layers=cfg.num_layers,
            bidirectional=cfg.bidirectional, dropout=float(cfg.dropout),
            embed_dropout=float(cfg.embed_dropout), execution=cfg.execution,
            padding_idx=train.vocab.pad_index, freeze_embedding=cfg.freeze_embedding,
            sparse_embedding=cfg.sparse_embedding,
            char_vocab_size=len(chars) if chars is not None else 0,
            char_embed_dim=cfg.char_embed_dim, char_hidden_size=cfg.char_hidden_size,
            char_padding_idx=chars.pad_index if chars is not None else None))

    def collate(self, cfg: TrainConfig, data: TaskData) -> TokenCollate:
        return _collate(cfg, data.train.vocab, data.train.char_vocab)

    def step(self, net: nn.Module, batch: TokenBatch, device: torch.device
             ) -> tuple[Tensor, StepStats]:
        logits, targets = _forward(net, _on(batch, device))  # (M, K), (M,)
        loss, real = token_cross_entropy(logits, targets)
        n = int(real.sum())
        correct = float(((logits.detach().argmax(-1) == targets) & real).sum())
        return loss, StepStats(loss_sum=float(loss.detach()) * n, correct=correct, count=n)

    @torch.no_grad()
    def evaluate(self, model: SequenceTagger, dataset: TaggingDataset, cfg: TrainConfig,
                 ctx: D.DistContext | None = None, batch_size: int | None = None
                 ) -> dict[str, Any]:
        """Token accuracy, loss, per-tag precision/recall/F1, macro F1 (sharded over ranks)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        k = model.config.num_tags
        sampler = BucketBatchSampler(dataset.lengths, batch_size or cfg.eval_batch_size,
                                     shuffle=False)
        batches = sampler.batches(0)
        if ctx is not None and ctx.distributed:
            batches = batches[ctx.rank::ctx.world_size]
        collate = _collate(cfg, dataset.vocab, dataset.char_vocab)
        confusion = torch.zeros(k, k, dtype=torch.float64)  # (true, predicted)
        loss_sum = 0.0
        for batch in batches:
            logits, targets = _forward(model, _on(collate([dataset[i] for i in batch]), device))
            real = targets != IGNORE_INDEX  # (M,)
            loss_sum += float(nn.functional.cross_entropy(
                logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            pred = logits.argmax(-1)[real].cpu()
            confusion.index_put_((targets[real].cpu(), pred),
                                 torch.ones(pred.numel(), dtype=torch.float64), accumulate=True)
        confusion, loss_sum = sum_over_ranks(ctx, confusion, loss_sum)
        model.train(was_training)
        result = tag_scores(confusion)
        result["loss"] = loss_sum / result["count"] if result["count"] else float("nan")
        return result

    def model_from_state(self, state: Mapping[str, Any]) -> SequenceTagger:
        model = SequenceTagger(TaggerConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model_state"])
        check_label_names(state["labels"], model.config.num_tags)
        return model

    def evaluate_file(self, run: Run, cfg: TrainConfig, path: str, batch_size: int
                      ) -> dict[str, Any]:
        ds = _load(cfg, path, run.vocab, LabelMap(run.labels), run.char_vocab)
        result = self.evaluate(run.model, ds, cfg, batch_size=batch_size)
        result["labels"] = list(run.labels)
        result["skipped"] = len(ds.skipped)
        return result

    @torch.no_grad()
    def predict(self, run: Run, inputs: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
        """Tag sentences: each a str (split on whitespace) or a list of tokens."""
        sentences = []
        for i, s in enumerate(inputs):
            if isinstance(s, str):
                sentences.append(s.split())
            elif isinstance(s, (list, tuple)) and all(isinstance(t, str) for t in s):
                sentences.append(list(s))
            else:
                raise TypeError(f"texts[{i}]: expected a str or a list of str tokens, got "
                                f"{type(s).__name__}")
        cfg, model = run.config, run.model
        collate = _collate(cfg, run.vocab, run.char_vocab)
        device = next(model.parameters()).device
        model.eval()
        results: list[dict[str, Any]] = []
        for start in range(0, len(sentences), batch_size):
            chunk = sentences[start:start + batch_size]
            items = []
            for tokens in chunk:
                words = torch.tensor(run.vocab([t.lower() for t in tokens] if cfg.lowercase
                                               else tokens), dtype=torch.int64)
                item = (words, torch.zeros_like(words))
                if run.char_vocab is not None:
                    item += ([torch.tensor(run.char_vocab(list(t)), dtype=torch.int64)
                              for t in tokens],)
                items.append(item)
            batch = _on(collate(items), device)
            padded = isinstance(batch.inputs, Tensor)
            logits = (model(batch.inputs, batch.lengths, chars=batch.chars) if padded
                      else model(batch.inputs, chars=batch.chars))
            if not padded:  # back to (B, T, K) in item order
                logits, _ = pad_packed_sequence(logits, batch_first=True)
            probs = torch.softmax(logits.float(), dim=-1).cpu()  # (B, T, K)
            for b, tokens in enumerate(chunk):
                p, k = probs[b, :len(tokens)].max(-1) if tokens else (torch.zeros(0), torch.zeros(0))
                results.append({"tokens": tokens, "tags": [run.labels[int(j)] for j in k],
                                "probabilities": [float(x) for x in p]})
        return results

    def describe(self, cfg: TrainConfig) -> str:
        return " tagger" + (", character features" if cfg.char_features else "")


def _collate(cfg: TrainConfig, vocab: Vocab, char_vocab: Vocab | None) -> TokenCollate:
    pad = vocab.pad_index if vocab.pad_index is not None else 0
    char_pad = char_vocab.pad_index if char_vocab is not None else None
    return TokenCollate(packed=cfg.execution == "packed", padding_value=pad,
                        char_padding_value=char_pad or 0, batch_first=True)


def tag_scores(confusion: Tensor) -> dict[str, Any]:
    """``scores`` of a (true, predicted) confusion matrix plus ``macro_f1``.

    F1 of a tag is ``2PR / (P + R)`` (0 when both are 0), ``None`` for a tag neither in the
    data nor predicted; ``macro_f1`` is the mean over the other tags (``macro["f1"]``; NaN
    when there are none).
    """
    out = scores(confusion)
    macro_f1 = out["macro"]["f1"]
    out["macro_f1"] = float("nan") if macro_f1 is None else macro_f1
    return out
