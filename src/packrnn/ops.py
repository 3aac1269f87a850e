"""Packed-aware ops: masks, pooling over real steps, last real step, per-sequence reverse.

Every op takes either a :class:`~packrnn.PackedSequence` (packrnn's or torch's), or a padded
tensor ``(T, B, *)`` (``(B, T, *)`` if ``batch_first``) with ``lengths``. Results are in the
original batch order (a packed batch's ``unsorted_indices`` are applied), and never depend on
what the padded positions hold (NaN there is harmless): gradients at padded positions are 0.

Shape letters: ``T`` time, ``B`` batch, ``N`` packed rows, ``*`` trailing feature dims.
"""

# NOTE [zero-length sequences in ops]
#
# A sequence of length 0 has no real step to pool or pick. mean_pool, max_pool and last_step
# return ZEROS for it (with zero gradient to the input), so a classifier sees a fixed "empty"
# summary instead of NaN or -inf. reverse_sequences leaves it unchanged. packrnn's
# PackedSequence can hold such sequences (NOTE [zero-length sequences] in packrnn.packing).

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence as _TorchPackedSequence

from .packing import (
    PackedSequence,
    _check_bool,
    _layout_from_batch_sizes,
    _validated,
    as_lengths,
    check_packed_sequence,
)

__all__ = ["lengths_to_mask", "mean_pool", "max_pool", "last_step", "reverse_sequences"]


def lengths_to_mask(
    lengths,
    max_length: int | None = None,
    batch_first: bool = False,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask that is True at real steps: ``mask[t, b] = t < lengths[b]``.

    Args:
        lengths: ``B`` non-negative lengths (list, tuple, numpy array or integer tensor).
        max_length (int, optional): ``T``; default ``max(lengths)`` (0 for an empty batch).
        batch_first (bool): return ``(B, T)`` if True, else ``(T, B)``. Default: False.
        device: where to build the mask; default the device of a ``lengths`` tensor, else CPU.

    Returns:
        bool tensor ``(T, B)`` (or ``(B, T)``).

    >>> lengths_to_mask([3, 1], batch_first=True)
    tensor([[ True,  True,  True],
            [ True, False, False]])
    """
    if device is None:
        device = lengths.device if isinstance(lengths, Tensor) else "cpu"
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length,
                                                          (numbers.Integral, torch.SymInt)):
            raise TypeError(f"max_length: expected None or a non-negative int, got {max_length!r}")
        if max_length < 0:
            raise ValueError(f"max_length: expected None or a non-negative int, got {max_length!r}")
        if not isinstance(max_length, torch.SymInt):  # a traced size stays symbolic
            max_length = int(max_length)
    lengths = as_lengths(lengths, max_length=max_length)
    if max_length is None:
        max_length = int(lengths.max()) if lengths.numel() else 0
    lengths = lengths.to(device)
    steps = torch.arange(max_length, device=device)  # (T,)
    if batch_first:
        return steps.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    return steps.unsqueeze(1) < lengths.unsqueeze(0)  # (T, B)


# ------------------------------------------------------------------------------------------------
# input handling shared by the ops
# ------------------------------------------------------------------------------------------------


class _Packed:
    """Row bookkeeping of a packed batch: which sequence and step every row of ``data`` is."""

    def __init__(self, sequence, name: str = "input") -> None:
        self.batch = check_packed_sequence(sequence, name)  # B
        self.data, self.batch_sizes, self.sorted_indices, self.unsorted_indices = sequence
        self.device = self.data.device
        self.offsets = torch.cumsum(self.batch_sizes, 0) - self.batch_sizes  # (T,) first row of step t
        # (B,) sorted lengths; row n is step t_idx[n] of sorted column j_idx[n], both (N,)
        self.sorted_lengths, self.t_idx, self.j_idx = _layout_from_batch_sizes(self.batch_sizes, self.batch)

    def to_original(self, out: Tensor) -> Tensor:
        """Rows in sorted-column order -> original batch order."""
        if self.unsorted_indices is None:
            return out
        return out.index_select(0, self.unsorted_indices)  # (B, *)


def _padded(input: Tensor, lengths, batch_first: bool, name: str = "input") -> tuple[Tensor, Tensor]:
    """Validate a padded input; return it time-major ``(T, B, *)`` and CPU lengths ``(B,)``."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a PackedSequence or a padded Tensor, got {type(input).__name__}")
    _check_bool(batch_first, "batch_first")
    if input.dim() < 2:
        raise ValueError(f"{name}: expected a padded tensor with at least 2 dimensions (T, B, *), got shape {tuple(input.shape)}")
    x = input.transpose(0, 1) if batch_first else input  # (T, B, *)
    steps, batch = x.shape[0], x.shape[1]
    if lengths is None:
        lengths = torch.full((batch,), steps, dtype=torch.int64)
    else:
        lengths = as_lengths(lengths, batch, max_length=steps)
    return x, lengths


