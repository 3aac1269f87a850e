"""Pad / pack / unpack utilities for batches of variable-length sequences.

Everything here is implemented in packrnn (no call into ``torch.nn.utils.rnn``) and returns
results identical to torch's for the same explicit arguments: ``data``, ``batch_sizes``,
``sorted_indices``, ``unsorted_indices``, padded outputs and returned lengths.

Where torch's users are stuck, packrnn goes further:

* ``lengths`` may be a list, tuple, numpy array or a tensor of any integer dtype on any device.
* Zero-length sequences are accepted; see NOTE [zero-length sequences].
* Unsorted batches just work; see NOTE [enforce_sorted default].
* Bad input raises ``ValueError`` / ``TypeError`` of the form ``"<arg>: expected X, got Y"``;
  where torch raises ``RuntimeError`` for the same input, the error is also a ``RuntimeError``
  (:mod:`packrnn.errors`).

Shape letters: ``T`` time, ``B`` batch, ``N`` packed rows (sum of lengths), ``*`` trailing dims.

A packed batch stores the real steps time-major: first step ``t = 0`` of every sequence (in
decreasing-length order), then ``t = 1`` of every sequence still running, and so on.
``batch_sizes[t]`` is how many sequences are longer than ``t``.

    >>> import torch, packrnn
    >>> packed = packrnn.pack_sequence([torch.tensor([1, 2, 3]), torch.tensor([4, 5])])
    >>> packed.data, packed.batch_sizes
    (tensor([1, 4, 2, 5, 3]), tensor([2, 2, 1]))

"""

# NOTE [zero-length sequences]
#
# torch refuses sequences of length 0; packrnn accepts them. A zero-length sequence contributes
# no rows to ``data`` and no step to ``batch_sizes``, so ``batch_sizes[0]`` (the number of
# sequences with at least one step) may be smaller than the batch size B. To keep B recoverable,
# whenever any length is 0 the PackedSequence ALWAYS carries ``sorted_indices`` /
# ``unsorted_indices`` (identity-like if the batch was already sorted) and B is
# ``len(sorted_indices)`` -- see :func:`packed_batch_size`. Zero-length sequences sort last.
# ``pad_packed_sequence`` returns all padding and length 0 for them, ``unpack_sequence`` an empty
# ``(0, *)`` tensor. Such a PackedSequence is meant for packrnn's functions and layers:
# torch's own RNN modules and utilities infer B from ``batch_sizes[0]`` and will fail on it.
#
# NOTE [enforce_sorted default]
#
# torch's ``pack_padded_sequence`` / ``pack_sequence`` default to ``enforce_sorted=True`` and
# raise on unsorted input. packrnn's default is ``enforce_sorted=None`` ("sort if needed"):
# * already sorted (decreasing) lengths -> exactly torch's ``enforce_sorted=True`` result
#   (``sorted_indices = unsorted_indices = None``), so default calls that work in torch give
#   identical results;
# * unsorted lengths -> exactly torch's ``enforce_sorted=False`` result.
# Passing ``enforce_sorted=True`` or ``False`` explicitly behaves exactly like torch (True keeps
# torch's check and raises on unsorted lengths). Zero-length sequences always get indices
# (NOTE [zero-length sequences]).

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence as _TorchPackedSequence

from .errors import InputError, InputTypeError

try:  # numpy is optional: torch works without it
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with the venv
    _np = None

__all__ = [
    "PackedSequence",
    "pad_sequence",
    "pack_padded_sequence",
    "pad_packed_sequence",
    "pack_sequence",
    "unpack_sequence",
    "unpad_sequence",
    "as_lengths",
    "sort_lengths",
    "packing_order",
    "batch_sizes_from_lengths",
    "lengths_from_batch_sizes",
    "invert_permutation",
    "check_batch_sizes",
    "check_packed_sequence",
    "packed_batch_size",
    "packed_lengths",
]


class PackedSequence(_TorchPackedSequence):
    """A packed batch of variable-length sequences; a subclass of torch's PackedSequence.

    Fields (a named tuple, exactly as torch's):
        data (Tensor): ``(N, *)`` the real steps, time-major, any dtype and device.
        batch_sizes (Tensor): ``(T,)`` CPU int64, ``batch_sizes[t]`` = number of sequences
            longer than ``t`` (non-increasing, all >= 1).
        sorted_indices (Tensor or None): ``(B,)`` int64 on ``data.device``; packed column ``j``
            holds original sequence ``sorted_indices[j]``. ``None`` means the batch was
            already sorted by decreasing length.
        unsorted_indices (Tensor or None): ``(B,)`` the inverse permutation of
            ``sorted_indices``.

    Because it subclasses ``torch.nn.utils.rnn.PackedSequence``, ``torch.nn.LSTM`` and torch's
    utilities accept it; and every packrnn function accepts torch's PackedSequence. A batch
    holding zero-length sequences is for packrnn only (NOTE [zero-length sequences] in
    ``packrnn.packing``).

    >>> p = PackedSequence(torch.tensor([1, 4, 2, 3]), torch.tensor([2, 1, 1]))
    >>> packed_lengths(p)
    tensor([3, 1])
    """


# ----------------------------------------------------------------------------------------------
# small helpers shared by the functions below and by packrnn's layers
# ----------------------------------------------------------------------------------------------


