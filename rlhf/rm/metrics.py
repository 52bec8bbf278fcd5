"""Reward-model metrics as torchmetrics (their states sum over batches and over processes)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torchmetrics import Metric


class PairMean(Metric):
    """Mean over all pairs of a per-pair value of the ``chosen`` and ``rejected`` scores.

    Subclasses give :meth:`pair_values` and ``sum_dtype``, the dtype the sum is kept in.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    sum_dtype: ClassVar[torch.dtype]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0, dtype=self.sum_dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def pair_values(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """``[P]`` values to average, from the detached ``[P]`` scores of the pairs."""
        raise NotImplementedError

    def update(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        """``chosen``, ``rejected``: ``[P]`` scores of the pairs."""
        self.total += self.pair_values(chosen.detach(), rejected.detach()).sum()
        self.count += chosen.numel()


class PairwiseAccuracy(PairMean):
    """Fraction of pairs with ``chosen > rejected``; a tie counts as wrong."""

    sum_dtype = torch.long

    def pair_values(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return chosen > rejected

    def compute(self) -> torch.Tensor:
        return self.total.float() / self.count.clamp(min=1)


class MeanMargin(PairMean):
    """Mean of ``chosen - rejected`` over all pairs (summed in float64)."""

    sum_dtype = torch.float64

    def pair_values(self, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        return chosen.double() - rejected.double()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class StdMetric(Metric):
    """Sample standard deviation (``n - 1`` denominator) of every value seen.

    Keeps sum, sum of squares and count in float64, so it is exact to merge across batches
    and processes.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        """``values``: any shape; every element counts once."""
        v = values.detach().double().flatten()
        self.total += v.sum()
        self.total_sq += v.pow(2).sum()
        self.count += v.numel()

    def compute(self) -> torch.Tensor:
        n = self.count.double()
        if n < 2:
            return torch.zeros((), dtype=torch.float32, device=self.total.device)
        var = (self.total_sq - self.total.pow(2) / n) / (n - 1)
        return var.clamp(min=0).sqrt().float()
