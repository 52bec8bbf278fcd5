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
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, (targets != IGNORE_INDEX).sum()
