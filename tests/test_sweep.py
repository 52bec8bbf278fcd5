"""Sweeps: the shipped W&B specs validate and parse through the CLI; ``rlhf.sweep`` drives W&B's
sweep engine offline, launching ``rlhf.fit`` trials the way ``wandb agent`` does."""

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import yaml

sweeps = pytest.importorskip("sweeps", reason="W&B's sweep engine: pip install -e '.[sweeps]'")

from rlhf.fit import main as fit_main  # noqa: E402
from rlhf.sweep import (  # noqa: E402
    Trial,
    build_command,
    read_trial_result,
    run_sweep,
    spec_violations,
    sweep_run,
)

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))


def nested(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def test_there_are_ppo_and_rm_sweeps():
    assert {p.stem for p in SPECS} >= {"ppo", "rm"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_spec_validates_against_the_sweeps_schema(path):
    spec = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(spec) == []
    sweeps.SweepConfig(spec)  # raises jsonschema.ValidationError when invalid
    assert spec_violations(spec) == []
    assert spec["program"] == "-m rlhf.fit" and "${args}" in spec["command"]
    assert spec["metric"]["name"].startswith("val/")


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_agent_command_of_a_shipped_spec_parses_with_the_sampled_values(path, capsys, monkeypatch):
    """The command ``wandb agent`` would run, minus training: LightningCLI accepts the
    ``--key=value`` arguments and they land in the resolved config."""
    spec = yaml.safe_load(path.read_text())
    suggestion = sweeps.next_run(spec, [])
    params = {k: v["value"] for k, v in suggestion.config.items()}
    command = build_command(spec, params, interpreter="python")
    assert command[:3] == ["python", "-m", "rlhf.fit"]
    monkeypatch.chdir(ROOT)  # the specs' config paths are relative to the repository
    with pytest.raises(SystemExit) as exit_info:
        fit_main([*command[3:], "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    for name, value in params.items():
        assert nested(config, name) == (pytest.approx(float(value)) if isinstance(value, (int, float)) else value)
    assert config["model"]["init_args"]["output_dir"] is None  # trials save no model
    assert all(l["init_args"]["save_dir"].startswith("runs/sweeps/") for l in config["trainer"]["logger"])


def test_build_command_fills_macros_like_wandb_agent(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_DATA", "data/x.jsonl")
    spec = {
        "program": "-m rlhf.fit",
        "command": ["${env}", "${interpreter}", "${program}", "--data=${envvar:RLHF_TEST_DATA}", "${args}",
                    "${args_no_hyphens}"],
    }
    params = {"model.init_args.lr": 0.0003, "model.init_args.base.lora.r": 8}
    assert build_command(spec, params, interpreter="/py") == [
        "/py", "-m", "rlhf.fit", "--data=data/x.jsonl",
        "--model.init_args.lr=0.0003", "--model.init_args.base.lora.r=8",
        "model.init_args.lr=0.0003", "model.init_args.base.lora.r=8",
    ]
    # No command: W&B's default, ${env} ${interpreter} ${program} ${args}.
    assert build_command({"program": "train.py"}, {"a": 1}, interpreter="/py") == ["/py", "train.py", "--a=1"]


def test_spec_violations_name_each_problem():
    good = {"method": "random", "metric": {"name": "val/loss"}, "command": ["${args}"],
            "parameters": {"lr": {"min": 0.001, "max": 0.1}}}
    assert spec_violations(good) == []
    assert any("metric" in p for p in spec_violations({**good, "metric": None}))
    assert any("${args}" in p for p in spec_violations({**good, "command": ["python", "x.py"]}))
    assert spec_violations({**good, "method": "annealing"})  # the engine's schema
    assert spec_violations({**good, "parameters": {"lr": {"min": 0.1, "max": 0.001}}})


def test_trials_feed_the_bayes_engine_as_finished_or_failed_runs():
    spec = {"method": "bayes", "metric": {"name": "val/loss", "goal": "minimize"},
            "parameters": {"lr": {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-2}}}
    trials = [
        Trial(index=i, params={"lr": lr}, command=[], status="finished", metric=loss, seconds=1.0,
              history=[{"val/loss": loss + 1}, {"val/loss": loss}])
        for i, (lr, loss) in enumerate([(1e-5, 2.0), (1e-4, 1.0), (1e-3, 0.5), (1e-2, 3.0)])
    ]
    trials.append(Trial(index=4, params={"lr": 5e-3}, command=[], status="failed", metric=None, seconds=1.0))
    runs = [sweep_run(t, "val/loss") for t in trials]
    assert runs[2].summary_metrics["val/loss"] == 0.5 and runs[2].state == sweeps.RunState.finished
    assert runs[4].state == sweeps.RunState.failed and "val/loss" not in runs[4].summary_metrics
    assert runs[1].metric_extremum("val/loss", "minimum") == 1.0
    suggestion = sweeps.next_run(spec, runs)
    assert 1e-5 <= float(suggestion.config["lr"]["value"]) <= 1e-2


def test_a_failing_trial_is_recorded_as_failed(tmp_path):
    spec = {"name": "fails", "method": "random", "metric": {"name": "val/loss"},
            "parameters": {"x": {"values": [1, 2]}},
            "command": ["${interpreter}", "-c", "import sys; sys.exit(3)", "${args}"]}
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    trials = run_sweep(spec_path, count=2, out_dir=tmp_path / "out", interpreter=sys.executable)
    assert [t.status for t in trials] == ["failed", "failed"] and all(t.metric is None for t in trials)
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert [r["status"] for r in rows] == ["failed", "failed"] and rows[0]["val/loss"] == ""


def test_read_trial_result_takes_the_runs_final_metric(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,val/loss,train/loss\n0,2.0,\n1,,1.5\n2,1.25,\n")
    info = tmp_path / "run_info.json"
    info.write_text(json.dumps({"status": "finished", "metrics": {"val/loss": 1.25}, "csv_metrics": [str(metrics)]}))
    status, value, summary, history = read_trial_result(info, "val/loss", returncode=0)
    assert (status, value) == ("finished", 1.25)
    assert [row.get("val/loss") for row in history] == [2.0, None, 1.25]
    # An exit code other than 0 fails the trial even with a value; no run_info also fails it.
    assert read_trial_result(info, "val/loss", returncode=1)[0] == "failed"
    assert read_trial_result(tmp_path / "missing.json", "val/loss", returncode=0)[:2] == ("failed", None)


def test_two_trial_offline_sweep_of_a_tiny_config(tiny_sweep):
    """End to end: ``rlhf.sweep`` ran two ``rlhf.fit`` trials with different hyperparameters
    and read each trial's metric back from its own run."""
    trials = tiny_sweep["trials"]
    assert len(trials) == 2
    assert [t.status for t in trials] == ["finished", "finished"]
    assert trials[0].params != trials[1].params
    assert set(trials[0].params) == {"model.init_args.lr", "model.init_args.base.lora.r"}
    for trial in trials:
        info = json.loads(Path(trial.run_info).read_text())
        assert info["status"] == "finished"
        # The sampled values reached the run: its saved resolved config has them.
        (csv_path,) = info["csv_metrics"]
        saved = yaml.safe_load((Path(csv_path).parent / "config.yaml").read_text())
        for name, value in trial.params.items():
            assert nested(saved, name) == pytest.approx(value)
        # The metric is the run's own last val/loss.
        logged = [float(r["val/loss"]) for r in csv.DictReader(open(csv_path)) if r["val/loss"]]
        assert trial.metric == pytest.approx(logged[-1]) and math.isfinite(trial.metric)
        # Each trial also made an offline W&B run with the id the driver gave it.
        (wandb_run,) = info["wandb"]
        assert wandb_run["id"].endswith(f"-{trial.index:03d}") and Path(wandb_run["dir"]).exists()
    rows = list(csv.DictReader(open(tiny_sweep["out"] / "results.csv")))
    assert [int(r["trial"]) for r in rows] == [0, 1]
    assert [float(r["val/loss"]) for r in rows] == pytest.approx([t.metric for t in trials])
    assert {(r["model.init_args.lr"], r["model.init_args.base.lora.r"]) for r in rows} == {
        (str(t.params["model.init_args.lr"]), str(t.params["model.init_args.base.lora.r"])) for t in trials
    }
