"""``rlhf.pipeline``: stage order, skipping complete stages, forcing, clear config errors, the
tiny SFT -> RM -> PPO -> evaluate -> export recipe end to end, and a PPO stage stopped by
SIGTERM to the pipeline that the next run resumes (``test_pipeline_reruns.py``: staleness,
resume decisions, signals and the lock with stand-in stages)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from resume_runs import (
    build_tiny_reward_model,
    subprocess_env,
    write_config,
    write_prompts,
)
from resume_runs import checkpoints as run_checkpoints
from resume_runs import metrics as run_metrics
from resume_runs import ppo_config as resumable_ppo_config
from resume_runs import samples as run_samples
from stage_configs import ppo_config, rm_config, sft_config, tiny_data_files

from rlhf.data.sources import DataSource, load_records
from rlhf.outputs import read_stage_marker
from rlhf.pipeline import PipelineConfigError, load_pipeline, main, run_pipeline


def copy_stages(tmp_path, n=3):
    """A pipeline of ``python -m json.tool in out`` stages: each copies the previous output."""
    (tmp_path / "s0.json").write_text('{"a": 1}')
    stages = [
        {"name": f"s{i}", "run": ["json.tool", str(tmp_path / f"s{i - 1}.json"), str(tmp_path / f"s{i}.json")],
         "output": str(tmp_path / f"s{i}.json")}
        for i in range(1, n + 1)
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


def test_complete_stages_are_skipped_and_later_stages_rerun(tmp_path):
    path = copy_stages(tmp_path)
    first = run_pipeline(load_pipeline(path))
    assert [r.status for r in first] == ["ran", "ran", "ran"]
    assert json.loads((tmp_path / "s3.json").read_text()) == {"a": 1}
    assert [r.status for r in run_pipeline(load_pipeline(path))] == ["skipped"] * 3
    (tmp_path / "s2.json").unlink()  # s2 incomplete: s2 runs, and s3 after it
    assert [r.status for r in run_pipeline(load_pipeline(path))] == ["skipped", "ran", "ran"]
    assert [r.status for r in run_pipeline(load_pipeline(path), start_from="s2")] == ["skipped", "ran", "ran"]
    assert [r.status for r in run_pipeline(load_pipeline(path), force=True, until="s2")] == ["ran", "ran", "not run"]


def test_a_failing_stage_stops_the_pipeline(tmp_path, capsys):
    path = copy_stages(tmp_path)
    (tmp_path / "s0.json").write_text("not json")
    assert main(["--config", str(path)]) == 1
    out = capsys.readouterr()
    assert "s1 failed (exit code 1)" in out.err
    assert "not run" in out.out and "failed" in out.out


def test_the_summary_table_is_the_last_thing_printed(tmp_path):
    """Stages write to the pipeline's terminal; the table comes after all they and the pipeline
    printed (here a stage's error and the failure line, on stderr)."""
    path = copy_stages(tmp_path)
    (tmp_path / "s0.json").write_text("not json")
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.pipeline", "--config", str(path)], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    assert result.returncode == 1
    assert "Expecting value" in result.stdout and "s1 failed (exit code 1)" in result.stdout
    lines = result.stdout.rstrip().splitlines()
    assert "pipeline summary" in result.stdout and lines[-1].startswith("└"), lines[-3:]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"name": "a"}], "exactly one of 'fit'"),
        ([{"name": "a", "run": ["json.tool"]}], "needs 'output'"),
        ([{"name": "a", "fit": "missing.yaml"}], "does not exist"),
        ([{"name": "a", "run": ["x"], "output": "o", "outptu": 1}], "unknown key(s) ['outptu']"),
        ([{"name": "a", "run": ["x"], "output": "o"}, {"name": "a", "run": ["x"], "output": "p"}], "unique"),
    ],
)
def test_bad_pipeline_configs_name_the_stage(tmp_path, stages, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(PipelineConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")) as err:
        load_pipeline(path)
    assert str(path) in str(err.value)


def test_fit_stage_without_output_dir_is_rejected(tmp_path):
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({"model": {"class_path": "rlhf.sft.SFTModule"}}))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "sft", "fit": str(tmp_path / "sft.yaml")}]}))
    with pytest.raises(PipelineConfigError, match="output_dir"):
        load_pipeline(path)


