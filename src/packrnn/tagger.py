"""The sequence tagger: a tag for every token (part of speech, named entities, chunks).

``SequenceTagger(TaggerConfig(...))``: word embedding, optional character-level word features,
recurrent layers (usually a BiLSTM), and a linear layer applied to every step's output.

NOTE [character features]
Words unseen in training all map to ``<unk>``; their spelling still tells a lot (``-ly``,
``-ing``, capitals, digits). With ``char_vocab_size > 0`` every word of the batch is itself
a sequence of characters: a small bidirectional recurrent layer reads them and its final
forward and backward states (2 * ``char_hidden_size`` features) are concatenated to the
word's embedding. The words of a batch have different lengths again, so that layer runs
packed too: ``N`` words, ``sum(len(word))`` character steps, no padding. With
``execution="padded"`` both layers run over padded tensors as the classic lesson does (the
character state is read after the padding of shorter words, the reverse directions start in
the padding): the model to compare against, not to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .data.collate import Batch
from .models import (DictConfig, _check_int, _check_network, embed, fill_embedding,
                     recurrent_layer)
from .packing import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = ["TaggerConfig", "SequenceTagger"]


@dataclass
class TaggerConfig(DictConfig):
    """Architecture of a ``SequenceTagger`` (saved in checkpoints; JSON-friendly)."""

    _config_name = "tagger config"

    vocab_size: int  # rows of the word embedding (specials <pad>, <unk> included)
    num_tags: int  # number of tags K; the per-token linear layer's output size
    embed_dim: int = 64  # word embedding size E
    hidden_size: int = 64  # hidden size H per direction
    cell: str = "lstm"  # "rnn", "lstm" or "gru" (the character layer uses the same cell)
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = True  # a tagger sees the words after the token too
    dropout: float = 0.0  # between recurrent layers and before the linear layer
    embed_dropout: float = 0.0  # on each token's features (embedding + character features)
    execution: str = "packed"  # "packed" (real steps only) or "padded" (the lesson's)
    padding_idx: int | None = 0  # word embedding row of <pad>: zero, never updated
    nonlinearity: str = "tanh"  # cell="rnn" only
    freeze_embedding: bool = False  # keep the word embedding fixed (e.g. pretrained vectors)
    sparse_embedding: bool = False  # sparse word-embedding gradients
    char_vocab_size: int = 0  # characters known; 0: no character features (NOTE above)
    char_embed_dim: int = 16  # character embedding size
    char_hidden_size: int = 32  # character layer's hidden size per direction
    char_padding_idx: int | None = 0  # character embedding row of <pad>

    def __post_init__(self) -> None:
        _check_network(self, bools=("bidirectional", "freeze_embedding", "sparse_embedding"))
        for name in ("num_tags", "char_embed_dim", "char_hidden_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("char_vocab_size", self.char_vocab_size, 0)
        for name, size in (("padding_idx", self.vocab_size),
                           ("char_padding_idx", self.char_vocab_size)):
            value = getattr(self, name)
            if value is not None and size:
                _check_int(name, value, 0)
                if value >= size:
                    raise ValueError(f"{name}: expected < {size}, got {value}")

    @property
    def char_features(self) -> int:
        """Features each word gets from its characters: 2 * char_hidden_size, or 0."""
        return 2 * self.char_hidden_size if self.char_vocab_size else 0

    @property
    def feature_size(self) -> int:
        """Size of a step's output fed to the linear layer: H, or 2H if bidirectional."""
        return self.hidden_size * (2 if self.bidirectional else 1)


