"""The summaries and tables of :mod:`benchmarks.ppo_vs_trl`: one worker run's numbers, a cell's
repeats (median and range per trainer, ratios to TRL paired by repeat) and the printed tables.

Pure functions over the workers' result dictionaries (:mod:`benchmarks.workers`).
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.harness import MIB, Column, after_warmup, markdown_table, text_table
from benchmarks.probes import trained_tokens
from benchmarks.repeats import format_spread, paired_ratios, spread

# Phases of our iteration in the order they run; "rollout_other" and "other" are remainders.
OUR_PHASES = ["generation", "policy_value", "reference", "reward", "rollout_other", "update", "other"]
TRL_PHASES = ["generation", "reference", "value", "reward", "update_and_other"]
# Trainers of the grid, like-for-like first; each "ours-*" is compared with "trl".
TRAINER_LABELS = {
    "ours-adapter": "ours, adapter critic (like-for-like)",
    "ours-hydra": "ours, hydra critic (trained copy of the top layers)",
    "ours-shared": "ours, shared value head (lighter algorithm)",
    "trl": "TRL, full value model",
}
# Per-run numbers summarised over repeats: key of a run summary -> what its spread is called.
SPREAD_KEYS = ("iteration_seconds_median", "generated_tokens_per_s", "peak_rss_mib", "rss_above_baseline_mib",
               "peak_gpu_mib")
# Ratios ours / TRL, paired by repeat: name in the JSON -> key of a run summary.
RATIOS = {"iteration_seconds": "iteration_seconds_median", "generated_tokens_per_s": "generated_tokens_per_s",
          "peak_rss": "peak_rss_mib", "rss_above_baseline": "rss_above_baseline_mib", "peak_gpu": "peak_gpu_mib"}


def phase_breakdown(seconds: list[float], phases: list[dict[str, float]], names: list[str]) -> dict[str, float]:
    """Median seconds per phase over iterations (``seconds[i]`` the wall time of iteration
    ``i``, ``phases[i]`` its timed phases), with the remainders filled in: ours' nested
    ``rollout`` gives ``rollout_other`` and ``other``; TRL's flat phases ``update_and_other``."""
    breakdown: dict[str, list[float]] = {name: [] for name in names}
    for total, times in zip(seconds, phases):
        if "rollout" in times:
            inner = sum(times.get(k, 0.0) for k in ("generation", "policy_value", "reference", "reward"))
            times = {**times, "rollout_other": times["rollout"] - inner,
                     "other": total - times["rollout"] - times.get("update", 0.0)}
        else:
            times = {**times, "update_and_other": total - sum(times.values())}
        for name in names:
            breakdown[name].append(times.get(name, 0.0))
    return {name: statistics.median(values) for name, values in breakdown.items()}


def _number(value: float) -> float | int:
    """``value`` as an int when it is whole (counts read better as 4 than 4.0)."""
    return int(value) if float(value).is_integer() else value


def summarize_run(result: dict[str, Any], warmup: int, baseline_rss: int) -> dict[str, Any]:
    """One worker run after ``warmup`` iterations: median seconds per iteration, tokens/s,
    tokens and optimizer steps per iteration, memory, and what precision it ran."""
    seconds = after_warmup(result["iteration_seconds"], warmup)
    tokens = result["generated_tokens"][warmup:]
    steps = result["optimizer_steps"][warmup:]
    generated = _number(statistics.median(tokens))
    step_count = _number(statistics.median(steps))
    phases = OUR_PHASES if result["trainer"] == "ours" else TRL_PHASES
    gpu = result.get("cuda_max_memory_allocated_bytes")
    conditions = result.get("conditions", {})
    return {
        "iteration_seconds_median": statistics.median(seconds),
        "iteration_seconds": seconds,
        "generated_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
        "generated_tokens_per_iteration": generated,
        "mean_response_tokens": generated / result["spec"]["batch_size"],
        "optimizer_steps_per_iteration": step_count,
        "trained_tokens_per_iteration": _number(trained_tokens(generated, step_count,
                                                               result["minibatches_per_epoch"])),
        "peak_rss_mib": result["peak_rss_bytes"] / MIB,
        "rss_above_baseline_mib": (result["peak_rss_bytes"] - baseline_rss) / MIB,
        "import_baseline_rss_mib": baseline_rss / MIB,
        "peak_gpu_mib": None if gpu is None else gpu / MIB,
        "trainable_params": result["trainable_params"],
        "critic": result["critic"],
        "precision_used": result["precision_used"],
        "activation_dtypes": result["activation_dtypes"],
        "malloc_mmap_threshold_env": result.get("malloc_mmap_threshold_env"),
        "phase_seconds_median": phase_breakdown(seconds, result["phases"][warmup:], phases),
        "busy": bool(conditions.get("busy")),
        "conditions": conditions,
    }


def _distinct(values: list[Any]) -> Any:
    """The one value all repeats share, or the list of them when they differ."""
    unique = [v for i, v in enumerate(values) if v not in values[:i]]
    return unique[0] if len(unique) == 1 else unique


