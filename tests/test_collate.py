"""Collate functions against torch's padding/packing (and packrnn's for zero-length items)."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import rnn as torch_rnn

import packrnn
from packrnn.data import Batch, Collate, collate_packed, collate_padded


def items_from(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, 50, (n,), generator=g), i % 3) for i, n in enumerate(lengths)]


@given(st.lists(st.integers(1, 12), min_size=1, max_size=10), st.booleans(), st.integers(0, 9))
@settings(max_examples=80, deadline=None)
def test_padded_matches_torch(lengths, batch_first, padding_value):
    items = items_from(lengths)
    batch = collate_padded(items, padding_value=padding_value, batch_first=batch_first)
    expected = torch_rnn.pad_sequence([x for x, _ in items], batch_first=batch_first, padding_value=padding_value)
    assert torch.equal(batch.inputs, expected)
    assert batch.lengths.dtype == torch.int64 and batch.lengths.tolist() == lengths
    assert batch.labels.tolist() == [y for _, y in items]


@given(st.lists(st.integers(1, 12), min_size=1, max_size=10))
@settings(max_examples=80, deadline=None)
def test_packed_matches_torch(lengths):
    items = items_from(lengths)
    batch = collate_packed(items)
    expected = torch_rnn.pack_sequence([x for x, _ in items], enforce_sorted=False)
    assert isinstance(batch.inputs, packrnn.PackedSequence)
    assert torch.equal(batch.inputs.data, expected.data)
    assert torch.equal(batch.inputs.batch_sizes, expected.batch_sizes)
    if batch.inputs.sorted_indices is not None:
        assert torch.equal(batch.inputs.sorted_indices, expected.sorted_indices)
    else:  # already sorted: packrnn leaves indices out, as torch's enforce_sorted=True
        assert expected.sorted_indices.tolist() == list(range(len(lengths)))
    assert batch.lengths.tolist() == lengths
    assert batch.labels.tolist() == [y for _, y in items]
    # results come back in item order
    unpacked = packrnn.unpack_sequence(batch.inputs)
    assert all(torch.equal(u, x) for u, (x, _) in zip(unpacked, items))


@given(st.lists(st.integers(0, 6), min_size=1, max_size=8))
@settings(max_examples=80, deadline=None)
def test_zero_length_items(lengths):
    items = items_from(lengths)
    padded = collate_padded(items, batch_first=True)
    assert padded.inputs.shape == (len(lengths), max(lengths))
    assert torch.equal(padded.inputs, packrnn.pad_sequence([x for x, _ in items], batch_first=True))
    packed = collate_packed(items)
    assert torch.equal(packrnn.packed_lengths(packed.inputs), torch.tensor(lengths))
    assert all(torch.equal(u, x) for u, (x, _) in zip(packrnn.unpack_sequence(packed.inputs), items))


def test_unlabeled_items_and_lists():
    batch = collate_padded([[4, 5], [6]], batch_first=True)
    assert batch.labels is None
    assert batch.inputs.tolist() == [[4, 5], [6, 0]]
    assert collate_packed([[4, 5], [6]]).labels is None


def test_collate_object_is_picklable_and_configurable():
    items = items_from([3, 1, 2])
    c = pickle.loads(pickle.dumps(Collate(padding_value=7, batch_first=True)))
    out = c(items)
    assert isinstance(out, Batch) and out.inputs.shape == (3, 3) and out.inputs[1, 1] == 7
    assert isinstance(Collate(packed=True)(items).inputs, packrnn.PackedSequence)
    assert "packed=True" in repr(Collate(packed=True))


def test_packed_batch_feeds_torch_lstm():
    items = items_from([5, 2, 4])
    batch = collate_packed(items)
    emb = torch.nn.Embedding(50, 3)
    lstm = torch.nn.LSTM(3, 4)
    packed = packrnn.PackedSequence(emb(batch.inputs.data), *batch.inputs[1:])
    _, (h, _) = lstm(packed)
    padded = collate_padded(items)
    ref = torch_rnn.pack_padded_sequence(emb(padded.inputs), padded.lengths, enforce_sorted=False)
    _, (h_ref, _) = lstm(ref)
    torch.testing.assert_close(h, h_ref)


def test_errors():
    with pytest.raises(ValueError, match="batch: expected a non-empty list of .* got an empty list"):
        collate_padded([])
    with pytest.raises(ValueError, match=r"batch\[1\]: expected an \(ids, label\) pair like batch\[0\], got list"):
        collate_padded([([1], 0), [2]])
    with pytest.raises(ValueError, match=r"batch\[0\]: expected 1-D token ids \(L,\), got shape \(2, 2\)"):
        collate_padded([(torch.ones(2, 2, dtype=torch.long), 0)])
    with pytest.raises(TypeError, match=r"batch\[0\]: expected an int label, got 'a'"):
        collate_padded([([1], "a")])
    with pytest.raises(TypeError, match="packed: expected a bool, got 1"):
        Collate(packed=1)
    with pytest.raises(TypeError, match="padding_value: expected an int token id, got 0.5"):
        Collate(padding_value=0.5)
