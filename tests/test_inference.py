"""Inference and small-batch paths (issue 13), each against torch as the oracle.

* the native ``stack_forward`` operator (all layers and directions in one call, no autograd)
  against torch.nn and against the per-layer path, packed and padded layouts;
* the steps with one active row (the hand-written matrix-vector loops, NOTE [Small GEMMs]) and
  the BLAS steps on transposed weights, forward and backward, at sizes that are no multiple of
  the vector width;
* the modules' inference lane (NOTE [Inference lane]) and the classifier's one-sequence path;
* the classifier's fused inference operator (NOTE [fused inference]);
* the kernel's threads setting (``packrnn.set_kernel_threads``, ``PACKRNN_NUM_THREADS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import rnn as tnn_rnn

import packrnn
from packrnn import backend, functional
from packrnn.models import ModelConfig, SequenceClassifier

_NATIVE_ERROR = None if os.environ.get(backend.ENV_VAR) == "python" else backend.native_error()
native_only = pytest.mark.skipif(
    os.environ.get(backend.ENV_VAR) == "python" or _NATIVE_ERROR is not None,
    reason=f"native backend not available: {_NATIVE_ERROR or 'PACKRNN_BACKEND=python'}",
)

KINDS = ["rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru"]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])


def layer_pair(kind: str, dtype, **kwargs):
    """(torch.nn layer, packrnn layer) with the same weights."""
    cls = {"rnn": (torch.nn.RNN, packrnn.RNN), "lstm": (torch.nn.LSTM, packrnn.LSTM),
           "gru": (torch.nn.GRU, packrnn.GRU)}[kind.split("_")[0]]
    if kind.startswith("rnn"):
        kwargs["nonlinearity"] = kind[4:]
    if kind == "lstm_proj":
        kwargs["proj_size"] = 3
    torch.manual_seed(0)
    reference = cls[0](dtype=dtype, **kwargs)
    ours = cls[1](dtype=dtype, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def states(state) -> tuple:
    return state if isinstance(state, tuple) else (state,)


def assert_same(got, want, dtype):
    torch.testing.assert_close(got, want, **TOL[dtype])


# --------------------------------------------------------------------------------------------
# The stacked operator.

@native_only
@DTYPES
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)], ids=["1uni", "2bi"])
@pytest.mark.parametrize("kind", KINDS)
def test_stack_forward_matches_torch_and_the_layer_path(kind, layers, bidirectional, dtype):
    from packrnn import _native

    reference, ours = layer_pair(kind, dtype, input_size=5, hidden_size=11, num_layers=layers,
                                 bidirectional=bidirectional)
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 7, 4, 1, 1])
    x = torch.randn(7, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    packed = tnn_rnn.pack_padded_sequence(x, lengths)  # sorted already
    with torch.no_grad():
        want_out, want_state = reference(packed)
        weights = [w.detach() for w in ours._flat_weights]
        mode = ours.mode.lower()
        common = dict(mode=mode, batch_sizes=packed.batch_sizes, x=packed.data, weights=weights,
                      num_layers=layers, bidirectional=bidirectional, bias=True)
        out, h_n, c_n = _native.stack_forward(**common, h0=None, c0=None, padded=False)
        # the per-layer path (what functional runs with gradients), same weights
        layer_out, layer_h, layer_c = functional._run(
            mode=mode, data=packed.data, batch_sizes=packed.batch_sizes, h0=None, c0=None,
            weights=[w.clone().requires_grad_() for w in weights], bias=True,
            num_layers=layers, dropout=0.0, training=False, bidirectional=bidirectional,
            backend="native")
    assert_same(out, want_out.data, dtype)
    for got, want in zip((h_n, c_n), states(want_state)):
        assert_same(got, want, dtype)
    torch.testing.assert_close(out, layer_out.detach(), rtol=0, atol=0)  # same kernels
    torch.testing.assert_close(h_n, layer_h.detach(), rtol=0, atol=0)


@native_only
@DTYPES
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_stack_forward_padded_layout_and_given_states(kind, dtype):
    """Padded layout (off_t = t*B, a zero-length sequence included) with explicit h0/c0: the
    real rows equal torch's packed result, padding rows are zero."""
    from packrnn import _native

    reference, ours = layer_pair(kind, dtype, input_size=4, hidden_size=9, num_layers=2,
                                 bidirectional=True)
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([5, 3, 3, 0])
    steps, batch = 5, 4
    x = torch.randn(steps, batch, 4, generator=g, dtype=torch.float64).to(dtype)
    h0 = torch.randn(4, batch, 9, generator=g, dtype=torch.float64).to(dtype)
    c0 = torch.randn(4, batch, 9, generator=g, dtype=torch.float64).to(dtype)
    batch_sizes = (lengths.unsqueeze(0) > torch.arange(steps).unsqueeze(1)).sum(1)
    with torch.no_grad():
        out, h_n, c_n = _native.stack_forward(
            mode=kind, batch_sizes=batch_sizes, x=x.reshape(steps * batch, 4),
            weights=[w.detach() for w in ours._flat_weights], h0=h0,
            c0=c0 if kind == "lstm" else None, num_layers=2, bidirectional=True, bias=True,
            padded=True)
        real = 3  # the zero-length sequence is torch's problem: compare the others
        packed = tnn_rnn.pack_padded_sequence(x[:, :real], lengths[:real])
        hx = (h0[:, :real], c0[:, :real]) if kind == "lstm" else h0[:, :real]
        want_out, want_state = reference(packed, hx)
    padded_out, _ = tnn_rnn.pad_packed_sequence(want_out, total_length=steps)
    out = out.view(steps, batch, -1)
    assert_same(out[:, :real], padded_out, dtype)
    assert out[:, real:].eq(0).all() and out[3:, 1:].eq(0).all()  # padding rows
    for got, want, init in zip((h_n, c_n), states(want_state), (h0, c0)):
        assert_same(got[:, :real], want, dtype)
        assert torch.equal(got[:, real:], init[:, real:])  # length 0 keeps its initial state


