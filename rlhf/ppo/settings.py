"""Typed PPO settings, grouped the way the algorithm is: reward, KL, updates (sampling is
:class:`rlhf.generation.SamplingSettings`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from rlhf.models.ensemble import EnsembleObjective, check_ensemble

# The names of the LoRA adapters PPO puts on the base: the policy, and an ``adapter`` critic.
POLICY = "policy"
VALUE = "value"


@dataclass
class RewardSettings:
    """Where scores come from and how they are shaped.

    Args:
        model: the reward-model stage's output directory, or a list of several: an ensemble
            (:mod:`rlhf.models.ensemble`; each member standardised with its own statistics,
            then combined by ``ensemble``).
        ensemble: how an ensemble's members combine: ``mean``, ``uncertainty``
            (``mean - ensemble_penalty * std`` over the members) or ``min`` (the worst member).
        ensemble_penalty: the weight of the members' std under ``uncertainty``.
        normalize: standardise scores with the mean/std the RM stage recorded (an ensemble's
            members are always standardised before they are combined).
        clip: clip the (normalised) score to ``[-clip, clip]``; ``None`` disables.
        missing_eos_penalty: score given to responses that never emit EOS (replaces the RM
            score); ``None`` keeps the RM score.
        length_normalize: divide the score by the response length in tokens (guards against
            length gaming).
        share_base: when the RM was trained as a LoRA adapter on the policy's base, load it as
            an adapter on that base instead of a second model.
    """

    model: str | list[str]
    ensemble: EnsembleObjective = "mean"
    ensemble_penalty: float = 1.0
    normalize: bool = True
    clip: float | None = 5.0
    missing_eos_penalty: float | None = -1.0
    length_normalize: bool = False
    share_base: bool = True

    def __post_init__(self) -> None:
        check_ensemble(self.models, self.ensemble, self.ensemble_penalty)

    @property
    def models(self) -> list[str]:
        """The reward model directories (one, or an ensemble's members)."""
        return [self.model] if isinstance(self.model, str) else list(self.model)


@dataclass
class KLSettings:
    """Per-token KL penalty ``-coef * KL_t``; ``adaptive`` uses Ziegler et al.'s controller."""

    coef: float = 0.05
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000
    estimator: Literal["k1", "k2", "k3"] = "k1"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.coef) and self.coef >= 0):
            raise ValueError(
                f"kl.coef must be a finite number >= 0 (got {self.coef}): a negative coefficient "
                "rewards moving away from the reference model"
            )


@dataclass
class UpdateSettings:
    """The optimisation part of an iteration.

    Args:
        ppo_epochs: passes over the rollout buffer per iteration.
        minibatch_size: sequences per optimizer step (``None``: the whole buffer).
        micro_batch_size: sequences per forward/backward (gradient accumulation inside a
            minibatch; ``None``: the minibatch).
        clip_range: policy ratio clip epsilon.
        value_clip_range: value clip epsilon.
        vf_coef: value loss weight.
        entropy_coef: entropy bonus weight.
        max_grad_norm: gradient clipping norm (``None`` disables).
        target_approx_kl: stop the epoch loop early once the minibatch approximate KL exceeds
            this (``None`` disables).
        gamma: GAE discount.
        lam: GAE lambda.
        whiten_advantages: GAE: standardise advantages over the buffer's valid tokens;
            critic-free estimators: divide the sequence advantages by their std over the
            buffer, without re-centring (order, signs and group sums kept).
        max_nonfinite_steps: a minibatch update whose rewards, advantages, returns, loss or
            gradient are not finite is skipped (and counted); this many skipped in a row stop
            the run with an error naming what went non-finite (``0``: never stop).
        old_logprobs: where the rollout's (old) log-probs, its logged entropy and a shared
            critic's values come from. ``generation``: recorded while sampling, from the
            logits and hidden states the KV-cached decoding computed anyway (no second policy
            pass; what TRL does). ``recompute``: one no-grad policy pass over the sampled
            sequences, the update's own computation, so the first epoch's ratios start at
            exactly 1 and the KL at a zero-initialised adapter is exactly 0. ``auto``:
            ``generation`` when the policy computes in float32 without autocast, where the two
            differ only by float rounding, else ``recompute``: in half precision the KV-cached
            and full passes differ enough to show as KL at the first iteration (measured in
            docs/performance-notes.md). An ``adapter`` critic always makes its own value pass;
            a ``hydra`` critic runs its branch on the lower layer's hidden states recorded in
            the same pass (generation's, or the recomputed one's).
    """

    ppo_epochs: int = 4
    minibatch_size: int | None = None
    micro_batch_size: int | None = None
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    max_grad_norm: float | None = 1.0
    target_approx_kl: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_nonfinite_steps: int = 16
    old_logprobs: Literal["auto", "generation", "recompute"] = "auto"

    def __post_init__(self) -> None:
        if self.old_logprobs not in ("auto", "generation", "recompute"):
            raise ValueError(f"old_logprobs must be 'auto', 'generation' or 'recompute' (got {self.old_logprobs!r})")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0 (got {self.max_nonfinite_steps})")
        if self.ppo_epochs < 1:
            raise ValueError(f"update.ppo_epochs must be >= 1 (got {self.ppo_epochs})")
        for key in ("minibatch_size", "micro_batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"update.{key} must be >= 1 or null (got {value})")

    def check_rollout(self, batch_size: int | None, samples_per_prompt: int) -> None:
        """Refuse a ``minibatch_size`` larger than the rollout (``batch_size`` prompts times
        ``samples_per_prompt`` sequences; ``batch_size`` ``None``: unknown, not checked): it
        would silently be one minibatch of the whole rollout."""
        if batch_size is None or self.minibatch_size is None:
            return
        rollout = batch_size * samples_per_prompt
        if self.minibatch_size > rollout:
            raise ValueError(
                f"update.minibatch_size ({self.minibatch_size}) is larger than the rollout: "
                f"data.init_args.batch_size ({batch_size}) x model.init_args.samples_per_prompt "
                f"({samples_per_prompt}) = {rollout} sequences; lower it to at most {rollout} "
                "(or null for the whole rollout)"
            )
