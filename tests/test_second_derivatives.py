"""Second derivatives through packrnn layers (NOTE [Second derivatives] in packrnn/_ops.py).

With the default backend, ``create_graph=True`` gives gradients that carry a graph, so
gradient penalties and ``gradgradcheck`` are exact; torch.nn on copied weights is the oracle.
The python backend's hand-written backward is once-differentiable: it must refuse loudly.
"""

from __future__ import annotations

import pytest
import torch

import packrnn

pytestmark = pytest.mark.skipif(packrnn.backend_name() != "native",
                                reason="the default backend here is the python one")

E, H = 3, 2
KINDS = {
    "rnn_tanh": lambda **kw: (packrnn.RNN(E, H, **kw), torch.nn.RNN(E, H, **kw)),
    "rnn_relu": lambda **kw: (packrnn.RNN(E, H, nonlinearity="relu", **kw),
                              torch.nn.RNN(E, H, nonlinearity="relu", **kw)),
    "lstm": lambda **kw: (packrnn.LSTM(E, H, **kw), torch.nn.LSTM(E, H, **kw)),
    "lstm_proj": lambda **kw: (packrnn.LSTM(E, 3, proj_size=H, **kw),
                               torch.nn.LSTM(E, 3, proj_size=H, **kw)),
    "gru": lambda **kw: (packrnn.GRU(E, H, **kw), torch.nn.GRU(E, H, **kw)),
}


def _pair(kind: str, **kwargs):
    ours, theirs = KINDS[kind](dtype=torch.float64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("kind,bidirectional", [(k, False) for k in sorted(KINDS)]
                         + [("lstm_proj", True), ("gru", True), ("rnn_relu", True)])
def test_gradgradcheck_padded_with_lengths(kind, bidirectional):
    torch.manual_seed(0)
    module, _ = _pair(kind, bidirectional=bidirectional, batch_first=True)
    x = torch.randn(3, 4, E, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 2])
    params = list(module.parameters())

    names = [n for n, _ in module.named_parameters()]

    def fn(x, *weights):
        out = torch.func.functional_call(module, dict(zip(names, weights)), (x,),
                                         {"lengths": lengths})
        states = out[1] if isinstance(out[1], tuple) else (out[1],)
        return (out[0], *states)

    weights = [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradgradcheck(fn, (x, *weights), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_gradgradcheck_packed(kind):
    torch.manual_seed(1)
    module, _ = _pair(kind, num_layers=2)
    seqs = [torch.randn(n, E, dtype=torch.float64) for n in (3, 1, 2)]
    data = packrnn.pack_sequence(seqs, enforce_sorted=False)

    def fn(values):
        packed = packrnn.PackedSequence(values, data.batch_sizes, data.sorted_indices,
                                        data.unsorted_indices)
        out = module(packed)
        h = out[1][0] if isinstance(out[1], tuple) else out[1]
        return out[0].data, h

    assert torch.autograd.gradgradcheck(fn, (data.data.clone().requires_grad_(True),))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradient_penalty_matches_torch(kind):
    """A loss mixing a gradient penalty with other terms: every weight gradient equals
    torch.nn's (this gave wrong weight_hh gradients before the operators were registered)."""
    torch.manual_seed(2)
    ours, theirs = _pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    x0 = torch.randn(3, 5, E, dtype=torch.float64)
    lengths = [5, 5, 5]  # torch has no lengths: compare on full sequences

    def loss_and_grads(module, **kw):
        x = x0.clone().requires_grad_(True)
        out, _ = module(x, **kw)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        loss = out.sum() + grad_x.square().sum()
        return torch.autograd.grad(loss, list(module.parameters()))

    want = loss_and_grads(theirs)
    got = loss_and_grads(ours, lengths=lengths)
    for (name, _), g, w in zip(ours.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=name)


def test_gradient_penalty_with_lengths_matches_reference_backend():
    torch.manual_seed(3)
    module = packrnn.LSTM(E, H, num_layers=2, bidirectional=True, batch_first=True,
                          dtype=torch.float64)
    x0 = torch.randn(3, 5, E, dtype=torch.float64)
    lengths = [5, 2, 3]

    def grads(backend):
        module.backend = backend
        x = x0.clone().requires_grad_(True)
        out, (h, c) = module(x, lengths=lengths)
        (grad_x,) = torch.autograd.grad(h.sum() + out.square().sum(), x, create_graph=True)
        return torch.autograd.grad(c.sum() + grad_x.square().sum(), list(module.parameters()))

    for g, w in zip(grads(None), grads("reference")):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_python_backend_refuses_second_derivatives():
    module = packrnn.LSTM(E, H, dtype=torch.float64)
    module.backend = "python"
    x = torch.randn(4, 2, E, dtype=torch.float64, requires_grad=True)
    out, _ = module(x)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        grad_x.sum().backward()