@native_only
def test_stack_forward_errors():
    from packrnn import _native

    _, ours = layer_pair("lstm", torch.float32, input_size=3, hidden_size=4)
    weights = [w.detach() for w in ours._flat_weights]
    x, batch_sizes = torch.randn(2, 3), torch.tensor([1, 1])
    common = dict(mode="lstm", batch_sizes=batch_sizes, x=x, h0=None, c0=None, num_layers=1,
                  bidirectional=False, bias=True, padded=False)
    with pytest.raises(ValueError, match=r"weights\[3\] \(b_hh of layer 0\): expected shape "
                                         r"\(16,\), got \[15\]"):
        _native.stack_forward(weights=weights[:3] + [weights[3][:15]], **common)
    with pytest.raises(ValueError, match=r"weights: expected 4 or 5 tensors for num_layers=1, "
                                         r"bidirectional=0, bias=1, got 3"):
        _native.stack_forward(weights=weights[:3], **common)
    with pytest.raises(ValueError, match=r"expected a \(G\*H, 3\) tensor"):
        _native.stack_forward(weights=[weights[0][:, :2]] + weights[1:], **common)


# --------------------------------------------------------------------------------------------
# One active row per step (small-GEMM loops) and several (BLAS on transposed weights).

@native_only
@DTYPES
@pytest.mark.parametrize("batch", [1, 3], ids=["B=1", "B=3"])
@pytest.mark.parametrize("kind", KINDS)
def test_training_on_few_rows_matches_torch(kind, batch, dtype):
    """Forward and every gradient; H = 37 and E = 13 are no multiple of any vector width (the
    loops' masked tails), B = 1 runs the matrix-vector loops in both passes (forward: the NN form
    on the transposed weights, H_out <= 64), B = 3 BLAS on the transposed weights (more than 4
    steps of more than one row)."""
    reference, ours = layer_pair(kind, dtype, input_size=13, hidden_size=37, num_layers=2,
                                 bidirectional=True, batch_first=True)
    ours.backend = "native"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 9, 13, generator=g, dtype=torch.float64).to(dtype)
    results = []
    for module in (reference, ours):
        inp = x.clone().requires_grad_()
        out, state = module(inp)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum() \
            + sum(s.square().sum() for s in states(state))
        results.append((out, states(state),
                        torch.autograd.grad(loss, [inp, *module.parameters()])))
    (want_out, want_states, want_grads), (out, got_states, grads) = results
    assert_same(out, want_out, dtype)
    for got, want in zip(got_states, want_states):
        assert_same(got, want, dtype)
    for got, want in zip(grads, want_grads):
        assert_same(got, want, dtype)


