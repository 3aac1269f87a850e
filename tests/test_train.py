"""train(): loss falls, exact resume after a kill, output-directory rules, checkpoints, evaluate, predict."""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import packrnn

from packrnn.checkpoint import (CHECKPOINT_NAME, FORMAT_VERSION, CheckpointError, DiskFullError,
                                atomic_write_text, load_checkpoint, save_checkpoint)
from packrnn.rundir import LOCK_NAME, RunDirError, RunLockedError, TrainInterrupted
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
                             "samples_per_second", "samples", "test_loss"}
    assert saved[-1]["test_loss"] < saved[0]["test_loss"]
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


# mid-epoch 2 after a checkpoint at 20; end of epoch 1; step 2, before any periodic checkpoint
# (the run's first checkpoint, of step 0)
@pytest.mark.parametrize("kill_step", [22, 15, 2])
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
    train(config(data, out, epochs=1))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="output: directory .* already exists and is not empty; "
                                          "pass --resume .* or --overwrite"):
        train(config(data, out, epochs=1))
    before = (out / CHECKPOINT_NAME).read_bytes()
    train(config(data, out, epochs=1, overwrite=True, seed=1))
    assert (out / CHECKPOINT_NAME).read_bytes() != before
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only packrnn's files


@pytest.mark.parametrize("flag", ["overwrite", "resume", None])
def test_a_directory_that_is_not_a_run_is_never_written(data, tmp_path, flag):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "metrics.json").write_text('{"my": "results"}')
    with pytest.raises(RunDirError, match=r"output: expected a new or empty directory or a packrnn "
                                          r"run.*holding other files \(config.json, metrics.json\) "
                                          r"and no packrnn checkpoint.pt; nothing was changed"):
        train(config(data, out, epochs=1, **({flag: True} if flag else {})))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json"]
    assert (out / "config.json").read_text() == '{"my": "settings"}'
    assert (out / "metrics.json").read_text() == '{"my": "results"}'


def test_an_empty_directory_or_leftovers_start_a_run(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.999999.0badc0de.tmp").write_bytes(b"x" * 100)  # a killed first write
    train(config(data, out, epochs=1))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.json"]


def test_second_training_on_the_same_directory_is_refused(data, tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    seen = []

    def start_another(step):
        if step == 3:
            with pytest.raises(RunLockedError, match=rf"output: directory .* is in use by another "
                                                     rf"training \(pid {os.getpid()} on host "
                                                     rf"{socket.gethostname()}, started "):
                train(config(data, out, epochs=1, overwrite=True))
            seen.append(step)

    first = train(config(data, out, epochs=1), on_step=start_another)
    assert seen == [3] and len(first) == 1
    assert load_checkpoint(out)["history"][0]["train_loss"] == first[0].train_loss
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_stale_lock_and_temp_files_of_a_killed_run_are_cleaned(data, tmp_path, capsys):
    import socket
    import subprocess
    import sys

    kw = dict(checkpoint_every_steps=4, epochs=2)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(config(data, out, **kw), on_step=_kill_at(6))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "started": "2026-01-01 00:00:00"}))
    leaked = [".checkpoint.pt.%d.0123abcd.tmp" % dead.pid, ".metrics.json.17.ffff0000.tmp"]
    for name in leaked:
        (out / name).write_bytes(b"\0" * 4096)
    (out / ".my.own.tmp").write_text("not packrnn's")
    capsys.readouterr()
    train(config(data, out, resume=True, **kw))
    err = capsys.readouterr().err
    assert f"taking over the stale lock of {str(out)!r} (pid {dead.pid} on host" in err
    assert "removed 2 stale temporary file(s) of interrupted writes" in err
    assert sorted(p.name for p in out.iterdir()) == [".my.own.tmp", "checkpoint.pt", "config.json",
                                                     "metrics.json"]


