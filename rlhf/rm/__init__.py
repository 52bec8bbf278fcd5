"""Reward-model stage: Bradley-Terry loss, the reward model, its metrics and Lightning module."""

from rlhf.rm.loss import bradley_terry_loss
from rlhf.rm.metrics import MeanMargin, PairwiseAccuracy, StdMetric
from rlhf.models.reward import RewardModel, last_token_index, load_reward_model, position_ids_from_mask
from rlhf.rm.module import RewardModule

__all__ = [
    "MeanMargin",
    "PairwiseAccuracy",
    "RewardModel",
    "RewardModule",
    "StdMetric",
    "bradley_terry_loss",
    "last_token_index",
    "load_reward_model",
    "position_ids_from_mask",
]
