"""``python -m rlhf.compare``: the maths of the report (CIs over seeds, end vs peak, best-of-n),
config errors, the snapshot callback, and resumability with a fake training command and a fake
evaluator; one slow end-to-end comparison on the tiny models."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rlhf.compare.config import CompareConfigError, fit_setting, load_config, missing_inputs, select
from rlhf.compare.report import build_report, write_report
from rlhf.compare.runs import (
    RunPaths,
    eval_points,
    finish_attempt,
    plan,
    prune_snapshots,
    run_comparison,
    run_paths,
    start_attempt,
    train_fingerprint,
    train_seconds,
)
from rlhf.compare.snapshots import (
    PolicySnapshots,
    list_snapshots,
    read_saving_seconds,
    read_steps,
)
from rlhf.compare.stats import (
    Scored,
    best_of_n,
    best_of_n_kl_bound,
    end_and_peak,
    gold_verdict,
    mean_ci95,
    method_summary,
    overoptimisation_verdict,
    seed_summary,
    summarise,
    t_quantile_975,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- the maths
def test_ci_over_seeds_is_a_t_interval_on_the_given_numbers():
    ci = mean_ci95([1.0, 2.0, 3.0])  # mean 2, sample sd 1, t(0.975, 2) = 4.303
    assert ci["mean"] == pytest.approx(2.0)
    assert ci["half_width"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    assert (ci["low"], ci["high"], ci["n"]) == pytest.approx((2 - 2.48434, 2 + 2.48434, 3), rel=1e-4)
    one = mean_ci95([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["half_width"]) and one["n"] == 1
    assert mean_ci95([1.0, float("nan"), 3.0])["n"] == 2  # a missing number is dropped, not zero
    assert mean_ci95([])["n"] == 0


def test_t_quantiles_beyond_the_table_are_close_to_the_exact_ones():
    assert t_quantile_975(1) == pytest.approx(12.706)
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_peak_and_end_of_a_curve():
    out = end_and_peak([0, 10, 20, 30], [0.19, 0.28, 0.26, 0.26])
    assert out == {"end": 0.26, "end_step": 30, "peak": 0.28, "peak_step": 10}
    assert end_and_peak([5, 10], [0.3, 0.3])["peak_step"] == 5  # a tie: the first step to reach it
    with pytest.raises(ValueError, match="increase"):
        end_and_peak([10, 5], [0.1, 0.2])
    with pytest.raises(ValueError, match="as many"):
        end_and_peak([1, 2], [0.1])


def test_best_of_n_kl_bound_matches_the_integral_for_continuous_scores():
    """For distinct samples, best-of-n has density n F^(n-1) relative to the base: its KL is
    E[log(n u^(n-1))] with u ~ Beta(n, 1), computed here by quadrature."""
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)
    for n in (2, 4, 16):
        u = torch.linspace(0, 1, 200_001, dtype=torch.float64)[1:]
        density = n * u ** (n - 1)
        kl = torch.trapezoid(density * torch.log(density), u).item()
        assert kl == pytest.approx(best_of_n_kl_bound(n), abs=1e-4)


def rows(scores: list[list[float]]) -> list[Scored]:
    """One row per (prompt, draw): proxy = the given score, gold = 10 x it, length = draw."""
    return [Scored(p, s, v, 10 * v, 0.1, s, s % 2 == 0) for p, draws in enumerate(scores) for s, v in enumerate(draws)]


def test_best_of_n_keeps_each_groups_highest_proxy_score():
    chosen = best_of_n(rows([[0.1, 0.5, 0.2, 0.2], [0.3, 0.1, 0.9, 0.9]]), 2)
    assert [(r.prompt_id, r.sample) for r in chosen] == [(0, 1), (0, 2), (1, 0), (1, 2)]  # ties: earliest
    summary = summarise(chosen, kl=best_of_n_kl_bound(2))
    assert summary["gold"] == pytest.approx(10 * (0.5 + 0.2 + 0.3 + 0.9) / 4)
    assert summary["kl"] == pytest.approx(best_of_n_kl_bound(2))
    assert summary["sqrt_kl"] == pytest.approx(math.sqrt(best_of_n_kl_bound(2)))
    with pytest.raises(ValueError, match="not n=2"):
        best_of_n(rows([[0.1, 0.2, 0.3]]), 2)


def test_seed_rows_and_method_summary():
    points = [{"step": s, "gold": g, "proxy": g + 1, "kl": s / 10, "sqrt_kl": math.sqrt(s / 10),
               "length": 5.0, "eos_rate": 0.5} for s, g in ((10, 0.3), (20, 0.5), (30, 0.4))]
    row = seed_summary(points, 60.0)
    assert (row["gold_end"], row["gold_peak"], row["gold_peak_step"], row["kl_end"]) == (0.4, 0.5, 20, 3.0)
    other = seed_summary([{**p, "gold": p["gold"] + 0.2} for p in points], None)
    summary = method_summary({0: row, 1: other})
    assert summary["gold_end"]["mean"] == pytest.approx(0.5)
    assert summary["gold_end"]["half_width"] == pytest.approx(12.706 * 0.1, rel=1e-4)  # sd 0.1414 / sqrt 2
    assert summary["wall_seconds"]["n"] == 1  # the seed without a time is left out, not zero


def test_seed_rows_pair_with_the_reference_and_keep_the_last_segment():
    points = [{"step": s, "gold": g, "proxy": p, "kl": 1.0, "sqrt_kl": 1.0, "length": 5.0, "eos_rate": 0.5}
              for s, g, p in ((10, 0.30, 0.1), (20, 0.25, 0.4))]
    row = seed_summary(points, None, start={"gold": 0.2, "proxy": 0.0})
    assert row["gold_gain"] == pytest.approx(0.05) and row["proxy_gain"] == pytest.approx(0.4)
    assert row["gold_last_change"] == pytest.approx(-0.05) and row["proxy_last_change"] == pytest.approx(0.3)
    alone = seed_summary(points[:1], None)
    assert "gold_gain" not in alone and math.isnan(alone["gold_last_change"])


def summary_of(**values: list[float]) -> dict:
    return {key: mean_ci95(v) for key, v in values.items()}


@pytest.mark.parametrize(("gains", "start"), [
    ([0.05, 0.06, 0.07], "raises gold over the reference: +0.060"),
    ([-0.05, -0.06, -0.07], "lowers gold below the reference"),
    ([0.05, -0.04, 0.02], "no clear change in gold"),
    ([0.05], "gold +0.050 vs the reference (one seed"),
])
def test_the_gold_verdict_follows_the_paired_interval(gains, start):
    assert gold_verdict(summary_of(gold_gain=gains)).startswith(start)


def test_over_optimisation_needs_gold_falling_as_the_proxy_rises():
    falling = summary_of(gold_last_change=[-0.05, -0.06, -0.04], proxy_last_change=[0.2, 0.3, 0.25])
    assert overoptimisation_verdict(falling).startswith("over-optimises: gold -0.050 while the proxy +0.250")
    noisy = summary_of(gold_last_change=[-0.05, 0.03, -0.04], proxy_last_change=[0.2, 0.3, 0.25])
    assert overoptimisation_verdict(noisy).startswith("may over-optimise")
    both_rise = summary_of(gold_last_change=[0.05, 0.06, 0.04], proxy_last_change=[0.2, 0.3, 0.25])
    assert overoptimisation_verdict(both_rise) is None
    assert overoptimisation_verdict(summary_of(gold_last_change=[], proxy_last_change=[])) is None


# ------------------------------------------------------------------------------- configs
def write_inputs(root: Path) -> dict[str, Path]:
    """A reference and a proxy (stage markers only), a prompt file and a fit config on the
    reference's merged model."""
    reference, proxy = root / "sft", root / "rm"
    for path in (reference, proxy):
        path.mkdir(parents=True)
        (path / "rlhf_stage.json").write_text("{}")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    fit = root / "fit.yaml"
    fit.write_text(yaml.safe_dump({"model": {"init_args": {"base": {"name_or_path": str(reference / "model")},
                                                            "reward": {"model": str(proxy)}}}}))
    return {"reference": reference, "proxy": proxy, "prompts": prompts, "fit": fit}


