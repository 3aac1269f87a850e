"""Stateless multi-layer RNN / LSTM / GRU over packed rows.

``rnn``, ``lstm`` and ``gru`` take the packed data and ``batch_sizes`` of a PackedSequence (sorted
order), the initial state and the weights in torch's flat order, and return the packed output
and the final states. They do the work that is one big matrix multiply over all real rows
(input projections, input and input-weight gradients) and hand the time loop of each layer and
direction to a backend (see NOTE [Backend contract] in ``_lean.py``):

* ``backend=None`` (default): the selected backend (``packrnn.backend`` when present, which
  honours ``PACKRNN_BACKEND``; otherwise the pure-PyTorch lean backend);
* ``backend="python"`` / ``"native"``: force one;
* ``backend="reference"``: the readable per-step recurrence of ``_reference.py`` with autograd.

On CUDA (and ``backend=None``) the call is delegated to torch's cuDNN implementation with the
same parameters.

The native backend's time loop is the registered operator
``torch.ops.packrnn.recurrence_forward_directions`` (``packrnn._ops``): autograd, ``torch.compile``
and ``torch.export`` see one opaque op per layer, and second derivatives (``create_graph=True``,
e.g. a gradient penalty) are exact (NOTE [Second derivatives] in ``_ops.py``). The python
backend's hand-written backward is once-differentiable: asking it for a second derivative
raises; use the native or the reference backend for those.

NOTE [Padded layout] (see also recurrence.cpp): with ``padded=True`` the rows are a
time-major padded batch sorted longest first, ``data`` (T*B, E) and step t at rows
``[t*B, t*B + batch_sizes[t])``, ``batch_sizes`` (T,) possibly ending in zeros. No shape then
depends on the lengths' values, which is what ``torch.compile`` / ``torch.export`` need; the
native kernel runs this layout directly, the python and reference backends gather the real rows
first (eager only).

Letters: T steps, B batch, N packed rows, E input size, H hidden size, P proj_size,
H_out = P or H, G gates, L layers, D directions.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from packrnn import _lean, _reference
from packrnn.errors import InputError, InputTypeError
from packrnn.packing import check_batch_sizes

__all__ = ["rnn", "lstm", "gru"]

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
_BACKENDS = ("python", "native", "reference")


# NOTE [half precision]
# The native kernel computes in float32/float64 only, while torch's layers (and the lean
# backend, which is plain tensor ops) also run float16/bfloat16 on CPU. So with backend=None,
# data of any other dtype runs the lean backend: a swap from torch.nn that worked keeps working.
# An explicit backend="native" keeps the kernel's own dtype error.
_NATIVE_DTYPES = (torch.float32, torch.float64)

# Whether packrnn.backend exists is fixed for the process; find_spec costs ~2 us per call.
_HAS_SELECTION = importlib.util.find_spec("packrnn.backend") is not None


# packrnn.backend and packrnn._native, imported on first use and kept: an import statement in
# the function costs ~1 us a call, and every layer call asks for its backend (NOTE [Inference
# lane]: a one-text call is ~50 us).
_modules: dict[str, ModuleType] = {}


@torch.compiler.assume_constant_result
def _selected_backend_name() -> str:
    """``packrnn.backend.backend_name()``; torch.compile calls it once while tracing and bakes
    the answer into the graph (it builds the kernel on first use, behind a lock)."""
    selection = _modules.get("backend")
    if selection is None:
        from packrnn import backend as selection

        _modules["backend"] = selection
    return selection.backend_name()


def _get_backend(name: Optional[str] = None, dtype: Optional[torch.dtype] = None):
    """The recurrence backend for ``name``; the ONE place that decides which backend runs.

    ``dtype`` (of the data) routes float16/bfloat16 to the lean backend when ``name`` is None
    (NOTE [half precision]).

    Returns the module ``_lean`` or ``packrnn._native`` (both implement NOTE [Backend contract],
    ``recurrence_forward_directions`` / ``recurrence_backward_directions``), or the string
    ``"reference"`` for the per-step autograd path.
    """
    if name is None:
        # packrnn.backend (PACKRNN_BACKEND, backend_name()) decides when it exists; an error
        # inside it must surface, so only its absence falls back to the lean backend.
        if not _HAS_SELECTION:
            return _lean
        name = _selected_backend_name()
        if name == "native" and dtype is not None and dtype not in _NATIVE_DTYPES:
            return _lean  # NOTE [half precision]
    if name == "python":
        return _lean
    if name == "native":
        native = _modules.get("native")
        if native is None:
            from packrnn import _native as native

            _modules["native"] = native
        return native
    if name == "reference":
        return "reference"
    raise ValueError(f"backend: expected None or one of {_BACKENDS}, got {name!r}")


class _Direction(NamedTuple):
    """The tensors of one layer in one direction; None where absent."""

    h0: Tensor  # (B, H_out)
    c0: Optional[Tensor]  # (B, H) lstm
    w_ih: Tensor  # (G*H, E_layer)
    w_hh: Tensor  # (G*H, H_out)
    b_ih: Optional[Tensor]  # (G*H,)
    b_hh: Optional[Tensor]  # (G*H,)
    w_hr: Optional[Tensor]  # (P, H) lstm with proj_size > 0


# NOTE [Autograd argument order]
# torch.autograd.Function.apply takes positional tensors only. The order is decided here and
# nowhere else: x, then for each direction the fields of _Direction in declaration order.
# _flatten builds the row, _unflatten reads it back, and backward returns gradients in the
# same order via _flatten; every call site goes through _layer(), which is keyword-only.
_FIELDS = _Direction._fields


def _flatten(directions: Sequence[_Direction]) -> list[Optional[Tensor]]:
    return [getattr(d, name) for d in directions for name in _FIELDS]


def _unflatten(flat: Sequence[Optional[Tensor]]) -> list[_Direction]:
    n = len(_FIELDS)
    return [_Direction(*flat[k : k + n]) for k in range(0, len(flat), n)]


@dataclass(frozen=True)
class _LayerSpec:
    """The non-tensor arguments of one layer."""

    mode: str  # "rnn_tanh" | "rnn_relu" | "lstm" | "gru"
    batch_sizes: Tensor  # (T,) int64 CPU
    backend: ModuleType  # _lean or _native


def _folded_bias(mode: str, d: _Direction) -> Optional[Tensor]:
    """The bias added to the input projection: b_ih + b_hh, except gru keeps b_hh apart."""
    if d.b_ih is None:
        return None
    return d.b_ih if mode == "gru" else d.b_ih + d.b_hh  # (G*H,)


def _project(mode: str, x: Tensor, directions: Sequence[_Direction]) -> list[Tensor]:
    """Input projections of every row for every direction in one (batched) GEMM (the python
    backend's; the native backend's layer_forward operator does its own, into its buffer
    cache)."""
    biases = [_folded_bias(mode, d) for d in directions]
    if len(directions) == 1:
        w_ih, b = directions[0].w_ih, biases[0]
        if b is None:
            return [torch.mm(x, w_ih.t())]  # [(N, G*H)]
        return [torch.addmm(b, x, w_ih.t())]  # [(N, G*H)]
    w_t = torch.stack([d.w_ih for d in directions]).transpose(1, 2)  # (D, E, G*H)
    xs = x.unsqueeze(0).expand(len(directions), -1, -1)  # (D, N, E)
    if biases[0] is None:
        gates = torch.bmm(xs, w_t)  # (D, N, G*H)
    else:
        gates = torch.baddbmm(torch.stack(biases).unsqueeze(1), xs, w_t)  # (D, N, G*H)
    return list(gates.unbind(0))  # D x (N, G*H), each contiguous


def _direction_args(spec: _LayerSpec, d: _Direction) -> dict:
    """The per-direction backend keywords that forward and backward share."""
    return dict(h0=d.h0, c0=d.c0, w_hh=d.w_hh, b_hh=d.b_hh if spec.mode == "gru" else None,
                w_hr=d.w_hr)


def _run_directions(spec: _LayerSpec, x: Tensor, directions: Sequence[_Direction],
                    need_backward: bool, padded: bool = False):
    """Forward of one layer: projections, then the backend's time loop of every direction
    (one call: the backend may run the directions concurrently). With the native backend this
    is differentiable as it stands (registered autograd, ``packrnn._ops``)."""
    if _registered_autograd(spec.backend):  # one operator: projections and time loop
        gru = spec.mode == "gru"
        results = spec.backend.layer_forward_lists(
            spec.mode, spec.batch_sizes, x,
            [[d.w_ih for d in directions], [_folded_bias(spec.mode, d) for d in directions],
             [d.h0 for d in directions], [d.c0 for d in directions],
             [d.w_hh for d in directions], [d.b_hh if gru else None for d in directions],
             [d.w_hr for d in directions]],  # _native._LAYER_KEYS' order
            need_backward, padded)
    else:
        gates = _project(spec.mode, x, directions)
        results = spec.backend.recurrence_forward_directions(
            mode=spec.mode, batch_sizes=spec.batch_sizes, need_backward=need_backward,
            directions=[dict(_direction_args(spec, d), gates_x=gates_x)
                        for d, gates_x in zip(directions, gates)])
    outputs = [r[0] for r in results]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)  # (N, D*H_out)

    def states(i: int) -> Tensor:  # (D, B, .); one direction: a view of its fresh state
        return results[0][i].unsqueeze(0) if len(results) == 1 else torch.stack(
            [r[i] for r in results])

    h_n = states(1)  # (D, B, H_out)
    c_n = states(2) if spec.mode == "lstm" else None  # (D, B, H)
    return output, h_n, c_n, outputs, [r[3] for r in results]


def _registered_autograd(backend) -> bool:
    """Whether the backend's time loop is a registered operator with autograd (native)."""
    return getattr(backend, "REGISTERED_OPS", False)


