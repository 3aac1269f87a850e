"""The pure-PyTorch "lean" recurrence backend: the time loop of one layer in one direction.

This module implements the backend contract (``recurrence_forward`` / ``recurrence_backward`` and
their per-layer ``_directions`` forms, see NOTE [Backend contract] below) with plain tensor
operations. It is the default where the native kernel is not available and the fast path that
the per-step reference in ``_reference.py`` checks.

What makes it lean:

* the input projection is not here: the caller did it for all rows in one GEMM (``gates_x``);
* step ``t`` touches only the active prefix ``[0, batch_sizes[t])`` of the state, never padding;
* every buffer is allocated once before the loop; the loop writes into slices of it
  (``out=`` / in-place ops), so a step allocates only small temporaries of the active rows;
* what backward needs is saved per real row: ``O(N * G * H)``, never ``O(B * T)``;
* backward runs only the recurrent part per step; the weight gradient ``grad_w_hh`` is one GEMM
  over all rows after the loop.

NOTE [Backend contract]
    Letters: T steps, B batch, N packed rows (= sum(batch_sizes)), E input size, H hidden size,
    P proj_size, H_out = P if P > 0 else H, G gates (rnn 1, lstm 4, gru 3).
    Rows of step t are ``[off_t, off_t + batch_sizes[t])`` with ``off_t = sum(batch_sizes[:t])``;
    sequences are sorted longest first, so the active sequences of step t are state rows
    ``[0, batch_sizes[t])``. The state buffer has B >= batch_sizes[0] rows; rows past
    batch_sizes[0] are zero-length sequences and keep h0. The forward direction runs
    t = 0..T-1; the reverse direction runs t = T-1..0, and a sequence joins (from its h0) at
    its own last step. Either way, after the loop the state buffer is h_n.
    ``gates_x`` holds ``x @ w_ih^T + b_ih`` (+ ``b_hh`` folded in for rnn/lstm; gru passes
    ``b_hh`` separately because ``r`` multiplies ``h @ w_hn^T + b_hn``).

    Entry points. ``recurrence_forward`` / ``recurrence_backward`` run one direction and define
    the semantics. ``functional`` calls only the per-layer forms, ``recurrence_forward_directions``
    / ``recurrence_backward_directions``: ``directions`` is a list with one dict of the
    per-direction keywords for each direction (direction 1 is the reverse one), and the result
    is a list with one per-direction result each. A backend may run the directions
    concurrently (the native kernel does: one parallel region); this one loops over them.
    Gradients handed to backward may be None where the loss did not use that output (h_n,
    c_n, or the output rows): they count as zero. ``grad_output`` may be a non-contiguous
    column block of the layer's (N, D*H_out) gradient.

    The native backend adds two things beyond this contract (``packrnn._native``): its entry
    points are registered torch operators, and ``layer_forward`` runs a whole layer (the input
    projections too) as one operator with registered autograd, which ``functional`` calls in
    place of the projections + ``recurrence_forward_directions`` + its own autograd.Function;
    and a ``padded`` flag, for rows in the padded layout (NOTE [Padded layout] in
    recurrence.cpp). This backend runs packed rows only; ``functional`` gathers the real rows of
    a padded call for it (NOTE [Compact padded calls]).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from packrnn.packing import _layout_from_batch_sizes

__all__ = ["recurrence_forward", "recurrence_backward", "recurrence_forward_directions",
           "recurrence_backward_directions"]

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}

# NOTE [tanh through sigmoid]
# On CPU, torch's tanh goes through a vectorised math library that splits even a (64, 128)
# tensor across threads; with 2 threads on a busy machine one step's tanh cost up to 100x a
# sigmoid of the same size (measured: 1.9 ms vs 21 us). The time loop therefore computes
# tanh(x) = 2 * sigmoid(2 x) - 1 (absolute difference <= 4e-16 in float64, 2e-7 in float32,
# within every tolerance the oracle tests use). Whole-tensor (N-row) tanh calls outside the
# loop keep torch.tanh, where the threads pay off.


def _tanh_(t: Tensor) -> Tensor:
    """In-place tanh of a small per-step tensor; see NOTE [tanh through sigmoid]."""
    return t.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _steps(batch_sizes: Tensor, reverse: bool) -> list[tuple[int, int]]:
    """(row offset, active rows) for each step, in the order the forward loop visits them."""
    sizes = batch_sizes.tolist()
    offsets = [0] * len(sizes)
    total = 0
    for t, size in enumerate(sizes):
        offsets[t] = total
        total += size
    steps = list(zip(offsets, sizes))
    return steps[::-1] if reverse else steps


def _max_active(batch_sizes: Tensor) -> int:
    """Rows of the largest step: batch_sizes[0] (0 for an empty batch)."""
    return int(batch_sizes[0]) if batch_sizes.numel() else 0


def _prev_row_index(batch_sizes: Tensor, reverse: bool, batch: int) -> Tensor:
    """For each packed row, where its previous state lives in ``cat([init (B), rows (N)])``.

    Forward direction: row (t, b) follows row (t-1, b), or the initial state at t = 0.
    Reverse direction: row (t, b) follows row (t+1, b) if sequence b is still active at t+1,
    else the initial state (b's own last step).
    """
    sizes = batch_sizes.to(torch.int64)
    steps = sizes.numel()
    offsets = torch.cumsum(sizes, 0) - sizes  # (T,)
    _, step_of_row, col_of_row = _layout_from_batch_sizes(sizes, _max_active(sizes))  # (N,), (N,)
    if reverse:
        nxt = (step_of_row + 1).clamp(max=max(steps - 1, 0))
        has_prev = (step_of_row + 1 < steps) & (col_of_row < sizes[nxt])
        prev = batch + offsets[nxt] + col_of_row
    else:
        before = (step_of_row - 1).clamp(min=0)
        has_prev = step_of_row > 0
        prev = batch + offsets[before] + col_of_row
    return torch.where(has_prev, prev, col_of_row)  # (N,)


def _gather_prev(init: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """Each row's previous state, (N, X), from the initial states (B, X) and all rows (N, X)."""
    return torch.cat([init, rows], 0).index_select(0, index)  # (N, X)


def _add_grad(dh: Tensor, grad_output: Optional[Tensor], rows: slice) -> Tensor:
    """dh += grad_output[rows] in place (nothing when grad_output is None: zero); returns dh."""
    return dh if grad_output is None else dh.add_(grad_output[rows])


def recurrence_forward(
    *,
    mode: str,
    gates_x: Tensor,
    batch_sizes: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    reverse: bool,
    need_backward: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor], tuple[Tensor, ...]]:
    """Run the time loop of one layer in one direction (see NOTE [Backend contract]).

    Args:
        mode: "rnn_tanh", "rnn_relu", "lstm" or "gru".
        gates_x: (N, G*H) input projections of every packed row, biases folded in.
        batch_sizes: (T,) int64 on CPU, non-increasing.
        h0: (B, H_out) initial hidden state in sorted order, B >= batch_sizes[0].
        c0: (B, H) initial cell state (lstm), else None.
        w_hh: (G*H, H_out) recurrent weight.
        b_hh: (G*H,) recurrent bias for gru, else None.
        w_hr: (P, H) projection weight (lstm with proj_size > 0), else None.
        reverse: run t = T-1..0 instead of 0..T-1.
        need_backward: if False, save nothing and use one small scratch buffer.

    Returns:
        output (N, H_out), h_n (B, H_out), c_n (B, H) or None, and ``saved``: the activations
        ``recurrence_backward`` needs (lstm: gates (N, 4H) and c (N, H); gru: gates (N, 3H)
        and the hidden n-term (N, H); rnn: nothing beyond ``output``).
    """
    gate_count = _GATES[mode]
    rows_total = gates_x.shape[0]
    hidden = w_hh.shape[0] // gate_count
    steps = _steps(batch_sizes, reverse)
    max_active = _max_active(batch_sizes)
    opts = dict(dtype=gates_x.dtype, device=gates_x.device)

    h = h0.clone()  # (B, H_out) the running state; after the loop it is h_n
    output = torch.empty(rows_total, h0.shape[1], **opts)  # (N, H_out)
    w_hh_t = w_hh.t()  # (H_out, G*H)

    if mode in ("rnn_tanh", "rnn_relu"):
        for off, size in steps:
            out_t = output[off : off + size]  # (b, H)
            torch.addmm(gates_x[off : off + size], h[:size], w_hh_t, out=out_t)
            if mode == "rnn_tanh":
                _tanh_(out_t)
            else:
                out_t.relu_()
            h[:size].copy_(out_t)
        return output, h, None, ()

    if mode == "lstm":
        c = c0.clone()  # (B, H)
        if need_backward:
            gates = torch.empty(rows_total, 4 * hidden, **opts)  # (N, 4H) post-activation
            cells = torch.empty(rows_total, hidden, **opts)  # (N, H) c after each row's step
        else:
            gates = torch.empty(max_active, 4 * hidden, **opts)  # (b0, 4H) scratch
            cells = torch.empty(max_active, hidden, **opts)  # (b0, H) scratch
        hpre = torch.empty(max_active, hidden, **opts) if w_hr is not None else None  # (b0, H)
        tanh_c = torch.empty(max_active, hidden, **opts)  # (b0, H) scratch
        for off, size in steps:
            rows = slice(off, off + size) if need_backward else slice(0, size)
            g_t = gates[rows]  # (b, 4H)
            torch.addmm(gates_x[off : off + size], h[:size], w_hh_t, out=g_t)  # (b, 4H)
            i, f, g, o = g_t.chunk(4, 1)  # 4 x (b, H) views
            g.mul_(2.0)  # one sigmoid over all gates; g = 2 * sigmoid(2 x) - 1 = tanh(x)
            g_t.sigmoid_()
            g.mul_(2.0).sub_(1.0)
            c_t = cells[rows]  # (b, H)
            torch.mul(f, c[:size], out=c_t)
            c_t.addcmul_(i, g)
            c[:size].copy_(c_t)
            tc = _tanh_(torch.mul(c_t, 1.0, out=tanh_c[:size]))  # (b, H) tanh(c)
            out_t = output[off : off + size]  # (b, H_out)
            if w_hr is None:
                torch.mul(o, tc, out=out_t)
            else:
                torch.mul(o, tc, out=hpre[:size])
                torch.mm(hpre[:size], w_hr.t(), out=out_t)  # (b, H) x (H, P) -> (b, P)
            h[:size].copy_(out_t)
        saved = (gates, cells) if need_backward else ()
        return output, h, c, saved

    if mode == "gru":
        if need_backward:
            gates = torch.empty(rows_total, 3 * hidden, **opts)  # (N, 3H) r, z, n
            hidden_n = torch.empty(rows_total, hidden, **opts)  # (N, H) h @ w_hn^T + b_hn
        else:
            gates = torch.empty(max_active, 3 * hidden, **opts)  # (b0, 3H) scratch
            hidden_n = torch.empty(max_active, hidden, **opts)  # (b0, H) scratch
        gh = torch.empty(max_active, 3 * hidden, **opts)  # (b0, 3H) scratch
        bias = b_hh if b_hh is not None else torch.zeros(3 * hidden, **opts)  # (3H,)
        for off, size in steps:
            rows = slice(off, off + size) if need_backward else slice(0, size)
            gh_t = torch.addmm(bias, h[:size], w_hh_t, out=gh[:size])  # (b, 3H)
            g_t = gates[rows]  # (b, 3H)
            gx_t = gates_x[off : off + size]  # (b, 3H)
            torch.add(gx_t[:, : 2 * hidden], gh_t[:, : 2 * hidden], out=g_t[:, : 2 * hidden])
            g_t[:, : 2 * hidden].sigmoid_()  # r, z
            r, z, n = g_t.chunk(3, 1)  # 3 x (b, H) views
            hidden_n[rows].copy_(gh_t[:, 2 * hidden :])
            torch.addcmul(gx_t[:, 2 * hidden :], r, gh_t[:, 2 * hidden :], out=n)  # (b, H) n pre-activation
            _tanh_(n)
            out_t = output[off : off + size]  # (b, H)
            # h' = (1 - z) * n + z * h = n + z * (h - n)
            torch.sub(h[:size], n, out=out_t)
            out_t.mul_(z).add_(n)
            h[:size].copy_(out_t)
        saved = (gates, hidden_n) if need_backward else ()
        return output, h, None, saved

    raise ValueError(f"mode: expected one of {sorted(_GATES)}, got {mode!r}")


