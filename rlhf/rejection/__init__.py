"""Rejection-sampling fine-tuning: RAFT (best of K per prompt) and ReST (all samples above a
rising threshold), each round sample -> score -> select -> SFT on what was kept."""

from rlhf.rejection.module import RejectionSamplingModule
from rlhf.rejection.selection import select_above, select_best, threshold_for_round

__all__ = ["RejectionSamplingModule", "select_above", "select_best", "threshold_for_round"]
