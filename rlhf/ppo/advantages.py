"""Advantage estimators: GAE (PPO), RLOO, GRPO, the choice between them, and explained variance.

References:
    * Schulman et al. 2016, GAE; Huang et al., "The N (and N+) implementation details of
      RLHF with PPO" (GAE over response tokens, value after the last token = 0).
    * Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
      Learning from Human Feedback in LLMs" (RLOO).
    * Shao et al. 2024, "DeepSeekMath" (GRPO, outcome supervision).
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf.generation.best_of_n import prompt_groups
from rlhf.masks import bool_mask, masked_sum, masked_var, masked_whiten
from rlhf.ppo.kl import per_token_rewards

Estimator = Literal["gae", "rloo", "grpo", "reinforce"]
CRITIC_FREE = ("rloo", "grpo", "reinforce")
# Estimators that compare a prompt's samples with each other (need samples_per_prompt >= 2).
GROUPED = ("rloo", "grpo")

__all__ = [
    "gae",
    "rloo_advantages",
    "grpo_advantages",
    "sequence_to_token_advantages",
    "explained_variance",
    "compute_advantages",
    "reinforce_advantages",
    "scale_sequence_advantages",
]


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens, right to left.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    where ``t + 1`` means the *next valid* token and ``V``/``A`` after the last valid
    token are ``0`` (the episode ends at EOS / truncation; no bootstrap).

    Masked positions contribute nothing: their rewards and values are ignored, and the
    recursion state (``V_{t+1}``, ``A_{t+1}``) is carried across them unchanged
    (``state = m_t * new + (1 - m_t) * state``).  For the usual contiguous block of valid
    tokens (right or left padding) this is exactly "value after the last valid token = 0";
    an interior gap (e.g. masked environment tokens) is treated as transparent, not as an
    episode boundary, and no discount is applied across it.

    ``lam = 1`` gives ``A_t = discounted return-to-go - V_t``; ``lam = 0`` gives the
    one-step TD error.  Pass detached tensors (this function does not detach).

    Args:
        rewards: ``[b, t]`` per-token rewards (see :func:`rlhf.ppo.kl.per_token_rewards`).
        values: ``[b, t]`` value estimates ``V(s_t)`` from the rollout.
        mask: ``[b, t]`` bool/float; non-zero = valid response token.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``[b, t]`` with ``returns = advantages + values``;
        ``0`` at invalid positions.  Advantages are not whitened (use
        :func:`rlhf.masks.masked_whiten`).
    """
    m = bool_mask(mask, rewards)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(m, rewards, zero)
    v = torch.where(m, values.to(rewards.dtype), zero)
    mf = m.to(rewards.dtype)
    b, t_len = rewards.shape
    next_value = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    last_adv = torch.zeros_like(next_value)
    out: list[torch.Tensor] = [zero] * t_len  # filled below
    for t in range(t_len - 1, -1, -1):
        m_t = mf[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * last_adv
        last_adv = m_t * adv_t + (1 - m_t) * last_adv
        next_value = m_t * v[:, t] + (1 - m_t) * next_value
        out[t] = adv_t
    advantages = torch.where(m, torch.stack(out, dim=1), zero) if t_len else torch.zeros_like(r)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024).

    ``A_i = s_i - mean_{j != i} s_j`` over the ``k`` samples of the same prompt
    (``= k / (k - 1) * (s_i - mean_j s_j)``).

    Args:
        scores: ``[n_prompts * k]`` sequence scores; the ``k`` samples of one prompt are
            contiguous (``[p0s0, p0s1, ..., p0s(k-1), p1s0, ...]``).
        k: samples per prompt, ``>= 2``.

    Returns:
        ``[n_prompts * k]`` advantages (sum to zero within each prompt).
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got k={k}")
    s = prompt_groups(scores, k)
    baseline = (s.sum(dim=1, keepdim=True) - s) / (k - 1)
    return (s - baseline).reshape(-1)


