"""SequenceClassifier: the lesson's three classifiers vs torch.nn oracles, pooling, padding, vectors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import packrnn
from packrnn.models import ModelConfig, SequenceClassifier, load_vectors

V, C = 30, 3


def batch(seed: int = 0, lengths=(7, 3, 5, 1)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(2, V, (len(lengths), int(lengths.max())), generator=g)  # (B, T)
    ids[torch.arange(ids.shape[1])[None, :] >= lengths[:, None]] = 0  # padding id 0
    return ids, lengths


def model(seed: int = 0, dtype=torch.float64, **kw) -> SequenceClassifier:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, num_classes=C, embed_dim=5, hidden_size=4)
    cfg.update(kw)
    return SequenceClassifier(ModelConfig(**cfg)).to(dtype)


class TorchLesson(nn.Module):
    """The lesson's classifiers written with torch.nn, the oracle (same parameter names)."""

    def __init__(self, cell: str, mode: str, bidirectional: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.embedding = nn.Embedding(V, 5, padding_idx=0)
        rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(5, 4, batch_first=True, bidirectional=bidirectional)
        self.fc = nn.Linear(8 if bidirectional else 4, C)

    def forward(self, ids, lengths):
        x = self.embedding(ids)
        if self.mode == "packed":
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(x)
        if self.mode == "mean_padded":
            return self.fc(out.mean(dim=1))
        h_n = h[0] if isinstance(h, tuple) else h
        if self.rnn.bidirectional:
            return self.fc(torch.cat([h_n[-2], h_n[-1]], dim=-1))
        return self.fc(h_n[-1])


@pytest.mark.parametrize("name, cfg, mode", [
    ("RNN, mean over padded outputs", dict(cell="rnn", execution="padded", pooling="mean_padded"),
     "mean_padded"),
    ("LSTM, last hidden state (padded)", dict(cell="lstm", execution="padded", pooling="last"),
     "padded"),
    ("LSTM on packed input", dict(cell="lstm", execution="packed", pooling="last"), "packed"),
    ("bidirectional GRU, packed", dict(cell="gru", bidirectional=True), "packed"),
])
def test_lesson_classifiers_match_torch(name, cfg, mode):
    ours = model(**cfg)
    oracle = TorchLesson(cfg["cell"], mode, cfg.get("bidirectional", False)).double()
    oracle.load_state_dict(ours.state_dict())  # same names: packrnn layers are drop-in
    ids, lengths = batch()
    got, want = ours(ids, lengths), oracle(ids, lengths)
    torch.testing.assert_close(got, want)
    g_ours = torch.autograd.grad(got.square().sum(), list(ours.parameters()))
    g_want = torch.autograd.grad(want.square().sum(), list(oracle.parameters()))
    for a, b in zip(g_ours, g_want):
        torch.testing.assert_close(a, b)


def _masked(out, lengths, mode):
    rows = []
    for b, L in enumerate(lengths.tolist()):
        seq = out[b, :L]
        rows.append(seq.mean(0) if mode == "mean" else seq.amax(0))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling", ["mean", "max"])
@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_mean_max_pool_over_real_steps_only(pooling, execution):
    ours = model(cell="lstm", pooling=pooling, execution=execution, bidirectional=True)
    ids, lengths = batch(1)
    emb = ours.embedding(ids)
    if execution == "packed":  # oracle: torch LSTM per sequence, no padding at all
        lstm = nn.LSTM(5, 4, batch_first=True, bidirectional=True).double()
        lstm.load_state_dict(ours.rnn.state_dict())
        feats = []
        for b, L in enumerate(lengths.tolist()):
            out, _ = lstm(emb[b:b + 1, :L])
            feats.append(_masked(out, torch.tensor([L]), pooling)[0])
        want = ours.fc(torch.stack(feats))
    else:  # oracle: the padded run, pooled over real positions only
        out, _ = ours.rnn(emb)
        want = ours.fc(_masked(out, lengths, pooling))
    torch.testing.assert_close(ours(ids, lengths), want)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_packed_prediction_does_not_depend_on_the_batch(cell, pooling):
    ours = model(cell=cell, pooling=pooling, bidirectional=True, num_layers=2).eval()
    ids, lengths = batch(2)
    together = ours(ids, lengths)
    alone = torch.cat([ours(ids[b:b + 1, :L], [L]) for b, L in enumerate(lengths.tolist())])
    torch.testing.assert_close(together, alone)
    extra = torch.cat([ids, torch.zeros(len(ids), 6, dtype=ids.dtype)], dim=1)  # more padding
    torch.testing.assert_close(ours(extra, lengths), together)


def test_padded_last_state_sees_padding_as_in_the_lesson():
    padded = model(cell="lstm", execution="padded", pooling="last")
    packed = model(cell="lstm", execution="packed", pooling="last")
    ids, lengths = batch(3)
    a, b = padded(ids, lengths), packed(ids, lengths)
    full = lengths == lengths.max()
    torch.testing.assert_close(a[full], b[full])  # no padding: same state
    assert not torch.allclose(a[~full], b[~full])  # padding steps changed the short ones


def test_packed_input_equals_padded_ids_with_lengths():
    ours = model(pooling="max")
    ids, lengths = batch(4)
    packed = packrnn.pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False)
    torch.testing.assert_close(ours(packed), ours(ids, lengths))
    padded_exec = model(execution="padded", pooling="mean")
    torch.testing.assert_close(padded_exec(packed), padded_exec(ids, lengths))