def test_disk_full_keeps_the_previous_checkpoint_and_resumes(data, tmp_path, monkeypatch):
    import builtins
    import errno

    kw = dict(checkpoint_every_steps=4, epochs=1)
    straight = train(config(data, tmp_path / "straight", **kw))
    out = tmp_path / "run"
    real_open = builtins.open

    def full(path, mode="r", *a, **k):
        if mode == "xb":  # the temp file of an atomic write
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    def fill_disk(step):
        if step == 6:
            monkeypatch.setattr(builtins, "open", full)

    with pytest.raises(DiskFullError, match=r"^no space left on device while writing .*run/"
                                            r"checkpoint.pt; the previous checkpoint is intact$"):
        train(config(data, out, **kw), on_step=fill_disk)
    monkeypatch.setattr(builtins, "open", real_open)
    assert load_checkpoint(out)["step"] == 4
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    resumed = train(config(data, out, resume=True, **kw))
    assert [m.train_loss for m in resumed] == [m.train_loss for m in straight]


def test_changed_data_is_refused_on_resume(data, tmp_path, capsys):
    train_path = write_agnews(tmp_path / "train.csv", 240, 0)
    kw = dict(checkpoint_every_steps=4, epochs=2)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        train(config((train_path, data[1]), out, **kw), on_step=_kill_at(5))
    assert set(load_checkpoint(out)["data_fingerprints"]) == {"train_path", "test_path"}
    write_agnews(train_path, 80, 0)  # cut the training file
    with pytest.raises(RunDirError, match=r"train_path: expected the data file the checkpoint was "
                                          r"trained on, but '.*train.csv' changed \(lines 240 -> "
                                          r"80, .*\); .* pass --allow-data-change"):
        train(config((train_path, data[1]), out, resume=True, **kw))
    capsys.readouterr()
    metrics = train(config((train_path, data[1]), out, resume=True, allow_data_change=True, **kw))
    assert len(metrics) == 2
    assert "warning: train_path" in capsys.readouterr().err


def test_non_finite_loss_stops_with_step_and_batch(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"loss: expected a finite number, got (nan|inf) at step \d+ "
                                         r"\(epoch 1, batch \d+ of 15\); stopped"):
        train(config(data, out, lr=1e38))
    state = load_checkpoint(out)  # the steps before it are saved (here: step 0)
    assert state["step"] == 0 and json.loads((out / "config.json").read_text())["lr"] == 1e38


