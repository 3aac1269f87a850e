"""The native (C++) recurrence backend: build-on-first-use loader and the contract's two functions.

The kernel lives in ``recurrence.cpp`` (buffers documented in ``recurrence.h``). It is compiled
once with ``torch.utils.cpp_extension.load`` into a cache directory keyed by the torch version and
a hash of the sources and flags, so later processes only load the shared library. Selection and
fallback (``PACKRNN_BACKEND``) live in ``packrnn.backend``; this module only builds and calls.

The kernels are torch operators (``torch.ops.packrnn.*``: schemas and CPU kernels in C++, fake
implementations and autograd in ``packrnn._ops``), so eager calls, ``torch.compile`` and
``torch.export`` all go through the dispatcher. The contract's functions take exactly its
arguments, by keyword (see NOTE [Backend contract] in
``packrnn._lean``), and return the same structure as the lean backend; the ``_directions`` forms
run all directions of a layer in one kernel call.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from packrnn import _ops as _op_calls
from packrnn.packing import PackedSequence, _validated

__all__ = ["load_library", "build_directory", "kernel_info", "clear_cache", "empty",
           "recurrence_forward", "recurrence_backward", "recurrence_forward_directions",
           "recurrence_backward_directions", "layer_forward", "stack_forward", "classifier_infer",
           "pack_ids", "THREADS_ENV",
           "set_kernel_threads", "kernel_threads"]

_HERE = Path(__file__).resolve().parent
_SOURCES = ("recurrence.cpp", "classifier.cpp", "recurrence.h")
# Portable flags: no -march=native (the cache may be shared by different CPUs); the elementwise
# loops carry their own AVX2+FMA build chosen at run time. -fopenmp lets at::parallel_for split a
# step's rows over torch's intra-op threads (it links the libgomp torch already loaded).
_CFLAGS = ("-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-std=c++17")
_LDFLAGS = ("-fopenmp",)

# functional.py: this backend's time loop is a registered operator with autograd (_ops.py).
REGISTERED_OPS = True

_log = logging.getLogger("packrnn")
_lock = threading.Lock()
_loaded: Optional[str] = None

# The kernel's threads setting (NOTE [Threads] in recurrence.cpp): 0 = auto (from the work
# size), n >= 1 = up to n threads. None until set, or read from THREADS_ENV at the first load.
THREADS_ENV = "PACKRNN_NUM_THREADS"
_threads: Optional[int] = None


def _source_hash() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update(name.encode())
        digest.update((_HERE / name).read_bytes())
    digest.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """Where the compiled library is cached: ``$PACKRNN_CACHE_DIR`` or ``~/.cache/packrnn``,
    then ``torch<version>-<source hash>``, so a new torch or a changed kernel rebuilds."""
    root = os.environ.get("PACKRNN_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "packrnn"
    return base / f"torch{torch.__version__}-{_source_hash()}"


def load_library(verbose: bool = False) -> str:
    """Compile (first time only) and load the kernel; return the path of the shared library.

    Raises whatever the build raises (no compiler, no ninja, compile error): the caller decides
    whether to fall back. Safe to call from several threads and processes (cpp_extension locks
    the build directory).
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        from torch.utils import cpp_extension

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        name = f"packrnn_native_{_source_hash()}"
        if not (directory / f"{name}.so").exists():
            _log.info("packrnn: compiling the native recurrence kernel into %s (first use only, "
                      "~20 s)", directory)
        path = cpp_extension.load(
            name=name,
            sources=[str(_HERE / name) for name in _SOURCES if name.endswith(".cpp")],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            extra_include_paths=[str(_HERE)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=verbose,
        )
        from packrnn import _ops

        _ops.register()  # fake implementations and autograd beside the C++ kernels
        torch.ops.packrnn.set_kernel_threads(kernel_threads())
        _loaded = str(path) if path is not None else str(directory)
        return _loaded


def _parse_threads(value: str) -> int:
    """THREADS_ENV's value: "" or "auto" -> 0, a positive int -> itself."""
    value = value.strip().lower()
    if value in ("", "auto"):
        return 0
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}: expected 'auto' or a positive int, got {value!r}")
    return int(value)


