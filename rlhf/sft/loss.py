"""Next-token loss restricted to response tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.data.collate import IGNORE_INDEX


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over labelled tokens.

    Args:
        logits: ``[batch, seq, vocab]`` model outputs for ``input_ids``.
        labels: ``[batch, seq]`` token ids, ``-100`` on prompt and padding tokens.

    Returns:
        ``(nll_sum, n_tokens)``: scalars; position ``t`` predicts ``labels[:, t + 1]``.
    """
    # Shift the labels, not the logits: ``logits[:, :-1]`` is strided, and flattening it
    # would copy the whole ``[batch, seq, vocab]`` tensor (the largest of the step).
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(
        logits.flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, (targets != IGNORE_INDEX).sum()
