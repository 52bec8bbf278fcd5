"""The DPO stage's data: :class:`DPODataModule` is :class:`~rlhf.data.ComparisonDataModule`
(same arguments, records and train/validation split), kept as the name configs use. Its batches
carry ``prompt_length`` ``[N]`` (:class:`~rlhf.data.collate.PreferenceCollator`), the prompt's
token count for each row, so log-probs are summed over exactly the response tokens.
"""

from __future__ import annotations

from rlhf.data.collate import PreferenceCollator
from rlhf.data.datamodules import ComparisonDataModule

#: The collator of the DPO stage (the comparisons' own: it carries ``prompt_length``).
PromptLengthCollator = PreferenceCollator


class DPODataModule(ComparisonDataModule):
    """Comparisons and rankings as prompt groups; batches as
    :class:`~rlhf.data.collate.PreferenceCollator`'s (with ``prompt_length`` ``[N]``)."""
