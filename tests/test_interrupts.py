"""Interrupts: SIGTERM or a first Ctrl-C finishes the PPO step, saves ``last.ckpt`` and exits
non-zero without writing the stage output; ``--ckpt_path last`` then continues the same run
(same W&B run id, same CSV version). A second Ctrl-C stops at once, without a checkpoint."""

from __future__ import annotations

import pytest
import torch
from resume_runs import (
    build_tiny_reward_model,
    checkpoints,
    metrics,
    ppo_config,
    run_fit,
    signal_callback,
    write_config,
    write_prompts,
)

from rlhf.outputs import read_stage_marker

ITERATIONS = 3


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_policy_dir):
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"), tiny_policy_dir)


def interrupted_config(root, policy, reward_model, *signal_args, **signal_kwargs):
    config = ppo_config(root, policy, reward_model, write_prompts(root / "prompts.jsonl"), ITERATIONS, wandb=True)
    config["trainer"]["callbacks"].append(signal_callback(*signal_args, **signal_kwargs))
    return config


def wandb_run_ids(root) -> set[str]:
    return {path.name.rsplit("-", 1)[-1] for path in (root / "run" / "wandb").glob("offline-run-*")}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_policy_dir, reward_model):
    """``stopped_run(signal_name)``: a tiny PPO run (W&B + CSV loggers, as the shipped configs)
    sent ``signal_name`` at the start of iteration 1: ``(root, config, result)``, made once."""
    runs = {}

    def get(signal_name):
        if signal_name not in runs:
            root = tmp_path_factory.mktemp(f"stopped-{signal_name}")
            config = interrupted_config(root, tiny_policy_dir, reward_model, signal_name, 1, where="step_start")
            runs[signal_name] = root, config, run_fit(write_config(root / "stopped.yaml", config))
        return runs[signal_name]

    return get


@pytest.mark.parametrize(("signal_name", "exit_code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_finishes_the_step_saves_a_checkpoint_and_exits_nonzero(stopped_run, signal_name, exit_code):
    root, _, stopped = stopped_run(signal_name)
    assert stopped.returncode == exit_code, stopped.stderr[-3000:]
    assert f"{signal_name}: saved checkpoint" in stopped.stderr
    assert not (root / "out").exists()  # an interrupted run writes no stage output
    [last] = checkpoints(root)
    assert last.name == "last.ckpt"
    [run_id] = wandb_run_ids(root)
    assert last.parent.parent.name == run_id  # <save_dir>/<project>/<run id>/checkpoints
    assert torch.load(last, weights_only=True)["ppo"]["iteration"] == 2  # iteration 1 finished
    assert [row["iteration"] for row in metrics(root)] == ["0.0", "1.0"]


def test_resume_after_sigterm_finishes_the_same_run(stopped_run):
    root, config, _ = stopped_run("SIGTERM")
    [run_id] = wandb_run_ids(root)
    del config["trainer"]["callbacks"][-1]  # the signal sender
    resumed = run_fit(write_config(root / "ppo.yaml", config), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert wandb_run_ids(root) == {run_id}  # the same W&B run, resumed
    assert [row["iteration"] for row in metrics(root)] == ["0.0", "1.0", "2.0"]  # same CSV
    assert read_stage_marker(root / "out")["iterations"] == ITERATIONS


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, tiny_policy_dir, reward_model):
    config = interrupted_config(tmp_path, tiny_policy_dir, reward_model, "SIGINT", 1, where="update", count=2)
    result = run_fit(write_config(tmp_path / "ppo.yaml", config))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "KeyboardInterrupt" in result.stderr
    assert checkpoints(tmp_path) == []
    assert not (tmp_path / "out").exists()
