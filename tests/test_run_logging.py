"""Run records and W&B: offline unless asked, the resolved config and git commit in every run,
the reward model's histograms."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

import rlhf.rm.module as rm_module
from rlhf.fit import main
from rlhf.run_info import git_info
from rlhf.tracking import WandbLogger, log_histograms, resolve_wandb_mode
from run_builders import rm_config, wandb_logger, write_config, write_data

ROOT = Path(__file__).resolve().parents[1]


def head_commit() -> str | None:
    if shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        (None, {}, "offline"),
        (None, {"WANDB_MODE": "online"}, "online"),
        (None, {"WANDB_MODE": "dryrun"}, "offline"),
        (None, {"WANDB_MODE": "disabled"}, "disabled"),
        (None, {"WANDB_SWEEP_ID": "abc123"}, "online"),  # started by `wandb agent`
        (None, {"WANDB_SWEEP_ID": "abc123", "WANDB_MODE": "offline"}, "offline"),
        ("offline", {"WANDB_MODE": "online"}, "offline"),  # the config wins
    ],
)
def test_wandb_mode_is_offline_unless_asked(mode, env, expected):
    assert resolve_wandb_mode(mode, env) == expected


def test_unknown_wandb_mode_is_an_error():
    with pytest.raises(ValueError, match="W&B mode"):
        resolve_wandb_mode(None, {"WANDB_MODE": "sometimes"})


def test_wandb_logger_passes_the_mode_to_wandb_init_and_leaves_the_env_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = WandbLogger(project="p", save_dir=str(tmp_path))
    assert logger.mode == "online" and logger._wandb_init["mode"] == "online"
    # Lightning's own offline flag maps to mode: offline, without rewriting WANDB_MODE.
    old_style = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
    assert old_style._wandb_init["mode"] == "offline" and os.environ["WANDB_MODE"] == "online"
    monkeypatch.delenv("WANDB_MODE")
    assert WandbLogger(project="p", save_dir=str(tmp_path)).mode == "offline"


def test_shipped_configs_use_the_offline_by_default_logger_and_a_csv_logger():
    for path in [*ROOT.glob("configs/quickstart/*.yaml"), *ROOT.glob("configs/rm_full*.yaml")]:
        loggers = yaml.safe_load(path.read_text())["trainer"]["logger"]
        classes = [entry["class_path"] for entry in loggers]
        assert classes == ["rlhf.tracking.WandbLogger", "lightning.pytorch.loggers.CSVLogger"], path
        assert "offline" not in loggers[0]["init_args"] and "mode" not in loggers[0]["init_args"], path


def test_git_info_reads_the_commit_and_never_fails_outside_a_repo(tmp_path):
    commit = head_commit()
    if commit is not None:
        info = git_info(ROOT)
        assert info["git_commit"] == commit and isinstance(info["git_dirty"], bool)
    assert git_info(tmp_path) == {"git_commit": None, "git_dirty": None, "git_root": None}
    assert git_info(tmp_path / "missing")["git_commit"] is None


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_every_run_dir_records_its_config_and_git_commit(tiny_quickstart, stage):
    (version_dir,) = (tiny_quickstart["runs"] / stage / "csv").iterdir()
    info = json.loads((version_dir / "run_info.json").read_text())
    assert info["status"] == "finished" and info["git_commit"] == git_info()["git_commit"]
    assert info["csv_metrics"] == [str((version_dir / "metrics.csv").resolve())]
    saved = yaml.safe_load((version_dir / "config.yaml").read_text())
    assert saved == info["config"]
    assert saved["model"]["class_path"].startswith(f"rlhf.{stage}.")
    assert saved["model"]["init_args"]["output_dir"].endswith(f"outputs/{stage}")
    assert info["metrics"]  # the final value of every logged metric
    if stage == "ppo":
        assert {"reward/mean", "kl/mean", "policy/entropy"} <= set(info["metrics"])


def test_reward_model_without_wandb_keeps_no_histogram_values(tiny_quickstart):
    module = tiny_quickstart["clis"]["rm"].model
    assert module.val_margin_values.update_count == 0 and module.val_score_values.update_count == 0


def test_wandb_run_gets_config_git_commit_and_rm_histograms(tmp_path, tiny_model_dir, monkeypatch):
    """A real offline W&B run: its config holds the resolved config and the commit, and the
    reward model logs margin and score histograms in validation."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = []

    def spy(loggers, values, step, **kwargs):
        logged.append(({k: v.clone() for k, v in values.items()}, step, loggers))
        return log_histograms(loggers, values, step, **kwargs)

    monkeypatch.setattr(rm_module, "log_histograms", spy)
    data = write_data(tmp_path)
    config = rm_config(tmp_path / "runs", str(tiny_model_dir), data["prefs"], steps=2,
                       loggers=[wandb_logger(tmp_path / "runs", "tiny-logging")])
    config["model"]["init_args"]["lr"] = 0.002
    try:
        cli = main(["--config", write_config(tmp_path / "rm.yaml", config)])
        logger = cli.trainer.loggers[0]
        assert isinstance(logger, WandbLogger) and logger.mode == "offline"
        run_config = logger.experiment.config
        assert run_config["git_commit"] == git_info()["git_commit"]
        assert run_config["config"]["model"]["init_args"]["lr"] == 0.002
        assert run_config["config"]["trainer"]["max_steps"] == 2
        info = json.loads(next((tmp_path / "runs" / "csv").glob("*/run_info.json")).read_text())
        assert info["wandb"][0]["id"] == logger.experiment.id
    finally:
        wandb.finish()
    (values, step, loggers), = logged  # one validation, at the end of the 2 steps
    assert step == 2 and loggers == [logger]
    # The held-out 25% of 12 one-pair prompt groups: 3 pairs, 6 sequences.
    assert values["val/margin_hist"].shape == (3,) and values["val/reward_hist"].shape == (6,)
    module = cli.model
    assert module.val_margin_values.update_count == 0  # reset after logging


def test_log_histograms_sends_wandb_histograms_at_the_step():
    import torch
    import wandb

    class FakeLogger(LightningWandbLogger):
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((metrics, step))

    fake = FakeLogger()
    log_histograms([fake], {"a": torch.tensor([1.0, 2.0, 3.0]), "empty": torch.tensor([])}, step=7)
    ((metrics, step),) = fake.calls
    assert step == 7 and set(metrics) == {"a"} and isinstance(metrics["a"], wandb.Histogram)
    log_histograms([], {"a": torch.tensor([1.0])}, step=1)  # no W&B logger: nothing to do