class _LayerFunction(torch.autograd.Function):
    """One layer (one or two directions) with a hand-written backward through time: the
    python backend's autograd (the native backend's is registered with its operator).

    Positional inputs after ``spec``: see NOTE [Autograd argument order].
    """

    @staticmethod
    def forward(ctx, spec: _LayerSpec, x: Tensor, *flat: Optional[Tensor]):
        directions = _unflatten(flat)
        output, h_n, c_n, outputs, saved = _run_directions(spec, x, directions, True)
        ctx.set_materialize_grads(False)  # NOTE [Absent gradients]
        ctx.spec = spec
        ctx.num_flat = len(flat)
        ctx.saved_counts = [len(s) for s in saved]
        ctx.save_for_backward(x, *flat, *outputs, *[t for s in saved for t in s])
        if spec.mode == "lstm":
            return output, h_n, c_n
        return output, h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Optional[Tensor], grad_h_n: Optional[Tensor],
                 grad_c_n: Optional[Tensor] = None):
        spec: _LayerSpec = ctx.spec
        stored = ctx.saved_tensors
        x = stored[0]
        flat = stored[1 : 1 + ctx.num_flat]
        directions = _unflatten(flat)
        num_dirs = len(directions)
        outputs = stored[1 + ctx.num_flat : 1 + ctx.num_flat + num_dirs]
        rest = stored[1 + ctx.num_flat + num_dirs :]
        saved, start = [], 0
        for count in ctx.saved_counts:
            saved.append(tuple(rest[start : start + count]))
            start += count

        # NOTE [Absent gradients]: with materialize_grads off, the gradient of an output the
        # loss did not use (often h_n, c_n) arrives as None and the backend treats it as zero,
        # instead of autograd allocating zeros for it. grad_output's column block of each
        # direction is passed as a view; the backends read its rows in place.
        width = outputs[0].shape[1]  # H_out
        results = spec.backend.recurrence_backward_directions(
            mode=spec.mode, batch_sizes=spec.batch_sizes, directions=[
                dict(_direction_args(spec, d),
                     grad_output=(None if grad_output is None
                                  else grad_output[:, k * width : (k + 1) * width]),
                     grad_h_n=None if grad_h_n is None else grad_h_n[k],
                     grad_c_n=None if grad_c_n is None else grad_c_n[k],
                     output=outputs[k], saved=saved[k])
                for k, d in enumerate(directions)])
        grads_gx = [r[0] for r in results]  # D x (N, G*H)
        # D x (grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr)
        per_dir = [r[1:] for r in results]

        # Everything that is linear in the input rows: GEMMs over all N rows, per direction
        # (grad_x accumulates both directions; same FLOPs as one GEMM over the concatenated
        # (N, D*G*H) gradient, without copying it).
        grad_x = None
        if ctx.needs_input_grad[1]:
            grad_x = grads_gx[0].mm(directions[0].w_ih)  # (N, E)
            for g, d in zip(grads_gx[1:], directions[1:]):
                grad_x.addmm_(g, d.w_ih)  # (N, E)
        grad_w_ih = [g.t().mm(x) for g in grads_gx]  # D x (G*H, E)
        has_bias = directions[0].b_ih is not None
        grad_b_ih = [g.sum(0) for g in grads_gx] if has_bias else [None] * num_dirs  # D x (G*H,)

        grads = []
        for k, d in enumerate(directions):
            grad_h0, grad_c0, grad_w_hh, grad_b_hh_gru, grad_w_hr = per_dir[k]
            if not has_bias:
                grad_b_hh = None
            elif spec.mode == "gru":
                grad_b_hh = grad_b_hh_gru
            else:
                grad_b_hh = grad_b_ih[k]  # b_hh was folded into the projection
            grads.append(_Direction(h0=grad_h0, c0=grad_c0, w_ih=grad_w_ih[k], w_hh=grad_w_hh,
                                    b_ih=grad_b_ih[k], b_hh=grad_b_hh, w_hr=grad_w_hr))
        return (None, grad_x, *_flatten(grads))


