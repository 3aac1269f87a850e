"""Recurrent layers RNN / LSTM / GRU and their cells: drop-in replacements for torch.nn's.

The modules own the parameters (same names, shapes and initialisation as torch, so a
``state_dict`` loads both ways) and validate their inputs; the computation is
``packrnn.functional``, which runs only the real (non-padding) steps.

NOTE [Padding contract]
    ``forward(input, hx=None, *, lengths=None)`` accepts three input forms:

    * a PackedSequence (packrnn's or torch's) -> a packrnn PackedSequence with the same
      ``batch_sizes`` / ``sorted_indices`` / ``unsorted_indices``; ``hx`` and the final states
      are in the original batch order (as torch);
    * a padded tensor ``(T, B, E)`` (``(B, T, E)`` if ``batch_first``, or unbatched ``(T, E)``)
      without ``lengths`` -> every step is treated as real, exactly torch's result;
    * a padded tensor with ``lengths`` (B integers) -> the padded output holds zeros at every
      step ``t >= lengths[b]``, and the final states are taken at each sequence's own last real
      step; the reverse direction of a bidirectional layer starts at each sequence's last real
      step. Same numbers as pack -> torch layer -> pad, without computing the padding.

    A sequence of length 0 has no output rows (all zeros when padded) and its final state is
    its initial state; so padded input with T = 0 steps (which torch refuses) returns an empty
    output and ``hx``. An empty batch (B = 0) returns empty outputs and states, as torch.

Letters: T time, B batch, E input size, H hidden size, P proj_size, H_out = P or H,
L layers, D directions.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence as _TorchPackedSequence

from packrnn import _reference, functional
from packrnn.errors import InputError, InputTypeError
from packrnn.ops import _mark_directions
from packrnn.packing import (
    PackedSequence,
    _check_bool,
    _validated,
    as_lengths,
    check_packed_sequence,
    pack_padded_sequence,
    pad_packed_sequence,
)

__all__ = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _check_int(value, name: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def _check_state(value, name: str, shape: tuple, like: Tensor) -> None:
    """A state tensor must be a Tensor of ``shape`` with ``like``'s dtype and device."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise InputError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.dtype != like.dtype:
        raise InputTypeError(f"{name}: expected dtype {like.dtype} (as the input), got {value.dtype}")
    if value.device != like.device:
        raise InputError(f"{name}: expected device {like.device} (as the input), got {value.device}")


def _reset_uniform(module: nn.Module) -> None:
    """torch's RNN/cell init: every parameter ~ Uniform(-1/sqrt(H), 1/sqrt(H)), in registration
    order (so the same seed gives torch's weights). A cell with H = 0 has only empty parameters."""
    bound = 1.0 / math.sqrt(module.hidden_size) if module.hidden_size > 0 else 0.0
    for weight in module.parameters():
        nn.init.uniform_(weight, -bound, bound)


def _reject_proj_size(proj_size) -> None:
    """torch.nn.RNN / GRU raise ValueError for any ``proj_size`` keyword (even 0); so do we."""
    if proj_size is not None:
        raise ValueError(f"proj_size: expected no proj_size argument (it is only supported for "
                         f"LSTM, not RNN or GRU, as in torch), got {proj_size!r}")


def _check_input_features(data: Tensor, name: str, input_size: int, weight: Tensor) -> None:
    """Input of a layer or cell: ``input_size`` features last, the parameters' dtype and device."""
    if data.shape[-1] != input_size:
        raise InputError(f"{name}: expected {input_size} features (input_size) in the last "
                         f"dimension, got shape {tuple(data.shape)}")
    if data.dtype != weight.dtype:
        raise InputTypeError(f"{name}: expected dtype {weight.dtype} (the module's parameters), "
                        f"got {data.dtype}")
    if data.device != weight.device:
        raise InputError(f"{name}: expected device {weight.device} (the module's parameters), "
                         f"got {data.device}")


_JIT_MESSAGE = (
    "packrnn.{name}: {what} is not supported (TorchScript is legacy in PyTorch 2). Use "
    "torch.compile(model) for speed, torch.export.export(model, args, dynamic_shapes=...) for a "
    "portable program, or packrnn.export_onnx / `packrnn export` for ONNX; see the README "
    "section 'Compile, export and serve'.")


