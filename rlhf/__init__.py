"""rlhf: supervised fine-tuning, reward modelling and PPO on Lightning, from one command."""

__version__ = "0.1.0"
