"""Parsing AG News / CSV / TSV / JSONL files, encoding, and every bad-input path (tiny temp files)."""

import json
import warnings

import pytest
import torch

from packrnn.data import (
    AG_NEWS_LABELS,
    LabelMap,
    TextClassificationDataset,
    build_vocab_from_iterator,
    load_text_classification,
    read_agnews,
    read_csv,
    read_jsonl,
    read_records,
)

AGNEWS = (
    '"3","Wall St. Bears Claw Back (Reuters)","Reuters - Short-sellers, Wall Street\'s band."\n'
    '"4","Mars Rovers","NASA\'s rovers ""relay"" images,\nacross two lines."\n'
    '"1","Empty","!!!"\n'
    '"2","Phelps","Gold!"\n'
)


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return str(path)


def test_read_agnews(tmp_path):
    rec = read_agnews(write(tmp_path, "ag.csv", AGNEWS))
    assert rec.labels == ["Business", "Sci/Tech", "World", "Sports"]
    assert rec.texts[0] == "Wall St. Bears Claw Back (Reuters) Reuters - Short-sellers, Wall Street's band."
    assert rec.texts[1] == 'Mars Rovers NASA\'s rovers "relay" images,\nacross two lines.'
    assert rec.lines == [1, 2, 4, 5]  # the quoted newline makes record 2 span lines 2-3
    assert rec.skipped == []


def test_agnews_dataset_end_to_end(tmp_path):
    path = write(tmp_path, "ag.csv", AGNEWS)
    ds = load_text_classification(path, format="agnews", progress=False)
    assert ds.label_map.names == list(AG_NEWS_LABELS)
    assert [y for _, y in ds] == [2, 3, 0, 1]
    ids, label = ds[0]
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ds.vocab.lookup_tokens(ids)[:5] == ["wall", "st", ".", "bears", "claw"]
    assert ds.lengths == [len(ds[i][0]) for i in range(len(ds))]
    assert ds.num_tokens == sum(ds.lengths)
    # evaluation data reuses the vocabulary; unknown words map to <unk>
    test_path = write(tmp_path, "test.csv", '"2","Quidditch","Zzyzx wins"\n')
    test = load_text_classification(path=test_path, vocab=ds.vocab, label_map=ds.label_map)
    assert test.vocab is ds.vocab
    assert test[0][0].tolist() == [ds.vocab.unk_index] * 3 and test[0][1] == 1


def test_text_with_no_tokens_is_a_zero_length_sequence(tmp_path):
    path = write(tmp_path, "ag.csv", '"1","",""\n"2","a","b"\n')
    ds = load_text_classification(path, tokenizer=lambda s: s.split())
    assert ds.lengths == [0, 2]
    assert ds[0][0].shape == (0,) and ds[0][0].dtype == torch.int64


def test_read_csv_with_header_and_string_labels(tmp_path):
    path = write(tmp_path, "d.csv", 'id,title,body,label\n1,Hello,"World, again",pos\n2,Bye,now,neg\n\n3,x,y,pos\n')
    rec = read_csv(path, text_column=["title", "body"], label_column="label")
    assert rec.texts == ["Hello World, again", "Bye now", "x y"]
    assert rec.labels == ["pos", "neg", "pos"]
    assert rec.lines == [2, 3, 5]
    ds = load_text_classification(path, "csv", text_column=["title", "body"])
    assert ds.label_map.names == ["neg", "pos"]
    assert ds.labels == [1, 0, 1]


