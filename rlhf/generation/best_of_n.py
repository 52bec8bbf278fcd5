"""Best-of-n sampling: draw ``n`` responses per prompt and keep the one a scorer ranks highest
(the reference frontier every trained policy is compared with)."""

from __future__ import annotations

import torch
from torch import nn

from rlhf.generation.responses import Scorer, assemble_sequences, sample_responses
from rlhf.generation.settings import SamplingSettings


def prompt_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[n_prompts * k]`` per-sample values (a prompt's ``k`` samples contiguous) as
    ``[n_prompts, k]``; ``ValueError`` for anything else."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [n_prompts * k], got shape {tuple(scores.shape)}")
    if k < 1 or scores.numel() % k != 0:
        raise ValueError(f"scores has {scores.numel()} elements, not a multiple of k={k}")
    return scores.view(-1, k)


def best_of_n_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Index of the best-scoring sample of each prompt.

    Args:
        scores: ``[n_prompts * k]``, the ``k`` samples of one prompt contiguous.
        k: samples per prompt.

    Returns:
        ``[n_prompts]`` int64 indices into ``scores`` (flat); ties -> first sample.
    """
    s = prompt_groups(scores, k)
    offsets = torch.arange(s.shape[0], device=scores.device) * k
    return s.argmax(dim=1) + offsets


@torch.no_grad()
def best_of_n(
    model: nn.Module,
    scorer: Scorer,
    tokenizer,  # noqa: ANN001 (a transformers tokenizer)
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingSettings,
    n: int,
) -> tuple[list[str], torch.Tensor]:
    """Sample ``n`` responses per left-padded prompt ``[B, P]`` from ``model`` and keep the one
    ``scorer`` ranks highest.

    Returns the ``B`` chosen responses as text and their raw scores ``[B]``.
    """
    model.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = input_ids.repeat_interleave(n, dim=0)
    prompt_mask = attention_mask.repeat_interleave(n, dim=0)
    responses = sample_responses(model, prompt_ids, prompt_mask, sampling, eos, pad)
    ids, mask, response_mask, _ = assemble_sequences(prompt_ids, prompt_mask, responses, eos, pad)
    scores = scorer(ids, mask).float()
    best = best_of_n_indices(scores, n)
    start = prompt_ids.shape[1]
    texts = [tokenizer.decode(ids[i, start:][response_mask[i].bool()], skip_special_tokens=True) for i in best.tolist()]
    return texts, scores[best]
