"""The comparison's maths, as pure functions: confidence intervals over seeds, the end and the
peak of a training curve, best-of-n selection and its KL bound, and one evaluation's summary."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), for df = 1..30.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """Student's t quantile at 0.975 with ``df`` degrees of freedom (a table to 30, then the
    Cornish-Fisher expansion around the normal quantile, accurate to ~1e-4)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float]) -> dict[str, float]:
    """Mean of ``values`` (one per seed) with a 95% t-interval over them.

    Returns ``{"mean", "low", "high", "half_width", "n"}``; with one value (or none) the
    interval is NaN: one seed says nothing about seed-to-seed spread. Non-finite values are
    dropped first.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "half_width": math.nan, "n": 0}
    mean = statistics.fmean(xs)
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "half_width": math.nan, "n": 1}
    half = t_quantile_975(n - 1) * statistics.stdev(xs) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n}


def end_and_peak(steps: Sequence[int], values: Sequence[float]) -> dict[str, float]:
    """The last value of a curve and its highest (the first step that reaches it).

    Args:
        steps: ``[k]`` training steps of the evaluation points, increasing.
        values: ``[k]`` the metric at each (e.g. the gold score).

    Returns:
        ``{"end", "end_step", "peak", "peak_step"}``.
    """
    if len(steps) != len(values) or not steps:
        raise ValueError(f"need as many steps as values, at least one (got {len(steps)} and {len(values)})")
    if any(b <= a for a, b in pairwise(steps)):
        raise ValueError(f"steps must increase, got {list(steps)}")
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return {"end": float(values[-1]), "end_step": int(steps[-1]),
            "peak": float(values[best]), "peak_step": int(steps[best])}


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || base) = log(n) - (n - 1) / n, in nats (Stiennon et al. 2020; Gao et al.
    2022 use it): exact for distinct samples, an upper bound otherwise (Beirami et al. 2024)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


@dataclass
class Scored:
    """One sampled response: prompt ``prompt_id``, draw ``sample``; its proxy (RM) and gold
    scores, KL to the reference (summed over the response), length in tokens, EOS."""

    prompt_id: int
    sample: int
    proxy: float
    gold: float
    kl: float
    length: int
    eos: bool


def best_of_n(rows: Sequence[Scored], n: int) -> list[Scored]:
    """Best-of-n selection: draws ``g * n .. g * n + n - 1`` of a prompt form group ``g``; each
    group keeps its row with the highest proxy score (ties: the earliest draw). Incomplete
    groups (fewer than ``n`` draws) are refused."""
    groups: dict[tuple[int, int], list[Scored]] = {}
    for row in rows:
        groups.setdefault((row.prompt_id, row.sample // n), []).append(row)
    chosen = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda r: r.sample)
        if len(group) != n:
            raise ValueError(f"prompt {key[0]} group {key[1]} has {len(group)} draws, not n={n}")
        chosen.append(max(group, key=lambda r: (r.proxy, -r.sample)))
    return chosen


def summarise(rows: Sequence[Scored], kl: float | None = None) -> dict[str, float]:
    """Means over ``rows`` (one evaluation point): ``gold``, ``proxy``, ``kl`` (``kl`` given:
    used instead, e.g. best-of-n's bound), ``sqrt_kl`` (of a negative estimate: 0),
    ``length``, ``eos_rate``, ``samples``."""
    if not rows:
        raise ValueError("no rows to summarise")
    mean_kl = statistics.fmean(r.kl for r in rows) if kl is None else kl
    return {
        "gold": statistics.fmean(r.gold for r in rows),
        "proxy": statistics.fmean(r.proxy for r in rows),
        "kl": mean_kl,
        "sqrt_kl": math.sqrt(max(0.0, mean_kl)),
        "length": statistics.fmean(r.length for r in rows),
        "eos_rate": statistics.fmean(float(r.eos) for r in rows),
        "samples": float(len(rows)),
    }


# The table's per-seed quantities, read from one seed's evaluation points.
END_METRICS = ("gold", "proxy", "kl", "sqrt_kl", "length", "eos_rate")


def seed_summary(points: Sequence[dict[str, Any]], wall_seconds: float | None,
                 start: dict[str, Any] | None = None) -> dict[str, float]:
    """One seed's row: each of :data:`END_METRICS` at its last point, the gold peak over its
    points (``gold_peak``, ``gold_peak_step``), the change of gold and proxy between its last
    two points (``gold_last_change``, ``proxy_last_change``; NaN with one point), the gain
    over ``start`` (``gold_gain``, ``proxy_gain``; only with ``start``) and ``wall_seconds``.

    Args:
        points: the seed's evaluation points in step order, each with ``step`` and the
            :func:`summarise` keys.
        start: the reference's evaluation with the same sampling seed (the paired baseline).
    """
    ends = end_and_peak([int(p["step"]) for p in points], [float(p["gold"]) for p in points])
    row = {f"{m}_end": float(points[-1][m]) for m in END_METRICS}
    row.update(gold_peak=ends["peak"], gold_peak_step=float(ends["peak_step"]), end_step=float(ends["end_step"]))
    for m in ("gold", "proxy"):  # over the last segment: gold falling as the proxy rises = over-optimisation
        row[f"{m}_last_change"] = float(points[-1][m]) - float(points[-2][m]) if len(points) > 1 else math.nan
    if start is not None:
        for m in ("gold", "proxy"):
            row[f"{m}_gain"] = float(points[-1][m]) - float(start[m])
    row["wall_seconds"] = math.nan if wall_seconds is None else float(wall_seconds)
    return row


def method_summary(seed_rows: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and 95% t-interval over seeds of each key of the seeds' :func:`seed_summary` rows."""
    if not seed_rows:
        return {}
    keys = sorted(set.intersection(*(set(r) for r in seed_rows.values())))
    return {k: mean_ci95([row[k] for row in seed_rows.values()]) for k in keys}


def gold_verdict(summary: dict[str, dict[str, float]]) -> str:
    """What a method's :func:`method_summary` says about gold against the reference: raised or
    lowered (the 95% interval of the paired gain over seeds excludes 0), or no clear change."""
    gain = summary.get("gold_gain")
    if not gain or not gain["n"]:
        return "no paired reference run"
    if gain["n"] < 2:
        return f"gold {gain['mean']:+.3f} vs the reference (one seed: no interval)"
    interval = f"{gain['mean']:+.3f} (95% CI {gain['low']:+.3f} to {gain['high']:+.3f})"
    if gain["low"] > 0:
        return f"raises gold over the reference: {interval}"
    if gain["high"] < 0:
        return f"lowers gold below the reference: {interval}"
    return f"no clear change in gold: {interval}, the interval includes 0"


def overoptimisation_verdict(summary: dict[str, dict[str, float]]) -> str | None:
    """Whether gold fell while the proxy rose over the run's last segment (between its last two
    evaluation points): ``over-optimises`` when both intervals over seeds exclude 0, a weaker
    statement when only the means say so, ``None`` when they do not (or there is one point)."""
    gold, proxy = summary.get("gold_last_change"), summary.get("proxy_last_change")
    if not gold or not proxy or not gold["n"] or not proxy["n"]:
        return None
    text = f"gold {gold['mean']:+.3f} while the proxy {proxy['mean']:+.3f} over the last segment"
    if gold["n"] > 1 and gold["high"] < 0 and proxy["low"] > 0:
        return f"over-optimises: {text} (both 95% CIs exclude 0)"
    if gold["mean"] < 0 and proxy["mean"] > 0:
        return f"may over-optimise: {text} (CIs include 0)"
    return None
