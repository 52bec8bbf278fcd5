"""KL penalty: per-token estimators, reward shaping and KL-coefficient controllers.

References:
    * Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
      (``lm-human-preferences``): reward ``R = score - beta * KL`` and the adaptive
      (proportional) KL controller.
    * Huang et al., "The N (and N+) implementation details of RLHF with PPO": the
      KL penalty is applied per token, the score is added on the last response token.
    * J. Schulman, "Approximating KL Divergence" (2020): the k1/k2/k3 estimators.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from rlhf.masks import bool_mask, last_valid_index

__all__ = [
    "kl_estimate",
    "masked_kl",
    "update_from_sequences",
    "per_token_rewards",
    "FixedKLController",
    "AdaptiveKLController",
]

KLKind = Literal["k1", "k2", "k3"]


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from log-probs of tokens sampled from ``pi``.

    With ``log_r = logp - ref_logp``:

    * ``"k1"``: ``log_r`` -- unbiased, high variance, can be negative per token
      (what the PPO reward penalty of Ziegler et al. / TRL uses).
    * ``"k2"``: ``0.5 * log_r**2`` -- biased, low variance, ``>= 0``.
    * ``"k3"``: ``exp(-log_r) - 1 + log_r`` -- unbiased, low variance, ``>= 0``
      (computed with ``expm1`` and clamped at 0 against rounding; may overflow to ``inf``
      if ``ref_logp - logp`` is huge).

    Args:
        logp: ``[b, t]`` log-probs of the sampled tokens under the policy.
        ref_logp: ``[b, t]`` log-probs of the same tokens under the reference model.
        kind: which estimator.

    Returns:
        ``[b, t]`` per-token estimate (not masked: mask it yourself, e.g. with
        :func:`per_token_rewards` or :func:`rlhf.masks.masked_mean`).
    """
    log_r = logp - ref_logp
    if kind == "k1":
        return log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        neg = -log_r  # log(ref / pi)
        return (torch.expm1(neg) - neg).clamp_min(0.0)
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1', 'k2' or 'k3'")


def masked_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """:func:`kl_estimate` ``[b, t]`` with invalid positions (``mask == 0``) set to exactly 0:
    selected away, not multiplied, so an inf/NaN estimate in padding stays out."""
    kl = kl_estimate(logp, ref_logp, kind)
    return torch.where(bool_mask(mask, kl), kl, torch.zeros((), dtype=kl.dtype, device=kl.device))


def per_token_rewards(
    score: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float | torch.Tensor,
) -> torch.Tensor:
    """Shaped per-token rewards: ``-beta * kl`` on every valid token, plus ``score`` on the last one.

    Args:
        score: ``[b]`` scalar reward-model score per sequence (after any EOS penalty /
            normalisation).
        kl: ``[b, t]`` per-token KL estimate (see :func:`kl_estimate`).
        mask: ``[b, t]`` bool/float; non-zero = valid response token.  The score goes on
            the last valid token of each row (right or left padding both work); rows with
            no valid token get all zeros.
        beta: KL coefficient (float or 0-dim tensor, e.g. ``controller.value``).

    Returns:
        ``[b, t]`` rewards in ``kl``'s dtype; ``0`` at invalid positions.
    """
    m = bool_mask(mask, kl)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(m, -beta * kl, zero)
    last = last_valid_index(m)
    has_valid = last >= 0
    add = torch.where(has_valid, score.to(kl.dtype), zero)
    return rewards.scatter_add(1, last.clamp_min(0).unsqueeze(1), add.unsqueeze(1))


class FixedKLController:
    """Constant KL coefficient (``update`` is a no-op).

    Attributes:
        value: the coefficient ``beta``.
    """

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op; present for interface compatibility with :class:`AdaptiveKLController`."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state for checkpoints: ``{"value": float}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


class AdaptiveKLController:
    """Adaptive KL controller of Ziegler et al. 2019 (proportional control in log space).

    After each batch::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    Following ``lm-human-preferences`` (and the N-implementation-details reproduction),
    ``current_kl`` is the batch mean of the *per-sequence* KL (sum over response tokens,
    so ``target`` is in nats per sequence) and ``n_steps`` is the number of sequences
    (episodes) in the batch.

    Attributes:
        value: current coefficient ``beta``.
        target: target KL (nats per sequence).
        horizon: number of samples over which the error is corrected.
    """

    def __init__(self, init_coef: float = 0.15, target: float = 6.0, horizon: int = 10000) -> None:
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Update ``value`` from the measured KL of the last batch.

        Args:
            current_kl: mean per-sequence KL of the batch (float or 0-dim tensor).
            n_steps: number of sequences in the batch.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Plain-python state for checkpoints: ``{"value", "target", "horizon"}``."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (``value``, and ``target``/``horizon`` if present)."""
        self.value = float(state["value"])
        if "target" in state:
            self.target = float(state["target"])
        if "horizon" in state:
            self.horizon = float(state["horizon"])

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


def update_from_sequences(
    controller: FixedKLController | AdaptiveKLController,
    kl_per_sequence: torch.Tensor,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> None:
    """Update ``controller`` with the mean per-sequence KL and the sequence count of the whole
    rollout: ``kl_per_sequence`` ``[b]`` is this process's share, ``sum_over_processes`` sums a
    tensor over the processes of a multi-process run (identity for one), so every process moves
    beta alike. A non-finite mean (it would poison the controller) leaves it as it is."""
    local = torch.stack([
        kl_per_sequence.detach().double().sum(),
        torch.tensor(float(kl_per_sequence.numel()), dtype=torch.float64, device=kl_per_sequence.device),
    ])
    total_kl, sequences = sum_over_processes(local).tolist()
    if sequences > 0 and math.isfinite(total_kl / sequences):
        controller.update(total_kl / sequences, int(sequences))