@pytest.mark.parametrize("pooling, execution", [("last", "packed"), ("mean", "packed"),
                                                ("max", "packed"), ("mean", "padded")])
def test_zero_length_sequences(pooling, execution):
    ours = model(pooling=pooling, execution=execution)
    ids, lengths = batch(5, lengths=(4, 0, 2))
    logits = ours(ids, lengths)
    assert logits.shape == (3, C) and torch.isfinite(logits).all()
    # the empty sequence has zero features (initial state / empty pool): logits = fc bias
    torch.testing.assert_close(logits[1], ours.fc.bias)
    logits.sum().backward()


def test_padding_embedding_gets_no_gradient():
    ours = model(pooling="mean")
    ids, lengths = batch(6)
    ours(ids, lengths).sum().backward()
    assert torch.count_nonzero(ours.embedding.weight.grad[0]) == 0
    assert torch.count_nonzero(ours.embedding.weight.grad[ids[0, 0]]) > 0


@pytest.mark.parametrize("cell, layers, bidirectional, pooling, execution", [
    c for c in itertools.product(["rnn", "lstm", "gru"], [1, 2], [False, True],
                                 ["last", "mean", "max"], ["packed", "padded"])
    if c[2] or c[1] == 1  # keep the grid small: 2 layers only with bidirectional
])
def test_every_configuration_runs_forward_and_backward(cell, layers, bidirectional, pooling,
                                                       execution):
    ours = model(cell=cell, num_layers=layers, bidirectional=bidirectional, pooling=pooling,
                 execution=execution, dropout=0.1, dtype=torch.float32)
    ids, lengths = batch(7)
    logits = ours(ids, lengths)
    assert logits.shape == (4, C) and logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in ours.parameters())


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_embed_dropout_drops_the_embedded_tokens(execution):
    """Training mode: the recurrent layer sees dropout(embedding) -- the same as a torch oracle
    that applies F.dropout to the embedded tokens (the real rows when packed, every position
    when padded) with the same RNG state. Eval mode is the model without dropout."""
    ours = model(cell="lstm", execution=execution, embed_dropout=0.5, dtype=torch.float64)
    oracle = TorchLesson("lstm", "packed").double()
    oracle.load_state_dict(ours.state_dict())
    ids, lengths = batch(3)
    ours.train()
    torch.manual_seed(7)
    got = ours(ids, lengths)
    torch.manual_seed(7)
    if execution == "packed":
        packed_ids = pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False)
        emb = torch.nn.functional.dropout(oracle.embedding(packed_ids.data), p=0.5)  # (N, E)
        rnn_input = torch.nn.utils.rnn.PackedSequence(
            emb, packed_ids.batch_sizes, packed_ids.sorted_indices, packed_ids.unsorted_indices)
    else:
        rnn_input = torch.nn.functional.dropout(oracle.embedding(ids), p=0.5)  # (B, T, E)
    _, (h_n, _) = oracle.rnn(rnn_input)
    torch.testing.assert_close(got, oracle.fc(h_n[-1]))
    ours.eval()
    plain = model(cell="lstm", execution=execution, dtype=torch.float64)
    plain.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(ids, lengths), plain(ids, lengths))
    assert not torch.allclose(got, ours(ids, lengths))  # the training-mode result was dropped out