def kernel_threads() -> int:
    """The threads setting: 0 for auto (the default, or ``PACKRNN_NUM_THREADS=auto``), else the
    most threads a call may use."""
    global _threads
    if _threads is None:
        _threads = _parse_threads(os.environ.get(THREADS_ENV, ""))
    return _threads


def set_kernel_threads(threads: int) -> None:
    """Set the threads setting for every later call (0 = auto); process-wide."""
    global _threads
    _threads = int(threads)
    if _loaded is not None:
        torch.ops.packrnn.set_kernel_threads(_threads)


def _ops():
    if _loaded is None:
        load_library()
    return torch.ops.packrnn


def kernel_info() -> str:
    """How the loaded kernel runs: SIMD level of the float32 elementwise loops, the BLAS, and
    whether its calls flush subnormal floats now (``subnormals: flushed``, the default) or keep
    the caller's setting (``subnormals: kept``, under ``PACKRNN_KEEP_SUBNORMALS=1``)."""
    return _ops().kernel_info()


def clear_cache() -> None:
    """Free the large buffers the kernel keeps for reuse (at most ``PACKRNN_NATIVE_CACHE_MB``,
    default 1024 MiB, of blocks released by earlier calls; 0 disables the cache)."""
    if _loaded is not None:
        torch.ops.packrnn.clear_cache()


