"""Samplers as functions of a position, so that data order needs no state to resume.

A training stream is an infinite sequence of *global sample positions* 0, 1, 2, ... Iteration ``i`` of a domain
with global batch ``G`` consumes positions ``i*G .. i*G+G-1``; rank ``r`` of ``R`` takes positions
``i*G + j*R + r``. :class:`EpochPermutationSampler` maps a position to a dataset index (a fresh permutation per
epoch, seeded by (seed, epoch)), and the augmentation RNG of a sample is seeded by its position too. Hence:

* the samples of an iteration do not depend on the number of processes or data workers;
* ``--resume`` at iteration ``i`` continues the exact stream by starting at position ``i*G``.
"""

from __future__ import annotations

from typing import Iterator, List

import torch

__all__ = ["EpochPermutationSampler", "InferenceSampler", "rank_positions"]


class EpochPermutationSampler:
    """Position ``p`` -> dataset index: element ``p % N`` of a random permutation of ``range(N)`` drawn for
    epoch ``p // N`` from ``torch.Generator().manual_seed(seed + epoch)``; without shuffling, ``p % N``."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError("Cannot sample from an empty dataset")
        self.size = size
        self.seed = int(seed)
        self.shuffle = shuffle
        self._epoch = -1
        self._perm: List[int] = []

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if not self.shuffle:
            return offset
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.size, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset]


def rank_positions(iteration: int, global_batch: int, rank: int, world_size: int) -> List[int]:
    """The global sample positions rank ``rank`` uses at ``iteration``."""
    if global_batch % world_size:
        raise ValueError(f"A global batch of {global_batch} cannot be split over {world_size} processes")
    return [iteration * global_batch + j * world_size + rank for j in range(global_batch // world_size)]


class InferenceSampler(torch.utils.data.Sampler):
    """Each rank gets a contiguous shard of ``range(size)``; shard sizes differ by at most one (Detectron2's)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self._size = size
        shard, extra = divmod(size, world_size)
        begin = shard * rank + min(rank, extra)
        end = begin + shard + (1 if rank < extra else 0)
        self._indices = range(begin, end)

    def __iter__(self) -> Iterator[int]:
        yield from self._indices

    def __len__(self) -> int:
        return len(self._indices)
