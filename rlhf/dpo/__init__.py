"""DPO stage: DPO / conservative DPO / IPO losses, preference batches with response starts, and
the Lightning module (a LoRA policy whose reference is its base with the adapter off)."""

from rlhf.dpo.batch import group_prefix_lengths, identical_pairs, response_mask
from rlhf.dpo.data import DPODataModule, PromptLengthCollator
from rlhf.dpo.losses import (
    ipo_loss,
    log_ratio_difference,
    preference_loss,
    reward_stats,
    sigmoid_loss,
)
from rlhf.dpo.module import DPOModule

__all__ = [
    "DPODataModule",
    "DPOModule",
    "PromptLengthCollator",
    "group_prefix_lengths",
    "identical_pairs",
    "ipo_loss",
    "log_ratio_difference",
    "preference_loss",
    "response_mask",
    "reward_stats",
    "sigmoid_loss",
]
