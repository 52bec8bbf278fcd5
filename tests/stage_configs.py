"""Helpers for tests that run stages through configs: data files and tiny-model stage configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` as JSONL to ``path``; returns the path as a string."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trainer_args(root: Path, steps: int) -> dict[str, Any]:
    """A quiet CPU trainer with a CSV logger under ``root``, validating once at ``steps``."""
    return {
        "accelerator": "cpu",
        "max_steps": steps,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root), "name": "csv"}},
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(root),
        "num_sanity_val_steps": 0,
        "val_check_interval": steps,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 1,
    }


DATA_ARGS = {"val_fraction": 0.25, "batch_size": 4, "max_length": 48, "max_prompt_length": 24}


def tiny_data_files(root: Path) -> dict[str, str]:
    """Demonstrations, comparisons and prompts (12 each) for the tiny model."""
    return {
        "demos": write(root / "demos.jsonl", [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(12)]),
        "prefs": write(root / "prefs.jsonl",
                       [{"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"} for i in range(12)]),
        "prompts": write(root / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(12)]),
    }


def sft_config(root: Path, model: str, demos: str, steps: int = 2) -> dict[str, Any]:
    return {
        "seed_everything": 0, "validate_before_fit": True,
        "trainer": trainer_args(root / "runs/sft", steps),
        "model": {"class_path": "rlhf.sft.SFTModule", "init_args": {
            "base": {"name_or_path": model, "lora": {"r": 4}},
            "output_dir": str(root / "out/sft")}},
        "data": {"class_path": "rlhf.data.DemonstrationDataModule",
                 "init_args": {"train": {"path": demos}, **DATA_ARGS}},
    }


def rm_config(root: Path, model: str, prefs: str, steps: int = 2) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": trainer_args(root / "runs/rm", steps),
        "model": {"class_path": "rlhf.rm.RewardModule", "init_args": {
            "base": {"name_or_path": model, "lora": {"r": 4}},
            "output_dir": str(root / "out/rm")}},
        "data": {"class_path": "rlhf.data.ComparisonDataModule",
                 "init_args": {"train": {"path": prefs}, **DATA_ARGS}},
    }


def ppo_config(root: Path, model: str, prompts: str, iterations: int = 2, **init_args: Any) -> dict[str, Any]:
    return {
        "seed_everything": 0, "validate_before_fit": True,
        "trainer": {**trainer_args(root / "runs/ppo", iterations), "max_steps": -1, "max_epochs": -1},
        "model": {"class_path": "rlhf.ppo.PPOModule", "init_args": {
            "base": {"name_or_path": model, "lora": {"r": 4}},
            "reward": {"model": str(root / "out/rm")},
            "sampling": {"max_new_tokens": 6},
            "update": {"ppo_epochs": 1},
            "iterations": iterations, "sample_every": 1,
            "output_dir": str(root / "out/ppo"), **init_args}},
        "data": {"class_path": "rlhf.data.PromptDataModule",
                 "init_args": {"train": {"path": prompts}, **DATA_ARGS}},
    }
