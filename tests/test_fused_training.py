"""The classifier's fused training forward (NOTE [fused training] in packrnn/models.py): one
autograd node whose forward and backward are native operators must give the module path's
logits and gradients (float64: exactly, but for the embedding's dense gradient, whose sums
nn.Embedding may order otherwise), torch's in float32, and step aside wherever the module path
would do something it does not."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn
from torch.nn.utils import rnn as tnn_rnn

from packrnn import backend
from packrnn.models import ModelConfig, SequenceClassifier

_NATIVE_ERROR = None if os.environ.get(backend.ENV_VAR) == "python" else backend.native_error()
pytestmark = pytest.mark.skipif(
    os.environ.get(backend.ENV_VAR) == "python" or _NATIVE_ERROR is not None,
    reason=f"native backend not available: {_NATIVE_ERROR or 'PACKRNN_BACKEND=python'}",
)

V, C = 30, 3
BATCHES = {  # (ids T, lengths)
    "one-full": (6, [6]), "one-padded": (6, [4]),
    "unsorted": (7, [3, 7, 7, 1, 5]), "zero-length": (5, [0, 4, 2, 4, 0]),
}


@pytest.fixture
def fused_calls(monkeypatch) -> list:
    """Records each call of the fused training wrapper (the call still runs)."""
    from packrnn import _native

    calls = []
    fused = _native.classifier_features
    monkeypatch.setattr(_native, "classifier_features",
                        lambda **kw: calls.append(kw["ids"].shape if kw.get("packed") is None
                                                  else "packed") or fused(**kw))
    return calls


def classifier(dtype=torch.float64, **kw) -> SequenceClassifier:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, num_classes=C, embed_dim=5, hidden_size=4)
    cfg.update(kw)
    return SequenceClassifier(ModelConfig(**cfg)).to(dtype)


@contextlib.contextmanager
def path(model, fused: bool):
    """``model``'s calls in the block: the fused training where it applies (``fused``), else
    the module path (the fused node taken away from this model only)."""
    if not fused:
        model._fused_features = lambda *args: None  # an instance attribute: this model
    try:
        yield
    finally:
        model.__dict__.pop("_fused_features", None)


def step(model, ids, lengths, fused: bool = True):
    """Logits and every parameter's gradient (None where none) of a weighted sum of the
    logits; ``fused=False``: the module path."""
    model.zero_grad(set_to_none=True)
    with path(model, fused):
        logits = model(ids, lengths)
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1),
                          dtype=logits.dtype)
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_step(got, want, exact: bool = True):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert got[1].keys() == want[1].keys()
    for name, grad in got[1].items():
        if grad is None or want[1][name] is None:
            assert grad is None and want[1][name] is None, name
            continue
        tight = exact and name != "embedding.weight"
        torch.testing.assert_close(grad, want[1][name], rtol=0 if tight else 1e-13,
                                   atol=0 if tight else 1e-15, msg=name)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)], ids=["1uni", "2bi"])
def test_fused_training_is_the_module_path(cell, pooling, layers, bidirectional, fused_calls):
    """Logits and gradients of every parameter, for one sequence, unsorted lengths and
    zero-length sequences; rnn_relu's max pooling has ties (zeros) that share the gradient."""
    model = classifier(cell=cell.split("_")[0], nonlinearity=cell[4:] or "tanh",
                       pooling=pooling, num_layers=layers, bidirectional=bidirectional)
    g = torch.Generator().manual_seed(2)
    for name, (steps, lengths) in BATCHES.items():
        ids = torch.randint(1, V, (len(lengths), steps), generator=g)
        lengths = torch.tensor(lengths)
        before = len(fused_calls)
        got = step(model, ids, lengths)
        assert len(fused_calls) == before + 1, name
        assert_same_step(got, step(model, ids, lengths, fused=False))


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("form", ["unsorted", "sorted", "one", "zero-length"])
def test_fused_training_on_packed_ids_is_the_module_path(pooling, form, fused_calls):
    """A PackedSequence of ids (the trainer's batches): packrnn's packing of unsorted and of
    sorted sequences (sorted_indices None), one sequence (which the module path runs as a
    packed batch, not as the padded one-sequence path) and zero-length sequences; with
    dropout, for one seed."""
    import packrnn

    model = classifier(cell="lstm", pooling=pooling, num_layers=2, bidirectional=True,
                       embed_dropout=0.2, dropout=0.3, nonlinearity="tanh").train()
    g = torch.Generator().manual_seed(9)
    lengths = {"unsorted": [3, 6, 1, 6], "sorted": [6, 4, 4, 1], "one": [5],
               "zero-length": [0, 4, 0, 2]}[form]
    seqs = [torch.randint(1, V, (n,), generator=g) for n in lengths]
    packed = packrnn.pack_sequence(seqs, enforce_sorted=form == "sorted")
    assert (packed.sorted_indices is None) == (form == "sorted")

    def run(fused: bool):
        torch.manual_seed(21)
        return step(model, packed, None, fused=fused)

    got = run(True)
    assert len(fused_calls) == 1
    assert_same_step(got, run(False))


