"""Language modelling: predict the next character or word, a ``LanguageModel``, cross-entropy.

Files: a text file (a text per line) or a column of AG News / CSV / TSV / JSONL
(``packrnn.data.language_modeling``). Each text is ``<bos> x_1 .. x_n <eos>``; the model reads
``<bos> x_1 .. x_n`` and is scored on ``x_1 .. x_n <eos>``, packed, so the loss is a plain
cross-entropy over ``output.data``. Metrics: loss (nats per token), perplexity, bits per token
(bits per character for ``level="char"``), next-token accuracy.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .. import distributed as D
from ..data import (IGNORE_INDEX, BucketBatchSampler, LanguageModelDataset, TokenBatch,
                    TokenCollate, Vocab, load_language_modeling)
from ..language_model import LanguageModel, LanguageModelConfig
from .base import StepStats, TaskData
from .classify import read_options
from .tag import token_cross_entropy

if TYPE_CHECKING:
    from ..train import Run, TrainConfig

__all__ = ["LanguageModelTask"]


def _load(cfg: TrainConfig, path: str, vocab: Vocab | None = None) -> LanguageModelDataset:
    fmt, options = read_options(cfg, path)
    with warnings.catch_warnings():  # train() prints its own one-line summary of skipped rows
        warnings.simplefilter("ignore", UserWarning)
        return load_language_modeling(path, fmt, level=cfg.level, tokenizer=cfg.tokenizer,
                                      vocab=vocab, min_freq=cfg.min_freq,
                                      max_size=cfg.max_vocab_size, max_length=cfg.max_length,
                                      skip_bad_rows=cfg.skip_bad_rows, **options)


def _forward(net: nn.Module, batch: TokenBatch, device: torch.device) -> tuple[Tensor, Tensor]:
    """Logits (M, V) and targets (M,): packed rows (M = N) or a flattened padded batch."""
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    if isinstance(inputs, Tensor):  # padded, batch first: (B, T)
        logits, _ = net(inputs, batch.lengths)  # (B, T, V)
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    logits, _ = net(inputs)  # PackedSequence (N, V), rows aligned with targets.data
    return logits.data, targets.data


def _collate(cfg: TrainConfig, vocab: Vocab) -> TokenCollate:
    return TokenCollate(packed=cfg.execution == "packed", padding_value=vocab.pad_index or 0,
                        batch_first=True)


class LanguageModelTask:
    """The next token at every step (see ``packrnn.tasks.base.Task`` for the interface)."""

    name = "lm"
    unit = "tokens"

    def load_data(self, cfg: TrainConfig, saved: Mapping[str, Any] | None,
                  progress: bool | None) -> TaskData:
        vocab = Vocab.from_dict(saved["vocab"]) if saved is not None else None
        train = _load(cfg, cfg.train_path, vocab)
        test = _load(cfg, cfg.test_path, train.vocab) if cfg.test_path else None
        unit = "characters" if cfg.level == "char" else "words"
        summary = (f"{len(train)} training texts ({train.num_tokens} {unit} with <eos>), "
                   f"vocabulary of {len(train.vocab)}")
        if test is not None:
            summary += f", {len(test)} test texts"
        return TaskData(train, test, {"vocab": train.vocab.to_dict(), "labels": []}, summary)

    def build_model(self, cfg: TrainConfig, data: TaskData) -> LanguageModel:
        vocab: Vocab = data.train.vocab
        return LanguageModel(LanguageModelConfig(
            vocab_size=len(vocab), embed_dim=cfg.embed_dim, hidden_size=cfg.hidden_size,
            cell=cfg.model, num_layers=cfg.num_layers, dropout=float(cfg.dropout),
            embed_dropout=float(cfg.embed_dropout), execution=cfg.execution,
            padding_idx=vocab.pad_index, tie_weights=cfg.tie_weights,
            unk_index=vocab.unk_index, bos_index=vocab["<bos>"], eos_index=vocab["<eos>"]))

    def collate(self, cfg: TrainConfig, data: TaskData) -> TokenCollate:
        return _collate(cfg, data.train.vocab)

    def step(self, net: nn.Module, batch: TokenBatch, device: torch.device
             ) -> tuple[Tensor, StepStats]:
        logits, targets = _forward(net, batch, device)  # (M, V), (M,)
        loss, real = token_cross_entropy(logits, targets)
        n = int(real.sum())
        correct = float(((logits.detach().argmax(-1) == targets) & real).sum())
        return loss, StepStats(loss_sum=float(loss.detach()) * n, correct=correct, count=n)

    @torch.no_grad()
    def evaluate(self, model: LanguageModel, dataset: LanguageModelDataset, cfg: TrainConfig,
                 ctx: D.DistContext | None = None, batch_size: int | None = None
                 ) -> dict[str, Any]:
        """Loss (nats per token), perplexity, bits per token (sharded over ranks)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sampler = BucketBatchSampler(dataset.lengths, batch_size or cfg.eval_batch_size,
                                     shuffle=False)
        batches = sampler.batches(0)
        if ctx is not None and ctx.distributed:
            batches = batches[ctx.rank::ctx.world_size]
        collate = _collate(cfg, dataset.vocab)
        loss_sum = correct = count = 0.0
        for batch in batches:
            logits, targets = _forward(model, collate([dataset[i] for i in batch]), device)
            real = targets != IGNORE_INDEX
            loss_sum += float(nn.functional.cross_entropy(
                logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            correct += float(((logits.argmax(-1) == targets) & real).sum())
            count += float(real.sum())
        if ctx is not None and ctx.distributed:
            loss_sum, correct, count = D.all_reduce_sum(ctx, [loss_sum, correct, count])
        model.train(was_training)
        loss = loss_sum / count if count else float("nan")
        result = {"count": int(count), "loss": loss, "perplexity": math.exp(loss),
                  "bits_per_token": loss / math.log(2), "accuracy": correct / count if count
                  else float("nan"), "level": dataset.level}
        if dataset.level == "char":
            result["bits_per_char"] = result["bits_per_token"]
        return result

    def model_from_state(self, state: Mapping[str, Any]) -> LanguageModel:
        model = LanguageModel(LanguageModelConfig.from_dict(state["model_config"]))
        model.load_state_dict(state["model_state"])
        return model

    def evaluate_file(self, run: Run, cfg: TrainConfig, path: str, batch_size: int
                      ) -> dict[str, Any]:
        ds = _load(cfg, path, run.vocab)
        result = self.evaluate(run.model, ds, cfg, batch_size=batch_size)
        result["skipped"] = len(ds.skipped)
        return result

    def predict(self, run: Run, inputs: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
        raise ValueError("predict: expected a run of task 'classify' or 'tag', got task 'lm' "
                         "(use generate to continue a text)")

    def describe(self, cfg: TrainConfig) -> str:
        return (f" {'character' if cfg.level == 'char' else 'word'}-level language model"
                + (", tied weights" if cfg.tie_weights else ""))
