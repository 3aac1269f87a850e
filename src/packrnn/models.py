"""The sequence classifier: embedding -> recurrent layers -> pooling -> linear.

``SequenceClassifier(ModelConfig(...))`` covers the three classifiers of the classic AG News
lesson by configuration, plus the correct variants of the lesson's shortcuts:

=============================================  =============================================
lesson's classifier                            configuration
=============================================  =============================================
RNN, mean over the padded outputs              ``cell="rnn", execution="padded",
                                               pooling="mean_padded"``
LSTM, last hidden state of the padded batch    ``cell="lstm", execution="padded",
                                               pooling="last"``
LSTM on packed input, last hidden state        ``cell="lstm", execution="packed",
                                               pooling="last"`` (the default)
=============================================  =============================================

NOTE [padding in the lesson's classifiers]
With ``execution="padded"`` the recurrence runs over every position of the padded batch, as
the lesson's first two classifiers do: a short sequence's state keeps being updated by the
padding tokens after its end, so ``h_n`` (``pooling="last"``) is *not* its state at its last
real step, and ``pooling="mean_padded"`` averages padding positions into the mean. Both make
the prediction for a sequence depend on how long the other sequences of its batch are.
``execution="packed"`` computes only the real steps: ``last`` is the state at each sequence's
own last step (and, for the reverse direction, after its first step), and ``mean``/``max``
pool over real steps only; the prediction for a sequence does not depend on its batch.
``mean`` and ``max`` are masked to real steps in the padded execution too.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_hooks

from . import functional
from .errors import InputError
from .ops import lengths_to_mask, max_pool, mean_pool
from .packing import (PackedSequence, _validated, check_packed_sequence, pack_padded_sequence,
                      pad_packed_sequence)
from .rnn import GRU, LSTM, RNN, _RNNBase

__all__ = ["ModelConfig", "SequenceClassifier", "load_vectors", "CELLS", "POOLINGS",
           "EXECUTIONS"]

CELLS = ("rnn", "lstm", "gru")
POOLINGS = ("last", "mean", "max", "mean_padded")
EXECUTIONS = ("packed", "padded")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def _check_probability(name: str, value: Any) -> None:
    """A dropout probability: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def _check_network(config: Any, bools: Sequence[str] = ()) -> None:
    """The checks every model config shares: sizes, cell, execution, nonlinearity, dropouts,
    and the flags named in ``bools``."""
    for name in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
        _check_int(name, getattr(config, name), 1)
    _check_choice("cell", config.cell, CELLS)
    _check_choice("execution", config.execution, EXECUTIONS)
    _check_choice("nonlinearity", config.nonlinearity, ("tanh", "relu"))
    for name in bools:
        if not isinstance(getattr(config, name), bool):
            raise TypeError(f"{name}: expected a bool, got {getattr(config, name)!r}")
    for name in ("dropout", "embed_dropout"):
        _check_probability(name, getattr(config, name))


class DictConfig:
    """Mixin for config dataclasses: a plain dict (JSON, checkpoints) and back.

    ``_config_name`` names the config in errors, e.g. "model config".
    """

    _config_name = "config"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Inverse of ``to_dict``; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls._config_name}: expected keys among {sorted(names)}, got {unknown}")
        return cls(**d)


