"""Lightning pieces the benchmark workers share: fixed prompts in order, and a step clock.

Imported inside the workers' run functions (not at module top), so an import-only baseline
worker does not load Lightning on their account.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader


class FixedPrompts(L.LightningDataModule):
    """Pre-tokenised, equal-length prompt rows in order, as ``PromptDataModule`` batches them."""

    def __init__(self, rows: list[list[int]], batch_size: int) -> None:
        super().__init__()
        self.rows = rows
        self.batch_size = batch_size
        self.max_prompt_length = len(rows[0])

    def train_dataloader(self) -> DataLoader:
        items = [{"input_ids": torch.tensor(r), "attention_mask": torch.ones(len(r), dtype=torch.long),
                  "index": torch.tensor(i)} for i, r in enumerate(self.rows)]
        return DataLoader(items, batch_size=self.batch_size, shuffle=False, drop_last=True)


class StepClock(L.Callback):
    """Wall time of each training step (PPO iteration), from the end of the previous one."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now