# --------------------------------------------------------------------------------------------
# The modules' inference lane and the reference backend.

@DTYPES
@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
@pytest.mark.parametrize("kind", KINDS)
def test_inference_lane_matches_torch_and_the_reference(kind, batch_first, dtype):
    reference, ours = layer_pair(kind, dtype, input_size=6, hidden_size=10, num_layers=2,
                                 bidirectional=True, batch_first=batch_first)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 7, 6, generator=g, dtype=torch.float64).to(dtype)  # (B or T, ..., E)
    with torch.no_grad():
        want_out, want_state = reference(x)
        out, state = ours(x)  # the lane (native), else the selected backend
        ours.backend = "reference"
        ref_out, ref_state = ours(x)
    for got in (out, ref_out):
        assert_same(got, want_out, dtype)
    for got, ref, want in zip(states(state), states(ref_state), states(want_state)):
        assert_same(got, want, dtype)
        assert_same(ref, want, dtype)


@DTYPES
@pytest.mark.parametrize("lengths", [[7, 3, 7, 1, 4], [7, 0, 3, 0], [5, 5]],
                         ids=["unsorted", "zero-length", "sorted"])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_inference_lane_matches_torch_and_the_gradient_path(kind, lengths, dtype,
                                                                   monkeypatch):
    """A PackedSequence without hx under no_grad runs the stacked operator (NOTE [Inference
    lane]): torch's numbers, states in the original order, zero-length sequences keep zeros."""
    reference, ours = layer_pair(kind, dtype, input_size=6, hidden_size=10, num_layers=2,
                                 bidirectional=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, len(lengths), 6, generator=g, dtype=torch.float64).to(dtype)
    packed = packrnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    lane_results = []
    lane = functional._infer_packed
    monkeypatch.setattr(functional, "_infer_packed",
                        lambda **kw: lane_results.append(lane(**kw)) or lane_results[-1])
    with torch.no_grad():
        out, state = ours(packed)  # the lane (native), else the selected backend
    assert len(lane_results) == 1
    if _NATIVE_ERROR is None and os.environ.get(backend.ENV_VAR) != "python":
        assert lane_results[0] is not None  # the stacked operator ran
    grad_out, grad_state = ours(packed)  # the gradient path: layer by layer
    assert isinstance(out, packrnn.PackedSequence)
    torch.testing.assert_close(out.data, grad_out.data.detach(), rtol=0, atol=0)
    for got, want in zip(states(state), states(grad_state)):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=0)
    real = [n for n in lengths if n > 0]
    if len(real) == len(lengths):  # torch packs no zero-length sequence
        with torch.no_grad():
            want_out, want_state = reference(tnn_rnn.pack_padded_sequence(
                x, lengths, enforce_sorted=False))
        assert_same(out.data, want_out.data, dtype)
        for got, want in zip(states(state), states(want_state)):
            assert_same(got, want, dtype)
    else:
        empty = torch.tensor(lengths) == 0
        for got in states(state):
            assert got.shape[1] == len(lengths) and bool(got[:, empty].eq(0).all())
    padded, _ = packrnn.pad_packed_sequence(out)  # the output is a valid PackedSequence
    assert padded.shape == (max(lengths), len(lengths), 20 if kind != "lstm_proj" else 6)


@native_only
def test_inference_lane_keeps_dropout_between_layers_in_training_mode():
    """No gradients but training mode with dropout: the lane steps aside, the masks are drawn as
    on the gradient path (same seed, same numbers)."""
    ours = packrnn.LSTM(3, 5, num_layers=2, dropout=0.5).train()
    x = torch.randn(6, 2, 3)
    torch.manual_seed(7)
    with torch.no_grad():
        no_grad_out, _ = ours(x)
    torch.manual_seed(7)
    grad_out, _ = ours(x)
    torch.testing.assert_close(no_grad_out, grad_out.detach(), rtol=0, atol=0)
    ours.eval()
    with torch.no_grad():
        eval_out, _ = ours(x)
    assert not torch.allclose(eval_out, no_grad_out)  # dropout did act in training mode


