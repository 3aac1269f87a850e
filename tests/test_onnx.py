"""ONNX export with real lengths (packrnn.onnx_export) and serving without torch (serve_onnx).

Oracle: packrnn eager ``SequenceClassifier(ids, lengths)`` on the same weights; onnxruntime
must give the same logits within 1e-5 (float32).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the onnx package (pip install 'packrnn[onnx]')")
ort = pytest.importorskip("onnxruntime",
                          reason="needs onnxruntime (pip install 'packrnn[onnx]')")

from packrnn import LSTM, GRU, ModelConfig, SequenceClassifier, export_onnx  # noqa: E402
from packrnn.cli import main  # noqa: E402
from packrnn.data import Vocab, basic_english  # noqa: E402
from packrnn.serve_onnx import OnnxClassifier  # noqa: E402
from packrnn.train import load_run, predict  # noqa: E402
from test_cli import FAST, one_error_line  # noqa: E402
from test_train import write_agnews  # noqa: E402

V, E, H, C = 23, 5, 6, 3
SHAPES = [(7, 9), (1, 1), (1, 5), (12, 4)]  # (B, T) batches fed to one exported model
STANDARD = {"Gather", "Transpose", "Cast", "Max", "LSTM", "GRU", "RNN", "Reshape", "Unsqueeze",
            "Greater", "Where", "Shape", "Range", "Less", "ReduceSum", "ReduceMax",
            "ReduceMean", "Div", "Gemm"}


def session(path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def batch(B: int, T: int, g: torch.Generator, pad_with_garbage: bool, empty: bool = True):
    """Ids (B, T) and lengths (B,) with the longest (T), a 1 and a 0 among the lengths."""
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 1:
        lengths[1] = 1
    if B > 2 and empty:
        lengths[2] = 0
    ids = torch.randint(1, V, (B, T), generator=g)
    pad = torch.arange(T)[None, :] >= lengths[:, None]  # (B, T)
    if not pad_with_garbage:  # padded execution reads the padding: give it <pad>
        ids[pad] = 0
    return ids, lengths


def check_matches_eager(config: ModelConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(config).eval()
    with torch.no_grad():  # larger biases than the default init, so a gate mix-up shows
        for name, p in model.rnn.named_parameters():
            if "bias" in name:
                p.uniform_(-1, 1)
    path = export_onnx(model, tmp_path / "model.onnx")
    s = session(path)
    g = torch.Generator().manual_seed(1)
    packed = config.execution == "packed"
    for B, T in SHAPES:
        ids, lengths = batch(B, T, g, pad_with_garbage=packed)
        with torch.no_grad():
            want = model(ids, lengths).numpy()  # (B, C)
        got = s.run(["logits"], {"ids": ids.numpy(), "lengths": lengths.numpy()})[0]
        assert got.shape == (B, C) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        if packed:  # real lengths: more padding (of any content) changes nothing
            extra = torch.randint(0, V, (B, 3), generator=g)
            more = s.run(["logits"], {"ids": torch.cat([ids, extra], 1).numpy(),
                                      "lengths": lengths.numpy()})[0]
            np.testing.assert_allclose(more, got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_onnxruntime_matches_eager(cell, bidirectional, num_layers, pooling, tmp_path):
    cell, _, nonlinearity = cell.partition("_")
    check_matches_eager(ModelConfig(vocab_size=V, num_classes=C, embed_dim=E, hidden_size=H,
                                    cell=cell, nonlinearity=nonlinearity or "tanh",
                                    bidirectional=bidirectional, num_layers=num_layers,
                                    pooling=pooling, dropout=0.3), tmp_path)


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "mean_padded"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_execution_matches_eager(cell, pooling, tmp_path):
    """The lesson's padded execution: the recurrence runs over the padding, as in eager."""
    check_matches_eager(ModelConfig(vocab_size=V, num_classes=C, embed_dim=E, hidden_size=H,
                                    cell=cell, bidirectional=True, num_layers=2,
                                    pooling=pooling, execution="padded"), tmp_path)


