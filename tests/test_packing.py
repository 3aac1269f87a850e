"""packrnn.packing against torch.nn.utils.rnn (the oracle), worked examples, extras, errors."""

import numpy as np
import pytest
import torch
import torch.nn.utils.rnn as R

import packrnn
from packrnn import packing as P


def assert_packed_equal(ours, theirs):
    """Field-by-field identity of two PackedSequences (None must match None)."""
    assert isinstance(ours, R.PackedSequence)
    for name, a, b in zip(ours._fields, ours, theirs):
        assert (a is None) == (b is None), f"{name}: {a} vs {b}"
        if a is not None:
            assert a.dtype == b.dtype, name
            assert a.device == b.device, name
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def random_batch(gen, dtype, trailing, batch_first, sort, max_b=6, max_t=7):
    """A random padded batch (lengths >= 1, as torch needs) and its lengths."""
    batch = int(torch.randint(1, max_b + 1, (), generator=gen))
    steps = int(torch.randint(1, max_t + 1, (), generator=gen))
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)
    if sort:
        lengths = lengths.sort(descending=True).values
    shape = (batch, steps) if batch_first else (steps, batch)
    x = torch.randn(shape + trailing, generator=gen, dtype=torch.float64)
    if dtype == torch.bool:
        x = x > 0
    else:
        x = (x * 10).to(dtype)
    return x, lengths


DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool]
TRAILING = [(), (3,), (2, 3)]


