"""basic_english must match torchtext's get_tokenizer("basic_english") token for token."""

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packrnn.data import basic_english, get_tokenizer

# (text, torchtext's tokens): torchtext's own test sample and docstring example, and lines of
# its AG News normalization reference (test/asset/text_normalization_ag_news_ref_results.test)
TORCHTEXT_EXAMPLES = [
    (
        "'\".<br />,()!?;:   Basic English Normalization for a Line of Text   '\".<br />,()!?;:",
        ["'", ".", ",", "(", ")", "!", "?", "basic", "english", "normalization",
         "for", "a", "line", "of", "text", "'", ".", ",", "(", ")", "!", "?"],
    ),
    (
        "You can now install TorchText using pip!",
        ["you", "can", "now", "install", "torchtext", "using", "pip", "!"],
    ),
    (
        "Fears for T N pension after talks",
        ["fears", "for", "t", "n", "pension", "after", "talks"],
    ),
    (
        "Unions representing workers at Turner   Newall say they are 'disappointed' after talks "
        "with stricken parent firm Federal Mogul.",
        ["unions", "representing", "workers", "at", "turner", "newall", "say", "they", "are", "'",
         "disappointed", "'", "after", "talks", "with", "stricken", "parent", "firm", "federal",
         "mogul", "."],
    ),
    (
        "Texas Instruments Inc. &lt;TXN.N&gt;",
        ["texas", "instruments", "inc", ".", "&lt", "txn", ".", "n&gt"],
    ),
    (
        "Calif. Aims to Limit Farm-Related Smog (AP)",
        ["calif", ".", "aims", "to", "limit", "farm-related", "smog", "(", "ap", ")"],
    ),
    (
        'It\'s barely dawn when Mike "quoted" Fitzpatrick: starts; 8.26 seconds',
        ["it", "'", "s", "barely", "dawn", "when", "mike", "quoted", "fitzpatrick", "starts",
         "8", ".", "26", "seconds"],
    ),
    ("", []),
    ("  \t\n ", []),
    ("\"\";:", []),
]


@pytest.mark.parametrize("text, expected", TORCHTEXT_EXAMPLES)
def test_basic_english_matches_torchtext(text, expected):
    assert basic_english(text) == expected


@given(st.text(max_size=60))
@settings(max_examples=200, deadline=None)
def test_basic_english_properties(text):
    tokens = basic_english(text)
    assert all(t and t == t.lower() and not any(c.isspace() for c in t) for t in tokens)
    assert not any(c in t for t in tokens for c in '";:')
    # idempotent on its own output (after joining): tokenizing twice changes nothing
    assert basic_english(" ".join(tokens)) == tokens


def test_get_tokenizer_names_and_callables():
    assert get_tokenizer() is basic_english
    assert get_tokenizer("basic_english") is basic_english
    assert get_tokenizer(None)("A b,  C") == ["A", "b,", "C"]
    assert get_tokenizer("split")("A b") == ["A", "b"]
    custom = lambda s: list(s)  # noqa: E731
    assert get_tokenizer(custom) is custom
    assert pickle.loads(pickle.dumps(get_tokenizer("split")))("x y") == ["x", "y"]


def test_tokenizer_errors():
    with pytest.raises(ValueError, match=r"tokenizer: expected 'basic_english'.*got 'spacy'"):
        get_tokenizer("spacy")
    with pytest.raises(TypeError, match="tokenizer: expected a name or a callable, got int"):
        get_tokenizer(3)
    with pytest.raises(TypeError, match="text: expected a str, got bytes"):
        basic_english(b"abc")