def _short(values: Sequence | Tensor, limit: int = 12) -> str:
    """Render a list/tensor of values for an error message, cut after ``limit`` items."""
    items = values.tolist() if isinstance(values, Tensor) else list(values)
    if len(items) <= limit:
        return str(items)
    return "[" + ", ".join(str(v) for v in items[:limit]) + f", ... ({len(items)} values)]"


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def as_lengths(
    lengths,
    batch_size: int | None = None,
    *,
    max_length: int | None = None,
    name: str = "lengths",
) -> Tensor:
    """Validate sequence lengths and return them as a 1-D CPU int64 tensor.

    Args:
        lengths: a list, tuple (or other sequence) of ints, a 1-D numpy integer array, or a 1-D tensor of any
            integer dtype on any device.
        batch_size (int, optional): if given, the number of lengths must equal it.
        max_length (int, optional): if given, every length must be <= it (the padded time
            dimension).
        name (str): the argument name used in error messages. Default: ``"lengths"``.

    Returns:
        ``(B,)`` CPU int64 tensor (may share memory with a CPU int64 ``lengths`` tensor; it is
        never modified).

    Raises:
        TypeError: non-integer lengths or an unsupported container.
        packrnn.errors.InputError (a ValueError and a RuntimeError): not 1-D, negative, wrong
            count, or longer than ``max_length`` (values checked in eager mode only, not
            while ``torch.compile`` / ``torch.export`` trace).

    >>> as_lengths([3, 1, 2])
    tensor([3, 1, 2])
    """
    if isinstance(lengths, Tensor):
        if not _is_integer_dtype(lengths.dtype):
            raise TypeError(f"{name}: expected integer lengths, got a tensor of dtype {lengths.dtype}")
        if lengths.dim() != 1:
            raise InputError(
                f"{name}: expected a 1-D sequence of lengths, got a tensor of shape {tuple(lengths.shape)}"
            )
        if lengths.device.type == "meta":
            raise InputError(f"{name}: expected lengths with values (a list or a CPU/GPU tensor), got a "
                             "tensor on the meta device, which has a shape but no data")
        out = lengths.to(device="cpu", dtype=torch.int64)
    elif _np is not None and isinstance(lengths, _np.ndarray):
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected integer lengths, got a numpy array of dtype {lengths.dtype}")
        if lengths.ndim != 1:
            raise InputError(
                f"{name}: expected a 1-D sequence of lengths, got a numpy array of shape {lengths.shape}"
            )
        out = torch.from_numpy(lengths.astype(_np.int64))
    elif isinstance(lengths, Sequence) and not isinstance(lengths, (str, bytes)):
        values = []
        for i, v in enumerate(lengths):
            if isinstance(v, Tensor) and v.dim() == 0 and _is_integer_dtype(v.dtype):
                v = int(v)
            elif _np is not None and isinstance(v, _np.integer):
                v = int(v)
            elif isinstance(v, (list, tuple, Tensor)) or (_np is not None and isinstance(v, _np.ndarray)):
                raise InputError(
                    f"{name}: expected a 1-D sequence of lengths, got a nested {type(v).__name__} at index {i}"
                )
            elif not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise TypeError(f"{name}: expected integer lengths, got {v!r} ({type(v).__name__}) at index {i}")
            values.append(int(v))
        out = torch.tensor(values, dtype=torch.int64)
    else:
        raise TypeError(
            f"{name}: expected a list, tuple, numpy array or tensor of integers, got {type(lengths).__name__}"
        )

    if batch_size is not None and out.numel() != batch_size:
        raise InputError(
            f"{name}: expected {batch_size} lengths (one per sequence in the batch), got {out.numel()}"
        )
    # Under torch.compile / torch.export the values are not inspected: that would be a
    # data-dependent guard (a graph break). A length outside [0, T] then acts as if clamped.
    if out.numel() and not torch.compiler.is_compiling():
        low = int(out.min())
        if low < 0:
            i = int((out < 0).nonzero()[0])
            raise InputError(f"{name}: expected non-negative lengths, got {low} at index {i}")
        if max_length is not None:
            high = int(out.max())
            if high > max_length:
                i = int((out > max_length).nonzero()[0])
                raise InputError(
                    f"{name}: expected every length <= {max_length} (the padded time dimension), "
                    f"got {high} at index {i}"
                )
    return out


def invert_permutation(permutation: Tensor | None) -> Tensor | None:
    """Return the inverse of a 1-D permutation tensor (``None`` stays ``None``).

    >>> invert_permutation(torch.tensor([2, 0, 1]))
    tensor([1, 2, 0])
    """
    if permutation is None:
        return None
    out = torch.empty_like(permutation, memory_format=torch.contiguous_format)  # (B,)
    out.scatter_(0, permutation, torch.arange(permutation.numel(), device=permutation.device))
    return out


