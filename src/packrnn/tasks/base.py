"""What a task must provide to the training loop (``packrnn.train``): data, model, loss, metrics.

The loop owns epochs, steps, the optimizer, checkpoints and exact resume, DDP, the progress bar,
``metrics.json`` and ``curves.png``; it never looks inside a batch. A task owns everything that
depends on what is predicted (a label per text, a tag per token, the next token):

=====================  ======================================================================
``load_data``          read the training (and test) file into data sets whose ``lengths``
                       the batch samplers use; build or restore the vocabularies
``build_model``        the ``nn.Module`` (with a ``.config`` that has ``to_dict``)
``collate``            the DataLoader's ``collate_fn``: items -> one batch
``step``               forward one batch and return the mean loss and its ``StepStats``
``evaluate``           scores of a model on a data set (``"accuracy"`` at least, and
                       ``"loss"`` where the task has one: the epoch's test loss)
``model_from_state``   rebuild the trained model from a checkpoint (``load_run``)
``evaluate_file``      ``packrnn.train.evaluate``: read a file like the training file, score it
``predict``            ``packrnn.train.predict``: the model's output for raw inputs
``describe``           the model in a few words for the plot's title (after "LSTM 32")
=====================  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # the tasks and the loop import each other only for types
    from .. import distributed as D
    from ..train import Run, TrainConfig

__all__ = ["Task", "TaskData", "StepStats"]


@dataclass
class StepStats:
    """What one batch adds to the epoch's running sums (the loop sums them over ranks)."""

    loss_sum: float  # the batch's mean loss times `count`
    correct: float  # predictions right (labels, tags or next tokens)
    count: int  # what the loss averages over: texts (classify) or tokens (tag, lm)


@dataclass
class TaskData:
    """A task's data sets and the vocabularies the checkpoint keeps with the model."""

    train: Any  # a map-style Dataset with `.lengths` (one int per item) and `.skipped`
    test: Any | None  # same kind, or None without a test file
    # Checkpoint entries that rebuild the task's encoders: at least "vocab" (Vocab.to_dict()) and
    # "labels" (class or tag names; [] for a language model), plus any task-specific ones.
    state: dict[str, Any] = field(default_factory=dict)
    summary: str = ""  # one line for the log: "240 training texts, 4 labels, vocabulary of 100"
    warnings: list[str] = field(default_factory=list)  # lines the log prints as warnings


class Task(Protocol):
    """The interface the training loop calls; ``packrnn.tasks.classify`` is the model to read."""

    name: str  # "classify", "tag" or "lm": TrainConfig.task
    unit: str  # what `StepStats.count` counts, for the log: "texts" or "tokens"

    def load_data(self, cfg: TrainConfig, saved: Mapping[str, Any] | None,
                  progress: bool | None) -> TaskData:
        """Read cfg.train_path (and cfg.test_path); ``saved``: a checkpoint to resume from,
        whose vocabularies must be reused."""

    def build_model(self, cfg: TrainConfig, data: TaskData) -> nn.Module:
        """A freshly initialised model (the loop seeds the RNG before calling)."""

    def collate(self, cfg: TrainConfig, data: TaskData) -> Callable[[list], Any]:
        """A picklable ``collate_fn`` turning a list of data set items into one batch."""

    def step(self, net: nn.Module, batch: Any, device: torch.device) -> tuple[Tensor, StepStats]:
        """Forward ``batch`` through ``net`` (maybe DDP-wrapped); the mean loss to minimise."""

    def evaluate(self, model: nn.Module, dataset: Any, cfg: TrainConfig,
                 ctx: D.DistContext | None = None, batch_size: int | None = None
                 ) -> dict[str, Any]:
        """Scores on ``dataset`` (sharded over ranks when ``ctx`` is distributed); the loop
        records ``["accuracy"]`` as the epoch's test accuracy and ``["loss"]`` (if present,
        the mean of the training loss's quantity) as its test loss."""

    def model_from_state(self, state: Mapping[str, Any]) -> nn.Module:
        """The model of a checkpoint, weights loaded (``load_run``); ``ValueError`` if the
        checkpoint's entries do not fit together (e.g. fewer label names than classes)."""

    def evaluate_file(self, run: Run, cfg: TrainConfig, path: str, batch_size: int
                      ) -> dict[str, Any]:
        """Read ``path`` as ``cfg`` says (the run's config, maybe with another format), score."""

    def predict(self, run: Run, inputs: Sequence[Any], batch_size: int) -> list[dict[str, Any]]:
        """One result dict per input (a text, or a sentence's tokens)."""

    def describe(self, cfg: TrainConfig) -> str:
        """What follows "LSTM 32" in the plot's title: ", max pooling", " tagger", ..."""