def grpo_advantages(
    scores: torch.Tensor,
    k: int,
    eps: float = 1e-6,
    scale: bool = True,
    unbiased: bool = False,
) -> torch.Tensor:
    """GRPO outcome-supervision advantages (Shao et al. 2024, DeepSeekMath, eq. for ``r~_i``).

    ``A_i = (s_i - mean(group)) / (std(group) + eps)``.  DeepSeekMath normalises by "the
    standard deviation of the group's rewards"; by default this is the *population* std
    (``unbiased=False``, divide by ``k``), i.e. the std of the ``G`` rewards as a set.
    TRL / verl use the Bessel-corrected std (``unbiased=True``); pass that to match them.
    ``scale=False`` only centres (the "Dr. GRPO" variant).  Groups whose scores are all
    equal get advantage ``0``.

    Args:
        scores: ``[n_prompts * k]`` sequence scores, the ``k`` samples of one prompt contiguous.
        k: group size.
        eps: added to the std.
        scale: divide by the group std.
        unbiased: Bessel correction for the std.

    Returns:
        ``[n_prompts * k]`` advantages (broadcast to tokens with
        :func:`sequence_to_token_advantages`).
    """
    s = prompt_groups(scores, k)
    centered = s - s.mean(dim=1, keepdim=True)
    if scale:
        if unbiased and k < 2:
            raise ValueError("unbiased std needs k >= 2")
        std = s.std(dim=1, keepdim=True, correction=1 if unbiased else 0)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def reinforce_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the batch-mean baseline (Williams 1992; Ahmadian et al. 2024):
    ``A_i = s_i - mean(s)``.

    Args:
        scores: ``[b]`` sequence rewards.

    Returns:
        ``[b]`` advantages (sum to zero over the batch).
    """
    return scores - scores.mean()


def scale_sequence_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide sequence advantages ``[b]`` by their standard deviation over the batch, without
    re-centring: each sequence counts once whatever its length, so the order and the signs of
    the advantages (and a group's zero sum) are kept. Fewer than two sequences, or all equal:
    returned as they are."""
    if advantages.numel() < 2:
        return advantages
    std = advantages.std(correction=0)
    return advantages / (std + eps) if float(std) > 0 else advantages


def sequence_to_token_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sequence advantages to every valid token.

    Args:
        advantages: ``[b]``.
        mask: ``[b, t]`` bool/float; non-zero = valid.

    Returns:
        ``[b, t]``: ``advantages[i]`` on the valid tokens of row ``i``, ``0`` elsewhere.
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    adv = advantages.unsqueeze(1).expand(m.shape)
    return torch.where(m, adv, torch.zeros((), dtype=advantages.dtype, device=advantages.device))


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explained variance of the value head, ``1 - Var[returns - values] / Var[returns]``.

    Variances are masked (valid tokens of the whole batch) and population (the bias
    factor cancels in the ratio).  ``1`` = perfect values, ``0`` = no better than the
    mean return, negative = worse.

    Args:
        values: ``[b, t]`` predicted values.
        returns: ``[b, t]`` value targets.
        mask: ``[b, t]`` bool/float; non-zero = valid.

    Returns:
        0-dim float tensor; ``nan`` when ``Var[returns] == 0`` (undefined, as in
        Stable-Baselines3 / CleanRL) -- log it as nan or skip it.
    """
    values = values.detach().float()
    returns = returns.detach().float()
    var_y = masked_var(returns, mask, unbiased=False)
    var_res = masked_var(returns - values, mask, unbiased=False)
    ev = 1.0 - var_res / var_y
    return torch.where(var_y > 0, ev, torch.full_like(ev, float("nan")))


def compute_advantages(
    estimator: Estimator,
    scores: torch.Tensor,
    kl: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    samples_per_prompt: int = 1,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards, advantages and returns of one rollout.

    ``gae``: the per-token reward ``-beta * kl`` plus ``scores`` on the last valid token, then
    :func:`gae` against ``values``; ``whiten`` standardises the advantages over the valid tokens
    of the batch (:func:`rlhf.masks.masked_whiten`). ``rloo`` / ``grpo`` / ``reinforce``
    (critic-free): one reward per sequence, ``score - beta * sum(kl)``, compared within each
    prompt's ``samples_per_prompt`` samples (``reinforce``: with the batch mean) and broadcast to
    its tokens; returns are zeros. There ``whiten`` only scales the sequence advantages
    (:func:`scale_sequence_advantages`): token-level whitening would re-centre them by a
    token-weighted mean, so long responses would weigh more and signs could flip.

    Args:
        scores: ``[b]`` shaped sequence scores (a prompt's samples contiguous).
        kl: ``[b, t]`` per-token KL estimates (zero on invalid tokens).
        values: ``[b, t]`` critic values (zeros when critic-free).
        mask: ``[b, t]`` response mask.

    Returns:
        ``(rewards, advantages, returns)``, each ``[b, t]``.
    """
    rewards = per_token_rewards(scores, kl, mask, beta)
    if estimator == "gae":
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        if whiten:
            advantages = masked_whiten(advantages, mask)
        return rewards, advantages, returns
    sequence_reward = scores - beta * masked_sum(kl, mask, dim=1)
    if estimator == "rloo":
        sequence_advantages = rloo_advantages(sequence_reward, samples_per_prompt)
    elif estimator == "grpo":
        sequence_advantages = grpo_advantages(sequence_reward, samples_per_prompt)
    elif estimator == "reinforce":
        sequence_advantages = reinforce_advantages(sequence_reward)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r} (gae, rloo, grpo or reinforce)")
    if whiten:
        sequence_advantages = scale_sequence_advantages(sequence_advantages)
    advantages = sequence_to_token_advantages(sequence_advantages, mask)
    return rewards, advantages, torch.zeros_like(advantages)
