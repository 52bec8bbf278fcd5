"""The metrics a PPO iteration logs (names as in DESIGN.md), from its rollout and update."""

from __future__ import annotations

import math

from rlhf.masks import masked_mean, masked_sum
from rlhf.ppo.advantages import explained_variance
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.samples import response_ids


def rollout_metrics(r: Rollout, prefix: str = "", gold_scores: list[float] | None = None) -> dict[str, float]:
    """Reward, KL and response metrics of a rollout; ``gold/mean`` too when ``gold_scores``
    (one per sequence) are given."""
    kl_per_seq = masked_sum(r.kl, r.response_mask, dim=1)
    metrics = {
        f"{prefix}reward/mean": float(r.raw_scores.mean()),
        f"{prefix}reward/std": float(r.raw_scores.std()) if len(r) > 1 else 0.0,
        f"{prefix}reward/normalized_mean": float(r.scores.mean()),
        f"{prefix}reward/normalized_std": float(r.scores.std()) if len(r) > 1 else 0.0,
        f"{prefix}kl/mean": float(kl_per_seq.mean()),
        f"{prefix}response/length": float(r.response_mask.sum(dim=1).float().mean()),
        f"{prefix}response/eos_frac": float(r.has_eos.float().mean()),
        # The rollout policy's mean per-token entropy (temperature-scaled, before top-k/top-p).
        f"{prefix}policy/entropy": float(masked_mean(r.entropy, r.response_mask)),
    }
    if gold_scores is not None:
        metrics[f"{prefix}gold/mean"] = sum(gold_scores) / max(1, len(gold_scores))
    return metrics


def gold_scores(gold: str, tokenizer, rollout: Rollout) -> list[float]:  # noqa: ANN001 (a tokenizer)
    """The gold function ``gold`` (:data:`rlhf.gold.GOLD_FUNCTIONS`) on each decoded response."""
    from rlhf.gold import gold_function

    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids(rollout)]
    return gold_function(gold)(texts)


def update_metrics(stats: dict[str, float], rollout: Rollout, uses_critic: bool) -> dict[str, float]:
    """Policy and value metrics of an update's statistics (:func:`rlhf.ppo.update.ppo_update`);
    NaN where every minibatch step was skipped."""
    nan = math.nan
    metrics = {
        "policy/ratio": stats.get("ratio_mean", nan),
        "policy/ratio_max": stats.get("ratio_max", nan),
        "policy/clipfrac": stats.get("clipfrac", nan),
        "policy/approx_kl": stats.get("approx_kl", nan),
        "policy/loss": stats.get("policy_loss", nan),
        "policy/early_stopped": stats["early_stopped"],
        "nonfinite/skipped": stats["skipped"],
    }
    if uses_critic:
        metrics["value/loss"] = stats.get("value_loss", nan)
        metrics["value/clipfrac"] = stats.get("value_clipfrac", nan)
        metrics["value/explained_var"] = float(
            explained_variance(rollout.values, rollout.returns, rollout.response_mask)
        )
    return metrics
