"""packrnn's errors can be caught as what torch raises for the same bad input (torch is the
oracle) and as packrnn's documented ValueError / TypeError, with packrnn's own messages.

Each case runs the same call against torch (``torch.nn`` layers, ``torch.nn.utils.rnn``) and
against packrnn; torch's exception class decides what packrnn's error must also be.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.utils.rnn as torch_rnn_utils

import packrnn
from packrnn import InputError, InputTypeError

TORCH = types.SimpleNamespace(
    **{name: getattr(torch_rnn_utils, name)
       for name in ("pad_sequence", "pack_sequence", "pack_padded_sequence")},
    **{name: getattr(torch.nn, name)
       for name in ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")},
)

x = lambda *shape: torch.randn(*shape)  # noqa: E731
CASES = {
    # packing
    "pack_padded_sequence, enforce_sorted=True, unsorted": (
        lambda m: m.pack_padded_sequence(x(3, 2), [1, 3], enforce_sorted=True), ValueError,
        r"lengths: expected lengths sorted in decreasing order since enforce_sorted=True, got "
        r"lengths \[1, 3\]"),
    "pack_sequence, enforce_sorted=True, unsorted": (
        lambda m: m.pack_sequence([x(1), x(2)], enforce_sorted=True), ValueError,
        r"sequences: expected sequences by length sorted in decreasing order since "
        r"enforce_sorted=True, got lengths \[1, 2\]"),
    "pad_sequence of a non-iterable": (
        lambda m: m.pad_sequence(5), TypeError, r"sequences: expected a list of tensors, got int"),
    "pad_sequence of an empty list": (
        lambda m: m.pad_sequence([]), ValueError,
        r"sequences: expected at least one sequence, got an empty list"),
    "pack_sequence of an empty list": (
        lambda m: m.pack_sequence([]), ValueError,
        r"sequences: expected at least one sequence, got an empty list"),
    "pad_sequence, trailing shapes differ": (
        lambda m: m.pad_sequence([x(2, 3), x(2, 4)]), ValueError,
        r"sequences\[1\]: expected trailing shape \(3,\) \(as sequences\[0\]\), got \(4,\)"),
    "pad_sequence, padding_side": (
        lambda m: m.pad_sequence([x(2)], padding_side="up"), ValueError,
        r"padding_side: expected 'right' or 'left', got 'up'"),
    "pack an empty tensor": (
        lambda m: m.pack_padded_sequence(x(0, 0), []), ValueError,
        r"input: expected at least one sequence, got batch size 0 \(shape \(0, 0\)\)"),
    "pack an empty batch with float lengths (torch's own test)": (
        lambda m: m.pack_padded_sequence(x(0, 1, 10), x(11, 14, 14, 2), True), ValueError,
        r"input: expected at least one sequence, got batch size 0 \(shape \(0, 1, 10\)\)"),
    "pack, lengths count": (
        lambda m: m.pack_padded_sequence(x(3, 2), [3, 2, 1]), ValueError,
        r"lengths: expected 2 lengths \(one per sequence in the batch\), got 3"),
    "pack, negative length": (
        lambda m: m.pack_padded_sequence(x(3, 2), [3, -1]), ValueError,
        r"lengths: expected non-negative lengths, got -1 at index 1"),
    "pack, 2-D lengths": (
        lambda m: m.pack_padded_sequence(x(3, 2), torch.tensor([[3, 2]])), ValueError,
        r"lengths: expected a 1-D sequence of lengths, got a tensor of shape \(1, 2\)"),
    # layers
    "LSTM, input features": (
        lambda m: m.LSTM(4, 5)(x(5, 3, 3)), ValueError,
        r"input: expected 4 features \(input_size\) in the last dimension, got shape \(5, 3, 3\)"),
    "GRU, hx batch": (
        lambda m: m.GRU(4, 5)(x(5, 3, 4), x(1, 2, 5)), ValueError,
        r"hx: expected shape \(1, 3, 5\), got \(1, 2, 5\)"),
    "RNN, hx hidden size": (
        lambda m: m.RNN(4, 5)(x(5, 3, 4), x(1, 3, 6)), ValueError,
        r"hx: expected shape \(1, 3, 5\), got \(1, 3, 6\)"),
    "LSTM, c_0 shape": (
        lambda m: m.LSTM(4, 5)(x(5, 3, 4), (x(1, 3, 5), x(1, 3, 6))), ValueError,
        r"hx\[1\]: expected shape \(1, 3, 5\), got \(1, 3, 6\)"),
    "LSTM with projections, h_0 of hidden size": (
        lambda m: m.LSTM(4, 5, proj_size=2)(x(5, 3, 4), (x(1, 3, 5), x(1, 3, 5))), ValueError,
        r"hx\[0\]: expected shape \(1, 3, 2\), got \(1, 3, 5\)"),
    "LSTM, three states": (
        lambda m: m.LSTM(4, 5)(x(5, 3, 4), (x(1, 3, 5),) * 3), TypeError,
        r"hx: expected a tuple \(h_0, c_0\) of two tensors, got tuple"),
    "GRU, unbatched input with a batched hx": (
        lambda m: m.GRU(4, 5)(x(5, 4), x(1, 3, 5)), ValueError,
        r"hx: expected shape \(1, 5\), got \(1, 3, 5\)"),
    "GRU, batched input with an unbatched hx": (
        lambda m: m.GRU(4, 5)(x(5, 3, 4), x(1, 5)), ValueError,
        r"hx: expected shape \(1, 3, 5\), got \(1, 5\)"),
    "LSTM, input dtype (torch: ValueError)": (
        lambda m: m.LSTM(4, 5)(x(5, 3, 4).double()), TypeError,
        r"input: expected dtype torch.float32 \(the module's parameters\), got torch.float64"),
    "GRU, hx dtype (torch: RuntimeError)": (
        lambda m: m.GRU(4, 5)(x(5, 3, 4), x(1, 3, 5).double()), TypeError,
        r"hx: expected dtype torch.float32 \(as the input\), got torch.float64"),
    "LSTM, dropout=True (torch: ValueError)": (
        lambda m: m.LSTM(4, 5, 2, dropout=True), TypeError,
        r"dropout: expected a float in \[0, 1\], got True"),
    # cells
    "GRUCell, input features": (
        lambda m: m.GRUCell(4, 3)(x(2, 5)), ValueError,
        r"input: expected 4 features \(input_size\) in the last dimension, got shape \(2, 5\)"),
    "GRUCell, hx batch": (
        lambda m: m.GRUCell(4, 3)(x(2, 4), x(1, 3)), ValueError,
        r"hx: expected shape \(2, 3\), got \(1, 3\)"),
    "RNNCell, hx hidden size": (
        lambda m: m.RNNCell(4, 3)(x(2, 4), x(2, 4)), ValueError,
        r"hx: expected shape \(2, 3\), got \(2, 4\)"),
    "LSTMCell, c batch": (
        lambda m: m.LSTMCell(4, 3)(x(2, 4), (x(2, 3), x(1, 3))), ValueError,
        r"hx\[1\]: expected shape \(2, 3\), got \(1, 3\)"),
    "GRUCell, unbatched input with a batched hx": (
        lambda m: m.GRUCell(4, 3)(x(4), x(2, 3)), ValueError,
        r"hx: expected shape \(3,\), got \(2, 3\)"),
    "GRUCell, input dtype": (
        lambda m: m.GRUCell(4, 3)(x(2, 4).double()), TypeError,
        r"input: expected dtype torch.float32 \(the module's parameters\), got torch.float64"),
    "LSTMCell, hx dtype": (
        lambda m: m.LSTMCell(4, 3)(x(2, 4), (x(2, 3).double(), x(2, 3).double())), TypeError,
        r"hx\[0\]: expected dtype torch.float32 \(as the input\), got torch.float64"),
}


def _builtin_class(error: BaseException) -> type:
    """The builtin exception class of ``error`` (torch may raise a subclass)."""
    return next(c for c in type(error).__mro__ if c.__module__ == "builtins")


@pytest.mark.parametrize("call, documented, match", CASES.values(), ids=list(CASES))
def test_error_is_caught_as_torch_raises_it_and_as_documented(call, documented, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's one-layer dropout warning
        with pytest.raises(Exception) as theirs:
            call(TORCH)
    torch_class = _builtin_class(theirs.value)
    assert torch_class in (RuntimeError, ValueError)  # the cases where classes used to differ
    with pytest.raises(documented, match=match) as ours:
        call(packrnn)
    assert isinstance(ours.value, torch_class), (type(ours.value), torch_class)


def test_error_classes_derive_from_every_class_concerned():
    assert issubclass(InputError, ValueError) and issubclass(InputError, RuntimeError)
    for base in (TypeError, ValueError, RuntimeError):
        assert issubclass(InputTypeError, base)
    assert packrnn.errors.InputError is InputError and "InputError" in packrnn.__all__


def test_functional_and_packed_sequence_errors_are_runtime_errors_too():
    """No torch call to compare with: torch's kernels raise RuntimeError for these."""
    weights = packrnn.LSTM(3, 4)._flat_weights
    data, batch_sizes = torch.randn(5, 3), torch.tensor([3, 2])
    with pytest.raises(RuntimeError, match=r"hx\[0\]: expected shape \(1, B, 4\) with B >= "):
        packrnn.functional.lstm(data, batch_sizes, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
                                weights)
    with pytest.raises(RuntimeError, match=r"data: expected 3 features"):
        packrnn.functional.lstm(torch.randn(5, 2), batch_sizes, None, weights)
    broken = torch_rnn_utils.PackedSequence(torch.ones(4), torch.tensor([2, 1]))
    with pytest.raises(RuntimeError, match=r"sequence: expected data.size\(0\) == sum"):
        packrnn.pad_packed_sequence(broken)