@pytest.mark.parametrize("cell,op", [("rnn", "RNN"), ("lstm", "LSTM"), ("gru", "GRU")])
def test_graph_uses_standard_operators_with_sequence_lens(cell, op, tmp_path):
    model = SequenceClassifier(ModelConfig(vocab_size=V, num_classes=C, embed_dim=E,
                                           hidden_size=H, cell=cell, num_layers=2,
                                           bidirectional=True))
    proto = onnx.load(export_onnx(model, tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 14
    assert {n.op_type for n in proto.graph.node} <= STANDARD
    layers = [n for n in proto.graph.node if n.op_type == op]
    assert len(layers) == 2
    for n in layers:
        assert len(n.input) == 5 and n.input[4]  # X, W, R, B, sequence_lens
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["direction"] == b"bidirectional" and attrs["hidden_size"] == H
        if op == "GRU":
            assert attrs["linear_before_reset"] == 1
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(proto.graph.input) + list(proto.graph.output)}
    assert dims == {"ids": ["B", "T"], "lengths": ["B"], "logits": ["B", C]}
    types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    assert types == {"ids": onnx.TensorProto.INT64, "lengths": onnx.TensorProto.INT64}


def small_model(**kw) -> SequenceClassifier:
    return SequenceClassifier(ModelConfig(vocab_size=V, num_classes=C, embed_dim=E,
                                          hidden_size=H, **kw))


def test_refuses_what_onnx_cannot_express(tmp_path):
    path = tmp_path / "m.onnx"
    model = small_model()
    model.rnn = LSTM(E, H, batch_first=True, proj_size=2)
    with pytest.raises(ValueError, match=r"proj_size: expected 0 \(ONNX's LSTM operator has no "
                                         r"projection.*got 2"):
        export_onnx(model, path)

    class Custom(SequenceClassifier):
        pass

    with pytest.raises(ValueError, match="model: expected a SequenceClassifier, got the subclass "
                                         "Custom"):
        export_onnx(Custom(small_model().config), path)
    model = small_model()
    model.rnn = GRU(E, H, batch_first=True)
    with pytest.raises(ValueError, match=r"model.rnn: expected a packrnn LSTM \(cell='lstm'\), "
                                         "got GRU"):
        export_onnx(model, path)
    model = small_model()
    model.rnn = LSTM(E, H, num_layers=2, batch_first=True)
    with pytest.raises(ValueError, match=r"model.rnn: expected \(input_size, hidden_size, "
                                         r"num_layers, bidirectional\) = \(5, 6, 1, False\)"):
        export_onnx(model, path)
    with pytest.raises(TypeError, match="model: expected a packrnn SequenceClassifier, a Run or "
                                        "a run directory, got LSTM"):
        export_onnx(LSTM(E, H), path)
    vocab = Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(V - 2)])
    with pytest.raises(ValueError, match="tokenizer: expected one of basic_english, split "
                                         r"\(a custom callable cannot be stored"):
        export_onnx(small_model(), path, vocab=vocab, labels=["a", "b", "c"], tokenizer=str.split)
    with pytest.raises(ValueError, match="vocab: expected 23 tokens .*got 3"):
        export_onnx(small_model(), path, vocab=Vocab(["<pad>", "<unk>", "a"]),
                    labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="labels: expected 3 names .*got 2"):
        export_onnx(small_model(), path, vocab=vocab, labels=["a", "b"])
    with pytest.raises(ValueError, match="vocab/labels: expected both .*got vocab only"):
        export_onnx(small_model(), path, vocab=vocab)
    assert not path.exists()


def test_missing_onnx_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(ImportError, match=r"export_onnx needs the onnx package: pip install "
                                          r"'packrnn\[onnx\]'"):
        export_onnx(small_model(), tmp_path / "m.onnx")


def test_serving_tokenizer_equals_basic_english(tmp_path):
    vocab = Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(V - 2)])
    path = export_onnx(small_model(), tmp_path / "m.onnx", vocab=vocab, labels=["a", "b", "c"],
                       max_length=50)
    clf = OnnxClassifier(path)
    for text in ["It's a \"test\", (really)!  Isn't it?", "a;b:c<br />d", "Farm-related &lt; 3.5%",
                 "ÉTÉ à Paris... ok?!", "", "   "]:
        assert clf.tokenize(text) == basic_english(text)[:50]
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(meta["packrnn.labels"]) == ["a", "b", "c"]
    assert Vocab.from_dict(json.loads(meta["packrnn.vocab"])) == vocab
    assert json.loads(meta["packrnn.model_config"]) == small_model().config.to_dict()


