"""Supervised fine-tuning stage."""

from rlhf.sft.loss import response_nll
from rlhf.sft.module import SFTModule

__all__ = ["SFTModule", "response_nll"]
