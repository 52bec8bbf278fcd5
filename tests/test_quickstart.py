"""Slow: the shipped quickstart configs, a few steps each, on the real SmolLM2 model.

Needs ``models/SmolLM2-135M-Instruct`` (``python -m rlhf.models.prepare``; CI does it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="run python -m rlhf.models.prepare"),
]


def fit(config: str, tmp_path: Path, *overrides: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable, "-m", "rlhf.fit", "--config", config,
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]", "--validate_before_fit=false", *overrides,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_quickstart_sft_rm_ppo_configs_run(tmp_path):
    out = tmp_path / "out"
    fit("configs/quickstart/sft.yaml", tmp_path, "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        f"--model.init_args.output_dir={out / 'sft'}")
    marker = json.loads((out / "sft" / "rlhf_stage.json").read_text())
    assert marker["stage"] == "sft" and (out / "sft" / "model" / "config.json").is_file()
    fit("configs/quickstart/rm.yaml", tmp_path, "--trainer.max_steps=2",
        "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        f"--model.init_args.base.name_or_path={out / 'sft' / 'model'}",
        "--model.init_args.stats_max_rows=16", f"--model.init_args.output_dir={out / 'rm'}")
    assert (out / "rm" / "reward_model.json").is_file()
    fit("configs/quickstart/ppo.yaml", tmp_path, "--trainer.limit_val_batches=1",
        "--model.init_args.iterations=2", "--model.init_args.sampling.max_new_tokens=8",
        f"--model.init_args.base.name_or_path={out / 'sft' / 'model'}",
        f"--model.init_args.reward.model={out / 'rm'}", f"--model.init_args.output_dir={out / 'ppo'}")
    marker = json.loads((out / "ppo" / "rlhf_stage.json").read_text())
    assert marker["stage"] == "ppo" and marker["iterations"] == 2


def test_gold_task_configs_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    labels = out / "labels.jsonl"
    export = [
        sys.executable, "-m", "rlhf.export", "--policy", str(MODEL), "--gold", "vader", "--k", "4",
        "--data", "data/hh-rlhf/helpful-rejection-sampled/test.jsonl.gz", "--schema", "hh_rlhf",
        "--split", "all", "--limit", "16", "--max-new-tokens", "8", "--out", str(labels), "--no-progress",
    ]
    result = subprocess.run(export, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    fit("configs/gold/rm.yaml", tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        f"--model.init_args.base.name_or_path={MODEL}", f"--data.init_args.train.path={labels}",
        "--model.init_args.stats_max_rows=16", f"--model.init_args.output_dir={out / 'rm'}")
    fit("configs/gold/ppo.yaml", tmp_path, "--trainer.limit_val_batches=1",
        "--model.init_args.iterations=2", "--model.init_args.sampling.max_new_tokens=8",
        f"--model.init_args.base.name_or_path={MODEL}",
        f"--model.init_args.reward.model={out / 'rm'}", f"--model.init_args.output_dir={out / 'ppo'}")
    marker = json.loads((out / "ppo" / "rlhf_stage.json").read_text())
    assert "gold/mean" in marker["metrics"] and "val/gold/mean" in marker["metrics"]
