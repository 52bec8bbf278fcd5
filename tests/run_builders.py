"""Tiny runs made through ``rlhf.fit`` for the logging, plot, sweep and notebook tests.

``build_tiny_quickstart`` lays out ``runs/{sft,rm,ppo}`` and ``outputs/{sft,rm,ppo}`` like the
quickstart (CSV logs, PPO samples, stage outputs) on the tiny random Llama, in seconds;
``write_tiny_rm_sweep`` writes a tiny reward-model config and a W&B sweep spec over it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

DATA = {"val_fraction": 0.25, "batch_size": 4, "max_length": 48, "max_prompt_length": 24}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_data(root: Path) -> dict[str, str]:
    """Demonstrations, preferences and prompts (12 rows each) under ``root/data``."""
    data = root / "data"
    return {
        "demos": write_jsonl(data / "demos.jsonl", [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(12)]),
        "prefs": write_jsonl(
            data / "prefs.jsonl",
            [{"prompt": f"q{i}", "chosen": f"a good answer {i}", "rejected": "bad"} for i in range(12)],
        ),
        "prompts": write_jsonl(data / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(12)]),
    }


def trainer(run_dir: Path, steps: int, loggers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """CPU trainer settings: ``steps`` steps, one validation batch at the end, CSV logs."""
    csv_logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                  "init_args": {"save_dir": str(run_dir), "name": "csv"}}
    return {
        "accelerator": "cpu",
        "max_steps": steps,
        "logger": [*(loggers or []), csv_logger],
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(run_dir),
        "num_sanity_val_steps": 0,
        "val_check_interval": steps,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 1,
    }


def wandb_logger(save_dir: Path, project: str = "tiny") -> dict[str, Any]:
    """An ``rlhf.tracking.WandbLogger`` entry (offline unless WANDB_MODE says otherwise)."""
    return {"class_path": "rlhf.tracking.WandbLogger", "init_args": {"project": project, "save_dir": str(save_dir)}}


def rm_config(root: Path, model_dir: str, prefs: str, steps: int = 2, loggers=None, output_dir=None) -> dict:
    """A tiny reward-model config (LoRA r=4 on ``model_dir``)."""
    return {
        "seed_everything": 0,
        "trainer": trainer(root, steps, loggers),
        "model": {"class_path": "rlhf.rm.RewardModule", "init_args": {
            "base": {"name_or_path": model_dir, "lora": {"r": 4}}, "lr": 1e-3, "output_dir": output_dir}},
        "data": {"class_path": "rlhf.data.ComparisonDataModule", "init_args": {"train": {"path": prefs}, **DATA}},
    }


def write_config(path: Path, config: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def build_tiny_quickstart(root: Path, model_dir: str | Path) -> dict[str, Any]:
    """SFT -> RM -> PPO through ``rlhf.fit`` (in process) with the quickstart's layout:
    ``root/runs/<stage>`` (CSV logs, PPO ``samples.jsonl``) and ``root/outputs/<stage>``.

    Returns ``{"runs": Path, "outputs": Path, "clis": {stage: LightningCLI}}``.
    """
    from rlhf.fit import main

    root = Path(root)
    data = write_data(root)
    runs, outputs = root / "runs", root / "outputs"
    clis = {}
    clis["sft"] = main(["--config", write_config(root / "sft.yaml", {
        "seed_everything": 0, "validate_before_fit": True,
        "trainer": trainer(runs / "sft", 3),
        "model": {"class_path": "rlhf.sft.SFTModule", "init_args": {
            "base": {"name_or_path": str(model_dir), "lora": {"r": 4}}, "output_dir": str(outputs / "sft")}},
        "data": {"class_path": "rlhf.data.DemonstrationDataModule",
                 "init_args": {"train": {"path": data["demos"]}, **DATA}},
    })])
    sft_model = str(outputs / "sft" / "model")
    rm = rm_config(runs / "rm", sft_model, data["prefs"], steps=3, output_dir=str(outputs / "rm"))
    clis["rm"] = main(["--config", write_config(root / "rm.yaml", {**rm, "validate_before_fit": True})])
    clis["ppo"] = main(["--config", write_config(root / "ppo.yaml", {
        "seed_everything": 0, "validate_before_fit": True,
        "trainer": {**trainer(runs / "ppo", 3), "max_steps": -1, "max_epochs": -1},
        "model": {"class_path": "rlhf.ppo.PPOModule", "init_args": {
            "base": {"name_or_path": sft_model, "lora": {"r": 4}},
            "reward": {"model": str(outputs / "rm")},
            "sampling": {"max_new_tokens": 6},
            "update": {"ppo_epochs": 1},
            "iterations": 3, "sample_every": 1,
            "output_dir": str(outputs / "ppo")}},
        "data": {"class_path": "rlhf.data.PromptDataModule",
                 "init_args": {"train": {"path": data["prompts"]}, **DATA}},
    })])
    return {"runs": runs, "outputs": outputs, "clis": clis}


def write_tiny_rm_sweep(root: Path, model_dir: str | Path) -> Path:
    """A tiny RM trial config and a grid sweep spec over its learning rate x LoRA rank, in the
    shipped specs' shape (``--config`` then ``${args}``); returns the spec's path."""
    root = Path(root)
    data = write_data(root)
    runs = root / "runs"
    config = write_config(
        root / "rm_trial.yaml",
        rm_config(runs, str(model_dir), data["prefs"], steps=2, loggers=[wandb_logger(runs, "tiny-sweep")]),
    )
    spec = {
        "name": "tiny-rm",
        "project": "tiny-sweep",
        "program": "-m rlhf.fit",
        "method": "grid",
        "metric": {"name": "val/loss", "goal": "minimize"},
        "parameters": {
            "model.init_args.lr": {"values": [0.001, 0.01]},
            "model.init_args.base.lora.r": {"values": [2, 4]},
        },
        "command": ["${env}", "${interpreter}", "-m", "rlhf.fit", f"--config={config}", "${args}"],
    }
    return Path(write_config(root / "sweep.yaml", spec))