# --------------------------------------------------------------------------------------------
# oracle: identical results to torch.nn.utils.rnn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_pack_pad_match_torch(dtype, trailing, batch_first, enforce_sorted):
    gen = torch.Generator().manual_seed(hash((str(dtype), trailing, batch_first, enforce_sorted)) % 2**31)
    for _ in range(8):
        x, lengths = random_batch(gen, dtype, trailing, batch_first, sort=enforce_sorted)
        ours = P.pack_padded_sequence(x, lengths, batch_first, enforce_sorted)
        theirs = R.pack_padded_sequence(x, lengths, batch_first, enforce_sorted)
        assert_packed_equal(ours, theirs)
        for total_length in (None, int(lengths.max()) + 2):
            for padding_value in (0.0, -1.0):
                got = P.pad_packed_sequence(ours, batch_first, padding_value, total_length)
                want = R.pad_packed_sequence(theirs, batch_first, padding_value, total_length)
                torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
                torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        for a, b in zip(P.unpack_sequence(ours), R.unpack_sequence(theirs), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_default_enforce_sorted_matches_torch_default_on_sorted_input():
    """NOTE [enforce_sorted default]: sorted input + default == torch's default (indices None)."""
    gen = torch.Generator().manual_seed(1)
    for batch_first in (False, True):
        for _ in range(10):
            x, lengths = random_batch(gen, torch.float32, (3,), batch_first, sort=True)
            ours = P.pack_padded_sequence(x, lengths, batch_first=batch_first)
            assert ours.sorted_indices is None
            assert_packed_equal(ours, R.pack_padded_sequence(x, lengths, batch_first=batch_first))


def test_default_enforce_sorted_matches_torch_false_on_unsorted_input():
    x = torch.arange(12.0).view(4, 3)
    lengths = [1, 4, 2]
    assert_packed_equal(
        P.pack_padded_sequence(x, lengths), R.pack_padded_sequence(x, lengths, enforce_sorted=False)
    )
    seqs = [torch.ones(1), torch.ones(3), torch.ones(2)]
    assert_packed_equal(P.pack_sequence(seqs), R.pack_sequence(seqs, enforce_sorted=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("batch_first", [False, True])
def test_pad_sequence_pack_sequence_unpad_match_torch(dtype, trailing, batch_first):
    gen = torch.Generator().manual_seed(hash((str(dtype), trailing, batch_first)) % 2**31)
    for _ in range(6):
        x, lengths = random_batch(gen, dtype, trailing, True, sort=False)
        seqs = [x[b, : int(n)] for b, n in enumerate(lengths)]
        for side in ("right", "left"):
            got = P.pad_sequence(seqs, batch_first, 7.0, side)
            want = R.pad_sequence(seqs, batch_first, 7.0, side)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for enforce_sorted in (False,):
            assert_packed_equal(P.pack_sequence(seqs, enforce_sorted), R.pack_sequence(seqs, enforce_sorted))
        padded = R.pad_sequence(seqs, batch_first)
        before = padded.clone()
        got = P.unpad_sequence(padded, lengths, batch_first)
        torch.testing.assert_close(padded, before, rtol=0, atol=0)  # never modified
        want = R.unpad_sequence(padded.clone(), lengths, batch_first)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pad_sequence_accepts_tensor_and_generator():
    x = torch.randn(3, 4, 2)
    torch.testing.assert_close(P.pad_sequence(x), R.pad_sequence(x), rtol=0, atol=0)
    torch.testing.assert_close(P.pad_sequence(s for s in x), R.pad_sequence(list(x)), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# worked examples from the reference material
# --------------------------------------------------------------------------------------------


def test_example_pad_then_pack():
    padded = P.pad_sequence([torch.tensor([1, 2, 3]), torch.tensor([3, 4])], batch_first=True)
    assert padded.tolist() == [[1, 2, 3], [3, 4, 0]]
    packed = P.pack_padded_sequence(padded, [3, 2], batch_first=True)
    assert packed.data.tolist() == [1, 3, 2, 4, 3]
    assert packed.batch_sizes.tolist() == [2, 2, 1]


def test_example_three_sequences():
    x = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0], [9, 0, 0, 0, 0]])
    packed = P.pack_padded_sequence(x, [5, 3, 1], batch_first=True)
    assert packed.data.tolist() == [1, 6, 9, 2, 7, 3, 8, 4, 5]
    assert packed.batch_sizes.tolist() == [3, 2, 2, 1, 1]


def test_example_six_sequences_batch_sizes():
    seqs = [torch.zeros(n) for n in [9, 8, 6, 4, 3, 2]]
    assert P.pack_sequence(seqs).batch_sizes.tolist() == [6, 6, 5, 4, 3, 3, 2, 2, 1]


def test_example_abc_x():
    seqs = [torch.tensor([ord(c) for c in "abc"]), torch.tensor([ord("x")])]
    packed = P.pack_sequence(seqs)
    assert "".join(chr(v) for v in packed.data.tolist()) == "axbc"
    assert packed.batch_sizes.tolist() == [2, 1, 1]


def test_example_2x5x2_round_trip():
    x = torch.randn(2, 5, 2)
    x[1, 2:] = 0
    packed = P.pack_padded_sequence(x, [5, 2], batch_first=True)
    assert packed.data.shape == (7, 2)
    assert packed.batch_sizes.tolist() == [2, 2, 1, 1, 1]
    padded, lengths = P.pad_packed_sequence(packed, batch_first=True, total_length=5)
    torch.testing.assert_close(padded, x, rtol=0, atol=0)
    assert lengths.tolist() == [5, 2]


# --------------------------------------------------------------------------------------------
# interop
# --------------------------------------------------------------------------------------------


def test_packed_sequence_is_torchs_subclass_and_works_with_torch_lstm():
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    lengths = [2, 5, 3]
    ours = P.pack_padded_sequence(x, lengths)
    assert isinstance(ours, packrnn.PackedSequence) and isinstance(ours, R.PackedSequence)
    lstm = torch.nn.LSTM(4, 6).double()
    out_ours, (h_ours, _) = lstm(ours)
    out_theirs, (h_theirs, _) = lstm(R.pack_padded_sequence(x, lengths, enforce_sorted=False))
    torch.testing.assert_close(out_ours.data, out_theirs.data)
    torch.testing.assert_close(h_ours, h_theirs)
    # torch's utilities accept ours, ours accept torch's (e.g. the LSTM output)
    torch.testing.assert_close(R.pad_packed_sequence(ours)[0], P.pad_packed_sequence(ours)[0])
    torch.testing.assert_close(P.pad_packed_sequence(out_theirs)[0], R.pad_packed_sequence(out_theirs)[0])
    assert isinstance(ours.to(torch.float32), packrnn.PackedSequence)


# --------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
def test_gradients_match_torch(batch_first):
    gen = torch.Generator().manual_seed(3)
    x, lengths = random_batch(gen, torch.float64, (3,), batch_first, sort=False)
    weight = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grads = []
    for lib in (P, R):
        leaf = x.clone().requires_grad_(True)
        packed = lib.pack_padded_sequence(leaf, lengths, batch_first, enforce_sorted=False)
        padded, _ = lib.pad_packed_sequence(packed, batch_first, total_length=x.shape[1 if batch_first else 0])
        (padded * weight).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_gradients_pad_sequence_and_pack_sequence_match_torch():
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randn(n, 2, generator=gen, dtype=torch.float64) for n in (3, 1, 4)]
    for fn in ("pad_sequence", "pack_sequence"):
        grads = []
        for lib in (P, R):
            leaves = [s.clone().requires_grad_(True) for s in seqs]
            out = getattr(lib, fn)(leaves) if fn == "pad_sequence" else getattr(lib, fn)(leaves, False).data
            (out * torch.arange(out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
            grads.append([leaf.grad for leaf in leaves])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradcheck_pack_pad():
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)

    def fn(inp):
        return P.pad_packed_sequence(P.pack_padded_sequence(inp, [2, 4, 1]), padding_value=0.5)[0]

    assert torch.autograd.gradcheck(fn, (x,))


# --------------------------------------------------------------------------------------------
# better than torch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lengths",
    [
        [3, 1, 2],
        (3, 1, 2),
        np.array([3, 1, 2], dtype=np.int32),
        np.array([3, 1, 2], dtype=np.uint8),
        torch.tensor([3, 1, 2], dtype=torch.int32),
        torch.tensor([3, 1, 2], dtype=torch.uint8),
        torch.tensor([3, 1, 2], dtype=torch.int16),
        [np.int64(3), torch.tensor(1), 2],
    ],
    ids=lambda v: type(v).__name__ + str(getattr(v, "dtype", "")),
)
def test_lengths_any_container(lengths):
    x = torch.randn(3, 3, 2)
    want = R.pack_padded_sequence(x, torch.tensor([3, 1, 2]), enforce_sorted=False)
    assert_packed_equal(P.pack_padded_sequence(x, lengths), want)
    got = P.unpad_sequence(x, lengths)
    assert [t.shape[0] for t in got] == [3, 1, 2]


