"""Resumable training order: a run resumed mid-epoch continues the epoch where the killed run
stopped, with the same order.

PyTorch's ``RandomSampler`` draws each epoch's shuffling seed from the global torch RNG when the
epoch starts, and Lightning cannot restore a plain ``DataLoader`` mid-epoch (it restarts the
epoch and shortens it). :class:`ResumableRandomSampler` draws and shuffles exactly as
``RandomSampler`` does (so fresh runs are unchanged) but remembers the epoch's seed, which the
data module saves in checkpoints with the number of batches done; on resume the sampler
replays that epoch's order from there, without drawing.

Multi-process runs: :func:`even_distributed_sampler` gives each process a disjoint, equal share
of every epoch (for prompts: no prompt twice in one global step).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler


def shuffled(size: int, seed: int) -> list[int]:
    """The order ``RandomSampler`` gives ``[0, size)`` for the per-epoch ``seed`` it drew."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(size, generator=generator).tolist()


class ResumableRandomSampler(Sampler[int]):
    """``RandomSampler`` (no replacement) that can replay an epoch part-way.

    Each ``iter()`` is one epoch. Its seed is drawn from the global torch RNG when the first
    index is taken, as ``RandomSampler`` does, and kept in :attr:`epoch_seed`; after
    :meth:`resume` the next epoch uses the given seed instead (no draw) and skips indices
    already consumed.

    Args:
        size: dataset length.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.epoch_seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def resume(self, seed: int, skip: int) -> None:
        """Make the next epoch the one shuffled with ``seed``, minus its first ``skip`` indices."""
        if not 0 <= skip <= self.size:
            raise ValueError(f"cannot skip {skip} of {self.size} indices")
        self._resume = (seed, skip)

    def __len__(self) -> int:
        return self.size  # a full epoch: what Lightning counts batches per epoch from

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            (seed, skip), self._resume = self._resume, None
        else:
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.epoch_seed = seed
        yield from shuffled(self.size, seed)[skip:]


class ResumedDataLoader(DataLoader):
    """A ``DataLoader`` whose first iterator takes its worker base seed from its own
    ``generator`` and later ones from the global RNG, as usual. For the epoch a run resumes
    in: the uninterrupted run drew that seed when the epoch started, before the checkpoint,
    so drawing it again would shift the RNG stream the resumed run continues."""

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        self.generator = None
        return iterator


def even_distributed_sampler(dataset: Sized, num_replicas: int, rank: int) -> DistributedSampler:
    """Process ``rank``'s share of each training epoch over ``dataset``: the epoch's shuffled
    order, the same on every process (seeded, as Lightning's own sampler is, with
    ``seed_everything``'s seed ``$PL_GLOBAL_SEED`` plus the epoch, which Lightning sets each
    epoch), cut into ``num_replicas`` disjoint parts of ``len(dataset) // num_replicas`` items.

    The ``len(dataset) % num_replicas`` items left over sit out that epoch (a different few each
    epoch). Lightning's default sampler pads the epoch with repeats instead, so an item can come
    twice in one epoch, and twice in one global step when the data set is smaller than one
    global batch.
    """
    if len(dataset) < num_replicas:
        raise ValueError(
            f"{len(dataset)} training items cannot give each of the {num_replicas} processes one: "
            "add data or run fewer processes"
        )
    seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
    return DistributedSampler(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