def compare_config(root: Path, inputs: dict[str, Path], **changes) -> dict:
    config = {
        "out": str(root / "compare"), "seeds": [0, 1], "reference": str(inputs["reference"]),
        "proxy": str(inputs["proxy"]), "gold": "vader",
        "eval": {"data": [str(inputs["prompts"])], "split": "all", "samples_per_prompt": 2},
        "methods": {
            "sft": {"reference": True},
            "bon2": {"best_of_n": 2},
            "a": {"fit": str(inputs["fit"]), "snapshot_every": 2, "budget": "4 steps"},
            "b": {"fit": str(inputs["fit"]), "args": ["--model.init_args.lr=0.1"]},
        },
    }
    config.update(changes)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c.update(extra=1), r"unknown top-level key\(s\) \['extra'\]"),
    (lambda c: c.pop("proxy"), r"missing key\(s\) \['proxy'\]"),
    (lambda c: c["methods"]["a"].update(fitt="x"), r"methods\.a: unknown key\(s\) \['fitt'\]"),
    (lambda c: c["methods"]["a"].update(fit="nope.yaml"), r"methods\.a\.fit: config file nope\.yaml does not exist"),
    (lambda c: c["eval"].update(data=["missing.jsonl"]), r"eval\.data\[0\]: prompt file missing\.jsonl does not exist"),
    (lambda c: c["eval"].update(sample_per_prompt=2), r"eval: unknown key\(s\) \['sample_per_prompt'\]"),
    (lambda c: c["eval"].update(temperature=0), r"eval\.temperature: must be > 0"),
    (lambda c: c["methods"]["a"].update(best_of_n=4), r"methods\.a: give exactly one of"),
    (lambda c: c["methods"]["bon2"].update(snapshot_every=2), r"methods\.bon2: \['snapshot_every'\] only apply"),
    (lambda c: c["methods"]["b"].update(args=["--seed_everything=3"]), r"methods\.b\.args: --seed_everything is set"),
    (lambda c: c["methods"].update({"a/b": {"reference": True}}), r"method name 'a/b'"),
    (lambda c: c.update(seeds=[0, 0]), r"seeds: \[0, 0\] repeats a seed"),
    (lambda c: c.update(gold="nope"), r"gold: unknown gold function 'nope'"),
    (lambda c: c.update(reference="elsewhere"), r"methods\.a: .*fit\.yaml starts from .*not the reference elsewhere"),
    (lambda c: c["methods"]["b"].update(args=["--model.init_args.reward.model=other"]),
     r"methods\.b: .*sets model\.init_args\.reward\.model='other', not the proxy"),
    (lambda c: c["methods"]["b"].update(args=["--model.init_args.reward.model=[other, more]"], rewards=["other"]),
     r"methods\.b: .*sets model\.init_args\.reward\.model=\['other', 'more'\], not its rewards \['other'\]"),
    (lambda c: c["methods"]["bon2"].update(rewards=["other"]), r"methods\.bon2: \['rewards'\] only apply"),
    (lambda c: c.update(fit_args="--model.init_args.lr=0.1"), r"fit_args: expected a list of strings"),
    (lambda c: c.update(fit_args=["--ckpt_path=last"]), r"fit_args: --ckpt_path is set by the comparison"),
    (lambda c: c.update(fit_args=["--model.init_args.reward.model=other"]),
     r"methods\.a: .*sets model\.init_args\.reward\.model='other', not the proxy"),
])
def test_bad_configs_name_the_file_the_key_and_the_problem(tmp_path, change, message):
    config = compare_config(tmp_path, write_inputs(tmp_path))
    change(config)
    path = write_config(tmp_path / "compare.yaml", config)
    with pytest.raises(CompareConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_fit_args_go_to_every_trained_method_before_its_own(tmp_path):
    config = compare_config(tmp_path, write_inputs(tmp_path),
                            fit_args=["--model.init_args.iterations=60", "--model.init_args.lr=0.5"])
    loaded = load_config(write_config(tmp_path / "compare.yaml", config))
    assert loaded.methods["a"].args == ("--model.init_args.iterations=60", "--model.init_args.lr=0.5")
    assert loaded.methods["b"].args == ("--model.init_args.iterations=60", "--model.init_args.lr=0.5",
                                        "--model.init_args.lr=0.1")
    assert loaded.methods["sft"].args == () and loaded.methods["bon2"].args == ()
    # the method's own args come last, so they win over a shared one
    assert fit_setting(loaded.methods["a"], "model.init_args.lr") == "0.5"
    assert fit_setting(loaded.methods["b"], "model.init_args.lr") == "0.1"


def test_a_method_may_optimise_its_own_reward_models_which_must_exist_and_stamp_its_runs(tmp_path):
    inputs = write_inputs(tmp_path)
    config = compare_config(tmp_path, inputs)
    odin, member = tmp_path / "rm_odin", tmp_path / "rm1"
    config["methods"]["b"].update(args=[f"--model.init_args.reward.model=[{inputs['proxy']}, {member}]"],
                                  rewards=[str(inputs["proxy"]), str(member)])
    config["methods"]["a"].update(args=[f"--model.init_args.reward.model={odin}"], rewards=[str(odin)])
    loaded = load_config(write_config(tmp_path / "compare.yaml", config))
    assert loaded.methods["a"].rewards == (odin,)
    assert [p for p in missing_inputs(loaded) if "rewards" in p] == [
        f"{tmp_path / 'compare.yaml'}: methods.a.rewards: {odin} is not a complete stage output (no "
        f"rlhf_stage.json there); run the stage that writes it first",
        f"{tmp_path / 'compare.yaml'}: methods.b.rewards: {member} is not a complete stage output (no "
        f"rlhf_stage.json there); run the stage that writes it first"]
    # a method that is not run needs nothing
    assert [p for p in missing_inputs(loaded, ["b"]) if "rewards" in p] == [
        (f"{tmp_path / 'compare.yaml'}: methods.b.rewards: {member} is not a complete stage output (no "
         f"rlhf_stage.json there); run the stage that writes it first")]
    assert [p for p in missing_inputs(loaded, []) if "rewards" in p] == []
    before = train_fingerprint(loaded, loaded.methods["a"], 0)
    odin.mkdir()
    (odin / "rlhf_stage.json").write_text("{}")
    assert train_fingerprint(loaded, loaded.methods["a"], 0) != before  # a retrained RM retrains the run


def test_unknown_methods_and_seeds_on_the_command_line_are_refused(tmp_path):
    config = load_config(write_config(tmp_path / "c.yaml", compare_config(tmp_path, write_inputs(tmp_path))))
    assert select(config, ["a"], [1]) == (["a"], [1])
    with pytest.raises(CompareConfigError, match=r"unknown method\(s\) \['c'\]"):
        select(config, ["c"], None)
    with pytest.raises(CompareConfigError, match=r"\[5\] not in"):
        select(config, None, [5])
    from rlhf.compare.__main__ import main

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["--config", str(tmp_path / "c.yaml"), "--methods", "a,zzz", "--dry-run"]) == 2


