"""Paired comparisons of sampled policies: per-policy summaries and head-to-head win rates under
a reward model, raw and length-controlled, with standard errors over prompts.

Pure functions on :class:`SampleRow` lists (what :mod:`rlhf.evaluate` samples and scores).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from rlhf.length_bias import length_controlled_win_rate


@dataclass
class SampleRow:
    """One sampled response: prompt ``prompt_id``, sample ``sample`` of policy ``policy``."""

    policy: str
    prompt_id: int
    sample: int
    prompt: str
    response: str
    reward: float
    kl: float
    length: int
    eos: bool


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than 2 values)."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def _per_prompt(rows: Sequence[SampleRow], attr: str) -> dict[int, float]:
    """The mean of ``attr`` over each prompt's samples (the unit errors are computed over)."""
    groups: dict[int, list[float]] = {}
    for row in rows:
        groups.setdefault(row.prompt_id, []).append(float(getattr(row, attr)))
    return {p: statistics.fmean(v) for p, v in groups.items()}


def policy_summary(rows: Sequence[SampleRow]) -> dict[str, float]:
    """Reward, KL, length and EOS rate of one policy's rows, with standard errors over prompts."""
    reward, reward_se = mean_and_se(list(_per_prompt(rows, "reward").values()))
    kl, kl_se = mean_and_se(list(_per_prompt(rows, "kl").values()))
    length, length_se = mean_and_se(list(_per_prompt(rows, "length").values()))
    return {
        "reward_mean": reward,
        "reward_se": reward_se,
        "kl_mean": kl,
        "kl_se": kl_se,
        "length_mean": length,
        "length_se": length_se,
        "eos_rate": statistics.fmean(float(r.eos) for r in rows) if rows else float("nan"),
        "prompts": len({r.prompt_id for r in rows}),
        "samples": len(rows),
    }


def _paired_stats(pairs: Sequence[tuple[SampleRow, SampleRow]]) -> tuple[float, float, float, float, int, int]:
    """Win rate (ties half) and score difference of ``(baseline, challenger)`` pairs, as means
    over prompts with standard errors over prompts; then the pair and prompt counts."""
    wins: dict[int, list[float]] = {}
    diffs: dict[int, list[float]] = {}
    for other, row in pairs:
        win = 1.0 if row.reward > other.reward else 0.5 if row.reward == other.reward else 0.0
        wins.setdefault(row.prompt_id, []).append(win)
        diffs.setdefault(row.prompt_id, []).append(row.reward - other.reward)
    win, win_se = mean_and_se([statistics.fmean(v) for v in wins.values()])
    diff, diff_se = mean_and_se([statistics.fmean(v) for v in diffs.values()])
    return win, win_se, diff, diff_se, len(pairs), len(wins)


def head_to_head(baseline: Sequence[SampleRow], challenger: Sequence[SampleRow]) -> dict[str, float]:
    """Win rate of ``challenger`` over ``baseline`` under the RM, and the paired score difference.

    Sample ``i`` of a prompt is compared with sample ``i`` of the other policy for the same
    prompt; a tie counts half. Means are over prompts (each prompt's mean over its samples),
    standard errors over prompts. The ``same_ending_*`` keys repeat both over the pairs whose
    two replies end alike (both with EOS, or both cut at the token limit): a gain that is only
    "stops later" (a common reward-model bias) vanishes there. The ``lc_*`` keys are the
    length-controlled win rate (:func:`rlhf.length_bias.length_controlled_win_rate`: the win
    rate a logistic fit on the length difference predicts at equal length, bootstrap over
    prompts) and ``length_slope``, the fit's log-odds per unit of squashed length difference.
    """
    base = {(r.prompt_id, r.sample): r for r in baseline}
    pairs = [(base[(r.prompt_id, r.sample)], r) for r in challenger if (r.prompt_id, r.sample) in base]
    if not pairs:
        raise ValueError("the two policies share no (prompt, sample) to compare")
    win, win_se, diff, diff_se, n, prompts = _paired_stats(pairs)
    same = [(a, b) for a, b in pairs if a.eos == b.eos]
    s_win, s_win_se, s_diff, s_diff_se, s_n, _ = _paired_stats(same)
    lc = length_controlled_win_rate(
        [1.0 if b.reward > a.reward else 0.5 if b.reward == a.reward else 0.0 for a, b in pairs],
        [b.length - a.length for a, b in pairs],
        [b.prompt_id for _, b in pairs],
    )
    return {
        "win_rate": win,
        "win_rate_se": win_se,
        "reward_diff": diff,
        "reward_diff_se": diff_se,
        "pairs": n,
        "prompts": prompts,
        "same_ending_win_rate": s_win,
        "same_ending_win_rate_se": s_win_se,
        "same_ending_reward_diff": s_diff,
        "same_ending_reward_diff_se": s_diff_se,
        "same_ending_pairs": s_n,
        **lc,
    }
