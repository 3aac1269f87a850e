"""train(): loss falls, exact resume after a kill, output-directory rules, checkpoints, evaluate, predict."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from packrnn.checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, atomic_write_text,
                                load_checkpoint, save_checkpoint)
from packrnn.train import TrainConfig, TrainError, evaluate, load_run, predict, train

TOPICS = {1: "war peace nation leader", 2: "goal match team score",
          3: "stock market bank profit", 4: "computer software chip space"}
FILLER = "the a of in on and to is was it".split()


def write_agnews(path: Path, n: int, seed: int, labels=(1, 2, 3, 4)) -> Path:
    """A tiny AG-News-format file: each text has one topic word among filler words."""
    r = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for _ in range(n):
            y = r.choice(labels)
            toks = [r.choice(FILLER) for _ in range(r.randint(0, 10))]
            toks.insert(r.randint(0, len(toks)), r.choice(TOPICS[y].split()))
            w.writerow([y, " ".join(toks[:2]), " ".join(toks[2:])])
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_agnews(d / "train.csv", 240, 0), write_agnews(d / "test.csv", 80, 1)


def config(data, out, **kw) -> TrainConfig:
    train_path, test_path = data
    base = dict(train_path=str(train_path), test_path=str(test_path), output=str(out),
                batch_size=16, epochs=2, progress=False, plot=False, embed_dim=16, hidden_size=16,
                threads=1)  # tiny batches: one thread is fastest (and immune to a busy machine)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_and_files_written(data, tmp_path):
    out = tmp_path / "run"
    metrics = train(config(data, out, epochs=4, lr=0.01, plot=True))
    assert [m.epoch for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1].train_loss < metrics[0].train_loss - 0.2
    assert metrics[-1].test_accuracy > 0.6  # chance is 0.25
    saved = json.loads((out / "metrics.json").read_text())
    assert [m["train_loss"] for m in saved] == [m.train_loss for m in metrics]
    assert set(saved[0]) == {"epoch", "train_loss", "train_accuracy", "test_accuracy", "seconds",
                             "samples_per_second", "samples"}
    assert saved[0]["samples"] == 240
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["epochs"] == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_run(data, tmp_path):
    a = train(config(data, tmp_path / "a", epochs=1, dropout=0.3, embed_dropout=0.2))
    b = train(config(data, tmp_path / "b", epochs=1, dropout=0.3, embed_dropout=0.2))
    assert a[0].train_loss == b[0].train_loss and a[0].test_accuracy == b[0].test_accuracy


class Killed(Exception):
    pass


def _kill_at(step_to_die: int):
    def on_step(step: int) -> None:
        if step == step_to_die:
            raise Killed

    return on_step


@pytest.mark.parametrize("kill_step", [22, 15])  # mid-epoch 2 after a checkpoint at 20; epoch 1
def test_resume_after_kill_matches_uninterrupted_run(data, tmp_path, kill_step):
    # 240 texts / 16 = 15 batches per epoch; checkpoints every 4 steps and every epoch.
    # Two layers with dropout, so the saved RNG states matter.
    kw = dict(checkpoint_every_steps=4, dropout=0.25, embed_dropout=0.1, num_layers=2, epochs=2,
              lr_decay=0.5)
    straight = train(config(data, tmp_path / "straight", **kw))
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config(data, out, **kw), on_step=_kill_at(kill_step))
    state = load_checkpoint(out)
    assert state["step"] == (kill_step // 4) * 4 or state["step"] == 15
    resumed = train(config(data, out, resume=True, **kw))
    assert len(resumed) == len(straight) == 2
    for a, b in zip(straight, resumed):
        assert (a.epoch, a.train_loss, a.train_accuracy, a.test_accuracy) == \
               (b.epoch, b.train_loss, b.train_accuracy, b.test_accuracy)
    wa = load_checkpoint(tmp_path / "straight")["model_state"]
    wb = load_checkpoint(out)["model_state"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_lr_decays_per_epoch(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, epochs=3, lr=0.01, lr_decay=0.5))
    groups = load_checkpoint(out)["optimizer_state"]["adam"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.01 * 0.5 ** 2] * len(groups)  # epoch 3: lr * decay**2


def test_resume_finished_run_returns_its_metrics_and_extends(data, tmp_path):
    out = tmp_path / "run"
    first = train(config(data, out, epochs=1))
    (out / "metrics.json").unlink()  # killed after the checkpoint, before metrics.json
    again = train(config(data, out, epochs=1, resume=True))
    assert again == first
    assert json.loads((out / "metrics.json").read_text())[0]["train_loss"] == first[0].train_loss
    more = train(config(data, out, epochs=2, resume=True))  # more epochs: allowed
    assert [m.epoch for m in more] == [1, 2] and more[0] == first[0]


def test_resume_with_other_settings_is_refused(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, epochs=1))
    with pytest.raises(TrainError, match=r"resume: expected the same settings as the checkpoint, "
                                         r"got hidden_size=8 \(checkpoint: 16\)"):
        train(config(data, out, epochs=1, resume=True, hidden_size=8))


def test_resume_without_checkpoint_starts_fresh(data, tmp_path):
    metrics = train(config(data, tmp_path / "new", epochs=1, resume=True))
    assert len(metrics) == 1


def test_existing_output_is_refused_unless_overwrite(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match="output: directory .* already exists and is not empty; "
                                         "pass --resume .* or --overwrite"):
        train(config(data, out, epochs=1))
    assert not (out / CHECKPOINT_NAME).exists()
    train(config(data, out, epochs=1, overwrite=True))
    assert (out / CHECKPOINT_NAME).is_file()
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only packrnn's files


@pytest.mark.parametrize("kw, match", [
    (dict(epochs=0), r"epochs: expected an int >= 1, got 0"),
    (dict(lr=-1.0), r"lr: expected a number > 0.0, got -1.0"),
    (dict(lr_decay=0.0), r"lr_decay: expected a number > 0.0 and <= 1.0, got 0.0"),
    (dict(lr_decay=1.5), r"lr_decay: expected a number > 0.0 and <= 1.0, got 1.5"),
    (dict(model="transformer"), r"model: expected one of rnn, lstm, gru, got 'transformer'"),
    (dict(pooling="sum"), r"pooling: expected one of last, mean, max, mean_padded, got 'sum'"),
    (dict(pooling="mean_padded"), r"pooling: expected 'mean_padded' only with execution='padded'"),
    (dict(dropout=1.0), r"dropout: expected a number in \[0, 1\), got 1.0"),
    (dict(embed_dropout=1.0), r"embed_dropout: expected a number in \[0, 1\), got 1.0"),
    (dict(format="xml"), r"format: expected one of agnews, csv, tsv, jsonl, got 'xml'"),
    (dict(resume=True, overwrite=True), r"resume/overwrite: expected at most one of them"),
    (dict(max_tokens=100), r"max_tokens: expected only together with bucket=True"),
    (dict(grad_clip=0), r"grad_clip: expected a number > 0.0 or None, got 0"),
    (dict(checkpoint_every_steps=0), r"checkpoint_every_steps: expected an int >= 1 or None, got 0"),
])
def test_config_checks(data, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(data, tmp_path / "x", **kw)


def test_evaluate_and_predict(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, epochs=3, lr=0.01))
    result = evaluate(out, data[1])
    assert result["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    confusion = torch.tensor(result["confusion"])
    assert int(confusion.sum()) == result["count"] == 80
    assert result["accuracy"] == pytest.approx(float(confusion.diagonal().sum()) / 80)
    for i in range(4):
        if result["recall"][i] is not None:
            assert result["recall"][i] == pytest.approx(float(confusion[i, i] / confusion[i].sum()))
        if result["precision"][i] is not None:
            assert result["precision"][i] == pytest.approx(float(confusion[i, i] / confusion[:, i].sum()))
    preds = predict(out, ["the stock market and bank", "", "zzz unknown words"])
    assert len(preds) == 3
    for p in preds:
        assert p["label"] in result["labels"]
        assert p["probability"] == max(p["probabilities"].values())
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)


def test_evaluate_unseen_label_is_an_error(tmp_path):
    # Trained on labels 1-2 of a csv with string labels; evaluation file has a third label.
    train_path = tmp_path / "train.csv"
    test_path = tmp_path / "test.csv"
    train_path.write_text("text,label\n" + "".join(f"goal match {i},sport\nbank stock {i},money\n"
                                                     for i in range(20)))
    test_path.write_text("text,label\nthe goal,sport\nthe chip,tech\n")
    out = tmp_path / "run"
    train(TrainConfig(train_path=str(train_path), output=str(out), format="csv", epochs=1,
                      progress=False, plot=False, embed_dim=8, hidden_size=8, threads=1))
    with pytest.raises(ValueError, match=r"test.csv:3: expected a label seen in training "
                                         r"\['money', 'sport'\], got 'tech'"):
        evaluate(out, test_path)


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_errors(data, tmp_path):
    with pytest.raises(CheckpointError, match=r"model directory .*nowhere.* does not exist"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"model directory .*empty.* is incomplete: it has no "
                                              r"checkpoint.pt"):
        load_run(tmp_path / "empty")
    out = tmp_path / "run"
    train(config(data, out, epochs=1))
    good = (out / CHECKPOINT_NAME).read_bytes()
    (out / CHECKPOINT_NAME).write_bytes(good[: len(good) // 2])  # a torn write
    with pytest.raises(CheckpointError, match=r"checkpoint .* is corrupt or truncated"):
        load_run(out)
    (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"is corrupt or truncated"):
        load_run(out)
    torch.save({"weights": torch.zeros(2)}, out / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"is not a packrnn checkpoint"):
        load_run(out)
    (out / CHECKPOINT_NAME).write_bytes(good)
    state = load_checkpoint(out)
    state["format_version"] = FORMAT_VERSION + 1
    torch.save(state, out / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=rf"has format version {FORMAT_VERSION + 1} .*reads "
                                              rf"version 1 or {FORMAT_VERSION}"):
        load_run(out)
    del state["optimizer_state"]
    state["format_version"] = 1  # version 1: the state itself, no checksum envelope
    torch.save(state, out / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=r"is incomplete: it lacks \['optimizer_state'\]"):
        load_run(out)


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    from packrnn.checkpoint import atomic_write

    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left


def test_save_checkpoint_requires_every_key(tmp_path):
    with pytest.raises(ValueError, match=r"state: expected keys .* missing \['model_config'"):
        save_checkpoint(tmp_path / "c.pt", {"epoch": 0})


def test_sparse_embedding_trains_and_resumes_exactly(data, tmp_path):
    kw = dict(sparse_embedding=True, grad_clip=1.0, epochs=2, checkpoint_every_steps=5, lr=0.01)
    straight = train(config(data, tmp_path / "a", **kw))
    assert straight[-1].train_loss < straight[0].train_loss
    out = tmp_path / "b"
    with pytest.raises(Killed):
        train(config(data, out, **kw), on_step=_kill_at(12))
    resumed = train(config(data, out, resume=True, **kw))
    assert [m.train_loss for m in resumed] == [m.train_loss for m in straight]
    assert set(load_checkpoint(out)["optimizer_state"]) == {"adam", "sparse_adam"}
    with pytest.raises(ValueError, match=r"weight_decay: expected 0 with sparse_embedding=True"):
        config(data, tmp_path / "c", sparse_embedding=True, weight_decay=0.1)


def test_clip_grad_norm_with_sparse_gradients_matches_dense():
    from packrnn.models import ModelConfig, SequenceClassifier
    from packrnn.train import _clip_grad_norm

    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        m = SequenceClassifier(ModelConfig(vocab_size=20, num_classes=2, embed_dim=4, hidden_size=3,
                                           sparse_embedding=sparse))
        ids = torch.tensor([[3, 4, 3], [5, 3, 0]])
        (m(ids, [3, 2]).sum() * 100).backward()
        _clip_grad_norm(m, 0.5)
        grads.append([p.grad.to_dense() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    total = torch.stack([g.norm() for g in grads[0]]).norm()
    assert total == pytest.approx(0.5, rel=1e-4)
