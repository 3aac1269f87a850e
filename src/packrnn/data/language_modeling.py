"""Language modelling data: texts -> character or word sequences, input = seq[:-1], target = seq[1:].

Each text (a line of a text file, or a column of a CSV/TSV/JSONL/AG News file) becomes one
sequence ``<bos> x_1 ... x_n <eos>`` of characters (``level="char"``) or words
(``level="word"``, split by a tokenizer). Item ``i`` of a :class:`LanguageModelDataset` is
``(inputs, targets) = (seq[:-1], seq[1:])``: the model reads ``<bos> x_1 .. x_n`` and predicts
``x_1 .. x_n <eos>``, so every sequence has ``n + 1 >= 1`` steps and every step a target.
Collate with :func:`~packrnn.data.collate_tokens` (targets packed like the inputs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .datasets import _LINE_END, BadRow, TextRecords, _read_text, _Rows, read_agnews, read_records
from .tokenizer import Tokenizer, get_tokenizer
from .vocab import Vocab, build_vocab_from_iterator

__all__ = ["LM_FORMATS", "LEVELS", "LM_SPECIALS", "read_texts", "LanguageModelDataset",
           "load_language_modeling"]

LM_FORMATS = ("text", "agnews", "csv", "tsv", "jsonl")
LEVELS = ("char", "word")
LM_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def read_texts(path: str | os.PathLike, format: str = "text", *, skip_bad_rows: bool = False,
               **options) -> TextRecords:
    """Read the texts of a file, without labels.

    ``"text"``: every non-blank line is one text (line ends removed, nothing else). ``"agnews"``:
    title + " " + description. ``"csv"`` / ``"tsv"`` / ``"jsonl"``: the ``text_column`` /
    ``text_key`` option (several are joined with a space); no label column is needed.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "names.txt"
    >>> _ = p.write_text("hello\\n\\nhi there\\n")
    >>> read_texts(p).texts
    ['hello', 'hi there']
    """
    if format == "text":
        if options:
            raise TypeError(f"options: expected none for format 'text', got {sorted(options)}")
        name, text = _read_text(path, skip_bad_rows)
        rows = _Rows(name, skip_bad_rows)
        for number, line in enumerate(_LINE_END.split(text), start=1):
            line = line.rstrip("\r")
            if line.strip():
                rows.add(number, line, "")
        return rows.finish()
    if format == "agnews":
        return read_agnews(path, skip_bad_rows=skip_bad_rows, **options)
    if format in ("csv", "tsv"):
        options.setdefault("label_column", None)
    elif format == "jsonl":
        options.setdefault("label_key", None)
    else:
        raise ValueError(f"format: expected one of {list(LM_FORMATS)}, got {format!r}")
    return read_records(path, format, skip_bad_rows=skip_bad_rows, **options)


def split_text(text: str, level: str, tokenizer: Tokenizer) -> list[str]:
    """The units of ``text``: its characters, or its words by ``tokenizer``."""
    return list(text) if level == "char" else tokenizer(text)


class LanguageModelDataset(Dataset):
    """Sequences for next-token prediction: item ``i`` is ``(inputs, targets)``, each ``(n_i + 1,)``.

    ``inputs = [<bos>] + ids_i`` and ``targets = ids_i + [<eos>]`` (int64 views of one flat
    tensor).

    Args:
        sequences: the token ids of each text, without ``<bos>`` / ``<eos>``.
        vocab (Vocab): holds ``<bos>`` and ``<eos>`` (see :data:`LM_SPECIALS`).
        level (str): ``"char"`` or ``"word"``, kept for encoding new text. Default: ``"char"``.
        skipped (list of BadRow): bad rows skipped while reading.

    Attributes:
        lengths (list of int): ``n_i + 1`` per text, what the bucket samplers need.

    >>> v = Vocab(["<pad>", "<unk>", "<bos>", "<eos>", "h", "i"])
    >>> ds = LanguageModelDataset([[4, 5]], v)
    >>> ds[0], ds.lengths
    ((tensor([2, 4, 5]), tensor([4, 5, 3])), [3])
    """

    def __init__(self, sequences: Sequence[Sequence[int]], vocab: Vocab, *, level: str = "char",
                 skipped: Sequence[BadRow] = ()) -> None:
        if not isinstance(vocab, Vocab):
            raise TypeError(f"vocab: expected a Vocab, got {type(vocab).__name__}")
        missing = [s for s in ("<bos>", "<eos>") if s not in vocab]
        if missing:
            raise ValueError(f"vocab: expected the specials <bos> and <eos>, got no {missing[0]}")
        if level not in LEVELS:
            raise ValueError(f"level: expected one of {', '.join(LEVELS)}, got {level!r}")
        bos, eos = vocab["<bos>"], vocab["<eos>"]
        # One flat tensor <bos> a b c <eos> <bos> d <eos> ...: inputs and targets are two views
        # of each text's span shifted by one.
        parts = []
        for s in sequences:
            parts.extend([bos, *s, eos])
        self._flat = torch.tensor(parts, dtype=torch.int64)  # (sum (n_i + 2),)
        self.lengths: list[int] = [len(s) + 1 for s in sequences]
        self._starts: list[int] = []
        start = 0
        for n in self.lengths:
            self._starts.append(start)
            start += n + 1
        self.vocab, self.level = vocab, level
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start, n = self._starts[index], self.lengths[index]
        return self._flat[start:start + n], self._flat[start + 1:start + n + 1]

    @property
    def num_tokens(self) -> int:
        """Total number of predicted tokens (each text's units plus its ``<eos>``)."""
        return sum(self.lengths)


def load_language_modeling(path: str | os.PathLike, format: str = "text", *, level: str = "char",
                           tokenizer: str | Tokenizer = "split", vocab: Vocab | None = None,
                           min_freq: int = 1, max_size: int | None = None,
                           max_length: int | None = None, skip_bad_rows: bool = False,
                           **options) -> LanguageModelDataset:
    """Read and encode texts for a language model in one call.

    Without ``vocab`` it is built from this file (the training file): specials
    :data:`LM_SPECIALS` (``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3), then
    units by frequency (``min_freq``, ``max_size``). Units unknown to ``vocab`` become
    ``<unk>``.

    Args:
        path: the file. format (str): one of :data:`LM_FORMATS`. Default: ``"text"``.
        level (str): ``"char"`` (characters) or ``"word"`` (``tokenizer``'s tokens).
            Default: ``"char"``.
        tokenizer: for ``level="word"``. Default: ``"split"`` (whitespace).
        max_length (int, optional): keep the first ``max_length`` units of each text.
        **options: ``text_column`` (csv, tsv), ``text_key`` (jsonl).

    >>> train = load_language_modeling("titles.txt", level="char")           # doctest: +SKIP
    """
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)}, got {level!r}")
    tok = get_tokenizer(tokenizer)
    records = read_texts(path, format, skip_bad_rows=skip_bad_rows, **options)
    units = [split_text(t, level, tok)[:max_length] for t in records.texts]
    if vocab is None:
        vocab = build_vocab_from_iterator(units, min_freq=min_freq, max_size=max_size,
                                          specials=LM_SPECIALS)
    return LanguageModelDataset([vocab(u) for u in units], vocab, level=level,
                                skipped=records.skipped)