class _RNNBase(nn.Module):
    """Shared parameters, validation and input handling of RNN, LSTM and GRU.

    ``backend`` (attribute, default None) picks the functional backend: None (the selected
    one), "python", "native" or "reference" (the per-step readable path, the only one that
    supports second derivatives).
    """

    backend: Optional[str] = None

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__()
        input_size = _check_int(input_size, "input_size", 1)
        hidden_size = _check_int(hidden_size, "hidden_size", 1)
        num_layers = _check_int(num_layers, "num_layers", 1)
        proj_size = _check_int(proj_size, "proj_size", 0)
        _check_bool(bias, "bias")
        _check_bool(batch_first, "batch_first")
        _check_bool(bidirectional, "bidirectional")
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool):
            raise InputTypeError(f"dropout: expected a float in [0, 1], got {dropout!r}")
        if not 0 <= dropout <= 1:  # 1 is allowed, as torch: every inter-layer output dropped
            raise ValueError(f"dropout: expected a float in [0, 1], got {dropout}")
        if proj_size and mode != "LSTM":
            raise ValueError(f"proj_size: expected 0 (projections are LSTM-only), got {proj_size}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size: expected 0 <= proj_size < hidden_size = {hidden_size}, "
                             f"got {proj_size}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        gate_size = _GATES[mode] * hidden_size
        out_size = proj_size if proj_size > 0 else hidden_size
        num_dirs = 2 if bidirectional else 1
        # Registration order = torch's: it fixes state_dict order and the RNG stream of
        # reset_parameters, so the same seed gives the same weights as torch.
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_dirs):
                layer_in = input_size if layer == 0 else out_size * num_dirs
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                params = [("weight_ih", (gate_size, layer_in)), ("weight_hh", (gate_size, out_size))]
                if bias:
                    params += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    params += [("weight_hr", (proj_size, hidden_size))]
                names = []
                for name, shape in params:
                    setattr(self, name + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The parameters in torch's flat order (per layer, per direction)."""
        params = self._parameters
        try:  # registered parameters: dict lookups (getattr costs ~1 us each, on every call)
            return [params[name] for name in self._flat_weights_names]
        except KeyError:  # a weight replaced by a plain attribute (weight_norm, parametrize)
            return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """No-op, for code written against torch's cuDNN modules."""

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch."""
        _reset_uniform(self)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # ------------------------------------------------------------------------------------------
    # forward: normalise the three input forms to packed rows, run, restore the form.
    # ------------------------------------------------------------------------------------------

    def _state_sizes(self, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (layers, batch, out_size), (layers, batch, self.hidden_size)

    def _prepare_hx(self, hx, batch: int, like: Tensor, unbatched: bool):
        """Validate ``hx`` (original batch order) and return (h0, c0) of shape (L*D, B, *)."""
        h_shape, c_shape = self._state_sizes(batch)
        is_lstm = self.mode == "LSTM"
        if hx is None:
            h0 = torch.zeros(h_shape, dtype=like.dtype, device=like.device)
            c0 = torch.zeros(c_shape, dtype=like.dtype, device=like.device) if is_lstm else None
            return h0, c0
        if is_lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise InputTypeError(f"hx: expected a tuple (h_0, c_0) of two tensors, got "
                                f"{type(hx).__name__}")
            pairs = [("hx[0]", hx[0], h_shape), ("hx[1]", hx[1], c_shape)]
        else:
            pairs = [("hx", hx, h_shape)]
        states = []
        for name, value, shape in pairs:
            if unbatched:
                shape = (shape[0], shape[2])
            _check_state(value, name, shape, like)
            states.append(value.unsqueeze(1) if unbatched else value)
        return states[0], (states[1] if is_lstm else None)

    def _run(self, data: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor],
             padded: bool = False):
        """Packed rows in sorted order -> (output rows, h_n, c_n or None) via functional.

        Calls the body of functional.rnn/lstm/gru directly: ``batch_sizes`` is valid here (a
        checked PackedSequence's, or built by ``forward``), so functional skips re-checking it.
        ``padded``: rows in the padded layout (NOTE [Padded layout] in ``functional``).
        """
        return functional._run(
            mode=self.mode.lower(), data=data, batch_sizes=batch_sizes, h0=h0, c0=c0,
            weights=self._flat_weights, bias=self.bias, num_layers=self.num_layers,
            dropout=self.dropout, training=self.training, bidirectional=self.bidirectional,
            backend=self.backend, batch_sizes_checked=True, padded=padded)

    def _finish(self, output, h_n: Tensor, c_n: Optional[Tensor]):
        _mark_directions(output, 2 if self.bidirectional else 1, type(self).__name__)
        if self.mode == "LSTM":
            return output, (h_n, c_n)
        return output, h_n

    def __prepare_scriptable__(self):
        raise RuntimeError(_JIT_MESSAGE.format(what="torch.jit.script", name=type(self).__name__))

    def forward(self, input, hx=None, *, lengths=None):
        """See the class docstring and NOTE [Padding contract]."""
        if torch.jit.is_tracing():
            raise RuntimeError(_JIT_MESSAGE.format(what="torch.jit.trace",
                                                   name=type(self).__name__))
        if isinstance(input, _TorchPackedSequence):
            return self._forward_packed(input, hx, lengths)
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"input: expected a 3-D (batched) or 2-D (unbatched) tensor, got "
                             f"shape {tuple(input.shape)}")
        _check_input_features(input, "input", self.input_size, self.weight_ih_l0)
        unbatched = input.dim() == 2
        if not unbatched and hx is None and lengths is None:
            result = self._forward_inference(input)  # NOTE [Inference lane] in functional
            if result is not None:
                return result
        if unbatched:
            if lengths is not None:
                raise ValueError(f"lengths: expected None for an unbatched 2-D input, got "
                                 f"{lengths!r}")
            input = input.unsqueeze(0 if self.batch_first else 1)
        batch_dim, time_dim = (0, 1) if self.batch_first else (1, 0)
        batch, steps = input.shape[batch_dim], input.shape[time_dim]
        h0, c0 = self._prepare_hx(hx, batch, input, unbatched)

        if lengths is not None:
            # validated in eager mode; not inspected under torch.compile (see as_lengths)
            lengths = as_lengths(lengths, batch, max_length=steps)
        if lengths is None or batch == 0:
            # Every step is real: the packed rows of a full batch are the time-major rows. An
            # empty batch (B = 0, which torch accepts) has no rows and no steps to pack.
            rows = input.transpose(0, 1) if self.batch_first else input  # (T, B, E)
            data = rows.reshape(steps * batch, self.input_size)  # (T*B, E)
            batch_sizes = torch.full((steps if batch else 0,), batch, dtype=torch.int64)  # (T,)
            # A full batch is the padded layout too; traced, say so (no data-dependent sizes).
            out, h_n, c_n = self._run(data, batch_sizes, h0, c0,
                                      padded=torch.compiler.is_compiling())
            output = out.view(steps, batch, out.shape[1])  # (T, B, D*H_out)
            if self.batch_first:
                output = output.transpose(0, 1)  # (B, T, D*H_out)
            if unbatched:
                output = output.squeeze(0 if self.batch_first else 1)
                h_n = h_n.squeeze(1)
                c_n = c_n.squeeze(1) if c_n is not None else None
            return self._finish(output, h_n, c_n)

        if input.is_cuda:  # cuDNN runs packed rows
            packed = pack_padded_sequence(input, lengths, batch_first=self.batch_first)
            packed_out, h_n, c_n = self._forward_sorted(packed, h0, c0, batch,
                                                        zero_state=hx is None)
            output, _ = pad_packed_sequence(packed_out, batch_first=self.batch_first,
                                            total_length=steps)
            return self._finish(output, h_n, c_n)
        return self._finish(*self._forward_lengths(input, lengths, h0, c0, hx is None))

    def _forward_lengths(self, input: Tensor, lengths: Tensor, h0: Tensor, c0: Optional[Tensor],
                         zero_state: bool):
        """Padded input with lengths, in the padded layout (NOTE [Padded layout] in
        ``functional``): sort the batch longest first, run, unsort. No shape depends on the
        lengths' values and nothing is packed, so this path compiles and exports; the kernel
        still computes only the real steps. Returns (output, h_n, c_n or None)."""
        x = input.transpose(0, 1) if self.batch_first else input  # (T, B, E)
        steps, batch = x.shape[0], x.shape[1]
        order = inverse = None
        if batch > 1:  # one sequence: nothing to sort
            order = torch.argsort(lengths, descending=True, stable=True)  # (B,) sorted -> original
            inverse = torch.argsort(order)  # (B,) original -> sorted
            lengths = lengths.index_select(0, order)
            x = _permute(x, order, inverse)  # (T, B, E)
            if not zero_state:  # zeros need no reordering
                h0 = _permute(h0, order, inverse)
                c0 = _permute(c0, order, inverse) if c0 is not None else None
        # batch_sizes[t] = sequences longer than t: (T,), may end in zeros
        batch_sizes = (lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(1)
        out, h_n, c_n = self._run(x.reshape(steps * batch, x.shape[2]), batch_sizes, h0, c0,
                                  padded=True)
        output = out.view(steps, batch, out.shape[1])  # (T, B, D*H_out), zero at padding
        if order is not None:
            output = _permute(output, inverse, order)
            h_n = _permute(h_n, inverse, order)
            c_n = _permute(c_n, inverse, order) if c_n is not None else None
        if self.batch_first:
            output = output.transpose(0, 1)  # (B, T, D*H_out)
        return output, h_n, c_n

    def _forward_inference(self, input: Tensor):
        """A padded batch without lengths or hx, without gradients: the inference lane
        (NOTE [Inference lane] in ``functional``), or None where it does not apply."""
        if torch.is_grad_enabled() or (self.training and self.dropout > 0 and self.num_layers > 1):
            return None
        rows = input.transpose(0, 1) if self.batch_first else input  # (T, B, E)
        result = functional._infer(
            mode=self.mode.lower(), rows=rows, weights=self._flat_weights, bias=self.bias,
            num_layers=self.num_layers, bidirectional=self.bidirectional, backend=self.backend)
        if result is None:
            return None
        out, h_n, c_n = result
        output = out.view(rows.shape[0], rows.shape[1], out.shape[1])  # (T, B, D*H_out)
        if self.batch_first:
            output = output.transpose(0, 1)  # (B, T, D*H_out)
        return self._finish(output, h_n, c_n)

    def _forward_packed(self, input, hx, lengths):
        if lengths is not None:
            raise ValueError(f"lengths: expected None for a PackedSequence input (it carries "
                             f"its own lengths), got {lengths!r}")
        batch = check_packed_sequence(input, "input")
        if input.data.dim() != 2:
            raise InputError(f"input.data: expected a 2-D tensor (N, E), got shape "
                             f"{tuple(input.data.shape)}")
        _check_input_features(input.data, "input.data", self.input_size, self.weight_ih_l0)
        if hx is None and not torch.is_grad_enabled():
            result = self._packed_inference(input, batch)  # NOTE [Inference lane] in functional
            if result is not None:
                return result
        h0, c0 = self._prepare_hx(hx, batch, input.data, unbatched=False)
        packed_out, h_n, c_n = self._forward_sorted(input, h0, c0, batch, zero_state=hx is None)
        return self._finish(packed_out, h_n, c_n)

    def _packed_inference(self, packed, batch: int):
        """A checked PackedSequence of ``batch`` sequences without hx or gradients: the inference
        lane (NOTE [Inference lane] in ``functional``), or None where it does not apply."""
        if self.training and self.dropout > 0 and self.num_layers > 1:
            return None
        data, batch_sizes = packed.data, packed.batch_sizes
        h0 = c0 = None  # the kernel's zeros, for batch_sizes[0] rows
        if batch_sizes.numel() and batch > int(batch_sizes[0]):  # zero-length sequences
            h0, c0 = self._prepare_hx(None, batch, data, unbatched=False)
        result = functional._infer_packed(
            mode=self.mode.lower(), data=data, batch_sizes=batch_sizes, h0=h0, c0=c0,
            weights=self._flat_weights, bias=self.bias, num_layers=self.num_layers,
            bidirectional=self.bidirectional, backend=self.backend)
        if result is None:
            return None
        return self._finish(*_packed_result(packed, *result, batch))

    def _forward_sorted(self, packed, h0: Tensor, c0: Optional[Tensor], batch: int,
                        zero_state: bool = False):
        """Run a packed batch of ``batch`` sequences; states in and out in original order.

        ``zero_state``: h0 / c0 are the all-zero default (hx was None)."""
        sorted_indices, unsorted_indices = packed.sorted_indices, packed.unsorted_indices
        if sorted_indices is not None and not zero_state:  # zeros need no reordering
            h0 = h0.index_select(1, sorted_indices)
            c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
        out, h_n, c_n = self._run(packed.data, packed.batch_sizes, h0, c0)
        return _packed_result(packed, out, h_n, c_n, batch)


# NOTE [Permuting the batch]
# The padded + lengths path sorts the batch (dim 1 of a (T, B, *) tensor, or of the states)
# longest first and unsorts the results. ``index_select``'s backward is a scatter-add
# (``index_add``), and inductor compiles a scatter-add with more than one thread as one atomic
# add per element, whatever the index. A permutation's backward is the inverse permutation, a
# gather again: same numbers, no scatter. Measured at 2 threads: the compiled backward of one
# (41, 16, 64) sort 298 -> 124 us; a compiled lesson training step (benchmarks/bench_compile.py)
# 0.89x -> 0.95-0.97x eager.
class _Permutation(torch.autograd.Function):
    """``x.index_select(1, index)`` for a permutation ``index`` whose inverse is ``inverse``;
    backward gathers with ``inverse`` (NOTE [Permuting the batch])."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(index, inverse)
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        index, inverse = ctx.saved_tensors
        return _permute(grad, inverse, index), None, None  # differentiable again: create_graph


def _permute(x: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """Dim 1 of ``x`` permuted by ``index`` (``inverse``: its inverse); gradients gather."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.index_select(1, index)
    return _Permutation.apply(x, index, inverse)


def _packed_result(packed, out: Tensor, h_n: Tensor, c_n: Optional[Tensor], batch: int):
    """(output PackedSequence, h_n, c_n) of a run on ``packed``'s rows: the output carries the
    input's fields, so it is marked valid (NOTE [validated PackedSequence]); the states, in
    sorted order from the run, go back to the original batch order."""
    sorted_indices, unsorted_indices = packed.sorted_indices, packed.unsorted_indices
    if unsorted_indices is not None:
        h_n = h_n.index_select(1, unsorted_indices)
        c_n = c_n.index_select(1, unsorted_indices) if c_n is not None else None
    packed_out = _validated(
        PackedSequence(out, packed.batch_sizes, sorted_indices, unsorted_indices), batch)
    return packed_out, h_n, c_n


_LAYER_DOC = """
    Args:
        input_size: number of features E of the input.
        hidden_size: number of features H of the hidden state.
        num_layers: number of stacked layers. Default 1.
        {extra}bias: if False, no ``bias_ih`` / ``bias_hh``. Default True.
        batch_first: input and output are (B, T, *) instead of (T, B, *). Default False.
        dropout: dropout probability in [0, 1] on the outputs of every layer but the last, in
            training mode only. Default 0.
        bidirectional: add a reverse direction; outputs are concatenated. Default False.
        device, dtype: of the parameters.

    Inputs ``(input, hx=None, *, lengths=None)``:
        input: PackedSequence (N, E), or padded (T, B, E) / (B, T, E) / unbatched (T, E).
        hx: {hx}, in the original batch order; zeros if None.
        lengths: optional, with padded input only: B lengths in [0, T] (list or tensor).

    Outputs: {outputs}
        The output is a PackedSequence for packed input, else padded like the input, with
        D*H_out features (D = 2 if bidirectional, H_out = {hout}).
        Padding contract (NOTE [Padding contract] in ``packrnn.rnn``): with ``lengths``, the
        output is zero at padded steps and the final states are those at each sequence's last
        real step; without ``lengths`` every step is real, exactly as torch.

    Parameters have torch's names, shapes and initialisation (``weight_ih_l{{k}}``,
    ``weight_hh_l{{k}}``, ``bias_ih_l{{k}}``, ``bias_hh_l{{k}}``{hr}, ``_reverse`` suffix for
    the reverse direction), so ``load_state_dict`` works both ways with ``torch.nn.{name}``.
"""


class RNN(_RNNBase):
    """Elman RNN over variable-length sequences: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh).

    ``act`` is tanh or relu (``nonlinearity``). Computes only the real steps.
    {doc}
    >>> import torch, packrnn
    >>> rnn = packrnn.RNN(2, 3, batch_first=True)
    >>> out, h_n = rnn(torch.randn(2, 5, 2), lengths=[5, 2])
    >>> out.shape, h_n.shape, bool(out[1, 2:].eq(0).all())
    (torch.Size([2, 5, 3]), torch.Size([1, 2, 3]), True)
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None,
                 *, proj_size=None):
        _reject_proj_size(proj_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        mode = "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU"
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity


class LSTM(_RNNBase):
    """LSTM over variable-length sequences (torch's gate order i, f, g, o).

    [i, f, g, o] = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh, split in four; i, f, o through
    sigmoid and g through tanh;  c_t = f * c_{t-1} + i * g,  h_t = o * tanh(c_t), then
    h_t W_hr^T if ``proj_size`` > 0. Computes only the real steps.
    {doc}
    >>> import torch, packrnn
    >>> lstm = packrnn.LSTM(2, 3, batch_first=True)
    >>> out, (h_n, c_n) = lstm(torch.randn(2, 5, 2), lengths=[5, 2])
    >>> out.shape, h_n.shape, bool(out[1, 2:].eq(0).all())
    (torch.Size([2, 5, 3]), torch.Size([1, 2, 3]), True)
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device, dtype)


class GRU(_RNNBase):
    """GRU over variable-length sequences (torch's gate order r, z, n).

    r = sigmoid(x_t W_ir^T + b_ir + h_{t-1} W_hr^T + b_hr), z likewise with the z blocks,
    n = tanh(x_t W_in^T + b_in + r * (h_{t-1} W_hn^T + b_hn)),  h_t = (1 - z) * n + z * h_{t-1}.
    Computes only the real steps.
    {doc}
    >>> import torch, packrnn
    >>> gru = packrnn.GRU(2, 3)
    >>> packed = packrnn.pack_sequence([torch.randn(4, 2), torch.randn(1, 2)])
    >>> out, h_n = gru(packed)
    >>> out.data.shape, h_n.shape
    (torch.Size([5, 3]), torch.Size([1, 2, 3]))
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, *, proj_size=None):
        _reject_proj_size(proj_size)
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)


