"""The comparison's report: a table per method (mean and 95% CI over seeds), the per-seed rows,
and gold and proxy score against sqrt(KL to the reference) in one figure.

Writes ``<out>/report.json``, ``<out>/report.md`` and ``<out>/figure.png`` from the evaluation
records that are complete and up to date; (method, seed) pairs without one are listed as
missing, never filled in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhf.compare.config import CompareConfig
from rlhf.compare.runs import eval_stage, read_json, run_paths, train_seconds
from rlhf.compare.stats import (
    gold_verdict,
    method_summary,
    overoptimisation_verdict,
    seed_summary,
    t_quantile_975,
)
from rlhf.pipeline import stale_reason


def collect(config: CompareConfig) -> dict[str, dict[int, dict[str, Any]]]:
    """``{method: {seed: evaluation record}}`` for each of the config's (method, seed) whose
    evaluation is complete and up to date."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for name, method in config.methods.items():
        for seed in config.seeds:
            stage, current = eval_stage(config, method, seed)
            if stale_reason(stage, [], current) is None:
                record = read_json(stage.output, None)
                if record and record.get("points"):
                    found.setdefault(name, {})[seed] = record
    return found


def curve(record: dict[str, Any], start: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A seed's evaluation points in step order, after ``start`` (the reference's point at
    step 0 for the same seed) when given and the record has no step-0 point of its own."""
    points = sorted(record["points"], key=lambda p: p["step"])
    if start is not None and points[0]["step"] > 0:
        return [{**start, "step": 0}, *points]
    return points


def build_report(config: CompareConfig) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data (see the module doc)."""
    records = collect(config)
    reference = next((m for m, meth in config.methods.items() if meth.kind == "reference"), None)
    starts = {s: r["points"][0] for s, r in records.get(reference, {}).items()} if reference else {}
    methods: dict[str, Any] = {}
    for name, method in config.methods.items():
        seeds = records.get(name, {})
        rows, curves = {}, {}
        for seed, record in sorted(seeds.items()):
            trained = sorted(record["points"], key=lambda p: p["step"])
            if method.kind == "fit":
                wall = train_seconds(run_paths(config, name, seed))
            else:  # no training: its cost is sampling and scoring at evaluation
                wall = record.get("eval_seconds")
            start = starts.get(seed) if method.kind != "reference" else None
            rows[seed] = seed_summary(trained, wall, start)
            curves[seed] = curve(record, starts.get(seed) if method.kind == "fit" else None)
        methods[name] = {
            "kind": method.kind,
            "budget": method.budget,
            "n": method.n,
            "seeds": sorted(seeds),
            "missing_seeds": [s for s in config.seeds if s not in seeds],
            "per_seed": {str(s): r for s, r in rows.items()},
            "summary": method_summary(rows),
            "curves": {str(s): c for s, c in curves.items()},
            "samples": next((r.get("samples") for _, r in sorted(seeds.items())), []),
        }
    first = next((r for m in records.values() for r in m.values()), {})
    return {
        "config": str(config.path),
        "reference": str(config.reference),
        "proxy": str(config.proxy),
        "gold": config.gold,
        "seeds": list(config.seeds),
        "eval": config.eval.as_dict(),
        "prompts": first.get("prompts"),
        "methods": methods,
    }


# ------------------------------------------------------------------------------- markdown
def _ci(summary: dict[str, dict[str, float]], key: str, digits: int = 3, scale: float = 1.0) -> str:
    s = summary.get(key)
    if not s or not s["n"]:
        return "-"
    mean = s["mean"] * scale
    if math.isnan(s["half_width"]):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {s['half_width'] * scale:.{digits}f}"


def _minutes(seconds: float) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds / 60:.1f}"