@pytest.mark.parametrize("kw, error, match", [
    (dict(cell="transformer"), ValueError, r"cell: expected one of rnn, lstm, gru, got 'transformer'"),
    (dict(pooling="sum"), ValueError, r"pooling: expected one of last, mean, max, mean_padded, got 'sum'"),
    (dict(execution="fast"), ValueError, r"execution: expected one of packed, padded, got 'fast'"),
    (dict(pooling="mean_padded"), ValueError,
     r"pooling: expected 'mean_padded' only with execution='padded'"),
    (dict(hidden_size=0), ValueError, r"hidden_size: expected an int >= 1, got 0"),
    (dict(num_layers=1.5), TypeError, r"num_layers: expected an int, got float 1.5"),
    (dict(dropout=1.0), ValueError, r"dropout: expected a number in \[0, 1\), got 1.0"),
    (dict(embed_dropout=-0.1), ValueError, r"embed_dropout: expected a number in \[0, 1\), got -0.1"),
    (dict(embed_dropout="0.1"), ValueError, r"embed_dropout: expected a number in \[0, 1\), got '0.1'"),
    (dict(padding_idx=V), ValueError, rf"padding_idx: expected < vocab_size \({V}\), got {V}"),
    (dict(nonlinearity="gelu"), ValueError, r"nonlinearity: expected one of tanh, relu, got 'gelu'"),
    (dict(bidirectional=1), TypeError, r"bidirectional: expected a bool, got 1"),
])
def test_config_errors(kw, error, match):
    with pytest.raises(error, match=match):
        ModelConfig(vocab_size=V, num_classes=C, **kw)


def test_config_round_trip_and_forward_errors():
    cfg = ModelConfig(vocab_size=V, num_classes=C, cell="gru", pooling="max")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"model config: expected keys among .*, got \['colour'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(TypeError, match=r"config: expected a ModelConfig, got dict"):
        SequenceClassifier(cfg.to_dict())
    ours = SequenceClassifier(cfg)
    ids, lengths = batch()
    with pytest.raises(ValueError, match=r"lengths: expected shape \(4,\) for a batch of 4, got \(3,\)"):
        ours(ids, lengths[:3])
    with pytest.raises(TypeError, match=r"ids: expected an int64 tensor of token ids, got torch.float32"):
        ours(ids.float(), lengths)
    with pytest.raises(ValueError, match=r"ids: expected a \(B, T\) tensor of token ids, got \(7,\)"):
        ours(ids[0], lengths)


# -- pretrained vectors --------------------------------------------------------------------------