def _layer(*, mode: str, x: Tensor, batch_sizes: Tensor, directions: Sequence[_Direction],
           backend, padded: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer through ``backend``: (output (N, D*H_out), h_n (D, B, H_out), c_n or None).

    ``padded`` (NOTE [Padded layout]) only with a backend of registered operators (native)."""
    if backend == "reference":
        results = [
            _reference.recurrence(mode=mode, x=x, batch_sizes=batch_sizes, h0=d.h0, c0=d.c0,
                                  w_ih=d.w_ih, w_hh=d.w_hh, b_ih=d.b_ih, b_hh=d.b_hh,
                                  w_hr=d.w_hr, reverse=k == 1)
            for k, d in enumerate(directions)
        ]
        output = torch.cat([r[0] for r in results], 1)  # (N, D*H_out)
        h_n = torch.stack([r[1] for r in results])  # (D, B, H_out)
        c_n = torch.stack([r[2] for r in results]) if mode == "lstm" else None  # (D, B, H)
        return output, h_n, c_n

    spec = _LayerSpec(mode=mode, batch_sizes=batch_sizes, backend=backend)
    flat = _flatten(directions)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(t is not None and t.requires_grad for t in flat))
    if not needs_grad or _registered_autograd(backend):
        output, h_n, c_n, _, _ = _run_directions(spec, x, directions, needs_grad, padded)
        return output, h_n, c_n
    result = _LayerFunction.apply(spec, x, *flat)
    if mode == "lstm":
        return result
    return result[0], result[1], None


def _check(data: Tensor, batch_sizes: Tensor, weights: Sequence[Tensor], num_layers: int,
           num_directions: int, bias: bool, mode: str, batch_sizes_checked: bool = False) -> int:
    """Validate the functional arguments; return the number of weights per layer-direction.

    ``batch_sizes_checked``: the caller (a packrnn layer) already validated ``batch_sizes``
    against ``data`` (check_packed_sequence, or built them itself); skip those tensor ops.
    """
    if not isinstance(data, Tensor) or data.dim() != 2:
        raise InputError(f"data: expected a 2-D tensor (N, E), got "
                         f"{tuple(data.shape) if isinstance(data, Tensor) else type(data).__name__}")
    if not batch_sizes_checked:
        check_batch_sizes(batch_sizes)
        if int(batch_sizes.sum()) != data.shape[0]:
            raise InputError(f"batch_sizes: expected to sum to data.shape[0] = {data.shape[0]}, "
                             f"got {int(batch_sizes.sum())}")
    if num_layers < 1:
        raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
    per_dir, extra = divmod(len(weights), num_layers * num_directions)
    base = 4 if bias else 2
    allowed = (base, base + 1) if mode == "lstm" else (base,)
    if extra or per_dir not in allowed:
        raise InputError(f"weights: expected {' or '.join(str(a * num_layers * num_directions) for a in allowed)} "
                         f"tensors for num_layers={num_layers}, bidirectional="
                         f"{num_directions == 2}, bias={bias}, got {len(weights)}")
    return per_dir


def _check_weights(data: Tensor, weights: Sequence[Tensor], *, mode: str, per_dir: int,
                   num_dirs: int, bias: bool, has_proj: bool) -> tuple[int, int]:
    """Every weight is a tensor of data's dtype and device with torch's shape for its slot;
    return (H, H_out)."""
    slots = ["w_ih", "w_hh"] + (["b_ih", "b_hh"] if bias else []) + (["w_hr"] if has_proj else [])

    def where(idx: int) -> str:
        layer, direction = divmod(idx // per_dir, num_dirs)
        return f"weights[{idx}] ({slots[idx % per_dir]} of layer {layer}{', reverse' if direction else ''})"

    for idx, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"{where(idx)}: expected a Tensor, got {type(w).__name__}")
        if w.dtype != data.dtype or w.device != data.device:
            raise InputTypeError(f"{where(idx)}: expected dtype {data.dtype} on {data.device} (as data), "
                            f"got {w.dtype} on {w.device}")
    w_ih, w_hh, w_last = weights[0], weights[1], weights[per_dir - 1]
    hidden = w_hh.shape[0] // _GATES[mode] if w_hh.dim() == 2 else 0  # H
    gates = _GATES[mode] * hidden  # G*H
    width = w_last.shape[0] if has_proj and w_last.dim() == 2 else hidden  # H_out
    if w_ih.dim() == 2 and data.shape[1] != w_ih.shape[1]:
        raise InputError(f"data: expected {w_ih.shape[1]} features (as {where(0)}), got "
                         f"shape {tuple(data.shape)}")
    expected = {"w_hh": (gates, width), "b_ih": (gates,), "b_hh": (gates,), "w_hr": (width, hidden)}
    for idx, w in enumerate(weights):
        layer_in = data.shape[1] if idx < per_dir * num_dirs else width * num_dirs
        shape = expected.get(slots[idx % per_dir], (gates, layer_in))
        if hidden < 1 or tuple(w.shape) != shape:
            raise InputError(f"{where(idx)}: expected shape {shape} for {mode} with hidden size "
                             f"{hidden}, got {tuple(w.shape)}")
    return hidden, width


def _check_state(state: Tensor, name: str, sizes: tuple[int, int], min_batch: int,
                 data: Tensor) -> None:
    """An initial state is (L*D, B, width) with B >= batch_sizes[0], data's dtype and device."""
    if not isinstance(state, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(state).__name__}")
    layers, width = sizes
    if state.dim() != 3 or state.shape[0] != layers or state.shape[2] != width or state.shape[1] < min_batch:
        raise InputError(f"{name}: expected shape ({layers}, B, {width}) with B >= batch_sizes[0] = "
                         f"{min_batch}, got {tuple(state.shape)}")
    if state.dtype != data.dtype or state.device != data.device:
        raise InputTypeError(f"{name}: expected dtype {data.dtype} on {data.device} (as data), got "
                        f"{state.dtype} on {state.device}")


def _run(*, mode: str, data: Tensor, batch_sizes: Tensor, h0: Optional[Tensor],
         c0: Optional[Tensor], weights: Sequence[Tensor], bias: bool, num_layers: int,
         dropout: float, training: bool, bidirectional: bool, backend: Optional[str],
         batch_sizes_checked: bool = False, padded: bool = False,
         dropout_rows: Optional[tuple[int, Tensor]] = None):
    """The body of rnn/lstm/gru; packrnn's layers call it directly (see ``_check`` for
    ``batch_sizes_checked``). Returns (output (N, D*H_out), h_n, c_n or None).

    ``padded``: the rows are in the padded layout (NOTE [Padded layout]); the caller built
    ``batch_sizes`` and passes ``h0`` (and ``c0``) with the full batch B = N / T.
    ``dropout_rows``: (rows of the padded layout, index of this call's rows in it), for the
    compact form of a padded call (NOTE [Compact padded calls])."""
    num_dirs = 2 if bidirectional else 1
    per_dir = _check(data, batch_sizes, weights, num_layers, num_dirs, bias, mode,
                     batch_sizes_checked or padded)
    has_proj = per_dir in (3, 5)
    hidden, width = _check_weights(data, weights, mode=mode, per_dir=per_dir, num_dirs=num_dirs,
                                   bias=bias, has_proj=has_proj)  # H, H_out
    if padded:
        if h0 is None or (mode == "lstm" and c0 is None):
            raise ValueError("hx: expected the initial state with padded=True, got None")
        batch = 0  # any B: the layout's rows are checked by the kernel
    else:
        batch = int(batch_sizes[0]) if batch_sizes.numel() else 0
    opts = dict(dtype=data.dtype, device=data.device)
    if h0 is None:
        h0 = torch.zeros(num_layers * num_dirs, batch, width, **opts)  # (L*D, B, H_out)
    if mode == "lstm" and c0 is None:
        c0 = torch.zeros(num_layers * num_dirs, h0.shape[1], hidden, **opts)  # (L*D, B, H)
    _check_state(h0, "hx[0]" if mode == "lstm" else "hx", (num_layers * num_dirs, width), batch, data)
    if mode == "lstm":
        _check_state(c0, "hx[1]", (num_layers * num_dirs, hidden), h0.shape[1], data)
        if c0.shape[1] != h0.shape[1]:
            raise InputError(f"hx[1]: expected batch size {h0.shape[1]} (as hx[0]), got {c0.shape[1]}")

    if data.is_cuda and backend is None:
        return _run_cuda(mode=mode, data=data, batch_sizes=batch_sizes, h0=h0, c0=c0,
                         weights=weights, bias=bias, num_layers=num_layers, dropout=dropout,
                         training=training, bidirectional=bidirectional)

    impl = _get_backend(backend, data.dtype)
    if padded and _compact(impl, data, weights):
        # NOTE [Compact padded calls]: gather the real rows, run them packed, scatter back.
        rows = _padded_rows(batch_sizes, h0.shape[1])  # (N_real,)
        out, h_out, c_out = _run(
            mode=mode, data=data.index_select(0, rows), batch_sizes=batch_sizes[batch_sizes > 0],
            h0=h0, c0=c0, weights=weights, bias=bias, num_layers=num_layers, dropout=dropout,
            training=training, bidirectional=bidirectional, backend=backend,
            batch_sizes_checked=True, dropout_rows=(data.shape[0], rows))
        full = out.new_zeros(data.shape[0], out.shape[1]).index_copy(0, rows, out)  # (T*B, .)
        return full, h_out, c_out
    if _stacked(impl, training and dropout > 0 and num_layers > 1, data, h0, c0, *weights):
        # NOTE [Stacked inference]: every layer and direction in one operator call.
        return impl.stack_forward(mode=mode, batch_sizes=batch_sizes, x=data, weights=weights,
                                  h0=h0, c0=c0, num_layers=num_layers,
                                  bidirectional=bidirectional, bias=bias, padded=padded)
    x = data  # (N, E)
    h_n, c_n = [], []
    for layer in range(num_layers):
        directions = []
        for k in range(num_dirs):
            idx = layer * num_dirs + k
            w = weights[idx * per_dir : (idx + 1) * per_dir]
            directions.append(_Direction(
                h0=h0[idx].contiguous(),
                c0=c0[idx].contiguous() if mode == "lstm" else None,
                w_ih=w[0].contiguous(),
                w_hh=w[1].contiguous(),
                b_ih=w[2].contiguous() if bias else None,
                b_hh=w[3].contiguous() if bias else None,
                w_hr=w[-1].contiguous() if has_proj else None,
            ))
        x, layer_h, layer_c = _layer(mode=mode, x=x, batch_sizes=batch_sizes,
                                     directions=directions, backend=impl, padded=padded)
        h_n.append(layer_h)
        if mode == "lstm":
            c_n.append(layer_c)
        if training and dropout > 0 and layer < num_layers - 1:
            x = _dropout(x, dropout, dropout_rows)  # (N, D*H_out), between layers only
    # One layer: its states are fresh tensors already, no need to copy them through cat.
    h_out = h_n[0] if num_layers == 1 else torch.cat(h_n, 0)  # (L*D, B, H_out)
    c_out = None
    if mode == "lstm":
        c_out = c_n[0] if num_layers == 1 else torch.cat(c_n, 0)  # (L*D, B, H)
    return x, h_out, c_out


# NOTE [Stacked inference]
# Without gradients and without dropout, the native backend runs all layers and directions of a
# call in one operator (stack_forward): a one-sequence forward has few rows, so the per-call
# costs of one operator per layer (Python, dispatch, checks, allocations) would be a large part
# of its time. Same kernels, same numbers as the per-layer path.
def _stacked(impl, dropout_between_layers: bool, *tensors: Optional[Tensor]) -> bool:
    """Whether a call runs as one stacked inference operator (NOTE [Stacked inference])."""
    if dropout_between_layers or not hasattr(impl, "stack_forward"):
        return False
    return not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in tensors))


