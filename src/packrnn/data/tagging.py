"""Sequence tagging data: read CoNLL-U / CoNLL columns / JSONL, encode words, characters and tags.

Two steps, as for text classification (``datasets.py``):

1. **Read** a file into :class:`TaggedRecords` (each sentence's tokens and tags, and the line
   of every token): :func:`read_conllu`, :func:`read_conll`, :func:`read_tagged_jsonl`, or
   :func:`read_tagged` by format.
2. **Encode** them with a word :class:`~packrnn.data.Vocab`, a tag
   :class:`~packrnn.data.LabelMap` and optionally a character vocabulary into a
   :class:`TaggingDataset` whose item ``i`` is ``(word_ids, tag_ids)`` or
   ``(word_ids, tag_ids, chars)``.

:func:`load_tagging` does both, building the vocabularies from the file when none are given
(the training file) and reusing them otherwise (evaluation: a tag unseen in training is an
error naming its file and line).

Bad input raises ``ValueError("<file>:<line>: expected X, got Y")`` (NOTE [bad rows] in
``datasets.py``); with ``skip_bad_rows=True`` the whole sentence holding a bad line is skipped,
counted in ``.skipped`` and reported with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .datasets import (_BAD_BYTE, _LINE_END, BadRow, LabelMap, _bad_byte_reason, _json_objects,
                       _read_text)
from .vocab import Vocab, build_vocab_from_iterator

__all__ = [
    "TAGGING_FORMATS",
    "TaggedRecords",
    "TaggingDataset",
    "read_conllu",
    "read_conll",
    "read_tagged_jsonl",
    "read_tagged",
    "load_tagging",
]

TAGGING_FORMATS = ("conllu", "conll", "jsonl")
_CONLLU_COLUMNS = {"upos": 3, "xpos": 4}  # 0-based field of the tag in a CoNLL-U word line


@dataclass
class TaggedRecords:
    """The sentences of one file: ``tokens[i][j]`` has tag ``tags[i][j]``, on line ``lines[i][j]``."""

    path: str  # the file read
    tokens: list[list[str]] = field(default_factory=list)  # the words of each sentence
    tags: list[list[str]] = field(default_factory=list)  # the tag of each word
    lines: list[list[int]] = field(default_factory=list)  # 1-based line of each word
    starts: list[int] = field(default_factory=list)  # 1-based line where each sentence starts
    skipped: list[BadRow] = field(default_factory=list)  # sentences skipped (skip_bad_rows=True)

    def __len__(self) -> int:
        return len(self.tokens)


class _Sentences:
    """Collects the sentences of one file; a bad line raises, or drops its sentence when skipping."""

    def __init__(self, path: str, skip_bad_rows: bool) -> None:
        self.out = TaggedRecords(path)
        self.skip = skip_bad_rows
        self.start = 0
        self.tokens: list[str] = []
        self.tags: list[str] = []
        self.lines: list[int] = []
        self.bad_sentence = False

    def bad(self, line: int, reason: str) -> None:
        if not self.skip:
            raise ValueError(f"{self.out.path}:{line}: {reason}")
        if not self.bad_sentence:
            self.out.skipped.append(BadRow(self.out.path, line, reason))
        self.bad_sentence = True

    def word(self, line: int, token: str, tag: str) -> None:
        if not self.start:
            self.start = line
        match = _BAD_BYTE.search(token) or _BAD_BYTE.search(tag)
        if match:
            self.bad(line, _bad_byte_reason(match.group()))
            return
        self.tokens.append(token)
        self.tags.append(tag)
        self.lines.append(line)

    def begin(self, line: int) -> None:
        """The line where the current sentence starts (its first comment or word)."""
        if not self.start:
            self.start = line

    def end(self, allow_empty: bool = False) -> None:
        """Close the current sentence (a blank line, a new JSON line or the end of the file)."""
        if not self.bad_sentence and (self.tokens or allow_empty):
            out = self.out
            out.tokens.append(self.tokens)
            out.tags.append(self.tags)
            out.lines.append(self.lines)
            out.starts.append(self.start)
        self.start, self.tokens, self.tags, self.lines = 0, [], [], []
        self.bad_sentence = False

    def finish(self) -> TaggedRecords:
        self.end()
        out = self.out
        if not out.tokens:
            why = (f" ({len(out.skipped)} bad sentences skipped; first: {out.skipped[0]})"
                   if out.skipped else "")
            raise ValueError(f"{out.path}: expected at least one sentence, got none{why}")
        if out.skipped:
            warnings.warn(f"{out.path}: skipped {len(out.skipped)} sentences with bad lines "
                          f"(first: line {out.skipped[0].line}: {out.skipped[0].reason})",
                          stacklevel=3)
        return out


def read_conllu(path: str | os.PathLike, *, tagset: str = "upos",
                skip_bad_rows: bool = False) -> TaggedRecords:
    """Read a CoNLL-U file (Universal Dependencies): words (FORM) and their UPOS or XPOS tags.

    Sentences are separated by blank lines; ``#`` comment lines, multiword-token ranges (IDs
    like ``3-4``: the surface form of words that are listed on their own lines) and empty nodes
    (IDs like ``5.1``) are skipped. Every other line must have 10 tab-separated fields, an
    integer ID that continues the sentence (1, 2, ...) and a tag that is not ``_``.

    Args:
        path: the file (UTF-8).
        tagset (str): ``"upos"`` (column 4) or ``"xpos"`` (column 5). Default: ``"upos"``.
        skip_bad_rows (bool): skip a sentence with a bad line instead of raising. Default: False.

    Raises:
        ValueError: ``"<file>:<line>: <reason>"`` for a bad line, an empty file, no sentence.
    """
    if tagset not in _CONLLU_COLUMNS:
        raise ValueError(f"tagset: expected 'upos' or 'xpos', got {tagset!r}")
    column = _CONLLU_COLUMNS[tagset]
    name, text = _read_text(path, skip_bad_rows)
    out = _Sentences(name, skip_bad_rows)
    expected_id = 1
    for number, raw in enumerate(_LINE_END.split(text), start=1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            out.end()
            expected_id = 1
            continue
        if raw.startswith("#"):
            out.begin(number)
            continue
        fields = raw.split("\t")
        word_id = fields[0]
        if len(fields) != 10:
            out.bad(number, f"expected 10 tab-separated fields (CoNLL-U), got {len(fields)}")
        elif "-" in word_id or "." in word_id:
            lo, sep, hi = word_id.partition("-" if "-" in word_id else ".")
            if not (lo.isdigit() and hi.isdigit()):
                out.bad(number, "expected an integer word ID, a range like 3-4 or an empty "
                                f"node like 5.1, got {word_id!r}")
        elif not word_id.isdigit():
            out.bad(number, "expected an integer word ID, a range like 3-4 or an empty node "
                            f"like 5.1, got {word_id!r}")
        elif int(word_id) != expected_id:
            out.bad(number, f"expected word ID {expected_id}, got {word_id}")
            expected_id = int(word_id) + 1
        elif fields[column] in ("", "_"):
            out.bad(number, f"expected a {tagset.upper()} tag in column {column + 1}, "
                            f"got {fields[column]!r}")
            expected_id += 1
        elif not fields[1]:
            out.bad(number, "expected a word form in column 2, got an empty field")
            expected_id += 1
        else:
            out.word(number, fields[1], fields[column])
            expected_id += 1
    return out.finish()


def read_conll(path: str | os.PathLike, *, token_column: int = 0, tag_column: int = -1,
               delimiter: str | None = None, skip_bad_rows: bool = False) -> TaggedRecords:
    """Read a CoNLL column file (CoNLL-2000/2003 style): one word per line, columns of fields.

    Sentences are separated by blank lines; ``-DOCSTART-`` lines (document separators) are
    skipped. Every line of a file must have the same number of columns.

    Args:
        path: the file (UTF-8).
        token_column (int): 0-based column of the word; negative counts from the end.
            Default: 0.
        tag_column (int): 0-based column of the tag; negative counts from the end. Default:
            -1 (the last column, as the CoNLL-2003 named entities).
        delimiter (str or None): field separator; None splits on any whitespace. Default: None.
        skip_bad_rows (bool): skip a sentence with a bad line instead of raising. Default: False.

    Raises:
        ValueError: ``"<file>:<line>: <reason>"`` for a bad line, an empty file, no sentence.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "ner.txt"
    >>> _ = p.write_text("EU NNP B-ORG\\nrejects VBZ O\\n\\nPeter NNP B-PER\\n")
    >>> r = read_conll(p)
    >>> r.tokens, r.tags
    ([['EU', 'rejects'], ['Peter']], [['B-ORG', 'O'], ['B-PER']])
    """
    for arg, value in (("token_column", token_column), ("tag_column", tag_column)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg}: expected an int column index, got {value!r}")
    if delimiter is not None and (not isinstance(delimiter, str) or len(delimiter) != 1):
        raise ValueError(f"delimiter: expected a single character or None, got {delimiter!r}")
    need = max(token_column if token_column >= 0 else -token_column - 1,
               tag_column if tag_column >= 0 else -tag_column - 1) + 1
    name, text = _read_text(path, skip_bad_rows)
    out = _Sentences(name, skip_bad_rows)
    width = first_line = 0
    for number, raw in enumerate(_LINE_END.split(text), start=1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            out.end()
            continue
        fields = raw.split(delimiter) if delimiter is not None else raw.split()
        if fields[0] == "-DOCSTART-":
            out.end()
            continue
        if len(fields) < need:
            out.bad(number, f"expected at least {need} columns (token_column {token_column}, "
                            f"tag_column {tag_column}), got {len(fields)}")
        elif width and len(fields) != width:
            out.bad(number, f"expected {width} columns as on line {first_line}, "
                            f"got {len(fields)}")
        elif not fields[tag_column] or not fields[token_column]:
            which = "tag" if not fields[tag_column] else "word"
            out.bad(number, f"expected a {which} in column "
                            f"{tag_column if which == 'tag' else token_column}, got an empty field")
        else:
            if not width:
                width, first_line = len(fields), number
            out.word(number, fields[token_column], fields[tag_column])
    return out.finish()


def read_tagged_jsonl(path: str | os.PathLike, *, tokens_key: str = "tokens",
                      tags_key: str = "tags", skip_bad_rows: bool = False) -> TaggedRecords:
    """Read JSON Lines of tagged sentences: ``{"tokens": ["The", "cat"], "tags": ["DET", "NOUN"]}``.

    Blank lines are ignored; a sentence may be empty (``[]``, a zero-length sequence).

    Args:
        path: the file (UTF-8).
        tokens_key (str): key of the list of words. Default: ``"tokens"``.
        tags_key (str): key of the list of tags, as long as the words. Default: ``"tags"``.
        skip_bad_rows (bool): skip bad lines instead of raising. Default: False.

    Raises:
        ValueError: ``"<file>:<line>: <reason>"`` for a bad line, an empty file, no sentence.
    """
    for arg, value in (("tokens_key", tokens_key), ("tags_key", tags_key)):
        if not isinstance(value, str):
            raise TypeError(f"{arg}: expected a key name, got {value!r}")
    name, text = _read_text(path, skip_bad_rows)
    out = _Sentences(name, skip_bad_rows)
    for number, obj, error in _json_objects(text):
        if error is not None:
            out.bad(number, error)
        elif tokens_key not in obj or tags_key not in obj:
            out.bad(number, f"expected keys [{tokens_key!r}, {tags_key!r}], got no "
                            f"{tokens_key if tokens_key not in obj else tags_key!r}")
        elif not _str_list(obj[tokens_key]) or not _str_list(obj[tags_key]):
            key = tokens_key if not _str_list(obj[tokens_key]) else tags_key
            out.bad(number, f"expected a list of strings under {key!r}, got {obj[key]!r:.60}")
        elif len(obj[tokens_key]) != len(obj[tags_key]):
            out.bad(number, f"expected as many tags as tokens ({len(obj[tokens_key])}), "
                            f"got {len(obj[tags_key])}")
        elif any(not t.strip() for t in obj[tags_key]):
            out.bad(number, f"expected non-empty tags under {tags_key!r}, got an empty string")
        else:
            out.begin(number)
            for token, tag in zip(obj[tokens_key], obj[tags_key]):
                out.word(number, token, tag.strip())
        out.end(allow_empty=True)
    return out.finish()


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def read_tagged(path: str | os.PathLike, format: str = "conllu", *, skip_bad_rows: bool = False,
                **options) -> TaggedRecords:
    """Read a tagged file in one of :data:`TAGGING_FORMATS`: ``"conllu"``, ``"conll"``, ``"jsonl"``.

    ``options`` go to the reader: ``tagset`` (conllu), ``token_column`` / ``tag_column`` /
    ``delimiter`` (conll), ``tokens_key`` / ``tags_key`` (jsonl).
    """
    readers = {"conllu": read_conllu, "conll": read_conll, "jsonl": read_tagged_jsonl}
    if format not in readers:
        raise ValueError(f"format: expected one of {list(TAGGING_FORMATS)}, got {format!r}")
    return readers[format](path, skip_bad_rows=skip_bad_rows, **options)


# ------------------------------------------------------------------------------------------------
# encoded data set
# ------------------------------------------------------------------------------------------------


class TaggingDataset(Dataset):
    """Sentences as word ids with a tag id per word, and optionally each word's character ids.

    Item ``i`` is ``(word_ids, tag_ids)``, two ``(L_i,)`` int64 tensors (``L_i`` may be 0), or
    ``(word_ids, tag_ids, chars)`` with ``chars`` a tuple of ``L_i`` int64 tensors, the
    character ids of each word. All of it lives in flat tensors; items are views.

    Args:
        words, tags: per sentence, the word ids and the tag ids (same lengths).
        chars (optional): per sentence, per word, the character ids.
        vocab, tag_map, char_vocab (optional): kept for saving with a model.
        skipped (list of BadRow): sentences skipped while reading.

    Attributes:
        lengths (list of int): ``L_i`` per sentence, what the bucket samplers need.

    >>> ds = TaggingDataset([[5, 6], []], [[1, 0], []], chars=[[[3, 4], [5]], []])
    >>> ds[0]
    (tensor([5, 6]), tensor([1, 0]), (tensor([3, 4]), tensor([5])))
    >>> ds.lengths, ds.num_tokens
    ([2, 0], 2)
    """

    def __init__(self, words: Sequence[Sequence[int]], tags: Sequence[Sequence[int]], *,
                 chars: Sequence[Sequence[Sequence[int]]] | None = None,
                 vocab: Vocab | None = None, tag_map: LabelMap | None = None,
                 char_vocab: Vocab | None = None, skipped: Sequence[BadRow] = ()) -> None:
        if len(words) != len(tags):
            raise ValueError(f"tags: expected one tag sequence per sentence ({len(words)}), "
                             f"got {len(tags)}")
        self.lengths: list[int] = [len(w) for w in words]
        for i, (w, t) in enumerate(zip(words, tags)):
            if len(t) != len(w):
                raise ValueError(f"tags[{i}]: expected {len(w)} tags (one per word), got {len(t)}")
        self._offsets = _offsets(self.lengths)
        self._words = _flat(words)  # (sum L,)
        self._tags = _flat(tags)  # (sum L,)
        if tag_map is not None and self._tags.numel() and not (
                0 <= int(self._tags.min()) and int(self._tags.max()) < len(tag_map)):
            raise ValueError(f"tags: expected tag indices in [0, {len(tag_map)}), got "
                             f"{int(self._tags.max())}")
        self._chars = self._char_lengths = None
        if chars is not None:
            if len(chars) != len(words) or any(len(c) != n for c, n in zip(chars, self.lengths)):
                raise ValueError("chars: expected the character ids of every word of every "
                                 "sentence, got a different number of words")
            per_word = [w for sentence in chars for w in sentence]
            self._char_lengths = [len(w) for w in per_word]  # (sum L,) characters per word
            self._chars = _flat(per_word)  # (sum C,)
            self._char_offsets = _offsets(self._char_lengths)
        self.vocab, self.tag_map, self.char_vocab = vocab, tag_map, char_vocab
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple:
        start, end = self._offsets[index], self._offsets[index + 1]
        item = (self._words[start:end], self._tags[start:end])
        if self._chars is None:
            return item
        c0, c1 = self._char_offsets[start], self._char_offsets[end]
        return item + (tuple(torch.split(self._chars[c0:c1], self._char_lengths[start:end])),)

    @property
    def num_tokens(self) -> int:
        """Total number of words."""
        return self._words.numel()

    @classmethod
    def from_records(cls, records: TaggedRecords, vocab: Vocab, tag_map: LabelMap,
                     char_vocab: Vocab | None = None, *, lowercase: bool = False,
                     skip_bad_rows: bool = False) -> TaggingDataset:
        """Encode parsed sentences. A tag unknown to ``tag_map`` (evaluation data with a tag the
        training file lacked) is an error naming its file and line, or skips the sentence with
        ``skip_bad_rows=True``."""
        skipped = list(records.skipped)
        words, tags, chars = [], [], []
        for tokens, sentence_tags, lines in zip(records.tokens, records.tags, records.lines):
            unknown = next((j for j, t in enumerate(sentence_tags) if t not in tag_map), None)
            if unknown is not None:
                reason = (f"expected a tag seen in training {tag_map.names}, "
                          f"got {sentence_tags[unknown]!r}")
                if not skip_bad_rows:
                    raise ValueError(f"{records.path}:{lines[unknown]}: {reason}")
                skipped.append(BadRow(records.path, lines[unknown], reason))
                continue
            words.append(vocab([t.lower() for t in tokens] if lowercase else tokens))
            tags.append([tag_map.encode(t) for t in sentence_tags])
            if char_vocab is not None:
                chars.append([char_vocab(list(t)) for t in tokens])
        if not words:
            raise ValueError(f"{records.path}: expected at least one sentence with known tags, "
                             "got none")
        if len(skipped) > len(records.skipped):
            new = skipped[len(records.skipped)]
            warnings.warn(f"{records.path}: skipped {len(skipped) - len(records.skipped)} "
                          f"sentences with unknown tags (first: line {new.line}: {new.reason})",
                          stacklevel=2)
        return cls(words, tags, chars=chars if char_vocab is not None else None, vocab=vocab,
                   tag_map=tag_map, char_vocab=char_vocab, skipped=skipped)


def _offsets(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _flat(sequences: Sequence[Sequence[int]]) -> Tensor:
    parts = [torch.as_tensor(s, dtype=torch.int64).reshape(-1) for s in sequences]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def load_tagging(path: str | os.PathLike, format: str = "conllu", *, vocab: Vocab | None = None,
                 tag_map: LabelMap | None = None, char_vocab: Vocab | None = None,
                 chars: bool = False, lowercase: bool = False, min_freq: int = 1,
                 max_size: int | None = None, skip_bad_rows: bool = False,
                 **options) -> TaggingDataset:
    """Read and encode a tagged file in one call (see :func:`read_tagged` for formats).

    Without ``vocab`` / ``tag_map`` (/ ``char_vocab`` with ``chars=True``) they are built from
    this file (the training file): words with ``min_freq`` / ``max_size`` and specials
    ``<pad>`` = 0, ``<unk>`` = 1; tags sorted; every character seen. Pass the training set's
    when loading evaluation data.

    Args:
        path: the file. format (str): one of :data:`TAGGING_FORMATS`. Default: ``"conllu"``.
        chars (bool): also encode each word's characters (for character features); implied by
            a ``char_vocab``. Default: False.
        lowercase (bool): look words up lowercased (characters keep their case). Default: False.
        skip_bad_rows (bool): skip sentences with bad lines or unknown tags. Default: False.
        **options: the reader's (``tagset``, ``token_column``, ``tag_column``, ``delimiter``,
            ``tokens_key``, ``tags_key``).

    Returns:
        :class:`TaggingDataset` with ``.vocab``, ``.tag_map``, ``.char_vocab``, ``.skipped``.

    >>> train = load_tagging("en-ud-train.conllu", chars=True)              # doctest: +SKIP
    >>> test = load_tagging("en-ud-test.conllu", vocab=train.vocab, tag_map=train.tag_map,
    ...                     char_vocab=train.char_vocab)                    # doctest: +SKIP
    """
    records = read_tagged(path, format, skip_bad_rows=skip_bad_rows, **options)
    if vocab is None:
        vocab = build_vocab_from_iterator(
            ([t.lower() for t in s] if lowercase else s for s in records.tokens),
            min_freq=min_freq, max_size=max_size)
    if tag_map is None:
        tag_map = LabelMap(sorted({t for s in records.tags for t in s}))
    if char_vocab is None and chars:
        char_vocab = build_vocab_from_iterator(list(t) for s in records.tokens for t in s)
    return TaggingDataset.from_records(records, vocab, tag_map, char_vocab, lowercase=lowercase,
                                       skip_bad_rows=skip_bad_rows)
