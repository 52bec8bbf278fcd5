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


def stage_config(root: Path, stage: str, steps: int, model_class: str, model: str, data_class: str,
                 data: str, validate_before_fit: bool = False,
                 init_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage ``stage`` logging under ``root/runs/<stage>`` and saving to ``root/out/<stage>``:
    ``model_class`` with a rank-4 LoRA on ``model`` (plus ``init_args``, which may override any
    of its arguments), on ``data_class`` over the file ``data``."""
    return {
        "seed_everything": 0,
        **({"validate_before_fit": True} if validate_before_fit else {}),
        "trainer": trainer_args(root / "runs" / stage, steps),
        "model": {"class_path": model_class, "init_args": {
            "base": {"name_or_path": model, "lora": {"r": 4}},
            "output_dir": str(root / "out" / stage), **(init_args or {})}},
        "data": {"class_path": data_class, "init_args": {"train": {"path": data}, **DATA_ARGS}},
    }


def sft_config(root: Path, model: str, demos: str, steps: int = 2) -> dict[str, Any]:
    return stage_config(root, "sft", steps, "rlhf.sft.SFTModule", model,
                        "rlhf.data.DemonstrationDataModule", demos, validate_before_fit=True)


def rm_config(root: Path, model: str, prefs: str, steps: int = 2) -> dict[str, Any]:
    return stage_config(root, "rm", steps, "rlhf.rm.RewardModule", model,
                        "rlhf.data.ComparisonDataModule", prefs)


def ppo_config(root: Path, model: str, prompts: str, iterations: int = 2, **init_args: Any) -> dict[str, Any]:
    ppo_args = {
        "reward": {"model": str(root / "out/rm")},
        "sampling": {"max_new_tokens": 6},
        "update": {"ppo_epochs": 1},
        "iterations": iterations, "sample_every": 1, **init_args,
    }
    config = stage_config(root, "ppo", iterations, "rlhf.ppo.PPOModule", model,
                          "rlhf.data.PromptDataModule", prompts, validate_before_fit=True, init_args=ppo_args)
    config["trainer"].update(max_steps=-1, max_epochs=-1)
    return config