@native_only
def test_inference_lane_checks_the_module_weights():
    ours = packrnn.GRU(3, 4)
    with torch.no_grad():
        ours.bias_hh_l0 = torch.nn.Parameter(torch.zeros(5))
        with pytest.raises(ValueError, match=r"b_hh of layer 0\): expected shape \(12,"):
            ours(torch.randn(2, 1, 3))


# --------------------------------------------------------------------------------------------
# The classifier's one-sequence path.

@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_one_sequence_matches_the_packed_execution(pooling, bidirectional):
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=50, num_classes=3, embed_dim=6,
                                           hidden_size=5, num_layers=2, embed_dropout=0.3,
                                           bidirectional=bidirectional, pooling=pooling))
    ids = torch.tensor([[4, 9, 2, 7, 0, 0]])
    lengths = torch.tensor([4])
    packed = packrnn.pack_padded_sequence(ids, lengths, batch_first=True)
    for train in (False, True):  # training: the same embedding-dropout mask for the seed
        model.train(train)
        torch.manual_seed(1)
        one = model(ids, lengths)  # (1, C), no packing
        torch.manual_seed(1)
        want = model(packed)
        torch.testing.assert_close(one, want, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids[:, :4], None), model(packed), rtol=0, atol=0)
    zero = model(ids, torch.tensor([0]))  # a length-0 text gets the initial state's logits
    assert torch.isfinite(zero).all() and zero.shape == (1, 3)


def test_one_sequence_errors():
    model = SequenceClassifier(ModelConfig(vocab_size=10, num_classes=2))
    with pytest.raises(ValueError, match=r"lengths: expected every length <= 3 \(the padded "
                                         r"time dimension\), got 4 at index 0"):
        model(torch.tensor([[1, 2, 3]]), [4])
    with pytest.raises(RuntimeError, match=r"lengths: expected non-negative lengths, got -1"):
        model(torch.tensor([[1, 2, 3]]), [-1])  # InputError: a RuntimeError too, as torch's
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 10\) \(vocab_size\), "
                                         r"got 12 at \(0, 1\)"):
        model(torch.tensor([[1, 12, 3, 99]]), [3])  # 99 is padding: not checked


# --------------------------------------------------------------------------------------------
# The classifier's fused inference (NOTE [fused inference] in models.py).

def fused_spy(monkeypatch) -> list:
    """Records each call of the fused operator's wrapper (the call still runs)."""
    from packrnn import _native

    calls = []
    fused = _native.classifier_infer
    monkeypatch.setattr(_native, "classifier_infer",
                        lambda **kw: calls.append(kw["ids"].shape) or fused(**kw))
    return calls


def module_path(model, ids, lengths):
    """The classifier's own (unfused) forward under no_grad."""
    fused = SequenceClassifier._fused_inference
    SequenceClassifier._fused_inference = lambda self, ids, lengths: None
    try:
        with torch.no_grad():
            return model(ids, lengths)
    finally:
        SequenceClassifier._fused_inference = fused


BATCHES = {  # (ids T, lengths)
    "one-full": (6, [6]), "one-padded": (6, [4]), "one-empty": (3, [0]),
    "unsorted": (7, [3, 7, 7, 1, 5]), "zero-length": (5, [0, 4, 2, 4, 0]), "all-empty": (4, [0, 0]),
}