def recurrence_backward(
    *,
    mode: str,
    grad_output: Optional[Tensor],
    grad_h_n: Optional[Tensor],
    grad_c_n: Optional[Tensor],
    batch_sizes: Tensor,
    h0: Tensor,
    c0: Optional[Tensor],
    w_hh: Tensor,
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    reverse: bool,
    output: Tensor,
    saved: tuple[Tensor, ...],
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
    """Backward through time of ``recurrence_forward`` (same arguments, see NOTE [Backend contract]).

    Args:
        grad_output: (N, H_out) gradient of ``output`` (any strides), or None for zero.
        grad_h_n: (B, H_out) gradient of ``h_n``, or None for zero.
        grad_c_n: (B, H) gradient of ``c_n`` (lstm), or None (zero; always None otherwise).
        output, saved: what ``recurrence_forward(need_backward=True)`` returned.

    Returns:
        grad_gates_x (N, G*H), grad_h0 (B, H_out), grad_c0 (B, H) or None,
        grad_w_hh (G*H, H_out), grad_b_hh (G*H,) for gru else None, grad_w_hr (P, H) or None.
    """
    gate_count = _GATES[mode]
    hidden = w_hh.shape[0] // gate_count
    # Backward visits the steps in the opposite order of forward.
    steps = _steps(batch_sizes, not reverse)
    prev_index = _prev_row_index(batch_sizes, reverse, h0.shape[0]).to(output.device)  # (N,)
    h_prev = _gather_prev(h0, output, prev_index)  # (N, H_out) state each row started from
    grad_gates_x = torch.empty(output.shape[0], w_hh.shape[0], dtype=output.dtype,
                               device=output.device)  # (N, G*H)
    opts = dict(dtype=output.dtype, device=output.device)
    # (B, H_out) gradient of the running state
    dh = grad_h_n.clone() if grad_h_n is not None else torch.zeros(h0.shape, **opts)

    # The derivative factors of every row are computed once, vectorised over all N rows; the
    # loop then only chains them through time (a handful of ops into preallocated slices, and
    # the recurrent GEMM).
    if mode in ("rnn_tanh", "rnn_relu"):
        if mode == "rnn_tanh":
            d_act = 1.0 - output * output  # (N, H) tanh' at each row
        else:
            d_act = (output > 0).to(output.dtype)  # (N, H) relu' at each row
        for off, size in steps:
            rows = slice(off, off + size)
            dh_t = _add_grad(dh[:size], grad_output, rows)  # (b, H)
            d_pre = torch.mul(dh_t, d_act[rows], out=grad_gates_x[rows])  # (b, H)
            torch.mm(d_pre, w_hh, out=dh[:size])  # (b, H) x (H, H) -> (b, H)
        grad_w_hh = grad_gates_x.t().mm(h_prev)  # (H, H_out)
        return grad_gates_x, dh, None, grad_w_hh, None, None

    if mode == "lstm":
        gates, cells = saved  # (N, 4H) i, f, g, o after activation; (N, H) c
        c_prev = _gather_prev(c0, cells, prev_index)  # (N, H)
        tanh_c = torch.tanh(cells)  # (N, H)
        d_tanh_c = 1.0 - tanh_c * tanh_c  # (N, H)
        d_act = gates * (1.0 - gates)  # (N, 4H) sigmoid' of i, f, o ...
        g_all = gates[:, 2 * hidden : 3 * hidden]
        torch.mul(g_all, g_all, out=d_act[:, 2 * hidden : 3 * hidden]).neg_().add_(1.0)  # tanh' of g
        # (B, H) gradient of the running cell state
        dc = grad_c_n.clone() if grad_c_n is not None else torch.zeros(c0.shape, **opts)
        d_proj = torch.empty_like(output) if w_hr is not None else None  # (N, P) grad of h'
        d_hpre = torch.empty(_max_active(batch_sizes), hidden, dtype=output.dtype,
                             device=output.device) if w_hr is not None else None  # (b0, H)
        for off, size in steps:
            rows = slice(off, off + size)
            dh_t = _add_grad(dh[:size], grad_output, rows)  # (b, H_out)
            if w_hr is not None:
                d_proj[rows].copy_(dh_t)
                dh_t = torch.mm(dh_t, w_hr, out=d_hpre[:size])  # (b, H) grad of o * tanh(c)
            i, f, g, o = gates[rows].chunk(4, 1)  # 4 x (b, H)
            dg_t = grad_gates_x[rows]  # (b, 4H) grads of the gate pre-activations
            di, df, dgg, do = dg_t.chunk(4, 1)  # 4 x (b, H) views to fill
            torch.mul(dh_t, tanh_c[rows], out=do)
            # dc = dc_next + dh * o * tanh'(c), using the i slot as scratch
            dc_t = dc[:size].add_(torch.mul(dh_t, o, out=di).mul_(d_tanh_c[rows]))
            torch.mul(dc_t, g, out=di)
            torch.mul(dc_t, c_prev[rows], out=df)
            torch.mul(dc_t, i, out=dgg)
            dg_t.mul_(d_act[rows])
            dc_t.mul_(f)
            torch.mm(dg_t, w_hh, out=dh[:size])  # (b, 4H) x (4H, H_out) -> (b, H_out)
        grad_w_hh = grad_gates_x.t().mm(h_prev)  # (4H, H_out)
        grad_w_hr = None
        if w_hr is not None:
            grad_w_hr = d_proj.t().mm(gates[:, 3 * hidden :] * tanh_c)  # (P, H)
        return grad_gates_x, dh, dc, grad_w_hh, None, grad_w_hr

    if mode == "gru":
        gates, hidden_n = saved  # (N, 3H) r, z, n; (N, H) h @ w_hn^T + b_hn
        r, z, n = gates.chunk(3, 1)  # 3 x (N, H)
        # with dh the gradient of h' at a row:
        #   dn_pre = dh * (1 - z) * (1 - n^2)                 = dh * f_n
        #   dz_pre = dh * (h - n) * z * (1 - z)               = dh * f_z
        #   dr_pre = dn_pre * (h @ w_hn^T + b_hn) * r * (1 - r) = dn_pre * f_r
        f_n = (1.0 - z) * (1.0 - n * n)  # (N, H)
        f_z = (h_prev - n) * z * (1.0 - z)  # (N, H)
        f_r = hidden_n * r * (1.0 - r)  # (N, H)
        # the hidden pre-activation h @ w_hh^T + b_hh gets [dr_pre, dz_pre, dn_pre * r]
        grad_gh = torch.empty_like(grad_gates_x)  # (N, 3H)
        dn_all = torch.empty_like(hidden_n)  # (N, H) dn_pre
        for off, size in steps:
            rows = slice(off, off + size)
            dh_t = _add_grad(dh[:size], grad_output, rows)  # (b, H)
            dgh = grad_gh[rows]  # (b, 3H)
            dr, dz, dn_r = dgh.chunk(3, 1)  # 3 x (b, H) views to fill
            dn = torch.mul(dh_t, f_n[rows], out=dn_all[rows])  # (b, H)
            torch.mul(dh_t, f_z[rows], out=dz)
            torch.mul(dn, f_r[rows], out=dr)
            torch.mul(dn, r[rows], out=dn_r)
            dh_t.mul_(z[rows])  # the direct path h' = ... + z * h
            dh[:size].addmm_(dgh, w_hh)
        grad_gates_x.copy_(grad_gh)
        grad_gates_x[:, 2 * hidden :].copy_(dn_all)
        grad_w_hh = grad_gh.t().mm(h_prev)  # (3H, H)
        grad_b_hh = grad_gh.sum(0)  # (3H,)
        return grad_gates_x, dh, None, grad_w_hh, grad_b_hh, None

    raise ValueError(f"mode: expected one of {sorted(_GATES)}, got {mode!r}")


def recurrence_forward_directions(
    *, mode: str, batch_sizes: Tensor, need_backward: bool, directions: Sequence[dict]
) -> list[tuple[Tensor, Tensor, Optional[Tensor], tuple[Tensor, ...]]]:
    """Every direction of one layer: ``directions[k]`` holds direction k's keywords of
    :func:`recurrence_forward` but ``reverse`` (``gates_x, h0, c0, w_hh, b_hh, w_hr``);
    direction 1 runs reversed. Returns one :func:`recurrence_forward` result per direction.
    """
    _check_directions(directions)
    return [recurrence_forward(mode=mode, batch_sizes=batch_sizes, need_backward=need_backward,
                               reverse=k == 1, **d)
            for k, d in enumerate(directions)]


def recurrence_backward_directions(
    *, mode: str, batch_sizes: Tensor, directions: Sequence[dict]
) -> list[tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]]:
    """Backward of :func:`recurrence_forward_directions`: ``directions[k]`` holds direction k's
    keywords of :func:`recurrence_backward` but ``reverse`` (``grad_output, grad_h_n, grad_c_n,
    h0, c0, w_hh, b_hh, w_hr, output, saved``). Returns one result per direction.
    """
    _check_directions(directions)
    return [recurrence_backward(mode=mode, batch_sizes=batch_sizes, reverse=k == 1, **d)
            for k, d in enumerate(directions)]


def _check_directions(directions: Sequence[dict]) -> None:
    if len(directions) not in (1, 2):
        raise ValueError(f"directions: expected 1 or 2 entries, got {len(directions)}")
