"""Serve a classifier exported by ``packrnn export`` with onnxruntime: ``OnnxClassifier``.

This module imports only the standard library (``json``, ``re``), NumPy and onnxruntime (the
latter when a model is opened): no torch and no packrnn model code. Everything else comes
from the ``.onnx`` file's metadata (``packrnn.onnx_export`` documents the keys): the
tokenizer's rules, the vocabulary, the labels, ``max_length`` and the padding index. The file
can be copied next to a model and used without packrnn installed.

Predictions equal ``packrnn.train.predict`` on the run the file was exported from: same
tokens, same ids, same batches of ``batch_size`` texts (which matters only for
``execution="padded"`` runs), logits within float32 rounding.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np

__all__ = ["OnnxClassifier", "FORMAT"]

FORMAT = "packrnn.onnx/1"  # the packrnn.format this module reads (packrnn.onnx_export.FORMAT)
_SERVING_KEYS = ("packrnn.labels", "packrnn.vocab", "packrnn.tokenizer", "packrnn.max_length",
                 "packrnn.pad_index")


class OnnxClassifier:
    """A text classifier served by onnxruntime from a ``packrnn export`` file.

    Args:
        path: the ``.onnx`` file written by ``packrnn export`` / ``export_onnx`` from a run.
        threads: onnxruntime intra-op threads. Default: None (onnxruntime's choice).

    Attributes:
        labels: label names; class ``i`` is ``labels[i]``.
        session: the ``onnxruntime.InferenceSession`` (inputs ``ids`` (B, T) int64 and
            ``lengths`` (B,) int64, output ``logits`` (B, C) float32).

    ``packrnn export RUN_DIR model.onnx`` writes such a file from a trained run; here, from an
    untrained model and a four-token vocabulary:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from packrnn import ModelConfig, SequenceClassifier, export_onnx
    >>> from packrnn.data import Vocab
    >>> model = SequenceClassifier(ModelConfig(vocab_size=4, num_classes=2))
    >>> path = export_onnx(model, Path(tempfile.mkdtemp()) / "model.onnx",
    ...                    vocab=Vocab(["<pad>", "<unk>", "good", "bad"]), labels=["neg", "pos"])
    >>> clf = OnnxClassifier(path)
    >>> clf.encode(["Good, good!", ""])
    (array([[2, 1, 2, 1],
           [0, 0, 0, 0]]), array([4, 0]))
    >>> [p["label"] in ("neg", "pos") for p in clf.predict(["good", "bad"])]
    [True, True]
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("serving an .onnx file needs onnxruntime: pip install "
                              f"'packrnn[onnx]' ({e})") from e
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(2, "No such file", path)
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for unreadable files
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path}: expected an ONNX model, got a file onnxruntime cannot "
                             f"load ({first})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("packrnn.format") != FORMAT:
            raise ValueError(f"{path}: expected a packrnn ONNX export (packrnn.format "
                             f"{FORMAT!r}), got {meta.get('packrnn.format')!r}")
        missing = [k for k in _SERVING_KEYS if k not in meta]
        if missing:
            raise ValueError(f"{path}: expected serving metadata ({', '.join(missing)}), got "
                             "none: export it from a run directory, or pass vocab and labels "
                             "to export_onnx")
        self.labels: list[str] = json.loads(meta["packrnn.labels"])
        vocab = json.loads(meta["packrnn.vocab"])
        self._stoi = {t: i for i, t in enumerate(vocab["tokens"])}
        self._unk = None if vocab["unk_token"] is None else self._stoi[vocab["unk_token"]]
        spec = json.loads(meta["packrnn.tokenizer"])
        self._lowercase = bool(spec["lowercase"])
        self._rules = [(re.compile(p), r) for p, r in spec["rules"]]
        self.max_length: int | None = json.loads(meta["packrnn.max_length"])
        self.pad_index = int(meta["packrnn.pad_index"])

    def tokenize(self, text: str) -> list[str]:
        """The run's tokenizer, from the file's rules (truncated to ``max_length``)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        if self._lowercase:
            text = text.lower()
        for pattern, replacement in self._rules:
            text = pattern.sub(replacement, text)
        return text.split()[: self.max_length]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``(B, T)`` padded with ``pad_index`` (``T`` >= 1) and lengths ``(B,)``."""
        rows = []
        for text in texts:
            ids = [self._stoi.get(t, self._unk) for t in self.tokenize(text)]
            if None in ids:
                token = next(t for t in self.tokenize(text) if t not in self._stoi)
                raise KeyError(f"tokens: {token!r} is not in the vocabulary and it has no "
                               "unk_token")
            rows.append(ids)
        lengths = np.array([len(r) for r in rows], dtype=np.int64)  # (B,)
        ids = np.full((len(rows), max(1, int(lengths.max(initial=0)))), self.pad_index,
                      dtype=np.int64)  # (B, T)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
        return ids, lengths

    def logits(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Run the model: ``ids`` (B, T) int64, ``lengths`` (B,) int64 -> logits (B, C)."""
        return self.session.run(["logits"], {"ids": np.asarray(ids, dtype=np.int64),
                                             "lengths": np.asarray(lengths, dtype=np.int64)})[0]

    def predict(self, texts: Sequence[str], batch_size: int = 256) -> list[dict[str, Any]]:
        """Label each text: ``[{"text", "label", "probability", "probabilities"}, ...]``,
        as ``packrnn.train.predict``."""
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of str, got a str (wrap it in a list)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        texts = list(texts)
        results: list[dict[str, Any]] = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            logits = self.logits(*self.encode(chunk)).astype(np.float64)  # (B, C)
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)  # (B, C) softmax
            for text, p in zip(chunk, probs):
                k = int(p.argmax())
                results.append({"text": text, "label": self.labels[k],
                                "probability": float(p[k]),
                                "probabilities": {n: float(q) for n, q in zip(self.labels, p)}})
        return results