_DOC_FIELDS = {
    RNN: dict(extra="nonlinearity: 'tanh' or 'relu'. Default 'tanh'.\n        ",
              hx="h_0 (L*D, B, H)", outputs="(output, h_n (L*D, B, H))", hout="H", hr="",
              name="RNN"),
    LSTM: dict(extra="proj_size: if > 0, project h to this size (0 < P < H). Default 0.\n        ",
               hx="(h_0 (L*D, B, H_out), c_0 (L*D, B, H))", outputs="(output, (h_n, c_n))",
               hout="proj_size or H", hr=", ``weight_hr_l{k}``", name="LSTM"),
    GRU: dict(extra="", hx="h_0 (L*D, B, H)", outputs="(output, h_n (L*D, B, H))", hout="H",
              hr="", name="GRU"),
}
for _cls, _fields in _DOC_FIELDS.items():
    if _cls.__doc__:  # None under python -OO
        _cls.__doc__ = _cls.__doc__.replace("{doc}", _LAYER_DOC.format(**_fields))
del _cls, _fields


# ----------------------------------------------------------------------------------------------
# cells: one step, batched (B, E) or unbatched (E,) input
# ----------------------------------------------------------------------------------------------


class _CellBase(nn.Module):
    """Parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``) and validation."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int,
                 device=None, dtype=None):
        super().__init__()
        # 0 is allowed, as torch's cells: H = 0 gives (B, 0) states
        self.input_size = _check_int(input_size, "input_size", 0)
        self.hidden_size = _check_int(hidden_size, "hidden_size", 0)
        self.bias = _check_bool(bias, "bias")
        factory = {"device": device, "dtype": dtype}
        gates = num_chunks * hidden_size
        self.weight_ih = nn.Parameter(torch.empty((gates, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((gates, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter, as torch."""
        _reset_uniform(self)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def _prepare(self, input, states, names):
        """Validate; return batched input (B, E), batched states and whether input was 1-D."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"input: expected a 2-D (batched) or 1-D (unbatched) tensor, got "
                             f"shape {tuple(input.shape)}")
        _check_input_features(input, "input", self.input_size, self.weight_ih)
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input  # (B, E)
        shape = (self.hidden_size,) if unbatched else (x.shape[0], self.hidden_size)
        out = []
        for name, state in zip(names, states):
            if state is None:
                out.append(x.new_zeros(x.shape[0], self.hidden_size))
                continue
            _check_state(state, name, shape, input)
            out.append(state.unsqueeze(0) if unbatched else state)
        return x, out, unbatched


class RNNCell(_CellBase):
    """One Elman RNN step: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act = tanh or relu.

    Args:
        input_size, hidden_size, bias (default True), nonlinearity ('tanh' default or
        'relu'), device, dtype: as ``torch.nn.RNNCell``.

    Inputs ``(input (B, E) or (E,), hx (B, H) or (H,) or None for zeros)``; output h' of hx's
    shape.

    >>> import torch, packrnn
    >>> packrnn.RNNCell(2, 3)(torch.randn(4, 2)).shape
    torch.Size([4, 3])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity: expected 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), unbatched = self._prepare(input, [hx], ["hx"])
        cell = _reference.rnn_tanh_cell if self.nonlinearity == "tanh" else _reference.rnn_relu_cell
        h_next = cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h_next.squeeze(0) if unbatched else h_next


