"""Collate functions: a list of ``(ids, label)`` items -> one padded or packed batch.

Per-token tasks (tagging, language modelling) collate ``(ids, targets)`` items with
:func:`collate_tokens`: the targets come out in the same layout as the inputs, so that with
packing ``targets.data[r]`` is the target of ``inputs.data[r]`` (NOTE [aligned targets]).

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

__all__ = ["Batch", "Collate", "collate_padded", "collate_packed", "IGNORE_INDEX", "TokenBatch",
           "TokenCollate", "collate_tokens"]

#: Target at padded positions of a padded ``TokenBatch``: ``cross_entropy``'s ``ignore_index``.
IGNORE_INDEX = -100


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


# NOTE [aligned targets]
#
# A per-token loss over packed outputs is a plain cross-entropy of ``output.data`` (N, C)
# against ``targets.data`` (N,): no mask, no padding. That needs row r of the targets to be the
# target of row r of the inputs. collate_tokens packs the *positions* of the concatenated items
# once (``pack_sequence`` of ``arange`` spans: the same sort as packing the ids, zero-length
# items included) and gathers ids, targets and words' characters through those rows, so the
# three can never disagree. The padded layout puts IGNORE_INDEX at padded positions instead.


class TokenBatch(NamedTuple):
    """One batch of per-token examples (tagging, language modelling), items in the order given.

    ``inputs``: ``(T, B)`` ids (``(B, T)`` if ``batch_first``) padded with ``padding_value``,
    or a PackedSequence of ``(N,)`` ids. ``lengths``: ``(B,)`` CPU int64. ``targets``: the same
    layout as ``inputs``: padded with :data:`IGNORE_INDEX`, or a PackedSequence whose ``data``
    ``(N,)`` is aligned row for row with ``inputs.data`` (same ``batch_sizes`` and indices).
    ``chars``: None, or the characters of the ``N`` real words as a :class:`Batch`
    ``(inputs, lengths, None)``, packed or padded like ``inputs`` (padded: ``(N, C)`` batch
    first), word ``r`` being ``inputs.data[r]`` when packed and the ``r``-th real word in item
    order (sentence by sentence) when padded.
    """

    inputs: Tensor | PackedSequence
    lengths: Tensor
    targets: Tensor | PackedSequence
    chars: Batch | None


def _split_token_items(batch: Sequence) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]] | None]:
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) == 0:
        got = f"an empty {type(batch).__name__}" if isinstance(batch, Sequence) else type(batch).__name__
        raise ValueError(f"batch: expected a non-empty list of (ids, targets) items, got {got}")
    with_chars = isinstance(batch[0], tuple) and len(batch[0]) == 3
    seqs, targets, chars = [], [], []
    for i, item in enumerate(batch):
        if not isinstance(item, tuple) or len(item) != (3 if with_chars else 2):
            want = "an (ids, targets, chars) triple" if with_chars else "an (ids, targets) pair"
            raise ValueError(f"batch[{i}]: expected {want} like batch[0], got "
                             f"{type(item).__name__}{f' of length {len(item)}' if isinstance(item, tuple) else ''}")
        ids, tgt = (torch.as_tensor(x, dtype=torch.int64) if not isinstance(x, Tensor) else x
                    for x in item[:2])
        if ids.dim() != 1 or tgt.shape != ids.shape:
            raise ValueError(f"batch[{i}]: expected 1-D ids (L,) and targets of the same shape, "
                             f"got {tuple(ids.shape)} and {tuple(tgt.shape)}")
        seqs.append(ids)
        targets.append(tgt)
        if with_chars:
            words = [torch.as_tensor(w, dtype=torch.int64) for w in item[2]]
            if len(words) != ids.numel():
                raise ValueError(f"batch[{i}]: expected the characters of each of the "
                                 f"{ids.numel()} words, got {len(words)} words")
            chars.append(words)
    return seqs, targets, (chars if with_chars else None)


def collate_tokens(batch: Sequence, *, packed: bool = False, padding_value: int = 0,
                   char_padding_value: int = 0, batch_first: bool = False) -> TokenBatch:
    """Collate ``(ids, targets)`` or ``(ids, targets, chars)`` items into a :class:`TokenBatch`.

    Args:
        batch: items with ``ids`` and ``targets`` two ``(L_b,)`` integer tensors or lists
            (``L_b`` may be 0) and optionally ``chars`` a sequence of ``L_b`` character-id
            sequences (one per word).
        packed (bool): PackedSequences (NOTE [aligned targets]) instead of padded tensors.
            Default: False.
        padding_value (int): id at padded input steps (padded only). Default: 0.
        char_padding_value (int): id at padded character steps (padded only). Default: 0.
        batch_first (bool): padded inputs and targets ``(B, T)`` if True, else ``(T, B)``.
            Default: False.

    >>> b = collate_tokens([([4], [1]), ([5, 6], [2, 3])], packed=True)
    >>> b.inputs.data, b.targets.data, b.inputs.batch_sizes
    (tensor([5, 4, 6]), tensor([2, 1, 3]), tensor([2, 1]))
    >>> collate_tokens([([4], [1]), ([5, 6], [2, 3])], batch_first=True).targets
    tensor([[   1, -100],
            [   2,    3]])
    """
    seqs, targets, chars = _split_token_items(batch)
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)  # (B,)
    words = None if chars is None else [w for item in chars for w in item]  # item order
    if packed:
        starts = (torch.cumsum(lengths, 0) - lengths).tolist()
        pos = pack_sequence([torch.arange(s, s + n) for s, n in zip(starts, lengths.tolist())])
        rows = pos.data  # (N,) row r of the packed batch is element rows[r] of the concatenation
        layout = (pos.batch_sizes, pos.sorted_indices, pos.unsorted_indices)
        inputs = PackedSequence(torch.cat(seqs)[rows], *layout)  # (N,)
        target = PackedSequence(torch.cat(targets)[rows], *layout)  # (N,) aligned with inputs
        if words is not None:
            words = [words[r] for r in rows.tolist()]
        char_batch = _char_batch(words, True, char_padding_value)
        return TokenBatch(inputs, lengths, target, char_batch)
    inputs = pad_sequence(seqs, batch_first=batch_first, padding_value=padding_value)
    target = pad_sequence(targets, batch_first=batch_first, padding_value=IGNORE_INDEX)
    return TokenBatch(inputs, lengths, target, _char_batch(words, False, char_padding_value))


def _char_batch(words: list[Tensor] | None, packed: bool, padding_value: int) -> Batch | None:
    if words is None:
        return None
    if not words:  # every item has length 0: no word, no character
        return Batch(torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), None)
    if packed:
        return collate_packed(words)
    return collate_padded(words, padding_value=padding_value, batch_first=True)


class TokenCollate:
    """A picklable ``collate_fn`` for per-token items: :func:`collate_tokens` with fixed options.

    >>> TokenCollate(packed=True)([([4, 5], [5, 6])]).targets.data
    tensor([5, 6])
    """

    def __init__(self, packed: bool = False, *, padding_value: int = 0,
                 char_padding_value: int = 0, batch_first: bool = False) -> None:
        for name, flag in (("packed", packed), ("batch_first", batch_first)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        for name, value in (("padding_value", padding_value),
                            ("char_padding_value", char_padding_value)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: expected an int token id, got {value!r}")
        self.packed, self.batch_first = packed, batch_first
        self.padding_value, self.char_padding_value = int(padding_value), int(char_padding_value)

    def __call__(self, batch: Sequence) -> TokenBatch:
        return collate_tokens(batch, packed=self.packed, padding_value=self.padding_value,
                              char_padding_value=self.char_padding_value,
                              batch_first=self.batch_first)

    def __repr__(self) -> str:
        return (f"TokenCollate(packed={self.packed}, padding_value={self.padding_value}, "
                f"char_padding_value={self.char_padding_value}, batch_first={self.batch_first})")