def test_load_vectors_word2vec_and_glove(tmp_path):
    w2v = tmp_path / "w2v.txt"
    w2v.write_text("3 4\nthe 1 2 3 4\ncat 0.5 0.5 0.5 0.5\nzebra 9 9 9 9\n", encoding="utf-8")
    glove = tmp_path / "glove.txt"
    glove.write_text("the 1 2 3 4\ncat 0.5 0.5 0.5 0.5\n", encoding="utf-8")
    tokens = ["<pad>", "<unk>", "the", "cat", "dog"]
    for path in (w2v, glove):
        torch.manual_seed(0)
        ours = SequenceClassifier(ModelConfig(vocab_size=5, num_classes=2, embed_dim=4))
        before = ours.embedding.weight.detach().clone()
        assert ours.load_vectors(path, tokens) == 2
        w = ours.embedding.weight.detach()
        torch.testing.assert_close(w[2], torch.tensor([1.0, 2, 3, 4]))
        torch.testing.assert_close(w[3], torch.full((4,), 0.5))
        torch.testing.assert_close(w[4], before[4])  # not in the file: unchanged
        assert torch.count_nonzero(w[0]) == 0  # padding row stays zero


def test_load_vectors_errors(tmp_path):
    with pytest.raises(ValueError, match=r"vectors: expected a word2vec/GloVe text file, got .*no such file"):
        load_vectors(tmp_path / "missing.txt", {"a": 0})
    bad_dim = tmp_path / "dim.txt"
    bad_dim.write_text("the 1 2 3\n")
    ours = SequenceClassifier(ModelConfig(vocab_size=3, num_classes=2, embed_dim=4))
    with pytest.raises(ValueError, match=r"vectors: expected 4 numbers after the token, got 3 in .*dim.txt:1"):
        ours.load_vectors(bad_dim, ["<pad>", "<unk>", "the"])
    header = tmp_path / "header.txt"
    header.write_text("10 3\nthe 1 2 3\n")
    with pytest.raises(ValueError, match=r"vectors: expected dimension 4 \(embed_dim\), got 3 in .*header.txt:1"):
        ours.load_vectors(header, ["<pad>", "<unk>", "the"])
    nan = tmp_path / "nan.txt"
    nan.write_text("the 1 2 3 4\ncat 1 x 3 4\n")
    with pytest.raises(ValueError, match=r"vectors: expected numbers after the token, got .* in .*nan.txt:2"):
        load_vectors(nan, {"cat": 1}, dim=4)
    for value in ("nan", "inf", "-Infinity", "1e39"):  # 1e39 overflows float32
        nonfinite = tmp_path / "nonfinite.txt"
        nonfinite.write_text(f"dog nan nan nan nan\nthe 1 2 3 4\ncat 1 2 {value} 4\n")
        with pytest.raises(ValueError, match=rf"vectors: expected finite numbers after the token, "
                                             rf"got '{value}' for 'cat' in .*nonfinite.txt:3"):
            load_vectors(nonfinite, {"cat": 1}, dim=4)
    assert list(load_vectors(nonfinite, {"the": 1}, dim=4)) == [1]  # unused rows are not read
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"vectors: expected at least one vector, got an empty file"):
        load_vectors(empty, {"cat": 1})
    with pytest.raises(ValueError, match=r"tokens: expected 3 tokens \(vocab_size\), got 2"):
        ours.load_vectors(header, ["<pad>", "the"])


@pytest.mark.parametrize("execution", ["packed", "padded"])
def test_token_ids_outside_the_vocabulary_are_a_clear_error(execution):
    model = SequenceClassifier(ModelConfig(vocab_size=10, num_classes=2, execution=execution))
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 10\) \(vocab_size\), "
                                         r"got 10 at \(0, 1\)"):
        model(torch.tensor([[3, 10], [1, 0]]), [2, 1])
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 10\) \(vocab_size\), "
                                         r"got -1"):
        model(torch.tensor([[3, 2], [-1, 0]]), [2, 1])
    packed = packrnn.pack_sequence([torch.tensor([3, 12]), torch.tensor([4])], enforce_sorted=False)
    with pytest.raises(ValueError, match=r"ids: expected token ids in \[0, 10\) \(vocab_size\), "
                                         r"got 12"):
        model(packed)
    # padding beyond a sequence's length is not looked at by the packed execution, so only real
    # steps count there; the padded execution embeds every position, so all of them do
    ids = torch.tensor([[3, 4], [5, 99]])
    if execution == "packed":
        assert model(ids, [2, 1]).shape == (2, 2)
    else:
        with pytest.raises(ValueError, match=r"got 99 at \(1, 1\)"):
            model(ids, [2, 1])


