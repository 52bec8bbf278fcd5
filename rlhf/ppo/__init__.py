"""PPO stage: rollouts, advantages, losses and the PPO LightningModule."""

from rlhf.ppo.module import PPOModule
from rlhf.generation import SamplingSettings
from rlhf.ppo.settings import KLSettings, RewardSettings, UpdateSettings

__all__ = ["KLSettings", "PPOModule", "RewardSettings", "SamplingSettings", "UpdateSettings"]