class LSTMCell(_CellBase):
    """One LSTM step (gate order i, f, g, o): c' = f * c + i * g, h' = o * tanh(c').

    Args:
        input_size, hidden_size, bias (default True), device, dtype: as ``torch.nn.LSTMCell``.

    Inputs ``(input (B, E) or (E,), hx = (h, c) each (B, H) or (H,), or None for zeros)``;
    output ``(h', c')``.

    >>> import torch, packrnn
    >>> h, c = packrnn.LSTMCell(2, 3)(torch.randn(4, 2))
    >>> h.shape, c.shape
    (torch.Size([4, 3]), torch.Size([4, 3]))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(input_size, hidden_size, bias, 4, device, dtype)

    def forward(self, input: Tensor, hx: Optional[tuple[Tensor, Tensor]] = None
                ) -> tuple[Tensor, Tensor]:
        if hx is None:
            hx = (None, None)
        elif not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx: expected a tuple (h, c) of two tensors, got {type(hx).__name__}")
        x, (h, c), unbatched = self._prepare(input, list(hx), ["hx[0]", "hx[1]"])
        h_next, c_next = _reference.lstm_cell(x, h, c, self.weight_ih, self.weight_hh,
                                              self.bias_ih, self.bias_hh)
        if unbatched:
            return h_next.squeeze(0), c_next.squeeze(0)
        return h_next, c_next


class GRUCell(_CellBase):
    """One GRU step (gate order r, z, n): h' = (1 - z) * n + z * h.

    Args:
        input_size, hidden_size, bias (default True), device, dtype: as ``torch.nn.GRUCell``.

    Inputs ``(input (B, E) or (E,), hx (B, H) or (H,) or None for zeros)``; output h'.

    >>> import torch, packrnn
    >>> packrnn.GRUCell(2, 3)(torch.randn(2)).shape
    torch.Size([3])
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None):
        super().__init__(input_size, hidden_size, bias, 3, device, dtype)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), unbatched = self._prepare(input, [hx], ["hx"])
        h_next = _reference.gru_cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih,
                                     self.bias_hh)
        return h_next.squeeze(0) if unbatched else h_next