class SequenceTagger(nn.Module):
    r"""Tag every token of sequences of different lengths: embedding (+ characters), RNN, linear.

    .. math::
        x_t = \mathrm{dropout_e}([\mathrm{Emb}[w_t];\ \mathrm{CharRNN}(w_t)]),\quad
        o_{1..L} = \mathrm{RNN}(x_{1..L}),\quad \mathrm{logits}_t = W\,\mathrm{dropout}(o_t) + b

    Args:
        config: a ``TaggerConfig``.

    Shapes:
        ``forward(packed)`` with a ``PackedSequence`` of ``(N,)`` word ids returns a
        PackedSequence of ``(N, K)`` logits with the same ``batch_sizes`` and indices: row
        ``r`` scores word ``r``, so the loss is ``cross_entropy(logits.data, targets.data)``
        with targets packed alike (``packrnn.data.collate_tokens``).
        ``forward(ids, lengths)`` with ``(B, T)`` padded ids returns ``(B, T, K)`` logits;
        positions ``t >= lengths[b]`` hold zeros (``execution="packed"``) or whatever the
        padded run computed there (``"padded"``): mask them out of any loss
        (``IGNORE_INDEX`` targets).
        ``chars``: with character features, a ``packrnn.data.Batch`` of the characters of the
        ``N`` real words (packed, or ``(N, C)`` padded with lengths): in ``packed.data`` order
        for packed input, sentence by sentence otherwise (as ``collate_tokens`` makes it).
        The character layer runs packed unless ``execution="padded"``.

    >>> tagger = SequenceTagger(TaggerConfig(vocab_size=100, num_tags=5))
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    >>> tagger(ids, lengths=[3, 2]).shape
    torch.Size([2, 3, 5])
    """

    def __init__(self, config: TaggerConfig) -> None:
        super().__init__()
        if not isinstance(config, TaggerConfig):
            raise TypeError(f"config: expected a TaggerConfig, got {type(config).__name__}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.padding_idx,
                                      sparse=c.sparse_embedding)
        if c.freeze_embedding:
            self.embedding.weight.requires_grad_(False)
        if c.char_vocab_size:
            self.char_embedding = nn.Embedding(c.char_vocab_size, c.char_embed_dim,
                                               padding_idx=c.char_padding_idx)
            self.char_rnn = recurrent_layer(c.cell, c.char_embed_dim, c.char_hidden_size,
                                            bidirectional=True, nonlinearity=c.nonlinearity)
        self.rnn = recurrent_layer(c.cell, c.embed_dim + c.char_features, c.hidden_size,
                                   num_layers=c.num_layers, bidirectional=c.bidirectional,
                                   dropout=c.dropout, nonlinearity=c.nonlinearity)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.feature_size, c.num_tags)

    def forward(self, ids: Tensor | PackedSequence, lengths: Any = None,
                chars: Batch | None = None) -> Tensor | PackedSequence:
        c = self.config
        if c.char_vocab_size and chars is None:
            raise ValueError("chars: expected the words' characters (a packrnn.data.Batch) for a "
                             "tagger with character features, got None")
        if isinstance(ids, torch.nn.utils.rnn.PackedSequence):
            if lengths is not None:
                raise ValueError("lengths: expected None with a PackedSequence input, got lengths")
            if c.execution == "padded":
                raise ValueError("ids: expected padded ids and lengths for execution='padded', "
                                 "got a PackedSequence")
            x = self._features(ids.data, chars)  # (N, E + F): real steps only
            out, _ = self.rnn(PackedSequence(x, ids.batch_sizes, ids.sorted_indices,
                                             ids.unsorted_indices))  # out.data (N, D)
            logits = self.fc(self.dropout(out.data))  # (N, K)
            return PackedSequence(logits, ids.batch_sizes, ids.sorted_indices,
                                  ids.unsorted_indices)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"ids: expected a (B, T) tensor of word ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        B, T = ids.shape
        lengths = (torch.full((B,), T, dtype=torch.int64) if lengths is None
                   else torch.as_tensor(lengths, dtype=torch.int64).cpu())
        if lengths.shape != (B,):
            raise ValueError(f"lengths: expected shape ({B},) for a batch of {B}, "
                             f"got {tuple(lengths.shape)}")
        real = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) real positions
        x = self._features(ids.reshape(-1), None)  # (B*T, E): padding embedded too
        x = x.view(B, T, -1)
        if c.char_vocab_size:
            feats = x.new_zeros(B, T, c.char_features)  # (B, T, F)
            feats[real.to(x.device)] = self._char_features(chars)  # real words, sentence order
            x = self.embed_dropout(torch.cat([x, feats], dim=-1))  # (B, T, E + F)
        if c.execution == "padded":
            out, _ = self.rnn(x)  # (B, T, D): every position, padding included
            return self.fc(self.dropout(out))  # (B, T, K)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        logits = self.fc(self.dropout(out.data))  # (N, K)
        logits, _ = pad_packed_sequence(
            PackedSequence(logits, packed.batch_sizes, packed.sorted_indices,
                           packed.unsorted_indices), batch_first=True, total_length=T)
        return logits  # (B, T, K), zeros at padding

    def _features(self, ids: Tensor, chars: Batch | None) -> Tensor:
        """Each token's input features (M, E [+ F]); dropout applied once all are joined."""
        emb = embed(self.embedding, ids.long())  # (M, E)
        if chars is None:
            return emb if self.config.char_vocab_size else self.embed_dropout(emb)
        return self.embed_dropout(torch.cat([emb, self._char_features(chars)], dim=-1))

    def _char_features(self, chars: Batch) -> Tensor:
        """Final forward and backward states of the character layer over each word: (W, 2Hc)."""
        words = chars.inputs
        if isinstance(words, Tensor) and words.numel() and self.config.execution == "packed":
            words = pack_padded_sequence(words, chars.lengths, batch_first=True,
                                         enforce_sorted=False)
        if isinstance(words, torch.nn.utils.rnn.PackedSequence):  # NOTE [character features]
            emb = self.char_embedding(words.data.long())  # (sum C, Ec)
            _, h = self.char_rnn(PackedSequence(emb, words.batch_sizes, words.sorted_indices,
                                                words.unsorted_indices))
        elif words.numel() == 0:  # a batch without words
            return self.char_embedding.weight.new_zeros(words.shape[0], self.config.char_features)
        else:
            _, h = self.char_rnn(self.char_embedding(words.long()))  # (W, C, Ec): after padding
        h_n = h[0] if isinstance(h, tuple) else h  # (2, W, Hc), words in the given order
        return torch.cat([h_n[0], h_n[1]], dim=-1)  # (W, 2Hc)

    def load_vectors(self, path: str, tokens: list[str]) -> int:
        """Initialise word-embedding rows from a word2vec/GloVe text file; returns rows found.

        As ``SequenceClassifier.load_vectors``: ``tokens[i]`` is the word of row ``i``.
        """
        return fill_embedding(self.embedding, self.config.padding_idx, path, tokens)
