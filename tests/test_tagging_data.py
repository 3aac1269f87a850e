"""Per-token data: CoNLL-U / CoNLL / JSONL tagging readers, LM texts, collate_tokens alignment."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packrnn import pad_packed_sequence, unpack_sequence
from packrnn.data import (IGNORE_INDEX, LabelMap, TaggingDataset, collate_tokens,
                          load_language_modeling, load_tagging, read_conll, read_conllu,
                          read_tagged_jsonl, read_texts)

CONLLU = """# newdoc id = 1
# sent_id = 1
# text = I didn't go.
1\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_
2-3\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_
2\tdid\tdo\tAUX\tVBD\t_\t4\taux\t_\t_
3\tn't\tnot\tPART\tRB\t_\t4\tadvmod\t_\t_
4\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
4.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t0:root\t_
5\t.\t.\tPUNCT\t.\t_\t4\tpunct\t_\t_

# sent_id = 2
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_conllu_skips_comments_ranges_and_empty_nodes(tmp_path):
    p = write(tmp_path, "a.conllu", CONLLU)
    r = read_conllu(p)
    assert r.tokens == [["I", "did", "n't", "go", "."], ["Hi"]]
    assert r.tags == [["PRON", "AUX", "PART", "VERB", "PUNCT"], ["INTJ"]]
    assert r.lines[0] == [4, 6, 7, 8, 10] and r.starts == [1, 12]
    assert read_conllu(p, tagset="xpos").tags[0] == ["PRP", "VBD", "RB", "VB", "."]


def _line(text, n, new):
    lines = text.split("\n")
    lines[n - 1] = new
    return "\n".join(lines)


@pytest.mark.parametrize("line, content, match", [
    (4, "1\tI\tI\tPRON", "expected 10 tab-separated fields (CoNLL-U), got 4"),
    (4, "x\tI\tI\tPRON\tPRP\t_\t3\tnsubj\t_\t_", "expected an integer word ID, a range like 3-4 or an empty node like 5.1, got 'x'"),
    (5, "2-x\tdidn't\t_\t_\t_\t_\t_\t_\t_\t_", "expected an integer word ID, a range like 3-4 or an empty node like 5.1, got '2-x'"),
    (6, "7\tdid\tdo\tAUX\tVBD\t_\t4\taux\t_\t_", "expected word ID 2, got 7"),
    (8, "4\tgo\tgo\t_\tVB\t_\t0\troot\t_\t_", "expected a UPOS tag in column 4, got '_'"),
    (8, "4\t\tgo\tVERB\tVB\t_\t0\troot\t_\t_", "expected a word form in column 2, got an empty field"),
])
def test_conllu_bad_lines_name_file_and_line(tmp_path, line, content, match):
    p = write(tmp_path, "bad.conllu", _line(CONLLU, line, content))
    with pytest.raises(ValueError, match=rf"bad.conllu:{line}: " + _escape(match)):
        read_conllu(p)
    with pytest.warns(UserWarning, match="skipped 1 sentences"):
        r = read_conllu(p, skip_bad_rows=True)
    assert r.tokens == [["Hi"]] and r.skipped[0].line == line


def _escape(s):
    import re

    return re.escape(s)


def test_conllu_xpos_missing_and_whole_file_errors(tmp_path):
    p = write(tmp_path, "x.conllu", CONLLU.replace("\tPRP\t", "\t_\t"))
    with pytest.raises(ValueError, match=r"x.conllu:4: expected a XPOS tag in column 5, got '_'"):
        read_conllu(p, tagset="xpos")
    with pytest.raises(ValueError, match=r"tagset: expected 'upos' or 'xpos', got 'pos'"):
        read_conllu(p, tagset="pos")
    empty = write(tmp_path, "e.conllu", "")
    with pytest.raises(ValueError, match=r"e.conllu: expected a non-empty file"):
        read_conllu(empty)
    only = write(tmp_path, "c.conllu", "# a comment\n\n")
    with pytest.raises(ValueError, match=r"c.conllu: expected at least one sentence, got none"):
        read_conllu(only)
    latin = tmp_path / "l.conllu"
    latin.write_bytes(b"1\tcaf\xe9\t_\tNOUN\t_\t_\t0\troot\t_\t_\n")
    with pytest.raises(ValueError, match=r"l.conllu:1: expected UTF-8 text, got the invalid byte 0xe9"):
        read_conllu(latin)
    with pytest.raises(FileNotFoundError, match="path: expected an existing file"):
        read_conllu(tmp_path / "missing.conllu")


CONLL = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"


def test_conll_columns(tmp_path):
    p = write(tmp_path, "ner.txt", CONLL)
    r = read_conll(p)
    assert r.tokens == [["EU", "rejects"], ["Peter"]] and r.tags == [["B-ORG", "O"], ["B-PER"]]
    assert read_conll(p, tag_column=1).tags == [["NNP", "VBZ"], ["NNP"]]
    tab = write(tmp_path, "t.tsv", "New York\tLOC\n\nx\tO\n")
    assert read_conll(tab, delimiter="\t").tokens == [["New York"], ["x"]]


