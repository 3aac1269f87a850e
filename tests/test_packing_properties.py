"""Hypothesis properties of packrnn.packing: round trips, unsorted batches, zero lengths, total_length."""

import torch
import torch.nn.utils.rnn as R
from hypothesis import given, settings
from hypothesis import strategies as st

from packrnn import packing as P

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def batches(draw, min_length=0):
    """A list of sequences ``(L_b, *)`` with random lengths (zero allowed), dtype and trailing shape."""
    lengths = draw(st.lists(st.integers(min_length, 6), min_size=1, max_size=6))
    trailing = draw(st.sampled_from([(), (2,), (2, 3)]))
    dtype = draw(st.sampled_from([torch.float64, torch.int64, torch.bool]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for n in lengths:
        x = torch.randn((n,) + trailing, generator=gen, dtype=torch.float64)
        seqs.append(x > 0 if dtype == torch.bool else (x * 10).to(dtype))
    return seqs


def lengths_of(seqs):
    return [s.shape[0] for s in seqs]


@SETTINGS
@given(seqs=batches(), batch_first=st.booleans(), enforce_sorted=st.sampled_from([None, False]))
def test_pad_pack_pad_round_trip(seqs, batch_first, enforce_sorted):
    padded = P.pad_sequence(seqs, batch_first=batch_first, padding_value=3)
    steps = padded.shape[1 if batch_first else 0]
    packed = P.pack_padded_sequence(padded, lengths_of(seqs), batch_first, enforce_sorted)
    back, lengths = P.pad_packed_sequence(packed, batch_first, padding_value=3, total_length=steps)
    torch.testing.assert_close(back, padded, rtol=0, atol=0)
    assert lengths.tolist() == lengths_of(seqs)
    assert lengths.dtype == torch.int64 and lengths.device.type == "cpu"


@SETTINGS
@given(seqs=batches(), enforce_sorted=st.sampled_from([None, False]))
def test_pack_unpack_round_trip(seqs, enforce_sorted):
    packed = P.pack_sequence(seqs, enforce_sorted=enforce_sorted)
    out = P.unpack_sequence(packed)
    assert len(out) == len(seqs)
    for a, b in zip(out, seqs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@SETTINGS
@given(seqs=batches(), batch_first=st.booleans(), side=st.sampled_from(["right", "left"]))
def test_pad_unpad_round_trip(seqs, batch_first, side):
    padded = P.pad_sequence(seqs, batch_first=batch_first, padding_side=side)
    if side == "right":
        out = P.unpad_sequence(padded, lengths_of(seqs), batch_first=batch_first)
        for a, b in zip(out, seqs, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:  # left padding is right padding with every sequence's time axis reversed
        flipped = P.pad_sequence([s.flip(0) for s in seqs], batch_first=batch_first)
        time_dim = 1 if batch_first else 0
        torch.testing.assert_close(padded.flip(time_dim), flipped, rtol=0, atol=0)


@SETTINGS
@given(seqs=batches(), extra=st.integers(0, 3))
def test_packed_structure_invariants(seqs, extra):
    lengths = lengths_of(seqs)
    packed = P.pack_sequence(seqs)
    bs = packed.batch_sizes
    assert int(bs.sum()) == sum(lengths) == packed.data.shape[0]
    assert bs.numel() == max(lengths)
    assert bool((bs[1:] <= bs[:-1]).all()) and bool((bs >= 1).all())
    assert P.packed_batch_size(packed) == len(seqs)
    assert P.packed_lengths(packed).tolist() == lengths
    if 0 in lengths:  # NOTE [zero-length sequences]: batch size stays recoverable
        assert packed.sorted_indices is not None and packed.sorted_indices.numel() == len(seqs)
    # extra padding steps (holding garbage) change nothing
    padded = P.pad_sequence(seqs, padding_value=1)
    garbage = torch.ones((extra,) + padded.shape[1:], dtype=padded.dtype)
    longer = torch.cat([padded, garbage], 0)
    again = P.pack_padded_sequence(longer, lengths)
    for a, b in zip(again, packed):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@SETTINGS
@given(seqs=batches(min_length=1), batch_first=st.booleans(), enforce_sorted=st.booleans(), extra=st.integers(0, 3))
def test_matches_torch_on_nonzero_lengths(seqs, batch_first, enforce_sorted, extra):
    if enforce_sorted:
        seqs = sorted(seqs, key=len, reverse=True)
    ours = P.pack_sequence(seqs, enforce_sorted=enforce_sorted)
    theirs = R.pack_sequence(seqs, enforce_sorted=enforce_sorted)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    total = max(lengths_of(seqs)) + extra
    got = P.pad_packed_sequence(ours, batch_first, padding_value=-2, total_length=total)
    want = R.pad_packed_sequence(theirs, batch_first, padding_value=-2, total_length=total)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@SETTINGS
@given(seqs=batches(), perm_seed=st.integers(0, 2**16), extra=st.integers(0, 3))
def test_permuting_the_batch_permutes_the_output(seqs, perm_seed, extra):
    perm = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(perm_seed))
    total = max(lengths_of(seqs)) + extra
    base, base_lengths = P.pad_packed_sequence(P.pack_sequence(seqs), total_length=total, padding_value=5)
    moved, moved_lengths = P.pad_packed_sequence(
        P.pack_sequence([seqs[i] for i in perm.tolist()]), total_length=total, padding_value=5
    )
    torch.testing.assert_close(moved, base[:, perm], rtol=0, atol=0)
    torch.testing.assert_close(moved_lengths, base_lengths[perm], rtol=0, atol=0)
    # total_length only appends padding
    if extra:
        assert bool((base[total - extra :] == torch.tensor(5).to(base.dtype)).all())


@SETTINGS
@given(seqs=batches())
def test_zero_gradient_at_padding(seqs):
    lengths = lengths_of(seqs)
    padded = P.pad_sequence([s.double() for s in seqs]).requires_grad_(True)  # (T, B, *)
    packed = P.pack_padded_sequence(padded, lengths)
    (packed.data.sum() * 2).backward()
    mask = torch.arange(padded.shape[0]).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)  # (T, B)
    mask = mask.view(mask.shape + (1,) * (padded.dim() - 2)).expand_as(padded)  # (T, B, *)
    grad = padded.grad
    assert bool((grad[~mask] == 0).all()) and bool((grad[mask] == 2).all())
