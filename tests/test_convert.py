"""packrnn.to_torch / from_torch: the same layers under torch.nn's classes and back, so that
tools that pick modules by torch's classes (dynamic quantization) see packrnn's layers."""

from __future__ import annotations

import warnings

import pytest
import torch

import packrnn
from packrnn import ModelConfig, SequenceClassifier

E, H, P = 3, 4, 2
LENGTHS = [5, 2, 4]

LAYERS = {
    "rnn_relu": lambda **kw: packrnn.RNN(E, H, nonlinearity="relu", **kw),
    "lstm": lambda **kw: packrnn.LSTM(E, H, **kw),
    "lstm_proj": lambda **kw: packrnn.LSTM(E, H, proj_size=P, **kw),
    "gru": lambda **kw: packrnn.GRU(E, H, **kw),
}
CELLS = {
    "rnn_cell": lambda: packrnn.RNNCell(E, H, nonlinearity="relu", bias=False),
    "lstm_cell": lambda: packrnn.LSTMCell(E, H),
    "gru_cell": lambda: packrnn.GRUCell(E, 0),  # hidden_size=0 converts too
}


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def flat(result):
    """(output, state or (h, c)) -> a tuple of tensors; PackedSequence output -> its data."""
    out, state = result
    return (getattr(out, "data", out), *as_tuple(state))


def assert_same_layer(ours, theirs):
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype and a.requires_grad == b.requires_grad, name
        assert a is not b and (a.numel() == 0 or a.data_ptr() != b.data_ptr()), f"{name} is shared"
    assert repr(ours) == repr(theirs) and ours.training == theirs.training


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", LAYERS)
def test_to_torch_layer_is_torchs_class_with_the_same_results(kind, batch_first):
    torch.manual_seed(0)
    ours = LAYERS[kind](num_layers=2, bidirectional=True, batch_first=batch_first,
                        dropout=0.25, dtype=torch.float64).eval()
    ours.weight_hh_l0.requires_grad_(False)
    theirs = packrnn.to_torch(ours)
    assert type(theirs) is getattr(torch.nn, type(ours).__name__)
    assert_same_layer(ours, theirs)
    x = torch.randn((3, 5, E) if batch_first else (5, 3, E), dtype=torch.float64)
    packed = packrnn.pack_padded_sequence(x, LENGTHS, batch_first=batch_first)
    for inputs in ((x,), (packed,)):
        for a, b in zip(flat(ours(*inputs)), flat(theirs(*inputs)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kind", CELLS)
def test_cells_convert_both_ways(kind):
    torch.manual_seed(1)
    ours = CELLS[kind]().double()
    theirs = packrnn.to_torch(ours)
    assert type(theirs) is getattr(torch.nn, type(ours).__name__)
    assert_same_layer(ours, theirs)
    x = torch.randn(2, E, dtype=torch.float64)
    for a, b in zip(as_tuple(ours(x)), as_tuple(theirs(x)), strict=True):
        torch.testing.assert_close(a, b)
    back = packrnn.from_torch(theirs)
    assert type(back) is type(ours)
    assert_same_layer(back, theirs)


@pytest.mark.parametrize("cls", ["RNN", "LSTM", "GRU"])
def test_from_torch_layer_is_packrnns_class_with_the_same_results(cls):
    torch.manual_seed(2)
    theirs = getattr(torch.nn, cls)(E, H, num_layers=2, dtype=torch.float64).train()
    ours = packrnn.from_torch(theirs)
    assert type(ours) is getattr(packrnn, cls)
    assert_same_layer(ours, theirs)
    x = torch.randn(5, 3, E, dtype=torch.float64)
    for a, b in zip(flat(ours(x)), flat(theirs(x)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_containers_are_copied_layers_replaced_and_sharing_kept():
    torch.manual_seed(3)
    shared = packrnn.GRU(E, H)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared, torch.nn.Linear(H, 2))})
    rng = torch.get_rng_state()
    twin = packrnn.to_torch(model)
    assert torch.equal(torch.get_rng_state(), rng)  # no initialisation drew random numbers
    assert type(twin["a"]) is torch.nn.GRU and twin["b"][0] is twin["a"]
    assert type(model["a"]) is packrnn.GRU  # the original is not modified
    assert torch.equal(twin["b"][1].weight, model["b"][1].weight)
    assert twin["b"][1].weight is not model["b"][1].weight
    back = packrnn.from_torch(twin)
    assert type(back["a"]) is packrnn.GRU and back["b"][0] is back["a"]


def test_to_torch_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"module: expected a torch.nn.Module, got str"):
        packrnn.to_torch("lstm")


def _classifier_and_batch():
    torch.manual_seed(4)
    cfg = ModelConfig(vocab_size=50, num_classes=3, embed_dim=8, hidden_size=16, cell="lstm",
                      bidirectional=True, pooling="mean")
    model = SequenceClassifier(cfg).eval()
    ids = torch.randint(1, 50, (4, 7))
    lengths = [7, 3, 5, 1]  # no empty text: torch's layers refuse zero-length sequences
    return model, ids, lengths


def test_classifier_runs_the_same_after_to_torch():
    model, ids, lengths = _classifier_and_batch()
    twin = packrnn.to_torch(model)
    assert type(twin.rnn) is torch.nn.LSTM and type(model.rnn) is packrnn.LSTM
    with torch.no_grad():
        torch.testing.assert_close(twin(ids, lengths), model(ids, lengths))


def test_dynamic_quantization_applies_after_to_torch():
    quantize_dynamic = pytest.importorskip("torch.ao.quantization").quantize_dynamic
    dynamic = pytest.importorskip("torch.ao.nn.quantized.dynamic")
    model, ids, lengths = _classifier_and_batch()
    spec = {torch.nn.LSTM, torch.nn.Linear}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's notice
        warnings.simplefilter("ignore", UserWarning)  # quantized tensor creation notice
        skipped = quantize_dynamic(model, spec, dtype=torch.qint8)  # packrnn's layer: untouched
        quantized = quantize_dynamic(packrnn.to_torch(model), spec, dtype=torch.qint8)
        with torch.no_grad():
            expected, logits = model(ids, lengths), quantized(ids, lengths)
    assert type(skipped.rnn) is packrnn.LSTM and isinstance(skipped.fc, dynamic.Linear)
    assert isinstance(quantized.rnn, dynamic.LSTM) and isinstance(quantized.fc, dynamic.Linear)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.05)  # int8 weights: close