def to_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: settings, the table, per-seed rows, missing runs, samples."""
    e = report["eval"]
    seeds = report["seeds"]
    spread = (f"t = {t_quantile_975(len(seeds) - 1):.2f} for {len(seeds)} seeds: with so few seeds the "
              f"intervals are wide" if len(seeds) > 1 else "one seed: no interval")
    lines = [
        "# Method comparison on the gold-labeller task",
        "",
        (f"Reference (SFT) `{report['reference']}`, proxy RM `{report['proxy']}`, gold function "
         f"`{report['gold']}`; config `{report['config']}`. Every policy sampled {e['samples_per_prompt']} "
         f"response(s) to each of {report['prompts']} held-out prompts ({', '.join(e['data'])}, split "
         f"`{e['split']}`), temperature {e['temperature']}, up to {e['max_new_tokens']} new tokens, "
         f"sampling seed {e['seed']} + training seed."),
        "",
        (f"Each cell: the mean over seeds ± the half-width of a 95% t-interval over seeds "
         f"({spread}). "
         "**end**: the final policy; **peak**: the highest gold score over the run's evaluation "
         "points (peak step: each seed's). KL: nats per response to the reference, from the "
         "sampled responses; for best-of-n the analytic log(n) - (n-1)/n. Time: wall-clock of "
         "training (snapshot saving excluded); for best-of-n and the reference, the time to "
         "sample and score them at evaluation."),
        "",
        ("| method | budget | seeds | gold (end) | gold - reference | gold (peak) | peak step | proxy (end) | "
         "KL (end) | length | EOS rate | time (min) |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in report["methods"].items():
        s = m["summary"]
        peak_step = ", ".join(str(int(r["gold_peak_step"])) for r in m["per_seed"].values())
        peak_step = peak_step if m["kind"] == "fit" and peak_step else "-"
        lines.append(
            f"| {name} | {m['budget'] or '-'} | {len(m['seeds'])}/{len(seeds)} | {_ci(s, 'gold_end')} | "
            f"{_ci(s, 'gold_gain')} | {_ci(s, 'gold_peak')} | {peak_step} | {_ci(s, 'proxy_end')} | {_ci(s, 'kl_end', 2)} | "
            f"{_ci(s, 'length_end', 1)} | {_ci(s, 'eos_rate_end', 2)} | {_ci(s, 'wall_seconds', 1, 1 / 60)} |"
        )
    lines += ["", "## What it says", "",
              ("gold - reference: each seed's final gold minus the reference's with the same sampling seed, "
               "so the interval is over paired differences. Best-of-n sits at its KL bound; a method "
               "'beats' it when its mean gold is higher (means only, no test)."), ""]
    lines += [f"- {line}" for line in verdict_lines(report)]
    lines += ["", "## Per seed", "",
              "| method | seed | gold (end) | gold (peak, step) | proxy (end) | KL (end) | length | EOS rate | time (min) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, m in report["methods"].items():
        for seed, r in m["per_seed"].items():
            lines.append(
                f"| {name} | {seed} | {r['gold_end']:.3f} | {r['gold_peak']:.3f} ({int(r['gold_peak_step'])}) | "
                f"{r['proxy_end']:.3f} | {r['kl_end']:.2f} | {r['length_end']:.1f} | {r['eos_rate_end']:.2f} | "
                f"{_minutes(r['wall_seconds'])} |"
            )
    missing = [f"{name}/seed{s}" for name, m in report["methods"].items() for s in m["missing_seeds"]]
    if missing:
        lines += ["", f"**Missing** (not run, failed, or out of date): {', '.join(missing)}."]
    shown = [(name, m["samples"][0]) for name, m in report["methods"].items() if m["samples"]]
    if shown:
        lines += ["", "## One sample per method (first seed, first prompt, final policy)", ""]
        for name, sample in shown:
            text = " ".join(sample["response"].split()) or "(empty)"
            lines.append(f"- **{name}** (gold {sample['gold']:+.3f}, proxy {sample['proxy']:+.3f}): {text}")
    return "\n".join(lines) + "\n"


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """One plain sentence per method other than the reference: gold against the reference
    (:func:`~rlhf.compare.stats.gold_verdict`), over-optimisation
    (:func:`~rlhf.compare.stats.overoptimisation_verdict`) and its place against best-of-n."""
    frontier = [(name, m["summary"]) for name, m in report["methods"].items()
                if m["kind"] == "best_of_n" and m["summary"].get("gold_end", {}).get("n")]
    lines = []
    for name, m in report["methods"].items():
        s = m["summary"]
        if m["kind"] == "reference" or not s:
            continue
        parts = [gold_verdict(s)]
        over = overoptimisation_verdict(s)
        if over:
            parts.append(over)
        if m["kind"] != "best_of_n" and frontier:
            gold = s["gold_end"]["mean"]
            places = [f"{'above' if gold > b['gold_end']['mean'] else 'below'} {other} "
                      f"({b['gold_end']['mean']:.3f} at KL {b['kl_end']['mean']:.2f})" for other, b in frontier]
            parts.append(f"gold {gold:.3f} at KL {s['kl_end']['mean']:.2f}: " + ", ".join(places))
        lines.append(f"**{name}**: " + "; ".join(parts) + ".")
    return lines


# ------------------------------------------------------------------------------- the figure
def _mean_curve(curves: list[list[dict[str, Any]]], key: str) -> tuple[list[float], list[float]] | None:
    """The seeds' mean (sqrt KL, ``key``) at each evaluation step, when all share the steps."""
    steps = [[p["step"] for p in c] for c in curves]
    if not curves or any(s != steps[0] for s in steps):
        return None
    xs = [sum(c[i]["sqrt_kl"] for c in curves) / len(curves) for i in range(len(steps[0]))]
    ys = [sum(c[i][key] for c in curves) / len(curves) for i in range(len(steps[0]))]
    return xs, ys


