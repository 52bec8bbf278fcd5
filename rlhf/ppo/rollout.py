"""The in-loop rollout buffer of one PPO iteration."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Rollout:
    """The in-loop buffer of one PPO iteration. ``B`` sequences, ``R`` response columns.

    Attributes:
        input_ids, attention_mask: ``[B, P + R]``; the mask is 0 on padding and after EOS.
        response_start: ``P``, the column where responses start.
        response_mask: ``[B, R]`` 1 on response tokens up to and including the first EOS.
        logprobs, ref_logprobs: ``[B, R]`` policy (old) and reference log-probs (temperature
            scaled like sampling).
        values: ``[B, R]`` critic values at rollout time (zeros when critic-free).
        raw_scores: ``[B]`` reward-model scores; scores: ``[B]`` after shaping.
        kl: ``[B, R]`` per-token KL estimate; rewards: ``[B, R]`` per-token rewards.
        advantages, returns: ``[B, R]``.
        has_eos: ``[B]`` whether the response ended with EOS.
        entropy: ``[B, R]`` per-token entropy of the rollout policy (temperature-scaled, before
            any top-k / top-p truncation).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    has_eos: torch.Tensor
    entropy: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` of every per-sequence tensor (a minibatch)."""
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **picked)
