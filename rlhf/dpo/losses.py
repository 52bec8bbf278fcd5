"""DPO-family losses on sequence log-probs of preference pairs: DPO, conservative DPO, IPO.

Every input is ``[P]``, one entry per pair: the log-prob of the chosen (``*_chosen``) or
rejected (``*_rejected``) response under the trained policy (``policy_*``) or the frozen
reference (``reference_*``), summed over the response tokens. The pair's log-ratio difference

    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)

is what every loss here reads; ``beta * (policy - reference)`` is a response's implicit reward.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo"]


def log_ratio_difference(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
) -> torch.Tensor:
    """``h`` ``[P]`` (float32): chosen log-ratio minus rejected log-ratio, policy over reference."""
    for t in (policy_rejected, reference_chosen, reference_rejected):
        if t.shape != policy_chosen.shape:
            raise ValueError(f"log-probs must share one [P] shape, got {policy_chosen.shape} and {t.shape}")
    if policy_chosen.dim() != 1:
        raise ValueError(f"log-probs must be [P], got {tuple(policy_chosen.shape)}")
    return (policy_chosen.float() - reference_chosen.float()) - (
        policy_rejected.float() - reference_rejected.float()
    )


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss ``[P]`` from ``h`` ``[P]`` (Rafailov et al. 2023):
    ``-(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)``.

    ``label_smoothing`` ``eps`` > 0 is conservative DPO (cDPO, Mitchell 2023): each label is
    taken as wrong with probability ``eps``; ``eps = 0`` is plain DPO.
    """
    logits = beta * h
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def ipo_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss ``[P]`` (Azar et al. 2023): ``(h - 1 / (2 * beta))**2``; ``beta`` is
    the paper's ``tau`` (the regression target of ``h`` is ``1 / (2 tau)``)."""
    return (h - 1.0 / (2.0 * beta)) ** 2


def reward_stats(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Detached scalar means over the ``[P]`` pairs of the implicit rewards
    ``reward_chosen = beta * (policy_chosen - reference_chosen)`` and ``reward_rejected``,
    their ``margin`` (chosen minus rejected) and ``accuracy`` (chosen reward > rejected; a
    tie counts as wrong)."""
    with torch.no_grad():
        chosen = beta * (policy_chosen.float() - reference_chosen.float())
        rejected = beta * (policy_rejected.float() - reference_rejected.float())
        return {
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
            "margin": (chosen - rejected).mean(),
            "accuracy": (chosen > rejected).float().mean(),
        }


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the pairs and the :func:`reward_stats` of the summed log-probs.

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: ``[P]`` summed
            response log-probs.
        beta: inverse temperature of the implicit reward (DPO), or IPO's ``tau``.
        loss_type: ``"sigmoid"`` (DPO; cDPO with ``label_smoothing``) or ``"ipo"``.
        label_smoothing: cDPO's label-noise rate ``eps`` in ``[0, 0.5)``; sigmoid loss only.
        chosen_lengths, rejected_lengths: ``[P]`` response lengths in tokens. IPO divides each
            log-prob by its length when they are given (per-token-averaged log-probs, as the
            IPO authors advise and TRL does); the sigmoid loss ignores them.

    Returns:
        ``(loss, stats)``: ``loss`` a float32 scalar; ``stats`` the detached :func:`reward_stats`
        (always of the summed log-probs, so metrics mean the same for every loss type) plus
        ``loss``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    logps = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    if loss_type == "sigmoid":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        per_pair = sigmoid_loss(log_ratio_difference(*logps), beta, label_smoothing)
    elif loss_type == "ipo":
        if label_smoothing:
            raise ValueError("label_smoothing is for the sigmoid loss (cDPO), not IPO")
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
        if chosen_lengths is not None:
            c, r = chosen_lengths.clamp(min=1).float(), rejected_lengths.clamp(min=1).float()
            logps = (policy_chosen / c, policy_rejected / r, reference_chosen / c, reference_rejected / r)
        per_pair = ipo_loss(log_ratio_difference(*logps), beta)
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    loss = per_pair.mean()
    stats = reward_stats(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)
    stats["loss"] = loss.detach()
    return loss, stats
