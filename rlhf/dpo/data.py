"""Preference batches that say where each response starts.

:class:`DPODataModule` is :class:`~rlhf.data.ComparisonDataModule` (same arguments, same
records, same train/validation split) whose batches also carry ``prompt_length`` ``[N]``: the
prompt's token count for each row, so log-probs are summed over exactly the response tokens.
A plain ``ComparisonDataModule`` works with :class:`~rlhf.dpo.DPOModule` too (see
:func:`rlhf.dpo.batch.group_prefix_lengths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf.data.collate import PreferenceCollator
from rlhf.data.datamodules import ComparisonDataModule


@dataclass
class PromptLengthCollator(PreferenceCollator):
    """:class:`PreferenceCollator`'s batch plus ``prompt_length`` ``[N]`` (long)."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(items)
        lengths = [len(it["prompt_ids"]) for it in items for _ in it["completion_ids"]]
        batch["prompt_length"] = torch.tensor(lengths, dtype=torch.long)
        return batch


class DPODataModule(ComparisonDataModule):
    """Comparisons and rankings as prompt groups; batches as
    :class:`~rlhf.data.collate.PreferenceCollator`'s plus ``prompt_length`` ``[N]``."""

    collator_class = PromptLengthCollator