# ------------------------------------------------------------------------------- snapshots
class FakeStage:
    """A stage module whose save consumes random numbers (as loading a base model can)."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def save_outputs(self, output_dir: str) -> None:
        torch.rand(100)
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "rlhf_stage.json").write_text("{}")
        self.saved.append(Path(output_dir).name)


def fake_trainer(step: int, last: int) -> SimpleNamespace:
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=step - 1)),
                           should_stop=step == last, max_steps=-1, global_step=step, is_global_zero=True,
                           interrupted=False)


def test_snapshots_every_k_steps_keep_the_rng_and_skip_the_last_step(tmp_path):
    callback, stage = PolicySnapshots(2, str(tmp_path / "snaps")), FakeStage()
    torch.manual_seed(0)
    expected = [torch.rand(1) for _ in range(5)]
    torch.manual_seed(0)
    drawn = []
    for step in range(1, 6):
        drawn.append(torch.rand(1))  # the "training step"
        callback.on_train_batch_end(fake_trainer(step, 4 if step == 4 else 0), stage, None, None, step - 1)
    assert stage.saved == ["step00002"]  # step 4 ended the run (should_stop): its output is final
    assert torch.equal(torch.cat(drawn), torch.cat(expected))  # saving did not move the RNG
    callback.on_train_end(fake_trainer(4, 4), stage)
    assert read_steps(tmp_path / "snaps") == 4
    assert [s for s, _ in list_snapshots(tmp_path / "snaps")] == [2]
    assert read_saving_seconds(tmp_path / "snaps") > 0
    with pytest.raises(ValueError):
        PolicySnapshots(-1, str(tmp_path))


# ------------------------------------------------------------------------------- resumability
FAKE_FIT = """#!{python}
# Stands in for `python -m rlhf.fit`: logs its arguments, fails while $FAKE_FIT_FAIL names its
# output (unless resuming), else writes what a finished run under rlhf.compare leaves.
import json, os, sys
from pathlib import Path
args = sys.argv[3:]
with open(os.environ["FAKE_FIT_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
value = lambda prefix: next(a[len(prefix):] for a in args if a.startswith(prefix))
out = value("--model.init_args.output_dir=")
fail = os.environ.get("FAKE_FIT_FAIL")
if fail and fail in out and "--ckpt_path" not in args:
    sys.exit(1)
callback = json.loads(value("--trainer.callbacks+="))["init_args"]
snaps, every = Path(callback["dirpath"]), callback["every_n_steps"]
for step in range(every, 4, every) if every else []:
    (snaps / f"step{{step:05d}}" / "model").mkdir(parents=True, exist_ok=True)
    (snaps / f"step{{step:05d}}" / "rlhf_stage.json").write_text(json.dumps({{"model_dir": "model"}}))
snaps.mkdir(parents=True, exist_ok=True)
(snaps / "steps.json").write_text(json.dumps({{"steps": 4}}))
(snaps / "saving.json").write_text(json.dumps({{"step00002": 0.001}}))
Path(out).mkdir(parents=True, exist_ok=True)
(Path(out) / "rlhf_stage.json").write_text("{{}}")
"""


class FakeEvaluator:
    """Records what it is asked to evaluate; gold at step s of seed k is 0.1 k + 0.01 s."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, list[int], int | None]] = []

    def evaluate(self, kind, seed, points=None, n=None):
        steps = [s for s, _ in points] if points else [0]
        self.calls.append((kind, seed, steps, n))
        return {"points": [{"step": s, "policy": "p", "gold": 0.1 * seed + 0.01 * s, "proxy": 1.0 + s,
                            "kl": s / 4, "sqrt_kl": math.sqrt(s / 4), "length": 5.0, "eos_rate": 1.0,
                            "samples": 2.0} for s in steps],
                "samples": [], "prompts": 1, "eval_seconds": 0.5}


@pytest.fixture
def fake_setup(tmp_path, monkeypatch):
    inputs = write_inputs(tmp_path)
    config_path = write_config(tmp_path / "compare.yaml", compare_config(tmp_path, inputs))
    python = tmp_path / "fake_python"
    python.write_text(FAKE_FIT.format(python=sys.executable))
    python.chmod(0o755)
    log = tmp_path / "fit.log"
    log.touch()
    monkeypatch.setenv("FAKE_FIT_LOG", str(log))
    monkeypatch.delenv("FAKE_FIT_FAIL", raising=False)

    def run(config=None, methods=None, seeds=None):
        config = config or load_config(config_path)
        evaluator = FakeEvaluator()
        before = len(log.read_text().splitlines())
        outcome = run_comparison(config, methods or list(config.methods), seeds or list(config.seeds),
                                 evaluator, python=str(python), say=lambda text: None)
        fits = [json.loads(line) for line in log.read_text().splitlines()[before:]]
        return outcome, fits, evaluator.calls

    return SimpleNamespace(root=tmp_path, config_path=config_path, inputs=inputs, run=run)


def output_of(args: list[str]) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith("--model.init_args.output_dir="))


def test_a_complete_comparison_runs_nothing_again_and_a_missing_run_runs_alone(fake_setup):
    outcome, fits, evals = fake_setup.run()
    assert outcome.exit_code == 0
    assert sorted(Path(output_of(f)).parent.relative_to(fake_setup.root / "compare").as_posix() for f in fits) == [
        "a/seed0", "a/seed1", "b/seed0", "b/seed1"]
    assert ("fit", 0, [2, 4], None) in evals and ("fit", 1, [4], None) in evals  # b: no snapshots
    assert ("best_of_n", 1, [0], 2) in evals and len(evals) == 8
    assert all(a.action == "skip" for a in plan(load_config(fake_setup.config_path), ["sft", "bon2", "a", "b"], [0, 1]))

    _, fits, evals = fake_setup.run()
    assert fits == [] and evals == []

    shutil.rmtree(fake_setup.root / "compare" / "a" / "seed1")
    _, fits, evals = fake_setup.run()
    assert [output_of(f) for f in fits] == [str(fake_setup.root / "compare/a/seed1/policy")]
    assert evals == [("fit", 1, [2, 4], None)]


def test_an_interrupted_run_resumes_from_its_checkpoint_and_its_attempts_add_up(fake_setup, monkeypatch):
    monkeypatch.setenv("FAKE_FIT_FAIL", "b/seed0")
    outcome, fits, evals = fake_setup.run()
    assert outcome.exit_code == 1  # reported, and the other runs went on
    assert len(fits) == 4 and len(evals) == 7  # b/seed0 failed: trained once, not evaluated
    assert not (fake_setup.root / "compare/b/seed0/eval.json").exists()
    dry = [a for a in plan(load_config(fake_setup.config_path), ["b"], [0, 1]) if a.what == "train"]
    assert [(a.seed, a.action) for a in dry] == [(0, "resume"), (1, "skip")]

    monkeypatch.delenv("FAKE_FIT_FAIL")
    outcome, fits, evals = fake_setup.run()
    assert outcome.exit_code == 0
    assert len(fits) == 1 and fits[0][-2:] == ["--ckpt_path", "last"]
    assert evals == [("fit", 0, [4], None)]
    times = json.loads((fake_setup.root / "compare/b/seed0/train_time.json").read_text())["attempts"]
    assert [a["status"] for a in times] == ["failed", "ran"]
    paths = run_paths(load_config(fake_setup.config_path), "b", 0)
    assert train_seconds(paths) == pytest.approx(sum(a["seconds"] for a in times) - 0.001)


def test_an_attempt_killed_with_the_comparison_counts_until_its_last_write(tmp_path):
    paths = RunPaths(tmp_path / "run")
    start_attempt(paths, fresh=True)  # ... and the comparison is killed with its stage
    started = json.loads(paths.train_time.read_text())["attempts"][0]["started_at"]
    paths.logs.mkdir(parents=True)
    (paths.logs / "metrics.csv").write_text("step\n")
    os.utime(paths.logs / "metrics.csv", (started + 40, started + 40))
    start_attempt(paths, fresh=False)  # the next invocation resumes the run
    finish_attempt(paths, 5.0, "ran")
    attempts = json.loads(paths.train_time.read_text())["attempts"]
    assert attempts[0]["status"].startswith("killed") and attempts[0]["seconds"] == pytest.approx(40)
    assert (attempts[1]["status"], attempts[1]["seconds"]) == ("ran", 5.0)
    assert train_seconds(paths) == pytest.approx(45)
    start_attempt(paths, fresh=True)  # a run started anew forgets the old attempts
    assert len(json.loads(paths.train_time.read_text())["attempts"]) == 1


def test_changed_evaluation_settings_re_evaluate_without_retraining(fake_setup):
    fake_setup.run()
    config = compare_config(fake_setup.root, fake_setup.inputs)
    config["eval"]["samples_per_prompt"] = 3
    _, fits, evals = fake_setup.run(load_config(write_config(fake_setup.config_path, config)))
    assert fits == [] and len(evals) == 8


def test_pruned_snapshots_are_not_evaluated_again_silently(fake_setup):
    fake_setup.run()
    config = load_config(fake_setup.config_path)
    assert prune_snapshots(run_paths(config, "a", 0)) == 1
    assert not (fake_setup.root / "compare/a/seed0/snapshots/step00002/model").exists()
    changed = compare_config(fake_setup.root, fake_setup.inputs)
    changed["eval"]["samples_per_prompt"] = 3
    outcome, fits, evals = fake_setup.run(load_config(write_config(fake_setup.config_path, changed)))
    assert outcome.exit_code == 1 and fits == [] and len(evals) == 7  # a/seed0 refused, the rest re-ran
    with pytest.raises(FileNotFoundError, match="step00002 has no merged model"):
        eval_points(load_config(fake_setup.config_path), config.methods["a"], 0)


def test_the_report_aggregates_over_seeds_and_lists_what_is_missing(fake_setup):
    fake_setup.run(seeds=[0, 1])
    shutil.rmtree(fake_setup.root / "compare" / "b" / "seed1")
    config = load_config(fake_setup.config_path)
    report = build_report(config)
    a = report["methods"]["a"]
    assert a["summary"]["gold_end"]["mean"] == pytest.approx((0.04 + 0.14) / 2)
    assert a["summary"]["gold_end"]["half_width"] == pytest.approx(12.706 * 0.05, rel=1e-4)
    assert a["curves"]["0"][0] == {**report["methods"]["sft"]["curves"]["0"][0], "step": 0}  # starts at SFT
    assert [p["step"] for p in a["curves"]["1"]] == [0, 2, 4]
    assert report["methods"]["b"]["missing_seeds"] == [1]
    assert report["methods"]["bon2"]["summary"]["wall_seconds"]["mean"] == 0.5  # its sampling time
    paths = write_report(config)
    markdown = paths["markdown"].read_text()
    assert "| a | 4 steps | 2/2 | 0.090 ± 0.635 |" in markdown
    assert "**Missing** (not run, failed, or out of date): b/seed1." in markdown
    # a gains 0.01 x 4 steps over the reference in each seed; bon2 is the reference's draws
    assert "- **a**: raises gold over the reference: +0.040 (95% CI +0.040 to +0.040); gold 0.090 at KL 1.00: above bon2" in markdown
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["methods"]["a"]["seeds"] == [0, 1]


# ------------------------------------------------------------------------------- end to end
def tiny_fit_configs(root: Path, qs: dict) -> dict[str, Path]:
    """Tiny PPO (4 iterations) and DPO (4 steps) configs on the tiny quickstart's SFT and RM."""
    sys.path.insert(0, str(Path(__file__).parent))
    from run_builders import DATA, trainer

    data = qs["outputs"].parent / "data"
    sft, rm = str(qs["outputs"] / "sft" / "model"), str(qs["outputs"] / "rm")
    checkpoint = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1}}]
    quiet = {"enable_checkpointing": True, "callbacks": checkpoint, "limit_val_batches": 0}
    ppo = {"seed_everything": 0, "trainer": {**trainer(root / "runs", 3), "max_steps": -1, "max_epochs": -1, **quiet},
           "model": {"class_path": "rlhf.ppo.PPOModule", "init_args": {
               "base": {"name_or_path": sft, "lora": {"r": 4}}, "reward": {"model": rm},
               "sampling": {"max_new_tokens": 6}, "update": {"ppo_epochs": 1}, "iterations": 4, "gold": "vader"}},
           "data": {"class_path": "rlhf.data.PromptDataModule",
                    "init_args": {"train": {"path": str(data / "prompts.jsonl")}, **DATA}}}
    dpo = {"seed_everything": 0, "trainer": {**trainer(root / "runs", 4), **quiet},
           "model": {"class_path": "rlhf.dpo.DPOModule", "init_args": {
               "base": {"name_or_path": sft, "lora": {"r": 4}}, "lr": 1e-3}},
           "data": {"class_path": "rlhf.dpo.DPODataModule",
                    "init_args": {"train": {"path": str(data / "prefs.jsonl")}, **DATA}}}
    return {"ppo": write_config(root / "ppo.yaml", ppo), "dpo": write_config(root / "dpo.yaml", dpo)}


