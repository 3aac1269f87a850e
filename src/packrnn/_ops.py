"""The native kernel's entry points as torch operators: fake (shape) implementations and autograd.

The C++ library (``_native/recurrence.cpp``) defines the schemas of the ``packrnn`` namespace and
registers their CPU kernels. This module registers, beside them,

* a **fake implementation** of each entry point, which computes only the shapes of its results
  (``torch.compile`` and ``torch.export`` trace with fake tensors and see one opaque op);
* the **autograd formula** of ``layer_forward`` (one layer: input projections and the time loop
  of every direction): its backward is the backward entry point (the hand-written BPTT) and
  GEMMs over all rows for the projections, or, when a graph of the backward is asked for (``create_graph=True``,
  i.e. grad mode is on inside backward), a differentiable recomputation through the readable
  per-step recurrence of ``_reference.py``, so second derivatives are exact, never silently zero
  (NOTE [Second derivatives]).

Nothing else calls the loaded extension: ``_native`` calls ``torch.ops.packrnn.*``, which
dispatches here in eager mode, under ``torch.compile`` and under ``torch.export`` alike.

Letters: T steps, B batch, N rows (packed: sum(batch_sizes); padded layout: T*B), H hidden size,
P proj_size, H_out = P or H, G gates.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["register"]

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
_lock = threading.Lock()
_registered = False


def _saved_shapes(mode: str, rows, hidden: int, has_proj: bool) -> list[tuple]:
    """Shapes of the backend-private tensors forward returns with need_backward (recurrence.h)."""
    if mode == "lstm":
        return [(rows, 4 * hidden), (rows, hidden)] + ([(rows, hidden)] if has_proj else [])
    if mode == "gru":
        return [(rows, 4 * hidden)]
    return []


def _fake_forward(mode, batch_sizes, gates_x, h0, c0, w_hh, b_hh, w_hr, need_backward,
                  padded=False):
    """Shapes of recurrence_forward_directions: per direction [output (N, H_out), h_n (B, H_out),
    (c_n (B, H) lstm), saved...]."""
    result = []
    for k in range(len(gates_x)):
        rows, hidden = gates_x[k].shape[0], w_hh[k].shape[0] // _GATES[mode]
        width = w_hh[k].shape[1]
        result.append(gates_x[k].new_empty(rows, width))
        result.append(h0[k].new_empty(h0[k].shape))
        if mode == "lstm":
            result.append(c0[k].new_empty(c0[k].shape))
        if need_backward:
            result += [gates_x[k].new_empty(s)
                       for s in _saved_shapes(mode, rows, hidden, w_hr[k] is not None)]
    return result


def _fake_backward(mode, batch_sizes, grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr,
                   output, saved, padded=False):
    """Shapes of recurrence_backward_directions: per direction [grad_gates_x (N, G*H),
    grad_h0 (B, H_out), (grad_c0 lstm), grad_w_hh, (grad_b_hh gru), (grad_w_hr with proj)]."""
    result = []
    for k in range(len(output)):
        rows = output[k].shape[0]
        result.append(output[k].new_empty(rows, w_hh[k].shape[0]))
        result.append(h0[k].new_empty(h0[k].shape))
        if mode == "lstm":
            result.append(c0[k].new_empty(c0[k].shape))
        result.append(w_hh[k].new_empty(w_hh[k].shape))
        if mode == "gru":
            result.append(w_hh[k].new_empty(w_hh[k].shape[0]))
        if w_hr[k] is not None:
            result.append(w_hr[k].new_empty(w_hr[k].shape))
    return result


def _fake_single_forward(mode, gates_x, batch_sizes, h0, c0, w_hh, b_hh, w_hr, reverse,
                         need_backward, padded=False):
    return _fake_forward(mode, batch_sizes, [gates_x], [h0], [c0], [w_hh], [b_hh], [w_hr],
                         need_backward, padded)


def _fake_single_backward(mode, grad_output, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh,
                          b_hh, w_hr, reverse, output, saved, padded=False):
    return _fake_backward(mode, batch_sizes, [grad_output], [grad_h_n], [grad_c_n], [h0], [c0],
                          [w_hh], [b_hh], [w_hr], [output], saved, padded)


def _per_direction_count(mode: str, need_backward: bool, has_proj: bool) -> int:
    """How many tensors forward returns per direction."""
    count = 3 if mode == "lstm" else 2
    if need_backward:
        count += len(_saved_shapes(mode, 0, 0, has_proj))
    return count


def _fake_layer(mode, batch_sizes, x, w_ih, bias, h0, c0, w_hh, b_hh, w_hr, need_backward,
                padded):
    """Shapes of layer_forward: those of recurrence_forward_directions on the projections."""
    gates = [x.new_empty(x.shape[0], w.shape[0]) for w in w_ih]
    return _fake_forward(mode, batch_sizes, gates, h0, c0, w_hh, b_hh, w_hr, need_backward,
                         padded)


def _fake_stack(mode, batch_sizes, x, weights, h0, c0, num_layers, bidirectional, has_bias,
                padded):
    """Shapes of stack_forward: [output (N, D*H_out), h_n (L*D, B, H_out), (c_n (L*D, B, H) for
    lstm)]; absent states are zeros of B = batch_sizes[0] (padded layout: N / T) rows."""
    num_dirs = 2 if bidirectional else 1
    per = len(weights) // (num_layers * num_dirs)
    hidden = weights[1].shape[0] // _GATES[mode]
    width = weights[per - 1].shape[0] if per in (3, 5) else hidden  # H_out
    steps = batch_sizes.shape[0]
    if h0 is not None:
        batch = h0.shape[1]
    elif padded:
        batch = x.shape[0] // steps if steps else 0
    else:
        batch = batch_sizes[0] if steps else 0  # data-dependent under tracing: pass h0 there
    slots = num_layers * num_dirs
    result = [x.new_empty(x.shape[0], num_dirs * width), x.new_empty(slots, batch, width)]
    if mode == "lstm":
        result.append(x.new_empty(slots, batch, hidden))
    return result


def _fake_classifier(mode, ids, lengths, embedding, weights, fc_weight, fc_bias, num_layers,
                     bidirectional, has_bias, pooling):
    """Shape of classifier_infer: the logits (B, C) (NOTE [Fused classifier inference])."""
    return embedding.new_empty(ids.shape[0], fc_weight.shape[0])


# ---------------------------------------------------------------------------------------------
# Autograd of layer_forward (one layer: projections + time loop of every direction).
#
# NOTE [Second derivatives]
#   The backward entry point is a hand-written BPTT: fast, but its results carry no graph. When
#   autograd runs this backward with grad mode on (torch.autograd.grad(..., create_graph=True),
#   a gradient penalty, gradgradcheck), the gradients are instead recomputed through
#   _reference.recurrence_from_gates, the per-step recurrence in plain differentiable torch ops,
#   on the very tensors forward saw (the projections recomputed from x); the first derivatives
#   are the same numbers (the reference is the oracle the kernel is tested against) and they
#   now have a graph, so higher derivatives are exact.
# ---------------------------------------------------------------------------------------------

_LAYER_LISTS = ("w_ih", "bias", "h0", "c0", "w_hh", "b_hh", "w_hr")
_OPTIONAL = ("bias", "c0", "b_hh", "w_hr")


def _state_count(mode: str) -> int:
    return 3 if mode == "lstm" else 2


def _setup_layer(ctx, inputs, output):
    mode, batch_sizes, x, w_ih, bias, h0, c0, w_hh, b_hh, w_hr, need_backward, padded = inputs
    num_dirs = len(w_ih)
    per_dir = _per_direction_count(mode, need_backward, w_hr[0] is not None)
    # NOTE [Absent gradients] (functional.py): an output the loss did not use gets None, not a
    # zero tensor; the backends count None as zero.
    ctx.set_materialize_grads(False)
    ctx.mode, ctx.need_backward, ctx.padded = mode, need_backward, padded
    ctx.num_dirs, ctx.per_dir = num_dirs, per_dir
    lists = dict(w_ih=w_ih, bias=bias, h0=h0, c0=c0, w_hh=w_hh, b_hh=b_hh, w_hr=w_hr)
    ctx.absent = {name: [t is None for t in lists[name]] for name in _OPTIONAL}
    states = _state_count(mode)
    saved_outputs = [output[k * per_dir + j] for k in range(num_dirs)
                     for j in range(states, per_dir)]
    ctx.mark_non_differentiable(*saved_outputs)
    ctx.save_for_backward(
        batch_sizes, x, *[t for name in _LAYER_LISTS for t in lists[name] if t is not None],
        *[output[k * per_dir] for k in range(num_dirs)], *saved_outputs)


def _unpack_layer(ctx) -> dict:
    """The tensors _setup_layer saved, back in per-direction lists (None where absent)."""
    stored = iter(ctx.saved_tensors)
    d = ctx.num_dirs
    out = {"batch_sizes": next(stored), "x": next(stored)}
    for name in _LAYER_LISTS:
        absent = ctx.absent.get(name, [False] * d)
        out[name] = [None if a else next(stored) for a in absent]
    out["output"] = [next(stored) for _ in range(d)]
    out["saved"] = list(stored)
    return out


def _backward_layer(ctx, grads):
    mode, d, per = ctx.mode, ctx.num_dirs, ctx.per_dir
    t = _unpack_layer(ctx)
    grad_output = [grads[k * per] for k in range(d)]
    grad_h_n = [grads[k * per + 1] for k in range(d)]
    grad_c_n = [grads[k * per + 2] if mode == "lstm" else None for k in range(d)]
    if torch.is_grad_enabled():  # NOTE [Second derivatives]
        return _differentiable_backward(ctx, t, grad_output, grad_h_n, grad_c_n)
    if not ctx.need_backward:
        raise RuntimeError("packrnn::layer_forward: backward needs need_backward=True in "
                           "forward (the saved activations), got False")
    results = torch.ops.packrnn.recurrence_backward_directions(
        mode, t["batch_sizes"], grad_output, grad_h_n, grad_c_n, t["h0"], t["c0"], t["w_hh"],
        t["b_hh"], t["w_hr"], t["output"], t["saved"], ctx.padded)
    n = len(results) // d
    grads_in = {name: [] for name in _LAYER_LISTS}
    x, grad_x = t["x"], None
    for k in range(d):
        r = list(results[k * n : (k + 1) * n])
        grad_gates_x = r.pop(0)  # (N, G*H); zero at padding rows
        grads_in["h0"].append(r.pop(0))
        grads_in["c0"].append(r.pop(0) if mode == "lstm" else None)
        grads_in["w_hh"].append(r.pop(0))
        grad_b_hh = r.pop(0) if mode == "gru" else None
        grads_in["b_hh"].append(grad_b_hh if t["b_hh"][k] is not None else None)
        grads_in["w_hr"].append(r.pop(0) if t["w_hr"][k] is not None else None)
        # What is linear in the rows: GEMMs over all N rows.
        grads_in["w_ih"].append(grad_gates_x.t().mm(x))  # (G*H, E)
        grads_in["bias"].append(grad_gates_x.sum(0) if t["bias"][k] is not None else None)
        if x.requires_grad:
            part = grad_gates_x.mm(t["w_ih"][k])  # (N, E)
            grad_x = part if grad_x is None else grad_x.add_(part)
    return _grads_like_inputs(ctx, grad_x, grads_in)


def _grads_like_inputs(ctx, grad_x, grads: dict) -> tuple:
    """backward's result in the structure of forward's inputs: autograd flattens a ``Tensor?[]``
    of Nones to one leaf, so such an input gets None, not a list."""
    def arrange(name):
        absent = ctx.absent.get(name)
        if absent is None:
            return grads[name]
        if all(absent):
            return None
        return [None if a else g for g, a in zip(grads[name], absent)]

    return (None, None, grad_x, *[arrange(name) for name in _LAYER_LISTS], None, None)


def _differentiable_backward(ctx, t: dict, grad_output, grad_h_n, grad_c_n) -> tuple:
    """First derivatives with a graph (NOTE [Second derivatives])."""
    from packrnn import _reference

    mode, x = ctx.mode, t["x"]
    grads = {name: [] for name in _LAYER_LISTS}
    grad_x = None
    for k in range(ctx.num_dirs):
        inputs = {name: t[name][k] for name in _LAYER_LISTS}
        gates_x = x @ inputs["w_ih"].t()  # (N, G*H)
        if inputs["bias"] is not None:
            gates_x = gates_x + inputs["bias"]
        out, h_n, c_n = _reference.recurrence_from_gates(
            mode=mode, gates_x=gates_x, batch_sizes=t["batch_sizes"], h0=inputs["h0"],
            c0=inputs["c0"], w_hh=inputs["w_hh"], b_hh=inputs["b_hh"], w_hr=inputs["w_hr"],
            reverse=k == 1, padded=ctx.padded)
        pairs = [(o, g) for o, g in ((out, grad_output[k]), (h_n, grad_h_n[k]), (c_n, grad_c_n[k]))
                 if o is not None and g is not None]
        wanted = {name: v for name, v in inputs.items() if v is not None and v.requires_grad}
        if x.requires_grad:
            wanted["x"] = x
        got = dict.fromkeys(wanted)
        if wanted and pairs:
            got.update(zip(wanted, torch.autograd.grad(
                [o for o, _ in pairs], list(wanted.values()), [g for _, g in pairs],
                create_graph=True, allow_unused=True)))
        for name in _LAYER_LISTS:
            grads[name].append(got.get(name))
        if got.get("x") is not None:
            grad_x = got["x"] if grad_x is None else grad_x + got["x"]
    return _grads_like_inputs(ctx, grad_x, grads)


# NOTE [Eager fast path]
#   torch.library's generated autograd wrapper flattens and unflattens the operator's tensor
#   lists with pytree on every call (~0.3 ms per layer, a fifth of a B=16 training step). In
#   eager mode the layers therefore call the same operator through _EagerLayer, a plain
#   autograd.Function whose forward runs the operator below the autograd key and whose context
#   and backward are the registered ones (_setup_layer, _backward_layer); torch.compile and
#   torch.export call the operator itself and trace the registered formula.

class _EagerLayer(torch.autograd.Function):
    """layer_forward with its registered autograd, for eager mode (NOTE [Eager fast path]).
    Positional inputs: ``spec`` (the non-tensor arguments and the list structure), ``x``, then
    the per-direction lists of _LAYER_LISTS flattened (None where absent)."""

    @staticmethod
    def forward(ctx, spec, x, *flat):
        mode, batch_sizes, need_backward, padded, num_dirs = spec
        lists = [list(flat[i * num_dirs : (i + 1) * num_dirs]) for i in range(len(_LAYER_LISTS))]
        with torch._C._AutoDispatchBelowAutograd():
            output = torch.ops.packrnn.layer_forward(mode, batch_sizes, x, *lists,
                                                     need_backward, padded)
        _setup_layer(ctx, (mode, batch_sizes, x, *lists, need_backward, padded), output)
        return tuple(output)

    @staticmethod
    def backward(ctx, *grads):
        structured = _backward_layer(ctx, grads)
        flat = []
        for name, value in zip(_LAYER_LISTS, structured[3:-2]):
            flat += [None] * ctx.num_dirs if value is None else list(value)
        return (None, structured[2], *flat)


def layer_forward(mode: str, batch_sizes: Tensor, x: Tensor, lists: Sequence[Sequence],
                  need_backward: bool, padded: bool) -> Sequence[Tensor]:
    """Call ``packrnn::layer_forward`` (``lists``: the per-direction lists of _LAYER_LISTS):
    through _EagerLayer in eager mode, as the operator itself while tracing."""
    if torch.compiler.is_compiling():
        return torch.ops.packrnn.layer_forward(mode, batch_sizes, x, *lists, need_backward,
                                               padded)
    flat = [t for values in lists for t in values]
    if torch.is_grad_enabled() and (x.requires_grad
                                    or any(t is not None and t.requires_grad for t in flat)):
        return _EagerLayer.apply((mode, batch_sizes, need_backward, padded, len(lists[0])), x,
                                 *flat)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.packrnn.layer_forward(mode, batch_sizes, x, *lists, need_backward,
                                               padded)


def register() -> None:
    """Register the fake implementations and the autograd formula (once per process; the C++
    library must be loaded first, which ``_native.load_library`` does before calling this)."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("packrnn::recurrence_forward_directions", _fake_forward)
        torch.library.register_fake("packrnn::recurrence_backward_directions", _fake_backward)
        torch.library.register_fake("packrnn::recurrence_forward", _fake_single_forward)
        torch.library.register_fake("packrnn::recurrence_backward", _fake_single_backward)
        torch.library.register_fake("packrnn::layer_forward", _fake_layer)
        torch.library.register_fake("packrnn::stack_forward", _fake_stack)
        torch.library.register_fake("packrnn::classifier_infer", _fake_classifier)
        torch.library.register_autograd("packrnn::layer_forward", _backward_layer,
                                        setup_context=_setup_layer)
        _registered = True
