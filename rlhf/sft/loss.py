"""Next-token loss restricted to response tokens."""

from __future__ import annotations

from collections.abc import Callable

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


def labelled_nll(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`response_nll` from the decoder's hidden states, with the LM head run only on the
    positions that predict a labelled token.

    Prompt and padding positions never reach the head, so neither their ``[vocab]`` logits nor
    their gradients exist: on a 49k vocabulary with half the tokens in the prompt, that halves
    the step's largest tensors and the head's matmuls. Equal to ``response_nll(lm_head(hidden),
    labels)`` up to float rounding.

    Args:
        hidden: ``[batch, seq, hidden]`` final hidden states for ``input_ids``.
        labels: ``[batch, seq]`` token ids, ``-100`` on prompt and padding tokens.
        lm_head: maps ``[n, hidden]`` to ``[n, vocab]`` logits.

    Returns:
        ``(nll_sum, n_tokens)``: scalars.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    logits = lm_head(hidden[keep])  # boolean indexing gathers a contiguous [n, hidden]
    nll = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return nll, keep.sum()
