"""Lightning pieces the benchmark workers share: fixed prompts in order, a step clock, and a
quiet one-device fit (optionally under an FSDP strategy).

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


# A benchmark's device name -> Lightning's accelerator name.
ACCELERATORS = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}
STRATEGIES = ("fsdp", "fsdp2")


def strategy_for(name: str | None) -> Any:
    """Lightning's strategy for a benchmark's ``strategy`` setting, built as
    ``configs/strategy/{fsdp,fsdp2}.yaml`` build it: ``None`` (Lightning's single-device
    default), ``fsdp`` (FSDP1, GPU only) or ``fsdp2`` (FSDP2, GPU or CPU)."""
    if name is None:
        return "auto"
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from rlhf.distributed import fsdp1_auto_wrap_policy

        return FSDPStrategy(auto_wrap_policy=fsdp1_auto_wrap_policy, sharding_strategy="FULL_SHARD",
                            state_dict_type="full")
    if name == "fsdp2":
        from rlhf.distributed import FSDP2Strategy

        return FSDP2Strategy()
    raise ValueError(f"strategy must be None or one of {STRATEGIES}, got {name!r}")


def fit(module: L.LightningModule, datamodule: L.LightningDataModule, callbacks: list[L.Callback],
        device: str = "auto", strategy: str | None = None, **trainer_args: Any) -> None:
    """Fit ``module`` on one ``device`` (``auto``, ``cpu`` or ``cuda``) with ``strategy`` (see
    :func:`strategy_for`) and no logger, checkpoints, progress bar, model summary or
    validation, in a temporary root directory (``trainer_args``: the run's own, e.g. its length)."""
    if device not in ACCELERATORS:
        raise ValueError(f"device must be one of {sorted(ACCELERATORS)}, got {device!r}")
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator=ACCELERATORS[device], devices=1, strategy=strategy_for(strategy),
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=callbacks, default_root_dir=root, **trainer_args)
        trainer.fit(module, datamodule=datamodule)