# ----------------------------------------------------------------------------------------------
# packrnn export / packrnn predict model.onnx on tiny trained runs
# ----------------------------------------------------------------------------------------------

RUNS = {
    "bilstm2": ["--model", "lstm", "--bidirectional", "--layers", "2", "--pooling", "mean",
                "--max-length", "6"],
    "rnn_padded": ["--model", "rnn", "--execution", "padded", "--pooling", "mean_padded",
                   "--tokenizer", "split"],
}
TEXTS = ["the stock market and bank", "goal match", ";;", "zzz unknown words only",
         "computer chip war and peace stock market bank goal match team"]


@pytest.fixture(scope="module", params=sorted(RUNS))
def run_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    train_path = write_agnews(d / "train.csv", 120, 0)
    out = d / "run"
    assert main(["train", "--train", str(train_path), "--epochs", "1", "--lr", "0.01",
                 *RUNS[request.param], *FAST, "--output", str(out)]) == 0
    return out


def test_cli_export_then_predict_round_trip(run_dir, tmp_path, capsys):
    onnx_path = tmp_path / "model.onnx"
    capsys.readouterr()
    assert main(["export", str(run_dir), str(onnx_path)]) == 0
    assert f"wrote {onnx_path}" in capsys.readouterr().out
    assert main(["predict", str(onnx_path), *TEXTS, "--json"]) == 0
    served = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert main(["predict", str(run_dir), *TEXTS, "--json"]) == 0
    eager = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["text"] for r in served] == TEXTS
    assert [r["label"] for r in served] == [r["label"] for r in eager]
    for s, e in zip(served, eager):
        assert set(s["probabilities"]) == set(e["probabilities"])
        for name, p in e["probabilities"].items():
            assert s["probabilities"][name] == pytest.approx(p, abs=1e-5)
    # the logits themselves, on the encoded batch
    run, clf = load_run(run_dir), OnnxClassifier(onnx_path)
    ids, lengths = clf.encode(TEXTS)
    assert lengths.tolist() == [len(run.tokenize(t)) for t in TEXTS]
    with torch.no_grad():
        want = run.model(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(clf.logits(ids, lengths), want, rtol=1e-5, atol=1e-5)


def test_serving_module_needs_neither_torch_nor_packrnn(run_dir, tmp_path):
    onnx_path = export_onnx(run_dir, tmp_path / "model.onnx")
    import packrnn.serve_onnx as serve

    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        sys.modules["torch"] = None  # any import of torch (or packrnn) now fails
        sys.modules["packrnn"] = None
        spec = importlib.util.spec_from_file_location("serve_onnx", {str(serve.__file__)!r})
        serve = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(serve)
        clf = serve.OnnxClassifier({str(onnx_path)!r}, threads=1)
        print(json.dumps([p["label"] for p in clf.predict(json.loads(sys.argv[1]))]))
    """)
    done = subprocess.run([sys.executable, "-c", script, json.dumps(TEXTS)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [p["label"] for p in predict(run_dir, TEXTS)]


def test_cli_serving_errors(run_dir, tmp_path, capsys):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model")
    assert main(["predict", str(not_onnx), "text"]) == 2
    assert "notes.onnx: expected an ONNX model, got a file onnxruntime cannot load" in \
        one_error_line(capsys.readouterr().err)
    bare = export_onnx(load_run(run_dir).model, tmp_path / "bare.onnx")  # no vocab or labels
    assert main(["predict", str(bare), "text"]) == 2
    assert "bare.onnx: expected serving metadata (packrnn.labels" in \
        one_error_line(capsys.readouterr().err)
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block under ``heading`` in README.md."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_readme_serving_snippet_runs_as_written_without_torch(run_dir, tmp_path):
    export_onnx(run_dir, tmp_path / "model.onnx")
    code = readme_block("### Serve with ONNX", "python")
    script = "import sys\nsys.modules['torch'] = None\nsys.modules['packrnn'] = None\n" + code
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    texts = ["Stocks fell after the bank reported losses", "The team won the final"]
    assert done.stdout.strip() == str([p["label"] for p in predict(run_dir, texts)])
