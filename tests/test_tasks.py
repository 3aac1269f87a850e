"""train() for the per-token tasks: a tiny tagger and a tiny LM learn, resume after a kill is
exact, evaluate/predict/generate, config checks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from packrnn.checkpoint import load_checkpoint
from packrnn.train import TrainConfig, evaluate, generate, load_run, predict, train
from test_train import Killed, _kill_at

DET, ADJ, NOUN, VERB = ["the", "a", "every"], ["big", "red", "old"], ["cat", "dog", "fish"], \
    ["sees", "likes", "runs"]


def write_tagging(path: Path, n: int, seed: int) -> Path:
    """Sentences DET (ADJ) NOUN VERB ...; "runs" is a NOUN after a DET, a VERB otherwise."""
    r = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            toks, tags = [], []
            for _ in range(r.randint(0, 3)):  # zero-length sentences too
                toks.append(r.choice(DET))
                tags.append("DET")
                if r.random() < 0.5:
                    toks.append(r.choice(ADJ))
                    tags.append("ADJ")
                toks.append(r.choice(NOUN + ["runs"]))
                tags.append("NOUN")
                toks.append(r.choice(VERB))
                tags.append("VERB")
            f.write(json.dumps({"tokens": toks, "tags": tags}) + "\n")
    return path


def write_lm(path: Path, n: int, seed: int) -> Path:
    r = random.Random(seed)
    words = ["hello", "hi", "hihello", "help", "ohio"]
    path.write_text("".join(" ".join(r.choice(words) for _ in range(r.randint(1, 3))) + "\n"
                            for _ in range(n)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    return {"tag": (write_tagging(d / "train.jsonl", 160, 0), write_tagging(d / "test.jsonl", 40, 1)),
            "lm": (write_lm(d / "train.txt", 160, 0), write_lm(d / "test.txt", 40, 1))}


def config(data, task, out, **kw) -> TrainConfig:
    train_path, test_path = data[task]
    base = dict(train_path=str(train_path), test_path=str(test_path), output=str(out), task=task,
                format="jsonl" if task == "tag" else "text", batch_size=16, epochs=2,
                lr=0.01, progress=False, plot=False, embed_dim=16, hidden_size=16, threads=1)
    if task == "tag":
        base.update(bidirectional=True, char_features=True, char_embed_dim=8, char_hidden_size=8)
    base.update(kw)
    return TrainConfig(**base)


def test_tagger_learns(data, tmp_path):
    metrics = train(config(data, "tag", tmp_path / "run", epochs=3, plot=True))
    assert metrics[-1].train_loss < metrics[0].train_loss / 2
    assert metrics[-1].test_accuracy > 0.9  # 4 tags; the majority tag is < 0.4
    assert metrics[0].samples == sum(len(json.loads(x)["tokens"]) for x in
                                     open(data["tag"][0]))  # counted in tokens
    result = evaluate(tmp_path / "run", data["tag"][1])
    assert result["labels"] == ["ADJ", "DET", "NOUN", "VERB"]
    confusion = torch.tensor(result["confusion"])
    assert result["accuracy"] == pytest.approx(float(confusion.diagonal().sum() / confusion.sum()))
    assert result["accuracy"] == pytest.approx(metrics[-1].test_accuracy)
    for i, f1 in enumerate(result["f1"]):
        p, r = result["precision"][i], result["recall"][i]
        assert f1 == pytest.approx(2 * p * r / (p + r))
    assert result["macro_f1"] == pytest.approx(sum(result["f1"]) / 4)
    preds = predict(tmp_path / "run", ["the big runs sees", ["a", "zebra", "runs"], ""])
    assert preds[0]["tags"] == ["DET", "ADJ", "NOUN", "VERB"]
    assert preds[1]["tokens"] == ["a", "zebra", "runs"] and preds[1]["tags"][0] == "DET"
    assert preds[2] == {"tokens": [], "tags": [], "probabilities": []}


@pytest.mark.parametrize("task", ["tag", "lm"])
def test_test_loss_is_the_tasks_evaluation_loss(data, tmp_path, task):
    from packrnn.train import _run_title

    cfg = config(data, task, tmp_path / task, epochs=1)
    metrics = train(cfg)
    result = evaluate(tmp_path / task, data[task][1])
    assert metrics[0].test_loss == pytest.approx(result["loss"], rel=1e-6)
    saved = json.loads((tmp_path / task / "metrics.json").read_text())
    assert saved[0]["test_loss"] == metrics[0].test_loss
    if task == "tag":  # the classifier's macro averages, over the tags that occur
        f1 = [f for f in result["f1"] if f is not None]
        assert result["macro"]["f1"] == pytest.approx(sum(f1) / len(f1)) == result["macro_f1"]
        precision = [p or 0.0 for p, f in zip(result["precision"], result["f1"]) if f is not None]
        assert result["macro"]["precision"] == pytest.approx(sum(precision) / len(precision))
        assert _run_title(cfg) == f"bidirectional LSTM 16 tagger, character features ({cfg.output})"
    else:
        assert _run_title(cfg) == f"LSTM 16 character-level language model ({cfg.output})"


def test_lm_learns_and_generates(data, tmp_path):
    out = tmp_path / "lm"
    metrics = train(config(data, "lm", out, epochs=3, tie_weights=True))
    assert metrics[-1].train_loss < metrics[0].train_loss * 0.8
    result = evaluate(out, data["lm"][1])
    assert result["bits_per_char"] == pytest.approx(result["loss"] / 0.6931471805599453)
    assert result["perplexity"] == pytest.approx(2 ** result["bits_per_char"])
    assert result["bits_per_char"] < 2.2  # 10 symbols: log2(10) = 3.3 bits for a uniform guess
    text = generate(out, "he", max_new=30, seed=0)
    assert text.startswith("he") and len(text) <= 32
    assert set(text) <= set("helopi ")  # only characters of the training texts
    assert generate(out, "he", max_new=30, seed=0) == text
    with pytest.raises(ValueError, match=r"predict: expected a run of task 'classify' or 'tag', "
                                         r"got task 'lm' \(use generate"):
        predict(out, ["hello"])


@pytest.mark.parametrize("task, execution", [("tag", "packed"), ("lm", "packed"), ("tag", "padded")])
def test_resume_after_kill_is_exact(data, tmp_path, task, execution):
    # 160 sentences / 16 = 10 batches per epoch; checkpoints every 3 steps; killed at step 14.
    kw = dict(checkpoint_every_steps=3, dropout=0.2, embed_dropout=0.1, num_layers=2,
              lr_decay=0.5, execution=execution)
    straight = train(config(data, task, tmp_path / "straight", **kw))
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config(data, task, out, **kw), on_step=_kill_at(14))
    assert load_checkpoint(out)["step"] == 12
    resumed = train(config(data, task, out, resume=True, **kw))
    assert [(m.train_loss, m.train_accuracy, m.test_accuracy) for m in resumed] == \
        [(m.train_loss, m.train_accuracy, m.test_accuracy) for m in straight]
    wa, wb = (load_checkpoint(p)["model_state"] for p in (tmp_path / "straight", out))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_unseen_tag_at_evaluation_is_a_clear_error(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, "tag", out, epochs=1, char_features=False))
    assert load_run(out).char_vocab is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["the", "cat"], "tags": ["DET", "NOUN"]}\n'
                   '{"tokens": ["wow"], "tags": ["INTJ"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a tag seen in training "
                                         r"\['ADJ', 'DET', 'NOUN', 'VERB'\], got 'INTJ'"):
        evaluate(out, bad)
    assert evaluate(out, bad, skip_bad_rows=True)["count"] == 2


def test_conllu_training_file(tmp_path):
    from test_tagging_data import CONLLU

    path = tmp_path / "t.conllu"
    path.write_text((CONLLU + "\n") * 4, encoding="utf-8")
    m = train(TrainConfig(train_path=str(path), output=str(tmp_path / "run"), task="tag",
                          format="conllu", tagset="xpos", epochs=1, progress=False, plot=False,
                          embed_dim=8, hidden_size=8, threads=1))
    assert m[0].samples == 24  # 6 words per copy: the range 2-3 and the empty node 4.1 skipped
    assert "PRP" in load_run(tmp_path / "run").labels


@pytest.mark.parametrize("kw, match", [
    (dict(task="ner"), r"task: expected one of classify, tag, lm, got 'ner'"),
    (dict(task="tag", format="agnews"), r"format: expected one of conllu, conll, jsonl for task "
                                        r"'tag', got 'agnews'"),
    (dict(task="lm", format="conllu"), r"format: expected one of text, agnews, csv, tsv, jsonl "
                                       r"for task 'lm', got 'conllu'"),
    (dict(char_features=True), r"char_features: expected only with task 'tag', got task 'classify'"),
    (dict(task="lm", format="text", bidirectional=True),
     r"bidirectional: expected only with task 'classify' or 'tag', got task 'lm'"),
    (dict(task="tag", format="conllu", pooling="max"),
     r"pooling: expected only with task 'classify', got task 'tag'"),
    (dict(task="lm", format="text", tie_weights=True, embed_dim=8, hidden_size=16),
     r"tie_weights: expected embed_dim == hidden_size, got 8 and 16"),
    (dict(task="tag", format="conllu", tagset="pos"), r"tagset: expected 'upos' or 'xpos'"),
])
def test_task_config_checks(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(train_path="x", output=str(tmp_path), **kw)