def empty(rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous ``(rows, cols)`` CPU tensor; large ones (>= 4 MiB) come from
    the kernel's buffer cache, so a training loop's per-step buffers skip page faults."""
    return _ops().empty_buffer(rows, cols, dtype)


def _forward_result(mode: str, out: list[Tensor]):
    """(output, h_n, c_n or None, saved) from one direction's [output, h_n, (c_n), saved...]."""
    if mode == "lstm":
        return out[0], out[1], out[2], tuple(out[3:])
    return out[0], out[1], None, tuple(out[2:])


def _backward_result(mode: str, has_proj: bool, out: list[Tensor]):
    """The contract's 6-tuple from one direction's [grad_gates_x, grad_h0, (grad_c0), grad_w_hh,
    (grad_b_hh), (grad_w_hr)]."""
    out = list(out)
    grad_gates_x, grad_h0 = out.pop(0), out.pop(0)
    grad_c0 = out.pop(0) if mode == "lstm" else None
    grad_w_hh = out.pop(0)
    grad_b_hh = out.pop(0) if mode == "gru" else None
    grad_w_hr = out.pop(0) if has_proj else None
    return grad_gates_x, grad_h0, grad_c0, grad_w_hh, grad_b_hh, grad_w_hr


_FORWARD_KEYS = ("gates_x", "h0", "c0", "w_hh", "b_hh", "w_hr")
_BACKWARD_KEYS = ("grad_output", "grad_h_n", "grad_c_n", "h0", "c0", "w_hh", "b_hh", "w_hr",
                  "output", "saved")


def _check_directions(directions: Sequence[dict], keys: tuple[str, ...]) -> None:
    """Each direction names exactly ``keys`` (as the lean backend's keyword call would)."""
    if len(directions) not in (1, 2):
        raise ValueError(f"directions: expected 1 or 2 entries, got {len(directions)}")
    for k, d in enumerate(directions):
        if sorted(d) != sorted(keys):
            raise TypeError(f"directions[{k}]: expected the keys {sorted(keys)}, got {sorted(d)}")


def _per_direction(flat: list[Tensor], num_dirs: int) -> list[list[Tensor]]:
    """Split the kernel's concatenated per-direction results (the same count each)."""
    n = len(flat) // num_dirs
    return [flat[k * n : (k + 1) * n] for k in range(num_dirs)]


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
    """Time loop of one layer in one direction (backend contract), in C++.

    Returns ``(output (N, H_out), h_n (B, H_out), c_n (B, H) or None, saved)``; ``saved`` is
    private to this backend (lstm: gates (N, 4H), c (N, H)[, o * tanh(c) (N, H) with proj];
    gru: r, z, n and the hidden n-term (N, 4H); rnn: nothing).
    """
    out = _ops().recurrence_forward(
        mode, gates_x, batch_sizes, h0, c0, w_hh, b_hh, w_hr, bool(reverse), bool(need_backward),
        False,
    )
    return _forward_result(mode, out)


def recurrence_forward_directions(
    *, mode: str, batch_sizes: Tensor, need_backward: bool, directions: Sequence[dict],
    padded: bool = False,
) -> list[tuple[Tensor, Tensor, Optional[Tensor], tuple[Tensor, ...]]]:
    """Every direction of one layer (backend contract) in one kernel call, the directions
    running concurrently (NOTE [Direction tasks] in recurrence.cpp).

    ``directions[k]`` holds direction k's keywords of :func:`recurrence_forward` (``gates_x,
    h0, c0, w_hh, b_hh, w_hr``); direction 1 runs reversed. ``padded``: the rows are a
    time-major padded batch sorted longest first (NOTE [Padded layout] in recurrence.cpp).
    Returns one :func:`recurrence_forward` result per direction.

    Differentiable: autograd runs :func:`recurrence_backward_directions` (registered in
    ``packrnn._ops``); ``need_backward`` must be True for that.
    """
    _check_directions(directions, _FORWARD_KEYS)
    out = _ops().recurrence_forward_directions(
        mode, batch_sizes,
        [d["gates_x"] for d in directions], [d["h0"] for d in directions],
        [d["c0"] for d in directions], [d["w_hh"] for d in directions],
        [d["b_hh"] for d in directions], [d["w_hr"] for d in directions], bool(need_backward),
        bool(padded),
    )
    return [_forward_result(mode, r) for r in _per_direction(out, len(directions))]


_LAYER_KEYS = ("w_ih", "bias", "h0", "c0", "w_hh", "b_hh", "w_hr")


def layer_forward(
    *, mode: str, batch_sizes: Tensor, x: Tensor, need_backward: bool, padded: bool,
    directions: Sequence[dict],
) -> list[tuple[Tensor, Tensor, Optional[Tensor], tuple[Tensor, ...]]]:
    """One whole layer in one operator call: the input projections ``x @ w_ih^T + bias`` of
    every direction, then :func:`recurrence_forward_directions` on them.

    ``directions[k]`` holds ``w_ih`` (G*H, E), ``bias`` (G*H,) or None (b_ih + b_hh folded for
    rnn/lstm; b_ih for gru), and ``h0, c0, w_hh, b_hh, w_hr`` as for
    :func:`recurrence_forward`. Differentiable (autograd registered in ``packrnn._ops``, exact
    to any order); ``need_backward`` must be True when a gradient will be taken.
    Returns one :func:`recurrence_forward` result per direction.
    """
    _check_directions(directions, _LAYER_KEYS)
    return layer_forward_lists(mode, batch_sizes, x,
                               [[d[key] for d in directions] for key in _LAYER_KEYS],
                               bool(need_backward), bool(padded))


def layer_forward_lists(mode: str, batch_sizes: Tensor, x: Tensor, lists: Sequence[list],
                        need_backward: bool, padded: bool):
    """:func:`layer_forward` with its per-direction arguments as the operator takes them: one
    list per name of ``_LAYER_KEYS``, each with an entry per direction (``functional``'s layer
    calls, which build no keyword dicts: a few us of a small training step)."""
    if _loaded is None:
        load_library()
    out = _op_calls.layer_forward(mode, batch_sizes, x, lists, need_backward, padded)
    return [_forward_result(mode, r) for r in _per_direction(out, len(lists[0]))]


def stack_forward(
    *, mode: str, batch_sizes: Tensor, x: Tensor, weights: Sequence[Tensor], h0: Tensor,
    c0: Optional[Tensor], num_layers: int, bidirectional: bool, bias: bool, padded: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Every layer and direction of a module in one operator call, for inference: no autograd,
    nothing saved for backward, no dropout (the caller checks that none is needed).

    ``weights`` is torch's flat list (``module._flat_weights``), ``h0`` (L*D, B, H_out) and
    ``c0`` (L*D, B, H) (lstm, else None) the initial states in the rows' order; the rows are
    packed, or in the padded layout when ``padded``. Returns (output (N, D*H_out), h_n, c_n or
    None), as ``functional``'s layer loop.
    """
    out = _ops().stack_forward(mode, batch_sizes, x, list(weights), h0, c0, int(num_layers),
                               bool(bidirectional), bool(bias), bool(padded))
    return out[0], out[1], (out[2] if mode == "lstm" else None)


def classifier_infer(
    *, mode: str, ids: Tensor, lengths: Tensor, embedding: Tensor, weights: Sequence[Tensor],
    fc_weight: Tensor, fc_bias: Optional[Tensor], num_layers: int, bidirectional: bool,
    bias: bool, pooling: str,
) -> Tensor:
    """A SequenceClassifier's whole inference forward (packed execution, eval mode) in one
    operator call (NOTE [Fused classifier inference] in classifier.cpp): ids (B, T) and
    lengths (B,) CPU int64 -> logits (B, C). Not differentiable: refused where a gradient
    could be asked for. Raises ValueError on bad input (its caller then runs the module path,
    whose error is the one to show)."""
    if torch.is_grad_enabled() and (embedding.requires_grad or fc_weight.requires_grad
                                    or any(w.requires_grad for w in weights)):
        raise RuntimeError("classifier_infer: inference only, expected no gradient to be "
                           "recorded (call it under torch.no_grad() or inference_mode())")
    return _ops().classifier_infer(mode, ids, lengths, embedding, list(weights), fc_weight,
                                   fc_bias, int(num_layers), bool(bidirectional), bool(bias),
                                   pooling)


class _ClassifierFeatures(torch.autograd.Function):
    """classifier_train / classifier_train_backward as one autograd node (NOTE [Fused
    classifier training] in classifier.cpp). Inputs after ``spec``: ids, lengths, the
    embedding table, then the layer's weights (torch's flat order)."""

    @staticmethod
    def forward(ctx, spec, ids, lengths, table, *weights):
        mode, num_layers, bidirectional, bias, pooling, padding_idx, dropouts, packed, _ = spec
        sorted_indices = packed[0] if packed else None
        out = _ops().classifier_train(mode, ids, lengths, bool(packed), sorted_indices, table,
                                      list(weights), num_layers, bidirectional, bias, pooling,
                                      *dropouts)
        ctx.spec, ctx.rows, ctx.count = spec, table.shape[0], len(weights)
        ctx.one_sequence = not packed and ids.shape[0] == 1
        ctx.save_for_backward(*weights, *out[1:])
        return out[0]

    @staticmethod
    def backward(ctx, grad):
        mode, num_layers, bidirectional, bias, pooling, padding_idx, _, _, recompute = ctx.spec
        stored = ctx.saved_tensors
        weights, saved = stored[: ctx.count], stored[ctx.count :]
        need_table = ctx.needs_input_grad[3]
        if torch.is_grad_enabled():  # create_graph: the module path's graph (NOTE above)
            features, inputs = recompute()
            wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[3 + i]]
            got = torch.autograd.grad(features, [inputs[i] for i in wanted], grad,
                                      create_graph=True, allow_unused=True)
            grads = [None] * len(inputs)
            for i, g in zip(wanted, got):
                grads[i] = g
            return (None, None, None, *grads)
        grads = _ops().classifier_train_backward(
            mode, grad, list(saved), list(weights), ctx.rows, num_layers, bidirectional, bias,
            pooling, -1 if padding_idx is None else padding_idx, need_table, ctx.one_sequence)
        return (None, None, None, grads[0] if need_table else None, *grads[1:])


def classifier_features(
    *, mode: str, ids: Optional[Tensor], lengths: Optional[Tensor], embedding: Tensor,
    weights: Sequence[Tensor], num_layers: int, bidirectional: bool, bias: bool, pooling: str,
    padding_idx: Optional[int], embed_dropout: float = 0.0, layer_dropout: float = 0.0,
    packed: Optional[PackedSequence] = None,
    recompute: Callable[[], tuple[Tensor, Sequence[Tensor]]],
) -> Tensor:
    """A SequenceClassifier's packed forward up to the pooled features (B, D*H_out), caller's
    order, differentiable as ONE autograd node (NOTE [Fused classifier training] in
    classifier.cpp): ids (B, T) and lengths (B,) CPU int64, or ``packed``, a checked
    PackedSequence of ids (then ``ids`` and ``lengths`` are ignored); ``embedding`` (V, E),
    ``weights`` torch's flat list (no proj_size); dropout with probability ``embed_dropout``
    on the embedded rows and ``layer_dropout`` between layers (in [0, 1); drawn as
    ``F.dropout`` draws, from the default generator). Gradients reach ``embedding`` (dense,
    the ``padding_idx`` row zero) and ``weights``. ``recompute()`` returns the same features
    computed by the module path (with the same dropout masks) and the tensors
    ``[embedding, *weights]`` it used: a backward asked for with ``create_graph=True``
    differentiates that instead, so higher derivatives are exact. Eager mode only. Raises
    ValueError on bad input (its caller then runs the module path, whose error is the one to
    show)."""
    spec = (mode, int(num_layers), bool(bidirectional), bool(bias), pooling, padding_idx,
            (float(embed_dropout), float(layer_dropout)),
            (packed.sorted_indices,) if packed is not None else (), recompute)
    if packed is not None:
        ids, lengths = packed.data, packed.batch_sizes
    return _ClassifierFeatures.apply(spec, ids, lengths, embedding, *weights)


def pack_ids(ids: Tensor, lengths: Tensor, vocab_size: int) -> PackedSequence:
    """``pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False)`` of token
    ids (B, T) with lengths (B,) CPU int64, in one operator call that also checks every real id
    is in ``[0, vocab_size)``: the classifier's training forward (NOTE [packing ids] in
    ``packrnn.models``). The data is int64. Eager mode only (its row count is data-dependent).
    Raises ValueError on bad ids or lengths, and for a batch with no real step."""
    data, batch_sizes, sorted_indices, unsorted_indices = _ops().pack_ids(ids, lengths,
                                                                         vocab_size)
    return _validated(PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices),
                      ids.shape[0])


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
    """Backward through time of :func:`recurrence_forward` (backend contract), in C++.

    A None gradient counts as zero; ``grad_output`` may be a column block of a wider tensor
    (its rows are read in place).

    Returns ``(grad_gates_x (N, G*H), grad_h0 (B, H_out), grad_c0 (B, H) or None,
    grad_w_hh (G*H, H_out), grad_b_hh (G*H,) for gru else None, grad_w_hr (P, H) or None)``.
    """
    out = _ops().recurrence_backward(
        mode, grad_output, grad_h_n, grad_c_n, batch_sizes, h0, c0, w_hh, b_hh, w_hr,
        bool(reverse), output, list(saved), False,
    )
    return _backward_result(mode, w_hr is not None, out)


def recurrence_backward_directions(
    *, mode: str, batch_sizes: Tensor, directions: Sequence[dict], padded: bool = False
) -> list[tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]]:
    """Backward of :func:`recurrence_forward_directions`, the directions concurrently.

    ``directions[k]`` holds direction k's keywords of :func:`recurrence_backward` but
    ``reverse`` (``grad_output, grad_h_n, grad_c_n, h0, c0, w_hh, b_hh, w_hr, output,
    saved``). Returns one :func:`recurrence_backward` result per direction.
    """
    _check_directions(directions, _BACKWARD_KEYS)
    out = _ops().recurrence_backward_directions(
        mode, batch_sizes,
        [d["grad_output"] for d in directions], [d["grad_h_n"] for d in directions],
        [d["grad_c_n"] for d in directions], [d["h0"] for d in directions],
        [d["c0"] for d in directions], [d["w_hh"] for d in directions],
        [d["b_hh"] for d in directions], [d["w_hr"] for d in directions],
        [d["output"] for d in directions], [t for d in directions for t in d["saved"]],
        bool(padded),
    )
    return [_backward_result(mode, d["w_hr"] is not None, r)
            for d, r in zip(directions, _per_direction(out, len(directions)))]
