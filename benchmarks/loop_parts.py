"""Lightning pieces the benchmark workers share: fixed prompts in order, a step clock, and a
quiet one-device fit.

Imported inside the workers' measuring functions (not at module top), so an import-only baseline
worker does not load Lightning on their account.
"""

from __future__ import annotations

import tempfile
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from benchmarks.harness import StepTimes


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


class StepClock(StepTimes, L.Callback):
    """Wall time of each training step (PPO iteration), from the end of the previous one."""

    on_train_start = StepTimes.start
    on_train_batch_end = StepTimes.lap


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, callbacks: list[L.Callback],
        **trainer_args: Any) -> None:
    """Fit ``module`` on one device with no logger, checkpoints, progress bar, model summary or
    validation, in a temporary root directory (``trainer_args``: the run's own, e.g. its length)."""
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=root, **trainer_args)
        trainer.fit(module, datamodule=datamodule)
