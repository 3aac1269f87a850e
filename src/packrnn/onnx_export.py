"""Export a trained ``SequenceClassifier`` to ONNX with real lengths: ``export_onnx``.

The graph is built with the ``onnx`` package's helper API (``torch.onnx`` cannot export a
packed model, pytorch issues 49936 and 62240). Every recurrent layer is ONNX's standard
``LSTM`` / ``GRU`` / ``RNN`` operator fed the ``sequence_lens`` input, so any ONNX runtime
computes only each sequence's real steps, as packrnn does:

=====================  =====================================================================
input ``ids``          int64 ``(B, T)`` token ids, padded after each sequence's end
input ``lengths``      int64 ``(B,)`` real lengths, ``0 <= lengths[b] <= T``
output ``logits``      float32 ``(B, C)``
=====================  =====================================================================

``B`` and ``T`` are dynamic axes: one file serves every batch shape. The model's dropout is
left out (evaluation mode) and the weights are stored as float32.

NOTE [ONNX recurrent layouts]
ONNX stores one layer's weights as ``W`` ``(dirs, G*H, E_in)``, ``R`` ``(dirs, G*H, H)`` and
``B`` ``(dirs, 2*G*H)`` = ``[Wb, Rb]``, forward direction first, and orders the gate blocks
differently from torch: LSTM ``i, o, f, c`` (torch ``i, f, g, o``), GRU ``z, r, h`` (torch
``r, z, n``). torch's GRU applies the reset gate after the recurrent matmul, which is ONNX's
``linear_before_reset=1``. With ``sequence_lens``, ``Y_h`` holds the forward state at each
sequence's last real step and the reverse state after its first step, i.e. packrnn's
``h_n``; ``Y`` is ``(T, dirs, B, H)``, time-major (``layout=0``; onnxruntime implements no
other layout).

NOTE [zero-length sequences in ONNX]
onnxruntime rejects ``sequence_lens`` of 0, so the recurrent operators get ``max(lengths, 1)``
and the pooled features of an empty sequence are then replaced by zeros: packrnn's contract
(the initial state for ``last``, zeros for ``mean``/``max``; NOTE [zero-length sequences in
ops]). An empty sequence's row of ``ids`` should hold the padding index, like any padding.

What cannot be exported (refused with a ``ValueError``, never exported wrong): an LSTM with
``proj_size`` > 0 (ONNX's ``LSTM`` has no projection), a subclass of ``SequenceClassifier``
(its forward may differ), a recurrent module that disagrees with the model's config, and a
custom tokenizer callable as serving metadata (only ``"basic_english"`` and ``"split"`` can
be written into the file).

The file's ``metadata_props`` carry what serving needs (``packrnn.serve_onnx`` reads them with
onnxruntime alone): ``packrnn.format``, ``packrnn.model_config`` (JSON) and, when exported
from a run or given a vocabulary and labels, ``packrnn.labels`` (JSON list),
``packrnn.vocab`` (``Vocab.to_dict()`` JSON), ``packrnn.tokenizer`` (JSON: name, lowercase,
regex rules, applied in order before splitting on whitespace), ``packrnn.max_length`` (JSON
int or null), ``packrnn.pad_index`` and ``packrnn.execution``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .data.tokenizer import _BASIC_ENGLISH_RULES
from .data.vocab import Vocab
from .models import SequenceClassifier
from .rnn import GRU, LSTM, RNN

__all__ = ["export_onnx", "OPSET", "FORMAT"]

OPSET = 17  # ONNX opset of the exported graph (>= 14: sequence_lens, Reduce* axes attributes)
IR_VERSION = 8  # the oldest ONNX IR that opset 17 allows, so older runtimes load the file
FORMAT = "packrnn.onnx/1"  # value of the metadata key packrnn.format

# Gate blocks in ONNX order, as indices of torch's blocks (NOTE [ONNX recurrent layouts]).
_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}
_OP = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}
_MODULE = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
TOKENIZERS = ("basic_english", "split")


def tokenizer_spec(name: str) -> dict[str, Any]:
    """The JSON description of a named tokenizer written to ``packrnn.tokenizer``.

    ``{"name", "lowercase", "rules": [[pattern, replacement], ...]}``: lowercase the text if
    asked, apply each Python ``re.sub`` in order, split on whitespace.

    >>> tokenizer_spec("split")
    {'name': 'split', 'lowercase': False, 'rules': []}
    """
    if name == "basic_english":
        rules = [[p.pattern, r] for p, r in _BASIC_ENGLISH_RULES]
        return {"name": name, "lowercase": True, "rules": rules}
    if name == "split":
        return {"name": name, "lowercase": False, "rules": []}
    raise ValueError(f"tokenizer: expected one of {', '.join(TOKENIZERS)} (a custom callable "
                     f"cannot be stored in an ONNX file), got {name!r}")


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx needs the onnx package: pip install 'packrnn[onnx]' "
                          f"({e})") from e
    return onnx


def _check_exportable(model: Any) -> None:
    """Refuse what the ONNX graph cannot express (see the module docstring)."""
    if not isinstance(model, SequenceClassifier):
        raise TypeError(f"model: expected a packrnn SequenceClassifier, a Run or a run "
                        f"directory, got {type(model).__name__}")
    if type(model) is not SequenceClassifier:
        raise ValueError(f"model: expected a SequenceClassifier, got the subclass "
                         f"{type(model).__name__} (its forward may differ from the exported graph)")
    c, rnn = model.config, model.rnn
    if not isinstance(rnn, _MODULE[c.cell]):
        raise ValueError(f"model.rnn: expected a packrnn {_MODULE[c.cell].__name__} "
                         f"(cell={c.cell!r}), got {type(rnn).__name__}")
    if getattr(rnn, "proj_size", 0):
        raise ValueError(f"proj_size: expected 0 (ONNX's LSTM operator has no projection, so "
                         f"this model cannot be exported to ONNX), got {rnn.proj_size}")
    got = (rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bidirectional)
    want = (c.embed_dim, c.hidden_size, c.num_layers, c.bidirectional)
    if got != want:
        raise ValueError(f"model.rnn: expected (input_size, hidden_size, num_layers, "
                         f"bidirectional) = {want} as in the model's config, got {got}")
    if c.cell == "rnn" and rnn.nonlinearity != c.nonlinearity:
        raise ValueError(f"model.rnn.nonlinearity: expected {c.nonlinearity!r} as in the "
                         f"model's config, got {rnn.nonlinearity!r}")


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _layer_weights(model: SequenceClassifier, layer: int) -> tuple[np.ndarray, ...]:
    """ONNX ``W``, ``R``, ``B`` of one layer from torch's parameters (NOTE [ONNX recurrent
    layouts])."""
    c, rnn = model.config, model.rnn
    H = c.hidden_size
    order = _GATE_ORDER[c.cell]

    def gates(t: np.ndarray) -> np.ndarray:  # (G*H, ...) torch order -> ONNX order
        return np.concatenate([t[g * H:(g + 1) * H] for g in order], axis=0)

    W, R, B = [], [], []
    for suffix in ("", "_reverse")[:2 if c.bidirectional else 1]:
        w_ih = _f32(getattr(rnn, f"weight_ih_l{layer}{suffix}"))  # (G*H, E_in)
        w_hh = _f32(getattr(rnn, f"weight_hh_l{layer}{suffix}"))  # (G*H, H)
        if rnn.bias:
            b_ih = _f32(getattr(rnn, f"bias_ih_l{layer}{suffix}"))  # (G*H,)
            b_hh = _f32(getattr(rnn, f"bias_hh_l{layer}{suffix}"))  # (G*H,)
        else:
            b_ih = b_hh = np.zeros(w_ih.shape[0], dtype=np.float32)
        W.append(gates(w_ih))
        R.append(gates(w_hh))
        B.append(np.concatenate([gates(b_ih), gates(b_hh)]))
    return np.stack(W), np.stack(R), np.stack(B)  # (dirs, G*H, E_in), (dirs, G*H, H), (dirs, 2GH)


class _Graph:
    """Nodes and initializers of one ONNX graph, with unique names."""

    def __init__(self, onnx) -> None:
        self.onnx, self.helper = onnx, onnx.helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._consts: set[str] = set()

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer, added on first use (onnxruntime warns about unused ones)."""
        if name not in self._consts:
            self._consts.add(name)
            self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant, e.g. axes or a shape."""
        return self.const("ints_" + "_".join(map(str, values)), np.array(values, dtype=np.int64))

    def scalar(self, value: int | float) -> str:
        """A 0-D constant: int64 for an int, float32 for a float."""
        dtype = np.int64 if isinstance(value, int) else np.float32
        return self.const(f"{dtype.__name__}_{value}", np.array(value, dtype=dtype))

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> Any:
        self._count += 1
        outs = [f"{op_type.lower()}_{self._count}" + (f"_{i}" if n_out > 1 else "")
                for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs,
                                                name=f"{op_type}_{self._count}", **attrs))
        return outs[0] if n_out == 1 else outs


def _build_graph(onnx, model: SequenceClassifier):
    """The ``GraphProto`` of ``model(ids, lengths)`` in evaluation mode (module docstring)."""
    c = model.config
    g = _Graph(onnx)
    dirs = 2 if c.bidirectional else 1
    D = dirs * c.hidden_size
    packed = c.execution == "packed"

    def has_steps() -> str:  # (B, 1) bool: lengths > 0
        return g.op("Unsqueeze", [g.op("Greater", ["lengths", g.scalar(0)]), g.ints(1)])

    def at_least_one(lengths: str) -> str:  # (B,) max(lengths, 1)
        return g.op("Max", [lengths, g.scalar(1)])

    table = g.const("embedding.weight", _f32(model.embedding.weight))  # (V, E)
    emb = g.op("Gather", [table, "ids"])  # (B, T, E)
    x = g.op("Transpose", [emb], perm=[1, 0, 2])  # (T, B, E): time-major, layout=0
    if packed:  # NOTE [zero-length sequences in ONNX]: the operators see at least one step.
        seq_lens = g.op("Cast", [at_least_one("lengths")], to=onnx.TensorProto.INT32)  # (B,)

    attrs: dict[str, Any] = dict(hidden_size=c.hidden_size,
                                 direction="bidirectional" if c.bidirectional else "forward")
    if c.cell == "gru":
        attrs["linear_before_reset"] = 1  # torch's GRU (NOTE [ONNX recurrent layouts])
    if c.cell == "rnn":
        attrs["activations"] = [c.nonlinearity.capitalize()] * dirs  # "Tanh" / "Relu"
    for layer in range(c.num_layers):
        W, R, B = _layer_weights(model, layer)
        inputs = [x, g.const(f"W_l{layer}", W), g.const(f"R_l{layer}", R),
                  g.const(f"B_l{layer}", B)]
        if packed:  # padded execution runs over every position, as packrnn's does
            inputs.append(seq_lens)
        y, y_h = g.op(_OP[c.cell], inputs, n_out=2, **attrs)  # (T, dirs, B, H), (dirs, B, H)
        x = g.op("Reshape", [g.op("Transpose", [y], perm=[0, 2, 1, 3]),
                             g.ints(0, 0, D)])  # (T, B, D): forward, reverse features

    if c.pooling == "last":
        z = g.op("Reshape", [g.op("Transpose", [y_h], perm=[1, 0, 2]),
                             g.ints(0, D)])  # (B, D): forward, reverse
        if packed:  # an empty sequence keeps the initial state (zeros)
            z = g.op("Where", [has_steps(), z, g.scalar(0.0)])
    elif c.pooling == "mean_padded":
        z = g.op("ReduceMean", [x], axes=[0], keepdims=0)  # (B, D): padding included
    else:
        T = g.op("Gather", [g.op("Shape", ["ids"]), g.scalar(1)])  # 0-D
        steps = g.op("Range", [g.scalar(0), T, g.scalar(1)])  # (T,)
        real = g.op("Less", [g.op("Unsqueeze", [steps, g.ints(1)]),
                             g.op("Unsqueeze", ["lengths", g.ints(0)])])  # (T, B)
        real = g.op("Unsqueeze", [real, g.ints(2)])  # (T, B, 1)
        if c.pooling == "mean":
            total = g.op("ReduceSum", [g.op("Where", [real, x, g.scalar(0.0)]), g.ints(0)],
                         keepdims=0)  # (B, D)
            count = g.op("Cast", [at_least_one("lengths")], to=onnx.TensorProto.FLOAT)  # (B,)
            z = g.op("Div", [total, g.op("Unsqueeze", [count, g.ints(1)])])  # (B, D)
        else:
            masked = g.op("Where", [real, x, g.scalar(float("-inf"))])  # (T, B, D)
            z = g.op("ReduceMax", [masked], axes=[0], keepdims=0)  # (B, D)
            z = g.op("Where", [has_steps(), z, g.scalar(0.0)])  # zeros for an empty sequence
    g.nodes.append(onnx.helper.make_node(
        "Gemm", [z, g.const("fc.weight", _f32(model.fc.weight)),
                 g.const("fc.bias", _f32(model.fc.bias))], ["logits"], name="fc", transB=1))

    TP = onnx.TensorProto
    return onnx.helper.make_graph(
        g.nodes, "packrnn_sequence_classifier",
        inputs=[onnx.helper.make_tensor_value_info("ids", TP.INT64, ["B", "T"]),
                onnx.helper.make_tensor_value_info("lengths", TP.INT64, ["B"])],
        outputs=[onnx.helper.make_tensor_value_info("logits", TP.FLOAT, ["B", c.num_classes])],
        initializer=g.initializers)


def export_onnx(model: Any, path: str | os.PathLike, *, vocab: Vocab | None = None,
                labels: Sequence[str] | None = None, tokenizer: str = "basic_english",
                max_length: int | None = None) -> Path:
    """Write a ``SequenceClassifier`` as an ONNX file whose RNN layers use ``sequence_lens``.

    The file computes ``model(ids, lengths)`` in evaluation mode (see the module docstring for
    its inputs, outputs and metadata) and passes ``onnx.checker``.

    Args:
        model: a ``SequenceClassifier``, a ``packrnn.train.Run`` or a run directory written by
            ``packrnn train``. A run brings its vocabulary, labels, tokenizer and
            ``max_length``, written as serving metadata.
        path: the ``.onnx`` file to write (replaced if it exists).
        vocab: with a bare model: the ``Vocab`` to store for serving. Default: None.
        labels: with a bare model: the label names, class ``i`` is ``labels[i]``. Default: None.
        tokenizer: with a bare model: ``"basic_english"`` (default) or ``"split"``.
        max_length: with a bare model: truncate texts to this many tokens. Default: None.

    Returns:
        the path written.

    Raises:
        ValueError: a configuration ONNX cannot express (module docstring), or serving
            metadata that does not fit the model.
        ImportError: the ``onnx`` package is missing (``pip install 'packrnn[onnx]'``).

    >>> import tempfile, onnx
    >>> from packrnn import ModelConfig, SequenceClassifier
    >>> model = SequenceClassifier(ModelConfig(vocab_size=10, num_classes=3, bidirectional=True))
    >>> path = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx")
    >>> [n.op_type for n in onnx.load(path).graph.node if n.op_type == "LSTM"]
    ['LSTM']
    """
    from .train import Run, load_run

    onnx = _import_onnx()
    if isinstance(model, (str, os.PathLike)):
        model = load_run(model)
    if isinstance(model, Run):
        if vocab is not None or labels is not None:
            raise ValueError("vocab/labels: expected None with a run (it has its own), got values")
        run = model
        model, vocab, labels = run.model, run.vocab, run.labels
        tokenizer, max_length = run.config.tokenizer, run.config.max_length
    _check_exportable(model)
    c = model.config
    meta = {"packrnn.format": FORMAT, "packrnn.model_config": json.dumps(c.to_dict())}
    if (vocab is None) != (labels is None):
        raise ValueError("vocab/labels: expected both (to serve the file) or neither, got "
                         f"{'vocab' if vocab is not None else 'labels'} only")
    if vocab is not None:
        if not isinstance(vocab, Vocab):
            raise TypeError(f"vocab: expected a packrnn Vocab, got {type(vocab).__name__}")
        if len(vocab) != c.vocab_size:
            raise ValueError(f"vocab: expected {c.vocab_size} tokens (the model's vocab_size), "
                             f"got {len(vocab)}")
        if isinstance(labels, str) or not all(isinstance(n, str) for n in labels):
            raise TypeError(f"labels: expected a list of str, got {labels!r}")
        labels = list(labels)
        if len(labels) != c.num_classes:
            raise ValueError(f"labels: expected {c.num_classes} names (the model's "
                             f"num_classes), got {len(labels)}")
        if max_length is not None and (isinstance(max_length, bool)
                                       or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length: expected None or an int >= 1, got {max_length!r}")
        meta.update({
            "packrnn.labels": json.dumps(labels, ensure_ascii=False),
            "packrnn.vocab": json.dumps(vocab.to_dict(), ensure_ascii=False),
            "packrnn.tokenizer": json.dumps(tokenizer_spec(tokenizer)),
            "packrnn.max_length": json.dumps(max_length),
            "packrnn.pad_index": str(vocab.pad_index if vocab.pad_index is not None else 0),
            "packrnn.execution": c.execution,
        })
    with torch.no_grad():
        graph = _build_graph(onnx, model)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="packrnn")
    proto.ir_version = IR_VERSION
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return path
