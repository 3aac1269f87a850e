"""The `packrnn` command line, through main(argv): train, evaluate, predict, bench, demo, errors."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

from packrnn.cli import main
from test_train import write_agnews

FAST = ["--no-progress", "--no-plot", "--threads", "1", "--embed-dim", "16", "--hidden-size", "16"]
# The run of the `trained` fixture (after --train/--test), repeated to resume it.
RUN = ["--model", "gru", "--epochs", "3", "--lr", "0.01", "--batch-size", "16", "--bucket",
       "--pooling", "max", "--embed-dropout", "0.1", *FAST]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    train_path, test_path = write_agnews(d / "train.csv", 200, 0), write_agnews(d / "test.csv", 60, 1)
    out = d / "run"
    code = main(["train", "--train", str(train_path), "--test", str(test_path), *RUN,
                 "--output", str(out)])
    assert code == 0
    return train_path, test_path, out


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err  # one clear line, no traceback
    assert lines[0].startswith("packrnn: error: ")
    return lines[0]


def test_train_writes_the_run(trained, capsys):
    _, _, out = trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["pooling"], config["bucket"], config["embed_dropout"]) == \
        ("gru", "max", True, 0.1)


def test_train_refuses_existing_output_then_resumes(trained, capsys):
    train_path, test_path, out = trained
    argv = ["train", "--train", str(train_path), "--test", str(test_path), *RUN,
            "--output", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "already exists and is not empty; pass --resume" in line
    assert main(argv + ["--resume"]) == 0  # finished run: nothing to do
    assert "already finished 3 epoch(s)" in capsys.readouterr().err
    assert main(argv + ["--resume", "--overwrite"]) == 2
    assert "not allowed with argument" in one_error_line(capsys.readouterr().err)


def test_evaluate_prints_accuracy_table_and_confusion(trained, capsys):
    _, test_path, out = trained
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(test_path)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("accuracy ") and "on 60 texts" in text
    assert "precision  recall      f1  support" in text and "confusion matrix" in text
    assert "\nmacro avg " in text
    for name in ("World", "Sports", "Business", "Sci/Tech"):
        assert name in text
    assert main(["evaluate", str(out), "--data", str(test_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 60 and len(result["confusion"]) == 4
    assert f"accuracy {result['accuracy']:.4f} on 60 texts, loss {result['loss']:.4f}" in text
    m = result["macro"]
    assert f"macro avg     {m['precision']:.4f}  {m['recall']:.4f}  {m['f1']:.4f}       60" in text
    assert m["f1"] == pytest.approx(sum(f or 0 for f in result["f1"]) / 4)  # all 4 classes occur


def test_predict_arguments_stdin_and_json(trained, capsys, monkeypatch):
    _, _, out = trained
    capsys.readouterr()
    assert main(["predict", str(out), "the stock market and bank", "goal match"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    label, prob, text = lines[0].split("\t")
    assert label in ("World", "Sports", "Business", "Sci/Tech") and 0 < float(prob) <= 1
    assert text == "the stock market and bank"
    monkeypatch.setattr(sys, "stdin", io.StringIO("computer chip\n\nwar and peace\n"))
    assert main(["predict", str(out), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in rows] == ["computer chip", "", "war and peace"]  # line for line
    assert all(set(r) == {"text", "label", "probability", "probabilities"} for r in rows)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["predict", str(out)]) == 2
    assert "expected texts as arguments or lines on stdin" in one_error_line(capsys.readouterr().err)


def test_model_directory_errors(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nowhere"), "text"]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    (tmp_path / "half").mkdir()
    assert main(["evaluate", str(tmp_path / "half"), "--data", "x.csv"]) == 2
    assert "is incomplete: it has no checkpoint.pt" in one_error_line(capsys.readouterr().err)
    (tmp_path / "half" / "checkpoint.pt").write_bytes(b"\x00garbage")
    assert main(["predict", str(tmp_path / "half"), "text"]) == 2
    assert "corrupt or truncated" in one_error_line(capsys.readouterr().err)


def test_bad_input_files(tmp_path, trained, capsys):
    _, _, out = trained
    base = ["train", "--model", "lstm", "--output", str(tmp_path / "r"), *FAST]
    bad = tmp_path / "bad.csv"
    bad.write_text('"1","a title","text"\n"9","b","c"\n"2","x","y"\n')
    assert main(base + ["--train", str(bad)]) == 2
    assert "bad.csv:2: expected a label 1-4" in one_error_line(capsys.readouterr().err)
    assert main(base + ["--train", str(bad), "--skip-bad-rows"]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert main(base + ["--train", str(empty), "--overwrite"]) == 2
    assert "empty.csv: expected a non-empty file" in one_error_line(capsys.readouterr().err)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b'"1","caf\xe9","x"\n')
    assert main(base + ["--train", str(latin), "--overwrite"]) == 2
    assert "latin.csv:1: expected UTF-8 text, got the invalid byte 0xe9" in \
        one_error_line(capsys.readouterr().err)
    assert main(base + ["--train", str(tmp_path / "missing.csv"), "--overwrite"]) == 2
    assert "missing.csv" in one_error_line(capsys.readouterr().err)
    unseen = tmp_path / "unseen.jsonl"  # the run was trained on AG News labels
    unseen.write_text('{"text": "hello", "label": "Weather"}\n')
    assert main(["evaluate", str(out), "--data", str(unseen), "--format", "jsonl"]) == 2
    assert "unseen.jsonl:1: expected a label seen in training" in one_error_line(capsys.readouterr().err)


def test_csv_and_jsonl_columns(tmp_path, capsys):
    rows = [("goal match team", "sport"), ("bank stock profit", "money")] * 12
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("id,body,topic\n" + "".join(f"{i},{t},{y}\n" for i, (t, y) in enumerate(rows)))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "topic": y}) + "\n" for t, y in rows))
    for fmt, path in (("csv", csv_path), ("jsonl", jsonl)):
        out = tmp_path / fmt
        assert main(["train", "--train", str(path), "--format", fmt, "--text-column", "body",
                     "--label-column", "topic", "--model", "rnn", "--epochs", "2", "--lr", "0.02",
                     "--output", str(out), *FAST]) == 0
        assert main(["evaluate", str(out), "--data", str(path), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["labels"] == ["money", "sport"] and result["count"] == 24


def test_usage_errors_are_one_line(capsys):
    assert main(["train", "--train", "x.csv", "--output", "o"]) == 2
    assert "the following arguments are required: --model" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--train", "x", "--model", "lstm", "--output", "o", "--epochs", "0"]) == 2
    assert "expected a positive integer, got '0'" in one_error_line(capsys.readouterr().err)
    assert main(["fly"]) == 2
    assert "invalid choice: 'fly'" in one_error_line(capsys.readouterr().err)
    assert main(["train", "--train", "x", "--model", "lstm", "--output", "o", "--lr", "-1"]) == 2
    assert "lr: expected a number > 0.0, got -1.0" in one_error_line(capsys.readouterr().err)
    assert main(["--version"]) == 0
    assert main(["train", "--help"]) == 0
    assert "--bidirectional" in capsys.readouterr().out


def test_bench_calls_run_bench(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("packrnn.bench")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "packrnn.bench", fake)
    import packrnn

    monkeypatch.setattr(packrnn, "bench", fake, raising=False)
    assert main(["bench", "--quick"]) == 0
    assert calls == [["--quick"]]


def test_demo_small(capsys):
    assert main(["demo", "--train-size", "120", "--test-size", "40", "--max-length", "30",
                 "--epochs", "1", "--hidden-size", "8", "--batch-size", "16", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "input (3, 5, 4) -> output (3, 5, 2), h_n (1, 3, 2)" in out
    assert "(matches the padded run's steps)" in out
    assert "bag of words" in out and "packed is" in out and "predictions of the packed model" in out
    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs: expected a positive integer, got 0" in capsys.readouterr().err


def test_hello_example_and_order_task():
    import torch

    from packrnn.demo import LABELS, MARKERS, hello, make_order_task

    assert hello().shape == (3, 5, 2)
    rows = make_order_task(300, 0, max_length=50)
    lengths = [len(r["text"].split()) for r in rows]
    assert min(lengths) >= 1 and max(lengths) <= 50
    for r in rows:
        words = r["text"].split()
        present = [w for w in words if w in MARKERS]
        assert present[0] == MARKERS[LABELS.index(r["label"])]  # label = first marker
        if len(words) > 1:
            assert sorted(present) == sorted(MARKERS)  # both once: words alone do not tell
    assert {r["label"] for r in rows} == set(LABELS)
    assert torch.is_tensor(hello())


def test_resume_from_the_directory_alone(tmp_path, capsys):
    train_path = write_agnews(tmp_path / "train.csv", 96, 0)
    run = ["--train", str(train_path), "--model", "gru", "--hidden-size", "8", "--embed-dim", "8",
           "--lr", "0.01", "--dropout", "0.2", "--no-progress", "--no-plot", "--threads", "1"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(["train", *run, "--epochs", "2", "--output", str(straight)]) == 0
    assert main(["train", *run, "--epochs", "1", "--output", str(out)]) == 0
    capsys.readouterr()
    # Only the directory (and the flags that may change on resume): the saved settings go on.
    assert main(["train", "--resume", "--output", str(out), "--epochs", "2", "--no-progress"]) == 0
    numbers = ("epoch", "train_loss", "train_accuracy", "samples")  # not the timings
    assert [[m[k] for k in numbers] for m in json.loads((out / "metrics.json").read_text())] == \
        [[m[k] for k in numbers] for m in json.loads((straight / "metrics.json").read_text())]
    # Flags that restate the saved settings are fine; others are refused by name.
    assert main(["train", "--resume", "--output", str(out), "--model", "gru", "--lr", "0.01",
                 "--epochs", "2"]) == 0
    for flag, value, saved in (("--hidden-size", "16", "8"), ("--model", "lstm", "'gru'"),
                               ("--lr", "0.1", "0.01"), ("--bidirectional", None, "False"),
                               ("--train", str(tmp_path / "other.csv"), repr(str(train_path)))):
        capsys.readouterr()
        argv = ["train", "--resume", "--output", str(out), flag] + ([value] if value else [])
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"packrnn: error: {flag}: expected {saved} as saved in the run" in line, line
        assert f"leave {flag} out), got " in line
    assert main(["train", "--resume", "--output", str(tmp_path / "new")]) == 2
    assert ("the following arguments are required: --train, --model (no packrnn run in "
            in one_error_line(capsys.readouterr().err))


def test_ctrl_c_saves_exits_130_and_resume_continues(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import packrnn.train as T

    train_path = write_agnews(tmp_path / "train.csv", 64, 0)
    out = tmp_path / "run"
    real_step, calls = T._Adam.step, []

    def step_then_ctrl_c(self):
        real_step(self)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(T._Adam, "step", step_then_ctrl_c)
    argv = ["train", "--train", str(train_path), "--model", "rnn", "--epochs", "2",
            "--output", str(out), *FAST]
    capsys.readouterr()
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "packrnn: interrupted: saving a checkpoint after the current step" in err
    assert (f"packrnn: interrupted after step 3 (epoch 1, batch 3 of 4); checkpoint saved in "
            f"{str(out)!r}: continue with `packrnn train --resume --output {out}`") in err
    monkeypatch.setattr(T._Adam, "step", real_step)
    assert main(["train", "--resume", "--output", str(out)]) == 0
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2]


def test_disk_full_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import errno

    import packrnn.checkpoint as C

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    real = C.atomic_write
    monkeypatch.setattr(C, "atomic_write", lambda path, write, what=None: real(path, full, what))
    train_path = write_agnews(tmp_path / "train.csv", 32, 0)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--train", str(train_path), "--model", "rnn", "--output", str(out),
                 *FAST]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"packrnn: error: no space left on device while writing {out / 'checkpoint.pt'}; "
        "no partial file was left")


def stdin_bytes(data: bytes) -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def test_predict_keeps_one_output_line_per_input_line(trained, capsys, monkeypatch):
    _, _, out = trained
    capsys.readouterr()
    for data in (b"goal match\n\n\nbank stock\n", b"goal match\r\r\rbank stock",
                 b"goal match\r\n\r\n\r\nbank stock\r\n"):
        monkeypatch.setattr(sys, "stdin", stdin_bytes(data))
        assert main(["predict", str(out)]) == 0
        lines = capsys.readouterr().out.split("\n")
        assert [line.split("\t")[2] for line in lines[:-1]] == ["goal match", "", "", "bank stock"]
        assert lines[-1] == ""


def test_predict_takes_options_before_or_after_the_texts(trained, capsys):
    _, _, out = trained
    capsys.readouterr()
    for argv in (["--json", str(out), "goal match", "bank"], [str(out), "goal match", "bank", "--json"],
                 [str(out), "goal match", "--json", "bank"]):
        assert main(["predict", *argv]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in rows] == ["goal match", "bank"]
    assert main(["predict", str(out), "--json", "--", "-5 degrees"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "-5 degrees"


def test_predict_names_the_stdin_line_of_bad_bytes(trained, capsys, monkeypatch):
    _, _, out = trained
    capsys.readouterr()
    for data in (b"fine\nalso fine\ncaf\xe9\n", b"fine\ralso fine\rcaf\xe9\r"):
        monkeypatch.setattr(sys, "stdin", stdin_bytes(data))
        assert main(["predict", str(out)]) == 2
        assert one_error_line(capsys.readouterr().err) == \
            "packrnn: error: stdin:3: expected UTF-8 text, got the invalid byte 0xe9"


def test_vectors_file_with_bad_bytes_names_file_and_line(tmp_path, trained, capsys):
    train_path, _, _ = trained
    vectors = tmp_path / "vectors.txt"
    vectors.write_bytes(b"the " + b"0.1 " * 15 + b"0.1\nna\xefve " + b"0.1 " * 15 + b"0.1\n")
    assert main(["train", "--train", str(train_path), "--model", "lstm", "--vectors", str(vectors),
                 "--output", str(tmp_path / "r"), *FAST]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"packrnn: error: vectors: expected UTF-8 text, got the invalid byte 0xef in {vectors}:2"


def test_train_command_parses_back_to_the_same_config():
    """The benchmarks print their configurations with cli.train_command: the printed line,
    given to `packrnn train`, sets exactly those fields; a field with no option is refused."""
    import shlex

    from packrnn import cli

    fields = dict(task="lm", train_path="t.txt", test_path="v.txt", model="gru", num_layers=2,
                  lr=3e-3, lr_decay=0.7, bucket=True, execution="padded",
                  progress=False, plot=True)
    line = cli.train_command(fields)
    args = cli.build_parser().parse_args(shlex.split(line)[1:] + ["--output", "runs/x"])
    config = cli._train_config(args, set())
    for name, value in fields.items():
        assert getattr(config, name) == value, name
    with pytest.raises(ValueError, match="fields: expected TrainConfig fields that packrnn "
                                         "train has an option for, got 'no_such_field'"):
        cli.train_command({"no_such_field": 1})