def test_integer_labels_sort_numerically(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\na,10\nb,2\nc,1\n")
    ds = load_text_classification(path, "csv")
    assert ds.label_map.names == ["1", "2", "10"]
    assert ds.labels == [2, 1, 0]


def test_read_tsv_reads_fields_verbatim(tmp_path):
    path = write(tmp_path, "d.tsv", 'sentence\tlabel\nit\'s "great\t1\nbad , "movie"\t0\n')
    rec = read_records(path, "tsv", text_column="sentence")
    assert rec.texts == ['it\'s "great', 'bad , "movie"']
    assert rec.labels == ["1", "0"]


def test_read_jsonl(tmp_path):
    lines = [
        json.dumps({"text": "Hello there", "label": 1}),
        "",
        json.dumps({"text": "Général Kenobi", "label": "1", "extra": [1, 2]}),
        json.dumps({"text": "x", "label": 0}),
    ]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    rec = read_jsonl(path)
    assert rec.texts == ["Hello there", "Général Kenobi", "x"]
    assert rec.labels == ["1", "1", "0"]
    assert rec.lines == [1, 3, 4]
    ds = load_text_classification(path, "jsonl")
    assert ds.label_map.names == ["0", "1"] and ds.labels == [1, 1, 0]
    rec = read_jsonl(write(tmp_path, "k.jsonl", '{"q": "a", "t": "b", "y": "c"}\n'), text_key=["q", "t"], label_key="y")
    assert rec.texts == ["a b"] and rec.labels == ["c"]


def test_utf8_bom_is_ignored(tmp_path):
    path = write(tmp_path, "d.csv", "\ufefftext,label\nhi,a\n".encode("utf-8"))
    assert read_csv(path).texts == ["hi"]


# --- bad input: every error names the file and the line; skip_bad_rows counts and reports ---

BAD_ROWS = [
    # (format, content, line, message)
    ("agnews", '"1","a","b"\n"2","only two"\n', 2, r"expected 3 columns \(label, title, description\), got 2"),
    ("agnews", '"1","a","b"\n"5","a","b"\n', 2, r"expected a label 1-4 in the first column, got '5'"),
    ("agnews", '"1","a","b"\n"x"y,"a","b"\n', 2, r"expected a valid CSV row, got a parse error"),
    ("csv", "text,label\na,1\nb,1,extra\n", 3, r"expected 2 columns as in the header, got 3"),
    ("csv", "text,label\na,1\nb,\n", 3, r"expected a label in column 'label', got an empty field"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "a", "label": 1\n', 2, r"expected a JSON object, got invalid JSON"),
    ("jsonl", '{"text": "a", "label": 1}\n[1, 2]\n', 2, r"expected a JSON object, got a JSON list"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', 2, r"expected keys \['text', 'label'\], got no 'label'"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": 5, "label": 1}\n', 2, r"expected a string under 'text', got int"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1.5}\n', 2, r"expected a non-empty string or integer label"),
    ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": true}\n', 2, r"expected a non-empty string or integer label"),
]


@pytest.mark.parametrize("fmt, content, line, message", BAD_ROWS)
def test_bad_row_errors_name_file_and_line(tmp_path, fmt, content, line, message):
    path = write(tmp_path, "bad.txt", content)
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}: {message}"):
        read_records(path, fmt)
    with pytest.warns(UserWarning, match=r"bad\.txt: skipped 1 bad rows"):
        ds = load_text_classification(path, fmt, skip_bad_rows=True)
    assert len(ds) == 1 and len(ds.skipped) == 1
    assert ds.skipped[0].line == line and str(ds.skipped[0]).startswith(f"{path}:{line}: ")


def test_non_utf8_bytes(tmp_path):
    content = '"1","ok","fine"\n"2","bad \xff byte","x"\n"3","ok","again"\n'.encode("latin-1")
    path = write(tmp_path, "bin.csv", content)
    with pytest.raises(ValueError, match=r"bin\.csv:2: expected UTF-8 text, got the invalid byte 0xff"):
        read_agnews(path)
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        rec = read_agnews(path, skip_bad_rows=True)
    assert rec.labels == ["World", "Business"] and rec.skipped[0].line == 2
    jsonl = write(tmp_path, "bin.jsonl", b'{"text": "a", "label": 1}\n{"text": "\xc3\x28", "label": 1}\n')
    with pytest.raises(ValueError, match=r"bin\.jsonl:2: expected UTF-8 text, got the invalid byte 0xc3"):
        read_jsonl(jsonl)


@pytest.mark.parametrize("fmt", ["agnews", "csv", "tsv", "jsonl"])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, fmt, content):
    path = write(tmp_path, "empty.txt", content)
    with pytest.raises(ValueError, match=r"empty\.txt: expected a non-empty file, got an empty file"):
        load_text_classification(path, fmt, skip_bad_rows=True)


def test_whole_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path: expected an existing file, got '.*missing.csv'"):
        read_agnews(tmp_path / "missing.csv")
    header_only = write(tmp_path, "h.csv", "text,label\n")
    with pytest.raises(ValueError, match=r"h\.csv: expected at least one data row, got none"):
        read_csv(header_only)
    path = write(tmp_path, "c.csv", "body,label\na,1\n")
    with pytest.raises(ValueError, match=r"c\.csv:1: expected a column 'text' in the header \['body', 'label'\], got no such column"):
        read_csv(path)
    dup = write(tmp_path, "dup.csv", "text,text,label\na,b,1\n")
    with pytest.raises(ValueError, match="expected a column 'text' in the header .*, got twice"):
        read_csv(dup)
    all_bad = write(tmp_path, "allbad.csv", '"9","a","b"\n')
    with pytest.raises(ValueError, match=r"allbad\.csv: expected at least one data row, got none \(1 bad rows skipped; first: .*:1: expected a label 1-4"):
        read_agnews(all_bad, skip_bad_rows=True)
    with pytest.raises(ValueError, match=r"format: expected one of \['agnews', 'csv', 'tsv', 'jsonl'\], got 'xml'"):
        read_records(path, "xml")
    with pytest.raises(TypeError, match="text_column: expected a column name"):
        read_csv(path, text_column=3)


