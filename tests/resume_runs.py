"""Tiny PPO runs through ``python -m rlhf.fit`` for the resume, interrupt and no-network tests:
a random reward model on the tiny policy, a config builder, a subprocess runner, readers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def build_tiny_reward_model(out: Path, policy_dir: Path) -> Path:
    """A saved reward model: a LoRA adapter on the tiny policy with a random score head (its
    scores vary between responses, which is all these tests need)."""
    from rlhf.models.loading import LoraSettings, ModelSettings, apply_lora, load_causal_lm, load_tokenizer
    from rlhf.models.reward import RewardModel

    generator = torch.Generator().manual_seed(1)
    backbone = apply_lora(load_causal_lm(ModelSettings(str(policy_dir))), LoraSettings(r=4))
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.5)
    RewardModel(backbone, head).save_pretrained(out, tokenizer=load_tokenizer(str(policy_dir)), merge=False)
    return out


def write_prompts(path: Path, n: int = 12) -> str:
    path.write_text("".join(json.dumps({"prompt": f"Tell me story {i}."}) + "\n" for i in range(n)))
    return str(path)


def tiny_ppo_model(policy: Path, reward_model: Path, iterations: int, lr: float, output_dir: Path) -> dict[str, Any]:
    """The ``model:`` entry of a tiny PPO run: a rank-4 LoRA policy, 6 sampled tokens at
    temperature 1, one PPO epoch in minibatches of 2, a sample table every iteration."""
    return {"class_path": "rlhf.ppo.PPOModule", "init_args": {
        "base": {"name_or_path": str(policy), "lora": {"r": 4}},
        "reward": {"model": str(reward_model)},
        "sampling": {"max_new_tokens": 6, "temperature": 1.0},
        "update": {"ppo_epochs": 1, "minibatch_size": 2},
        "iterations": iterations, "sample_every": 1, "lr": lr,
        "output_dir": str(output_dir),
    }}


def ppo_config(
    root: Path,
    policy: Path,
    reward_model: Path,
    prompts: str,
    iterations: int,
    callbacks: list[dict[str, Any]] | None = None,
    wandb: bool = False,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """A tiny PPO config writing logs to ``root/run`` and its model to ``root/out``.

    12 prompts in batches of 4 (3 iterations an epoch), 2 optimizer steps an iteration;
    ``checkpoint_every`` iterations a ``ModelCheckpoint`` writes ``last.ckpt``. With ``wandb``
    an offline W&B logger comes first, as in the shipped configs.
    """
    run = root / "run"
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run), "name": "csv", "flush_logs_every_n_steps": 100}}]
    if wandb:
        loggers.insert(0, {"class_path": "rlhf.tracking.WandbLogger",
                           "init_args": {"project": "tiny", "save_dir": str(run)}})
    callbacks = list(callbacks or [])
    if checkpoint_every:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"save_last": True, "save_top_k": 0,
                                        "every_n_train_steps": 2 * checkpoint_every}})
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": -1, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "enable_progress_bar": False, "enable_model_summary": False,
            "enable_checkpointing": bool(checkpoint_every),
            "default_root_dir": str(run), "logger": loggers, "callbacks": callbacks,
        },
        "model": tiny_ppo_model(policy, reward_model, iterations, 3e-3, root / "out"),
        "data": {"class_path": "rlhf.data.PromptDataModule", "init_args": {
            "train": {"path": prompts}, "val_fraction": 0.0, "batch_size": 4,
            "max_length": 48, "max_prompt_length": 24,
        }},
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def signal_callback(
    signal_name: str, iteration: int, where: str = "update", count: int = 1
) -> dict[str, Any]:
    """Config entry for :class:`signal_callbacks.SendSignal`."""
    return {"class_path": "signal_callbacks.SendSignal",
            "init_args": {"signal_name": signal_name, "iteration": iteration, "where": where, "count": count}}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded, as :func:`subprocess_env` runs the subprocesses (the same
    float reductions, so in-process and subprocess runs agree; and for the tiny model one
    thread is much faster than several competing for busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def subprocess_env(offline: bool = True, extra_path: list[Path] | None = None) -> dict[str, str]:
    """This environment with ``tests/`` importable and torch on one thread (see
    :func:`one_thread`); ``offline`` sets HF_HUB_OFFLINE and WANDB_MODE."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    paths = [str(p) for p in (extra_path or [])] + [str(TESTS)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if offline:
        env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return env


def run_fit(
    config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -m rlhf.fit --config config *args`` in a fresh process (output captured)."""
    return subprocess.run(
        [sys.executable, "-m", "rlhf.fit", "--config", str(config), *args],
        cwd=config.parent, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


def metrics(root: Path) -> list[dict[str, str]]:
    """Rows of the run's only CSV ``metrics.csv`` (asserting there is exactly one version)."""
    files = sorted((root / "run" / "csv").glob("*/metrics.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as f:
        return list(csv.DictReader(f))


def samples(root: Path) -> list[dict[str, Any]]:
    path = root / "run" / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def checkpoints(root: Path) -> list[Path]:
    return sorted((root / "run").rglob("*.ckpt"))