def test_as_lengths_returns_cpu_int64():
    out = P.as_lengths(torch.tensor([2, 1], dtype=torch.int8), batch_size=2, max_length=2)
    assert out.dtype == torch.int64 and out.device.type == "cpu" and out.tolist() == [2, 1]


@pytest.mark.parametrize("batch_first", [False, True])
def test_zero_length_sequences(batch_first):
    x = torch.randn(3, 4, 2) if batch_first else torch.randn(4, 3, 2)
    lengths = [3, 0, 2]
    packed = P.pack_padded_sequence(x, lengths, batch_first=batch_first)
    assert packed.data.shape == (5, 2)
    assert packed.batch_sizes.tolist() == [2, 2, 1]
    assert packed.sorted_indices is not None and len(packed.sorted_indices) == 3
    assert P.packed_batch_size(packed) == 3
    assert P.packed_lengths(packed).tolist() == lengths
    padded, got_lengths = P.pad_packed_sequence(packed, batch_first=batch_first, padding_value=-9.0)
    assert got_lengths.tolist() == lengths
    zero = padded[1] if batch_first else padded[:, 1]
    assert bool((zero == -9.0).all())
    # the real sequences are exactly torch's on the non-empty sub-batch
    keep = torch.tensor([0, 2])
    sub = x.index_select(0 if batch_first else 1, keep)
    want, _ = R.pad_packed_sequence(
        R.pack_padded_sequence(sub, [3, 2], batch_first=batch_first), batch_first, -9.0
    )
    torch.testing.assert_close(padded.index_select(0 if batch_first else 1, keep), want, rtol=0, atol=0)
    unpacked = P.unpack_sequence(packed)
    assert [t.shape for t in unpacked] == [(3, 2), (0, 2), (2, 2)]