@native_only
@DTYPES
@pytest.mark.parametrize("cell,layers,bidirectional",
                         [("lstm", 1, False), ("lstm", 2, True), ("gru", 2, False),
                          ("rnn", 1, True)], ids=["lstm1uni", "lstm2bi", "gru2uni", "rnn1bi"])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_fused_inference_is_the_module_path_bit_for_bit(cell, layers, bidirectional, pooling,
                                                         dtype, monkeypatch):
    """One operator call gives the module path's logits exactly (same aten calls) for every
    batch shape, and the module path's are torch's (float64 tight, float32 loose)."""
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(
        vocab_size=40, num_classes=3, embed_dim=6, hidden_size=7, cell=cell, num_layers=layers,
        bidirectional=bidirectional, pooling=pooling, dropout=0.3, embed_dropout=0.2,
    )).to(dtype).eval()
    calls = fused_spy(monkeypatch)
    g = torch.Generator().manual_seed(1)
    for name, (steps, lengths) in BATCHES.items():
        ids = torch.randint(0, 40, (len(lengths), steps), generator=g)
        with torch.no_grad():
            got = model(ids, torch.tensor(lengths))
        want = module_path(model, ids, torch.tensor(lengths))
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        assert got.shape == (len(lengths), 3) and got.dtype == dtype
    assert len(calls) == len(BATCHES)  # every call was the fused one
    if pooling == "last" and cell == "lstm":  # the module path against torch.nn
        torch_lstm = torch.nn.LSTM(6, 7, layers, bidirectional=bidirectional, batch_first=True,
                                   dtype=dtype)
        torch_lstm.load_state_dict(model.rnn.state_dict())
        ids = torch.randint(1, 40, (3, 5), generator=g)
        lengths = torch.tensor([5, 2, 4])
        with torch.no_grad():
            _, (h_n, _) = torch_lstm(tnn_rnn.pack_padded_sequence(
                model.embedding(ids), lengths, batch_first=True, enforce_sorted=False))
            features = h_n[-1] if not bidirectional else torch.cat([h_n[-2], h_n[-1]], -1)
            assert_same(model(ids, lengths), model.fc(features), dtype)


@native_only
def test_fused_inference_takes_lengths_as_torch_does(monkeypatch):
    """Lengths as a list, int32 ids, no lengths (all T steps): the fused call, same logits."""
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=30, num_classes=2)).eval()
    calls = fused_spy(monkeypatch)
    ids = torch.tensor([[3, 4, 5, 0], [6, 7, 8, 9]])
    with torch.no_grad():
        a = model(ids, [3, 4])
        b = model(ids.int(), torch.tensor([3, 4], dtype=torch.int32))
        c = model(ids[1:])
    assert len(calls) == 3
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, a[1:])  # a batch of one: other GEMM shapes, last bits


@native_only
def test_fused_inference_steps_aside(monkeypatch):
    """Training mode, gradients on, the padded execution, mean_padded pooling and forward hooks
    on a part (which the fused call would skip) all run the module path."""
    torch.manual_seed(0)
    ids, lengths = torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([3, 2])
    model = SequenceClassifier(ModelConfig(vocab_size=30, num_classes=2))
    padded = SequenceClassifier(ModelConfig(vocab_size=30, num_classes=2, execution="padded",
                                            pooling="mean_padded")).eval()
    calls = fused_spy(monkeypatch)
    with torch.no_grad():
        model.train()(ids, lengths)
        padded(ids, lengths)
    model.eval()(ids, lengths)  # gradients on
    seen = []
    handle = model.rnn.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        hooked = model(ids, lengths)
    handle.remove()
    assert calls == [] and len(seen) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(ids, lengths), hooked, rtol=0, atol=0)
    assert len(calls) == 1


@native_only
def test_fused_inference_bad_input_gets_the_module_errors():
    model = SequenceClassifier(ModelConfig(vocab_size=10, num_classes=2)).eval()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"lengths: expected every length <= 3 \(the "
                                             r"padded time dimension\), got 4 at index 1"):
            model(torch.tensor([[1, 2, 3], [1, 2, 3]]), [2, 4])
        with pytest.raises(RuntimeError, match=r"lengths: expected non-negative lengths"):
            model(torch.tensor([[1, 2, 3]]), [-1])
        with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 10\) "
                                             r"\(vocab_size\), got 12 at \(1, 1\)"):
            model(torch.tensor([[1, 2, 3, 0], [1, 12, 3, 99]]), [4, 3])  # 99: padding
        with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
            model(torch.tensor([[1, 2], [3, 4]]), [2])
        with pytest.raises(ValueError, match=r"ids: expected a \(B, T\) tensor"):
            model(torch.tensor([1, 2, 3]))


