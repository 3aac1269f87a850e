"""packrnn.RNN / LSTM / GRU against torch.nn with copied weights, and their padding contract.

Every numeric test compares with torch (float64 tight, float32 loose): outputs, final states,
and the gradients of the input, hx and every parameter. The backend under test is
parametrized by ``BACKENDS`` (see tests/test_functional.py): extend that list to run every
oracle test against a new backend.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import rnn as tnn_rnn

import packrnn
from test_functional import BACKENDS

E, H, P = 3, 4, 2
T = 5
LENGTHS = [5, 2, 4]  # unsorted on purpose: exercises sorted_indices / unsorted_indices
KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]
FORMS = ["packed", "padded", "padded+lengths"]
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-7), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make_pair(kind, *, num_layers=1, bidirectional=False, batch_first=False, dtype=torch.float64,
              bias=True, dropout=0.0, input_size=E, hidden_size=H):
    """(packrnn module, torch module) with the same weights (loaded torch -> packrnn)."""
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
                  bidirectional=bidirectional, dtype=dtype)
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind[4:]
        ours, theirs = packrnn.RNN, torch.nn.RNN
    elif kind.startswith("lstm"):
        kwargs["proj_size"] = P if kind == "lstm_proj" else 0
        ours, theirs = packrnn.LSTM, torch.nn.LSTM
    else:
        ours, theirs = packrnn.GRU, torch.nn.GRU
    reference = theirs(input_size, hidden_size, **kwargs)
    module = ours(input_size, hidden_size, **kwargs)
    module.load_state_dict(reference.state_dict())
    return module, reference


def make_hx(kind, num_layers, bidirectional, batch, dtype, unbatched=False):
    layers = num_layers * (2 if bidirectional else 1)
    out = P if kind == "lstm_proj" else H
    shape = (layers, out) if unbatched else (layers, batch, out)
    h0 = torch.randn(shape, dtype=dtype, requires_grad=True)
    if not kind.startswith("lstm"):
        return h0
    c_shape = (layers, H) if unbatched else (layers, batch, H)
    return (h0, torch.randn(c_shape, dtype=dtype, requires_grad=True))


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def run_form(module, form, x, hx, lengths, batch_first, ours):
    """Apply ``module`` to ``x`` in the given input form; return (padded-or-packed data, states)."""
    if form == "padded":
        out, state = module(x, hx)
        return out, as_tuple(state)
    packed = tnn_rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                          enforce_sorted=False)
    if form == "packed":
        out, state = module(packed, hx)
        return out.data, as_tuple(state)
    if ours:
        out, state = module(x, hx, lengths=lengths)
        return out, as_tuple(state)
    out, state = module(packed, hx)
    padded, _ = tnn_rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=x.shape[1 if batch_first else 0])
    return padded, as_tuple(state)


def compare(module, reference, *, form, x, hx, lengths, batch_first, dtype):
    """Forward both, backward a random weighting of every output, compare everything."""
    x_ours = x.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    hx_ours = hx_ref = None
    if hx is not None:
        hx_ours = tuple(h.detach().clone().requires_grad_() for h in as_tuple(hx))
        hx_ref = tuple(h.detach().clone().requires_grad_() for h in as_tuple(hx))
        if len(hx_ours) == 1:
            hx_ours, hx_ref = hx_ours[0], hx_ref[0]
    out, states = run_form(module, form, x_ours, hx_ours, lengths, batch_first, ours=True)
    out_ref, states_ref = run_form(reference, form, x_ref, hx_ref, lengths, batch_first,
                                   ours=False)
    tol = TOL[dtype]
    torch.testing.assert_close(out, out_ref, **tol)
    for s, s_ref in zip(states, states_ref, strict=True):
        torch.testing.assert_close(s, s_ref, **tol)

    weights = [torch.randn_like(t) for t in (out_ref, *states_ref)]
    loss = sum((w * t).sum() for w, t in zip(weights, (out, *states)))
    loss_ref = sum((w * t).sum() for w, t in zip(weights, (out_ref, *states_ref)))
    leaves = [x_ours, *(as_tuple(hx_ours) if hx is not None else ()), *module.parameters()]
    leaves_ref = [x_ref, *(as_tuple(hx_ref) if hx is not None else ()), *reference.parameters()]
    grads = torch.autograd.grad(loss, leaves)
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref)
    names = ["input"] + (["hx"] * len(as_tuple(hx)) if hx is not None else []) + [
        n for n, _ in module.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m: f"grad of {name}: {m}")


def padded_input(batch_first, dtype, lengths=LENGTHS, steps=T, features=E):
    shape = (len(lengths), steps, features) if batch_first else (steps, len(lengths), features)
    return torch.randn(shape, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the oracle matrix: kind x layers x bidirectional x batch_first x form x hx, float64 tight
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_float64(kind, num_layers, bidirectional, form, backend):
    # batch_first and with/without hx alternate over the grid (both values of each are
    # covered for every kind, form and layer count) to keep the suite fast.
    torch.manual_seed(num_layers * 7 + bidirectional)
    for batch_first, with_hx in ((False, True), (True, False)):
        module, reference = make_pair(kind, num_layers=num_layers, bidirectional=bidirectional,
                                      batch_first=batch_first)
        module.backend = backend
        x = padded_input(batch_first, torch.float64)
        hx = make_hx(kind, num_layers, bidirectional, len(LENGTHS), torch.float64) if with_hx else None
        compare(module, reference, form=form, x=x, hx=hx, lengths=LENGTHS,
                batch_first=batch_first, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_float64_batch_first_with_hx(kind, form, backend):
    # the two combinations the grid above alternates away: batch_first with hx, and neither
    torch.manual_seed(11)
    for batch_first, with_hx in ((True, True), (False, False)):
        module, reference = make_pair(kind, num_layers=2, bidirectional=True,
                                      batch_first=batch_first)
        module.backend = backend
        x = padded_input(batch_first, torch.float64)
        hx = make_hx(kind, 2, True, len(LENGTHS), torch.float64) if with_hx else None
        compare(module, reference, form=form, x=x, hx=hx, lengths=LENGTHS,
                batch_first=batch_first, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_float32(kind, form, backend):
    torch.manual_seed(3)
    module, reference = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True,
                                  dtype=torch.float32)
    module.backend = backend
    x = padded_input(True, torch.float32)
    hx = make_hx(kind, 2, True, len(LENGTHS), torch.float32)
    compare(module, reference, form=form, x=x, hx=hx, lengths=LENGTHS, batch_first=True,
            dtype=torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_without_bias_matches_torch(kind):
    torch.manual_seed(4)
    module, reference = make_pair(kind, num_layers=2, bidirectional=True, bias=False)
    assert not any("bias" in n for n, _ in module.named_parameters())
    compare(module, reference, form="packed", x=padded_input(False, torch.float64),
            hx=make_hx(kind, 2, True, len(LENGTHS), torch.float64), lengths=LENGTHS,
            batch_first=False, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_matches_torch(kind, batch_first):
    torch.manual_seed(5)
    module, reference = make_pair(kind, num_layers=2, bidirectional=True, batch_first=batch_first)
    x = torch.randn(T, E, dtype=torch.float64)
    hx = make_hx(kind, 2, True, 1, torch.float64, unbatched=True)
    out, state = module(x, hx)
    out_ref, state_ref = reference(x, hx)
    assert out.shape == out_ref.shape == (T, 2 * (P if kind == "lstm_proj" else H))
    torch.testing.assert_close(out, out_ref)
    for s, s_ref in zip(as_tuple(state), as_tuple(state_ref), strict=True):
        assert s.shape == s_ref.shape
        torch.testing.assert_close(s, s_ref)
    out, _ = module(x)
    torch.testing.assert_close(out, reference(x)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_packed_output_is_packrnn_packed_sequence_with_torch_fields(kind):
    torch.manual_seed(6)
    module, reference = make_pair(kind)
    x = padded_input(False, torch.float64)
    packed = tnn_rnn.pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    out, _ = module(packed)
    out_ref, _ = reference(packed)
    assert isinstance(out, packrnn.PackedSequence)
    for a, b in zip(out[1:], out_ref[1:]):
        assert torch.equal(a, b)
    # packrnn's own PackedSequence goes in just the same
    out2, _ = module(packrnn.pack_padded_sequence(x, LENGTHS))
    torch.testing.assert_close(out2.data, out_ref.data)


# ---------------------------------------------------------------------------------------------
# the worked example and the padding contract
# ---------------------------------------------------------------------------------------------


def test_worked_example_lstm_batch_of_two():
    """(2, 5, 2) batch, lengths [5, 2], LSTM(2, 3, batch_first=True)."""
    torch.manual_seed(0)
    module, reference = make_pair("lstm", batch_first=True, input_size=2, hidden_size=3)
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    packed = tnn_rnn.pack_padded_sequence(x, torch.tensor([5, 2]), batch_first=True)

    out, (h_n, c_n) = module(packed)
    out_ref, (h_ref, c_ref) = reference(packed)
    torch.testing.assert_close(out.data, out_ref.data)
    torch.testing.assert_close(h_n, h_ref)
    torch.testing.assert_close(c_n, c_ref)

    # padded + lengths: same numbers, zeros at padding
    padded, (h_len, c_len) = module(x, lengths=[5, 2])
    expected, _ = tnn_rnn.pad_packed_sequence(out_ref, batch_first=True)
    torch.testing.assert_close(padded, expected)
    assert torch.equal(padded[1, 2:], torch.zeros(3, 3, dtype=torch.float64))
    torch.testing.assert_close(h_len, h_ref)
    torch.testing.assert_close(c_len, c_ref)

    # padded without lengths: every step is real, exactly torch's padded result, so h_n of the
    # short sequence differs from its packed h_n exactly as torch's does
    full, (h_pad, c_pad) = module(x)
    full_ref, (h_pad_ref, c_pad_ref) = reference(x)
    torch.testing.assert_close(full, full_ref)
    torch.testing.assert_close(h_pad, h_pad_ref)
    torch.testing.assert_close(c_pad, c_pad_ref)
    torch.testing.assert_close(h_pad[:, 0], h_ref[:, 0])
    assert not torch.allclose(h_pad[:, 1], h_ref[:, 1])
    torch.testing.assert_close(h_pad[:, 1] - h_ref[:, 1], h_pad_ref[:, 1] - h_ref[:, 1])


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_zero_length_sequences_keep_initial_state(kind, bidirectional):
    torch.manual_seed(7)
    module, reference = make_pair(kind, num_layers=2, bidirectional=bidirectional, batch_first=True)
    lengths = [3, 0, 5, 0]
    x = padded_input(True, torch.float64, lengths=lengths)
    hx = make_hx(kind, 2, bidirectional, 4, torch.float64)
    out, state = module(x, hx, lengths=lengths)
    real = [0, 2]
    hx_real = tuple(h[:, real] for h in as_tuple(hx))
    out_ref, state_ref = reference(
        tnn_rnn.pack_padded_sequence(x[real], torch.tensor([3, 5]), batch_first=True,
                                     enforce_sorted=False),
        hx_real if len(hx_real) == 2 else hx_real[0])
    padded_ref, _ = tnn_rnn.pad_packed_sequence(out_ref, batch_first=True, total_length=T)
    torch.testing.assert_close(out[real], padded_ref)
    assert torch.equal(out[[1, 3]], torch.zeros_like(out[[1, 3]]))
    for s, s_ref, h in zip(as_tuple(state), as_tuple(state_ref), as_tuple(hx), strict=True):
        torch.testing.assert_close(s[:, real], s_ref)
        assert torch.equal(s[:, [1, 3]], h[:, [1, 3]])
    # the gradient reaches a zero-length sequence's hx only through its final state
    loss = sum(s.sum() for s in as_tuple(state)) + out.sum()
    grads = torch.autograd.grad(loss, as_tuple(hx))
    for g in grads:
        assert torch.equal(g[:, [1, 3]], torch.ones_like(g[:, [1, 3]]))

    # a packed batch with zero-length sequences (packrnn's packing) gives the same
    packed = packrnn.pack_padded_sequence(x, lengths, batch_first=True)
    out_p, state_p = module(packed, hx)
    torch.testing.assert_close(packrnn.pad_packed_sequence(out_p, batch_first=True, total_length=T)[0], out)
    for a, b in zip(as_tuple(state_p), as_tuple(state)):
        torch.testing.assert_close(a, b)


def test_all_sequences_empty():
    module, _ = make_pair("lstm", bidirectional=True)
    x = padded_input(False, torch.float64, lengths=[0, 0])
    hx = make_hx("lstm", 1, True, 2, torch.float64)
    out, (h_n, c_n) = module(x, hx, lengths=[0, 0])
    assert torch.equal(out, torch.zeros(T, 2, 2 * H, dtype=torch.float64))
    assert torch.equal(h_n, hx[0]) and torch.equal(c_n, hx[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_empty_batch_matches_torch(kind, backend):
    # B = 0: torch returns empty outputs and states; with or without (empty) lengths, so do we
    module, reference = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    module.backend = backend
    x = torch.randn(0, T, E, dtype=torch.float64)
    out_ref, state_ref = reference(x)
    for lengths in (None, []):
        out, state = module(x, lengths=lengths)
        assert out.shape == out_ref.shape
        assert [s.shape for s in as_tuple(state)] == [s.shape for s in as_tuple(state_ref)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [None, [0, 0]])
def test_no_time_steps_keeps_initial_state(lengths, backend):
    # T = 0 (torch refuses it): every sequence is empty, so the final state is hx
    module, _ = make_pair("lstm", num_layers=2, bidirectional=True)
    module.backend = backend
    x = torch.randn(0, 2, E, dtype=torch.float64)
    hx = make_hx("lstm", 2, True, 2, torch.float64)
    out, (h_n, c_n) = module(x, hx, lengths=lengths)
    assert out.shape == (0, 2, 2 * H)
    assert torch.equal(h_n, hx[0]) and torch.equal(c_n, hx[1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_padding_values_do_not_matter_with_lengths(kind):
    torch.manual_seed(8)
    module, _ = make_pair(kind, num_layers=2, bidirectional=True)
    x = padded_input(False, torch.float64).requires_grad_()
    out, state = module(x, lengths=LENGTHS)
    garbage = x.detach().clone()
    for b, n in enumerate(LENGTHS):
        garbage[n:, b] = 1e3
    out2, state2 = module(garbage, lengths=LENGTHS)
    torch.testing.assert_close(out, out2)
    for a, b in zip(as_tuple(state), as_tuple(state2)):
        torch.testing.assert_close(a, b)
    (grad,) = torch.autograd.grad(out.sum() + as_tuple(state)[0].sum(), x)
    for b, n in enumerate(LENGTHS):
        assert torch.equal(grad[n:, b], torch.zeros_like(grad[n:, b]))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    extra=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_property_lengths_match_torch_and_ignore_extra_padding(kind, bidirectional, batch_first,
                                                                lengths, extra, seed):
    """Any lengths (zeros included, any order): the real sequences match torch on packed input,
    and adding padding steps changes nothing but the number of zero rows."""
    torch.manual_seed(seed)
    module, reference = make_pair(kind, num_layers=2, bidirectional=bidirectional,
                                  batch_first=batch_first)
    steps = max(lengths) + extra
    x = padded_input(batch_first, torch.float64, lengths=lengths, steps=max(steps, 1))
    hx = make_hx(kind, 2, bidirectional, len(lengths), torch.float64)
    out, state = module(x, hx, lengths=lengths)
    time_dim = 1 if batch_first else 0
    real = [b for b, n in enumerate(lengths) if n > 0]
    if real:
        x_real = x[real] if batch_first else x[:, real]
        hx_real = tuple(h[:, real].contiguous() for h in as_tuple(hx))
        padded_ref, state_ref = run_form(reference, "padded+lengths", x_real,
                                         hx_real if len(hx_real) == 2 else hx_real[0],
                                         [lengths[b] for b in real], batch_first, ours=False)
        torch.testing.assert_close(out[real] if batch_first else out[:, real], padded_ref)
        for s, s_ref in zip(as_tuple(state), state_ref):
            torch.testing.assert_close(s[:, real], s_ref)
    # extra padding steps: same values, more zero rows
    x_longer = torch.cat([x, torch.randn_like(x)], time_dim)
    out_longer, state_longer = module(x_longer, hx, lengths=lengths)
    torch.testing.assert_close(out_longer.narrow(time_dim, 0, x.shape[time_dim]), out)
    assert not out_longer.narrow(time_dim, x.shape[time_dim], x.shape[time_dim]).any()
    for a, b in zip(as_tuple(state_longer), as_tuple(state)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# parameters: names, shapes, init, state_dict both ways
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_parameters_and_init_as_torch(kind):
    kwargs = dict(num_layers=2, bidirectional=True)
    if kind == "lstm_proj":
        kwargs["proj_size"] = P
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind[4:]
    ours = {"r": packrnn.RNN, "l": packrnn.LSTM, "g": packrnn.GRU}[kind[0]]
    theirs = {"r": torch.nn.RNN, "l": torch.nn.LSTM, "g": torch.nn.GRU}[kind[0]]
    torch.manual_seed(9)
    module = ours(E, H, **kwargs)
    torch.manual_seed(9)
    reference = theirs(E, H, **kwargs)
    sd, sd_ref = module.state_dict(), reference.state_dict()
    assert list(sd) == list(sd_ref)
    for name in sd:
        assert torch.equal(sd[name], sd_ref[name]), name
    assert module._flat_weights_names == reference._flat_weights_names
    assert repr(module) == repr(reference)
    # both ways
    reference.load_state_dict(module.state_dict())
    module.load_state_dict(reference.state_dict())
    assert [[p.shape for p in ws] for ws in module.all_weights] == [
        [p.shape for p in ws] for ws in reference.all_weights]


def test_module_attributes_speak_torch():
    module = packrnn.LSTM(E, H, num_layers=2, batch_first=True, dropout=0.5, proj_size=P)
    reference = torch.nn.LSTM(E, H, num_layers=2, batch_first=True, dropout=0.5, proj_size=P)
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first",
                 "dropout", "bidirectional", "proj_size"):
        assert getattr(module, attr) == getattr(reference, attr), attr
    assert packrnn.RNN(E, H, nonlinearity="relu").nonlinearity == "relu"
    module.flatten_parameters()  # accepted (no-op), as code written for cuDNN calls it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_arguments(dtype):
    module = packrnn.GRU(E, H, device="cpu", dtype=dtype)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in module.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["lstm_proj", "gru"])
def test_non_contiguous_input_and_hx_match_torch(kind, form, backend):
    torch.manual_seed(22)
    module, reference = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    module.backend = backend
    x = padded_input(False, torch.float64).transpose(0, 1)  # (B, T, E) view of a (T, B, E) buffer
    hx = tuple(h.detach().transpose(0, 1).contiguous().transpose(0, 1)  # same shape, strided
               for h in as_tuple(make_hx(kind, 2, True, len(LENGTHS), torch.float64)))
    assert not x.is_contiguous() and not hx[0].is_contiguous()
    compare(module, reference, form=form, x=x, hx=hx if len(hx) == 2 else hx[0], lengths=LENGTHS,
            batch_first=True, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_half_precision_runs_like_torch(kind, dtype):
    # torch's layers run float16/bfloat16 on CPU; ours must too (the native kernel is float32/64
    # only), close to the float32 result, forward and backward
    torch.manual_seed(21)
    module32, reference = make_pair(kind, bidirectional=True, dtype=torch.float32)
    module = type(module32)(E, H, bidirectional=True, dtype=dtype)
    module.load_state_dict(reference.state_dict())
    x = padded_input(False, torch.float32)
    x_half = x.to(dtype).requires_grad_()
    out, _ = module(x_half, lengths=LENGTHS)
    out.sum().backward()
    x32 = x.clone().requires_grad_()
    out32, _ = module32(x32, lengths=LENGTHS)
    out32.sum().backward()
    assert out.dtype == dtype and x_half.grad.dtype == dtype
    # measured over 30 seeds: <= 7.5e-3 (outputs) and 1.4e-2 (grads) in bfloat16
    torch.testing.assert_close(out.float(), out32, rtol=0, atol=2e-2)
    torch.testing.assert_close(x_half.grad.float(), x32.grad, rtol=0, atol=4e-2)


def test_module_to_float64_after_construction_matches_torch():
    # parameters are read at every forward, so .to()/.double() after construction just works
    torch.manual_seed(23)
    module = packrnn.LSTM(E, H, num_layers=2, bidirectional=True, proj_size=P).double()
    reference = torch.nn.LSTM(E, H, num_layers=2, bidirectional=True, proj_size=P).to(torch.float64)
    reference.load_state_dict(module.state_dict())
    assert all(p.dtype == torch.float64 for p in module.parameters())
    x = padded_input(False, torch.float64)
    compare(module, reference, form="padded+lengths", x=x, hx=None, lengths=LENGTHS,
            batch_first=False, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# dropout between layers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_eval_has_none_train_reproducible(kind):
    torch.manual_seed(10)
    module, reference = make_pair(kind, num_layers=3, bidirectional=True, dropout=0.5)
    x = padded_input(False, torch.float64)
    module.eval()
    reference.eval()
    out_eval, _ = module(x, lengths=LENGTHS)
    out_ref, _ = run_form(reference, "padded+lengths", x, None, LENGTHS, False, ours=False)
    torch.testing.assert_close(out_eval, out_ref)

    module.train()
    torch.manual_seed(123)
    out_a, state_a = module(x, lengths=LENGTHS)
    torch.manual_seed(123)
    out_b, state_b = module(x, lengths=LENGTHS)
    assert torch.equal(out_a, out_b)
    for a, b in zip(as_tuple(state_a), as_tuple(state_b)):
        assert torch.equal(a, b)
    assert not torch.allclose(out_a, out_eval)  # dropout did act between layers


@pytest.mark.parametrize("form", ["packed", "padded"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_dropout_train_mode_matches_torch_with_same_seed(kind, form):
    # dropout acts on the same (N, D*H_out) rows with the same RNG calls as torch's CPU kernel
    torch.manual_seed(14)
    module, reference = make_pair(kind, num_layers=3, bidirectional=True, dropout=0.5)
    x = padded_input(False, torch.float64)
    torch.manual_seed(99)
    out, state = run_form(module, form, x, None, LENGTHS, False, ours=True)
    torch.manual_seed(99)
    out_ref, state_ref = run_form(reference, form, x, None, LENGTHS, False, ours=False)
    torch.testing.assert_close(out, out_ref)
    for a, b in zip(state, state_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn_relu"])
def test_dropout_one_drops_every_inter_layer_output_as_torch(kind, form):
    """torch accepts dropout=1.0: in training every layer but the first sees zeros."""
    torch.manual_seed(15)
    module, reference = make_pair(kind, num_layers=3, bidirectional=True, dropout=1.0)
    assert module.dropout == 1.0
    module.train()
    reference.train()
    hx = make_hx(kind, 3, True, len(LENGTHS), torch.float64)
    compare(module, reference, form=form, x=padded_input(False, torch.float64), hx=hx,
            lengths=LENGTHS, batch_first=False, dtype=torch.float64)


def test_dropout_single_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        packrnn.LSTM(E, H, dropout=0.3)


# ---------------------------------------------------------------------------------------------
# saved activations are O(real steps), not O(B x T)
# ---------------------------------------------------------------------------------------------


def test_saved_activations_scale_with_real_steps():
    torch.manual_seed(12)
    batch, steps = 4, 40
    lengths = [steps, 1, 1, 1]  # N = 43 real rows out of B*T = 160
    module = packrnn.LSTM(E, H, dtype=torch.float64)
    x = torch.randn(steps, batch, E, dtype=torch.float64, requires_grad=True)
    sizes = []

    def pack_hook(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out, _ = module(x, lengths=lengths)
    rows = sum(lengths)
    params = sum(p.numel() for p in module.parameters())
    # input rows, output, gates (4H) and c (H) per real row, plus states, weights and indices
    budget = rows * (E + 6 * H) + params + 10 * batch * H + 4 * (batch * steps)
    assert sum(sizes) <= budget
    assert sum(sizes) < batch * steps * 5 * H  # what a padded implementation would save


# ---------------------------------------------------------------------------------------------
# bad input: every error says what was expected
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_size=0), ValueError, r"input_size: expected an int >= 1, got 0"),
    (dict(hidden_size=-1), ValueError, r"hidden_size: expected an int >= 1, got -1"),
    (dict(num_layers=0), ValueError, r"num_layers: expected an int >= 1, got 0"),
    (dict(input_size=2.5), TypeError, r"input_size: expected an int, got 2.5"),
    (dict(hidden_size=True), TypeError, r"hidden_size: expected an int, got True"),
    (dict(dropout=1.5), ValueError, r"dropout: expected a float in \[0, 1\], got 1.5"),
    (dict(dropout=-0.1), ValueError, r"dropout: expected a float in \[0, 1\], got -0.1"),
    (dict(dropout="0.1"), TypeError, r"dropout: expected a float in \[0, 1\], got '0.1'"),
    (dict(proj_size=H), ValueError, r"proj_size: expected 0 <= proj_size < hidden_size = 4, got 4"),
    (dict(proj_size=-1), ValueError, r"proj_size: expected an int >= 0, got -1"),
    (dict(bias=1), TypeError, r"bias: expected a bool, got 1"),
    (dict(batch_first="yes"), TypeError, r"batch_first: expected a bool, got 'yes'"),
    (dict(bidirectional=None), TypeError, r"bidirectional: expected a bool, got None"),
])
def test_constructor_errors(kwargs, error, match):
    args = dict(input_size=E, hidden_size=H)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        packrnn.LSTM(**args)


def test_constructor_errors_specific_to_kind():
    with pytest.raises(ValueError, match=r"proj_size: expected 0 \(projections are LSTM-only\), got 2"):
        packrnn.rnn._RNNBase("GRU", E, H, proj_size=2)
    # torch raises ValueError for any proj_size keyword on RNN/GRU (even 0); so do we
    only_lstm = r"proj_size: expected no proj_size argument \(it is only supported for LSTM, not RNN or GRU"
    for cls, value in [(packrnn.GRU, 2), (packrnn.GRU, 0), (packrnn.RNN, 2), (packrnn.RNN, 0)]:
        with pytest.raises(ValueError, match=r"only supported for LSTM, not RNN or GRU"):
            getattr(torch.nn, cls.__name__)(E, H, proj_size=value)
        with pytest.raises(ValueError, match=only_lstm + rf".*got {value}"):
            cls(E, H, proj_size=value)
    with pytest.raises(ValueError, match=r"nonlinearity: expected 'tanh' or 'relu', got 'gelu'"):
        packrnn.RNN(E, H, nonlinearity="gelu")


def _lstm_inputs(batch=3, dtype=torch.float64):
    module = packrnn.LSTM(E, H, num_layers=2, dtype=torch.float64)
    x = torch.randn(T, batch, E, dtype=dtype)
    return module, x


@pytest.mark.parametrize("case, error, match", [
    ("features", ValueError, r"input: expected 3 features \(input_size\) in the last dimension, got shape \(5, 3, 4\)"),
    ("dims", ValueError, r"input: expected a 3-D \(batched\) or 2-D \(unbatched\) tensor, got shape \(5,\)"),
    ("not_tensor", TypeError, r"input: expected a Tensor or a PackedSequence, got list"),
    ("input_dtype", TypeError, r"input: expected dtype torch.float64 \(the module's parameters\), got torch.float32"),
    ("hx_shape", ValueError, r"hx\[0\]: expected shape \(2, 3, 4\), got \(2, 2, 4\)"),
    ("hx_layers", ValueError, r"hx\[1\]: expected shape \(2, 3, 4\), got \(1, 3, 4\)"),
    ("hx_dtype", TypeError, r"hx\[0\]: expected dtype torch.float64 \(as the input\), got torch.float32"),
    ("hx_device", ValueError, r"hx\[0\]: expected device cpu \(as the input\), got meta"),
    ("hx_not_tuple", TypeError, r"hx: expected a tuple \(h_0, c_0\) of two tensors, got Tensor"),
    ("lengths_packed", ValueError, r"lengths: expected None for a PackedSequence input"),
    ("lengths_count", ValueError, r"lengths: expected 3 lengths \(one per sequence in the batch\), got 2"),
    ("lengths_too_long", ValueError, r"lengths: expected every length <= 5"),
    ("lengths_unbatched", ValueError, r"lengths: expected None for an unbatched 2-D input"),
    ("packed_features", ValueError, r"input.data: expected 3 features"),
])
def test_forward_errors(case, error, match):
    module, x = _lstm_inputs()
    h = torch.zeros(2, 3, H, dtype=torch.float64)
    call = lambda: module(x)  # noqa: E731
    if case == "features":
        call = lambda: module(torch.randn(T, 3, E + 1, dtype=torch.float64))  # noqa: E731
    elif case == "dims":
        call = lambda: module(torch.randn(T, dtype=torch.float64))  # noqa: E731
    elif case == "not_tensor":
        call = lambda: module([[1.0]])  # noqa: E731
    elif case == "input_dtype":
        call = lambda: module(x.float())  # noqa: E731
    elif case == "hx_shape":
        call = lambda: module(x, (torch.zeros(2, 2, H, dtype=torch.float64), h))  # noqa: E731
    elif case == "hx_layers":
        call = lambda: module(x, (h, torch.zeros(1, 3, H, dtype=torch.float64)))  # noqa: E731
    elif case == "hx_dtype":
        call = lambda: module(x, (h.float(), h))  # noqa: E731
    elif case == "hx_device":
        call = lambda: module(x, (h.to("meta"), h))  # noqa: E731
    elif case == "hx_not_tuple":
        call = lambda: module(x, h)  # noqa: E731
    elif case == "lengths_packed":
        packed = packrnn.pack_padded_sequence(x, [5, 4, 3])
        call = lambda: module(packed, lengths=[5, 4, 3])  # noqa: E731
    elif case == "lengths_count":
        call = lambda: module(x, lengths=[5, 4])  # noqa: E731
    elif case == "lengths_too_long":
        call = lambda: module(x, lengths=[6, 4, 3])  # noqa: E731
    elif case == "lengths_unbatched":
        call = lambda: module(x[:, 0], lengths=[5])  # noqa: E731
    elif case == "packed_features":
        packed = packrnn.pack_padded_sequence(torch.randn(T, 3, E + 1, dtype=torch.float64), [5, 4, 3])
        call = lambda: module(packed)  # noqa: E731
    with pytest.raises(error, match=match):
        call()


def test_gru_hx_errors():
    module = packrnn.GRU(E, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, 3, E, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"hx: expected shape \(2, 3, 4\), got \(2, 4, 4\)"):
        module(x, torch.zeros(2, 4, H, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"hx: expected a Tensor, got tuple"):
        module(x, (torch.zeros(2, 3, H, dtype=torch.float64),))
    with pytest.raises(ValueError, match=r"hx: expected shape \(2, 4\), got \(2, 3, 4\)"):
        module(x[:, 0], torch.zeros(2, 3, H, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# CUDA: delegated to torch's cuDNN with the same parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", FORMS)
def test_cuda_matches_cpu(kind, form):
    torch.manual_seed(13)
    module, _ = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    cuda_module, _ = make_pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    cuda_module.load_state_dict(module.state_dict())
    cuda_module.cuda()
    lengths = [5, 0, 2, 4] if form == "padded+lengths" else LENGTHS
    x = padded_input(True, torch.float64, lengths=lengths)
    hx = make_hx(kind, 2, True, len(lengths), torch.float64)
    out, state = run_form(module, form, x, hx, lengths, True, ours=True)
    hx_cuda = tuple(h.detach().cuda() for h in as_tuple(hx))
    out_cuda, state_cuda = run_form(cuda_module, form, x.cuda(), hx_cuda if len(hx_cuda) == 2 else hx_cuda[0],
                                    lengths, True, ours=True)
    torch.testing.assert_close(out_cuda.cpu(), out)
    for a, b in zip(state_cuda, state):
        torch.testing.assert_close(a.cpu(), b)