def test_label_unseen_in_training(tmp_path):
    train = load_text_classification(write(tmp_path, "tr.csv", "text,label\na,x\nb,y\n"), "csv")
    test_path = write(tmp_path, "te.csv", "text,label\na,x\nb,z\nc,y\n")
    with pytest.raises(ValueError, match=r"te\.csv:3: expected a label seen in training \['x', 'y'\], got 'z'"):
        load_text_classification(test_path, "csv", vocab=train.vocab, label_map=train.label_map)
    with pytest.warns(UserWarning, match="skipped 1 rows with unknown labels"):
        test = load_text_classification(test_path, "csv", vocab=train.vocab, label_map=train.label_map, skip_bad_rows=True)
    assert test.labels == [0, 1] and test.skipped[0].line == 3


def test_label_map():
    m = LabelMap.from_labels(["b", "a", "b", " a "])
    assert m.names == ["a", "b"] and len(m) == 2
    assert m.encode("b") == 1 and m.decode(0) == "a" and "a" in m and "c" not in m
    assert LabelMap.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    with pytest.raises(KeyError, match=r"label: expected one of \['a', 'b'\], got 'c'"):
        m.encode("c")
    with pytest.raises(ValueError, match="names: expected unique labels, got 'a' twice"):
        LabelMap(["a", "a"])
    with pytest.raises(ValueError, match="state: expected a dict from LabelMap.to_dict()"):
        LabelMap.from_dict({"names": ["a"]})


def test_dataset_constructor():
    ds = TextClassificationDataset([[1, 2], torch.tensor([3]), []], [0, 1, 0])
    assert [(x.tolist(), y) for x, y in ds] == [([1, 2], 0), ([3], 1), ([], 0)]
    with pytest.raises(ValueError, match=r"labels: expected one label per sequence \(3\), got 2"):
        TextClassificationDataset([[1], [2], [3]], [0, 1])
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 1\), got 1"):
        TextClassificationDataset([[1], [2]], [0, 1], label_map=LabelMap(["a"]))


def test_progress_bar_on_request(tmp_path, capsys):
    path = write(tmp_path, "ag.csv", AGNEWS)
    load_text_classification(path, progress=True)
    assert "tokenizing ag.csv" in capsys.readouterr().err
    load_text_classification(path)  # small file: no bar by default
    assert "tokenizing" not in capsys.readouterr().err


def test_no_warning_without_bad_rows(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_text_classification(write(tmp_path, "ag.csv", AGNEWS), skip_bad_rows=True)


def test_vocab_options_pass_through(tmp_path):
    path = write(tmp_path, "d.csv", "text,label\na a a b b c,1\n")
    ds = load_text_classification(path, "csv", min_freq=2)
    assert ds.vocab.get_itos() == ["<pad>", "<unk>", "a", "b"]
    vocab = build_vocab_from_iterator([["c"]])
    assert load_text_classification(path, "csv", vocab=vocab).vocab is vocab


@pytest.mark.parametrize("newline", ["\r", "\r\n"])
@pytest.mark.parametrize("fmt, content, line, message", BAD_ROWS)
def test_bad_rows_name_the_real_line_with_cr_line_ends(tmp_path, newline, fmt, content, line, message):
    # old Mac (CR only) and Windows (CRLF) line ends: the same line numbers as with LF
    path = write(tmp_path, "bad.txt", content.replace("\n", newline))
    with pytest.raises(ValueError, match=rf"bad\.txt:{line}: {message}"):
        read_records(path, fmt)


@pytest.mark.parametrize("newline", ["\r", "\r\n"])
def test_non_utf8_bytes_with_cr_line_ends(tmp_path, newline):
    content = f'"1","ok","fine"{newline}"2","ok","x"{newline}"3","bad \xff byte","x"{newline}'
    path = write(tmp_path, "bin.csv", content.encode("latin-1"))
    with pytest.raises(ValueError, match=r"bin\.csv:3: expected UTF-8 text, got the invalid byte 0xff"):
        read_agnews(path)
    jsonl = write(tmp_path, "bin.jsonl", newline.join(['{"text": "a", "label": 1}', '{"text": "b", "label": 1}',
                                                        '{"text": "\xff", "label": 1}']).encode("latin-1"))
    with pytest.raises(ValueError, match=r"bin\.jsonl:3: expected UTF-8 text, got the invalid byte 0xff"):
        read_jsonl(jsonl)
    with pytest.warns(UserWarning, match=r"skipped 1 bad rows \(first: line 3"):
        assert read_jsonl(jsonl, skip_bad_rows=True).lines == [1, 2]