def test_fused_training_matches_torch_float32(fused_calls):
    """float32 against torch.nn (embedding, packed LSTM, last state, linear): logits and
    gradients within float32 tolerance."""
    ours = classifier(torch.float32, cell="lstm", num_layers=2, bidirectional=True,
                      hidden_size=8, embed_dim=6)
    embedding = nn.Embedding(V, 6, padding_idx=0)
    lstm = nn.LSTM(6, 8, 2, batch_first=True, bidirectional=True)
    fc = nn.Linear(16, C)
    oracle = nn.ModuleDict(dict(embedding=embedding, rnn=lstm, fc=fc))
    oracle.load_state_dict(ours.state_dict())
    ids = torch.randint(1, V, (6, 9), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([9, 2, 5, 9, 1, 7])
    got = ours(ids, lengths)
    assert len(fused_calls) == 1
    _, (h_n, _) = lstm(tnn_rnn.pack_padded_sequence(embedding(ids), lengths, batch_first=True,
                                                    enforce_sorted=False))
    want = fc(torch.cat([h_n[-2], h_n[-1]], -1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ours_grads = torch.autograd.grad(got.square().sum(), list(ours.parameters()))
    torch_grads = torch.autograd.grad(want.square().sum(), list(oracle.parameters()))
    for (name, _), a, b in zip(ours.named_parameters(), ours_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_training_frozen_embedding_and_eval_mode(fused_calls):
    """A frozen embedding gets no gradient; eval mode with gradients on (dropout the identity)
    still runs fused; the rest equals the module path."""
    model = classifier(cell="gru", pooling="mean", embed_dropout=0.5, dropout=0.5,
                       num_layers=2, freeze_embedding=True).eval()
    ids = torch.randint(1, V, (4, 6), generator=torch.Generator().manual_seed(4))
    lengths = torch.tensor([6, 3, 1, 5])
    got = step(model, ids, lengths)
    assert len(fused_calls) == 1 and got[1]["embedding.weight"] is None
    assert_same_step(got, step(model, ids, lengths, fused=False))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # ids need no gradient
@pytest.mark.parametrize("case", ["sparse", "hook", "dropout_hook", "backward_hook",
                                  "proj_size", "mean_padded"])
def test_fused_training_steps_aside(case, fused_calls):
    """Whatever the fused node would not do as the module path does takes the module path."""
    kw = dict(cell="lstm", num_layers=2, embed_dropout=0.2)
    if case == "sparse":
        kw["sparse_embedding"] = True
    if case == "mean_padded":
        kw.update(pooling="mean_padded", execution="padded")
    model = classifier(**kw).train()
    if case == "hook":
        model.embedding.register_forward_hook(lambda *args: None)
    if case == "dropout_hook":
        model.embed_dropout.register_forward_pre_hook(lambda *args: None)
    seen = []
    if case == "backward_hook":
        model.embedding.register_full_backward_hook(lambda *args: seen.append(1))
    if case == "proj_size":
        from packrnn import LSTM

        model.rnn = LSTM(5, 4, num_layers=2, proj_size=3, batch_first=True, dtype=torch.float64)
        model.fc = nn.Linear(3, C, dtype=torch.float64)
    ids = torch.randint(1, V, (3, 5), generator=torch.Generator().manual_seed(5))
    model(ids, torch.tensor([5, 2, 4])).sum().backward()
    assert fused_calls == []
    assert seen == ([1] if case == "backward_hook" else [])  # the module path ran the hook


@pytest.mark.parametrize("cell,layers,pooling", [("lstm", 2, "last"), ("gru", 1, "max"),
                                                  ("rnn_relu", 2, "mean")])
@pytest.mark.parametrize("batch", ["one-padded", "unsorted", "zero-length"])
def test_fused_training_dropout_draws_the_module_paths_masks(cell, layers, pooling, batch,
                                                              fused_calls):
    """Embedding dropout and dropout between layers (and before the head, a module call) draw,
    for one seed, the masks the module path draws: the same logits and gradients, and the
    generator left in the same state."""
    model = classifier(cell=cell.split("_")[0], nonlinearity=cell[4:] or "tanh",
                       num_layers=layers, pooling=pooling, bidirectional=True,
                       embed_dropout=0.3, dropout=0.4).train()
    steps, lengths = BATCHES[batch]
    ids = torch.randint(1, V, (len(lengths), steps), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor(lengths)
    torch.manual_seed(11)
    got = step(model, ids, lengths)
    after_fused = torch.rand(1)
    assert len(fused_calls) == 1
    torch.manual_seed(11)
    want = step(model, ids, lengths, fused=False)
    assert torch.equal(after_fused, torch.rand(1))
    assert_same_step(got, want)
    torch.manual_seed(12)  # another seed: other masks
    assert not torch.equal(step(model, ids, lengths)[0], got[0])


def test_fused_training_bad_input_gets_the_module_errors():
    model = classifier(cell="lstm").train()
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 30\) \(vocab_size\), "
                                         r"got 31 at \(0, 1\)"):
        model(torch.tensor([[1, 31, 2], [4, 5, 99]]), [3, 2])  # 99: padding, not checked
    with pytest.raises(ValueError, match=r"lengths: expected every length <= 3"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), [3, 4])


def test_fused_training_all_empty_batch_is_the_module_path(fused_calls):
    """No real step at all: the module path's answer (zero features), gradients included."""
    model = classifier(cell="lstm")
    ids = torch.zeros(2, 3, dtype=torch.int64)
    lengths = torch.tensor([0, 0])
    got = step(model, ids, lengths)
    assert fused_calls == [(2, 3)]  # tried; the operator refused; the module path ran
    assert_same_step(got, step(model, ids, lengths, fused=False))


@pytest.mark.parametrize("pooling,dropout", [("last", 0.0), ("max", 0.0), ("mean", 0.3)])
def test_fused_training_second_derivatives_are_the_module_paths(pooling, dropout, fused_calls):
    """A gradient penalty (create_graph=True) differentiates the module path's recomputation
    (with the forward's dropout masks): the same first and second derivatives as the module
    path."""
    def penalty_grads(fused: bool):
        model = classifier(cell="gru", pooling=pooling, bidirectional=True, num_layers=2,
                           embed_dropout=dropout, dropout=dropout)
        ids = torch.randint(1, V, (4, 6), generator=torch.Generator().manual_seed(7))
        torch.manual_seed(13)
        with path(model, fused):
            logits = model(ids, torch.tensor([6, 2, 5, 3]))
        params = list(model.parameters())
        first = torch.autograd.grad(logits.square().sum(), params, create_graph=True)
        sum(g.square().sum() for g in first).backward()
        return [g.detach() for g in first], [p.grad for p in params]

    fused_first, fused_second = penalty_grads(True)
    assert len(fused_calls) == 1
    want_first, want_second = penalty_grads(False)
    for a, b in zip(fused_first + fused_second, want_first + want_second):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_training_sees_weights_changed_in_place(fused_calls):
    """A weight modified in place between forward and backward is an error, as in torch."""
    model = classifier(cell="lstm")
    ids = torch.randint(1, V, (3, 5), generator=torch.Generator().manual_seed(8))
    logits = model(ids, torch.tensor([5, 2, 4]))
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logits.sum().backward()


def test_fused_training_backward_twice_and_accumulated(fused_calls):
    """retain_graph: a second backward of the same graph accumulates the same gradients again,
    and two forwards before one backward add up, as on the module path."""
    model = classifier(cell="gru", pooling="max", num_layers=2, bidirectional=True)
    ids = torch.randint(1, V, (4, 6), generator=torch.Generator().manual_seed(10))
    lengths = torch.tensor([6, 2, 5, 3])

    def grads(fused: bool):
        model.zero_grad(set_to_none=True)
        with path(model, fused):
            first = model(ids, lengths).square().sum()
            first.backward(retain_graph=True)
            first.backward()
            (model(ids, lengths).sum() + model(ids[:2], lengths[:2]).sum()).backward()
        return [p.grad.clone() for p in model.parameters()]

    got = grads(True)
    assert len(fused_calls) == 3
    for a, b in zip(got, grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