def test_load_vectors_names_the_line_of_bad_bytes_and_cr_line_ends(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"the 1 2 3 4\ncaf\xe9 1 2 3 4\n")
    with pytest.raises(ValueError, match=r"vectors: expected UTF-8 text, got the invalid byte 0xe9 "
                                         r"in .*latin.txt:2"):
        load_vectors(latin, {"the": 0}, dim=4)
    cr = tmp_path / "cr.txt"  # old Mac line ends: the bad line is line 3, not line 1
    cr.write_bytes(b"the 1 2 3 4\rcat 1 2 3 4\rdog 1 2 3\r")
    with pytest.raises(ValueError, match=r"vectors: expected 4 numbers after the token, got 3 in "
                                         r".*cr.txt:3"):
        load_vectors(cr, {"the": 0}, dim=4)


# --------------------------------------------------------------------------------------------
# The models' embedding lookup (NOTE [embedding gradient buffers]).

def _native_available() -> bool:
    from packrnn import backend

    return backend.backend_name() == "native"


def _cache_spy(monkeypatch) -> list:
    """Records each (rows, cols) the embedding gradient takes from the native buffer cache."""
    from packrnn import _native

    calls = []
    empty = _native.empty
    monkeypatch.setattr(_native, "empty",
                        lambda rows, cols, dtype: calls.append((rows, cols)) or empty(rows, cols,
                                                                                      dtype))
    return calls


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_embed_matches_nn_embedding_bit_for_bit(padding_idx, dtype, monkeypatch):
    """Rows and table gradient exactly nn.Embedding's (repeated ids, the padding id, a 2-D
    batch), with the gradient taken from the buffer cache where the native backend runs."""
    from packrnn.models import embed

    calls = _cache_spy(monkeypatch)
    torch.manual_seed(0)
    table = nn.Embedding(70_000, 16, padding_idx=padding_idx, dtype=dtype)  # >= 4 MiB
    ids = torch.randint(0, 40, (9, 13))
    ids[0, :4] = 3
    ids[1, :4] = 0
    upstream = torch.randn(9, 13, 16, dtype=dtype)
    got = embed(table, ids)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), table.weight)
    want = table(ids)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), table.weight)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    assert len(calls) == (1 if _native_available() else 0)


def test_embed_second_derivatives_match_nn_embedding():
    """create_graph=True: a gradient penalty through the lookup is nn.Embedding's."""
    from packrnn.models import embed

    torch.manual_seed(0)
    table = nn.Embedding(70_000, 16, padding_idx=2, dtype=torch.float64)
    ids = torch.tensor([[1, 2, 5, 1], [7, 2, 2, 0]])
    results = []
    for lookup in (lambda i: embed(table, i), table):
        out = lookup(ids).tanh().sum()
        (g,) = torch.autograd.grad(out, table.weight, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), table.weight)
        results.append((g.detach(), gg))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(sparse=True), dict(max_norm=1.0),
                                    dict(scale_grad_by_freq=True), dict(num_embeddings=100)],
                         ids=["sparse", "max_norm", "scale_grad_by_freq", "small"])
def test_embed_leaves_other_embeddings_to_nn_embedding(kwargs, monkeypatch):
    from packrnn.models import embed

    calls = _cache_spy(monkeypatch)
    args = dict(num_embeddings=70_000, embedding_dim=16) | kwargs
    table = nn.Embedding(**args)
    ids = torch.tensor([[1, 2, 1]])
    out = embed(table, ids)
    out.sum().backward()
    torch.testing.assert_close(out, table(ids), rtol=0, atol=0)
    assert calls == []
    seen = []
    table = nn.Embedding(70_000, 16)
    table.register_forward_hook(lambda module, args, out: seen.append(out))
    embed(table, ids).sum().backward()
    assert calls == [] and len(seen) == 1  # a hooked embedding is called as a module
