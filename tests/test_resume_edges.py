"""Resume edge cases: the final checkpoint trains nothing more, torn ``samples.jsonl`` lines
and ``metrics.csv`` rows are dropped (the good ones kept), a changed config is refused naming
the keys (or, when allowed, recorded without rewriting ``config.yaml``), ``--ckpt_path last``
takes only the resumed run's checkpoints, a new run does not append to an old
``samples.jsonl``, and an ``output_dir`` holding another stage's output is refused before
training."""

from __future__ import annotations

import csv
import json
import logging

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from resume_runs import (
    build_tiny_reward_model,
    checkpoints,
    metrics,
    ppo_config,
    run_fit,
    samples,
    subprocess_env,
    write_config,
    write_prompts,
)
from stage_configs import sft_config, tiny_data_files

from rlhf.fit import main
from rlhf.outputs import OutputDirError, read_stage_marker, write_stage_marker
from rlhf.ppo.samples import (
    PREVIOUS_SAMPLES_FILE,
    drop_samples_from,
    start_samples_anew,
)
from rlhf.resume import NOT_BEFORE_ENV, find_last_checkpoint, restore_csv_history
from rlhf.run_info import ALLOW_CHANGES_ENV, read_run_info


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_policy_dir):
    """A tiny PPO run of 2 iterations with a checkpoint after each, run to the end."""
    root = tmp_path_factory.mktemp("finished")
    reward_model = build_tiny_reward_model(root / "rm", tiny_policy_dir)
    config = ppo_config(root, tiny_policy_dir, reward_model, write_prompts(root / "prompts.jsonl"), 2,
                        checkpoint_every=1)
    path = write_config(root / "ppo.yaml", config)
    result = run_fit(path)
    assert result.returncode == 0, result.stderr[-3000:]
    [last] = checkpoints(root)
    assert torch.load(last, weights_only=True)["ppo"]["iteration"] == 2  # the final state
    return root, path


def test_resuming_from_the_final_checkpoint_trains_nothing_more(finished_run):
    root, path = finished_run
    before = metrics(root), samples(root), (root / "out/rlhf_stage.json").read_text()
    resumed = run_fit(path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing left to train" in resumed.stderr
    # No extra iteration (it ran at lr 0 and logged a third row), and the output is kept.
    assert (metrics(root), samples(root), (root / "out/rlhf_stage.json").read_text()) == before


def test_resuming_with_a_changed_config_is_refused_naming_the_keys(finished_run):
    root, path = finished_run
    [config_yaml] = (root / "run" / "csv").glob("*/config.yaml")
    before = config_yaml.read_text(), metrics(root)
    refused = run_fit(path, "--ckpt_path", "last", "--model.init_args.lr=0.001",
                      "--data.init_args.batch_size=2", "--trainer.callbacks=[]")
    assert refused.returncode == 1
    message = refused.stderr.strip().splitlines()[-1]
    assert "ResumeConfigError" in message and "the config differs" in message
    assert "data.init_args.batch_size: 4 -> 2; model.init_args.lr: 0.003 -> 0.001)" in message
    assert "callbacks" not in message  # what is logged or saved where may change
    assert (config_yaml.read_text(), metrics(root)) == before  # nothing claims the new values

    allowed = run_fit(path, "--ckpt_path", "last", "--model.init_args.lr=0.001",
                      env={**subprocess_env(), ALLOW_CHANGES_ENV: "allow"})
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert config_yaml.read_text() == before[0]  # the values the run trained with
    resumed_config = yaml.safe_load((config_yaml.parent / "config.resumed-step4.yaml").read_text())
    assert resumed_config["model"]["init_args"]["lr"] == 0.001
    info = read_run_info(config_yaml.parent)
    assert info["resumed_with_changes"] == {"model.init_args.lr": [0.003, 0.001]}


def test_torn_samples_line_is_dropped_and_logged(tmp_path, caplog):
    path = tmp_path / "samples.jsonl"
    rows = [{"iteration": i, "prompt": "p", "response": "r", "reward": 0.5, "kl": 0.0} for i in (0, 0, 1, 2)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"iteration": 3, "prompt": "a half-wri')  # killed mid-write
    with caplog.at_level(logging.WARNING, "rlhf.ppo"):
        drop_samples_from(path, 2)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])
    assert f"{path}: dropped torn line(s) 5" in caplog.text
    path.write_text(text[:-1])  # a complete row without its newline is torn too (cut there)
    drop_samples_from(path, 5)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:3])


def test_a_new_run_does_not_append_to_the_previous_samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"iteration": 0}\n{"iteration": 1}\n')
    drop_samples_from(path, 1)  # resumed at iteration 1
    assert path.read_text() == '{"iteration": 0}\n'
    start_samples_anew(path)  # a new run
    assert not path.exists() and (tmp_path / PREVIOUS_SAMPLES_FILE).read_text() == '{"iteration": 0}\n'


def test_torn_metrics_row_is_dropped_and_the_rows_before_it_kept(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    for step in range(3):
        logger.log_metrics({"loss": 1.0 / (step + 1), "iteration": float(step)}, step=step)
    logger.save()
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1] + "0.5,0.9\n" + lines[2] + lines[3] + "3.0,0.2")  # 2 torn

    resumed = CSVLogger(tmp_path, name="csv", version=0)
    assert restore_csv_history(resumed, max_step=2) == 3
    resumed.log_metrics({"loss": 0.1, "iteration": 3.0}, step=3)
    resumed.save()
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["iteration"]) for r in rows] == [("0", "0.0"), ("1", "1.0"), ("2", "2.0"), ("3", "3.0")]


def test_last_checkpoint_ignores_checkpoints_older_than_the_run_to_resume(tmp_path, monkeypatch):
    trainer = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"an older run's")
    assert find_last_checkpoint(trainer) == last
    monkeypatch.setenv(NOT_BEFORE_ENV, repr(last.stat().st_mtime + 1))
    assert find_last_checkpoint(trainer) is None


def test_output_dir_holding_another_stage_output_is_refused_before_training(tmp_path, tiny_model_dir):
    other = tmp_path / "out" / "rm"
    other.mkdir(parents=True)
    write_stage_marker(other, {"stage": "rm"})
    config = sft_config(tmp_path, str(tiny_model_dir), tiny_data_files(tmp_path)["demos"])
    config["model"]["init_args"]["output_dir"] = str(tmp_path / "out")
    path = write_config(tmp_path / "sft.yaml", config)
    with pytest.raises(OutputDirError, match=f"holds another stage's output {other}"):
        main(["--config", str(path)])
    assert read_stage_marker(other) == {"stage": "rm"}
    assert not list((tmp_path / "runs").rglob("metrics.csv"))  # nothing trained or logged
