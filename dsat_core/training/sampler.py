"""Deterministic, resumable, rank-sharded batch order.

Epoch `e` is a permutation seeded by `(seed, e)` (with `weights`: as many draws with replacement, each index
in proportion to its weight); rank `r` of `w` takes every `w`-th index of it (padded by wrapping, like
`DistributedSampler`); batches drop the incomplete tail so every rank makes the same number of steps. Because
the order is a pure function of (seed, epoch, rank), resuming at micro-batch `k` is just starting the
iterator there — no state to save.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from dsat_core.training.config import BalanceBy

if TYPE_CHECKING:
    from dsat_core.data.dataset import TileDataset


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite stream of index batches for one rank, starting after `start_batch` batches."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle: bool = True,
        weights: Sequence[float] | None = None,
    ):
        if num_items < 1:
            raise ValueError("the training dataset is empty (check the store URI, product and filters)")
        per_rank = -(-num_items // world_size)
        if per_rank < batch_size:
            raise ValueError(
                f"{num_items} tiles over {world_size} process(es) gives {per_rank} per process, "
                f"fewer than train_batch_size={batch_size}"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.shuffle = shuffle
        if weights is not None and len(weights) != num_items:
            raise ValueError(f"{len(weights)} sampling weights for {num_items} items")
        self.weights = torch.as_tensor(weights, dtype=torch.float64) if weights is not None else None
        self.batches_per_epoch = per_rank // batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.shuffle and self.weights is not None:
            order = torch.multinomial(self.weights, self.num_items, replacement=True, generator=gen).tolist()
        elif self.shuffle:
            order = torch.randperm(self.num_items, generator=gen).tolist()
        else:
            order = list(range(self.num_items))
        total = -(-self.num_items // self.world_size) * self.world_size
        order = (order * (total // len(order) + 1))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield indices[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # one epoch; the iterator itself never ends
        return self.batches_per_epoch


def balanced_weights(groups: Sequence[str]) -> list[float]:
    """Sampling weight 1 / (items in its group) per item, so every group is drawn equally often."""
    counts = Counter(groups)
    return [1.0 / counts[g] for g in groups]


def tile_groups(dataset: TileDataset, balance_by: BalanceBy) -> list[str]:
    """Each tile's group for balanced sampling: its item, or its item's platform (sensor)."""
    if balance_by == "item":
        return dataset.item_ids
    if balance_by == "platform":
        return dataset.platforms
    raise ValueError(f"balance_by {balance_by!r}: expected 'item' or 'platform'")
