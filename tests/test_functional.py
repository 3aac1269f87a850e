"""packrnn.functional and its backends: gradcheck, reference == lean == torch, backend selection.

``BACKENDS`` lists the recurrence backends every oracle test runs against (tests/test_rnn.py
imports it). A new backend joins by appearing here: "native" is added when
``packrnn.backend`` exists and reports it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.nn.utils import rnn as tnn_rnn

import packrnn
from packrnn import _lean, functional


def _available_backends() -> list[str]:
    names = ["python"]
    if importlib.util.find_spec("packrnn.backend") is not None:
        from packrnn import backend

        if backend.backend_name() == "native":
            names.append("native")
    return names


BACKENDS = _available_backends()

E, H, P = 3, 4, 2
MODES = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]


def torch_module(mode, num_layers, bidirectional, bias=True, dtype=torch.float64,
                 input_size=E, hidden_size=H):
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, dtype=dtype)
    if mode.startswith("rnn"):
        return torch.nn.RNN(input_size, hidden_size, nonlinearity=mode[4:], **kwargs)
    if mode.startswith("lstm"):
        proj = hidden_size // 2 if mode == "lstm_proj" else 0
        return torch.nn.LSTM(input_size, hidden_size, proj_size=proj, **kwargs)
    return torch.nn.GRU(input_size, hidden_size, **kwargs)


def call(mode, data, batch_sizes, hx, weights, **kwargs):
    """Uniform front over functional.rnn / lstm / gru: returns (output, [states])."""
    if mode.startswith("lstm"):
        out, (h, c) = functional.lstm(data, batch_sizes, hx, weights, **kwargs)
        return out, [h, c]
    if mode == "gru":
        out, h = functional.gru(data, batch_sizes, hx, weights, **kwargs)
        return out, [h]
    out, h = functional.rnn(data, batch_sizes, hx, weights, nonlinearity=mode[4:], **kwargs)
    return out, [h]


def packed_case(mode, num_layers, bidirectional, *, batch=4, lengths=(4, 3, 1),
                dtype=torch.float64, seed=0, input_size=E, hidden_size=H):
    """A tiny packed batch (sorted), initial states with one extra zero-length row, weights."""
    torch.manual_seed(seed)
    module = torch_module(mode, num_layers, bidirectional, dtype=dtype, input_size=input_size,
                          hidden_size=hidden_size)
    sequences = [torch.randn(n, input_size, dtype=dtype) for n in lengths]
    packed = tnn_rnn.pack_sequence(sequences)
    layers = num_layers * (2 if bidirectional else 1)
    width = hidden_size // 2 if mode == "lstm_proj" else hidden_size
    h0 = torch.randn(layers, batch, width, dtype=dtype)
    hx = (h0, torch.randn(layers, batch, hidden_size, dtype=dtype)) if mode.startswith("lstm") else h0
    weights = [w.detach().clone() for w in module._flat_weights]
    return module, packed, hx, weights


def leaves(data, hx, weights):
    data = data.detach().clone().requires_grad_()
    if isinstance(hx, tuple):
        hx = tuple(h.detach().clone().requires_grad_() for h in hx)
        hx_list = list(hx)
    else:
        hx = hx.detach().clone().requires_grad_()
        hx_list = [hx]
    weights = [w.detach().clone().requires_grad_() for w in weights]
    return data, hx, weights, [data, *hx_list, *weights]


# ---------------------------------------------------------------------------------------------
# gradcheck of the hand-written backward (tiny float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode, bidirectional, backend):
    # batch 3 > batch_sizes[0] = 2: includes a zero-length sequence in the state
    _, packed, hx, weights = packed_case(mode, 2, bidirectional, batch=3, lengths=(3, 1))
    data, hx, weights, inputs = leaves(packed.data, hx, weights)
    n_hx = 2 if isinstance(hx, tuple) else 1

    def fn(data, *rest):
        hx_ = tuple(rest[:n_hx]) if n_hx == 2 else rest[0]
        out, states = call(mode, data, packed.batch_sizes, hx_, list(rest[n_hx:]),
                           num_layers=2, bidirectional=bidirectional, backend=backend)
        return (out, *states)

    # fast_mode checks random projections of the Jacobian: a full check of every parameter
    # element is what the torch-oracle gradient tests in test_rnn.py do
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_full_jacobian(mode, backend):
    """Every Jacobian entry, on the tiniest bidirectional case (E = H = 2)."""
    _, packed, hx, weights = packed_case(mode, 1, True, batch=3, lengths=(3, 1), input_size=2,
                                         hidden_size=2)
    data, hx, weights, inputs = leaves(packed.data, hx, weights)
    n_hx = 2 if isinstance(hx, tuple) else 1

    def fn(data, *rest):
        hx_ = tuple(rest[:n_hx]) if n_hx == 2 else rest[0]
        out, states = call(mode, data, packed.batch_sizes, hx_, list(rest[n_hx:]),
                           bidirectional=True, backend=backend)
        return (out, *states)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# every backend == the per-step reference == torch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_backend_agrees_with_reference_and_torch(mode, bias, backend):
    torch.manual_seed(1)
    module = torch_module(mode, 2, True, bias=bias)
    _, packed, hx, _ = packed_case(mode, 2, True, batch=4)
    weights = [w.detach() for w in module._flat_weights]
    results = {}
    for name in ("reference", backend):
        data, hx_, weights_, inputs = leaves(packed.data, hx, weights)
        out, states = call(mode, data, packed.batch_sizes, hx_, weights_, bias=bias,
                           num_layers=2, bidirectional=True, backend=name)
        torch.manual_seed(2)
        loss = sum((torch.randn_like(t) * t).sum() for t in (out, *states))
        results[name] = (out, states, torch.autograd.grad(loss, inputs))
    ref_out, ref_states, ref_grads = results["reference"]
    out, states, grads = results[backend]
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(states, ref_states, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)

    # torch on the three real sequences (it cannot hold the zero-length fourth)
    hx_torch = tuple(h[:, :3].contiguous() for h in hx) if isinstance(hx, tuple) else hx[:, :3]
    out_t, state_t = module(packed, hx_torch)
    torch.testing.assert_close(out, out_t.data)
    for a, b, h in zip(states, state_t if isinstance(state_t, tuple) else (state_t,),
                       hx if isinstance(hx, tuple) else (hx,)):
        torch.testing.assert_close(a[:, :3], b)
        assert torch.equal(a[:, 3], h[:, 3])  # zero-length row keeps its initial state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode, used", [(m, u) for m in MODES for u in ("output", "h_n", "c_n")
                                        if u != "c_n" or m.startswith("lstm")])
def test_loss_of_one_output_matches_reference(mode, used, backend):
    """A loss of the output alone, or of h_n or c_n alone: the unused outputs' gradients reach
    the backend as None (NOTE [Absent gradients]) and count as zero."""
    _, packed, hx, weights = packed_case(mode, 2, True, batch=4)
    grads = {}
    for name in ("reference", backend):
        data, hx_, weights_, inputs = leaves(packed.data, hx, weights)
        out, states = call(mode, data, packed.batch_sizes, hx_, weights_, num_layers=2,
                           bidirectional=True, backend=name)
        chosen = {"output": out, "h_n": states[0], "c_n": states[-1]}[used]
        torch.manual_seed(3)
        loss = (torch.randn_like(chosen) * chosen).sum()
        grads[name] = torch.autograd.grad(loss, inputs)
    for a, b in zip(grads[backend], grads["reference"], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_inference_path_equals_training_path(mode, backend):
    _, packed, hx, weights = packed_case(mode, 2, True)
    with torch.no_grad():
        out_ng, states_ng = call(mode, packed.data, packed.batch_sizes, hx, weights,
                                 num_layers=2, bidirectional=True, backend=backend)
    data, hx_, weights_, _ = leaves(packed.data, hx, weights)
    out, states = call(mode, data, packed.batch_sizes, hx_, weights_, num_layers=2,
                       bidirectional=True, backend=backend)
    assert out.requires_grad and not out_ng.requires_grad
    torch.testing.assert_close(out_ng, out.detach())
    for a, b in zip(states_ng, states):
        torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("mode", ["lstm", "lstm_proj", "gru", "rnn_relu"])
@pytest.mark.parametrize("reverse", [False, True])
def test_lean_backend_contract_direct(mode, reverse):
    """The backend functions on their own: keyword-only, shapes of the contract, agree with
    the per-step reference of one direction."""
    from packrnn import _reference

    torch.manual_seed(3)
    kind = "lstm" if mode.startswith("lstm") else mode
    gates = {"lstm": 4, "gru": 3}.get(kind, 1)
    width = P if mode == "lstm_proj" else H
    batch_sizes = torch.tensor([3, 2, 2, 1])
    rows, batch = int(batch_sizes.sum()), 4
    x = torch.randn(rows, E, dtype=torch.float64)
    w_ih = torch.randn(gates * H, E, dtype=torch.float64)
    w_hh = torch.randn(gates * H, width, dtype=torch.float64)
    b_ih = torch.randn(gates * H, dtype=torch.float64)
    b_hh = torch.randn(gates * H, dtype=torch.float64)
    w_hr = torch.randn(P, H, dtype=torch.float64) if mode == "lstm_proj" else None
    h0 = torch.randn(batch, width, dtype=torch.float64)
    c0 = torch.randn(batch, H, dtype=torch.float64) if kind == "lstm" else None
    gates_x = x @ w_ih.t() + b_ih + (0 if kind == "gru" else b_hh)
    output, h_n, c_n, saved = _lean.recurrence_forward(
        mode=kind, gates_x=gates_x, batch_sizes=batch_sizes, h0=h0, c0=c0, w_hh=w_hh,
        b_hh=b_hh if kind == "gru" else None, w_hr=w_hr, reverse=reverse, need_backward=True)
    ref_out, ref_h, ref_c = _reference.recurrence(
        mode=kind, x=x, batch_sizes=batch_sizes, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
        b_hh=b_hh, w_hr=w_hr, reverse=reverse)
    assert output.shape == (rows, width) and h_n.shape == (batch, width)
    torch.testing.assert_close(output, ref_out)
    torch.testing.assert_close(h_n, ref_h)
    if kind == "lstm":
        torch.testing.assert_close(c_n, ref_c)
    else:
        assert c_n is None
    # saved activations: O(N) rows only
    assert all(t.shape[0] == rows for t in saved)
    with pytest.raises(TypeError):
        _lean.recurrence_forward(kind, gates_x, batch_sizes)  # positional: refused


# ---------------------------------------------------------------------------------------------
# dropout, backend selection, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_reference_backend_second_derivatives_match_torch(mode):
    # the documented route for double backward (the lean/native backward is once-differentiable)
    module, packed, hx, weights = packed_case(mode, 1, True, batch=3)
    hx = tuple(h[:, :3] for h in hx) if isinstance(hx, tuple) else hx[:, :3]
    data, hx, weights, _ = leaves(packed.data, hx, weights)

    def second(out, params):
        (g,) = torch.autograd.grad(out.pow(2).sum(), data, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), [data, *params])

    out, _ = call(mode, data, packed.batch_sizes, hx, weights, bidirectional=True, backend="reference")
    with torch.no_grad():
        for p, w in zip(module._flat_weights, weights):
            p.copy_(w)
    out_ref, _ = module(tnn_rnn.PackedSequence(data, packed.batch_sizes), hx)
    for a, b in zip(second(out, weights), second(out_ref.data, module._flat_weights), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_dropout_only_in_training_and_seeded():
    _, packed, hx, weights = packed_case("lstm", 3, True)
    kwargs = dict(num_layers=3, bidirectional=True, dropout=0.5)
    out_eval, _ = call("lstm", packed.data, packed.batch_sizes, hx, weights, training=False, **kwargs)
    out_plain, _ = call("lstm", packed.data, packed.batch_sizes, hx, weights, training=False,
                        num_layers=3, bidirectional=True)
    assert torch.equal(out_eval, out_plain)
    torch.manual_seed(5)
    out_a, _ = call("lstm", packed.data, packed.batch_sizes, hx, weights, training=True, **kwargs)
    torch.manual_seed(5)
    out_b, _ = call("lstm", packed.data, packed.batch_sizes, hx, weights, training=True, **kwargs)
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_eval)


def test_get_backend_names():
    assert functional._get_backend("python") is _lean
    assert functional._get_backend("reference") == "reference"
    assert functional._get_backend(None) is not None
    with pytest.raises(ValueError, match=r"backend: expected None or one of .*, got 'fast'"):
        functional._get_backend("fast")


def test_functional_errors():
    _, packed, hx, weights = packed_case("lstm", 1, False)
    with pytest.raises(ValueError, match=r"data: expected a 2-D tensor \(N, E\), got \(8,\)"):
        functional.lstm(packed.data[:, 0], packed.batch_sizes, hx, weights)
    with pytest.raises(ValueError, match=r"batch_sizes: expected to sum to data.shape\[0\] = 7, got 8"):
        functional.lstm(packed.data[:7], packed.batch_sizes, hx, weights)
    with pytest.raises(ValueError, match=r"batch_sizes: expected a 1-D int64 tensor, got shape \(\d+,\) dtype torch.int32"):
        functional.lstm(packed.data, packed.batch_sizes.int(), hx, weights)
    # weights: dtype/device as data, torch's shape for each slot; the data's feature size
    with pytest.raises(TypeError, match=r"weights\[1\] \(w_hh of layer 0\): expected dtype torch.float64 on cpu \(as data\), got torch.float32 on cpu"):
        functional.lstm(packed.data, packed.batch_sizes, hx, [weights[0], weights[1].float(), *weights[2:]])
    with pytest.raises(ValueError, match=r"data: expected 3 features \(as weights\[0\] \(w_ih of layer 0\)\), got shape \(8, 2\)"):
        functional.lstm(packed.data[:, :2], packed.batch_sizes, hx, weights)
    with pytest.raises(ValueError, match=r"weights\[3\] \(b_hh of layer 0\): expected shape \(16,\) for lstm with hidden size 4, got \(15,\)"):
        functional.lstm(packed.data, packed.batch_sizes, hx, [*weights[:3], weights[3][:15]])
    gru_weights = torch.nn.GRU(E, H, num_layers=2, bidirectional=True, dtype=torch.float64)._flat_weights
    bad = list(gru_weights)
    bad[12] = bad[12][:, :5]  # layer 1, reverse: w_ih takes 2 * H = 8 features
    with pytest.raises(ValueError, match=r"weights\[12\] \(w_ih of layer 1, reverse\): expected shape \(12, 8\) for gru with hidden size 4, got \(12, 5\)"):
        functional.gru(packed.data, packed.batch_sizes, None, bad, num_layers=2, bidirectional=True)
    with pytest.raises(TypeError, match=r"weights\[2\] \(b_ih of layer 0\): expected a Tensor, got list"):
        functional.gru(packed.data, packed.batch_sizes, None, [*gru_weights[:2], [0.0], *gru_weights[3:4]])
    # every backend gets valid batch_sizes (the python one used to run on, or fail obscurely)
    for backend in BACKENDS + ["reference"]:
        with pytest.raises(ValueError, match=r"batch_sizes: expected non-increasing entries, got \[1, 2\]"):
            functional.lstm(packed.data[:3], torch.tensor([1, 2]), None, weights, backend=backend)
        with pytest.raises(ValueError, match=r"batch_sizes: expected every entry >= 1, got \[3, 0\]"):
            functional.lstm(packed.data[:3], torch.tensor([3, 0]), None, weights, backend=backend)
    with pytest.raises(ValueError, match=r"weights: expected 4 or 5 tensors for num_layers=1, bidirectional=False, bias=True, got 3"):
        functional.lstm(packed.data, packed.batch_sizes, hx, weights[:3])
    with pytest.raises(ValueError, match=r"nonlinearity: expected 'tanh' or 'relu', got 'gelu'"):
        functional.rnn(packed.data, packed.batch_sizes, None, weights, nonlinearity="gelu")
    with pytest.raises(ValueError, match=r"backend: expected None or one of"):
        functional.lstm(packed.data, packed.batch_sizes, hx, weights, backend="fast")
    h0, c0 = hx
    with pytest.raises(ValueError, match=r"hx\[0\]: expected shape \(1, B, 4\) with B >= batch_sizes\[0\] = 3, got \(1, 2, 4\)"):
        functional.lstm(packed.data, packed.batch_sizes, (h0[:, :2], c0), weights)
    with pytest.raises(ValueError, match=r"hx\[1\]: expected batch size 4 \(as hx\[0\]\), got 5"):
        functional.lstm(packed.data, packed.batch_sizes, (h0, torch.zeros(1, 5, H, dtype=torch.float64)), weights)
    with pytest.raises(TypeError, match=r"hx\[1\]: expected dtype torch.float64 on cpu \(as data\), got torch.float32 on cpu"):
        functional.lstm(packed.data, packed.batch_sizes, (h0, c0.float()), weights)
    with pytest.raises(ValueError, match=r"hx: expected shape \(2, B, 4\)"):
        functional.gru(packed.data, packed.batch_sizes, torch.zeros(1, 4, H, dtype=torch.float64),
                       [w.detach() for w in torch_module("gru", 1, True)._flat_weights], bidirectional=True)


def test_public_names():
    for name in ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell", "functional"):
        assert name in packrnn.__all__ and hasattr(packrnn, name)
    assert functional.__all__ == ["rnn", "lstm", "gru"]
