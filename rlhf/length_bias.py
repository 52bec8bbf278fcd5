"""How much of a preference is explained by length: the "longer reply wins" rule, and a
length-controlled win rate.

Reward models trained on human comparisons learn that longer replies win (on hh-rlhf helpful
pairs the rule alone is right about 0.59-0.60 of the time), and a policy optimised against such
a model learns to write longer. Two numbers keep that honest:

* :func:`length_rule_accuracy`: the accuracy of "the longer reply is the chosen one" on the
  same pairs as an RM's accuracy; an RM is only as good as its margin over it.
* :func:`length_controlled_win_rate`: a win rate read at zero length difference, as
  AlpacaEval's length-controlled win rate. A logistic regression of the outcome on the
  (squashed) length difference,

      P(challenger wins) = sigmoid(a + b * tanh((len_challenger - len_baseline) / s)),

  with ``s`` the standard deviation of the length differences, is fitted to the pairs and read
  at equal length: ``sigmoid(a)``. Its interval comes from a bootstrap over prompts (the pairs
  of one prompt are resampled together).

Pure functions on numbers: no model, no tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Ridge penalty on the logistic fit's two coefficients: keeps the fit finite when one side
#: wins every pair (separable data), and is negligible otherwise.
RIDGE = 1e-3


def length_rule_accuracy(chosen_lengths: Sequence[float], rejected_lengths: Sequence[float]) -> dict[str, float]:
    """Accuracy of "the longer reply is the chosen one" over pairs (equal lengths count half).

    Args:
        chosen_lengths, rejected_lengths: ``[n]`` reply lengths (tokens) of each pair.

    Returns:
        ``length_rule_accuracy``, its standard error ``length_rule_accuracy_se`` (binomial),
        and ``length_ties`` (the fraction of pairs of equal length).
    """
    chosen = np.asarray(chosen_lengths, dtype=float)
    rejected = np.asarray(rejected_lengths, dtype=float)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"chosen and rejected lengths must be two [n] lists, got {chosen.shape} and {rejected.shape}")
    n = chosen.size
    if n == 0:
        return {"length_rule_accuracy": float("nan"), "length_rule_accuracy_se": float("nan"), "length_ties": float("nan")}
    score = np.where(chosen > rejected, 1.0, np.where(chosen == rejected, 0.5, 0.0))
    acc = float(score.mean())
    return {
        "length_rule_accuracy": acc,
        "length_rule_accuracy_se": math.sqrt(acc * (1.0 - acc) / n),
        "length_ties": float((chosen == rejected).mean()),
    }


def fit_length_logistic(outcomes: np.ndarray, features: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """Coefficients ``(a, b)`` of ``P(win) = sigmoid(a + b * x)`` by Newton's method.

    Args:
        outcomes: ``[n]`` in ``[0, 1]`` (1 win, 0 loss, 0.5 tie: a fractional label).
        features: ``[n]`` the squashed length differences ``x``.
        iterations: Newton steps at most (it stops when the step is below 1e-10).
    """
    design = np.stack([np.ones_like(features), features], axis=1)  # [n, 2]
    coef = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ coef)))
        gradient = design.T @ (outcomes - p) - RIDGE * coef
        hessian = (design * (p * (1 - p))[:, None]).T @ design + RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        coef = coef + step
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(coef[0]), float(coef[1])


def length_controlled_win_rate(
    outcomes: Sequence[float],
    length_diffs: Sequence[float],
    groups: Sequence[int],
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The challenger's win rate at zero length difference, with a bootstrap over groups.

    Args:
        outcomes: ``[n]`` per pair: 1 the challenger won, 0 it lost, 0.5 a tie.
        length_diffs: ``[n]`` challenger length minus baseline length (tokens).
        groups: ``[n]`` the prompt of each pair; the bootstrap resamples prompts, not pairs.
        bootstrap: resamples for the interval (0: no interval).
        seed: the bootstrap's random seed (the result is reproducible).

    Returns:
        ``lc_win_rate`` (``sigmoid(a)``), ``lc_win_rate_se`` (bootstrap standard deviation),
        ``lc_win_rate_ci95_low``/``_high`` (percentile interval), ``length_slope`` (``b``:
        the log-odds a full standard deviation of extra length is worth, roughly) and
        ``length_scale`` (``s``, tokens).
    """
    y = np.asarray(outcomes, dtype=float)
    diff = np.asarray(length_diffs, dtype=float)
    group = np.asarray(groups)
    if not (y.shape == diff.shape == group.shape) or y.ndim != 1:
        raise ValueError(f"outcomes, length_diffs and groups must be [n] each, got {y.shape}, {diff.shape}, {group.shape}")
    if y.size == 0:
        raise ValueError("no pairs to fit")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("outcomes must lie in [0, 1] (1 win, 0 loss, 0.5 tie)")
    scale = float(diff.std())

    def fit(rows: np.ndarray) -> tuple[float, float]:
        x = np.tanh(diff[rows] / scale) if scale > 0 else np.zeros(rows.size)
        return fit_length_logistic(y[rows], x)

    a, b = fit(np.arange(y.size))
    result = {"lc_win_rate": _sigmoid(a), "length_slope": b, "length_scale": scale}
    if bootstrap > 0:
        ids, members = np.unique(group, return_inverse=True)
        rows_of = [np.flatnonzero(members == k) for k in range(ids.size)]
        rng = np.random.default_rng(seed)
        draws = np.empty(bootstrap)
        for i in range(bootstrap):
            picked = rng.integers(0, ids.size, ids.size)
            draws[i] = _sigmoid(fit(np.concatenate([rows_of[k] for k in picked]))[0])
        low, high = np.percentile(draws, [2.5, 97.5])
        result.update(lc_win_rate_se=float(draws.std(ddof=1)) if bootstrap > 1 else 0.0,
                      lc_win_rate_ci95_low=float(low), lc_win_rate_ci95_high=float(high))
    return result


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