@native_only
def test_classifier_infer_operator_refuses_gradients():
    from packrnn import _native

    model = SequenceClassifier(ModelConfig(vocab_size=10, num_classes=2))
    with pytest.raises(RuntimeError, match=r"classifier_infer: inference only"):
        _native.classifier_infer(
            mode="lstm", ids=torch.tensor([[1, 2]]), lengths=torch.tensor([2]),
            embedding=model.embedding.weight, weights=model.rnn._flat_weights,
            fc_weight=model.fc.weight, fc_bias=model.fc.bias, num_layers=1,
            bidirectional=False, bias=True, pooling="last")


# --------------------------------------------------------------------------------------------
# Packing ids in one operator (NOTE [packing ids] in models.py).

@native_only
@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12),
       extra=st.integers(0, 3), int32=st.booleans(), seed=st.integers(0, 2**16))
def test_pack_ids_is_pack_padded_sequence(lengths, extra, int32, seed):
    """packrnn::pack_ids gives pack_padded_sequence's (and torch's) PackedSequence of ids:
    same rows, batch_sizes and both index orders (ties included), for any lengths."""
    from packrnn import _native

    steps = max(lengths) + extra
    if max(lengths) == 0:
        with pytest.raises(ValueError, match=r"at least one non-empty sequence"):
            _native.pack_ids(torch.zeros(len(lengths), steps, dtype=torch.int64),
                             torch.tensor(lengths), 10)
        return
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (len(lengths), steps), generator=g)
    ids = ids.int() if int32 else ids
    lens = torch.tensor(lengths)
    got = _native.pack_ids(ids, lens, 10)
    wants = [packrnn.pack_padded_sequence(ids, lens, batch_first=True, enforce_sorted=False)]
    if min(lengths) > 0:  # torch refuses zero lengths
        wants.append(tnn_rnn.pack_padded_sequence(ids, lens, batch_first=True,
                                                  enforce_sorted=False))
    assert got.data.dtype == torch.int64
    for want in wants:
        for a, b in zip(got, want):
            assert torch.equal(a, b.long())
    assert packrnn.packing.check_packed_sequence(got) == len(lengths)


@native_only
def test_pack_ids_checks_what_it_packs():
    from packrnn import _native

    ids = torch.tensor([[1, 2, 3, 12], [4, -1, 6, 7]])
    _native.pack_ids(ids, torch.tensor([3, 1]), 10)  # 12 and -1 are padding here
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 10\) \(vocab_size\), "
                                         r"got -1 at \(1, 1\)"):
        _native.pack_ids(ids, torch.tensor([3, 2]), 10)
    with pytest.raises(ValueError, match=r"lengths: expected every length in \[0, 4\]"):
        _native.pack_ids(ids, torch.tensor([5, 2]), 10)
    with pytest.raises(ValueError, match=r"lengths: expected a \(2,\) int64 CPU tensor"):
        _native.pack_ids(ids, torch.tensor([3]), 10)


@native_only
@pytest.mark.parametrize("cell,bidirectional", [("lstm", False), ("gru", True)])
def test_training_forward_packs_ids_in_one_operator(cell, bidirectional, monkeypatch):
    """A training step on padded ids + lengths packs through pack_ids; its logits and every
    gradient equal those of the Python packing path exactly; bad input still gets the
    classifier's own errors. (The module path: the fused training forward, which packs in
    its own operator, is taken away.)"""
    from packrnn import _native

    monkeypatch.delattr(_native, "classifier_features")
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=30, num_classes=3, embed_dim=5,
                                           hidden_size=6, cell=cell, bidirectional=bidirectional,
                                           pooling="mean")).double()
    ids = torch.randint(1, 30, (5, 7))
    lengths = torch.tensor([3, 7, 0, 7, 2])

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(ids, lengths)
        logits.sum().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    calls = []
    packer = _native.pack_ids
    monkeypatch.setattr(_native, "pack_ids", lambda *a: calls.append(1) or packer(*a))
    fast = step()
    assert calls == [1]
    monkeypatch.delattr(_native, "pack_ids")  # the Python packing path
    slow = step()
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.setattr(_native, "pack_ids", packer, raising=False)
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 30\) \(vocab_size\), "
                                         r"got 31 at \(0, 1\)"):
        model(torch.tensor([[1, 31, 2], [4, 5, 99]]), [3, 2])  # 99: padding, not checked
    with pytest.raises(ValueError, match=r"lengths: expected every length <= 3"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), [3, 4])