def test_non_finite_vectors_are_refused(data, tmp_path):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("the " + " ".join(["nan"] * 16) + "\n")
    with pytest.raises(ValueError, match=r"vectors: expected finite numbers after the token, got "
                                         r"'nan' for 'the' in .*vectors.txt:1"):
        train(config(data, tmp_path / "run", vectors=str(vectors)))


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(data, tmp_path):
    import signal

    kw = dict(dropout=0.25, num_layers=2, epochs=2)  # no periodic checkpoints: only Ctrl-C's
    straight = train(config(data, tmp_path / "straight", **kw))
    out = tmp_path / "run"

    def ctrl_c(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    class Unhandled(Exception):
        pass

    def unhandled(signum, frame):  # what train() must replace (and then restore)
        raise Unhandled

    before = signal.signal(signal.SIGINT, unhandled)
    try:
        with pytest.raises(TrainInterrupted, match=rf"interrupted after step 7 \(epoch 1, batch 7 "
                                                   rf"of 15\); checkpoint saved in .*: continue "
                                                   rf"with `packrnn train --resume --output {out}`"):
            train(config(data, out, **kw), on_step=ctrl_c)
        assert signal.getsignal(signal.SIGINT) is unhandled
    finally:
        signal.signal(signal.SIGINT, before)
    assert load_checkpoint(out)["step"] == 7
    resumed = train(config(data, out, resume=True, **kw))
    assert resumed == [replace(m, seconds=a.seconds, samples_per_second=a.samples_per_second)
                       for m, a in zip(straight, resumed)]
    wa, wb = load_checkpoint(tmp_path / "straight")["model_state"], load_checkpoint(out)["model_state"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


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


# -- evaluation scores, test loss, plot -----------------------------------------------------------


def test_scores_f1_and_macro_averages_match_the_definitions():
    from packrnn.tasks.classify import scores as _scores  # moved with the classifier (h12)

    # rows: true label, columns: predicted; class 3 never occurs, class 2 is never predicted
    confusion = torch.tensor([[5, 1, 0, 0],
                              [2, 3, 0, 0],
                              [1, 1, 0, 0],
                              [0, 0, 0, 0]], dtype=torch.float64)
    r = _scores(confusion)
    p = [5 / 8, 3 / 5, None, None]
    rec = [5 / 6, 3 / 5, 0.0, None]
    f1 = [2 * 5 / (6 + 8), 2 * 3 / (5 + 5), 0.0, None]  # 2 TP / (actual + predicted)
    assert r["precision"] == pytest.approx(p) and r["recall"] == pytest.approx(rec)
    assert r["f1"] == pytest.approx(f1)
    for i in (0, 1):  # F1 is the harmonic mean where both are defined
        assert f1[i] == pytest.approx(2 * p[i] * rec[i] / (p[i] + rec[i]))
    # macro: over the 3 classes that occur; class 2's undefined precision counts as 0
    assert r["macro"] == pytest.approx({"precision": (5 / 8 + 3 / 5 + 0) / 3,
                                        "recall": (5 / 6 + 3 / 5 + 0) / 3,
                                        "f1": (f1[0] + f1[1] + 0) / 3})


def test_evaluate_reports_the_test_loss_of_the_last_epoch(data, tmp_path):
    out = tmp_path / "run"
    metrics = train(config(data, out, epochs=1))
    result = evaluate(out, data[1])
    assert metrics[0].test_loss == pytest.approx(result["loss"], rel=1e-6)
    assert result["macro"]["f1"] is not None and len(result["f1"]) == 4


def test_plot_shows_test_loss_and_names_the_run(data, tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    import packrnn.train as T

    captured = []

    class Figure(figure.Figure):
        def savefig(self, *args, **kwargs):
            captured.append(self)

    monkeypatch.setattr(figure, "Figure", Figure)
    cfg = config(data, tmp_path, model="gru", bidirectional=True, num_layers=2, pooling="max",
                 plot=True)
    history = [T.EpochMetrics(1, 1.2, 0.5, 0.6, 1.0, 10.0, 10, test_loss=1.1),
               T.EpochMetrics(2, 0.9, 0.7, 0.65, 1.0, 10.0, 10, test_loss=1.0)]
    T._write_metrics(cfg, tmp_path, history)
    loss_ax, _ = captured[0].axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train", "test"]
    assert list(loss_ax.get_lines()[1].get_ydata()) == [1.1, 1.0]
    assert captured[0]._suptitle.get_text() == \
        f"bidirectional 2-layer GRU 16, max pooling ({tmp_path})"


def test_warns_about_test_labels_without_training_rows(tmp_path, capsys):
    # AG News has four fixed labels: a training file without Business still has the class
    train_path = write_agnews(tmp_path / "train.csv", 60, 0, labels=(1, 2, 4))
    test_path = write_agnews(tmp_path / "test.csv", 40, 1)
    train(config((train_path, test_path), tmp_path / "run", epochs=1))
    err = capsys.readouterr().err
    n = sum(1 for row in test_path.read_text().splitlines() if row.startswith('"3"'))
    assert f"warning: {test_path} has labels no training row has: 'Business' ({n} rows); " \
           "the model never learns these classes" in err
    train(config((test_path, test_path), tmp_path / "run2", epochs=1))
    assert "warning" not in capsys.readouterr().err


# -- what a checkpoint holds -------------------------------------------------------------------------


def test_checkpoint_with_fewer_labels_than_classes_is_refused(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, epochs=1))
    state = load_checkpoint(out)
    state["labels"] = state["labels"][:3]
    save_checkpoint(out / CHECKPOINT_NAME, state)
    with pytest.raises(CheckpointError, match=r"checkpoint in .* is inconsistent and cannot be used "
                                              r"\(labels: expected 4 label names \(the model's "
                                              r"classes\), got 3\)"):
        load_run(out)


def test_checkpoint_history_fields_unknown_here_are_ignored(data, tmp_path):
    # a newer packrnn may record more per epoch: reading and resuming ignore what they do not know
    out = tmp_path / "run"
    train(config(data, out, epochs=1))
    state = load_checkpoint(out)
    state["history"][0]["grad_norm"] = 1.5
    save_checkpoint(out / CHECKPOINT_NAME, state)
    run = load_run(out)
    assert run.history[0].epoch == 1 and not hasattr(run.history[0], "grad_norm")
    metrics = train(config(data, out, epochs=2, resume=True))
    assert [m.epoch for m in metrics] == [1, 2]
    del state["history"][0]["train_loss"]  # but a missing field is an inconsistent checkpoint
    save_checkpoint(out / CHECKPOINT_NAME, state)
    with pytest.raises(CheckpointError, match=r"history: expected epoch entries with .*, got one "
                                              r"without \['train_loss'\]"):
        load_run(out)


@pytest.mark.skipif(packrnn.backend_name() != "native", reason="compile traces the native ops")
def test_compiled_training_matches_eager(data, tmp_path):
    """TrainConfig.compile: torch.compile of the model, padded batches with lengths; without
    dropout the same numbers as eager packed training (same batches, same seed)."""
    torch._dynamo.reset()
    kw = dict(epochs=1, lr=0.01, bidirectional=True, pooling="max")
    eager = train(config(data, tmp_path / "eager", **kw))
    compiled = train(config(data, tmp_path / "compiled", compile=True, **kw))
    assert compiled[0].train_loss == pytest.approx(eager[0].train_loss, rel=1e-4)
    assert compiled[0].test_loss == pytest.approx(eager[0].test_loss, rel=1e-3)
    assert compiled[0].test_accuracy == pytest.approx(eager[0].test_accuracy, abs=1 / 80)
    a, b = load_run(tmp_path / "eager").model, load_run(tmp_path / "compiled").model
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)
    torch._dynamo.reset()


@pytest.mark.skipif(packrnn.backend_name() != "native", reason="compile traces the native ops")
def test_compiled_training_resumes_exactly(data, tmp_path):
    """--compile: a run killed mid-epoch resumes from its checkpoint (weights, Adam's moments and
    step counts, RNG states) and ends exactly where an uninterrupted compiled run ends; dropout
    draws from torch's generator (NOTE [compiled training]), so the saved states replay it."""
    torch._dynamo.reset()
    kw = dict(compile=True, epochs=1, checkpoint_every_steps=4, embed_dropout=0.2, lr=0.01)
    straight = train(config(data, tmp_path / "straight", **kw))
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        train(config(data, out, **kw), on_step=_kill_at(6))
    assert load_checkpoint(out)["step"] == 4
    resumed = train(config(data, out, resume=True, **kw))
    assert [(m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy) for m in resumed] == \
           [(m.train_loss, m.train_accuracy, m.test_loss, m.test_accuracy) for m in straight]
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(out)
    for k in a["model_state"]:
        torch.testing.assert_close(b["model_state"][k], a["model_state"][k], rtol=0, atol=0)
    want, got = a["optimizer_state"]["adam"], b["optimizer_state"]["adam"]
    assert want["state"].keys() == got["state"].keys() and len(want["state"]) > 0
    for i, moments in want["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got["state"][i][name], moments[name], rtol=0, atol=0)
    torch._dynamo.reset()


def test_compile_is_for_the_classifier_only(data, tmp_path):
    with pytest.raises(ValueError, match="compile"):
        config(data, tmp_path / "x", task="lm", compile=True)
