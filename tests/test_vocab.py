import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrnn.data import Vocab, build_vocab_from_iterator


def test_order_specials_frequency_then_alphabetical():
    v = build_vocab_from_iterator([["b", "a", "c"], ["a", "b"], ["d", "c", "a"]])
    # counts: a 3, b 2, c 2, d 1 -> ties (b, c) alphabetical
    assert v.get_itos() == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert v.pad_index == 0 and v.unk_index == 1
    assert v(["a", "zzz", "d"]) == [2, 1, 5]
    assert v["zzz"] == 1 and v["c"] == 4
    assert v.lookup_tokens([2, 5]) == ["a", "d"]
    assert v.lookup_token(0) == "<pad>"
    assert "a" in v and "zzz" not in v
    assert len(v) == 6


def test_order_independent_of_data_order():
    texts = [["x", "y"], ["y", "z", "w"], ["w"]]
    assert build_vocab_from_iterator(texts) == build_vocab_from_iterator(texts[::-1])


def test_min_freq_max_size_and_specials():
    texts = [["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"]]
    assert build_vocab_from_iterator(texts, min_freq=3).get_itos() == ["<pad>", "<unk>", "a", "b", "c"]
    assert build_vocab_from_iterator(texts, max_size=4).get_itos() == ["<pad>", "<unk>", "a", "b"]
    assert len(build_vocab_from_iterator(texts, max_size=2)) == 2
    # a special that occurs in the data is not duplicated
    v = build_vocab_from_iterator([["<unk>", "q"]], specials=["<pad>", "<unk>", "<bos>"])
    assert v.get_itos() == ["<pad>", "<unk>", "<bos>", "q"]
    # no unk token: unknown lookups raise
    v = build_vocab_from_iterator([["a"]], specials=["<pad>"], unk_token=None)
    assert v.unk_index is None
    with pytest.raises(KeyError, match="'b' is not in the vocabulary"):
        v["b"]
    with pytest.raises(KeyError, match="'b' is not in the vocabulary"):
        v(["a", "b"])
    # any iterable of tokens, a one-pass generator too, names the unknown token
    with pytest.raises(KeyError, match="'b' is not in the vocabulary"):
        v(t for t in ["a", "b"])
    assert v(t for t in ["a"]) == [v["a"]]


def test_empty_iterator_gives_specials_only():
    v = build_vocab_from_iterator(iter([]))
    assert v.get_itos() == ["<pad>", "<unk>"]
    assert v([]) == []


@given(st.lists(st.lists(st.text(min_size=1, max_size=4), max_size=8), max_size=8),
       st.integers(1, 3), st.one_of(st.none(), st.integers(2, 10)))
@settings(max_examples=100, deadline=None)
def test_round_trips(texts, min_freq, max_size):
    v = build_vocab_from_iterator(texts, min_freq=min_freq, max_size=max_size)
    state = v.to_dict()
    assert json.loads(json.dumps(state)) == state  # plain JSON-able
    w = Vocab.from_dict(json.loads(json.dumps(state)))
    assert w == v and w.get_itos() == v.get_itos() and w.get_stoi() == v.get_stoi()
    for i in range(len(v)):
        assert v[v.lookup_token(i)] == i
    if max_size is not None:
        assert len(v) <= max_size
    # every kept token is at least min_freq frequent and frequencies never increase
    counts = {}
    for t in texts:
        for tok in t:
            counts[tok] = counts.get(tok, 0) + 1
    kept = v.get_itos()[2:]
    assert all(counts[t] >= min_freq for t in kept)
    assert [counts[t] for t in kept] == sorted((counts[t] for t in kept), reverse=True)
    for tokens in texts:
        ids = v(tokens)
        assert all(v.lookup_token(i) == tok for i, tok in zip(ids, tokens) if tok in v)
        assert all(i == v.unk_index for i, tok in zip(ids, tokens) if tok not in v)


def test_save_load_file(tmp_path):
    v = build_vocab_from_iterator([["héllo", "wörld", "héllo"]])
    path = tmp_path / "vocab.json"
    v.save(path)
    assert Vocab.load(path) == v
    assert json.loads(path.read_text(encoding="utf-8"))["tokens"][2] == "héllo"


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="min_freq: expected an int >= 1, got 0"):
        build_vocab_from_iterator([], min_freq=0)
    with pytest.raises(ValueError, match=r"max_size: expected None or an int >= len\(specials\) = 2, got 1"):
        build_vocab_from_iterator([], max_size=1)
    with pytest.raises(TypeError, match="iterator: expected lists of tokens, got a str at item 0"):
        build_vocab_from_iterator(["abc"])
    with pytest.raises(ValueError, match="tokens: expected unique tokens, got 'a' at 0 and 1"):
        Vocab(["a", "a"], pad_token=None, unk_token=None)
    with pytest.raises(ValueError, match="unk_token: expected a token of the vocabulary or None, got '<unk>'"):
        Vocab(["<pad>", "a"])
    with pytest.raises(TypeError, match="tokens: expected a list of str, got a str"):
        Vocab(["<pad>", "<unk>"])("abc")
    with pytest.raises(IndexError, match=r"index: expected 0 <= index < 2, got 2"):
        Vocab(["<pad>", "<unk>"]).lookup_token(2)
    with pytest.raises(ValueError, match=r"state\['format'\]: expected 'packrnn.vocab/1', got None"):
        Vocab.from_dict({"tokens": []})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: expected a JSON vocabulary file, got invalid JSON"):
        Vocab.load(bad)