def test_tiny_recipe_end_to_end(tmp_path, tiny_model_dir, capsys):
    files = tiny_data_files(tmp_path)
    sft_model = str(tmp_path / "out/sft/model")
    configs = {
        "sft": sft_config(tmp_path, str(tiny_model_dir), files["demos"]),
        "rm": rm_config(tmp_path, sft_model, files["prefs"]),
        "ppo": ppo_config(tmp_path, sft_model, files["prompts"], gold="vader"),
    }
    stages = []
    for name, config in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        stages.append({"name": name, "fit": str(tmp_path / f"{name}.yaml")})
    common = ["--data", files["prompts"], "--val-fraction", "0.25", "--max-length", "48",
              "--max-prompt-length", "24", "--max-new-tokens", "6", "--no-progress"]
    stages.append({"name": "eval", "output": str(tmp_path / "out/eval"), "run": [
        "rlhf.evaluate", "--reward", str(tmp_path / "out/rm"), "--reference", str(tmp_path / "out/sft"),
        "--policy", f"sft={tmp_path / 'out/sft'}", "--policy", f"ppo={tmp_path / 'out/ppo'}",
        "--samples-per-prompt", "2", "--out", str(tmp_path / "out/eval"), *common]})
    stages.append({"name": "export", "output": str(tmp_path / "out/round2.jsonl"), "run": [
        "rlhf.export", "--policy", str(tmp_path / "out/ppo"), "--k", "3", "--gold", "vader",
        "--split", "all", "--temperature", "1.5", "--out", str(tmp_path / "out/round2.jsonl"), *common,
        # Random tiny-model text rarely holds a word VADER scores: 24 tokens and this seed give
        # 4 prompts whose samples are not all tied (seeds 0-3 gave 0, 3, 3, 4 such prompts).
        "--max-new-tokens", "24", "--seed", "3"]})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))

    assert main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pipeline summary" in out and "ppo win rate vs sft" in out
    assert "ppo length-controlled win rate" in out
    ppo = read_stage_marker(tmp_path / "out/ppo")
    assert "gold/mean" in ppo["metrics"] and "val/gold/mean" in ppo["metrics_before_fit"]
    report = json.loads((tmp_path / "out/eval/report.json").read_text())
    assert report["policies"]["sft"]["kl_mean"] == 0.0  # the reference itself
    assert report["policies"]["ppo"]["samples"] == 2 * report["settings"]["prompts"]
    assert 0.0 <= report["comparisons"][0]["win_rate"] <= 1.0
    lc = report["comparisons"][0]
    assert 0.0 <= lc["lc_win_rate_ci95_low"] <= lc["lc_win_rate_ci95_high"] <= 1.0
    rankings = load_records(DataSource(path=str(tmp_path / "out/round2.jsonl")), "preference").records
    assert rankings and all(r.ranks is not None and len(r.ranks) == len(r.completions) for r in rankings)

    # Everything is complete now: a second run only skips.
    assert main(["--config", str(path)]) == 0
    assert capsys.readouterr().out.count("skipped") >= 5


def test_ctrl_c_waits_for_the_stage_and_stops(tmp_path, monkeypatch):
    signals: list[int] = []

    class InterruptedStage:
        waits = 0

        def __init__(self, command, **kwargs):
            self.command = command

        def wait(self):
            InterruptedStage.waits += 1
            if InterruptedStage.waits == 1:
                raise KeyboardInterrupt
            return -2  # the stage's own exit after saving

        def send_signal(self, signum):
            signals.append(signum)

    monkeypatch.setattr("rlhf.pipeline_state.subprocess.Popen", InterruptedStage)
    results = run_pipeline(load_pipeline(copy_stages(tmp_path)))
    assert [r.status for r in results] == ["interrupted", "not run", "not run"]
    assert InterruptedStage.waits == 2
    assert signals == [signal.SIGTERM]  # passed on, as a first Ctrl-C
    assert results[0].exit_code == 130


def test_sigterm_to_the_pipeline_during_ppo_then_a_rerun_resumes_it(tmp_path, tiny_policy_dir):
    """The issue's case: the stage saves a checkpoint and the pipeline exits 143; the re-run
    resumes it: one CSV version, each iteration's samples once (and none of an earlier run's:
    a new run moves its ``samples.jsonl`` aside)."""
    iterations = 6
    reward_model = build_tiny_reward_model(tmp_path / "rm", tiny_policy_dir)
    prompts = write_prompts(tmp_path / "p.jsonl")
    config = write_config(tmp_path / "ppo.yaml",
                          resumable_ppo_config(tmp_path, tiny_policy_dir, reward_model, prompts, iterations))
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"name": "ppo", "fit": str(config)}]}))
    samples = tmp_path / "run" / "samples.jsonl"
    samples.parent.mkdir()
    samples.write_text('{"iteration": 0, "prompt": "an earlier run"}\n')
    command = [sys.executable, "-m", "rlhf.pipeline", "--config", str(path)]

    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    while not samples.is_file() or samples.read_text().count("\n") < 4:  # iteration 0 logged
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output[-3000:]
    assert "SIGTERM: saved checkpoint" in output and "ppo interrupted" in output
    [last] = run_checkpoints(tmp_path)
    assert 1 <= torch.load(last, weights_only=True)["ppo"]["iteration"] < iterations

    rerun = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "--ckpt_path last" in rerun.stdout and f"resuming from {last}" in rerun.stderr
    assert [row["iteration"] for row in run_metrics(tmp_path)] == [f"{i}.0" for i in range(iterations)]
    assert [row["iteration"] for row in run_samples(tmp_path)] == [i for i in range(iterations) for _ in range(4)]
    assert "an earlier run" in (tmp_path / "run" / "samples.previous.jsonl").read_text()
