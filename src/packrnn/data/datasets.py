"""Text classification data sets: read AG News / CSV / TSV / JSONL files, encode to token ids.

Two steps, each usable alone:

1. **Read** a file into :class:`TextRecords` (texts, label strings, the line of each record):
   :func:`read_agnews`, :func:`read_csv`, :func:`read_jsonl`, or :func:`read_records` by format.
2. **Encode** them with a tokenizer, a :class:`~packrnn.data.Vocab` and a :class:`LabelMap` into
   a :class:`TextClassificationDataset` whose item ``i`` is ``(ids, label)``.

:func:`load_text_classification` does both, building the vocabulary and label map from the
file when none are given (the training file) and reusing them otherwise (the test file).

Bad input (NOTE [bad rows]) raises ``ValueError`` naming the file and the line; with
``skip_bad_rows=True`` bad rows are skipped, counted in ``.skipped`` and reported with one
warning instead.
"""

# NOTE [bad rows]
#
# A row is bad when it cannot be parsed (CSV quoting, invalid JSON, not a JSON object), has the
# wrong number of columns, lacks the text or label column/key, has an empty or invalid label
# (AG News: not 1-4), a label the label map does not know (evaluation data), or holds bytes
# that are not UTF-8. Errors name the file and the 1-based line where the record starts:
# "train.csv:7: expected 3 columns (label, title, description), got 2". Lines end at "\n",
# "\r\n" or a lone "\r" (old Mac files), in every format.
# Whole-file problems are always errors, even with skip_bad_rows: a missing file, an empty
# file, a CSV header without the chosen columns, no usable rows at all.
# A text that tokenizes to nothing is NOT bad: it becomes a zero-length sequence, which the
# packing utilities, the samplers, the collate functions and packrnn.ops all accept.

from __future__ import annotations

import csv
import io
import json
import numbers
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .tokenizer import Tokenizer, get_tokenizer
from .vocab import Vocab, build_vocab_from_iterator

__all__ = [
    "AG_NEWS_LABELS",
    "BadRow",
    "LabelMap",
    "TextRecords",
    "TextClassificationDataset",
    "read_agnews",
    "read_csv",
    "read_jsonl",
    "read_records",
    "load_text_classification",
    "FORMATS",
]

AG_NEWS_LABELS = ("World", "Sports", "Business", "Sci/Tech")
"""AG News class names; label ``k`` (1-4) in the CSV is ``AG_NEWS_LABELS[k - 1]``."""

FORMATS = ("agnews", "csv", "tsv", "jsonl")

# a progress bar is shown for files with at least this many records when progress=None
_PROGRESS_MIN_RECORDS = 20_000
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # undecodable bytes under errors="surrogateescape"
_INT_LABEL = re.compile(r"[+-]?\d+")
_LINE_END = re.compile(r"\r\n|\r|\n")  # Unix, Windows and old Mac line ends (CSV's set too)


# ------------------------------------------------------------------------------------------------
# records and labels
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    """A row skipped with ``skip_bad_rows=True``: where it is and what was wrong."""

    path: str  # the file
    line: int  # 1-based line where the record starts
    reason: str  # "expected X, got Y"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class TextRecords:
    """The parsed rows of one file: ``texts[i]`` has label ``labels[i]`` and starts at ``lines[i]``."""

    path: str  # the file read
    texts: list[str] = field(default_factory=list)  # raw text (AG News: title + " " + description)
    labels: list[str] = field(default_factory=list)  # label strings, whitespace-stripped
    lines: list[int] = field(default_factory=list)  # 1-based line where each record starts
    skipped: list[BadRow] = field(default_factory=list)  # bad rows skipped (skip_bad_rows=True)

    def __len__(self) -> int:
        return len(self.texts)


