"""Where the responses are in a preference batch, and which pairs cannot be trained on.

A preference batch (:class:`rlhf.data.collate.PreferenceCollator`) holds every completion of
each prompt group once, right-padded: ``input_ids``/``attention_mask`` ``[N, T]`` with row
``n`` = prompt + completion; ``chosen_index``/``rejected_index`` ``[P]`` rows of the pairs;
``group`` ``[N]``. :class:`rlhf.dpo.data.DPODataModule` adds ``prompt_length`` ``[N]``.
"""

from __future__ import annotations

import torch


def group_prefix_lengths(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """``[N]``: for each row, the length of the token prefix that every row of its group
    shares, capped so each row keeps at least its last token.

    A stand-in for the prompt length when a batch has no ``prompt_length``: every completion
    of a group follows the same prompt ids, so the shared prefix is the prompt plus any
    response tokens all completions open with. Those shared response tokens have the same
    context in every row, hence the same log-prob under any model: they cancel in every
    chosen-minus-rejected difference (the DPO loss and rewards), but not in per-response
    log-probs or in lengths (IPO's per-token average).
    """
    n, _ = input_ids.shape
    rows = torch.arange(n, device=input_ids.device)
    groups = int(group.max()) + 1 if n else 0
    first = torch.full((groups,), n, dtype=torch.long, device=input_ids.device)
    first = first.scatter_reduce(0, group, rows, reduce="amin")[group]  # [N] first row of the group
    real = attention_mask.bool()
    same = (input_ids == input_ids[first]) & real & real[first]
    lead = same.long().cumprod(dim=1).sum(dim=1)  # [N] prefix shared with the group's first row
    longest_allowed = real.sum(dim=1) - 1  # keep at least one token per row
    cap = torch.minimum(lead, longest_allowed)
    per_group = torch.full((groups,), torch.iinfo(torch.long).max, dtype=torch.long, device=input_ids.device)
    per_group = per_group.scatter_reduce(0, group, cap, reduce="amin")
    return per_group[group].clamp(min=0)


def response_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, T]`` bool: True on each row's response tokens (after its prompt, before padding).

    Uses ``batch["prompt_length"]`` ``[N]`` when the collator gives it, else
    :func:`group_prefix_lengths`.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    starts = batch.get("prompt_length")
    if starts is None:
        starts = group_prefix_lengths(ids, mask, batch["group"])
    columns = torch.arange(ids.shape[1], device=ids.device)
    return (columns.unsqueeze(0) >= starts.to(ids.device).unsqueeze(1)) & mask.bool()


def identical_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[P]`` bool: pairs whose chosen and rejected rows hold the same token ids (the same
    row, or different completions that truncation made equal). Their loss gradient is zero
    and their preference is a coin flip: they are skipped and counted, not trained on."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    c, r = batch["chosen_index"], batch["rejected_index"]
    same_mask = (mask[c] == mask[r]).all(dim=1)
    same_ids = ((ids[c] == ids[r]) | ~mask[c]).all(dim=1)
    return (c == r) | (same_mask & same_ids)
