"""Batch samplers that group sequences of similar length, and a padding-waste report.

Use them as a DataLoader's ``batch_sampler``::

    sampler = BucketBatchSampler(dataset.lengths, batch_size=32, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate())
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...
"""

# NOTE [bucketing]
#
# One epoch's batches are a pure function of (lengths, seed, epoch) -- every rank of a
# distributed job computes the same global plan without communicating:
# 1. shuffle all indices with a generator seeded by (seed, epoch);
# 2. cut the shuffled list into pools of ``pool_size`` examples (a multiple of batch_size);
# 3. sort each pool by length (stable, so ties keep their random order);
# 4. cut each sorted pool into batches: ``batch_size`` examples each, or as many as fit in
#    ``max_tokens`` padded tokens (``len(batch) * max(lengths in batch)``);
# 5. shuffle the order of all batches.
# Similar lengths share a batch (little padding) while the pools and the batch order change
# every epoch. Every index appears in exactly one batch. With a fixed batch_size, pools are whole
# multiples of it, so only the very last batch of the last pool can be short (drop_last drops
# it). With shuffle=False there is one pool, no shuffling: batches of increasing length.
# Zero-length sequences count as length 1 against max_tokens, so a batch never grows unbounded.

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Sampler

from ..packing import as_lengths

__all__ = ["BucketBatchSampler", "DistributedBucketBatchSampler", "PaddingStats", "padding_waste"]

_DEFAULT_POOL_BATCHES = 50  # a pool holds this many batches' worth of examples


def _check_positive_int(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name}: expected a positive int{extra}, got {value!r}")


def _plan_epoch(
    lengths: list[int],
    *,
    batch_size: int | None,
    max_tokens: int | None,
    pool_size: int,
    shuffle: bool,
    drop_last: bool,
    seed: int,
    epoch: int,
) -> list[list[int]]:
    """One epoch's batches (lists of indices); see NOTE [bucketing]."""
    n = len(lengths)
    if shuffle:
        gen = torch.Generator().manual_seed(_mix(seed, epoch))
        order = torch.randperm(n, generator=gen).tolist()
        pools = [order[i : i + pool_size] for i in range(0, n, pool_size)]
    else:
        gen = None
        pools = [list(range(n))]

    batches: list[list[int]] = []
    for pool in pools:
        pool.sort(key=lengths.__getitem__)  # stable: ties keep the shuffled order
        batches.extend(_cut(pool, lengths, batch_size, max_tokens))
    if drop_last and batches and batch_size is not None and len(batches[-1]) < batch_size:
        batches.pop()  # pools are multiples of batch_size: only the very last batch can be short
    if shuffle:
        perm = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in perm]
    return batches


