"""ODIN's length-decoupling losses (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates
Hacking in RLHF"), as pure functions.

The reward model gets two linear heads on the same last hidden state: a quality head ``q`` and
a length head ``l``. Their sum is trained with the ranking loss; on top, the length head is
pushed to correlate with the response length and the quality head to be uncorrelated with it,
and the two heads' weights to be orthogonal. Policy optimisation then uses ``q`` alone.
"""

from __future__ import annotations

import torch


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``x`` and ``y`` (both ``[N]``), in float32; 0 when either is
    constant (``eps`` keeps the gradient finite near that point)."""
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"x and y must both be [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum() + eps)


def length_decorrelation_loss(
    quality: torch.Tensor, length_scores: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``|corr(q, L)| - corr(l, L)`` over a batch of responses.

    Args:
        quality: ``[N]`` the quality head's scores.
        length_scores: ``[N]`` the length head's scores.
        lengths: ``[N]`` each response's length in tokens.

    Returns:
        ``(loss, stats)``: a scalar; detached ``quality_length_corr`` and
        ``length_head_corr``.
    """
    lengths = lengths.to(quality.device).float()
    corr_q, corr_l = pearson(quality, lengths), pearson(length_scores, lengths)
    loss = corr_q.abs() - corr_l
    return loss, {"quality_length_corr": corr_q.detach(), "length_head_corr": corr_l.detach()}


def orthogonality_loss(quality_weight: torch.Tensor, length_weight: torch.Tensor) -> torch.Tensor:
    """``|w_q . w_l|``: the heads' weight vectors (each ``[1, hidden]`` or ``[hidden]``) kept
    orthogonal, so the two read different directions of the hidden state."""
    return (quality_weight.float().flatten() * length_weight.float().flatten()).sum().abs()
