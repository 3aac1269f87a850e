"""Vocabulary: a token <-> index map built from token counts.

Order (deterministic, independent of the order the data arrives in): the specials first, in
the order given (``<pad>`` = 0, ``<unk>`` = 1 by default), then tokens by decreasing frequency,
ties broken alphabetically -- the order torchtext's ``build_vocab_from_iterator`` produces.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = ["Vocab", "build_vocab_from_iterator"]

_FORMAT = "packrnn.vocab/1"


class Vocab:
    """A fixed token <-> index map; unknown tokens map to ``unk_token``'s index.

    Args:
        tokens (sequence of str): the tokens in index order, specials included; no duplicates.
        pad_token (str or None): the padding token, must be in ``tokens``. Default: ``"<pad>"``.
        unk_token (str or None): the token unknown tokens map to, must be in ``tokens``; with
            ``None``, looking up an unknown token raises ``KeyError``. Default: ``"<unk>"``.

    Most users build one with :func:`build_vocab_from_iterator`. Save it with
    :meth:`to_dict` (a JSON-able dict a checkpoint can hold) or :meth:`save` (a JSON file).

    >>> v = Vocab(["<pad>", "<unk>", "the", "cat"])
    >>> v(["the", "dog"]), len(v), v.pad_index
    ([2, 1], 4, 0)
    """

    def __init__(
        self,
        tokens: Sequence[str],
        *,
        pad_token: str | None = "<pad>",
        unk_token: str | None = "<unk>",
    ) -> None:
        if isinstance(tokens, str) or not isinstance(tokens, Iterable):
            raise TypeError(f"tokens: expected a sequence of str, got {type(tokens).__name__}")
        itos = list(tokens)
        stoi: dict[str, int] = {}
        for i, token in enumerate(itos):
            if not isinstance(token, str):
                raise TypeError(f"tokens[{i}]: expected a str, got {type(token).__name__}")
            if token in stoi:
                raise ValueError(f"tokens: expected unique tokens, got {token!r} at {stoi[token]} and {i}")
            stoi[token] = i
        for name, special in (("pad_token", pad_token), ("unk_token", unk_token)):
            if special is not None and special not in stoi:
                raise ValueError(f"{name}: expected a token of the vocabulary or None, got {special!r}")
        self._itos = itos
        self._stoi = stoi
        self.pad_token = pad_token
        self.unk_token = unk_token

    # -- size and lookup ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._itos)

    def __contains__(self, token: object) -> bool:
        return token in self._stoi

    @property
    def pad_index(self) -> int | None:
        """Index of ``pad_token`` (0 for a vocabulary built with the default specials)."""
        return None if self.pad_token is None else self._stoi[self.pad_token]

    @property
    def unk_index(self) -> int | None:
        """Index unknown tokens map to (``None`` if unknown tokens raise)."""
        return None if self.unk_token is None else self._stoi[self.unk_token]

    def __getitem__(self, token: str) -> int:
        """Index of ``token``; ``unk_index`` for an unknown token."""
        index = self._stoi.get(token)
        if index is not None:
            return index
        if self.unk_token is None:
            raise KeyError(f"token: {token!r} is not in the vocabulary and it has no unk_token")
        return self._stoi[self.unk_token]

    def __call__(self, tokens: Iterable[str]) -> list[int]:
        """Indices of ``tokens`` (``lookup_indices``; torchtext's ``vocab(tokens)``)."""
        return self.lookup_indices(tokens)

    def lookup_indices(self, tokens: Iterable[str]) -> list[int]:
        """Indices of ``tokens``; unknown tokens give ``unk_index``."""
        if isinstance(tokens, str):
            raise TypeError("tokens: expected a list of str, got a str (wrap it in a list or tokenize it)")
        if not isinstance(tokens, (list, tuple)):
            tokens = list(tokens)  # a one-pass iterable is read twice when a token is unknown
        get = self._stoi.get
        unk = self.unk_index
        out = [get(t, unk) for t in tokens]
        if unk is None and None in out:
            missing = next(t for t, i in zip(tokens, out) if i is None)
            raise KeyError(f"tokens: {missing!r} is not in the vocabulary and it has no unk_token")
        return out

    def lookup_token(self, index: int) -> str:
        """The token at ``index``."""
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        if not 0 <= index < len(self._itos):
            raise IndexError(f"index: expected 0 <= index < {len(self._itos)}, got {index}")
        return self._itos[int(index)]

    def lookup_tokens(self, indices: Iterable[int]) -> list[str]:
        """Tokens at ``indices`` (a list of ints or a 1-D integer tensor)."""
        if hasattr(indices, "tolist"):
            indices = indices.tolist()
        return [self.lookup_token(i) for i in indices]

    def get_itos(self) -> list[str]:
        """A copy of the index -> token list."""
        return list(self._itos)

    def get_stoi(self) -> dict[str, int]:
        """A copy of the token -> index dict."""
        return dict(self._stoi)

    # -- persistence -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-able dict that :meth:`from_dict` restores exactly (for checkpoints)."""
        return {"format": _FORMAT, "tokens": list(self._itos), "pad_token": self.pad_token, "unk_token": self.unk_token}

    @classmethod
    def from_dict(cls, state: dict) -> Vocab:
        """Rebuild a vocabulary saved with :meth:`to_dict`."""
        if not isinstance(state, dict):
            raise TypeError(f"state: expected a dict from Vocab.to_dict(), got {type(state).__name__}")
        if state.get("format") != _FORMAT:
            raise ValueError(f"state['format']: expected {_FORMAT!r}, got {state.get('format')!r}")
        missing = [k for k in ("tokens", "pad_token", "unk_token") if k not in state]
        if missing:
            raise ValueError(f"state: expected keys tokens, pad_token, unk_token, got no {', '.join(missing)}")
        return cls(state["tokens"], pad_token=state["pad_token"], unk_token=state["unk_token"])

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as a JSON file (atomically: temp file + rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)}: expected a JSON vocabulary file, got invalid JSON ({e})") from None
        return cls.from_dict(state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        head = ", ".join(repr(t) for t in self._itos[:5])
        more = ", ..." if len(self._itos) > 5 else ""
        return f"Vocab(size={len(self)}, tokens=[{head}{more}], pad_token={self.pad_token!r}, unk_token={self.unk_token!r})"


def build_vocab_from_iterator(
    iterator: Iterable[Iterable[str]],
    *,
    min_freq: int = 1,
    max_size: int | None = None,
    specials: Sequence[str] = ("<pad>", "<unk>"),
    pad_token: str | None = "<pad>",
    unk_token: str | None = "<unk>",
) -> Vocab:
    """Build a :class:`Vocab` from an iterator of token lists (e.g. tokenized texts).

    Order: ``specials`` first (so ``<pad>`` = 0, ``<unk>`` = 1 by default), then every token seen
    at least ``min_freq`` times, by decreasing count, ties broken alphabetically (deterministic
    and independent of the order of the data, as torchtext's ``build_vocab_from_iterator``).

    Args:
        iterator: yields lists (any iterables) of str tokens, one per text.
        min_freq (int): keep tokens seen at least this often. Default: 1.
        max_size (int, optional): at most this many entries in total, specials included
            (``len(vocab) <= max_size``); the most frequent tokens are kept. Default: no limit.
        specials (sequence of str): reserved tokens placed first, in order; a special that
            also occurs in the data is not repeated. Default: ``("<pad>", "<unk>")``.
        pad_token, unk_token (str or None): which specials play those roles (see :class:`Vocab`).

    >>> v = build_vocab_from_iterator([["b", "a", "b"], ["c", "a"], ["b"]])
    >>> v.get_itos()
    ['<pad>', '<unk>', 'b', 'a', 'c']
    """
    if isinstance(min_freq, bool) or not isinstance(min_freq, numbers.Integral) or min_freq < 1:
        raise ValueError(f"min_freq: expected an int >= 1, got {min_freq!r}")
    specials = list(specials)
    if max_size is not None and (
        isinstance(max_size, bool) or not isinstance(max_size, numbers.Integral) or max_size < len(specials)
    ):
        raise ValueError(f"max_size: expected None or an int >= len(specials) = {len(specials)}, got {max_size!r}")
    counter: Counter[str] = Counter()
    for i, tokens in enumerate(iterator):
        if isinstance(tokens, str):
            raise TypeError(f"iterator: expected lists of tokens, got a str at item {i} (tokenize it first)")
        counter.update(tokens)
    for special in specials:
        counter.pop(special, None)
    # sort by token, then (stable) by decreasing count: ties stay alphabetical
    ranked = sorted(sorted(counter.items(), key=lambda kv: kv[0]), key=lambda kv: kv[1], reverse=True)
    tokens = [t for t, c in ranked if c >= min_freq]
    if max_size is not None:
        tokens = tokens[: max_size - len(specials)]
    return Vocab(specials + tokens, pad_token=pad_token, unk_token=unk_token)
