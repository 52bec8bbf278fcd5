"""PPO losses: the clipped policy loss and the clipped value loss.

References: Schulman et al. 2017 (PPO); Huang et al., "The N (and N+) implementation
details of RLHF with PPO" (token-level masked mean, clipped value loss with factor 0.5,
clipfrac / approx_kl statistics).
"""

from __future__ import annotations

import torch

from rlhf.masks import bool_mask, masked_mean

__all__ = ["policy_loss", "value_loss"]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise).

    ``ratio = exp(logp - old_logp)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``, the mean
    taken over all valid tokens of the batch (token-level aggregation).

    Args:
        logp: ``[b, t]`` log-probs of the taken tokens under the current policy (with grad).
        old_logp: ``[b, t]`` log-probs under the rollout policy (detached here).
        advantages: ``[b, t]`` advantages (detached here; whiten beforehand if desired).
        mask: ``[b, t]`` bool/float; non-zero = valid.
        clip_range: ``eps``.

    Returns:
        ``(loss, stats)``: ``loss`` is a scalar; ``stats`` holds detached scalars

        * ``clipfrac``: fraction of valid tokens where the clipped term is the active one
          (``-A * clip(ratio) > -A * ratio``; those tokens get zero gradient),
        * ``approx_kl``: masked mean of ``0.5 * (logp - old_logp)**2`` (k2),
        * ``approx_kl_k3``: masked mean of ``(ratio - 1) - log(ratio)`` (k3 of KL(old||new)),
        * ``ratio_mean``, ``ratio_max``: over valid tokens (``ratio_max = 0`` if none).
    """
    m = bool_mask(mask, logp)
    log_ratio = logp - old_logp.detach()
    # garbage at invalid positions must not produce inf/nan that poisons gradients
    log_ratio = torch.where(m, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(logp.dtype), m).detach(),
            "approx_kl": masked_mean(0.5 * lr.square(), m),
            "approx_kl_k3": masked_mean(torch.expm1(lr) - lr, m),
            "ratio_mean": masked_mean(r, m),
            "ratio_max": torch.where(m, r, torch.zeros_like(r)).max(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss (to minimise).

    ``v_clip = clip(values, old_values - eps, old_values + eps)``;
    ``loss = 0.5 * masked_mean(max((values - R)**2, (v_clip - R)**2))``.

    Args:
        values: ``[b, t]`` current value predictions (with grad).
        old_values: ``[b, t]`` value predictions at rollout time (detached here).
        returns: ``[b, t]`` targets ``R`` (detached here).
        mask: ``[b, t]`` bool/float; non-zero = valid.
        clip_range: ``eps`` (absolute, in value units).

    Returns:
        ``(loss, stats)``; ``stats["clipfrac"]`` = fraction of valid tokens where the
        clipped error is the larger (active) one.
    """
    m = bool_mask(mask, values)
    old = old_values.detach()
    ret = returns.detach()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)
    old = torch.where(m, old, zero)
    ret = torch.where(m, ret, zero)
    v_clipped = old + torch.clamp(v - old, -clip_range, clip_range)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), m)}
    return loss, stats
