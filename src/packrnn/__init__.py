"""packrnn: recurrent networks over variable-length sequences that compute only the real steps.

The public API is re-exported here; see README.md for a tour.
"""

from .packing import (
    PackedSequence,
    as_lengths,
    batch_sizes_from_lengths,
    check_packed_sequence,
    invert_permutation,
    lengths_from_batch_sizes,
    pack_padded_sequence,
    pack_sequence,
    packed_batch_size,
    packed_lengths,
    packing_order,
    pad_packed_sequence,
    pad_sequence,
    sort_lengths,
    unpack_sequence,
    unpad_sequence,
)

from . import functional
from .errors import InputError, InputTypeError
from .backend import backend_info, backend_name
from .rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .convert import from_torch, to_torch

from .ops import last_step, lengths_to_mask, max_pool, mean_pool, reverse_sequences

# the classifier and its training config (train/evaluate/predict live in packrnn.train)
from .models import ModelConfig, SequenceClassifier
from .train import TrainConfig

# ONNX export with real lengths (needs the onnx package: packrnn[onnx])
from .onnx_export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # packing
    "PackedSequence",
    "pad_sequence",
    "pack_padded_sequence",
    "pad_packed_sequence",
    "pack_sequence",
    "unpack_sequence",
    "unpad_sequence",
    "as_lengths",
    "sort_lengths",
    "packing_order",
    "batch_sizes_from_lengths",
    "lengths_from_batch_sizes",
    "invert_permutation",
    "check_packed_sequence",
    "packed_batch_size",
    "packed_lengths",
    # layers
    "RNN",
    "LSTM",
    "GRU",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "functional",
    # the same layers as torch.nn's classes and back (for torch-only tools: quantize_dynamic)
    "to_torch",
    "from_torch",
    # errors that are both packrnn's documented class and what torch raises for the same input
    "InputError",
    "InputTypeError",
    # which recurrence backend runs (PACKRNN_BACKEND = auto | native | python)
    "backend_name",
    "backend_info",
    # packed-aware ops
    "lengths_to_mask",
    "mean_pool",
    "max_pool",
    "last_step",
    "reverse_sequences",
    # text classification
    "ModelConfig",
    "SequenceClassifier",
    "TrainConfig",
    # ONNX
    "export_onnx",
]
