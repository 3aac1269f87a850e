"""packrnn.RNNCell / LSTMCell / GRUCell against torch.nn's cells with copied weights."""

from __future__ import annotations

import pytest
import torch

import packrnn

E, H, B = 3, 4, 2
KINDS = ["rnn_tanh", "rnn_relu", "lstm", "gru"]
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-7), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make_pair(kind, dtype=torch.float64, bias=True, input_size=E, hidden_size=H):
    sizes = (input_size, hidden_size)
    if kind.startswith("rnn"):
        args = dict(bias=bias, nonlinearity=kind[4:], dtype=dtype)
        ours, theirs = packrnn.RNNCell(*sizes, **args), torch.nn.RNNCell(*sizes, **args)
    elif kind == "lstm":
        ours, theirs = packrnn.LSTMCell(*sizes, bias=bias, dtype=dtype), torch.nn.LSTMCell(*sizes, bias=bias, dtype=dtype)
    else:
        ours, theirs = packrnn.GRUCell(*sizes, bias=bias, dtype=dtype), torch.nn.GRUCell(*sizes, bias=bias, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def states(kind, shape, dtype):
    if kind == "lstm":
        return tuple(torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(2))
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def clone_leaf(value):
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(clone_leaf(v) for v in value)
    return value.detach().clone().requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_cell_matches_torch(kind, bias, batched, with_hx, dtype):
    torch.manual_seed(0)
    ours, theirs = make_pair(kind, dtype, bias)
    assert_cell_matches(ours, theirs, kind, batched, with_hx, dtype)


@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("sizes", [(E, 0), (0, H)], ids=["hidden_size=0", "input_size=0"])
@pytest.mark.parametrize("kind", KINDS)
def test_cell_zero_sizes_match_torch(kind, sizes, batched, with_hx):
    """torch's cells accept hidden_size=0 ((B, 0) states) and input_size=0; so do packrnn's."""
    torch.manual_seed(3)
    ours, theirs = make_pair(kind, input_size=sizes[0], hidden_size=sizes[1])
    assert_cell_matches(ours, theirs, kind, batched, with_hx, torch.float64)


def assert_cell_matches(ours, theirs, kind, batched, with_hx, dtype):
    """Outputs and the gradients of input, states and parameters equal torch's."""
    e, h = ours.input_size, ours.hidden_size
    shape_x, shape_h = ((B, e), (B, h)) if batched else ((e,), (h,))
    x = torch.randn(shape_x, dtype=dtype)
    hx = states(kind, shape_h, dtype) if with_hx else None
    x1, x2 = clone_leaf(x), clone_leaf(x)
    h1, h2 = clone_leaf(hx), clone_leaf(hx)
    out, out_ref = as_tuple(ours(x1, h1)), as_tuple(theirs(x2, h2))
    for a, b in zip(out, out_ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL[dtype])
    weights = [torch.randn_like(t) for t in out_ref]
    leaves = [x1, *(as_tuple(h1) if with_hx else ()), *ours.parameters()]
    leaves_ref = [x2, *(as_tuple(h2) if with_hx else ()), *theirs.parameters()]
    grads = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), leaves)
    grads_ref = torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out_ref)), leaves_ref)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
def test_cell_parameters_and_init_as_torch(kind):
    """Same names, shapes, repr, and the same weights from the same seed (same init)."""
    ours_cls = {"r": packrnn.RNNCell, "l": packrnn.LSTMCell, "g": packrnn.GRUCell}[kind[0]]
    theirs_cls = {"r": torch.nn.RNNCell, "l": torch.nn.LSTMCell, "g": torch.nn.GRUCell}[kind[0]]
    kwargs = dict(nonlinearity=kind[4:]) if kind.startswith("rnn") else {}
    torch.manual_seed(1)
    ours = ours_cls(E, H, **kwargs)
    torch.manual_seed(1)
    theirs = theirs_cls(E, H, **kwargs)
    sd, sd_ref = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(sd_ref)
    for name in sd:
        assert torch.equal(sd[name], sd_ref[name]), name
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())


def test_cell_without_bias_has_none_biases():
    cell = packrnn.GRUCell(E, H, bias=False)
    assert cell.bias_ih is None and cell.bias_hh is None
    assert [n for n, _ in cell.named_parameters()] == ["weight_ih", "weight_hh"]


def test_cell_steps_equal_layer():
    """Stepping LSTMCell over a sequence equals a one-layer packrnn.LSTM with the same weights."""
    torch.manual_seed(2)
    cell = packrnn.LSTMCell(E, H, dtype=torch.float64)
    layer = packrnn.LSTM(E, H, dtype=torch.float64)
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(5, B, E, dtype=torch.float64)
    h = c = torch.zeros(B, H, dtype=torch.float64)
    outs = []
    for t in range(5):
        h, c = cell(x[t], (h, c))
        outs.append(h)
    out, (h_n, c_n) = layer(x)
    torch.testing.assert_close(torch.stack(outs), out)
    torch.testing.assert_close(h, h_n[0])
    torch.testing.assert_close(c, c_n[0])


@pytest.mark.parametrize("call, error, match", [
    (lambda c: c(torch.randn(B, E + 1, dtype=torch.float64)), ValueError,
     r"input: expected 3 features \(input_size\) in the last dimension, got shape \(2, 4\)"),
    (lambda c: c(torch.randn(1, B, E, dtype=torch.float64)), ValueError,
     r"input: expected a 2-D \(batched\) or 1-D \(unbatched\) tensor, got shape \(1, 2, 3\)"),
    (lambda c: c(torch.randn(B, E)), TypeError,
     r"input: expected dtype torch.float64 \(the module's parameters\), got torch.float32"),
    (lambda c: c("x"), TypeError, r"input: expected a Tensor, got str"),
    (lambda c: c(torch.randn(B, E, dtype=torch.float64), torch.zeros(B + 1, H, dtype=torch.float64)),
     ValueError, r"hx: expected shape \(2, 4\), got \(3, 4\)"),
    (lambda c: c(torch.randn(E, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64)),
     ValueError, r"hx: expected shape \(4,\), got \(2, 4\)"),
    (lambda c: c(torch.randn(B, E, dtype=torch.float64), torch.zeros(B, H)), TypeError,
     r"hx: expected dtype torch.float64 \(as the input\), got torch.float32"),
    (lambda c: c(torch.randn(B, E, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64, device="meta")),
     ValueError, r"hx: expected device cpu \(as the input\), got meta"),
])
def test_cell_errors(call, error, match):
    cell = packrnn.GRUCell(E, H, dtype=torch.float64)
    with pytest.raises(error, match=match):
        call(cell)


def test_cell_constructor_and_lstm_hx_errors():
    with pytest.raises(ValueError, match=r"hidden_size: expected an int >= 0, got -1"):
        packrnn.LSTMCell(E, -1)
    with pytest.raises(TypeError, match=r"input_size: expected an int, got 1.5"):
        packrnn.GRUCell(1.5, H)
    with pytest.raises(ValueError, match=r"nonlinearity: expected 'tanh' or 'relu', got 'sigmoid'"):
        packrnn.RNNCell(E, H, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match=r"bias: expected a bool, got 0"):
        packrnn.RNNCell(E, H, bias=0)
    cell = packrnn.LSTMCell(E, H, dtype=torch.float64)
    x = torch.randn(B, E, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h, c\) of two tensors, got Tensor"):
        cell(x, torch.zeros(B, H, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"hx\[1\]: expected shape \(2, 4\), got \(2, 3\)"):
        cell(x, (torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, 3, dtype=torch.float64)))