@pytest.mark.parametrize("text, kw, match", [
    ("EU NNP B-ORG\nrejects VBZ\n", {}, r"c.txt:2: expected 3 columns as on line 1, got 2"),
    ("EU NNP\nrejects\n", {"tag_column": 1}, r"c.txt:2: expected at least 2 columns \(token_column 0, tag_column 1\), got 1"),
    ("EU\tNNP\nx\t\n", {"delimiter": "\t"}, r"c.txt:2: expected a tag in column -1, got an empty field"),
])
def test_conll_bad_lines(tmp_path, text, kw, match):
    p = write(tmp_path, "c.txt", text)
    with pytest.raises(ValueError, match=match):
        read_conll(p, **kw)


def test_tagged_jsonl(tmp_path):
    rows = [{"tokens": ["The", "cat"], "tags": ["DET", "NOUN"]}, {"tokens": [], "tags": []}]
    p = write(tmp_path, "t.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    r = read_tagged_jsonl(p)
    assert r.tokens == [["The", "cat"], []] and r.tags == [["DET", "NOUN"], []]


@pytest.mark.parametrize("line, match", [
    ('{"tokens": ["a"], "tags": ["X"]', r"expected a JSON object, got invalid JSON"),
    ('["a"]', r"expected a JSON object, got a JSON list"),
    ('{"tokens": ["a"]}', r"expected keys \['tokens', 'tags'\], got no 'tags'"),
    ('{"tokens": "a b", "tags": ["X", "Y"]}', r"expected a list of strings under 'tokens'"),
    ('{"tokens": ["a", "b"], "tags": ["X"]}', r"expected as many tags as tokens \(2\), got 1"),
    ('{"tokens": ["a"], "tags": [" "]}', r"expected non-empty tags under 'tags'"),
])
def test_tagged_jsonl_bad_lines(tmp_path, line, match):
    good = '{"tokens": ["b"], "tags": ["Y"]}'
    p = write(tmp_path, "j.jsonl", f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=r"j.jsonl:3: " + match):
        read_tagged_jsonl(p)
    with pytest.warns(UserWarning, match="skipped 1 sentences"):
        assert read_tagged_jsonl(p, skip_bad_rows=True).tokens == [["b"]]


def test_load_tagging_vocabularies_and_unseen_tag(tmp_path):
    train = load_tagging(write(tmp_path, "a.conllu", CONLLU), chars=True, lowercase=True)
    assert train.tag_map.names == ["AUX", "INTJ", "PART", "PRON", "PUNCT", "VERB"]
    assert "i" in train.vocab and "I" not in train.vocab  # words lowercased
    assert "I" in train.char_vocab  # characters keep their case
    words, tags, chars = train[0]
    assert train.vocab.lookup_tokens(words) == ["i", "did", "n't", "go", "."]
    assert train.tag_map.names[int(tags[3])] == "VERB"
    assert [train.char_vocab.lookup_tokens(c) for c in chars][2] == ["n", "'", "t"]
    assert train.lengths == [5, 1]
    test = write(tmp_path, "b.conllu", "1\tHi\t_\tINTJ\t_\t_\t0\troot\t_\t_\n\n"
                                       "1\tNo\t_\tINTJ\t_\t_\t0\troot\t_\t_\n2\t!\t_\tSYM\t_\t_\t1\tp\t_\t_\n")
    with pytest.raises(ValueError, match=r"b.conllu:4: expected a tag seen in training "
                                         r"\['AUX', .*\], got 'SYM'"):
        load_tagging(test, vocab=train.vocab, tag_map=train.tag_map, char_vocab=train.char_vocab)
    with pytest.warns(UserWarning, match="skipped 1 sentences with unknown tags"):
        ds = load_tagging(test, vocab=train.vocab, tag_map=train.tag_map, skip_bad_rows=True)
    assert len(ds) == 1 and len(ds[0]) == 2  # no char vocab: (words, tags)


def test_lm_texts_and_dataset(tmp_path):
    p = write(tmp_path, "t.txt", "hihello\n\nhi\r\n")
    assert read_texts(p).texts == ["hihello", "hi"]
    ds = load_language_modeling(p, level="char")
    v = ds.vocab
    assert v.get_itos()[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    x, y = ds[1]
    assert v.lookup_tokens(x) == ["<bos>", "h", "i"] and v.lookup_tokens(y) == ["h", "i", "<eos>"]
    assert ds.lengths == [8, 3] and ds.num_tokens == 11
    words = load_language_modeling(write(tmp_path, "w.jsonl", '{"t": "a b a"}\n'), "jsonl",
                                   level="word", text_key="t")
    assert words.vocab.lookup_tokens(words[0][1]) == ["a", "b", "a", "<eos>"]
    csv = write(tmp_path, "c.csv", "id,title\n1,ab\n2\n")
    with pytest.raises(ValueError, match=r"c.csv:3: expected 2 columns as in the header, got 1"):
        load_language_modeling(csv, "csv", text_column="title")
    with pytest.raises(ValueError, match=r"level: expected one of char, word, got 'byte'"):
        load_language_modeling(p, level="byte")


# -- collate_tokens: targets aligned with inputs --------------------------------------------------


def _items(r: random.Random, n: int, with_chars: bool):
    items = []
    for _ in range(n):
        length = r.choice([0, 0, 1, 2, 5, 9])
        ids = [r.randrange(2, 50) for _ in range(length)]
        tags = [i * 7 % 13 for i in ids]  # a function of the id: alignment is checkable
        if with_chars:
            items.append((ids, tags, [[i % 5 + 1] * (i % 4) for i in ids]))
        else:
            items.append((ids, tags))
    return items


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7), with_chars=st.booleans())
def test_packed_targets_and_chars_stay_aligned(seed, n, with_chars):
    items = _items(random.Random(seed), n, with_chars)
    b = collate_tokens(items, packed=True)
    assert torch.equal(b.targets.data, b.inputs.data * 7 % 13)  # row for row
    assert torch.equal(b.targets.batch_sizes, b.inputs.batch_sizes)
    assert [x.tolist() for x in unpack_sequence(b.inputs)] == [list(it[0]) for it in items]
    assert [x.tolist() for x in unpack_sequence(b.targets)] == [list(it[1]) for it in items]
    if with_chars:
        words = [] if b.chars.lengths.numel() == 0 else unpack_sequence(b.chars.inputs)
        assert [w.tolist() for w in words] == [[i % 5 + 1] * (i % 4) for i in b.inputs.data.tolist()]
    p = collate_tokens(items, batch_first=True, padding_value=0)
    mask = torch.arange(p.inputs.shape[1])[None, :] < p.lengths[:, None]  # (B, T)
    assert torch.equal(p.targets[mask], p.inputs[mask] * 7 % 13)
    assert bool((p.targets[~mask] == IGNORE_INDEX).all())
    if with_chars and p.chars.inputs.numel():  # words in sentence order, padded
        firsts = p.chars.inputs[:, 0][p.chars.lengths > 0]
        want = torch.tensor([i % 5 + 1 for i in p.inputs[mask].tolist() if i % 4])
        assert torch.equal(firsts, want)
    if b.inputs.data.numel():
        padded, lengths = pad_packed_sequence(b.targets, batch_first=True, padding_value=IGNORE_INDEX)
        assert torch.equal(padded, p.targets) and torch.equal(lengths, p.lengths)