# NOTE [Inference lane]
# A module called without gradients on a padded batch without lengths or hx (every step real:
# one sentence, or a batch of equal lengths), or on a PackedSequence without hx, goes straight
# to the stacked operator: no state
# tensors to build (the kernel makes the zeros), no batch_sizes to build (cached per shape),
# no Python re-check of the module's own weights (the operator checks every shape). At B = 1
# these per-call costs are otherwise as large as the kernel's work.
@functools.lru_cache(maxsize=256)
def _full_batch_sizes(steps: int, batch: int) -> Tensor:
    """(T,) batch_sizes of a full batch; cached, so callers must never write to it."""
    return torch.full((steps,), batch, dtype=torch.int64)


def _infer(*, mode: str, rows: Tensor, weights: Sequence[Tensor], bias: bool, num_layers: int,
           bidirectional: bool, backend: Optional[str]):
    """The inference lane (NOTE [Inference lane]): (output (T*B, D*H_out), h_n, c_n or None) of
    the time-major rows (T, B, E), every step real, zero initial states, no dropout, no
    gradients; or None where the lane does not apply (the caller then runs ``_run``)."""
    steps, batch = rows.shape[0], rows.shape[1]
    if steps == 0 or batch == 0:
        return None
    return _infer_packed(mode=mode, data=rows.reshape(steps * batch, rows.shape[2]),
                         batch_sizes=_full_batch_sizes(steps, batch), h0=None, c0=None,
                         weights=weights, bias=bias, num_layers=num_layers,
                         bidirectional=bidirectional, backend=backend)


