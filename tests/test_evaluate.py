"""The evaluation report's numbers on a hand-made fixture (no model)."""

from __future__ import annotations

import json
import math

import pytest

from rlhf.comparisons import SampleRow, head_to_head, mean_and_se, policy_summary
from rlhf.evaluate import Report, write_report


def row(policy, prompt_id, sample, reward, kl=0.0, length=4, eos=True):
    return SampleRow(policy, prompt_id, sample, f"prompt {prompt_id}", f"{policy} says {reward}", reward, kl, length, eos)


@pytest.fixture
def rows():
    # Two prompts x two samples. ppo beats sft on 3 of 4 pairs and ties once.
    sft = [row("sft", 0, 0, 0.0), row("sft", 0, 1, 1.0), row("sft", 1, 0, 0.5), row("sft", 1, 1, 0.5)]
    ppo = [
        row("ppo", 0, 0, 1.0, kl=2.0, length=6), row("ppo", 0, 1, 2.0, kl=4.0, length=8, eos=False),
        row("ppo", 1, 0, 0.5, kl=1.0, length=4), row("ppo", 1, 1, 1.5, kl=1.0, length=4),
    ]
    return sft + ppo


def test_mean_and_standard_error():
    assert mean_and_se([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2) / math.sqrt(2)))
    assert mean_and_se([5.0]) == (5.0, 0.0)


def test_policy_summary_averages_per_prompt_first(rows):
    s = policy_summary([r for r in rows if r.policy == "ppo"])
    # per-prompt rewards: prompt 0 -> 1.5, prompt 1 -> 1.0
    assert s["reward_mean"] == pytest.approx(1.25)
    assert s["reward_se"] == pytest.approx(math.sqrt(0.125) / math.sqrt(2))
    assert s["kl_mean"] == pytest.approx((3.0 + 1.0) / 2)
    assert s["length_mean"] == pytest.approx((7 + 4) / 2)
    assert s["eos_rate"] == pytest.approx(0.75)
    assert (s["prompts"], s["samples"]) == (2, 4)


def test_head_to_head_counts_ties_half(rows):
    c = head_to_head([r for r in rows if r.policy == "sft"], [r for r in rows if r.policy == "ppo"])
    # prompt 0: wins 1, 1 -> 1.0; prompt 1: tie 0.5, win 1 -> 0.75
    assert c["win_rate"] == pytest.approx(0.875)
    assert c["win_rate_se"] == pytest.approx(math.sqrt(((1 - 0.875) ** 2 + (0.75 - 0.875) ** 2)) / math.sqrt(2))
    # differences: prompt 0: 1, 1 -> 1; prompt 1: 0, 1 -> 0.5
    assert c["reward_diff"] == pytest.approx(0.75)
    assert (c["pairs"], c["prompts"]) == (4, 2)


def test_head_to_head_same_ending_pairs_drop_the_length_only_wins():
    # ppo wins where it runs on past an sft reply that ended, loses where both end alike.
    sft = [row("sft", 0, 0, 0.0, eos=True), row("sft", 0, 1, 1.0, eos=False),
           row("sft", 1, 0, 0.0, eos=True), row("sft", 1, 1, 2.0, eos=True)]
    ppo = [row("ppo", 0, 0, 1.0, eos=False), row("ppo", 0, 1, 0.5, eos=False),
           row("ppo", 1, 0, 1.0, eos=False), row("ppo", 1, 1, 1.0, eos=True)]
    c = head_to_head(sft, ppo)
    assert c["win_rate"] == pytest.approx(0.5) and c["reward_diff"] == pytest.approx(0.125)
    # same ending: (0, 1) diff -0.5 and (1, 1) diff -1.0, one pair per prompt
    assert c["same_ending_pairs"] == 2
    assert c["same_ending_win_rate"] == pytest.approx(0.0)
    assert c["same_ending_reward_diff"] == pytest.approx(-0.75)
    assert c["same_ending_reward_diff_se"] == pytest.approx(0.25)
    report = Report.from_rows(sft + ppo, ["sft", "ppo"], {"reward": "rm", "reference": "sft", "prompts": 2,
                              "samples_per_prompt": 2, "temperature": 0.7, "max_new_tokens": 8})
    assert "| ... pairs whose replies end alike (both EOS or both cut) | 0.000 ± 0.000 | -0.7500 ± 0.2500 | 2 |" in report.to_markdown()


def test_head_to_head_needs_shared_samples(rows):
    with pytest.raises(ValueError, match="share no"):
        head_to_head([row("a", 0, 0, 1.0)], [row("b", 1, 0, 1.0)])


def test_report_files(tmp_path, rows):
    settings = {"reward": "rm", "reference": "sft", "prompts": 2, "samples_per_prompt": 2,
                "temperature": 0.7, "max_new_tokens": 8}
    report = Report.from_rows(rows, ["sft", "ppo"], settings)
    out = write_report(report, tmp_path / "eval", show=1)
    data = json.loads((out / "report.json").read_text())
    assert data["comparisons"][0]["win_rate"] == pytest.approx(0.875)
    assert len(data["rows"]) == 8
    md = (out / "report.md").read_text()
    assert "| ppo vs sft | 0.875 ±" in md
    assert "| sft | +0.5000 ± 0.0000 | 0.000 ± 0.000 |" in md
    assert "### Prompt 0" in md and "### Prompt 1" not in md  # show=1
    assert "> ppo says 1.0" in md


def test_report_logs_to_an_active_wandb_run(tmp_path, rows, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from rlhf.evaluate import log_to_wandb

    report = Report.from_rows(rows, ["sft", "ppo"], {})
    assert log_to_wandb(report) is False  # no active run: nothing to do
    monkeypatch.setenv("WANDB_SILENT", "true")
    with wandb.init(project="test", mode="offline", dir=str(tmp_path)) as run:
        assert log_to_wandb(report) is True
        assert run.summary["eval/ppo_vs_sft/win_rate"] == pytest.approx(0.875)