@dataclass
class ModelConfig(DictConfig):
    """Architecture of a ``SequenceClassifier`` (saved in checkpoints; JSON-friendly)."""

    _config_name = "model config"

    vocab_size: int  # rows of the embedding table (including the specials <pad>, <unk>)
    num_classes: int  # number of labels; the linear layer's output size
    embed_dim: int = 64  # embedding size E, the recurrent layer's input size
    hidden_size: int = 32  # hidden size H per direction
    cell: str = "lstm"  # recurrent cell: "rnn" (Elman), "lstm" or "gru"
    num_layers: int = 1  # stacked recurrent layers
    bidirectional: bool = False  # add a reverse direction; features become 2H
    dropout: float = 0.0  # dropout between recurrent layers and before the linear layer
    embed_dropout: float = 0.0  # dropout on the embedded tokens (the recurrent layer's input)
    pooling: str = "last"  # "last" | "mean" | "max" | "mean_padded"; see NOTE in models.py
    execution: str = "packed"  # "packed" (real steps only) or "padded" (every position)
    padding_idx: int | None = 0  # embedding row of <pad>: zero and never updated; None: none
    nonlinearity: str = "tanh"  # cell="rnn" only: "tanh" or "relu"
    freeze_embedding: bool = False  # keep the embedding fixed (e.g. pretrained vectors)
    sparse_embedding: bool = False  # sparse embedding gradients (only the batch's rows)

    def __post_init__(self) -> None:
        _check_network(self, bools=("bidirectional", "freeze_embedding", "sparse_embedding"))
        _check_int("num_classes", self.num_classes, 1)
        _check_choice("pooling", self.pooling, POOLINGS)
        if self.padding_idx is not None:
            _check_int("padding_idx", self.padding_idx, 0)
            if self.padding_idx >= self.vocab_size:
                raise ValueError(f"padding_idx: expected < vocab_size ({self.vocab_size}), "
                                 f"got {self.padding_idx}")
        if self.pooling == "mean_padded" and self.execution != "padded":
            raise ValueError("pooling: expected 'mean_padded' only with execution='padded' "
                             "(it reproduces the lesson's mean over padded outputs), got "
                             f"execution={self.execution!r}")

    @property
    def feature_size(self) -> int:
        """Size of the pooled features fed to the linear layer: H, or 2H if bidirectional."""
        return self.hidden_size * (2 if self.bidirectional else 1)



