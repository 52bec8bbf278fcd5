"""The PPO update: ``ppo_epochs`` passes of shuffled minibatches over one rollout buffer.

Each minibatch: check its rollout rows are finite, accumulate gradients over micro-batches
(each loss weighted by its share of the minibatch), then step the optimizer, or skip the step
when anything was not finite (:class:`rlhf.guards.NonFiniteGuard` counts skips and stops a run
that keeps making them). Multi-process runs decide every skip together, since each forward and
backward is a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from rlhf.guards import gradients_finite, join_names, nonfinite_names
from rlhf.masks import masked_mean
from rlhf.ppo.losses import policy_loss, value_loss
from rlhf.ppo.rollout import Rollout
from rlhf.timing import timed

if TYPE_CHECKING:
    from rlhf.ppo.module import PPOModule

log = logging.getLogger("rlhf.ppo")

OTHER_PROCESS = "values (on another process)"


@dataclass
class UpdateTally:
    """Running sums of the statistics of the optimizer steps an update made."""

    totals: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    early_stopped: bool = False

    def add(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.totals[key] = self.totals.get(key, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, float]:
        """Mean of each statistic over the steps made, plus ``early_stopped``,
        ``optimizer_steps`` and ``skipped``."""
        means = {key: value / self.steps for key, value in self.totals.items()}
        means["early_stopped"] = float(self.early_stopped)
        means["optimizer_steps"] = float(self.steps)
        means["skipped"] = float(self.skipped)
        return means


def shuffled_minibatches(n: int, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Row indices ``[<= size]`` of each minibatch of one epoch over ``n`` rows, freshly shuffled."""
    order = torch.randperm(n, device=device)
    for start in range(0, n, size):
        yield order[start : start + size]


def minibatch_loss(module: PPOModule, mb: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss + ``vf_coef`` * clipped value loss - ``entropy_coef`` * entropy of
    the rows ``mb`` under the current policy, and the detached statistics."""
    u = module.update_settings
    # The entropy is computed here only for an entropy bonus (the logged one is the rollout's).
    bonus = u.entropy_coef != 0
    logp, values, entropy_per_token = module.policy_forward(
        mb.input_ids, mb.attention_mask, mb.response_start, entropy=bonus, entropy_grad=bonus
    )
    pg_loss, stats = policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask, u.clip_range)
    loss = pg_loss
    if bonus:
        loss = pg_loss - u.entropy_coef * masked_mean(entropy_per_token, mb.response_mask)
    stats = {**stats, "policy_loss": pg_loss.detach()}
    if values is not None:
        vf_loss, vstats = value_loss(values, mb.values, mb.returns, mb.response_mask, u.value_clip_range)
        loss = loss + u.vf_coef * vf_loss
        stats.update(value_loss=vf_loss.detach(), value_clipfrac=vstats["clipfrac"])
    return loss, stats


def nonfinite_inputs(mb: Rollout, uses_critic: bool) -> list[str]:
    """What in a minibatch's rollout rows is NaN/inf: ``reward``, ``kl``, ``advantage``,
    ``return``, ``value`` (the last two with a critic)."""
    return nonfinite_names({
        "reward": torch.cat([mb.raw_scores.float(), mb.scores.float()]),
        "kl": mb.kl,
        "advantage": mb.advantages,
        "return": mb.returns if uses_critic else None,
        "value": mb.values if uses_critic else None,
    })


def accumulate_gradients(
    module: PPOModule, rollout: Rollout, index: torch.Tensor, micro: int
) -> tuple[dict[str, float], list[str]]:
    """Backward of the minibatch ``rollout[index]`` in micro-batches of ``micro`` rows.

    Returns the minibatch's statistics (micro-batch values weighted by their share) and what
    was not finite (empty when all was). Rows with non-finite inputs (here or on another
    process) make no backward at all; a non-finite loss is still backpropagated, so every
    process runs the same collectives, and the step is skipped afterwards.
    """
    bad = nonfinite_inputs(rollout.select(index), module.uses_critic)
    if module.trainer.strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
        bad = [OTHER_PROCESS]
    stats: dict[str, float] = {}
    if bad:
        return stats, bad
    for start in range(0, len(index), micro):
        part = rollout.select(index[start : start + micro])
        loss, part_stats = minibatch_loss(module, part)
        if not bool(torch.isfinite(loss)):
            bad = ["loss"]
        weight = len(part) / len(index)
        module.manual_backward(loss * weight)
        for key, value in part_stats.items():
            stats[key] = stats.get(key, 0.0) + float(value) * weight
    return stats, bad


def step_or_skip(module: PPOModule, bad: list[str], check_gradients: bool, where: dict[str, int]) -> bool:
    """Step the optimizer on the accumulated gradients, or skip the step (and count it) when
    ``bad`` names something non-finite, the gradient is not finite (``check_gradients``), or
    another process skips. The LR schedule moves on either way. Returns whether it stepped."""
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    if not bad and check_gradients and not gradients_finite(module.trainable_parameters()):
        bad = ["gradient"]
    if module.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        log.warning("skipped a PPO minibatch update: non-finite %s (%s)", join_names(bad),
                    ", ".join(f"{k} {v}" for k, v in where.items()))
        module.nonfinite.bad(bad or [OTHER_PROCESS], **where)
        return False
    module.nonfinite.good()
    max_norm = module.update_settings.max_grad_norm
    if max_norm is not None:
        module.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    module.check_weights_finite(where)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return True


@timed("update")
def ppo_update(module: PPOModule, rollout: Rollout) -> dict[str, float]:
    """``ppo_epochs`` passes over shuffled minibatches of ``rollout``; the mean of each statistic
    over the optimizer steps made, ``skipped`` (steps skipped as non-finite) and
    ``early_stopped`` (the approximate KL passed ``target_approx_kl``)."""
    u = module.update_settings
    n = len(rollout)
    minibatch = u.minibatch_size or n
    micro = min(u.micro_batch_size or minibatch, minibatch)
    # Under fp16 a GradScaler skips steps with inf gradients itself (and adjusts its scale).
    check_gradients = getattr(module.trainer.precision_plugin, "scaler", None) is None
    tally = UpdateTally()
    module.model.train()
    for epoch in range(u.ppo_epochs):
        for number, index in enumerate(shuffled_minibatches(n, minibatch, rollout.input_ids.device)):
            stats, bad = accumulate_gradients(module, rollout, index, micro)
            where = {"iteration": module.iteration, "epoch": epoch, "minibatch": number}
            if not step_or_skip(module, bad, check_gradients, where):
                tally.skipped += 1
                continue
            tally.add(stats)
            if u.target_approx_kl is not None and module.mean_over_processes(stats["approx_kl"]) > u.target_approx_kl:
                tally.early_stopped = True
                break
        if tally.early_stopped:
            break
    module.model.eval()
    return tally.means()
