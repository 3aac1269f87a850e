"""Tokenizers: text -> list of token strings.

The default, :func:`basic_english`, reproduces torchtext's ``get_tokenizer("basic_english")``
token for token, so vocabularies and models built with the classic AG News lesson carry over.
Any callable ``str -> list[str]`` can replace it (see :func:`get_tokenizer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["Tokenizer", "basic_english", "get_tokenizer"]

Tokenizer = Callable[[str], "list[str]"]

# NOTE [basic_english rules]
#
# torchtext's rules, applied in this order to the lowercased line, then split on whitespace.
# Order matters only for the apostrophe rule's extra spaces (collapsed by the last rule).
# Characters not named here (``-``, ``/``, ``&``, ``#``, digits, ...) stay inside their tokens,
# so "farm-related" and "&lt" are single tokens, as in torchtext.
_BASIC_ENGLISH_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"'", " '  "),  # split off apostrophes: "it's" -> "it ' s"
        (r'"', ""),  # drop double quotes
        (r"\.", " . "),
        (r"<br />", " "),  # HTML line breaks (IMDB-style text) become spaces
        (r",", " , "),
        (r"\(", " ( "),
        (r"\)", " ) "),
        (r"!", " ! "),
        (r"\?", " ? "),
        (r";", " "),  # semicolons and colons are dropped
        (r":", " "),
        (r"\s+", " "),
    )
)


def basic_english(text: str) -> list[str]:
    """Lowercase ``text``, split off basic punctuation and split on whitespace.

    Equivalent to torchtext's ``get_tokenizer("basic_english")``: apostrophes, ``.``, ``,``,
    ``(``, ``)``, ``!`` and ``?`` become tokens of their own; double quotes are removed;
    ``;``, ``:`` and ``<br />`` act as spaces. A text with no tokens gives ``[]``.

    Args:
        text (str): one line or document.

    Returns:
        list of str tokens.

    >>> basic_english("You can now install TorchText using pip!")
    ['you', 'can', 'now', 'install', 'torchtext', 'using', 'pip', '!']
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    line = text.lower()
    for pattern, replacement in _BASIC_ENGLISH_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _split(text: str) -> list[str]:
    return text.split()


def get_tokenizer(tokenizer: str | Tokenizer | None = "basic_english") -> Tokenizer:
    """Return a tokenizer by name, or pass a callable through unchanged.

    Args:
        tokenizer: ``"basic_english"`` (default, :func:`basic_english`), ``"split"`` or ``None``
            (``str.split`` on whitespace, torchtext's ``None``), or any callable
            ``str -> list[str]``.

    Returns:
        a picklable callable ``str -> list[str]`` (module-level functions, so DataLoader
        workers and checkpoints can hold it).

    >>> get_tokenizer("split")("Hello, World")
    ['Hello,', 'World']
    """
    if tokenizer is None or tokenizer == "split":
        return _split
    if tokenizer == "basic_english":
        return basic_english
    if isinstance(tokenizer, str):
        raise ValueError(f"tokenizer: expected 'basic_english', 'split', None or a callable, got {tokenizer!r}")
    if not callable(tokenizer):
        raise TypeError(f"tokenizer: expected a name or a callable, got {type(tokenizer).__name__}")
    return tokenizer