def draw_figure(report: dict[str, Any], path: str | Path, dpi: int = 120) -> Path:
    """Gold (left) and proxy (right) score against sqrt(KL to the reference): each trained
    method one colour, its seeds thin lines and their mean a thick one; the reference a star;
    best-of-n points joined from the reference as the dashed frontier."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    many = len(report["methods"]) > 10
    palette = colormaps["tab20" if many else "tab10"]
    # tab20 pairs a dark and a light shade: the dark ten first, then the light ones.
    colours = (lambda i: palette((2 * i) % 20 + (2 * i) // 20 % 2)) if many else (lambda i: palette(i % 10))
    for ax, key, label in ((axes[0], "gold", f"gold score ({report['gold']})"), (axes[1], "proxy", "proxy RM score")):
        frontier: list[tuple[float, float]] = []
        for i, (name, m) in enumerate(report["methods"].items()):
            curves = [m["curves"][s] for s in sorted(m["curves"], key=int)]
            if not curves:
                continue
            colour = colours(i)
            if m["kind"] == "fit":
                for c in curves:
                    ax.plot([p["sqrt_kl"] for p in c], [p[key] for p in c], "-", color=colour, alpha=0.35, linewidth=0.8)
                mean = _mean_curve(curves, key)
                if mean is not None:
                    ax.plot(*mean, "o-", color=colour, linewidth=2, markersize=4, label=name)
                else:
                    ax.plot([], [], "-", color=colour, linewidth=2, label=name)
                continue
            x = sum(c[0]["sqrt_kl"] for c in curves) / len(curves)
            y = sum(c[0][key] for c in curves) / len(curves)
            frontier.append((x, y))
            marker = "*" if m["kind"] == "reference" else "D"
            ax.plot([x], [y], marker, color="black" if m["kind"] == "reference" else colour, markersize=10, label=name)
        if len(frontier) > 1:
            xs, ys = zip(*sorted(frontier))
            ax.plot(xs, ys, "--", color="black", linewidth=1, alpha=0.6, label="best-of-n (KL bound)")
        ax.set_xlabel("sqrt(KL to the reference) [sqrt nats]")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"gold and proxy score vs sqrt(KL); thin lines: seeds ({len(report['seeds'])}), thick: their mean",
                 fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def write_report(config: CompareConfig) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``figure.png`` under ``config.out``."""
    from rlhf.outputs import atomic_file

    report = build_report(config)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "figure": out / "figure.png"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(to_markdown(report))
    with atomic_file(paths["figure"]) as tmp:
        draw_figure(report, tmp)
    return paths