def _is_packed(input, lengths) -> bool:
    if isinstance(input, _TorchPackedSequence):
        if lengths is not None:
            raise ValueError("lengths: expected None for a PackedSequence input (it carries its lengths), got lengths")
        return True
    return False


def _feature_view(mask: Tensor, x: Tensor) -> Tensor:
    """Broadcast a ``(T, B)`` mask over ``x``'s trailing dims."""
    return mask.view(mask.shape + (1,) * (x.dim() - 2))


def _lowest(dtype: torch.dtype) -> float | int:
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


# NOTE [time reductions under inductor]
# A padded (T, B, *) tensor reduced over T is an outer reduction: inductor's CPU code walks T for
# each (b, feature) block with a stride of B * features elements, a power of two in common
# shapes (64 x 256 floats = 64 KiB), so every step of the walk lands in the same cache set and
# misses: the recommended classifier's max pooling (T=45, B=64, 256 features) took ~9 ms in the
# compiled forward against ~2 ms in eager. Traced, the pools therefore move T last and reduce
# over contiguous memory (one transposing copy); eager keeps the time-major reduction.
def _time_last(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(T, B, *)`` values and ``(T, B)`` mask as ``(B, *, T)`` contiguous values and a mask
    broadcasting over them, for a reduction over the last dim (NOTE above)."""
    values = x.movedim(0, -1).contiguous()  # (B, *, T)
    mask = mask.transpose(0, 1).reshape((mask.shape[1],) + (1,) * (x.dim() - 2) + (mask.shape[0],))  # (B, 1..., T)
    return values, mask


# ------------------------------------------------------------------------------------------------
# the ops
# ------------------------------------------------------------------------------------------------


def mean_pool(input, lengths=None, batch_first: bool = False) -> Tensor:
    """Mean over the real steps of each sequence: ``out[b] = sum_{t < L_b} x[t, b] / L_b``.

    Args:
        input: a PackedSequence with ``data`` ``(N, *)``, or a padded tensor ``(T, B, *)``
            (``(B, T, *)`` if ``batch_first``).
        lengths: for a padded tensor, the ``B`` lengths; ``None`` = every sequence has ``T``
            steps (the naive mean that counts padding). Must be None for a PackedSequence.
        batch_first (bool): layout of a padded ``input``. Default: False.

    Returns:
        ``(B, *)`` in original batch order; zeros for a zero-length sequence (NOTE
        [zero-length sequences in ops]). Padded positions get zero gradient.

    >>> mean_pool(torch.tensor([[1., 2.], [3., 0.]]), [2, 1], batch_first=True)
    tensor([1.5000, 3.0000])
    """
    if _is_packed(input, lengths):
        p = _Packed(input)
        index = p.j_idx.to(p.device)  # (N,)
        sums = p.data.new_zeros((p.batch,) + p.data.shape[1:]).index_add(0, index, p.data)  # (B, *) sorted
        denom = p.sorted_lengths.clamp(min=1).to(device=p.device, dtype=sums.dtype)  # (B,)
        return p.to_original(sums / denom.view((-1,) + (1,) * (sums.dim() - 1)))  # (B, *)
    x, lengths = _padded(input, lengths, batch_first)  # (T, B, *), (B,)
    mask = lengths_to_mask(lengths, x.shape[0], device=x.device)  # (T, B)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if torch.compiler.is_compiling():  # NOTE [time reductions under inductor]
        values, mask = _time_last(x, mask)  # (B, *, T), (B, 1..., T)
        sums = torch.where(mask, values, zero).sum(-1)  # (B, *)
    else:
        sums = torch.where(_feature_view(mask, x), x, zero).sum(0)  # (B, *)
    denom = lengths.clamp(min=1).to(device=x.device, dtype=sums.dtype)  # (B,)
    return sums / denom.view((-1,) + (1,) * (sums.dim() - 1))


def max_pool(input, lengths=None, batch_first: bool = False) -> Tensor:
    """Elementwise max over the real steps of each sequence: ``out[b] = max_{t < L_b} x[t, b]``.

    Args: as :func:`mean_pool`.

    Returns:
        ``(B, *)`` in original batch order; zeros for a zero-length sequence (NOTE
        [zero-length sequences in ops]). The gradient goes to the maximizing step; ties share it
        equally (as ``torch.amax``). Padded positions get zero gradient.

    >>> max_pool(torch.tensor([[1., 5.], [3., 9.]]), [2, 1], batch_first=True)
    tensor([5., 3.])
    """
    if _is_packed(input, lengths):
        p = _Packed(input)
        index = p.j_idx.to(p.device).view((-1,) + (1,) * (p.data.dim() - 1)).expand_as(p.data)  # (N, *)
        out = p.data.new_zeros((p.batch,) + p.data.shape[1:])  # (B, *) zero-length rows stay 0
        out = out.scatter_reduce(0, index, p.data, reduce="amax", include_self=False)  # (B, *) sorted
        return p.to_original(out)
    x, lengths = _padded(input, lengths, batch_first)  # (T, B, *), (B,)
    if x.shape[0] == 0:  # no steps at all: every sequence is empty
        return x.new_zeros(x.shape[1:]) + x.sum(0) * 0  # (B, *), keeps the graph
    mask = lengths_to_mask(lengths, x.shape[0], device=x.device)  # (T, B)
    low = torch.full((), _lowest(x.dtype), dtype=x.dtype, device=x.device)
    if torch.compiler.is_compiling():  # NOTE [time reductions under inductor]
        values, mask = _time_last(x, mask)  # (B, *, T), (B, 1..., T)
        out = torch.where(mask, values, low).amax(-1)  # (B, *)
    else:
        out = torch.where(_feature_view(mask, x), x, low).amax(0)  # (B, *)
    empty = _feature_view((lengths == 0).to(x.device).unsqueeze(0), x)[0]  # (B, 1...)
    return torch.where(empty, torch.zeros((), dtype=x.dtype, device=x.device), out)


def last_step(input, lengths=None, batch_first: bool = False, *, bidirectional: bool = False) -> Tensor:
    """The last real step of each sequence: ``out[b] = x[L_b - 1, b]``.

    For the output of a bidirectional RNN (features ``2H``: forward half, then backward half),
    ``bidirectional=True`` returns each direction's final state: the forward half at step
    ``L_b - 1`` and the backward half at step 0 -- for a 1-layer bidirectional LSTM that is
    ``torch.cat([h_n[-2], h_n[-1]], -1)``.

    Args:
        input, lengths, batch_first: as :func:`mean_pool`.
        bidirectional (bool): treat the last dim as ``[forward | backward]`` halves.
            Default: False. The output of a unidirectional packrnn layer is refused
            (NOTE [direction mark]).

    Returns:
        ``(B, *)`` in original batch order; zeros for a zero-length sequence (NOTE
        [zero-length sequences in ops]).

    >>> last_step(torch.tensor([[1., 2., 3.], [4., 5., 0.]]), [3, 2], batch_first=True)
    tensor([3., 5.])
    """
    _check_bool(bidirectional, "bidirectional")
    _check_marked_directions(input, bidirectional)
    if _is_packed(input, lengths):
        p = _Packed(input)
        _check_halves(p.data, bidirectional)
        if p.data.shape[0] == 0:  # every sequence is empty
            return p.to_original(p.data.new_zeros((p.batch,) + p.data.shape[1:]) + p.data.sum(0) * 0)
        columns = torch.arange(p.batch)  # (B,) sorted columns
        real = p.sorted_lengths > 0  # (B,) zero-length columns get a dummy row 0, zeroed below
        last_t = (p.sorted_lengths - 1).clamp(min=0)  # (B,)
        last_rows = torch.where(real, p.offsets[last_t] + columns, 0)  # (B,) packed row of step L-1
        out = _select_rows(p.data, last_rows, real, p.device)  # (B, *)
        if bidirectional:
            first_rows = torch.where(real, columns, 0)  # (B,) packed row of step 0
            out = _join_halves(out, _select_rows(p.data, first_rows, real, p.device))
        return p.to_original(out)
    x, lengths = _padded(input, lengths, batch_first)  # (T, B, *), (B,)
    _check_halves(x, bidirectional)
    real = lengths > 0  # (B,)
    batch_idx = torch.arange(x.shape[1], device=x.device)  # (B,)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1:]) + x.sum(0) * 0
    last_t = (lengths - 1).clamp(min=0).to(x.device)  # (B,)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    keep = real.to(x.device).view((-1,) + (1,) * (x.dim() - 2))  # (B, 1...)
    out = torch.where(keep, x[last_t, batch_idx], zero)  # (B, *)
    if bidirectional:
        out = _join_halves(out, torch.where(keep, x[0], zero))
    return out


def _check_halves(x: Tensor, bidirectional: bool) -> None:
    if bidirectional and (x.dim() < 2 or x.shape[-1] % 2):
        raise ValueError(
            f"input: expected an even feature size [forward | backward] with bidirectional=True, got shape {tuple(x.shape)}"
        )


# NOTE [direction mark]
# A unidirectional output with an even feature size looks like [forward | backward] halves, so
# last_step(bidirectional=True) cannot tell from the shape alone. packrnn's RNN/LSTM/GRU
# therefore mark the output object they return (a PackedSequence's __dict__, or an attribute of
# the padded tensor) with their number of directions and the layer's name, and last_step refuses
# a mark of 1 direction. Anything derived from the output (a view, a sum, torch's layers) has no
# mark and gets only the shape check. Skipped while torch.compile traces (no Python attributes).
_DIRECTIONS = "_packrnn_directions"


def _mark_directions(output, directions: int, layer: str):
    """Mark a recurrent layer's ``output`` with its number of directions (NOTE [direction mark])."""
    if not torch.compiler.is_compiling():
        target = output.__dict__ if isinstance(output, _TorchPackedSequence) else None
        if target is not None:
            target[_DIRECTIONS] = (directions, layer)
        else:
            setattr(output, _DIRECTIONS, (directions, layer))
    return output


def _check_marked_directions(input, bidirectional: bool) -> None:
    if not bidirectional:
        return
    mark = (input.__dict__.get(_DIRECTIONS) if isinstance(input, _TorchPackedSequence)
            else getattr(input, _DIRECTIONS, None))
    if mark is not None and mark[0] == 1:
        raise ValueError("bidirectional: expected the output of a bidirectional RNN with "
                         f"bidirectional=True, got the output of a unidirectional {mark[1]}")


def _select_rows(data: Tensor, rows: Tensor, real: Tensor, device) -> Tensor:
    """``data[rows]`` with zeros where ``real`` is False (zero-length sequences)."""
    picked = data.index_select(0, rows.to(device))  # (B, *)
    keep = real.to(device).view((-1,) + (1,) * (data.dim() - 1))
    return torch.where(keep, picked, torch.zeros((), dtype=data.dtype, device=device))


def _join_halves(forward_source: Tensor, backward_source: Tensor) -> Tensor:
    half = forward_source.shape[-1] // 2
    return torch.cat([forward_source[..., :half], backward_source[..., half:]], -1)  # (B, *, 2H)


def reverse_sequences(input, lengths=None, batch_first: bool = False):
    """Reverse each sequence's real steps; padding stays where it is.

    ``out[t, b] = x[L_b - 1 - t, b]`` for ``t < L_b`` and ``out[t, b] = x[t, b]`` otherwise.
    Packed in -> packed out (same ``batch_sizes`` and indices). Useful for running the backward
    direction of a bidirectional RNN as a forward pass.

    Args: as :func:`mean_pool` (``lengths=None`` reverses all ``T`` steps).

    Returns:
        a PackedSequence, or a padded tensor of ``input``'s shape.

    >>> reverse_sequences(torch.tensor([[1, 2, 3], [4, 5, 0]]), [3, 2], batch_first=True)
    tensor([[3, 2, 1],
            [5, 4, 0]])
    """
    if _is_packed(input, lengths):
        p = _Packed(input)
        # row (t, j) takes row (L_j - 1 - t, j)
        src_t = p.sorted_lengths[p.j_idx] - 1 - p.t_idx  # (N,)
        src = p.offsets[src_t] + p.j_idx if src_t.numel() else src_t  # (N,)
        data = p.data.index_select(0, src.to(p.device))  # (N, *)
        # same fields as the validated input (NOTE [validated PackedSequence] in packrnn.packing)
        return _validated(PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices), p.batch)
    x, lengths = _padded(input, lengths, batch_first)  # (T, B, *), (B,)
    steps = torch.arange(x.shape[0]).unsqueeze(1)  # (T, 1)
    src_t = torch.where(steps < lengths, lengths - 1 - steps, steps).to(x.device)  # (T, B)
    index = src_t.view(src_t.shape + (1,) * (x.dim() - 2)).expand_as(x)  # (T, B, *)
    out = x.gather(0, index)  # (T, B, *)
    return out.transpose(0, 1) if batch_first else out