def sort_lengths(lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sort lengths in decreasing order, exactly as torch's ``enforce_sorted=False`` does.

    Args:
        lengths: ``(B,)`` CPU int64 (see :func:`as_lengths`).

    Returns:
        ``(sorted_lengths, sorted_indices, unsorted_indices)``, all ``(B,)`` CPU int64, with
        ``sorted_lengths == lengths[sorted_indices]`` and
        ``lengths == sorted_lengths[unsorted_indices]``. Ties keep torch's order.

    >>> sort_lengths(torch.tensor([1, 3, 2]))
    (tensor([3, 2, 1]), tensor([1, 2, 0]), tensor([2, 0, 1]))
    """
    sorted_lengths, sorted_indices = torch.sort(lengths, descending=True)
    return sorted_lengths, sorted_indices, _sort_inverse(sorted_indices)


def _sort_inverse(sorted_indices: Tensor) -> Tensor:
    """:func:`invert_permutation` of the CPU permutation ``torch.sort`` returned (valid by
    construction); in eager mode on numpy's view: ~1 us instead of ~8 for a scatter."""
    if _np is None or torch.compiler.is_compiling():
        return invert_permutation(sorted_indices)
    inverse = _np.empty(sorted_indices.numel(), dtype=_np.int64)  # (B,)
    inverse[sorted_indices.numpy()] = _np.arange(sorted_indices.numel())
    return torch.from_numpy(inverse)


def packing_order(
    lengths: Tensor, enforce_sorted: bool | None = None, *, name: str = "lengths"
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Decide the column order of a packed batch, exactly as packrnn's pack functions do.

    Args:
        lengths: ``(B,)`` CPU int64, ``B >= 1`` (see :func:`as_lengths`).
        enforce_sorted (bool or None): see NOTE [enforce_sorted default]. ``True`` raises
            ``packrnn.errors.InputError`` (a ValueError and, as torch, a RuntimeError) naming
            ``name`` if lengths are not decreasing.
        name (str): argument name for the error message. Default: ``"lengths"``.

    Returns:
        ``(sorted_lengths, sorted_indices, unsorted_indices)``: ``(B,)`` CPU int64 sorted
        lengths, and the two CPU int64 permutations or ``None`` (already sorted, no zero
        length, ``enforce_sorted`` not ``False``). With a zero length the indices are always
        set (NOTE [zero-length sequences]).

    >>> packing_order(torch.tensor([3, 2]))
    (tensor([3, 2]), None, None)
    >>> packing_order(torch.tensor([3, 0]))
    (tensor([3, 0]), tensor([0, 1]), tensor([0, 1]))
    """
    batch = lengths.numel()
    sorted_lengths, sorted_indices = torch.sort(lengths, descending=True)  # torch's exact call
    is_sorted = torch.equal(sorted_lengths, lengths)  # already non-increasing?
    if enforce_sorted and not is_sorted:
        what = "lengths" if name == "lengths" else "sequences by length"
        raise InputError(
            f"{name}: expected {what} sorted in decreasing order since enforce_sorted=True, got "
            f"lengths {_short(lengths)}; pass enforce_sorted=False (or leave the default None) to "
            f"pack an unsorted batch"
        )
    if enforce_sorted is False or not is_sorted:
        return sorted_lengths, sorted_indices, _sort_inverse(sorted_indices)
    if batch and int(lengths[-1]) == 0:  # NOTE [zero-length sequences]: keep B recoverable
        identity = torch.arange(batch)
        return lengths, identity, identity.clone()
    return lengths, None, None


def batch_sizes_from_lengths(sorted_lengths: Tensor) -> Tensor:
    """``batch_sizes[t]`` = number of sequences longer than ``t``, for ``t < max(lengths)``.

    Args:
        sorted_lengths: ``(B,)`` CPU int64 non-negative lengths (order does not matter).

    Returns:
        ``(T,)`` CPU int64 with ``T = max(lengths)`` (``(0,)`` if all lengths are 0 or B = 0).

    >>> batch_sizes_from_lengths(torch.tensor([3, 2, 2]))
    tensor([3, 3, 1])
    """
    if sorted_lengths.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    max_len = int(sorted_lengths.max())
    counts = torch.bincount(sorted_lengths, minlength=max_len + 1)  # (T+1,) how many end at t
    # sequences longer than t = B - (sequences of length <= t)
    return sorted_lengths.numel() - torch.cumsum(counts, 0)[:max_len]  # (T,)


def lengths_from_batch_sizes(batch_sizes: Tensor, batch_size: int | None = None) -> Tensor:
    """Sorted (decreasing) lengths of a packed batch: the inverse of :func:`batch_sizes_from_lengths`.

    Args:
        batch_sizes: ``(T,)`` CPU int64, non-increasing.
        batch_size (int, optional): B; defaults to ``batch_sizes[0]``. Columns beyond
            ``batch_sizes[0]`` are zero-length sequences.

    Returns:
        ``(B,)`` CPU int64, ``lengths[j]`` = number of steps ``t`` with ``batch_sizes[t] > j``.

    >>> lengths_from_batch_sizes(torch.tensor([3, 3, 1]), batch_size=4)
    tensor([3, 2, 2, 0])
    """
    if batch_size is None:
        batch_size = int(batch_sizes[0]) if batch_sizes.numel() else 0
    counts = torch.bincount(batch_sizes, minlength=batch_size + 1)[: batch_size + 1]  # (B+1,)
    # lengths[j] = #(t: batch_sizes[t] >= j + 1) = suffix sum of counts from j + 1
    return counts.flip(0).cumsum(0).flip(0)[1:]  # (B,)


def check_batch_sizes(batch_sizes, name: str = "batch_sizes") -> None:
    """Check a packed batch's ``batch_sizes``: 1-D CPU int64, non-increasing, every entry >= 1.

    Shared by :func:`check_packed_sequence` and ``packrnn.functional`` (which takes
    ``batch_sizes`` on its own).

    Raises:
        packrnn.errors.InputError (a ValueError and a RuntimeError) naming ``name``.

    >>> check_batch_sizes(torch.tensor([2, 0]))
    Traceback (most recent call last):
    ...
    packrnn.errors.InputError: batch_sizes: expected every entry >= 1, got [2, 0]
    """
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64:
        got = (
            f"shape {tuple(batch_sizes.shape)} dtype {batch_sizes.dtype}"
            if isinstance(batch_sizes, Tensor)
            else type(batch_sizes).__name__
        )
        raise InputError(f"{name}: expected a 1-D int64 tensor, got {got}")
    if batch_sizes.device.type != "cpu":
        raise InputError(f"{name}: expected a CPU tensor, got device {batch_sizes.device}")
    if batch_sizes.numel():
        # Every layer call checks its batch: numpy's view of the CPU tensor does it in ~2 us,
        # a third of the torch ops' dispatch cost.
        values = batch_sizes.numpy() if _np is not None else batch_sizes  # (T,)
        if len(values) > 1 and bool((values[1:] > values[:-1]).any()):
            raise InputError(f"{name}: expected non-increasing entries, got {_short(batch_sizes)}")
        if int(values[-1]) < 1:  # non-increasing, so the last entry is the smallest
            raise InputError(f"{name}: expected every entry >= 1, got {_short(batch_sizes)}")


def check_packed_sequence(sequence, name: str = "sequence") -> int:
    """Check that a PackedSequence's fields agree; return its batch size B.

    Accepts packrnn's and torch's PackedSequence. Checks: ``data`` is a tensor with a row per
    packed step; ``batch_sizes`` is a 1-D CPU int64 tensor, non-increasing, >= 1, summing to
    ``data.size(0)``; ``sorted_indices`` / ``unsorted_indices`` are both ``None`` or inverse
    permutations of the same length ``B >= batch_sizes[0]`` on ``data``'s device.

    Args:
        sequence (PackedSequence): the batch to check.
        name (str): the argument name used in error messages. Default: ``"sequence"``.

    Raises:
        TypeError / packrnn.errors.InputError (a ValueError and a RuntimeError) naming the
        offending field.

    >>> check_packed_sequence(pack_sequence([torch.ones(2), torch.ones(0)]))
    2
    """
    if not isinstance(sequence, _TorchPackedSequence):
        raise TypeError(f"{name}: expected a PackedSequence, got {type(sequence).__name__}")
    cached = sequence.__dict__.get(_CHECKED_BATCH_SIZE)  # NOTE [validated PackedSequence]
    if cached is not None:
        return cached
    data, batch_sizes, sorted_indices, unsorted_indices = sequence
    if not isinstance(data, Tensor) or data.dim() < 1:
        got = f"shape {tuple(data.shape)}" if isinstance(data, Tensor) else type(data).__name__
        raise InputError(f"{name}.data: expected a tensor with at least 1 dimension, got {got}")
    check_batch_sizes(batch_sizes, f"{name}.batch_sizes")
    total = int(batch_sizes.sum())
    if total != data.size(0):
        raise InputError(
            f"{name}: expected data.size(0) == sum(batch_sizes) = {total}, got data.size(0) = {data.size(0)}"
        )
    if (sorted_indices is None) != (unsorted_indices is None):
        raise InputError(
            f"{name}: expected sorted_indices and unsorted_indices both None or both tensors, got "
            f"sorted_indices={'None' if sorted_indices is None else 'tensor'}, "
            f"unsorted_indices={'None' if unsorted_indices is None else 'tensor'}"
        )
    top = int(batch_sizes[0]) if batch_sizes.numel() else 0
    if sorted_indices is None:
        if top == 0:
            raise InputError(
                f"{name}: expected batch_sizes to be non-empty when sorted_indices is None "
                f"(the batch size is batch_sizes[0]), got an empty batch_sizes"
            )
        return top
    for field, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        if not isinstance(idx, Tensor) or idx.dim() != 1 or not _is_integer_dtype(idx.dtype):
            got = f"shape {tuple(idx.shape)} dtype {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
            raise InputError(f"{name}.{field}: expected a 1-D integer tensor, got {got}")
        if idx.device != data.device:
            raise InputError(f"{name}.{field}: expected device {data.device} (data's), got {idx.device}")
    batch = sorted_indices.numel()
    if unsorted_indices.numel() != batch:
        raise InputError(
            f"{name}.unsorted_indices: expected {batch} entries (as sorted_indices), got {unsorted_indices.numel()}"
        )
    if batch < top:
        raise InputError(
            f"{name}.sorted_indices: expected at least batch_sizes[0] = {top} entries, got {batch}"
        )
    if batch == 0:
        raise InputError(f"{name}.sorted_indices: expected at least one sequence, got 0 entries")
    if _np is not None and sorted_indices.device.type == "cpu":  # same test, cheaper on CPU
        sorted_np, unsorted_np = sorted_indices.numpy(), unsorted_indices.numpy()  # (B,) views
        low = min(int(sorted_np.min()), int(unsorted_np.min()))
        high = max(int(sorted_np.max()), int(unsorted_np.max()))
        inverse = low >= 0 and high < batch and bool(
            (unsorted_np[sorted_np] == _np.arange(batch)).all())
    else:
        low, high = (int(v) for v in torch.aminmax(torch.cat([sorted_indices, unsorted_indices])))
        arange = torch.arange(batch, device=sorted_indices.device)
        inverse = low >= 0 and high < batch and torch.equal(unsorted_indices[sorted_indices], arange)
    if not inverse:
        raise InputError(
            f"{name}.unsorted_indices: expected the inverse permutation of sorted_indices, got "
            f"sorted_indices={_short(sorted_indices)}, unsorted_indices={_short(unsorted_indices)}"
        )
    return batch


# NOTE [validated PackedSequence]
#
# Validating a PackedSequence costs a dozen small tensor ops, which dominates packing small
# batches. PackedSequences built by packrnn's functions are valid by construction, so they carry
# their batch size in the instance ``__dict__`` under _CHECKED_BATCH_SIZE and
# check_packed_sequence returns it without re-checking. Any other instance (torch's, one built
# by hand, the result of ``.to()`` / ``_replace``) has no entry and is checked in full.
_CHECKED_BATCH_SIZE = "_packrnn_batch_size"


def _validated(packed: PackedSequence, batch: int) -> PackedSequence:
    """Mark a PackedSequence built by packrnn as valid with batch size ``batch``."""
    packed.__dict__[_CHECKED_BATCH_SIZE] = batch
    return packed


def packed_batch_size(sequence) -> int:
    """Number of sequences B in a packed batch (zero-length ones included); validates it.

    Unlike ``batch_sizes[0]``, this counts zero-length sequences (NOTE [zero-length sequences]).

    >>> packed_batch_size(pack_sequence([torch.ones(3), torch.ones(0), torch.ones(1)]))
    3
    """
    return check_packed_sequence(sequence)


def packed_lengths(sequence) -> Tensor:
    """Lengths of the sequences of a packed batch, in original order, as ``(B,)`` CPU int64.

    Args:
        sequence (PackedSequence): packrnn's or torch's.

    >>> packed_lengths(pack_sequence([torch.ones(2), torch.ones(3)]))
    tensor([2, 3])
    """
    batch = check_packed_sequence(sequence)
    lengths = lengths_from_batch_sizes(sequence.batch_sizes, batch)  # (B,) sorted order
    if sequence.unsorted_indices is None:
        return lengths
    return lengths[sequence.unsorted_indices.cpu()]  # (B,) original order


def _check_tensor(value, name: str, min_dim: int) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(value).__name__}")
    if value.dim() < min_dim:
        raise ValueError(
            f"{name}: expected a tensor with at least {min_dim} dimensions, got shape {tuple(value.shape)}"
        )


def _check_bool(value, name: str) -> bool:
    """A flag must be a real bool (``1`` or ``"yes"`` are mistakes); shared with rnn.py and ops.py."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def _layout_from_lengths(sorted_lengths: Tensor, sorted_indices: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Packed layout of decreasing lengths: ``(batch_sizes, t_idx, b_idx)``, all CPU int64.

    ``batch_sizes`` is ``(T,)``; packed row ``n`` is step ``t_idx[n]`` of the sequence in column
    ``b_idx[n]`` (both ``(N,)``, in packed, time-major order): the original column
    ``sorted_indices[j]`` of sorted column ``j``, or ``j`` itself if ``sorted_indices`` is None.
    In eager mode the steps run on numpy's views of these small CPU tensors (~1 us an op
    instead of ~5: it dominates packing a small batch).
    """
    if _np is not None and not torch.compiler.is_compiling():
        lengths_np = sorted_lengths.numpy()  # (B,)
        max_len = int(lengths_np[0]) if lengths_np.size else 0  # sorted: first is longest
        mask_np = _np.arange(max_len)[:, None] < lengths_np  # (T, B) real step?
        t_np, j_np = mask_np.nonzero()  # (N,), (N,) row-major = packed order
        b_np = j_np if sorted_indices is None else sorted_indices.numpy()[j_np]
        return (torch.from_numpy(mask_np.sum(1, dtype=_np.int64)),
                torch.from_numpy(t_np.astype(_np.int64, copy=False)),
                torch.from_numpy(b_np.astype(_np.int64, copy=False)))
    max_len = int(sorted_lengths[0]) if sorted_lengths.numel() else 0
    mask = torch.arange(max_len).unsqueeze(1) < sorted_lengths  # (T, B) real step?
    t_idx, j_idx = mask.nonzero(as_tuple=True)  # (N,), (N,) row-major = packed order
    return mask.sum(1), t_idx, (j_idx if sorted_indices is None else sorted_indices[j_idx])


def _layout_from_batch_sizes(batch_sizes: Tensor, batch: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed layout from ``batch_sizes``: ``(sorted_lengths, t_idx, j_idx)``, all CPU int64.

    ``sorted_lengths`` is ``(B,)`` (zero for columns beyond ``batch_sizes[0]``); ``t_idx`` /
    ``j_idx`` as in :func:`_layout_from_lengths`.
    """
    mask = torch.arange(batch) < batch_sizes.unsqueeze(1)  # (T, B) real step?
    t_idx, j_idx = mask.nonzero(as_tuple=True)  # (N,), (N,)
    return mask.sum(0), t_idx, j_idx


def _sequence_major_steps(lengths: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """Every real step in sequence-major order (the order of ``torch.cat`` of the sequences).

    ``lengths`` is ``(B,)`` CPU int64, each ``<= steps``. Returns ``(b_idx, t_idx)``, both
    ``(N,)``: row ``n`` is step ``t_idx[n]`` of sequence ``b_idx[n]``.
    """
    mask = lengths.unsqueeze(1) > torch.arange(steps).unsqueeze(0)  # (B, T) real step?
    return mask.nonzero(as_tuple=True)  # (N,), (N,) row-major = sequence-major


def _gather_steps(padded: Tensor, b_idx: Tensor, t_idx: Tensor, batch_first: bool) -> Tensor:
    """Rows ``padded[t_idx[n], b_idx[n]]`` (``[b, t]`` if ``batch_first``) as one ``(N, *)`` tensor.

    ``b_idx`` / ``t_idx`` are ``(N,)`` CPU int64. A contiguous input is gathered by one
    ``index_select`` on its flat ``(T*B, *)`` view; a strided one by advanced indexing, which
    reads only the N rows instead of first copying all ``T*B``.
    """
    if batch_first:
        batch, steps = padded.shape[:2]
    else:
        steps, batch = padded.shape[:2]
    if padded.is_contiguous():
        flat = b_idx * steps + t_idx if batch_first else t_idx * batch + b_idx  # (N,)
        return padded.view((batch * steps,) + padded.shape[2:]).index_select(0, flat.to(padded.device))
    b_idx, t_idx = b_idx.to(padded.device), t_idx.to(padded.device)
    return padded[b_idx, t_idx] if batch_first else padded[t_idx, b_idx]


def _check_sequences(sequences, name: str = "sequences") -> tuple[Tensor, ...]:
    """Validate a list of ``(L_b, *)`` tensors with equal trailing shape, dtype and device."""
    if isinstance(sequences, Tensor):
        if sequences.dim() < 2:
            raise InputError(
                f"{name}: expected a list of tensors or a tensor with at least 2 dimensions, "
                f"got a tensor of shape {tuple(sequences.shape)}"
            )
        seqs = tuple(sequences.unbind(0))
    elif isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
        raise InputTypeError(f"{name}: expected a list of tensors, got {type(sequences).__name__}")
    else:
        seqs = tuple(sequences)
    if not seqs:
        raise InputError(f"{name}: expected at least one sequence, got an empty {type(sequences).__name__}")
    first = seqs[0]
    for i, s in enumerate(seqs):
        if not isinstance(s, Tensor):
            raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(s).__name__}")
        if s.dim() < 1:
            raise ValueError(f"{name}[{i}]: expected a tensor of shape (L, *), got a 0-d tensor")
        if s.shape[1:] != first.shape[1:]:
            raise InputError(
                f"{name}[{i}]: expected trailing shape {tuple(first.shape[1:])} (as {name}[0]), "
                f"got {tuple(s.shape[1:])}"
            )
        if s.dtype != first.dtype:
            raise TypeError(f"{name}[{i}]: expected dtype {first.dtype} (as {name}[0]), got {s.dtype}")
        if s.device != first.device:
            raise InputError(f"{name}[{i}]: expected device {first.device} (as {name}[0]), got {s.device}")
    return seqs


# ----------------------------------------------------------------------------------------------
# the torch.nn.utils.rnn API
# ----------------------------------------------------------------------------------------------


def pack_padded_sequence(
    input: Tensor,
    lengths,
    batch_first: bool = False,
    enforce_sorted: bool | None = None,
) -> PackedSequence:
    """Pack a padded batch of variable-length sequences.

    Args:
        input (Tensor): ``(T, B, *)``, or ``(B, T, *)`` if ``batch_first``; any dtype, device.
            Steps at or beyond a sequence's length are ignored (T may exceed the longest length).
        lengths: ``B`` lengths, each in ``[0, T]``: list, tuple, numpy array or integer tensor on
            any device (torch insists on a CPU int64 tensor).
        batch_first (bool): layout of ``input``. Default: ``False``.
        enforce_sorted (bool or None): ``True`` requires decreasing lengths (torch's check);
            ``False`` always sorts and returns indices (torch's ``False``); ``None`` (default)
            sorts only if needed -- see NOTE [enforce_sorted default].

    Returns:
        :class:`PackedSequence` with ``data`` ``(N, *)``, ``N = sum(lengths)``, identical to
        torch's for the same explicit arguments. Zero-length sequences contribute no rows
        (NOTE [zero-length sequences]). Gradients flow to ``input`` at real steps only.

    >>> x = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 0, 0, 0, 0]])
    >>> p = pack_padded_sequence(x, [5, 3, 1], batch_first=True)
    >>> p.data, p.batch_sizes
    (tensor([1, 6, 9, 2, 7, 3, 8, 4, 5]), tensor([3, 2, 2, 1, 1]))
    """
    _check_tensor(input, "input", min_dim=2)
    _check_bool(batch_first, "batch_first")
    if enforce_sorted is not None:
        _check_bool(enforce_sorted, "enforce_sorted")
    batch_dim, time_dim = (0, 1) if batch_first else (1, 0)
    batch, steps = input.size(batch_dim), input.size(time_dim)
    if batch == 0:  # before the lengths, as torch: an empty batch is the error to report
        raise InputError(f"input: expected at least one sequence, got batch size 0 (shape {tuple(input.shape)})")
    lengths = as_lengths(lengths, batch, max_length=steps)

    sorted_lengths, sorted_indices, unsorted_indices = packing_order(lengths, enforce_sorted)

    batch_sizes, t_idx, b_idx = _layout_from_lengths(sorted_lengths, sorted_indices)  # (T',), (N,), (N,)
    data = _gather_steps(input, b_idx, t_idx, batch_first)  # (N, *)

    if sorted_indices is not None:
        sorted_indices = sorted_indices.to(input.device)
        unsorted_indices = unsorted_indices.to(input.device)
    return _validated(PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), batch)


