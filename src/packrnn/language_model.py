"""The recurrent language model: predict the next token (character or word) at every step.

``LanguageModel(LanguageModelConfig(...))``: embedding, unidirectional recurrent layers, a
linear layer over every step's output (optionally sharing its weight with the embedding), and
``generate`` to sample text step by step carrying the recurrent state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .models import DictConfig, _check_int, _check_network, embed, recurrent_layer
from .packing import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = ["LanguageModelConfig", "LanguageModel"]


@dataclass
class LanguageModelConfig(DictConfig):
    """Architecture of a ``LanguageModel`` (saved in checkpoints; JSON-friendly)."""

    _config_name = "language model config"

    vocab_size: int  # tokens (specials <pad>, <unk>, <bos>, <eos> included); output size V
    embed_dim: int = 64  # embedding size E
    hidden_size: int = 128  # hidden size H
    cell: str = "lstm"  # "rnn", "lstm" or "gru"
    num_layers: int = 1  # stacked recurrent layers (one direction: the future is unknown)
    dropout: float = 0.0  # between recurrent layers and before the linear layer
    embed_dropout: float = 0.0  # on the embedded tokens
    execution: str = "packed"  # "packed" (real steps only) or "padded" (every position)
    padding_idx: int | None = 0  # embedding row of <pad>
    nonlinearity: str = "tanh"  # cell="rnn" only
    tie_weights: bool = False  # output layer weight = embedding weight (needs E == H)
    unk_index: int | None = 1  # <unk>: never generated
    bos_index: int = 2  # the token every sequence starts with (generate feeds it first)
    eos_index: int = 3  # the token that ends a sequence (generate stops there)

    def __post_init__(self) -> None:
        _check_network(self)
        if not isinstance(self.tie_weights, bool):
            raise TypeError(f"tie_weights: expected a bool, got {self.tie_weights!r}")
        if self.tie_weights and self.embed_dim != self.hidden_size:
            raise ValueError("tie_weights: expected embed_dim == hidden_size (the output layer "
                             f"reuses the embedding), got {self.embed_dim} and {self.hidden_size}")
        for name in ("bos_index", "eos_index", "padding_idx", "unk_index"):
            if getattr(self, name) is None and name in ("padding_idx", "unk_index"):
                continue
            _check_int(name, getattr(self, name), 0)
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name}: expected < vocab_size ({self.vocab_size}), "
                                 f"got {getattr(self, name)}")


class LanguageModel(nn.Module):
    r"""Next-token prediction over sequences of different lengths: embedding, RNN, linear.

    .. math::
        o_{1..L}, h = \mathrm{RNN}(\mathrm{dropout_e}(\mathrm{Emb}[x_{1..L}]), h_0),\quad
        \mathrm{logits}_t = W\,\mathrm{dropout}(o_t) + b \quad (W = \mathrm{Emb}\ \text{if tied})

    Args:
        config: a ``LanguageModelConfig``.

    Shapes:
        ``forward(packed, hx=None)`` with a PackedSequence of ``(N,)`` ids returns
        ``(logits, h)``: a PackedSequence of ``(N, V)`` logits with the input's
        ``batch_sizes`` and indices (row ``r`` predicts the token after ``packed.data[r]``)
        and the final state as the recurrent layer returns it.
        ``forward(ids, lengths, hx=None)`` with ``(B, T)`` padded ids returns ``(B, T, V)``
        logits (zeros at padding with ``execution="packed"``).

    >>> lm = LanguageModel(LanguageModelConfig(vocab_size=10, embed_dim=8, hidden_size=8))
    >>> logits, h = lm(torch.tensor([[2, 5, 6], [2, 7, 0]]), lengths=[3, 2])
    >>> logits.shape
    torch.Size([2, 3, 10])
    """

    def __init__(self, config: LanguageModelConfig) -> None:
        super().__init__()
        if not isinstance(config, LanguageModelConfig):
            raise TypeError(f"config: expected a LanguageModelConfig, got {type(config).__name__}")
        self.config = c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.padding_idx)
        self.rnn = recurrent_layer(c.cell, c.embed_dim, c.hidden_size, num_layers=c.num_layers,
                                   dropout=c.dropout, nonlinearity=c.nonlinearity)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.hidden_size, c.vocab_size)
        if c.tie_weights:
            self.fc.weight = self.embedding.weight  # one (V, E) parameter, two uses

    def forward(self, ids: Tensor | PackedSequence, lengths: Any = None, hx: Any = None
                ) -> tuple[Tensor | PackedSequence, Any]:
        c = self.config
        if isinstance(ids, torch.nn.utils.rnn.PackedSequence):
            if lengths is not None:
                raise ValueError("lengths: expected None with a PackedSequence input, got lengths")
            if c.execution == "padded":
                raise ValueError("ids: expected padded ids and lengths for execution='padded', "
                                 "got a PackedSequence")
            emb = self.embed_dropout(embed(self.embedding, ids.data.long()))  # (N, E)
            out, h = self.rnn(PackedSequence(emb, ids.batch_sizes, ids.sorted_indices,
                                             ids.unsorted_indices), hx)  # out.data (N, H)
            logits = self.fc(self.dropout(out.data))  # (N, V)
            return PackedSequence(logits, ids.batch_sizes, ids.sorted_indices,
                                  ids.unsorted_indices), h
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"ids: expected a (B, T) tensor of token ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        B, T = ids.shape
        emb = self.embed_dropout(embed(self.embedding, ids.long()))  # (B, T, E)
        if c.execution == "padded" or lengths is None:
            out, h = self.rnn(emb, hx)  # (B, T, H): every position
            return self.fc(self.dropout(out)), h  # (B, T, V)
        lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
        if lengths.shape != (B,):
            raise ValueError(f"lengths: expected shape ({B},) for a batch of {B}, "
                             f"got {tuple(lengths.shape)}")
        packed = pack_padded_sequence(emb, lengths, batch_first=True, enforce_sorted=False)
        out, h = self.rnn(packed, hx)
        logits = self.fc(self.dropout(out.data))  # (N, V)
        logits, _ = pad_packed_sequence(
            PackedSequence(logits, packed.batch_sizes, packed.sorted_indices,
                           packed.unsorted_indices), batch_first=True, total_length=T)
        return logits, h  # (B, T, V), zeros at padding

    @torch.no_grad()
    def generate(self, prefix: Sequence[int] | Tensor, max_new: int = 100,
                 temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None) -> list[int]:
        """Continue ``<bos> prefix`` token by token; returns the new token ids.

        The prefix is read in one call; then each step feeds the last token and the carried
        recurrent state (one step of the RNN, never the whole text again), samples from
        ``softmax(logits / temperature)`` restricted to the ``top_k`` likeliest tokens, and
        stops after ``max_new`` tokens or at ``<eos>`` (not returned). ``<pad>``, ``<unk>``
        and ``<bos>`` are never sampled.

        Args:
            prefix: token ids to start from (without ``<bos>``); may be empty.
            max_new (int): at most this many new tokens. Default: 100.
            temperature (float): > 0 samples (lower: surer); 0 takes the likeliest token
                (greedy). Default: 1.0.
            top_k (int, optional): sample among the ``top_k`` likeliest tokens only.
            seed (int, optional): seeds a private generator (the global RNG is untouched).

        >>> lm = LanguageModel(LanguageModelConfig(vocab_size=10, embed_dim=8, hidden_size=8))
        >>> len(lm.generate([4, 5], max_new=3, temperature=0)) <= 3
        True
        """
        c = self.config
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
            raise ValueError(f"max_new: expected an int >= 0, got {max_new!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                                  or top_k < 1):
            raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
        ids = [int(i) for i in (prefix.tolist() if isinstance(prefix, Tensor) else prefix)]
        bad = next((i for i in ids if not 0 <= i < c.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prefix: expected token ids in [0, {c.vocab_size}), got {bad}")
        was_training = self.training
        self.eval()
        device = self.embedding.weight.device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,))))
        banned = [i for i in (c.padding_idx, c.unk_index, c.bos_index)
                  if i is not None and i != c.eos_index]
        x = torch.tensor([[c.bos_index, *ids]], device=device)  # (1, L + 1)
        out: list[int] = []
        h = None
        for _ in range(max_new):
            logits, h = self(x, hx=h)  # (1, L, V) once for the prefix, then (1, 1, V)
            last = logits[0, -1].float()  # (V,)
            last[banned] = float("-inf")
            if temperature == 0:
                token = int(last.argmax())
            else:
                last = last / temperature
                if top_k is not None and top_k < last.numel():
                    kth = torch.topk(last, top_k).values[-1]
                    last[last < kth] = float("-inf")
                token = int(torch.multinomial(torch.softmax(last, -1), 1, generator=gen))
            if token == c.eos_index:
                break
            out.append(token)
            x = torch.tensor([[token]], device=device)  # (1, 1): one step, state carried in h
        self.train(was_training)
        return out