class LabelMap:
    """Label strings <-> class indices ``0 .. C-1``.

    Args:
        names (sequence of str): the label of each class index, unique.

    >>> m = LabelMap.from_labels(["pos", "neg", "pos"])
    >>> m.names, m.encode("pos"), m.decode(0)
    (['neg', 'pos'], 1, 'neg')
    """

    def __init__(self, names: Sequence[str]) -> None:
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"names: expected a sequence of str, got {type(names).__name__}")
        self.names = [str(n) if isinstance(n, numbers.Integral) else n for n in names]
        self._index: dict[str, int] = {}
        for i, name in enumerate(self.names):
            if not isinstance(name, str):
                raise TypeError(f"names[{i}]: expected a str, got {type(name).__name__}")
            if name in self._index:
                raise ValueError(f"names: expected unique labels, got {name!r} twice")
            self._index[name] = i
        if not self.names:
            raise ValueError("names: expected at least one label, got none")

    @classmethod
    def from_labels(cls, labels: Iterable[str | int]) -> LabelMap:
        """The sorted distinct labels: numerically if all are integers ("2" < "10"), else as strings."""
        distinct = {str(label).strip() for label in labels}
        if distinct and all(_INT_LABEL.fullmatch(x) for x in distinct):
            return cls(sorted(distinct, key=int))
        return cls(sorted(distinct))

    @classmethod
    def agnews(cls) -> LabelMap:
        """World, Sports, Business, Sci/Tech (AG News labels 1-4 -> classes 0-3)."""
        return cls(AG_NEWS_LABELS)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, label: object) -> bool:
        return str(label).strip() in self._index

    def encode(self, label: str | int) -> int:
        """Class index of ``label``; ``KeyError`` for an unknown label."""
        key = str(label).strip()
        if key not in self._index:
            raise KeyError(f"label: expected one of {self.names}, got {key!r}")
        return self._index[key]

    def decode(self, index: int) -> str:
        """Label string of class ``index``."""
        if not 0 <= int(index) < len(self.names):
            raise IndexError(f"index: expected 0 <= index < {len(self.names)}, got {index}")
        return self.names[int(index)]

    def to_dict(self) -> dict:
        """A JSON-able dict that :meth:`from_dict` restores (for checkpoints)."""
        return {"format": "packrnn.labels/1", "names": list(self.names)}

    @classmethod
    def from_dict(cls, state: dict) -> LabelMap:
        if not isinstance(state, dict) or state.get("format") != "packrnn.labels/1" or "names" not in state:
            raise ValueError(f"state: expected a dict from LabelMap.to_dict(), got {state!r:.80}")
        return cls(state["names"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and self.names == other.names

    def __repr__(self) -> str:
        return f"LabelMap({self.names!r})"


# ------------------------------------------------------------------------------------------------
# reading files
# ------------------------------------------------------------------------------------------------


class _Rows:
    """Collects records of one file; raises on a bad row or records it when skipping."""

    def __init__(self, path: str, skip_bad_rows: bool) -> None:
        self.out = TextRecords(path)
        self.skip = skip_bad_rows

    def bad(self, line: int, reason: str) -> None:
        if not self.skip:
            raise ValueError(f"{self.out.path}:{line}: {reason}")
        self.out.skipped.append(BadRow(self.out.path, line, reason))

    def add(self, line: int, text: str, label: str) -> None:
        match = _BAD_BYTE.search(text) or _BAD_BYTE.search(label)
        if match:
            self.bad(line, _bad_byte_reason(match.group()))
            return
        self.out.texts.append(text)
        self.out.labels.append(label)
        self.out.lines.append(line)

    def finish(self) -> TextRecords:
        out = self.out
        if not out.texts:
            why = f" ({len(out.skipped)} bad rows skipped; first: {out.skipped[0]})" if out.skipped else ""
            raise ValueError(f"{out.path}: expected at least one data row, got none{why}")
        if out.skipped:
            warnings.warn(
                f"{out.path}: skipped {len(out.skipped)} bad rows (first: line {out.skipped[0].line}: "
                f"{out.skipped[0].reason})",
                stacklevel=3,
            )
        return out


def _bad_byte_reason(char: str) -> str:
    return f"expected UTF-8 text, got the invalid byte 0x{ord(char) - 0xDC00:02x}"


def _read_text(path: str | os.PathLike, skip_bad_rows: bool) -> tuple[str, str]:
    """Read a whole file as text; undecodable bytes become lone surrogates (NOTE [bad rows])."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"path: expected an existing file, got {name!r}")
    with open(name, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"{name}: expected a non-empty file, got an empty file")
    text = raw.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark, as Excel writes
        text = text[1:]
    if not skip_bad_rows:
        match = _BAD_BYTE.search(text)
        if match:
            line = len(_LINE_END.findall(text, 0, match.start())) + 1
            raise ValueError(f"{name}:{line}: {_bad_byte_reason(match.group())}")
    return name, text


def _csv_rows(text: str, delimiter: str, quotechar: str | None):
    """Yield ``(line, row, error)`` for every non-blank CSV record; ``line`` is where it starts."""
    quoting = csv.QUOTE_MINIMAL if quotechar else csv.QUOTE_NONE
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quotechar=quotechar or '"',
        quoting=quoting,
        strict=True,
    )
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # long documents are fine; the default is 128 KiB
    try:
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield line, None, f"expected a valid CSV row, got a parse error ({e})"
                continue
            if row:  # blank lines are not rows
                yield line, row, None
    finally:
        csv.field_size_limit(old_limit)


def read_agnews(path: str | os.PathLike, *, skip_bad_rows: bool = False) -> TextRecords:
    """Read the AG News CSV format: no header; columns label (1-4), title, description.

    Text is ``title + " " + description`` (as torchtext's AG_NEWS); labels become the names
    World, Sports, Business, Sci/Tech (:data:`AG_NEWS_LABELS`).

    Args:
        path: the CSV file (UTF-8).
        skip_bad_rows (bool): skip and count malformed rows instead of raising. Default: False.

    Raises:
        ValueError: ``"<file>:<line>: <reason>"`` for a bad row (NOTE [bad rows]), or an empty
            file.
    """
    name, text = _read_text(path, skip_bad_rows)
    rows = _Rows(name, skip_bad_rows)
    for line, row, error in _csv_rows(text, ",", '"'):
        if error:
            rows.bad(line, error)
        elif len(row) != 3:
            rows.bad(line, f"expected 3 columns (label, title, description), got {len(row)}")
        elif row[0].strip() not in ("1", "2", "3", "4"):
            rows.bad(line, f"expected a label 1-4 in the first column, got {row[0]!r}")
        else:
            rows.add(line, row[1] + " " + row[2], AG_NEWS_LABELS[int(row[0]) - 1])
    return rows.finish()


def _columns(value: str | Sequence[str], name: str) -> list[str]:
    cols = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not cols or not all(isinstance(c, str) for c in cols):
        raise TypeError(f"{name}: expected a column name or a non-empty list of names, got {value!r}")
    return cols


def read_csv(
    path: str | os.PathLike,
    *,
    text_column: str | Sequence[str] = "text",
    label_column: str | None = "label",
    delimiter: str = ",",
    quotechar: str | None = '"',
    skip_bad_rows: bool = False,
) -> TextRecords:
    """Read a CSV/TSV file with a header row, taking the text and label from named columns.

    Args:
        path: the file (UTF-8).
        text_column (str or list of str): the text column; several are joined with a space
            (e.g. ``["title", "body"]``). Default: ``"text"``.
        label_column (str or None): the label column; integer or string labels. ``None``: the
            texts have no labels (``labels`` holds ``""``, e.g. for a language model).
            Default: ``"label"``.
        delimiter (str): ``","`` for CSV, ``"\\t"`` for TSV. Default: ``","``.
        quotechar (str or None): the quote character; ``None`` reads fields verbatim (no
            quoting, the usual TSV convention). Default: ``'"'``.
        skip_bad_rows (bool): skip and count malformed rows instead of raising. Default: False.

    Raises:
        ValueError: a missing column (lists the header), a bad row (``"<file>:<line>: ..."``,
            NOTE [bad rows]), an empty file or no data rows.
    """
    text_cols = _columns(text_column, "text_column")
    if label_column is not None and not isinstance(label_column, str):
        raise TypeError(f"label_column: expected a column name or None, got {label_column!r}")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter: expected a single character, got {delimiter!r}")
    name, text = _read_text(path, skip_bad_rows)
    rows = _Rows(name, skip_bad_rows)
    records = _csv_rows(text, delimiter, quotechar)
    header = None
    for line, row, error in records:
        if error:  # a broken header cannot be skipped: the columns would be unknown
            raise ValueError(f"{name}:{line}: {error}")
        header = [h.strip() for h in row]
        break
    wanted = text_cols + ([label_column] if label_column is not None else [])
    for col in wanted:
        if header.count(col) != 1:
            got = "twice" if header.count(col) > 1 else "no such column"
            raise ValueError(f"{name}:1: expected a column {col!r} in the header {header}, got {got}")
    text_idx = [header.index(c) for c in text_cols]
    label_idx = header.index(label_column) if label_column is not None else None
    for line, row, error in records:
        if error:
            rows.bad(line, error)
        elif len(row) != len(header):
            rows.bad(line, f"expected {len(header)} columns as in the header, got {len(row)}")
        elif label_idx is not None and not row[label_idx].strip():
            rows.bad(line, f"expected a label in column {label_column!r}, got an empty field")
        else:
            label = row[label_idx].strip() if label_idx is not None else ""
            rows.add(line, " ".join(row[i] for i in text_idx), label)
    return rows.finish()


def read_jsonl(
    path: str | os.PathLike,
    *,
    text_key: str | Sequence[str] = "text",
    label_key: str | None = "label",
    skip_bad_rows: bool = False,
) -> TextRecords:
    """Read JSON Lines: one JSON object per line, text and label under the given keys.

    Args:
        path: the file (UTF-8); blank lines are ignored.
        text_key (str or list of str): the text key(s); several are joined with a space.
            Default: ``"text"``.
        label_key (str or None): the label key; a JSON string or integer. ``None``: no labels
            (``labels`` holds ``""``). Default: ``"label"``.
        skip_bad_rows (bool): skip and count malformed lines instead of raising. Default: False.

    Raises:
        ValueError: a bad line (``"<file>:<line>: ..."``, NOTE [bad rows]), an empty file or no
            data rows.
    """
    text_keys = _columns(text_key, "text_key")
    if label_key is not None and not isinstance(label_key, str):
        raise TypeError(f"label_key: expected a key name or None, got {label_key!r}")
    keys = text_keys + ([label_key] if label_key is not None else [])
    name, text = _read_text(path, skip_bad_rows)
    rows = _Rows(name, skip_bad_rows)
    for number, obj, error in _json_objects(text):
        if error is not None:
            rows.bad(number, error)
            continue
        missing = [k for k in keys if k not in obj]
        if missing:
            rows.bad(number, f"expected keys {keys}, got no {missing[0]!r}")
            continue
        bad_text = next((k for k in text_keys if not isinstance(obj[k], str)), None)
        if bad_text is not None:
            rows.bad(number, f"expected a string under {bad_text!r}, got {type(obj[bad_text]).__name__}")
            continue
        label = obj[label_key] if label_key is not None else ""
        if label_key is not None and (isinstance(label, bool) or not isinstance(label, (str, int))
                                      or not str(label).strip()):
            rows.bad(number, f"expected a non-empty string or integer label under {label_key!r}, got {label!r}")
            continue
        rows.add(number, " ".join(obj[k] for k in text_keys), str(label).strip())
    return rows.finish()


def _json_objects(text: str) -> Iterator[tuple[int, dict | None, str | None]]:
    """The non-blank lines of a JSON Lines text, each as ``(line number, object, None)``, or as
    ``(line number, None, reason)`` when it is not a JSON object (shared by the JSONL readers)."""
    # Not str.splitlines: it also splits at U+2028 and other characters JSON strings may hold.
    for number, raw in enumerate(_LINE_END.split(text), start=1):
        raw = raw.strip()
        if not raw:
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            yield number, None, f"expected a JSON object, got invalid JSON ({e.msg} at column {e.colno})"
            continue
        if not isinstance(obj, dict):
            yield number, None, f"expected a JSON object, got a JSON {type(obj).__name__}"
            continue
        yield number, obj, None


def read_records(path: str | os.PathLike, format: str = "agnews", *, skip_bad_rows: bool = False, **options) -> TextRecords:
    """Read a file in one of :data:`FORMATS`: ``"agnews"``, ``"csv"``, ``"tsv"`` or ``"jsonl"``.

    ``options`` go to the reader: ``text_column`` / ``label_column`` (csv, tsv; TSV fields are
    read verbatim, no quoting), ``text_key`` / ``label_key`` (jsonl).
    """
    if format == "agnews":
        if options:
            raise TypeError(f"options: expected none for format 'agnews', got {sorted(options)}")
        return read_agnews(path, skip_bad_rows=skip_bad_rows)
    if format == "csv":
        return read_csv(path, skip_bad_rows=skip_bad_rows, **options)
    if format == "tsv":
        options = {"delimiter": "\t", "quotechar": None, **options}
        return read_csv(path, skip_bad_rows=skip_bad_rows, **options)
    if format == "jsonl":
        return read_jsonl(path, skip_bad_rows=skip_bad_rows, **options)
    raise ValueError(f"format: expected one of {list(FORMATS)}, got {format!r}")


# ------------------------------------------------------------------------------------------------
# encoded data set
# ------------------------------------------------------------------------------------------------


class TextClassificationDataset(Dataset):
    """Token-id sequences with class labels; item ``i`` is ``(ids, label)``.

    ``ids`` is a ``(L_i,)`` int64 tensor (``L_i`` may be 0: a text with no tokens) and
    ``label`` an int class index. All sequences live in one flat tensor; items are views of it.

    Args:
        sequences: the token ids of each example (lists of ints or 1-D integer tensors).
        labels: the class index of each example.
        vocab (Vocab, optional), label_map (LabelMap, optional): kept for saving with a model.
        skipped (list of BadRow): bad rows skipped while reading (see ``skip_bad_rows``).

    Attributes:
        lengths (list of int): ``L_i`` per example, what the bucket samplers need.

    >>> ds = TextClassificationDataset([[5, 6, 7], []], [1, 0])
    >>> ds[0], ds.lengths
    ((tensor([5, 6, 7]), 1), [3, 0])
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int] | Tensor],
        labels: Sequence[int],
        *,
        vocab: Vocab | None = None,
        label_map: LabelMap | None = None,
        skipped: Sequence[BadRow] = (),
    ) -> None:
        if len(sequences) != len(labels):
            raise ValueError(
                f"labels: expected one label per sequence ({len(sequences)}), got {len(labels)}"
            )
        parts = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in sequences]
        lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)  # (n,)
        self._flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)  # (sum L,)
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).tolist()
        self.lengths: list[int] = lengths.tolist()
        self.labels: list[int] = [int(y) for y in labels]
        if label_map is not None and any(not 0 <= y < len(label_map) for y in self.labels):
            bad = next(y for y in self.labels if not 0 <= y < len(label_map))
            raise ValueError(f"labels: expected class indices in [0, {len(label_map)}), got {bad}")
        self.vocab = vocab
        self.label_map = label_map
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._flat[start:end], self.labels[index]

    @property
    def num_tokens(self) -> int:
        """Total number of real tokens."""
        return self._flat.numel()

    @classmethod
    def from_records(
        cls,
        records: TextRecords,
        vocab: Vocab,
        label_map: LabelMap,
        tokenizer: str | Tokenizer = "basic_english",
        *,
        skip_bad_rows: bool = False,
        progress: bool | None = None,
        tokens: Sequence[Sequence[str]] | None = None,
    ) -> TextClassificationDataset:
        """Tokenize and encode parsed records.

        A label unknown to ``label_map`` (e.g. a test file with a class the training file
        lacked) is a bad row: ``ValueError`` with file and line, or skipped with
        ``skip_bad_rows=True``. ``progress=None`` shows a tqdm bar for large files (>= 20,000
        records). ``tokens`` may pass the already tokenized texts.
        """
        tok = get_tokenizer(tokenizer)
        skipped = list(records.skipped)
        if tokens is None:
            tokens = _tokenize(records, tok, progress)
        sequences, labels = [], []
        for text_tokens, label, line in zip(tokens, records.labels, records.lines):
            if label not in label_map:
                reason = f"expected a label seen in training {label_map.names}, got {label!r}"
                if not skip_bad_rows:
                    raise ValueError(f"{records.path}:{line}: {reason}")
                skipped.append(BadRow(records.path, line, reason))
                continue
            sequences.append(vocab(text_tokens))
            labels.append(label_map.encode(label))
        if not sequences:
            raise ValueError(f"{records.path}: expected at least one row with a known label, got none")
        if len(skipped) > len(records.skipped):
            new = skipped[len(records.skipped)]
            warnings.warn(
                f"{records.path}: skipped {len(skipped) - len(records.skipped)} rows with unknown labels "
                f"(first: line {new.line}: {new.reason})",
                stacklevel=2,
            )
        return cls(sequences, labels, vocab=vocab, label_map=label_map, skipped=skipped)