@pytest.mark.slow
def test_tiny_comparison_end_to_end_then_nothing_to_redo(tmp_path, tiny_quickstart):
    qs = tiny_quickstart
    fits = tiny_fit_configs(tmp_path, qs)
    config = {
        "out": str(tmp_path / "compare"), "seeds": [0, 1], "reference": str(qs["outputs"] / "sft"),
        "proxy": str(qs["outputs"] / "rm"), "gold": "vader",
        "eval": {"data": [str(qs["outputs"].parent / "data" / "prompts.jsonl")], "split": "all", "limit": 4,
                 "max_length": 48, "max_prompt_length": 24, "batch_size": 4, "samples_per_prompt": 2,
                 "max_new_tokens": 6, "precision": "32", "device": "cpu"},
        "methods": {"sft": {"reference": True},
                    "ppo": {"fit": str(fits["ppo"]), "snapshot_every": 2, "budget": "4 iterations"},
                    "dpo": {"fit": str(fits["dpo"]), "budget": "4 steps"}},
    }
    path = write_config(tmp_path / "compare.yaml", config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "rlhf.compare", "--config", str(path)]
    first = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "compare" / "report.json").read_text())
    for name in ("sft", "ppo", "dpo"):
        assert report["methods"][name]["seeds"] == [0, 1]
    assert report["methods"]["sft"]["per_seed"]["0"]["kl_end"] == 0.0  # the reference against itself
    assert [p["step"] for p in report["methods"]["ppo"]["curves"]["0"]] == [0, 2, 4]
    assert [p["step"] for p in report["methods"]["dpo"]["curves"]["1"]] == [0, 4]
    ppo0 = report["methods"]["ppo"]["per_seed"]["0"]
    assert ppo0["wall_seconds"] > 0 and 0.0 <= ppo0["eos_rate_end"] <= 1.0 and ppo0["length_end"] > 0
    assert (tmp_path / "compare" / "figure.png").stat().st_size > 0
    # The same run without the snapshot callback ends with the same weights: saving snapshots
    # does not move the random stream.
    plain = tmp_path / "plain"
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(plain), "name": "csv"}}]
    fit = subprocess.run([sys.executable, "-m", "rlhf.fit", "--config", str(fits["ppo"]), "--seed_everything=0",
                          f"--model.init_args.output_dir={plain / 'policy'}", f"--trainer.default_root_dir={plain}",
                          f"--trainer.logger={json.dumps(logger)}"], check=False, capture_output=True, text=True, cwd=REPO, env=env)
    assert fit.returncode == 0, fit.stderr[-3000:]
    from safetensors.torch import load_file

    with_snapshots = load_file(tmp_path / "compare/ppo/seed0/policy/model/model.safetensors")
    without = load_file(plain / "policy/model/model.safetensors")
    assert with_snapshots.keys() == without.keys()
    assert all(torch.equal(with_snapshots[k], without[k]) for k in without)
    again = subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[rlhf.pipeline]" not in again.stdout and again.stdout.count("complete, skipped") == 10


@pytest.mark.parametrize("name", ["compare", "guards", "guards_substantive", "guards_pressure"])
def test_the_shipped_gold_comparison_configs_load(name):
    root = Path(__file__).resolve().parents[1]
    config = load_config(root / "configs" / "gold" / f"{name}.yaml")
    assert config.methods["sft"].kind == "reference" and len(config.seeds) >= 3