class SequenceClassifier(nn.Module):
    r"""Classify token sequences of different lengths: embedding, RNN/LSTM/GRU, pooling, linear.

    .. math::
        x_t = \mathrm{dropout_e}(\mathrm{Emb}[w_t]),\quad o_{1..L}, h_n = \mathrm{RNN}(x_{1..L}),\quad
        z = \mathrm{pool}(o, h_n),\quad \mathrm{logits} = W\,\mathrm{dropout}(z) + b

    Pooling (see NOTE [padding in the lesson's classifiers] in this module):
    ``last``: the last layer's final state ``h_n`` (both directions concatenated);
    ``mean`` / ``max``: over each sequence's real steps of the last layer's output;
    ``mean_padded``: mean over every padded position (the lesson's, ``execution="padded"``).
    A sequence of length 0 gets the initial state (zeros) for ``last`` and zeros for
    ``mean``/``max``.

    Args:
        config: a ``ModelConfig``.

    Shapes:
        ``forward(ids, lengths)``: ``ids`` (B, T) int64 token ids padded with
        ``config.padding_idx`` (batch first), ``lengths`` (B,) real lengths (list or tensor;
        ``None`` means every sequence is T long). Or ``forward(packed)`` with a
        ``PackedSequence`` of ids. Returns logits (B, C), in the input's batch order.
        A token id outside ``[0, vocab_size)`` at an embedded position is a ``ValueError``
        naming it.

    >>> model = SequenceClassifier(ModelConfig(vocab_size=100, num_classes=4))
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    >>> model(ids, lengths=[3, 2]).shape
    torch.Size([2, 4])
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.padding_idx,
                                      sparse=c.sparse_embedding)
        if c.freeze_embedding:
            self.embedding.weight.requires_grad_(False)
        self.rnn = recurrent_layer(c.cell, c.embed_dim, c.hidden_size, num_layers=c.num_layers,
                                   bidirectional=c.bidirectional, dropout=c.dropout,
                                   nonlinearity=c.nonlinearity)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        self.dropout = nn.Dropout(c.dropout)
        self.fc = nn.Linear(c.feature_size, c.num_classes)

    def forward(self, ids: Tensor | PackedSequence, lengths: Any = None) -> Tensor:
        if not (self.training or torch.is_grad_enabled()) and isinstance(ids, Tensor):
            logits = self._fused_inference(ids, lengths)  # NOTE [fused inference]
            if logits is not None:
                return logits
        c = self.config
        if isinstance(ids, torch.nn.utils.rnn.PackedSequence):  # packrnn's is a subclass
            if lengths is not None:
                raise ValueError("lengths: expected None with a PackedSequence input, got lengths")
            self._check_ids(ids.data)
            if c.execution == "padded":
                ids, lengths = pad_packed_sequence(ids, batch_first=True,
                                                   padding_value=c.padding_idx or 0)
                return self._forward_padded(ids, lengths)
            return self._forward_packed(ids)
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError(f"ids: expected a (B, T) tensor of token ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids: expected an int64 tensor of token ids, got {ids.dtype}")
        B, T = ids.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64)
        else:
            lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
            if lengths.shape != (B,):
                raise ValueError(f"lengths: expected shape ({B},) for a batch of {B}, "
                                 f"got {tuple(lengths.shape)}")
        if c.execution == "padded":
            self._check_ids(ids)  # every position is embedded, padding included
            return self._forward_padded(ids, lengths)
        if torch.compiler.is_compiling():
            # NOTE [compiled classifier]: packing has data-dependent shapes; the layer's padded
            # + lengths path computes the same real steps with static shapes.
            return self._forward_lengths(ids, lengths)
        if torch.is_grad_enabled():
            z = self._fused_features(ids, lengths)  # NOTE [fused training]
            if z is not None:
                return self.fc(_dropout(self.dropout, z))
        return self.fc(_dropout(self.dropout, self._packed_features(ids, lengths)))

    def _packed_features(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The packed execution's pooled features (B, D) of padded ids, by the module path."""
        if ids.shape[0] == 1:  # one sequence: nothing to pack (NOTE [one sequence])
            return self._features_one(ids, lengths)
        return self._features_packed(self._pack_ids(ids, lengths))

    # NOTE [fused inference]
    # An eval-mode call without gradients on padded ids (+ lengths), the packed execution,
    # last/mean/max pooling and the native backend runs the whole forward as one operator,
    # packrnn::classifier_infer (NOTE [Fused classifier inference] in classifier.cpp): the same
    # aten calls as the module path, so the same logits bit for bit, without the Python and
    # module-call work that is most of a one-text call at small sizes. Anything else, and a
    # model with forward hooks on its parts (which a fused call would skip), takes the module
    # path; so does bad input, whose error is the module path's to give.
    def _fused_inference(self, ids: Tensor, lengths: Any) -> Tensor | None:
        # Lean on purpose: each nn.Module attribute lookup costs ~1 us, a tenth of the call.
        c = self.config
        if (c.execution != "packed" or c.pooling == "mean_padded" or ids.dim() != 2
                or not ids.is_cpu or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            return None
        parts = self._modules
        if _hooked(*parts.values()):
            return None
        rnn, embedding, fc = parts["rnn"], parts["embedding"], parts["fc"]
        if (type(embedding) is not nn.Embedding or type(fc) is not nn.Linear
                or not isinstance(rnn, _RNNBase) or embedding.max_norm is not None):
            return None
        table = embedding._parameters.get("weight")  # None: a parametrized weight
        weight, fc_bias = fc._parameters.get("weight"), fc._parameters.get("bias")
        if table is None or weight is None:
            return None
        impl = functional._get_backend(rnn.backend, table.dtype)
        if not hasattr(impl, "classifier_infer"):
            return None
        if lengths is None:
            lengths = functional._full_batch_sizes(ids.shape[0], ids.shape[-1])  # (B,) all T
        elif not isinstance(lengths, Tensor) or lengths.dtype != torch.int64 or not lengths.is_cpu:
            try:
                lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
            except (TypeError, ValueError, RuntimeError):
                return None  # the module path says what is wrong
        try:  # ValueError: bad ids or lengths, or shapes the op does not take
            return impl.classifier_infer(
                mode=rnn.mode.lower(), ids=ids, lengths=lengths, embedding=table,
                weights=rnn._flat_weights, fc_weight=weight, fc_bias=fc_bias,
                num_layers=rnn.num_layers, bidirectional=rnn.bidirectional, bias=rnn.bias,
                pooling=c.pooling)
        except ValueError:
            return None

    # NOTE [fused training]
    # With gradients on, the packed execution (of padded ids + lengths, or of a PackedSequence
    # of ids, the trainer's batches) spends ~40 % of a small training step (B = 16, H = 32)
    # outside the arithmetic: module calls, argument checks, and one autograd node with its
    # Python for the embedding, each layer, the bias fold, the packing and the pooling. With
    # the native backend on CPU, the forward up to the pooled features is instead one operator
    # and its backward another, under ONE autograd node
    # (_native.classifier_features; NOTE [Fused classifier training] in classifier.cpp): the
    # same kernels and aten calls, so the same features and gradients as the module path
    # (tested). Its dropouts (embedding, between layers) draw their masks as F.dropout does,
    # in the same order, so a seed gives the same masks. The head (dropout, fc) stays a module
    # call. Only where that is all the module path would do: nn.Dropout modules with p < 1, a
    # plain dense nn.Embedding, a packrnn layer without proj_size, no forward hooks on the
    # parts it skips. Anything else takes the module path, and so does bad input (its error is
    # the module path's to give). A backward with create_graph=True differentiates the module
    # path's recomputation, run from the forward's RNG state (the same masks): exact higher
    # derivatives.
    def _fused_features(self, ids: Tensor | None, lengths: Tensor | None,
                        packed: PackedSequence | None = None) -> Tensor | None:
        """Pooled features of padded ``ids`` + ``lengths``, or of a checked ``packed``
        sequence of ids, as one autograd node; None where the module path must run."""
        c = self.config
        device = (ids if packed is None else packed.data).device
        if (c.pooling == "mean_padded" or device.type != "cpu" or torch.jit.is_tracing()
                or torch.compiler.is_compiling()):
            return None
        parts = self._modules
        rnn, embedding, embed_dropout = parts["rnn"], parts["embedding"], parts["embed_dropout"]
        if (not _plain_embedding(embedding) or not isinstance(rnn, _RNNBase) or rnn.proj_size
                or type(embed_dropout) is not nn.Dropout or embed_dropout.p >= 1
                or rnn.dropout >= 1 or _hooked(rnn, embedding, embed_dropout)):
            return None
        table = embedding._parameters.get("weight")  # None: a parametrized weight
        if table is None or not table.is_cpu:
            return None
        impl = functional._get_backend(rnn.backend, table.dtype)
        if not hasattr(impl, "classifier_features"):
            return None
        weights = rnn._flat_weights
        p_embed = embed_dropout.p if embed_dropout.training else 0.0
        p_layer = rnn.dropout if rnn.training and rnn.num_layers > 1 else 0.0
        rng = torch.get_rng_state() if p_embed or p_layer else None

        def recompute():
            with torch.random.fork_rng(devices=[]):
                if rng is not None:
                    torch.set_rng_state(rng)  # the forward's dropout masks
                features = (self._packed_features(ids, lengths) if packed is None
                            else self._features_packed(packed))
                return features, [table, *weights]

        try:
            return impl.classifier_features(
                mode=rnn.mode.lower(), ids=ids, lengths=lengths, embedding=table,
                weights=weights, num_layers=rnn.num_layers, bidirectional=rnn.bidirectional,
                bias=rnn.bias, pooling=c.pooling, padding_idx=embedding.padding_idx,
                embed_dropout=p_embed, layer_dropout=p_layer, packed=packed,
                recompute=recompute)
        except ValueError:
            return None

    # NOTE [packing ids]
    # A batch of padded ids is range-checked (_check_ids) and packed (pack_padded_sequence)
    # before the embedding: at B = 16 the Python of those two is ~10 % of a training step (one
    # thread). With the native backend, one operator (packrnn::pack_ids, the packing code of
    # the fused inference, classifier.cpp) does both and gives the same PackedSequence (the
    # same at::sort order; int64 data, which the embedding reads anyway). Bad ids or lengths
    # take the Python path, whose errors are the ones to show.
    def _pack_ids(self, ids: Tensor, lengths: Tensor) -> PackedSequence:
        """``pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False)`` of
        checked ids; ``lengths`` (B,) CPU int64."""
        if ids.is_cpu and not torch.jit.is_tracing():
            impl = functional._get_backend(getattr(self.rnn, "backend", None),  # torch's: None
                                           self.embedding.weight.dtype)
            if hasattr(impl, "pack_ids"):
                try:
                    return impl.pack_ids(ids, lengths, self.config.vocab_size)
                except ValueError:
                    pass  # the checked path below says what is wrong
        self._check_ids(ids, lengths)
        return pack_padded_sequence(ids, lengths, batch_first=True, enforce_sorted=False)

    def _check_ids(self, ids: Tensor, lengths: Tensor | None = None) -> None:
        """Token ids must be rows of the embedding (nn.Embedding's IndexError names neither).

        ``ids``: (B, T) padded ids, or (N,) packed ones; ``lengths``: (B,) when only each
        sequence's first ``lengths[b]`` positions are embedded (None: all of them). Eager mode
        only: under torch.compile the check would be a data-dependent branch.
        """
        if ids.numel() == 0 or torch.compiler.is_compiling():
            return
        vocab_size = self.config.vocab_size
        low, high = torch.aminmax(ids)  # one pass: the common case, every id in range
        if int(low) >= 0 and int(high) < vocab_size:
            return
        outside = (ids < 0) | (ids >= vocab_size)  # (B, T) or (N,)
        if lengths is not None:
            outside &= lengths_to_mask(lengths, ids.shape[1], batch_first=True).to(ids.device)
        if not bool(outside.any()):
            return
        bad = outside.nonzero()[0]  # the first bad position
        where = f" at {tuple(bad.tolist())}" if ids.dim() == 2 else ""
        raise ValueError(f"ids: expected token ids in [0, {vocab_size}) (vocab_size), got "
                         f"{int(ids[tuple(bad)])}{where}")

    # NOTE [one sequence]
    # A batch of one (a service classifying one text) needs no packing: its real steps are the
    # first `length` ids, in order, which are exactly the packed rows. So the layer runs on them
    # as a full batch of one, and gives the packed execution's numbers (embedding dropout draws
    # the same mask too: same number of rows, same order).
    def _features_one(self, ids: Tensor, lengths: Tensor) -> Tensor:
        c = self.config
        steps = int(lengths[0])
        if steps < 0:  # as_lengths' errors
            raise InputError(f"lengths: expected non-negative lengths, got {steps} at index 0")
        if steps > ids.shape[1]:
            raise InputError(f"lengths: expected every length <= {ids.shape[1]} (the padded time "
                             f"dimension), got {steps} at index 0")
        ids = ids[:, :steps]  # (1, L): the real steps
        self._check_ids(ids)
        emb = _dropout(self.embed_dropout, embed(self.embedding, ids.long()))  # (1, L, E)
        out, h = self.rnn(emb)  # (1, L, D): every step real
        if c.pooling == "last":
            z = self._last_state(h)
        else:
            z = _POOL[c.pooling](out, lengths, batch_first=True)  # (1, D)
        return z

    def _forward_packed(self, packed_ids: PackedSequence) -> Tensor:
        z = None
        if torch.is_grad_enabled():
            check_packed_sequence(packed_ids, "ids")
            z = self._fused_features(None, None, packed_ids)  # NOTE [fused training]
        if z is None:
            z = self._features_packed(packed_ids)
        return self.fc(_dropout(self.dropout, z))  # (B, C)

    def _features_packed(self, packed_ids: PackedSequence) -> Tensor:
        c = self.config
        batch = check_packed_sequence(packed_ids, "ids")  # free for packrnn's own packing
        emb = embed(self.embedding, packed_ids.data.long())  # (N, E): real steps only
        emb = _dropout(self.embed_dropout, emb)
        packed = _validated(PackedSequence(emb, packed_ids.batch_sizes, packed_ids.sorted_indices,
                                           packed_ids.unsorted_indices), batch)
        out, h = self.rnn(packed)  # out.data (N, D); h_n (layers*dirs, B, H)
        if c.pooling == "last":
            z = self._last_state(h)
        else:
            z = _POOL[c.pooling](out)  # (B, D) over real steps
        return z

    def _forward_lengths(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """The packed execution's numbers from padded ids: the layer runs only the real steps
        of each sequence (NOTE [compiled classifier]). Embedding dropout here draws over the
        padded positions, so under training a seed gives other masks than the packed form."""
        c = self.config
        emb = self.embed_dropout(self.embedding(ids.long()))  # (B, T, E)
        out, h = self.rnn(emb, lengths=lengths)  # (B, T, D): zero at padding
        if c.pooling == "last":
            z = self._last_state(h)  # each sequence's state at its last real step
        else:
            z = _POOL[c.pooling](out, lengths, batch_first=True)  # (B, D) over real steps
        return self.fc(self.dropout(z))  # (B, C)

    def _forward_padded(self, ids: Tensor, lengths: Tensor) -> Tensor:
        c = self.config
        emb = _dropout(self.embed_dropout, embed(self.embedding, ids.long()))  # (B, T, E)
        out, h = self.rnn(emb)  # (B, T, D): every position, padding included
        if c.pooling == "last":
            z = self._last_state(h)  # state after all T positions (NOTE above)
        elif c.pooling == "mean_padded":
            z = out.mean(dim=1)  # (B, D): the lesson's mean, padding included
        else:
            z = _POOL[c.pooling](out, lengths, batch_first=True)  # (B, D) over real steps
        return self.fc(_dropout(self.dropout, z))  # (B, C)

    def _last_state(self, h: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        c = self.config
        h_n = h[0] if isinstance(h, tuple) else h  # (layers*dirs, B, H)
        if not c.bidirectional:
            return h_n[-1]  # (B, H): the last layer
        return torch.cat([h_n[-2], h_n[-1]], dim=-1)  # (B, 2H): last layer, forward then reverse

    def load_vectors(self, path: str | os.PathLike, tokens: Sequence[str]) -> int:
        """Initialise embedding rows from a word2vec/GloVe text file; returns rows found.

        ``tokens[i]`` is the token of embedding row ``i`` (the vocabulary's index-to-token
        list). Rows of tokens absent from the file keep their random initialisation; the
        padding row stays zero. See ``load_vectors``.
        """
        return fill_embedding(self.embedding, self.config.padding_idx, path, tokens)


def fill_embedding(embedding: nn.Embedding, padding_idx: int | None,
                   path: str | os.PathLike, tokens: Sequence[str]) -> int:
    """Copy the vectors of a word2vec/GloVe file into ``embedding``'s rows (``tokens[i]`` is row
    ``i``'s token); the padding row stays as it is. Returns the rows found. The models'
    ``load_vectors`` methods call this."""
    if len(tokens) != embedding.num_embeddings:
        raise ValueError(f"tokens: expected {embedding.num_embeddings} tokens (vocab_size), "
                         f"got {len(tokens)}")
    vectors = load_vectors(path, {t: i for i, t in enumerate(tokens)},
                           dim=embedding.embedding_dim)
    with torch.no_grad():
        for i, v in vectors.items():
            if i != padding_idx:
                embedding.weight[i] = v
    return len(vectors)


# NOTE [embedding gradient buffers]
# A dense embedding gradient is a (V, E) tensor made anew every training step (the lesson's
# V = 20,000, E = 64: 5 MB), and glibc may hand such blocks back to the OS and fault them in
# again: at the lesson's size (B = 16) packrnn's step took ~200-280 page faults, all in the zero
# fill of that gradient (how many depends on the process's allocation history: torch's own
# padded step took ~40 alone in a process); at V = 100,000, E = 128 (51 MB, always mapped
# afresh) ~12,800 a step, 15 of a 34 ms step. So in eager mode
# on CPU with the native backend the models' embeddings take that gradient from the kernel's
# buffer cache (NOTE [Buffer cache] in recurrence.cpp; the block goes back when the gradient
# is freed, e.g. by zero_grad) and fill it as torch's embedding backward does: zeros, then each
# id's gradient row added in id order, the padding row left zero -- the same numbers. Other
# embeddings (sparse, max_norm, scale_grad_by_freq, hooked, small) run nn.Embedding itself.
_MIN_CACHED_GRAD_BYTES = 4 << 20  # the buffer cache's own threshold (empty_rows)


def _hooked(*modules: nn.Module) -> bool:
    """Whether a module hook, forward or backward (global, or one of ``modules``' own), would
    see a call of one of ``modules``: the fused paths that skip those module calls then step
    aside."""
    hooks = _module_hooks
    if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks
            or hooks._global_backward_hooks or hooks._global_backward_pre_hooks):
        return True
    for module in modules:  # a plain loop: this runs on every one-text call
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return True
    return False


def _plain_embedding(embedding: nn.Module) -> bool:
    """Whether ``embedding`` is a plain dense ``nn.Embedding`` (not sparse, no ``max_norm``, no
    ``scale_grad_by_freq``), whose lookup and gradient packrnn may compute itself: ``embed`` and
    the fused training (NOTE [fused training])."""
    return (type(embedding) is nn.Embedding and not embedding.sparse
            and embedding.max_norm is None and not embedding.scale_grad_by_freq)


class _EmbeddingRows(torch.autograd.Function):
    """``table[ids]`` whose table gradient comes from the buffer cache (NOTE [embedding
    gradient buffers])."""

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor, padding_idx: int | None, empty) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.rows, ctx.padding_idx, ctx.empty = table.shape[0], padding_idx, empty
        return table.index_select(0, ids)  # (M, E), as F.embedding

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (M, E)
        (ids,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a differentiable sum (higher derivatives)
            table_grad = grad.new_zeros(ctx.rows, grad.shape[1]).index_add(0, ids, grad)
            if ctx.padding_idx is not None:
                table_grad = table_grad.index_fill(0, ids.new_tensor([ctx.padding_idx]), 0)
            return table_grad, None, None, None
        table_grad = ctx.empty(ctx.rows, grad.shape[1], grad.dtype).zero_()  # (V, E)
        table_grad.index_add_(0, ids, grad.contiguous())
        if ctx.padding_idx is not None:
            table_grad[ctx.padding_idx].zero_()
        return table_grad, None, None, None


def embed(embedding: nn.Embedding, ids: Tensor) -> Tensor:
    """``embedding(ids)``: the models' embedding lookup, ``(*) -> (*, E)``; in eager training on
    CPU its dense gradient skips page faults (NOTE [embedding gradient buffers])."""
    table = embedding.weight
    if (not (torch.is_grad_enabled() and table.requires_grad) or not _plain_embedding(embedding)
            or not table.is_cpu or table.numel() * table.element_size() < _MIN_CACHED_GRAD_BYTES
            or _hooked(embedding) or torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return embedding(ids)
    impl = functional._get_backend(None, table.dtype)
    if not hasattr(impl, "empty"):
        return embedding(ids)
    flat = ids.reshape(-1)  # (M,)
    rows = _EmbeddingRows.apply(table, flat, embedding.padding_idx, impl.empty)  # (M, E)
    return rows if ids.dim() == 1 else rows.view(*ids.shape, table.shape[1])  # a view: a node


_POOL = {"mean": mean_pool, "max": max_pool}
_BAD_BYTE = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, under surrogateescape


def _dropout(layer: nn.Dropout, x: Tensor) -> Tensor:
    """``layer(x)``, skipped where it is the identity (eval mode, p = 0): a module call costs
    ~5 us, a tenth of a one-sentence forward."""
    return layer(x) if layer.training and layer.p > 0 else x


def recurrent_layer(cell: str, input_size: int, hidden_size: int, *, num_layers: int = 1,
                    bidirectional: bool = False, dropout: float = 0.0,
                    nonlinearity: str = "tanh") -> RNN | LSTM | GRU:
    """The packrnn ``RNN`` / ``LSTM`` / ``GRU`` (batch first) a model config names.

    ``dropout`` applies between stacked layers only (none with one layer); ``nonlinearity``
    only to ``cell="rnn"``.

    >>> recurrent_layer("gru", 8, 4, bidirectional=True)
    GRU(8, 4, batch_first=True, bidirectional=True)
    """
    _check_choice("cell", cell, CELLS)
    kwargs: dict[str, Any] = dict(num_layers=num_layers, bidirectional=bidirectional,
                                  batch_first=True, dropout=dropout if num_layers > 1 else 0.0)
    if cell == "rnn":
        return RNN(input_size, hidden_size, nonlinearity=nonlinearity, **kwargs)
    if cell == "lstm":
        return LSTM(input_size, hidden_size, **kwargs)
    return GRU(input_size, hidden_size, **kwargs)


def load_vectors(path: str | os.PathLike, token_to_index: Mapping[str, int],
                 dim: int | None = None) -> dict[int, Tensor]:
    """Read the vectors of known tokens from a word2vec or GloVe text file.

    Format: one ``token v1 v2 ... vD`` per line, UTF-8, separated by spaces; an optional
    word2vec header line ``count D`` is skipped. Only tokens in ``token_to_index`` are kept.

    Args:
        path: the vectors file.
        token_to_index: token -> embedding row.
        dim: expected D (the embedding size); ``None`` takes the file's.

    Returns:
        ``{row: (D,) float32 tensor}`` for the tokens found.

    Raises:
        ValueError: missing or empty file, or a line (named by file and line number) whose
            vector has the wrong size or a non-number, or (for a kept token) NaN or infinity,
            or that is not UTF-8.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"vectors: expected a word2vec/GloVe text file, got {str(p)!r} "
                         "(no such file)")
    found: dict[int, Tensor] = {}
    file_dim = dim
    any_line = False
    # Lone surrogates mark bytes that are not UTF-8, reported with their line; newline=None
    # splits lines at \n, \r\n and a lone \r alike, so line numbers are the real ones.
    with open(p, encoding="utf-8", errors="surrogateescape", newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if not line.strip():
                continue
            bad = _BAD_BYTE.search(line)
            if bad:
                raise ValueError(f"vectors: expected UTF-8 text, got the invalid byte "
                                 f"0x{ord(bad.group()) - 0xDC00:02x} in {p}:{lineno}")
            if lineno == 1 and len(parts) == 2 and all(x.isdigit() for x in parts):
                header_dim = int(parts[1])
                if dim is not None and header_dim != dim:
                    raise ValueError(f"vectors: expected dimension {dim} (embed_dim), got "
                                     f"{header_dim} in {p}:1 (header)")
                file_dim = header_dim
                continue
            any_line = True
            token, values = parts[0], parts[1:]
            if file_dim is None:
                file_dim = len(values)
            if len(values) != file_dim:
                raise ValueError(f"vectors: expected {file_dim} numbers after the token, got "
                                 f"{len(values)} in {p}:{lineno}")
            row = token_to_index.get(token)
            if row is None:
                continue
            try:
                vector = torch.tensor([float(x) for x in values], dtype=torch.float32)  # (D,)
            except ValueError:
                raise ValueError(f"vectors: expected numbers after the token, got "
                                 f"{' '.join(values[:3])!r}... in {p}:{lineno}") from None
            if not bool(torch.isfinite(vector).all()):  # a NaN row would make the model NaN
                bad = values[int((~torch.isfinite(vector)).nonzero()[0])]
                raise ValueError(f"vectors: expected finite numbers after the token, got {bad!r} "
                                 f"for {token!r} in {p}:{lineno}")
            found[row] = vector
    if not any_line:
        raise ValueError(f"vectors: expected at least one vector, got an empty file {str(p)!r}")
    return found
