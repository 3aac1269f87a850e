"""Bucket samplers: every index exactly once, disjoint equal shards, budgets, determinism."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packrnn.data import BucketBatchSampler, DistributedBucketBatchSampler, padding_waste

lengths_st = st.lists(st.integers(0, 40), min_size=1, max_size=120)


def flat(batches):
    return [i for b in batches for i in b]


@given(lengths_st, st.integers(1, 17), st.booleans(), st.integers(0, 3), st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_every_index_once_per_epoch(lengths, batch_size, shuffle, epoch, seed):
    s = BucketBatchSampler(lengths, batch_size, shuffle=shuffle, seed=seed, pool_size=batch_size * 3)
    s.set_epoch(epoch)
    batches = list(s)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    assert len(batches) == len(s) or s.epoch == epoch + 1  # len() describes the pass
    s.set_epoch(epoch)
    assert len(s) == len(batches)
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1  # only one short batch


@given(lengths_st, st.integers(1, 17), st.integers(0, 2**32))
@settings(max_examples=100, deadline=None)
def test_drop_last(lengths, batch_size, seed):
    s = BucketBatchSampler(lengths, batch_size, drop_last=True, seed=seed)
    batches = list(s)
    assert all(len(b) == batch_size for b in batches)
    assert len(batches) == len(lengths) // batch_size == len(s)
    seen = flat(batches)
    assert len(set(seen)) == len(seen) == len(lengths) - len(lengths) % batch_size


@given(lengths_st, st.integers(1, 200), st.one_of(st.none(), st.integers(1, 9)), st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_token_budget(lengths, max_tokens, batch_size, seed):
    s = BucketBatchSampler(lengths, batch_size, max_tokens=max_tokens, seed=seed)
    batches = list(s)
    assert sorted(flat(batches)) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * max(max(lengths[i], 1) for i in b)
        assert padded <= max_tokens or len(b) == 1  # a long sequence alone may exceed the budget
        if batch_size is not None:
            assert len(b) <= batch_size


def test_batches_group_similar_lengths_and_cut_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (2000,), generator=g).tolist()
    bucketed = padding_waste(BucketBatchSampler(lengths, 16, seed=0), lengths)
    perm = torch.randperm(2000, generator=g).tolist()
    random_batches = [perm[i : i + 16] for i in range(0, 2000, 16)]
    unbucketed = padding_waste(random_batches, lengths)
    assert bucketed.real_tokens == unbucketed.real_tokens == sum(lengths)
    assert bucketed.waste < 0.1 < 0.3 < unbucketed.waste


def test_randomness_is_seeded_and_changes_each_epoch():
    lengths = list(range(1, 101)) * 3
    a = BucketBatchSampler(lengths, 8, seed=3)
    b = BucketBatchSampler(lengths, 8, seed=3)
    epoch0, epoch1 = list(a), list(a)  # without set_epoch each pass advances the epoch
    assert epoch0 != epoch1
    assert list(b) == epoch0
    b.set_epoch(1)
    assert list(b) == epoch1
    assert list(BucketBatchSampler(lengths, 8, seed=4)) != epoch0
    torch.manual_seed(11)
    c = list(BucketBatchSampler(lengths, 8))
    torch.manual_seed(11)
    assert list(BucketBatchSampler(lengths, 8)) == c  # seed=None follows torch.manual_seed


def test_no_shuffle_is_deterministic_increasing_length():
    lengths = [5, 1, 4, 2, 3, 0]
    batches = list(BucketBatchSampler(lengths, 2, shuffle=False))
    assert batches == [[5, 1], [3, 4], [2, 0]]
    assert batches == list(BucketBatchSampler(lengths, 2, shuffle=False))


@given(lengths_st, st.integers(1, 9), st.integers(1, 5), st.booleans(), st.integers(0, 3), st.integers(0, 2**32))
@settings(max_examples=150, deadline=None)
def test_distributed_disjoint_shards_equal_counts(lengths, batch_size, replicas, drop_last, epoch, seed):
    def shards():
        out = []
        for rank in range(replicas):
            s = DistributedBucketBatchSampler(
                lengths, batch_size, num_replicas=replicas, rank=rank, drop_last=drop_last, seed=seed
            )
            s.set_epoch(epoch)
            out.append((len(s), list(s)))
        return out

    n = len(lengths)
    rounds = -(-(-(-n // batch_size)) // replicas)  # ceil(ceil(n / bs) / R)
    if not drop_last and n < replicas * rounds:
        with pytest.raises(ValueError, match="num_replicas: expected at least .* pass drop_last=True"):
            shards()
        return
    result = shards()
    counts = {len(batches) for _, batches in result}
    assert len(counts) == 1  # equal batch counts on every rank
    assert all(length == len(batches) for length, batches in result)
    seen = [i for _, batches in result for i in flat(batches)]
    assert len(seen) == len(set(seen))  # disjoint
    assert all(len(b) <= batch_size for _, batches in result for b in batches)
    if drop_last:
        assert len(seen) >= n - (n % batch_size) - (replicas - 1) * batch_size
    else:
        assert sorted(seen) == list(range(n))  # every index exactly once over all ranks


@given(st.lists(st.integers(0, 40), min_size=1, max_size=120), st.integers(20, 120), st.integers(1, 4),
       st.integers(0, 2**32))
@settings(max_examples=80, deadline=None)
def test_distributed_token_budget(lengths, max_tokens, replicas, seed):
    n = len(lengths)
    plan = BucketBatchSampler(lengths, max_tokens=max_tokens, seed=seed).batches(0)  # the global plan
    if n < replicas * -(-len(plan) // replicas):  # cannot split into equal counts without repeats
        with pytest.raises(ValueError, match="num_replicas: expected at least"):
            DistributedBucketBatchSampler(lengths, max_tokens=max_tokens, num_replicas=replicas, rank=0, seed=seed).batches()
        return
    result = [list(DistributedBucketBatchSampler(lengths, max_tokens=max_tokens, num_replicas=replicas, rank=r, seed=seed))
              for r in range(replicas)]
    assert len({len(b) for b in result}) == 1
    seen = [i for batches in result for i in flat(batches)]
    assert sorted(seen) == list(range(n))
    for batches in result:
        for b in batches:
            assert len(b) * max(max(lengths[i], 1) for i in b) <= max_tokens or len(b) == 1


def test_distributed_ranks_change_every_epoch():
    lengths = list(range(1, 65))
    s = DistributedBucketBatchSampler(lengths, 4, num_replicas=2, rank=0)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != e0


def test_distributed_from_process_group(tmp_path):
    import torch.distributed as dist

    with pytest.raises(ValueError, match="num_replicas: expected explicit num_replicas and rank"):
        DistributedBucketBatchSampler([1, 2, 3], 2)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        s = DistributedBucketBatchSampler([1, 2, 3], 2)
        assert (s.num_replicas, s.rank) == (1, 0)
        assert sorted(flat(s)) == [0, 1, 2]
    finally:
        dist.destroy_process_group()


def test_dataloader_integration():
    from torch.utils.data import DataLoader

    from packrnn.data import Collate, TextClassificationDataset

    ds = TextClassificationDataset([[1] * n for n in [3, 1, 2, 5, 0, 4]], [0, 1, 0, 1, 0, 1])
    loader = DataLoader(ds, batch_sampler=BucketBatchSampler(ds.lengths, 2, seed=0), collate_fn=Collate())
    batches = list(loader)
    assert len(batches) == 3 == len(loader)
    assert sorted(int(x) for b in batches for x in b.lengths) == sorted(ds.lengths)


def test_padding_waste():
    stats = padding_waste([[0, 1], [2]], [4, 2, 3])
    assert stats == (2, 9, 11, 2 / 11)
    assert padding_waste([[0]], [0]).waste == 0.0
    assert padding_waste([], [1, 2]).batches == 0


def test_errors():
    with pytest.raises(ValueError, match="batch_size: expected a positive int when max_tokens is None, got None"):
        BucketBatchSampler([1, 2])
    with pytest.raises(ValueError, match="batch_size: expected a positive int or None, got 0"):
        BucketBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="max_tokens: expected a positive int or None, got -1"):
        BucketBatchSampler([1, 2], max_tokens=-1)
    with pytest.raises(ValueError, match="drop_last: expected False with a token budget"):
        BucketBatchSampler([1, 2], max_tokens=10, drop_last=True)
    with pytest.raises(ValueError, match="lengths: expected non-negative lengths, got -1"):
        BucketBatchSampler([1, -1], 2)
    with pytest.raises(TypeError, match="seed: expected an int or None, got 1.5"):
        BucketBatchSampler([1], 2, seed=1.5)
    with pytest.raises(ValueError, match="epoch: expected a non-negative int, got -1"):
        BucketBatchSampler([1], 2, seed=0).set_epoch(-1)
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\), got 2"):
        DistributedBucketBatchSampler([1, 2], 1, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="seed: expected an int identical on every rank, got None"):
        DistributedBucketBatchSampler([1, 2], 1, num_replicas=2, rank=0, seed=None)