def _infer_packed(*, mode: str, data: Tensor, batch_sizes: Tensor, h0: Optional[Tensor],
                  c0: Optional[Tensor], weights: Sequence[Tensor], bias: bool, num_layers: int,
                  bidirectional: bool, backend: Optional[str]):
    """The inference lane for packed rows (NOTE [Inference lane]): (output (N, D*H_out), h_n,
    c_n or None) in the rows' sorted order, or None where the lane does not apply. ``batch_sizes``
    is valid (a checked PackedSequence's); ``h0`` / ``c0`` None: zeros of batch_sizes[0] rows."""
    impl = _get_backend(backend, data.dtype)
    if (not hasattr(impl, "stack_forward") or data.device.type != "cpu" or data.shape[0] == 0
            or torch.compiler.is_compiling()):
        return None
    return impl.stack_forward(
        mode=mode, batch_sizes=batch_sizes, x=data, weights=weights, h0=h0, c0=c0,
        num_layers=num_layers, bidirectional=bidirectional, bias=bias, padded=False)


# NOTE [Compact padded calls]
# A padded-layout call (NOTE [Padded layout]) saves activations for all T*B rows. In eager mode
# with gradients, packrnn instead gathers the real rows, runs them packed (saved activations
# O(real rows), projections over real rows only) and scatters the output back; the python and
# reference backends always do, as their time loops are not registered operators. Under
# torch.compile / torch.export the layout stays padded (static shapes). So that both forms give
# the same numbers for a seed, inter-layer dropout of the compact form draws its mask over the
# padded layout's T*B rows and keeps the real rows' part (_dropout).
def _compact(impl, data: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether a padded-layout call runs compact (NOTE [Compact padded calls])."""
    if not _registered_autograd(impl):
        return True
    if torch.compiler.is_compiling():
        return False
    return torch.is_grad_enabled() and (data.requires_grad or any(w.requires_grad for w in weights))


def _dropout(x: Tensor, p: float, dropout_rows: Optional[tuple[int, Tensor]]) -> Tensor:
    """Inter-layer dropout; with ``dropout_rows`` the mask of the padded layout's rows
    (NOTE [Compact padded calls])."""
    if dropout_rows is None:
        return F.dropout(x, p=p, training=True)
    total, rows = dropout_rows
    mask = F.dropout(x.new_ones(total, x.shape[1]), p=p, training=True)  # (T*B, F): 0 or 1/(1-p)
    return x * mask.index_select(0, rows)


def _padded_rows(batch_sizes: Tensor, batch: int) -> Tensor:
    """The real rows of the padded layout, in packed order: t*B + [0, batch_sizes[t])."""
    steps = batch_sizes.numel()
    active = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (T, B)
    return torch.arange(steps * batch).view(steps, batch)[active]  # (N_real,)


def _run_cuda(*, mode, data, batch_sizes, h0, c0, weights, bias, num_layers, dropout, training,
              bidirectional):
    """Delegate to torch's cuDNN recurrence; zero-length sequences (rows past batch_sizes[0])
    keep their initial state, as on CPU."""
    active = int(batch_sizes[0]) if batch_sizes.numel() else 0
    fn = getattr(torch._VF, mode)
    args = (bias, num_layers, dropout, training, bidirectional)
    if mode == "lstm":
        out, h, c = fn(data, batch_sizes, (h0[:, :active].contiguous(), c0[:, :active].contiguous()),
                       list(weights), *args)
        return out, torch.cat([h, h0[:, active:]], 1), torch.cat([c, c0[:, active:]], 1)
    out, h = fn(data, batch_sizes, h0[:, :active].contiguous(), list(weights), *args)
    return out, torch.cat([h, h0[:, active:]], 1), None


_COMMON_DOC = """
    Args:
        data: (N, E) packed input rows (``PackedSequence.data``), sequences sorted longest first.
        batch_sizes: (T,) int64 CPU tensor, non-increasing, summing to N.
        hx: initial state (L*D, B, H_out) in sorted order, or None for zeros with
            B = batch_sizes[0]. B may exceed batch_sizes[0]: the extra rows are zero-length
            sequences whose final state is their initial state.
        weights: the flat weight list in torch's order (``module._flat_weights``): per layer,
            per direction ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``.
        bias: whether the weights include biases. Default True.
        num_layers: number of stacked layers. Default 1.
        dropout: dropout probability on the output of every layer but the last, applied only
            when ``training``. Default 0.
        training: training mode (enables dropout). Default False.
        bidirectional: run a reverse direction too and concatenate the outputs. Default False.
        backend: None (the selected backend; float16/bfloat16 data always runs "python",
            as the native kernel is float32/float64 only), "python", "native" or "reference".

    The output has a row for every real step only: there is no padding to hold anything.
"""


def rnn(data: Tensor, batch_sizes: Tensor, hx: Optional[Tensor], weights: Sequence[Tensor], *,
        nonlinearity: str = "tanh", bias: bool = True, num_layers: int = 1,
        dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Elman RNN over packed rows: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    ``nonlinearity`` is "tanh" (default) or "relu". Returns (output (N, D*H), h_n (L*D, B, H)).

    >>> import torch, packrnn
    >>> m = torch.nn.RNN(2, 3)
    >>> out, h_n = packrnn.functional.rnn(torch.randn(3, 2), torch.tensor([2, 1]), None,
    ...                                   m._flat_weights)
    >>> out.shape, h_n.shape
    (torch.Size([3, 3]), torch.Size([1, 2, 3]))
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
    output, h_n, _ = _run(mode=f"rnn_{nonlinearity}", data=data, batch_sizes=batch_sizes, h0=hx,
                          c0=None, weights=weights, bias=bias, num_layers=num_layers,
                          dropout=dropout, training=training, bidirectional=bidirectional,
                          backend=backend)
    return output, h_n


def lstm(data: Tensor, batch_sizes: Tensor, hx: Optional[tuple[Tensor, Tensor]],
         weights: Sequence[Tensor], *, bias: bool = True, num_layers: int = 1,
         dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
         backend: Optional[str] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """LSTM over packed rows (torch's gate order i, f, g, o; projection if weights hold w_hr).

    c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t)  (then h_t W_hr^T with proj_size > 0).
    ``hx`` is (h0 (L*D, B, H_out), c0 (L*D, B, H)) or None. Returns
    (output (N, D*H_out), (h_n (L*D, B, H_out), c_n (L*D, B, H))).

    >>> import torch, packrnn
    >>> m = torch.nn.LSTM(2, 3)
    >>> out, (h_n, c_n) = packrnn.functional.lstm(torch.randn(3, 2), torch.tensor([2, 1]),
    ...                                           None, m._flat_weights)
    >>> out.shape, c_n.shape
    (torch.Size([3, 3]), torch.Size([1, 2, 3]))
    """
    h0, c0 = (None, None) if hx is None else hx
    output, h_n, c_n = _run(mode="lstm", data=data, batch_sizes=batch_sizes, h0=h0, c0=c0,
                            weights=weights, bias=bias, num_layers=num_layers, dropout=dropout,
                            training=training, bidirectional=bidirectional, backend=backend)
    return output, (h_n, c_n)


def gru(data: Tensor, batch_sizes: Tensor, hx: Optional[Tensor], weights: Sequence[Tensor], *,
        bias: bool = True, num_layers: int = 1, dropout: float = 0.0, training: bool = False,
        bidirectional: bool = False, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """GRU over packed rows (torch's gate order r, z, n).

    n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn)),  h_t = (1 - z) * n + z * h_{t-1}.
    Returns (output (N, D*H), h_n (L*D, B, H)).

    >>> import torch, packrnn
    >>> m = torch.nn.GRU(2, 3)
    >>> out, h_n = packrnn.functional.gru(torch.randn(3, 2), torch.tensor([2, 1]), None,
    ...                                   m._flat_weights)
    >>> out.shape
    torch.Size([3, 3])
    """
    output, h_n, _ = _run(mode="gru", data=data, batch_sizes=batch_sizes, h0=hx, c0=None,
                          weights=weights, bias=bias, num_layers=num_layers, dropout=dropout,
                          training=training, bidirectional=bidirectional, backend=backend)
    return output, h_n


for _fn in (rnn, lstm, gru):
    _fn.__doc__ = _fn.__doc__.replace("\n    >>>", _COMMON_DOC + "\n    >>>", 1)
del _fn