def summarize_cell(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's repeats (run summaries with ``trainer`` and ``repeat``): per trainer the
    median and range of each of :data:`SPREAD_KEYS`, the values every repeat should share
    (steps, tokens, precision, dtypes; a list where they differ), busy runs; and each
    ``ours-*`` / ``trl`` ratio of :data:`RATIOS`, paired by repeat."""
    by_trainer: dict[str, list[dict[str, Any]]] = {}
    for run in sorted(runs, key=lambda r: r["repeat"]):
        by_trainer.setdefault(run["trainer"], []).append(run)
    trainers = {}
    for name, own in by_trainer.items():
        summary: dict[str, Any] = {"label": TRAINER_LABELS.get(name, name), "repeats": len(own),
                                   "busy_runs": sum(r["busy"] for r in own)}
        for key in SPREAD_KEYS:
            values = [r[key] for r in own if r.get(key) is not None]
            summary[key] = spread(values) if values else None
        for key in ("optimizer_steps_per_iteration", "generated_tokens_per_iteration", "trained_tokens_per_iteration",
                    "trainable_params", "critic", "precision_used", "activation_dtypes"):
            summary[key] = _distinct([r[key] for r in own])
        summary["phase_seconds_median"] = {
            phase: statistics.median(r["phase_seconds_median"][phase] for r in own)
            for phase in own[0]["phase_seconds_median"]}
        trainers[name] = summary
    ratios: dict[str, dict[str, Any]] = {}
    trl = {r["repeat"]: r for r in by_trainer.get("trl", [])}
    for name, own in by_trainer.items():
        paired = [r for r in own if r["repeat"] in trl]
        if name == "trl" or not paired:
            continue
        ratios[f"{name}/trl"] = {}
        for ratio, key in RATIOS.items():
            values = paired_ratios([r.get(key) for r in paired], [trl[r["repeat"]].get(key) for r in paired])
            if values:
                ratios[f"{name}/trl"][ratio] = spread(values)
    return {"trainers": trainers, "ratios": ratios, "busy_runs": sum(r["busy"] for r in runs)}


# -- tables ----------------------------------------------------------------------------------
def table_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell and trainer (in :data:`TRAINER_LABELS` order), numbers as
    ``median [min-max]`` text and the trainer's ratios to TRL."""
    rows = []
    for cell in cells:
        for name in sorted(cell["trainers"], key=lambda t: list(TRAINER_LABELS).index(t)):
            t = cell["trainers"][name]
            ratio = cell["ratios"].get(f"{name}/trl", {})
            rows.append({
                "size": cell["size"], "response_length": cell["response_length"], "batch_size": cell["batch_size"],
                "trainer": t["label"], "seconds": format_spread(t["iteration_seconds_median"]),
                "tokens_per_s": format_spread(t["generated_tokens_per_s"], ".1f"),
                "peak": format_spread(t["peak_rss_mib"], ".0f"),
                "above": format_spread(t["rss_above_baseline_mib"], ".0f"),
                "gpu": format_spread(t["peak_gpu_mib"], ".0f"),
                "ratio_time": format_spread(ratio.get("iteration_seconds")),
                "ratio_peak": format_spread(ratio.get("peak_rss")),
                "ratio_above": format_spread(ratio.get("rss_above_baseline")),
                "steps": str(t["optimizer_steps_per_iteration"]),
                "tokens": f"{t['generated_tokens_per_iteration']} / {t['trained_tokens_per_iteration']}",
                "busy": f"{t['busy_runs']}/{t['repeats']}" if t["busy_runs"] else "",
            })
    return rows


COLUMNS = [
    Column("size", "size", left=True), Column("resp", "response_length"), Column("batch", "batch_size"),
    Column("trainer", "trainer", left=True), Column("s / iteration", "seconds"),
    Column("generated tok/s", "tokens_per_s"), Column("peak RSS MiB", "peak"),
    Column("RSS above import MiB", "above"), Column("ours / TRL time", "ratio_time"),
    Column("ours / TRL peak", "ratio_peak"), Column("ours / TRL above import", "ratio_above"),
    Column("opt. steps / iter", "steps"), Column("tokens / iter: generated / trained", "tokens"),
    Column("busy runs", "busy"),
]


def format_table(cells: list[dict[str, Any]]) -> str:
    """The side-by-side table, plain text (``median [min-max]`` over repeats)."""
    return text_table(COLUMNS, table_rows(cells))


def format_markdown(cells: list[dict[str, Any]]) -> str:
    """The same table as Markdown (what docs/benchmarks.md shows); a GPU column when measured."""
    rows = table_rows(cells)
    columns = [c for c in COLUMNS if c.key != "busy" or any(r["busy"] for r in rows)]
    if any(r["gpu"] for r in rows):
        columns.insert(7, Column("peak GPU MiB", "gpu"))
    return markdown_table(columns, rows)


def format_breakdown(cells: list[dict[str, Any]]) -> str:
    """Median seconds per phase of one iteration, for each cell and trainer."""
    lines = []
    for cell in cells:
        for name, t in cell["trainers"].items():
            phases = t["phase_seconds_median"]
            total = t["iteration_seconds_median"]["median"]
            parts = ", ".join(f"{p} {s:.2f}s ({100 * s / total:.0f}%)" for p, s in phases.items())
            lines.append(f"{cell['size']} resp {cell['response_length']} batch {cell['batch_size']} {name}: "
                         f"{total:.2f}s = {parts}")
    return "\n".join(lines)


def format_precision(cells: list[dict[str, Any]]) -> str:
    """What each trainer ran, once per distinct setting: its precision setting as used and
    the activation dtypes its forward hooks saw."""
    seen: dict[str, str] = {}
    for cell in cells:
        for name, t in cell["trainers"].items():
            used = t["precision_used"]
            text = f"{name}: {used} | activations {t['activation_dtypes']}"
            seen.setdefault(text, text)
    return "\n".join(seen)