def test_collate_tokens_errors():
    with pytest.raises(ValueError, match=r"batch: expected a non-empty list of \(ids, targets\) items"):
        collate_tokens([])
    with pytest.raises(ValueError, match=r"batch\[0\]: expected 1-D ids \(L,\) and targets of the "
                                         r"same shape, got \(2,\) and \(1,\)"):
        collate_tokens([([1, 2], [3])])
    with pytest.raises(ValueError, match=r"batch\[1\]: expected an \(ids, targets\) pair like batch\[0\]"):
        collate_tokens([([1], [2]), ([1], [2], [[3]])])
    with pytest.raises(ValueError, match=r"batch\[0\]: expected the characters of each of the 2 "
                                         r"words, got 1 words"):
        collate_tokens([([1, 2], [3, 4], [[5]])])


def test_tagging_dataset_checks():
    with pytest.raises(ValueError, match=r"tags\[0\]: expected 2 tags \(one per word\), got 1"):
        TaggingDataset([[1, 2]], [[0]])
    with pytest.raises(ValueError, match=r"tags: expected tag indices in \[0, 1\), got 3"):
        TaggingDataset([[1]], [[3]], tag_map=LabelMap(["X"]))


@pytest.mark.parametrize("end", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_readers_take_windows_and_old_mac_line_ends(tmp_path, end):
    """The same tokens, tags and line numbers as with \\n (the readers split lines as the text
    classification readers do)."""
    want = read_conllu(write(tmp_path, "lf.conllu", CONLLU))
    got = read_conllu(write(tmp_path, "x.conllu", CONLLU.replace("\n", end)))
    assert (got.tokens, got.tags, got.lines, got.starts) == \
        (want.tokens, want.tags, want.lines, want.starts)
    bad = write(tmp_path, "j.jsonl", end.join(['{"tokens": ["b"], "tags": ["Y"]}', "", "["]) + end)
    with pytest.raises(ValueError, match=r"j.jsonl:3: expected a JSON object"):
        read_tagged_jsonl(bad)
    assert read_texts(write(tmp_path, "t.txt", f"hihello{end}{end}hi{end}")).texts == \
        ["hihello", "hi"]