def _cut(pool: list[int], lengths: list[int], batch_size: int | None, max_tokens: int | None) -> list[list[int]]:
    """Cut a length-sorted pool into consecutive batches under batch_size and max_tokens."""
    if max_tokens is None:
        return [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
    batches, current, longest = [], [], 0
    for idx in pool:
        length = max(lengths[idx], 1)  # NOTE [bucketing]: zero-length counts as 1
        new_longest = max(longest, length)
        full = batch_size is not None and len(current) >= batch_size
        if current and (full or new_longest * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, new_longest = [], length
        current.append(idx)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def _mix(seed: int, epoch: int) -> int:
    """A generator seed from (seed, epoch), different for every pair in practice."""
    return (seed * 1_000_003 + epoch * 7919 + 0x5DEECE66D) % (2**63 - 1)


class BucketBatchSampler(Sampler[list[int]]):
    """Yield batches of indices whose sequences have similar lengths, reshuffled every epoch.

    See NOTE [bucketing] for the algorithm. Every index appears in exactly one batch per epoch
    (except the short last batch when ``drop_last``). Batches depend only on
    ``(lengths, seed, epoch)``: call :meth:`set_epoch` before each epoch for reproducible
    runs (each pass without it advances the epoch by one, so batches still differ).

    Args:
        lengths (sequence of int): the length of each example (e.g. ``dataset.lengths``).
        batch_size (int, optional): examples per batch (at most, with ``max_tokens``).
            Required unless ``max_tokens`` is given. Default: None.
        max_tokens (int, optional): token budget: ``len(batch) * max(lengths in batch) <=
            max_tokens`` (the size of the padded batch); a single longer sequence gets a batch of
            its own. Default: None (fixed ``batch_size``).
        shuffle (bool): randomize pools and batch order; ``False`` gives deterministic batches
            of increasing length (for evaluation). Default: True.
        drop_last (bool): drop the short last batch (fixed ``batch_size`` only). Default: False.
        seed (int, optional): base seed; ``None`` draws one from torch's global generator (so
            ``torch.manual_seed`` makes it reproducible). Default: None.
        pool_size (int, optional): examples sorted together; larger = less padding, less
            randomness. Default: ``50 * batch_size`` (rounded up to a multiple of it).

    >>> s = BucketBatchSampler([5, 1, 4, 2, 3, 1], batch_size=2, seed=0)
    >>> sorted(i for b in s for i in b)
    [0, 1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int | None = None,
        *,
        max_tokens: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        pool_size: int | None = None,
    ) -> None:
        self.lengths = as_lengths(lengths).tolist()
        _check_positive_int(batch_size, "batch_size", allow_none=True)
        _check_positive_int(max_tokens, "max_tokens", allow_none=True)
        _check_positive_int(pool_size, "pool_size", allow_none=True)
        if batch_size is None and max_tokens is None:
            raise ValueError("batch_size: expected a positive int when max_tokens is None, got None")
        if drop_last and batch_size is None:
            raise ValueError("drop_last: expected False with a token budget and no batch_size, got True")
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed: expected an int or None, got {seed!r}")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0
        self.pool_size = self._pool_size(pool_size)
        self._cache: tuple[int, list[list[int]]] | None = None

    def _pool_size(self, pool_size: int | None) -> int:
        if self.batch_size is not None:
            unit = self.batch_size
        else:  # token budget only: estimate a batch from the mean length
            mean = max(1.0, sum(self.lengths) / max(1, len(self.lengths)))
            unit = max(1, int(self.max_tokens // mean))
        if pool_size is None:
            pool_size = _DEFAULT_POOL_BATCHES * unit
        if self.batch_size is not None:  # NOTE [bucketing]: whole batches per pool
            pool_size = math.ceil(pool_size / self.batch_size) * self.batch_size
        return pool_size

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s batches for the next pass (as ``DistributedSampler.set_epoch``)."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        self.epoch = int(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the next pass's), without advancing the epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            plan = _plan_epoch(
                self.lengths,
                batch_size=self.batch_size,
                max_tokens=self.max_tokens,
                pool_size=self.pool_size,
                shuffle=self.shuffle,
                drop_last=self.drop_last,
                seed=self.seed,
                epoch=epoch,
            )
            self._cache = (epoch, self._finish(plan, epoch))
        return self._cache[1]

    def _finish(self, plan: list[list[int]], epoch: int) -> list[list[int]]:
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        self.epoch += 1  # a later pass without set_epoch gets new batches
        return iter([list(b) for b in batches])

    def __len__(self) -> int:
        """Number of batches in the next pass."""
        if self.max_tokens is None and type(self) is BucketBatchSampler:
            n = len(self.lengths)
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return len(self.batches())


class DistributedBucketBatchSampler(BucketBatchSampler):
    """:class:`BucketBatchSampler` for ``torch.distributed``: each rank gets a disjoint shard.

    All ranks compute the same global plan (NOTE [bucketing]; ``seed`` must be equal on every
    rank, hence the default 0) and rank ``r`` takes batches ``r, r + R, r + 2R, ...``. To give
    every rank the same number of batches (so DDP's collective calls line up):

    * ``drop_last=False``: the largest batches are split in two until the count is a multiple
      of ``R``. No index is dropped or repeated -- the shards are disjoint and cover the data
      set. If there are too few examples for that (fewer than ``R`` per batch round), a
      ``ValueError`` suggests ``drop_last=True``.
    * ``drop_last=True``: the short last batch and then the last ``count % R`` batches of the
      plan are dropped (at most ``R - 1`` batches; which ones changes every epoch).

    Args:
        lengths, batch_size, max_tokens, shuffle, drop_last, pool_size: as
            :class:`BucketBatchSampler`.
        num_replicas (int, optional): ``R``; default: ``torch.distributed.get_world_size()``.
        rank (int, optional): this rank; default: ``torch.distributed.get_rank()``.
        seed (int): base seed, identical on all ranks. Default: 0.

    >>> shards = [list(DistributedBucketBatchSampler(list(range(1, 11)), 2, num_replicas=2, rank=r))
    ...           for r in range(2)]
    >>> len(shards[0]) == len(shards[1]), sorted(i for s in shards for b in s for i in b) == list(range(10))
    (True, True)
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int | None = None,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        max_tokens: int | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        pool_size: int | None = None,
    ) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "num_replicas: expected explicit num_replicas and rank, or an initialized "
                    "torch.distributed process group, got neither"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        _check_positive_int(num_replicas, "num_replicas")
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank: expected an int in [0, {num_replicas}), got {rank!r}")
        if seed is None:
            raise TypeError("seed: expected an int identical on every rank, got None")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        super().__init__(
            lengths,
            batch_size,
            max_tokens=max_tokens,
            shuffle=shuffle,
            drop_last=drop_last,
            seed=seed,
            pool_size=pool_size,
        )

    def _finish(self, plan: list[list[int]], epoch: int) -> list[list[int]]:
        replicas = self.num_replicas
        extra = len(plan) % replicas
        if extra and self.drop_last:
            plan = plan[: len(plan) - extra]
        elif extra:
            plan = _split_largest(plan, replicas - extra, self.lengths)
            if plan is None:
                raise ValueError(
                    f"num_replicas: expected at least {replicas} examples per round of batches to give "
                    f"{replicas} ranks equal batch counts without repeating examples, got "
                    f"{len(self.lengths)} examples; pass drop_last=True or a smaller batch size"
                )
        return plan[self.rank :: replicas]


def _split_largest(plan: list[list[int]], splits: int, lengths: list[int]) -> list[list[int]] | None:
    """Split the largest batches in two, ``splits`` times; None if too few examples."""
    plan = [list(b) for b in plan]
    for _ in range(splits):
        j = max(range(len(plan)), key=lambda i: len(plan[i]))  # first of the largest
        batch = plan[j]
        if len(batch) < 2:
            return None
        half = len(batch) // 2
        # batches are length-sorted, so both halves stay buckets (and within max_tokens)
        plan[j : j + 1] = [batch[:half], batch[half:]]
    return plan


class PaddingStats(NamedTuple):
    """Padding cost of a set of batches."""

    batches: int  # number of batches
    real_tokens: int  # sum of sequence lengths
    padded_tokens: int  # sum over batches of len(batch) * max(lengths in batch)
    waste: float  # 1 - real_tokens / padded_tokens: the fraction of computed steps that are padding


def padding_waste(batches, lengths: Sequence[int]) -> PaddingStats:
    """How much of a padded batch is padding, over all ``batches`` (e.g. one epoch of a sampler).

    Args:
        batches: iterable of lists of indices (a batch sampler, or ``list(sampler)``).
        lengths (sequence of int): the length of each example.

    Returns:
        :class:`PaddingStats` ``(batches, real_tokens, padded_tokens, waste)``; ``waste`` is
        0.0 when there are no padded tokens at all.

    >>> padding_waste([[0, 1], [2]], [4, 2, 3])
    PaddingStats(batches=2, real_tokens=9, padded_tokens=11, waste=0.18181818181818182)
    """
    lengths = as_lengths(lengths).tolist()
    count = real = padded = 0
    for batch in batches:
        lens = [lengths[i] for i in batch]
        count += 1
        real += sum(lens)
        padded += len(lens) * max(lens, default=0)
    waste = (padded - real) / padded if padded else 0.0
    return PaddingStats(count, real, padded, waste)