def test_zero_length_sorted_batch_still_carries_indices():
    packed = P.pack_padded_sequence(torch.randn(3, 3), [3, 1, 0], enforce_sorted=True)
    assert packed.sorted_indices.tolist() == [0, 1, 2]
    assert packed.unsorted_indices.tolist() == [0, 1, 2]
    packed = P.pack_sequence([torch.ones(2), torch.ones(0)])
    assert packed.sorted_indices.tolist() == [0, 1]


def test_all_zero_lengths():
    packed = P.pack_padded_sequence(torch.randn(2, 3, 4), [0, 0, 0])
    assert packed.data.shape == (0, 4) and packed.batch_sizes.numel() == 0
    padded, lengths = P.pad_packed_sequence(packed, total_length=2)
    assert padded.shape == (2, 3, 4) and bool((padded == 0).all()) and lengths.tolist() == [0, 0, 0]
    assert [t.shape for t in P.unpack_sequence(packed)] == [(0, 4)] * 3
    assert P.pad_sequence([torch.ones(0, 4), torch.ones(0, 4)]).shape == (0, 2, 4)


# --------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------


def test_error_negative_length():
    with pytest.raises(ValueError, match=r"lengths: expected non-negative lengths, got -1 at index 1"):
        P.pack_padded_sequence(torch.randn(3, 2), [2, -1])


def test_error_length_longer_than_time():
    with pytest.raises(ValueError, match=r"lengths: expected every length <= 3 \(the padded time dimension\), got 4"):
        P.pack_padded_sequence(torch.randn(3, 2), [4, 1])
    with pytest.raises(ValueError, match=r"lengths: expected every length <= 2"):
        P.unpad_sequence(torch.randn(2, 2), [3, 1])


def test_error_wrong_number_of_lengths():
    with pytest.raises(ValueError, match=r"lengths: expected 2 lengths \(one per sequence in the batch\), got 3"):
        P.pack_padded_sequence(torch.randn(3, 2), [1, 1, 1])
    with pytest.raises(ValueError, match=r"lengths: expected 3 lengths"):
        P.pack_padded_sequence(torch.randn(3, 2, 1), [1, 1], batch_first=True)


@pytest.mark.parametrize(
    "lengths,match",
    [
        ([2.0, 1.0], r"lengths: expected integer lengths, got 2\.0 \(float\) at index 0"),
        ([True, 1], r"lengths: expected integer lengths, got True \(bool\)"),
        (torch.tensor([2.0, 1.0]), r"lengths: expected integer lengths, got a tensor of dtype torch.float32"),
        (np.array([2.0, 1.0]), r"lengths: expected integer lengths, got a numpy array of dtype float64"),
        ("21", r"lengths: expected a list, tuple, numpy array or tensor of integers, got str"),
    ],
)
def test_error_non_integer_lengths(lengths, match):
    with pytest.raises(TypeError, match=match):
        P.pack_padded_sequence(torch.randn(3, 2), lengths)


@pytest.mark.parametrize(
    "lengths,match",
    [
        (torch.tensor([[2, 1]]), r"lengths: expected a 1-D sequence of lengths, got a tensor of shape \(1, 2\)"),
        (np.array([[2, 1]]), r"lengths: expected a 1-D sequence of lengths, got a numpy array of shape \(1, 2\)"),
        ([[2, 1]], r"lengths: expected a 1-D sequence of lengths, got a nested list at index 0"),
        (torch.tensor(2), r"lengths: expected a 1-D sequence of lengths, got a tensor of shape \(\)"),
    ],
)
def test_error_non_1d_lengths(lengths, match):
    with pytest.raises(ValueError, match=match):
        P.pack_padded_sequence(torch.randn(3, 2), lengths)


def test_error_enforce_sorted_with_unsorted_lengths():
    with pytest.raises(ValueError, match=r"lengths: expected lengths sorted in decreasing order since enforce_sorted=True, got lengths \[1, 2\]"):
        P.pack_padded_sequence(torch.randn(3, 2), [1, 2], enforce_sorted=True)
    with pytest.raises(ValueError, match=r"sequences: expected sequences by length sorted in decreasing order since enforce_sorted=True, got lengths \[1, 2\]"):
        P.pack_sequence([torch.ones(1), torch.ones(2)], enforce_sorted=True)


