"""Score shaping: what the reward model's raw score becomes before it enters the PPO reward."""

from __future__ import annotations

import torch

from rlhf.ppo.settings import RewardSettings


def shape_scores(
    raw: torch.Tensor,
    has_eos: torch.Tensor,
    lengths: torch.Tensor,
    settings: RewardSettings | None,
    mean: float = 0.0,
    std: float = 1.0,
) -> torch.Tensor:
    """Shaped scores ``[B]`` (float32) from raw reward-model scores ``[B]``.

    In order: standardise with the RM's recorded ``mean`` / ``std`` (``settings.normalize``),
    divide by the response length ``lengths`` ``[B]`` (``settings.length_normalize``), clip to
    ``[-clip, clip]``, and give rows without EOS (``has_eos`` ``[B]`` bool) the fixed
    ``missing_eos_penalty``. ``settings=None`` (a custom scorer) leaves the scores as they are.
    """
    scores = raw.float()
    if settings is None:
        return scores
    if settings.normalize:
        scores = (scores - mean) / max(std, 1e-8)
    if settings.length_normalize:
        scores = scores / lengths.clamp(min=1).float()
    if settings.clip is not None:
        scores = scores.clamp(-settings.clip, settings.clip)
    if settings.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, torch.full_like(scores, settings.missing_eos_penalty))
    return scores
