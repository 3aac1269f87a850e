"""packrnn.ops against naive per-sequence loops (values and gradients) and torch's LSTM."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packrnn
from packrnn import ops

OPS = ["mean", "max", "last", "last_bi", "reverse"]


def naive(op, x, lengths):
    """Reference: a Python loop over sequences of a time-major (T, B, *) tensor."""
    outs = []
    for b, n in enumerate(lengths):
        seq = x[:n, b]  # (L, *)
        if op == "reverse":
            outs.append(torch.cat([seq.flip(0), x[n:, b]], 0))
        elif n == 0:
            outs.append(torch.zeros_like(x[0, b]))
        elif op == "mean":
            outs.append(seq.mean(0))
        elif op == "max":
            outs.append(seq.max(0).values)
        elif op == "last":
            outs.append(seq[-1])
        else:  # last_bi: forward half at L-1, backward half at 0
            half = x.shape[-1] // 2
            outs.append(torch.cat([seq[-1, ..., :half], seq[0, ..., half:]], -1))
    return torch.stack(outs, 1 if op == "reverse" else 0)


def run(op, input, lengths=None, batch_first=False):
    if op == "mean":
        return ops.mean_pool(input, lengths, batch_first)
    if op == "max":
        return ops.max_pool(input, lengths, batch_first)
    if op == "last":
        return ops.last_step(input, lengths, batch_first)
    if op == "last_bi":
        return ops.last_step(input, lengths, batch_first, bidirectional=True)
    return ops.reverse_sequences(input, lengths, batch_first)


def make_input(lengths, trailing, extra_steps=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = max(lengths) + extra_steps
    x = torch.randn((steps, len(lengths)) + trailing, generator=g, dtype=torch.float64)
    mask = ops.lengths_to_mask(lengths, steps).view((steps, len(lengths)) + (1,) * len(trailing))
    return x.masked_fill(~mask, float("nan"))  # padding must never leak into a result


lengths_st = st.lists(st.integers(0, 7), min_size=1, max_size=6)
trailing_st = st.sampled_from([(), (4,), (2, 4)])


@given(st.sampled_from(OPS), lengths_st, trailing_st, st.booleans(), st.booleans())
@settings(max_examples=250, deadline=None)
def test_ops_match_naive_loop_with_gradients(op, lengths, trailing, batch_first, packed):
    if op == "last_bi" and trailing == ():
        trailing = (4,)
    x = make_input(lengths, trailing)  # (T, B, *)
    x_ref = x.clone().requires_grad_()
    expected = naive(op, x_ref, lengths)

    x_in = x.clone().requires_grad_()
    layout = x_in.transpose(0, 1) if batch_first else x_in
    if packed:
        packed_in = packrnn.pack_padded_sequence(layout, lengths, batch_first=batch_first)
        out = run(op, packed_in)
        if op == "reverse":
            out, _ = packrnn.pad_packed_sequence(out, total_length=x.shape[0])  # (T, B, *) zeros at padding
            expected_cmp = torch.where(ops.lengths_to_mask(lengths, x.shape[0]).view(out.shape[:2] + (1,) * len(trailing)),
                                       expected, torch.zeros((), dtype=x.dtype))
        else:
            expected_cmp = expected
    else:
        out = run(op, layout, lengths, batch_first)
        if op == "reverse" and batch_first:
            out = out.transpose(0, 1)
        expected_cmp = expected
    torch.testing.assert_close(out, expected_cmp, equal_nan=True, rtol=1e-12, atol=1e-12)

    # gradients: a random cotangent on the real part of the output
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.nan_to_num() * g).sum().backward()
    if expected_cmp.requires_grad:  # the naive loop builds no graph when every length is 0
        (expected_cmp.nan_to_num() * g).sum().backward()
    grad_ref = x_ref.grad if x_ref.grad is not None else torch.zeros_like(x)
    torch.testing.assert_close(x_in.grad, grad_ref, rtol=1e-12, atol=1e-12)
    pad = ~ops.lengths_to_mask(lengths, x.shape[0]).view((x.shape[0], len(lengths)) + (1,) * len(trailing)).expand_as(x)
    if op != "reverse":  # reverse leaves padding in place (and passes its gradient through)
        assert (x_in.grad[pad] == 0).all()


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_packed_and_padded(op):
    lengths = [3, 0, 2, 3]
    x = torch.randn(3, 4, 4, dtype=torch.float64)

    def padded_fn(t):
        return run(op, t, lengths)

    def packed_fn(t):
        out = run(op, packrnn.pack_padded_sequence(t, lengths))
        return out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out

    assert torch.autograd.gradcheck(padded_fn, (x.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(packed_fn, (x.clone().requires_grad_(),))


def test_lengths_none_uses_every_step():
    x = torch.randn(5, 3, 2)
    torch.testing.assert_close(ops.mean_pool(x), x.mean(0))
    torch.testing.assert_close(ops.max_pool(x), x.amax(0))
    torch.testing.assert_close(ops.last_step(x), x[-1])
    torch.testing.assert_close(ops.reverse_sequences(x), x.flip(0))


def test_last_step_bidirectional_is_lstm_final_state():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 5, bidirectional=True, batch_first=True)
    lengths = [4, 7, 1, 5]
    x = torch.randn(4, 7, 3)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h, _) = lstm(packed)
    expected = torch.cat([h[-2], h[-1]], -1)  # (B, 2H)
    torch.testing.assert_close(ops.last_step(out, bidirectional=True), expected)  # torch's PackedSequence in
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    torch.testing.assert_close(ops.last_step(padded, lengths, batch_first=True, bidirectional=True), expected)
    torch.testing.assert_close(ops.last_step(out)[:, :5], h[-2])


def test_reverse_packed_round_trip_and_torch_reverse():
    seqs = [torch.arange(n, dtype=torch.float32) for n in [3, 5, 0, 2]]
    packed = packrnn.pack_sequence(seqs)
    rev = ops.reverse_sequences(packed)
    assert isinstance(rev, packrnn.PackedSequence)
    assert torch.equal(rev.batch_sizes, packed.batch_sizes)
    assert all(torch.equal(r, s.flip(0)) for r, s in zip(packrnn.unpack_sequence(rev), seqs))
    assert torch.equal(ops.reverse_sequences(rev).data, packed.data)


def test_all_zero_length_batches():
    x = torch.randn(0, 3, 2, requires_grad=True)
    for fn in (ops.mean_pool, ops.max_pool, ops.last_step):
        out = fn(x, [0, 0, 0])
        assert torch.equal(out, torch.zeros(3, 2))
        out.sum().backward()
    packed = packrnn.pack_sequence([torch.zeros(0, 2), torch.zeros(0, 2)])
    for fn in (ops.mean_pool, ops.max_pool, ops.last_step):
        assert torch.equal(fn(packed), torch.zeros(2, 2))


def test_lengths_to_mask():
    m = ops.lengths_to_mask([2, 0, 3])
    assert m.shape == (3, 3) and m.dtype == torch.bool
    assert m.t().tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert ops.lengths_to_mask(torch.tensor([1, 2]), 4, batch_first=True).tolist() == [
        [True, False, False, False], [True, True, False, False]]
    assert ops.lengths_to_mask([], batch_first=True).shape == (0, 0)
    # any integer max_length (numpy's too, as for lengths)
    assert ops.lengths_to_mask(np.array([1, 2]), np.int64(3)).shape == (3, 2)


def test_max_pool_integer_input():
    x = torch.tensor([[3, -5], [7, -9], [1, 0]])  # (T=3, B=2)
    assert ops.max_pool(x, [2, 1]).tolist() == [7, -5]
    assert ops.max_pool(packrnn.pack_padded_sequence(x, [2, 1])).tolist() == [7, -5]


def test_exported_from_package():
    for name in ops.__all__:
        assert getattr(packrnn, name) is getattr(ops, name)
        assert name in packrnn.__all__


def test_errors():
    x = torch.randn(4, 2, 3)
    packed = packrnn.pack_padded_sequence(x, [4, 2])
    with pytest.raises(ValueError, match="lengths: expected None for a PackedSequence input"):
        ops.mean_pool(packed, [4, 2])
    with pytest.raises(TypeError, match="input: expected a PackedSequence or a padded Tensor, got list"):
        ops.max_pool([1, 2], [1, 1])
    with pytest.raises(ValueError, match=r"input: expected a padded tensor with at least 2 dimensions \(T, B, \*\), got shape \(4,\)"):
        ops.mean_pool(torch.randn(4), [4])
    with pytest.raises(ValueError, match=r"lengths: expected every length <= 4 \(the padded time dimension\), got 5"):
        ops.last_step(x, [5, 1])
    with pytest.raises(ValueError, match="lengths: expected 2 lengths"):
        ops.last_step(x, [1])
    with pytest.raises(ValueError, match="input: expected an even feature size"):
        ops.last_step(x, [4, 2], bidirectional=True)
    with pytest.raises(TypeError, match="bidirectional: expected a bool, got 1"):
        ops.last_step(x, [4, 2], bidirectional=1)
    with pytest.raises(TypeError, match="batch_first: expected a bool, got 'yes'"):
        ops.mean_pool(x, [4, 2], "yes")
    with pytest.raises(ValueError, match="max_length: expected None or a non-negative int, got -1"):
        ops.lengths_to_mask([1], -1)
    with pytest.raises(TypeError, match="max_length: expected None or a non-negative int, got 2.5"):
        ops.lengths_to_mask([1], 2.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_cpu(op):
    lengths = [4, 0, 2, 3]
    x = torch.randn(4, 4, 6, dtype=torch.float64)
    for packed in (False, True):
        results = []
        for device in ("cpu", "cuda"):
            xd = x.to(device).requires_grad_()
            if packed:
                out = run(op, packrnn.pack_padded_sequence(xd, lengths))
                out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
            else:
                out = run(op, xd, torch.tensor(lengths, device=device))
            out.sum().backward()
            results.append((out.cpu(), xd.grad.cpu()))
        torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("packed", [True, False])
def test_last_step_bidirectional_refuses_a_unidirectional_output(packed):
    # H = 4 is even, so the halves check alone cannot see it: packrnn's layers mark their output
    x = torch.randn(2, 5, 3)

    def last(module, **kw):
        if packed:
            out, h = module(packrnn.pack_padded_sequence(x, [5, 2], batch_first=True))
            return ops.last_step(out, **kw), h
        out, h = module(x, lengths=[5, 2])
        return ops.last_step(out, [5, 2], batch_first=True, **kw), h

    lstm = packrnn.LSTM(3, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"bidirectional: expected the output of a bidirectional "
                                         r"RNN with bidirectional=True, got the output of a "
                                         r"unidirectional LSTM"):
        last(lstm, bidirectional=True)
    assert last(lstm)[0].shape == (2, 4)  # the plain last step is fine
    picked, h_n = last(packrnn.GRU(3, 2, batch_first=True, bidirectional=True), bidirectional=True)
    torch.testing.assert_close(picked, torch.cat([h_n[-2], h_n[-1]], -1))
