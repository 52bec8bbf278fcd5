"""The in-loop rollout buffer of one PPO iteration, and where its old log-probs come from."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from rlhf.models.forward import causal_lm_of


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


def logprobs_from_generation(choice: str, model: nn.Module, trainer_precision: str | None, device_type: str) -> bool:
    """Whether a rollout takes its old log-probs (and entropy, and shared-critic inputs) from
    generation instead of a second policy pass (``update.old_logprobs``: ``generation``,
    ``recompute`` or ``auto``). ``auto`` takes them from generation only when the policy
    computes in float32/float64: weights in full precision, no autocast, and a full-precision
    trainer (``trainer_precision``; FSDP's mixed precision casts the weights themselves)."""
    if choice != "auto":
        return choice == "generation"
    if trainer_precision is not None and "16" in trainer_precision:
        return False
    compute = causal_lm_of(model).get_input_embeddings().weight.dtype
    return compute in (torch.float32, torch.float64) and not torch.is_autocast_enabled(device_type)