def _tokenize(records: TextRecords, tokenizer: Callable[[str], list[str]], progress: bool | None) -> list[list[str]]:
    show = len(records) >= _PROGRESS_MIN_RECORDS if progress is None else bool(progress)
    texts: Iterable[str] = records.texts
    if show:
        from tqdm.auto import tqdm

        texts = tqdm(texts, total=len(records), desc=f"tokenizing {os.path.basename(records.path)}", unit=" texts")
    return [tokenizer(t) for t in texts]


def load_text_classification(
    path: str | os.PathLike,
    format: str = "agnews",
    *,
    tokenizer: str | Tokenizer = "basic_english",
    vocab: Vocab | None = None,
    label_map: LabelMap | None = None,
    min_freq: int = 1,
    max_size: int | None = None,
    skip_bad_rows: bool = False,
    progress: bool | None = None,
    **options,
) -> TextClassificationDataset:
    """Read, tokenize and encode a text classification file in one call.

    Without ``vocab`` / ``label_map`` they are built from this file (the training file):
    the vocabulary with ``min_freq`` / ``max_size`` and specials ``<pad>`` = 0, ``<unk>`` = 1;
    the label map is AG News' four names for ``format="agnews"``, else the sorted distinct
    labels. Pass the training set's ``vocab`` and ``label_map`` when loading evaluation data.

    Args:
        path: the file. format (str): one of :data:`FORMATS`. Default: ``"agnews"``.
        tokenizer: a name for :func:`~packrnn.data.get_tokenizer` or a callable.
            Default: ``"basic_english"``.
        skip_bad_rows (bool): skip and count bad rows (NOTE [bad rows]). Default: False.
        progress (bool or None): tqdm bar while tokenizing; None = only for large files.
        **options: ``text_column`` / ``label_column`` (csv, tsv), ``text_key`` / ``label_key``
            (jsonl).

    Returns:
        :class:`TextClassificationDataset` with ``.vocab``, ``.label_map``, ``.skipped``.

    >>> train = load_text_classification("train.csv")                      # doctest: +SKIP
    >>> test = load_text_classification("test.csv", vocab=train.vocab,
    ...                                 label_map=train.label_map)         # doctest: +SKIP
    """
    tok = get_tokenizer(tokenizer)
    records = read_records(path, format, skip_bad_rows=skip_bad_rows, **options)
    tokens = _tokenize(records, tok, progress)
    if vocab is None:
        vocab = build_vocab_from_iterator(tokens, min_freq=min_freq, max_size=max_size)
    if label_map is None:
        label_map = LabelMap.agnews() if format == "agnews" else LabelMap.from_labels(records.labels)
    return TextClassificationDataset.from_records(
        records, vocab, label_map, tok, skip_bad_rows=skip_bad_rows, tokens=tokens
    )
