"""How encoded examples become training batches: one seeded order per epoch, cut into global
batches, each global batch split across the DDP ranks, each batch trimmed to its longest sequence.

The order and the global batches depend only on (seed, epoch, global batch size), never on the
number of workers: 1, 2 or 4 workers take the same optimizer steps over the same examples.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

SEQ_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def per_worker_batch(global_batch: int, world_size: int, field: str) -> int:
    """``global_batch / world_size``; a :class:`ValueError` naming ``field`` when it does not divide."""
    from .config import ConfigError

    if global_batch < 1 or global_batch % world_size:
        raise ConfigError(f"{field}: {global_batch} is the global batch size and must be a positive multiple of "
                          f"the number of workers ({world_size}), so that every worker gets the same share")
    return global_batch // world_size


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The example order of one epoch: a permutation seeded by (seed, epoch).

    Seeds and epochs are mixed so that (seed 1, epoch 0) is not (seed 0, epoch 1), unlike
    ``DistributedSampler``'s ``seed + epoch``.
    """
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919) % (2**63 - 1))
    return torch.randperm(n, generator=g)


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch of the epoch's seeded order.

    Global batch b = order[b*B : (b+1)*B]; rank r takes its positions r, r+W, r+2W, ...
    A full global batch gives every rank B/W examples, so DDP's mean of the ranks' mean
    losses is the single-worker mean over B. A short last batch splits as evenly as it can;
    when it has fewer than W examples, the missing ranks repeat examples from the start of
    the epoch (DDP needs every rank to take every step). Steps per epoch: ceil(N / B), for
    any W. ``set_epoch`` reshuffles (the training loop calls it before every epoch).

    With ``lengths`` (``data.batching: length_grouped``), each window of GROUP_WINDOW global
    batches of the shuffled order is sorted by length before it is cut, and the batches are
    then shuffled: batches of similar lengths, at the price of batches that are no longer
    uniform random draws (long-review domains cluster).
    """

    GROUP_WINDOW = 50

    def __init__(self, n: int, global_batch: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 lengths: torch.Tensor | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} examples")
        self.n, self.global_batch, self.shuffle, self.seed = n, global_batch, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.per_worker = per_worker_batch(global_batch, world_size, "batch_size")
        self.lengths = lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.global_batch)

    def global_batches(self) -> list[torch.Tensor]:
        """The epoch's global batches (the same on every rank)."""
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        B = self.global_batch
        if self.lengths is None:
            return [order[i:i + B] for i in range(0, self.n, B)]
        batches, span = [], B * self.GROUP_WINDOW
        for start in range(0, self.n, span):
            window = order[start:start + span]
            window = window[torch.argsort(self.lengths[window], stable=True)]
            batches.extend(window[i:i + B] for i in range(0, len(window), B))
        g = torch.Generator().manual_seed((int(self.seed) * 1_000_003 + int(self.epoch) * 7919 + 1) % (2**63 - 1))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __iter__(self) -> Iterator[list[int]]:
        order = None
        for chunk in self.global_batches():
            mine = chunk[self.rank::self.world_size]
            if len(mine) == 0:  # fewer examples in this batch than ranks
                order = epoch_order(self.n, self.seed, self.epoch, self.shuffle) if order is None else order
                mine = order[(self.rank - len(chunk)) % self.n:][:1]
            yield mine.tolist()


def stack_collate(batch: dict | list) -> dict[str, torch.Tensor]:
    """A batch as a dict of stacked tensors (``EncodedSplit.__getitems__`` already gives one)."""
    if isinstance(batch, list):
        batch = {k: torch.stack([ex[k] for ex in batch]) for k in batch[0]}
    return batch


def trim_collate(batch: dict | list) -> dict[str, torch.Tensor]:
    """Stack a batch and cut its [N, S] fields to the longest sequence in it.

    Exact for right-padded inputs: the positions removed are padding in every row, which the
    attention mask already hides from every token and every loss (mean pooling, L_embd,
    L_hidn and L_attn all count non-padding positions only).
    """
    batch = stack_collate(batch)
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2 or mask.shape[1] == 0:
        return batch
    used = mask.any(0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    if length < mask.shape[1]:
        # contiguous copies, not strided views of the untrimmed rows: a strided tensor is made
        # contiguous in pageable memory before it goes to the GPU, so its pinned copy would not
        # overlap the transfer with computation
        batch = {k: (v[:, :length].contiguous() if k in SEQ_FIELDS else v) for k, v in batch.items()}
    return batch


def make_loader(split, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                pin_memory: bool = False, trim: bool = True, group_by_length: bool = False) -> DataLoader:
    """A single-process DataLoader over an in-memory split (see :class:`ShardedBatchSampler`).

    ``batch_size`` is the global batch; this rank gets ``batch_size / world_size`` of it.
    ``trim`` cuts every batch to its longest sequence (:func:`trim_collate`); off, batches keep
    the split's fixed ``max_length``. ``group_by_length`` batches similar lengths together.
    """
    lengths = split.attention_mask.sum(1) if group_by_length else None
    sampler = ShardedBatchSampler(len(split), batch_size, shuffle, seed, rank, world_size, lengths)
    return DataLoader(split, batch_sampler=sampler, collate_fn=trim_collate if trim else stack_collate,
                      pin_memory=pin_memory)
