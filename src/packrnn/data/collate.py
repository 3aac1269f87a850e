"""Collate functions: a list of ``(ids, label)`` items -> one padded or packed batch.

    >>> batch = collate_padded([(torch.tensor([4, 5, 6]), 1), (torch.tensor([7]), 0)], batch_first=True)
    >>> batch.inputs, batch.lengths, batch.labels
    (tensor([[4, 5, 6],
            [7, 0, 0]]), tensor([3, 1]), tensor([1, 0]))
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..packing import PackedSequence, pack_sequence, pad_sequence

__all__ = ["Batch", "Collate", "collate_padded", "collate_packed"]


class Batch(NamedTuple):
    """One batch, in the order the items came in (``lengths[b]``, ``labels[b]`` go with item b).

    ``inputs`` is ``(T, B)`` token ids (``(B, T)`` if ``batch_first``) holding
    ``padding_value`` at steps ``t >= lengths[b]``, or a :class:`~packrnn.PackedSequence` whose
    ``data`` is ``(N,)`` ids (no padding at all). ``lengths`` is ``(B,)`` CPU int64, as
    ``pack_padded_sequence`` wants it. ``labels`` is ``(B,)`` int64, or None for unlabeled items.
    """

    inputs: Tensor | PackedSequence
    lengths: Tensor
    labels: Tensor | None


def _split_items(batch: Sequence) -> tuple[list[Tensor], Tensor | None]:
    """Items are ``(ids, label)`` pairs or bare id sequences (e.g. texts to predict)."""
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) == 0:
        got = f"an empty {type(batch).__name__}" if isinstance(batch, Sequence) else type(batch).__name__
        raise ValueError(f"batch: expected a non-empty list of (ids, label) items, got {got}")
    labeled = isinstance(batch[0], tuple)
    seqs, labels = [], []
    for i, item in enumerate(batch):
        if isinstance(item, tuple) != labeled or (labeled and len(item) != 2):
            raise ValueError(
                f"batch[{i}]: expected {'an (ids, label) pair' if labeled else 'an id sequence'} like batch[0], "
                f"got {type(item).__name__}{f' of length {len(item)}' if isinstance(item, tuple) else ''}"
            )
        ids, label = item if labeled else (item, None)
        ids = torch.as_tensor(ids, dtype=torch.int64) if not isinstance(ids, Tensor) else ids
        if ids.dim() != 1:
            raise ValueError(f"batch[{i}]: expected 1-D token ids (L,), got shape {tuple(ids.shape)}")
        seqs.append(ids)
        if labeled:
            if isinstance(label, Tensor):
                label = int(label)
            if isinstance(label, bool) or not isinstance(label, numbers.Integral):
                raise TypeError(f"batch[{i}]: expected an int label, got {label!r}")
            labels.append(label)
    return seqs, (torch.tensor(labels, dtype=torch.int64) if labeled else None)


def collate_padded(batch: Sequence, *, padding_value: int = 0, batch_first: bool = False) -> Batch:
    """Pad a list of ``(ids, label)`` items (or bare id sequences) into :class:`Batch`.

    Args:
        batch: ``(ids, label)`` pairs, ``ids`` a ``(L_b,)`` integer tensor or list (``L_b`` may
            be 0), ``label`` an int; or bare ``ids`` (then ``labels`` is None).
        padding_value (int): id at padded steps; use ``vocab.pad_index``. Default: 0.
        batch_first (bool): ``inputs`` ``(B, T)`` if True, else ``(T, B)``. Default: False.

    Returns:
        :class:`Batch` ``(inputs, lengths, labels)``; ``T = max(L_b)`` (0 if all are empty).

    >>> collate_padded([[4, 5], [6]], padding_value=1, batch_first=True)
    Batch(inputs=tensor([[4, 5],
            [6, 1]]), lengths=tensor([2, 1]), labels=None)
    """
    seqs, labels = _split_items(batch)
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)  # (B,)
    inputs = pad_sequence(seqs, batch_first=batch_first, padding_value=padding_value)  # (T, B) / (B, T)
    return Batch(inputs, lengths, labels)


def collate_packed(batch: Sequence) -> Batch:
    """Pack a list of ``(ids, label)`` items (or bare id sequences) into :class:`Batch`.

    ``inputs`` is a :class:`~packrnn.PackedSequence` of ``(N,)`` ids built by
    :func:`packrnn.pack_sequence` (sorted internally; results come back in item order through
    ``unsorted_indices``). Zero-length items are allowed (NOTE [zero-length sequences] in
    ``packrnn.packing``). Embed it with ``PackedSequence(embedding(p.data), *p[1:])``.

    Args:
        batch: as :func:`collate_padded`.

    Returns:
        :class:`Batch` ``(inputs, lengths, labels)`` with ``inputs`` a PackedSequence of
        ``N = sum(L_b)`` ids.

    >>> batch = collate_packed([(torch.tensor([4]), 0), (torch.tensor([5, 6]), 1)])
    >>> batch.inputs.data, batch.inputs.batch_sizes, batch.lengths, batch.labels
    (tensor([5, 4, 6]), tensor([2, 1]), tensor([1, 2]), tensor([0, 1]))
    """
    seqs, labels = _split_items(batch)
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)  # (B,)
    return Batch(pack_sequence(seqs), lengths, labels)


class Collate:
    """A picklable ``collate_fn`` for ``DataLoader``: padded (default) or packed batches.

    Args:
        packed (bool): return a PackedSequence (:func:`collate_packed`) instead of a padded
            tensor (:func:`collate_padded`). Default: False.
        padding_value (int): id at padded steps (padded only). Default: 0.
        batch_first (bool): padded layout ``(B, T)`` if True, else ``(T, B)``. Default: False.

    >>> loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(packed=True))  # doctest: +SKIP
    """

    def __init__(self, packed: bool = False, *, padding_value: int = 0, batch_first: bool = False) -> None:
        for name, flag in (("packed", packed), ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        if isinstance(padding_value, bool) or not isinstance(padding_value, numbers.Integral):
            raise TypeError(f"padding_value: expected an int token id, got {padding_value!r}")
        self.packed = packed
        self.padding_value = int(padding_value)
        self.batch_first = batch_first

    def __call__(self, batch: Sequence) -> Batch:
        if self.packed:
            return collate_packed(batch)
        return collate_padded(batch, padding_value=self.padding_value, batch_first=self.batch_first)

    def __repr__(self) -> str:
        return f"Collate(packed={self.packed}, padding_value={self.padding_value}, batch_first={self.batch_first})"