def pad_packed_sequence(
    sequence,
    batch_first: bool = False,
    padding_value: float = 0.0,
    total_length: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Pad a packed batch back into a tensor: the inverse of :func:`pack_padded_sequence`.

    Args:
        sequence (PackedSequence): packrnn's or torch's.
        batch_first (bool): output layout. Default: ``False``.
        padding_value (float): value written at padded positions. Default: ``0.0``.
        total_length (int, optional): pad the time dimension to this length instead of the
            longest sequence; must be >= the longest length.

    Returns:
        ``(padded, lengths)``: ``padded`` is ``(T, B, *)`` (or ``(B, T, *)``) in the original
        batch order, holding ``padding_value`` at every step ``t >= lengths[b]`` (all padding for
        a zero-length sequence); ``lengths`` is ``(B,)`` CPU int64. Identical to torch's.

    >>> p = pack_sequence([torch.tensor([1, 2]), torch.tensor([3])])
    >>> pad_packed_sequence(p, batch_first=True, padding_value=-1)
    (tensor([[ 1,  2],
            [ 3, -1]]), tensor([2, 1]))
    """
    batch = check_packed_sequence(sequence)
    _check_bool(batch_first, "batch_first")
    data, batch_sizes, sorted_indices, _ = sequence
    max_len = batch_sizes.numel()
    steps = max_len
    if total_length is not None:
        if not isinstance(total_length, numbers.Integral) or isinstance(total_length, bool):
            raise TypeError(f"total_length: expected an int or None, got {total_length!r}")
        if total_length < max_len:
            raise ValueError(
                f"total_length: expected at least the longest sequence length {max_len}, got {total_length}"
            )
        steps = int(total_length)

    sorted_lengths, t_idx, j_idx = _layout_from_batch_sizes(batch_sizes, batch)  # (B,), (N,), (N,)
    if sorted_indices is None:
        b_idx, lengths = j_idx, sorted_lengths
    else:
        b_idx = sorted_indices.cpu()[j_idx]  # (N,) original column
        lengths = sorted_lengths[sequence.unsorted_indices.cpu()]  # (B,) original order
    flat = b_idx * steps + t_idx if batch_first else t_idx * batch + b_idx  # (N,)

    trailing = data.shape[1:]
    shape = (batch, steps) if batch_first else (steps, batch)
    padded = data.new_full((batch * steps,) + trailing, padding_value)  # (B*T, *) or (T*B, *)
    padded.index_copy_(0, flat.to(data.device), data)  # one scatter of the N real rows
    return padded.view(shape + trailing), lengths


def pad_sequence(
    sequences,
    batch_first: bool = False,
    padding_value: float = 0.0,
    padding_side: str = "right",
) -> Tensor:
    """Stack variable-length tensors into one padded tensor.

    Args:
        sequences: a non-empty list (or iterable) of ``(L_b, *)`` tensors with the same trailing
            shape, dtype and device (or a tensor, whose rows are the sequences).
        batch_first (bool): output ``(B, T, *)`` if ``True``, else ``(T, B, *)``. Default:
            ``False``.
        padding_value (float): value at padded positions. Default: ``0.0``.
        padding_side (str): ``"right"`` (pad after each sequence) or ``"left"``. Default:
            ``"right"``.

    Returns:
        Tensor with ``T = max(L_b)``, identical to torch's; padded positions hold
        ``padding_value``. Gradients flow to every input.

    >>> pad_sequence([torch.tensor([1, 2, 3]), torch.tensor([3, 4])], batch_first=True)
    tensor([[1, 2, 3],
            [3, 4, 0]])
    """
    seqs = _check_sequences(sequences)
    _check_bool(batch_first, "batch_first")
    if padding_side not in ("right", "left"):
        raise InputError(f"padding_side: expected 'right' or 'left', got {padding_side!r}")
    batch = len(seqs)
    lengths = torch.tensor([s.size(0) for s in seqs], dtype=torch.int64)  # (B,)
    steps = int(lengths.max())
    trailing = seqs[0].shape[1:]
    shape = (batch, steps) if batch_first else (steps, batch)
    padded = seqs[0].new_full((batch * steps,) + trailing, padding_value)  # (B*T, *) or (T*B, *)
    if steps == 0:
        return padded.view(shape + trailing)

    b_idx, t_idx = _sequence_major_steps(lengths, steps)  # (N,), (N,) = rows of the cat
    if padding_side == "left":
        t_idx = t_idx + (steps - lengths)[b_idx]
    flat = b_idx * steps + t_idx if batch_first else t_idx * batch + b_idx  # (N,)
    data = torch.cat(seqs, 0)  # (N, *)
    padded.index_copy_(0, flat.to(data.device), data)  # one scatter of the N real rows
    return padded.view(shape + trailing)


def unpad_sequence(padded_sequences: Tensor, lengths, batch_first: bool = False) -> list[Tensor]:
    """Split a padded batch into a list of its sequences: the inverse of :func:`pad_sequence`.

    Unlike torch's, it never modifies ``padded_sequences`` (torch transposes it in place).

    Args:
        padded_sequences (Tensor): ``(T, B, *)``, or ``(B, T, *)`` if ``batch_first``.
        lengths: ``B`` lengths in ``[0, T]`` (list, tuple, numpy array, integer tensor).
        batch_first (bool): layout of ``padded_sequences``. Default: ``False``.

    Returns:
        list of ``B`` tensors ``(L_b, *)`` (empty ``(0, *)`` for length 0); each is a view into
        one fresh buffer, so they never alias ``padded_sequences``.

    >>> unpad_sequence(torch.tensor([[1, 2, 3], [4, 0, 0]]), [3, 1], batch_first=True)
    [tensor([1, 2, 3]), tensor([4])]
    """
    _check_tensor(padded_sequences, "padded_sequences", min_dim=2)
    _check_bool(batch_first, "batch_first")
    batch_dim, time_dim = (0, 1) if batch_first else (1, 0)
    batch, steps = padded_sequences.size(batch_dim), padded_sequences.size(time_dim)
    lengths = as_lengths(lengths, batch, max_length=steps)
    b_idx, t_idx = _sequence_major_steps(lengths, steps)  # (N,), (N,)
    rows = _gather_steps(padded_sequences, b_idx, t_idx, batch_first)  # (N, *)
    return list(rows.split(lengths.tolist(), 0))


def pack_sequence(sequences, enforce_sorted: bool | None = None) -> PackedSequence:
    """Pack a list of variable-length tensors (``pad_sequence`` + ``pack_padded_sequence``).

    Args:
        sequences: non-empty list of ``(L_b, *)`` tensors, same trailing shape, dtype, device.
            Zero-length sequences are allowed (NOTE [zero-length sequences]).
        enforce_sorted (bool or None): as in :func:`pack_padded_sequence`; default ``None``
            sorts only if needed (NOTE [enforce_sorted default]).

    Returns:
        :class:`PackedSequence`, identical to torch's for the same explicit arguments. Built by
        one gather from the concatenated sequences (no padded intermediate).

    >>> p = pack_sequence([torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6])])
    >>> p.data, p.batch_sizes
    (tensor([1, 4, 6, 2, 5, 3]), tensor([3, 2, 1]))
    """
    seqs = _check_sequences(sequences)
    if enforce_sorted is not None:
        _check_bool(enforce_sorted, "enforce_sorted")
    batch = len(seqs)
    lengths = torch.tensor([s.size(0) for s in seqs], dtype=torch.int64)  # (B,)
    sorted_lengths, sorted_indices, unsorted_indices = packing_order(
        lengths, enforce_sorted, name="sequences"
    )

    batch_sizes, t_idx, b_idx = _layout_from_lengths(sorted_lengths, sorted_indices)  # (T,), (N,), (N,)
    starts = torch.cumsum(lengths, 0) - lengths  # (B,) first row of each sequence in the cat
    device = seqs[0].device
    data = torch.cat(seqs, 0).index_select(0, (starts[b_idx] + t_idx).to(device))  # (N, *)
    if sorted_indices is not None:
        sorted_indices = sorted_indices.to(device)
        unsorted_indices = unsorted_indices.to(device)
    return _validated(PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices), batch)


def unpack_sequence(packed_sequences) -> list[Tensor]:
    """Unpack a PackedSequence into the list of its sequences, in original order.

    Args:
        packed_sequences (PackedSequence): packrnn's or torch's.

    Returns:
        list of ``B`` tensors ``(L_b, *)``; an empty ``(0, *)`` tensor for a zero-length
        sequence. One gather; the tensors are views into one fresh buffer.

    >>> unpack_sequence(pack_sequence([torch.tensor([1, 2, 3]), torch.tensor([4])]))
    [tensor([1, 2, 3]), tensor([4])]
    """
    batch = check_packed_sequence(packed_sequences, "packed_sequences")
    data, batch_sizes, sorted_indices, unsorted_indices = packed_sequences
    sorted_lengths = lengths_from_batch_sizes(batch_sizes, batch)  # (B,)
    if unsorted_indices is None:
        column, lengths = torch.arange(batch), sorted_lengths  # (B,) sorted column of sequence b
    else:
        column = unsorted_indices.cpu()
        lengths = sorted_lengths[column]  # (B,) original order
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes  # (T,) first packed row of step t
    b_idx, t_idx = _sequence_major_steps(lengths, batch_sizes.numel())  # (N,), (N,)
    rows = data.index_select(0, (offsets[t_idx] + column[b_idx]).to(data.device))  # (N, *)
    return list(rows.split(lengths.tolist(), 0))
