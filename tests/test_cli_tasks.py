"""`packrnn train --task tag|lm`, evaluate, predict (tagger), generate, and the hihello demo."""

from __future__ import annotations

import io
import json
import sys

import pytest

from packrnn.cli import main
from test_cli import one_error_line
from test_tasks import write_lm, write_tagging

FAST = ["--no-progress", "--no-plot", "--threads", "1", "--embed-dim", "16", "--hidden-size", "16",
        "--epochs", "3", "--lr", "0.01"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_tasks")
    tag_train, tag_test = write_tagging(d / "t.jsonl", 160, 0), write_tagging(d / "v.jsonl", 40, 1)
    lm_train, lm_test = write_lm(d / "t.txt", 160, 0), write_lm(d / "v.txt", 40, 1)
    assert main(["train", "--task", "tag", "--format", "jsonl", "--train", str(tag_train),
                 "--test", str(tag_test), "--model", "lstm", "--bidirectional",
                 "--char-features", "--output", str(d / "tag"), *FAST]) == 0
    assert main(["train", "--task", "lm", "--train", str(lm_train), "--model", "gru",
                 "--tie-weights", "--output", str(d / "lm"), *FAST]) == 0  # --format text default
    return d, tag_test, lm_test


def test_train_tag_writes_its_config(runs):
    d, _, _ = runs
    cfg = json.loads((d / "tag" / "config.json").read_text())
    assert (cfg["task"], cfg["format"], cfg["char_features"], cfg["bidirectional"]) == \
        ("tag", "jsonl", True, True)
    assert json.loads((d / "lm" / "config.json").read_text())["format"] == "text"


def test_evaluate_tagger_and_lm(runs, capsys):
    d, tag_test, lm_test = runs
    capsys.readouterr()
    assert main(["evaluate", str(d / "tag"), "--data", str(tag_test)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("token accuracy ") and "macro F1" in text
    assert "precision  recall      F1  support" in text
    for tag in ("ADJ", "DET", "NOUN", "VERB"):
        assert f"\n{tag} " in text
    assert main(["evaluate", str(d / "tag"), "--data", str(tag_test), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert f"token accuracy {r['accuracy']:.4f} on {r['count']} tokens" in text
    assert main(["evaluate", str(d / "lm"), "--data", str(lm_test)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("loss ") and "bits per char" in line and "perplexity" in line


def test_evaluate_tagger_prints_loss_and_macro_averages(runs, capsys):
    d, tag_test, _ = runs
    capsys.readouterr()
    assert main(["evaluate", str(d / "tag"), "--data", str(tag_test), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(d / "tag"), "--data", str(tag_test)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"token accuracy {r['accuracy']:.4f} on {r['count']} tokens, loss "
                           f"{r['loss']:.4f}, macro F1 {r['macro_f1']:.4f}\n")
    m = r["macro"]
    assert f"\nmacro avg     {m['precision']:.4f}  {m['recall']:.4f}  {m['f1']:.4f}  " \
           f"{r['count']:>7}\n" in text


def test_predict_tags_one_token_per_line(runs, capsys, monkeypatch):
    d, _, _ = runs
    capsys.readouterr()
    assert main(["predict", str(d / "tag"), "the big cat sees", "a dog"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")
    assert [line.split("\t")[0] for line in blocks[0].splitlines()] == ["the", "big", "cat", "sees"]
    assert blocks[0].splitlines()[0] == "the\tDET"
    assert [line.split("\t")[0] for line in blocks[1].splitlines()] == ["a", "dog"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("every fish runs\n"))
    assert main(["predict", str(d / "tag"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["tokens"] == ["every", "fish", "runs"] and len(row["tags"]) == 3
    assert main(["predict", str(d / "lm"), "hello"]) == 2
    assert "got task 'lm' (use generate" in one_error_line(capsys.readouterr().err)


def test_generate(runs, capsys):
    d, _, _ = runs
    capsys.readouterr()
    assert main(["generate", str(d / "lm"), "he", "--max-new", "20", "--seed", "1",
                 "--samples", "3", "--top-k", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(x.startswith("he") and len(x) <= 22 for x in lines)
    assert main(["generate", str(d / "lm"), "he", "--max-new", "20", "--seed", "1",
                 "--top-k", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == lines[:1]  # same seed, same text
    assert main(["generate", str(d / "tag"), "x"]) == 2
    assert "run: expected a run of task 'lm', got task 'tag'" in \
        one_error_line(capsys.readouterr().err)


def test_task_flag_errors(tmp_path, capsys):
    assert main(["train", "--task", "tag", "--train", "x", "--model", "lstm", "--output",
                 str(tmp_path / "o"), "--format", "agnews"]) == 2
    assert "format: expected one of conllu, conll, jsonl for task 'tag', got 'agnews'" in \
        one_error_line(capsys.readouterr().err)
    assert main(["train", "--train", "x", "--model", "lstm", "--output", str(tmp_path / "o"),
                 "--char-features"]) == 2
    assert "char_features: expected only with task 'tag', got task 'classify'" in \
        one_error_line(capsys.readouterr().err)


def test_hihello_learns_and_generates(capsys):
    from packrnn.demo import hihello

    assert hihello() == "hihello"
    out = capsys.readouterr().out
    assert "predicted 'ihello'" in out and "carrying the hidden state: 'hihello'" in out