# --------------------------------------------------------------------------------------------
# Threads.

@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    packrnn.set_kernel_threads(None)


@native_only
@pytest.mark.parametrize("setting,hidden", [(None, 6), (None, 32), (1, 32), (2, 6)],
                         ids=["auto-serial", "auto-helpers", "1", "2-team"])
def test_kernel_threads_setting_keeps_the_numbers_right(setting, hidden, restore_threads):
    """auto at H = 6 runs on the calling thread, at H = 32 (~1e7 FLOPs a loop) with helpers
    (NOTE [Helpers, not a team]); 2 forces an OpenMP team even on a tiny call."""
    torch.set_num_threads(2)
    packrnn.set_kernel_threads(setting)
    assert packrnn.kernel_threads() == setting
    reference, ours = layer_pair("lstm", torch.float64, input_size=4, hidden_size=hidden,
                                 num_layers=1, bidirectional=True)
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(1, 60, (16,), generator=g).sort(descending=True).values
    x = torch.randn(int(lengths[0]), 16, 4, generator=g, dtype=torch.float64)
    packed = tnn_rnn.pack_padded_sequence(x, lengths)
    out, (h, c) = ours(packed)
    want, (want_h, want_c) = reference(packed)
    assert_same(out.data, want.data, torch.float64)
    assert_same(h, want_h, torch.float64)
    grads = torch.autograd.grad(out.data.sum() + c.sum(), list(ours.parameters()))
    want_grads = torch.autograd.grad(want.data.sum() + want_c.sum(),
                                     list(reference.parameters()))
    for got, expected in zip(grads, want_grads):
        assert_same(got, expected, torch.float64)
    assert ("kernel threads auto" if setting is None else f"kernel threads {setting} (set)") \
        in packrnn.backend_info()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_kernel_threads_errors(bad, restore_threads):
    with pytest.raises(ValueError) as error:
        packrnn.set_kernel_threads(bad)
    assert str(error.value) == f"threads: expected None (auto) or a positive int, got {bad!r}"


def test_kernel_threads_environment_variable():
    from packrnn import _native

    assert _native._parse_threads("") == 0 and _native._parse_threads(" Auto ") == 0
    assert _native._parse_threads("3") == 3
    for bad in ("0", "-2", "two"):
        with pytest.raises(ValueError, match=rf"PACKRNN_NUM_THREADS: expected 'auto' or a "
                                             rf"positive int, got '{bad}'"):
            _native._parse_threads(bad)


