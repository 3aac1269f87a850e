"""Readable per-step recurrences in plain PyTorch: the oracle for the fast paths and the fallback.

Nothing here is optimised. Each cell is the textbook formula (torch's gate order), and
``recurrence`` walks the packed rows one step at a time, letting autograd do the backward.
The lean backend (``_lean.py``) and the native kernel are tested against these functions and
against ``torch.nn``.

Letters: B batch, E input size, H hidden size, P proj_size, H_out = P or H, N packed rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["rnn_tanh_cell", "rnn_relu_cell", "lstm_cell", "gru_cell", "recurrence",
           "recurrence_from_gates"]


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = x @ weight.t()
    return out if bias is None else out + bias


def rnn_tanh_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """h' = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh); x (B, E), h (B, H) -> (B, H)."""
    return torch.tanh(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


def rnn_relu_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """h' = relu(x W_ih^T + b_ih + h W_hh^T + b_hh); x (B, E), h (B, H) -> (B, H)."""
    return torch.relu(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None,
              w_hr: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One LSTM step; x (B, E), h (B, H_out), c (B, H) -> (h' (B, H_out), c' (B, H)).

    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x W_ih^T + b_ih + h W_hh^T + b_hh);
    c' = f * c + i * g;  h' = o * tanh(c'), then h' W_hr^T if there is a projection.
    """
    pre = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)  # (B, 4H)
    i, f, g, o = pre.chunk(4, 1)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)  # (B, H)
    if w_hr is not None:
        h_next = h_next @ w_hr.t()  # (B, P)
    return h_next, c_next


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
             b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None) -> Tensor:
    """One GRU step; x (B, E), h (B, H) -> (B, H).

    r, z = sigmoid of (x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z});
    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn));  h' = (1 - z) * n + z * h.
    """
    gx = _linear(x, w_ih, b_ih)  # (B, 3H)
    gh = _linear(h, w_hh, b_hh)  # (B, 3H)
    x_r, x_z, x_n = gx.chunk(3, 1)
    h_r, h_z, h_n = gh.chunk(3, 1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def recurrence(*, mode: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor],
               w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
               w_hr: Optional[Tensor], reverse: bool
               ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction over packed rows, one step at a time (differentiable).

    Args:
        mode: "rnn_tanh", "rnn_relu", "lstm" or "gru".
        x: (N, E) packed input rows, sequences sorted longest first.
        batch_sizes: (T,) int64, non-increasing.
        h0: (B, H_out), B >= batch_sizes[0]; c0: (B, H) for lstm else None.
        w_ih, w_hh, b_ih, b_hh, w_hr: the layer's weights as torch names them.
        reverse: run from each sequence's last step down to its first.

    Returns:
        output (N, H_out), h_n (B, H_out), c_n (B, H) or None. See NOTE [Backend contract]
        in ``_lean.py`` for the state algorithm.
    """
    sizes = batch_sizes.tolist()
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    h, c = h0, c0
    outputs: list[Optional[Tensor]] = [None] * len(sizes)
    for t in order:
        size, x_t = sizes[t], x[offsets[t] : offsets[t] + sizes[t]]
        if mode == "lstm":
            h_new, c_new = lstm_cell(x_t, h[:size], c[:size], w_ih, w_hh, b_ih, b_hh, w_hr)
            c = torch.cat([c_new, c[size:]], 0)
        elif mode == "gru":
            h_new = gru_cell(x_t, h[:size], w_ih, w_hh, b_ih, b_hh)
        elif mode == "rnn_tanh":
            h_new = rnn_tanh_cell(x_t, h[:size], w_ih, w_hh, b_ih, b_hh)
        elif mode == "rnn_relu":
            h_new = rnn_relu_cell(x_t, h[:size], w_ih, w_hh, b_ih, b_hh)
        else:
            raise ValueError(f"mode: expected rnn_tanh, rnn_relu, lstm or gru, got {mode!r}")
        # Finished (or not yet started) sequences keep their state in rows [size, B).
        h = torch.cat([h_new, h[size:]], 0)
        outputs[t] = h_new
    if not outputs:
        output = x.new_zeros(0, h0.shape[1])
    else:
        output = torch.cat(outputs, 0)  # (N, H_out)
    return output, h, c


def recurrence_from_gates(*, mode: str, gates_x: Tensor, batch_sizes: Tensor, h0: Tensor,
                          c0: Optional[Tensor], w_hh: Tensor, b_hh: Optional[Tensor],
                          w_hr: Optional[Tensor], reverse: bool, padded: bool = False
                          ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The backend contract's time loop, one step at a time in differentiable torch ops.

    Same arguments and results as a backend's ``recurrence_forward`` (NOTE [Backend contract]
    in ``_lean.py``): ``gates_x`` (N, G*H) holds ``x W_ih^T + b_ih`` (+ ``b_hh`` for rnn/lstm;
    gru passes ``b_hh``). ``padded``: the rows are a time-major padded batch sorted longest
    first, step t at rows ``[t*B, t*B + batch_sizes[t])`` with B = h0's rows (NOTE [Padded
    layout] in recurrence.cpp); padding rows of the output are zero. Used for second
    derivatives of the native kernel (NOTE [Second derivatives] in ``_ops.py``).

    Returns output (N, H_out), h_n (B, H_out), c_n (B, H) or None.
    """
    sizes = batch_sizes.tolist()
    batch, width = h0.shape[0], h0.shape[1]
    offsets = [t * batch for t in range(len(sizes))] if padded else \
        [sum(sizes[:t]) for t in range(len(sizes))]
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    h, c = h0, c0
    outputs: list[Optional[Tensor]] = [None] * len(sizes)
    for t in order:
        size, gx = sizes[t], gates_x[offsets[t] : offsets[t] + sizes[t]]  # (b_t, G*H)
        h_prev = h[:size]  # (b_t, H_out)
        if mode == "lstm":
            i, f, g, o = (gx + h_prev @ w_hh.t()).chunk(4, 1)
            c_new = torch.sigmoid(f) * c[:size] + torch.sigmoid(i) * torch.tanh(g)  # (b_t, H)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = h_new @ w_hr.t()  # (b_t, P)
            c = torch.cat([c_new, c[size:]], 0)
        elif mode == "gru":
            x_r, x_z, x_n = gx.chunk(3, 1)
            h_r, h_z, h_n = _linear(h_prev, w_hh, b_hh).chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            h_new = (1 - z) * torch.tanh(x_n + r * h_n) + z * h_prev
        elif mode in ("rnn_tanh", "rnn_relu"):
            pre = gx + h_prev @ w_hh.t()
            h_new = torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)
        else:
            raise ValueError(f"mode: expected rnn_tanh, rnn_relu, lstm or gru, got {mode!r}")
        h = torch.cat([h_new, h[size:]], 0)
        outputs[t] = torch.cat([h_new, h_new.new_zeros(batch - size, width)], 0) if padded \
            else h_new
    if not outputs:
        output = gates_x.new_zeros(0, width)
    else:
        output = torch.cat(outputs, 0)  # (N, H_out)
    return output, h, c
