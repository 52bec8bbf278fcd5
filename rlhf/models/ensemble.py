"""Reward-model ensembles: K reward models scored together and combined into one conservative
score (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization").

Each member is standardised with its own training statistics (its ``score_mean`` and
``score_std``) before combining, since members trained with different seeds sit on different
scales. The objectives, over the K standardised scores of one response:

- ``mean``: the average (a plain ensemble);
- ``uncertainty``: ``mean - penalty * std`` (population std over the members): disagreement
  costs reward. Coste et al.'s UWO subtracts the variance; the std keeps ``penalty`` in reward
  units;
- ``min``: the worst member (worst-case optimisation).

Members that are LoRA adapters on the policy's own base are loaded as adapters ``reward_0 ..
reward_{K-1}`` on it (one copy of the base weights for policy, reference and all K rewards);
:func:`rlhf.models.scorers.load_scorer` builds the scorer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

EnsembleObjective = Literal["mean", "uncertainty", "min"]
OBJECTIVES: tuple[str, ...] = ("mean", "uncertainty", "min")


def combine_scores(scores: torch.Tensor, objective: EnsembleObjective = "mean", penalty: float = 1.0) -> torch.Tensor:
    """One score per response from the members' scores.

    Args:
        scores: ``[K, B]`` the K members' (standardised) scores of B responses.
        objective: ``mean``, ``uncertainty`` (``mean - penalty * std``) or ``min``.
        penalty: the weight of the members' std under ``uncertainty`` (>= 0).

    Returns:
        ``[B]`` float32.
    """
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(f"scores must be [members, batch] with at least one member, got {tuple(scores.shape)}")
    scores = scores.float()
    if objective == "mean":
        return scores.mean(dim=0)
    if objective == "uncertainty":
        return scores.mean(dim=0) - penalty * scores.std(dim=0, correction=0)
    if objective == "min":
        return scores.min(dim=0).values
    raise ValueError(f"unknown ensemble objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")


def check_ensemble(models: Sequence[str], objective: str, penalty: float) -> None:
    """Refuse an ensemble config that cannot mean what it says: an unknown objective, a
    negative or non-finite penalty, a model named twice, or a conservative objective over one
    model (its std is 0 and its min is itself)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"reward.ensemble: unknown objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    if not (penalty >= 0 and penalty != float("inf")):
        raise ValueError(f"reward.ensemble_penalty must be a finite number >= 0, got {penalty}")
    if not models:
        raise ValueError("reward.model: no reward model given")
    seen = set()
    for path in models:
        if path in seen:
            raise ValueError(f"reward.model: {path} is named twice; ensemble members must differ")
        seen.add(path)
    if objective != "mean" and len(models) < 2:
        raise ValueError(
            f"reward.ensemble: {objective!r} needs at least 2 reward models (got one: {models[0]}); "
            "list several in reward.model"
        )


class EnsembleScorer(nn.Module):
    """Scores with every member, standardises each, and combines them (:func:`combine_scores`).

    Args:
        members: K scorers, each ``(input_ids [B, T], attention_mask [B, T]) -> [B]`` raw scores.
        stats: K ``(score_mean, score_std)`` pairs, the members' training statistics.
        objective, penalty: see :func:`combine_scores`.

    After each call, :attr:`last_spread` holds the members' mean std ``[]`` over the batch
    (their disagreement, for logging).
    """

    def __init__(self, members: Sequence[nn.Module], stats: Sequence[tuple[float, float]],
                 objective: EnsembleObjective = "mean", penalty: float = 1.0) -> None:
        super().__init__()
        if len(members) != len(stats) or not members:
            raise ValueError(f"need one (mean, std) per member: {len(members)} members, {len(stats)} stats")
        self.members = nn.ModuleList(members)
        self.register_buffer("means", torch.tensor([m for m, _ in stats], dtype=torch.float32), persistent=False)
        self.register_buffer("stds", torch.tensor([max(s, 1e-8) for _, s in stats], dtype=torch.float32),
                             persistent=False)
        self.objective = objective
        self.penalty = float(penalty)
        self.last_spread: float | None = None

    @torch.no_grad()
    def member_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[K, B]`` standardised scores, one row per member."""
        raw = torch.stack([m(input_ids, attention_mask).float() for m in self.members])
        return (raw - self.means[:, None].to(raw.device)) / self.stds[:, None].to(raw.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = self.member_scores(input_ids, attention_mask)
        self.last_spread = float(scores.std(dim=0, correction=0).mean()) if len(self.members) > 1 else 0.0
        return combine_scores(scores, self.objective, self.penalty)
