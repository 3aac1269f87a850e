"""Tasks for the training loop in ``packrnn.train``: what is learnt from which data.

A task supplies data loading, the model, the loss of one batch and the metrics
(``base.Task``); the loop does the rest. ``TrainConfig.task`` picks one by name:

============  ====================================================================
``classify``  one label per text: ``SequenceClassifier`` (``classify.py``)
``tag``       one tag per token: ``SequenceTagger`` (``tag.py``)
``lm``        the next character or word at every step: ``LanguageModel`` (``lm.py``)
============  ====================================================================
"""

from __future__ import annotations

from .base import StepStats, Task, TaskData
from .classify import ClassifyTask
from .lm import LanguageModelTask
from .tag import TagTask

__all__ = ["TASKS", "Task", "TaskData", "StepStats", "get_task"]

_REGISTRY: dict[str, type] = {"classify": ClassifyTask, "tag": TagTask, "lm": LanguageModelTask}
TASKS = tuple(_REGISTRY)


def get_task(name: str) -> Task:
    """The task called ``name`` (one of ``TASKS``)."""
    if name not in _REGISTRY:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {name!r}")
    return _REGISTRY[name]()
