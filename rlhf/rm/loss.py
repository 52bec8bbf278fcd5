"""Reward-model losses: Bradley-Terry on score differences, with optional margin and centering."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
    all_scores: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise Bradley-Terry loss ``mean(-log sigmoid(r_c - r_r - margin))``.

    Args:
        chosen: ``[P]`` scores of the preferred completions.
        rejected: ``[P]`` scores of the dispreferred completions (pair ``i`` is
            ``chosen[i]`` vs ``rejected[i]``).
        margin: ``[P]`` or ``None``: required score gap per pair (the Llama-2 margin loss);
            ``None`` or zeros give the plain Bradley-Terry loss.
        center_coef: weight of the reward-centering term ``center_coef * mean(all_scores**2)``
            (Eisenstein et al. 2023), which pins the otherwise free score offset near 0.
        all_scores: ``[N]`` scores the centering term is taken over (each sequence once);
            defaults to ``cat(chosen, rejected)``. Unused when ``center_coef == 0``.

    Returns:
        ``(loss, stats)``: ``loss`` a scalar (dtype of the scores, computed in fp32);
        ``stats`` detached scalars ``bt_loss``, ``center_loss``, ``accuracy`` (ties count as
        wrong) and ``margin`` (mean ``r_c - r_r``).
    """
    if chosen.shape != rejected.shape or chosen.dim() != 1:
        raise ValueError(f"chosen and rejected must both be [P], got {chosen.shape}, {rejected.shape}")
    diff = chosen.float() - rejected.float()
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin must be [P] like chosen, got {margin.shape}")
        logits = diff - margin.to(diff)
    else:
        logits = diff
    bt = -F.logsigmoid(logits).mean()
    center = diff.new_zeros(())
    if center_coef:
        scores = torch.cat([chosen, rejected]) if all_scores is None else all_scores
        center = scores.float().pow(2).mean()
    loss = bt + center_coef * center
    stats = {
        "bt_loss": bt.detach(),
        "center_loss": center.detach(),
        "accuracy": (diff > 0).float().mean().detach(),
        "margin": diff.mean().detach(),
    }
    return loss, stats