@native_only
def test_kernel_threads_environment_variable_is_read_at_load():
    code = "import packrnn; packrnn.backend_name(); print(packrnn.kernel_threads())"
    env = dict(os.environ, PACKRNN_NUM_THREADS="3", PACKRNN_BACKEND="native",
               PYTHONPATH=str(Path(packrnn.__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "3"


_SIMD_CODE = """
import sys, torch, packrnn
from packrnn import _native
packrnn.backend_name()
print(_native.kernel_info())
torch.manual_seed(0)
results = []
for cell in ("LSTM", "GRU", "RNN"):
    layer = getattr(packrnn, cell)(6, 37, num_layers=2, bidirectional=True)
    x = torch.randn(9, 3, 6, requires_grad=True)  # every step 3 rows: BLAS products
    out, state = layer(x, lengths=[9, 9, 9])
    h = state[0] if isinstance(state, tuple) else state
    grads = torch.autograd.grad(out.square().sum() + h.sum(), [x, *layer.parameters()])
    results += [out.detach(), *grads]
torch.save(results, sys.argv[1])
"""


@native_only
def test_simd_cap_keeps_the_elementwise_bits(tmp_path):
    """PACKRNN_SIMD=avx2 (NOTE [SIMD level]): kernel_info says so, and the elementwise loops of
    every cell, forward and backward, give the same bits as the default build; a bad value is a
    clear error."""
    runs = {}
    for setting in ("auto", "avx2"):
        env = dict(os.environ, PACKRNN_SIMD=setting, PACKRNN_BACKEND="native",
                   PYTHONPATH=str(Path(packrnn.__file__).resolve().parents[1]))
        path = tmp_path / f"{setting}.pt"
        result = subprocess.run([sys.executable, "-c", _SIMD_CODE, str(path)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[setting] = (result.stdout, torch.load(path))
    assert "avx512" not in runs["avx2"][0]
    for got, want in zip(runs["avx2"][1], runs["auto"][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    env = dict(os.environ, PACKRNN_SIMD="sse", PACKRNN_BACKEND="native",
               PYTHONPATH=str(Path(packrnn.__file__).resolve().parents[1]))
    code = "import torch, packrnn; packrnn.backend_name(); packrnn.LSTM(2, 3)(torch.ones(1, 1, 2))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode != 0
    assert "PACKRNN_SIMD: expected auto or avx2, got 'sse'" in result.stderr


def test_training_threads_default_from_the_work_size():
    from packrnn.train import SMALL_STEP_FLOPS, TrainConfig, default_threads

    lesson = TrainConfig(train_path="t.csv", output="o", embed_dim=64, hidden_size=32)
    big = TrainConfig(train_path="t.csv", output="o", embed_dim=128, hidden_size=128,
                      bidirectional=True, batch_size=64)
    assert default_threads(lesson, 43.0) == 1
    assert default_threads(big, 43.0) == torch.get_num_threads()
    # the boundary: 6 FLOPs per weight and real step, forward and backward
    per_sequence_step = 6 * 4 * 32 * (64 + 32) * lesson.batch_size
    steps = SMALL_STEP_FLOPS / per_sequence_step
    assert default_threads(lesson, steps * 0.99) == 1
    assert default_threads(lesson, steps * 1.01) == torch.get_num_threads()


def split_loops() -> int:
    """How many time loops the kernel has split by hidden units (NOTE [Unit split])."""
    from packrnn import _native

    _native.load_library()
    return torch.ops.packrnn.split_loops()


# (kind, hidden, split): a step of rnn at H = 128 is too little work to split.
UNIT_SPLIT_CASES = [("lstm", 128, True), ("lstm", 256, True), ("gru", 128, True),
                    ("gru", 256, True), ("rnn_tanh", 128, False), ("rnn_tanh", 256, True),
                    ("rnn_relu", 256, True), ("lstm_proj", 256, False)]


@native_only
@DTYPES
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind,hidden,split", UNIT_SPLIT_CASES,
                         ids=[f"{k}-{h}" for k, h, _ in UNIT_SPLIT_CASES])
def test_one_sequence_split_by_units_equals_one_thread(kind, hidden, split, bidirectional,
                                                       dtype, restore_threads):
    """One sequence with two threads a direction (2 uni, 4 bi) splits each step's units over
    them (NOTE [Unit split]): the same bits as one thread, and torch's numbers."""
    reference, ours = layer_pair(kind, dtype, input_size=16, hidden_size=hidden, num_layers=1,
                                 bidirectional=bidirectional, batch_first=True)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 23, 16, generator=g, dtype=torch.float64).to(dtype)
    runs = []
    for threads in (1, 4 if bidirectional else 2):
        torch.set_num_threads(threads)
        packrnn.set_kernel_threads(threads)
        before = split_loops()
        with torch.no_grad():
            out, state = ours(x)
        runs.append((out, states(state), split_loops() - before))
    (out_1, states_1, splits_1), (out_n, states_n, splits_n) = runs
    assert splits_1 == 0 and splits_n == int(split)
    assert torch.equal(out_n, out_1)
    for got, one in zip(states_n, states_1, strict=True):
        assert torch.equal(got, one)
    with torch.no_grad():
        want, want_state = reference(x)
    assert_same(out_n, want, dtype)
    for got, expected in zip(states_n, states(want_state), strict=True):
        assert_same(got, expected, dtype)