def test_error_pad_sequence_empty():
    with pytest.raises(ValueError, match=r"sequences: expected at least one sequence, got an empty list"):
        P.pad_sequence([])
    with pytest.raises(ValueError, match=r"sequences: expected at least one sequence"):
        P.pack_sequence([])


def test_error_pad_sequence_mismatched_trailing_shape():
    with pytest.raises(ValueError, match=r"sequences\[1\]: expected trailing shape \(3,\) \(as sequences\[0\]\), got \(4,\)"):
        P.pad_sequence([torch.ones(2, 3), torch.ones(2, 4)])


def test_error_pad_sequence_mismatched_dtype():
    with pytest.raises(TypeError, match=r"sequences\[1\]: expected dtype torch.float32 \(as sequences\[0\]\), got torch.int64"):
        P.pad_sequence([torch.ones(2), torch.ones(2, dtype=torch.int64)])


def test_error_pad_sequence_mismatched_device():
    meta = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match=r"sequences\[1\]: expected device cpu \(as sequences\[0\]\), got meta"):
        P.pad_sequence([torch.ones(2), meta])


def test_error_pad_sequence_non_tensors():
    with pytest.raises(TypeError, match=r"sequences\[1\]: expected a Tensor, got list"):
        P.pad_sequence([torch.ones(2), [1, 2]])
    with pytest.raises(TypeError, match=r"sequences: expected a list of tensors, got int"):
        P.pad_sequence(3)
    with pytest.raises(ValueError, match=r"sequences\[0\]: expected a tensor of shape \(L, \*\), got a 0-d tensor"):
        P.pad_sequence([torch.tensor(1.0)])


def test_error_padding_side():
    with pytest.raises(ValueError, match=r"padding_side: expected 'right' or 'left', got 'top'"):
        P.pad_sequence([torch.ones(2)], padding_side="top")


def test_error_total_length_too_short():
    packed = P.pack_sequence([torch.ones(3), torch.ones(1)])
    with pytest.raises(ValueError, match=r"total_length: expected at least the longest sequence length 3, got 2"):
        P.pad_packed_sequence(packed, total_length=2)
    with pytest.raises(TypeError, match=r"total_length: expected an int or None, got 2\.5"):
        P.pad_packed_sequence(packed, total_length=2.5)


def test_error_input_not_tensor_or_too_small():
    with pytest.raises(TypeError, match=r"input: expected a Tensor, got list"):
        P.pack_padded_sequence([[1, 2]], [1])
    with pytest.raises(ValueError, match=r"input: expected a tensor with at least 2 dimensions, got shape \(3,\)"):
        P.pack_padded_sequence(torch.ones(3), [1])


@pytest.mark.parametrize(
    "fields,match",
    [
        ((torch.ones(4), torch.tensor([2, 1])), r"sequence: expected data.size\(0\) == sum\(batch_sizes\) = 3, got data.size\(0\) = 4"),
        ((torch.ones(3), torch.tensor([1, 2])), r"sequence.batch_sizes: expected non-increasing entries, got \[1, 2\]"),
        ((torch.ones(3), torch.tensor([3, 0])), r"sequence.batch_sizes: expected every entry >= 1, got \[3, 0\]"),
        ((torch.ones(3), torch.tensor([2.0, 1.0])), r"sequence.batch_sizes: expected a 1-D int64 tensor, got shape \(2,\) dtype torch.float32"),
        (
            (torch.ones(3), torch.tensor([2, 1]), torch.tensor([1, 0]), torch.tensor([0, 1])),
            r"sequence.unsorted_indices: expected the inverse permutation of sorted_indices, got sorted_indices=\[1, 0\], unsorted_indices=\[0, 1\]",
        ),
        (
            (torch.ones(3), torch.tensor([2, 1]), torch.tensor([0]), torch.tensor([0])),
            r"sequence.sorted_indices: expected at least batch_sizes\[0\] = 2 entries, got 1",
        ),
        (
            (torch.ones(3), torch.tensor([2, 1]), torch.tensor([0, 1]), torch.tensor([0, 1, 2])),
            r"sequence.unsorted_indices: expected 2 entries \(as sorted_indices\), got 3",
        ),
    ],
)
def test_error_inconsistent_packed_sequence(fields, match):
    data, batch_sizes, *idx = fields
    sorted_indices, unsorted_indices = idx if idx else (None, None)
    bad = R.PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)
    with pytest.raises(ValueError, match=match):
        P.pad_packed_sequence(bad)
    with pytest.raises(ValueError, match=match.replace("sequence", "packed_sequences", 1)):
        P.unpack_sequence(bad)


