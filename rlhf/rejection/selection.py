"""Which samples a rejection-sampling round keeps: pure functions on score tensors.

Scores are ``[n_prompts * k]`` with the ``k`` samples of one prompt contiguous (the layout of
``input_ids.repeat_interleave(k, dim=0)``). A sample is *eligible* when its score is finite and,
where a ``valid`` mask ``[n_prompts * k]`` is given, that mask is true (e.g. it emitted EOS).

- RAFT (Dong et al. 2023): :func:`select_best` keeps each prompt's best eligible sample.
- ReST (Gulcehre et al. 2023): :func:`select_above` keeps every eligible sample scoring at or
  above a threshold; :func:`threshold_for_round` gives the threshold of each round from a
  schedule, either quantiles of the round's own scores or fixed values, and never lets it fall
  below the previous round's.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from rlhf.generation.best_of_n import best_of_n_indices

__all__ = ["check_schedule", "eligible", "select_above", "select_best", "threshold_for_round"]


def eligible(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` bool: finite ``scores`` ``[N]`` where ``valid`` ``[N]`` (if given) is true."""
    ok = torch.isfinite(scores)
    return ok if valid is None else ok & valid.bool()


def select_best(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """RAFT: the index of each prompt's best eligible sample.

    Args:
        scores: ``[n_prompts * k]``, a prompt's ``k`` samples contiguous.
        k: samples per prompt.
        valid: ``[n_prompts * k]`` bool, optional further eligibility.

    Returns:
        ``[<= n_prompts]`` int64 flat indices into ``scores``, ascending (ties -> the first
        sample); a prompt with no eligible sample keeps nothing.
    """
    ok = eligible(scores, valid)
    masked = torch.where(ok, scores.float(), torch.full_like(scores, -torch.inf, dtype=torch.float32))
    best = best_of_n_indices(masked, k)
    return best[ok[best]]


def select_above(scores: torch.Tensor, threshold: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ReST: the indices ``[n_kept]`` (int64, ascending) of the eligible ``scores`` ``[N]`` at or
    above ``threshold``."""
    keep = eligible(scores, valid) & (scores.float() >= threshold)
    return keep.nonzero().squeeze(1)


def check_schedule(values: Sequence[float], name: str, low: float | None = None, high: float | None = None) -> None:
    """Raise ``ValueError`` (naming ``name``) unless ``values`` is a non-empty, non-decreasing
    sequence within ``[low, high]``."""
    if not values:
        raise ValueError(f"{name} must list at least one value")
    if any(b < a for a, b in pairwise(values)):
        raise ValueError(f"{name} must not decrease from round to round, got {list(values)}")
    if (low is not None and min(values) < low) or (high is not None and max(values) > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {list(values)}")


def threshold_for_round(
    scores: torch.Tensor,
    round: int,
    quantiles: Sequence[float] | None = None,
    thresholds: Sequence[float] | None = None,
    floor: float | None = None,
) -> float:
    """The ReST threshold of round ``round`` (0-based); rounds past the schedule's end reuse its
    last entry.

    Exactly one schedule is given: ``quantiles`` (the threshold is that quantile of ``scores``
    ``[N]``, the round's eligible scores: scale-free, so it suits any reward) or ``thresholds``
    (fixed values in the reward's own units). Either way the result is at least ``floor`` (the
    previous round's threshold): the bar only rises. With no finite score a quantile threshold
    is ``floor`` (``inf`` without one: nothing is kept).
    """
    if (quantiles is None) == (thresholds is None):
        raise ValueError("give exactly one of quantiles and thresholds")
    schedule = quantiles if quantiles is not None else thresholds
    value = float(schedule[min(round, len(schedule) - 1)])
    if quantiles is not None:
        finite = scores[torch.isfinite(scores)].float()
        if finite.numel() == 0:
            return floor if floor is not None else float("inf")
        value = float(torch.quantile(finite, value))
    return value if floor is None else max(value, floor)