def test_error_not_a_packed_sequence():
    with pytest.raises(TypeError, match=r"sequence: expected a PackedSequence, got Tensor"):
        P.pad_packed_sequence(torch.ones(3))


def test_error_bool_flags():
    with pytest.raises(TypeError, match=r"batch_first: expected a bool, got 'yes'"):
        P.pack_padded_sequence(torch.ones(2, 2), [2, 2], batch_first="yes")
    with pytest.raises(TypeError, match=r"enforce_sorted: expected a bool, got 1"):
        P.pack_padded_sequence(torch.ones(2, 2), [2, 2], enforce_sorted=1)


# --------------------------------------------------------------------------------------------
# more coverage: large batches with ties, unsorted zeros, unpack/unpad gradients, devices, docs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
def test_large_batch_with_many_ties_matches_torch(batch_first):
    gen = torch.Generator().manual_seed(5)
    batch, steps = 300, 9
    lengths = torch.randint(1, steps + 1, (batch,), generator=gen)  # ~33 ties per length
    x = torch.randn((batch, steps, 2) if batch_first else (steps, batch, 2), generator=gen)
    ours = P.pack_padded_sequence(x, lengths, batch_first, enforce_sorted=False)
    theirs = R.pack_padded_sequence(x, lengths, batch_first, enforce_sorted=False)
    assert_packed_equal(ours, theirs)
    for a, b in zip(P.pad_packed_sequence(ours, batch_first), R.pad_packed_sequence(theirs, batch_first)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unsorted_zero_lengths_with_explicit_enforce_sorted_false():
    seqs = [torch.arange(2.0), torch.zeros(0), torch.arange(3.0), torch.zeros(0)]
    packed = P.pack_sequence(seqs, enforce_sorted=False)
    assert packed.batch_sizes.tolist() == [2, 2, 1]
    assert packed.sorted_indices.tolist()[:2] == [2, 0]
    assert sorted(packed.sorted_indices.tolist()[2:]) == [1, 3]
    out = P.unpack_sequence(packed)
    for a, b in zip(out, seqs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    padded, lengths = P.pad_packed_sequence(packed, batch_first=True, padding_value=-1)
    assert lengths.tolist() == [2, 0, 3, 0]
    assert padded.tolist() == [[0, 1, -1], [-1, -1, -1], [0, 1, 2], [-1, -1, -1]]


def test_gradients_unpack_and_unpad_match_torch():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64)
    lengths = [2, 4, 1]
    grads = []
    for lib in (P, R):
        leaf = x.clone().requires_grad_(True)
        packed = lib.pack_padded_sequence(leaf * 1.0, lengths, enforce_sorted=False)
        total = sum((i + 1) * s.sum() for i, s in enumerate(lib.unpack_sequence(packed)))
        total = total + sum((i + 3) * s.sum() for i, s in enumerate(lib.unpad_sequence(leaf * 1.0, torch.tensor(lengths))))
        total.backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_data_and_cuda_lengths():
    x = torch.randn(5, 3, 2, device="cuda")
    lengths = torch.tensor([2, 5, 3], device="cuda", dtype=torch.int32)
    ours = P.pack_padded_sequence(x, lengths)
    theirs = R.pack_padded_sequence(x, lengths.cpu().long(), enforce_sorted=False)
    assert_packed_equal(ours, theirs)
    padded, got_lengths = P.pad_packed_sequence(ours)
    torch.testing.assert_close(padded, R.pad_packed_sequence(theirs)[0], rtol=0, atol=0)
    assert got_lengths.device.type == "cpu"
    seqs = [x[:2, 0], x[:, 1]]
    torch.testing.assert_close(P.pad_sequence(seqs), R.pad_sequence(seqs), rtol=0, atol=0)
    assert_packed_equal(P.pack_sequence(seqs), R.pack_sequence(seqs))


def test_helpers():
    assert P.batch_sizes_from_lengths(torch.tensor([3, 0, 2, 2])).tolist() == [3, 3, 1]
    assert P.batch_sizes_from_lengths(torch.tensor([0, 0])).tolist() == []
    assert P.lengths_from_batch_sizes(torch.tensor([3, 3, 1]), batch_size=4).tolist() == [3, 2, 2, 0]
    sorted_lengths, sorted_indices, unsorted_indices = P.sort_lengths(torch.tensor([1, 3, 2]))
    assert sorted_lengths.tolist() == [3, 2, 1] and sorted_indices.tolist() == [1, 2, 0]
    assert unsorted_indices.tolist() == [2, 0, 1]
    assert P.invert_permutation(None) is None


def test_docstring_examples():
    import doctest

    results = doctest.testmod(P, extraglobs={"torch": torch, "packrnn": packrnn}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 10 and results.failed == 0


def test_error_pad_sequence_tensor_with_too_few_dims():
    with pytest.raises(ValueError, match=r"sequences: expected a list of tensors or a tensor with at least 2 dimensions, got a tensor of shape \(3,\)"):
        P.pad_sequence(torch.ones(3))


def test_error_empty_batch():
    with pytest.raises(ValueError, match=r"input: expected at least one sequence, got batch size 0"):
        P.pack_padded_sequence(torch.ones(3, 0), [])


@pytest.mark.parametrize("batch_first", [False, True])
def test_strided_input_matches_torch(batch_first):
    base = torch.randn(3, 4, 5, dtype=torch.float64)  # a transposed view is non-contiguous
    x = base.transpose(0, 1)
    assert not x.is_contiguous()
    batch = x.shape[0 if batch_first else 1]
    lengths = torch.randint(1, x.shape[1 if batch_first else 0] + 1, (batch,), generator=torch.Generator().manual_seed(7))
    assert_packed_equal(
        P.pack_padded_sequence(x, lengths, batch_first, False), R.pack_padded_sequence(x, lengths, batch_first, False)
    )
    for a, b in zip(P.unpad_sequence(x, lengths, batch_first), R.unpad_sequence(x.clone(), lengths, batch_first)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lengths_as_range():
    assert P.as_lengths(range(3, 0, -1)).tolist() == [3, 2, 1]


def test_validation_cache_does_not_survive_replace():
    """NOTE [validated PackedSequence]: a derived instance is checked again."""
    packed = P.pack_sequence([torch.ones(3), torch.ones(1)])
    assert P.packed_batch_size(packed) == 2
    bad = packed._replace(batch_sizes=torch.tensor([1, 2, 1]))
    with pytest.raises(ValueError, match=r"sequence.batch_sizes: expected non-increasing entries, got \[1, 2, 1\]"):
        P.pad_packed_sequence(bad)
    assert P.packed_batch_size(packed.to(torch.float64)) == 2


def test_error_lengths_on_a_device_without_data():
    # a meta tensor has a shape but no values: say so instead of "Cannot copy out of meta tensor"
    meta = torch.tensor([3, 2], device="meta")
    with pytest.raises(ValueError, match=r"lengths: expected lengths with values \(a list or a "
                                         r"CPU/GPU tensor\), got a tensor on the meta device"):
        packrnn.as_lengths(meta)
    with pytest.raises(ValueError, match=r"lengths: expected lengths with values"):
        packrnn.pack_padded_sequence(torch.zeros(3, 2, 4), meta)
    with pytest.raises(ValueError, match=r"lengths: expected lengths with values"):
        packrnn.lengths_to_mask(meta)
