"""``python -m rlhf.sweep sweeps/ppo.yaml --count N``: a W&B sweep spec, run offline.

The spec is the same file ``wandb sweep`` takes. The hyperparameters of each trial come from
W&B's own sweep engine (the ``sweeps`` package: grid, random, bayes; install the
``sweeps`` extra), which is told every finished trial and its metric, as the W&B server would
be. Each trial is the spec's ``command`` with its macros filled in the way ``wandb agent``
fills them (``${args}`` -> ``--model.init_args.lr=0.0003 ...``; ``${interpreter}`` -> this
Python), run as a subprocess with ``WANDB_MODE=offline`` unless ``WANDB_MODE`` is set.

The trial's metric is read back from the run itself: ``rlhf.fit`` writes ``run_info.json``
(final metric values, where its ``metrics.csv`` is) to the path in ``$RLHF_RUN_INFO``, which
this driver sets per trial. Results land in ``OUT/results.csv`` (one row per trial: status,
metric, hyperparameters, run paths), rewritten after every trial; each trial's output is
``OUT/trial-NNN/output.log``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.run_info import RUN_INFO_ENV

log = logging.getLogger("rlhf.sweep")

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ARGS_MACROS = (
    "args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags", "args_json",
    "args_append_hydra", "args_override_hydra",
)


def _sweeps():
    try:
        import sweeps
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "rlhf.sweep needs W&B's sweep engine: pip install -e '.[sweeps]' (the `sweeps` package)"
        ) from err
    return sweeps


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep spec (YAML) as a dict."""
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep spec is a YAML mapping")
    return spec


def spec_violations(spec: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``spec``: the ``sweeps`` package's schema checks, plus what running
    it here needs (a metric to read back, a command that passes the hyperparameters)."""
    problems = list(_sweeps().schema_violations_from_proposed_config(dict(spec)))
    metric = spec.get("metric")
    if not isinstance(metric, Mapping) or not metric.get("name"):
        problems.append("metric.name is required: the value read back from each trial")
    command = spec.get("command", DEFAULT_COMMAND)
    if not any(f"${{{macro}}}" in map(str, command) for macro in ARGS_MACROS):
        problems.append("command must pass the hyperparameters, e.g. with ${args}")
    if "${program}" in map(str, command) and not spec.get("program"):
        problems.append("command uses ${program} but the spec has no program")
    return problems


def validate_spec(spec: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every problem of ``spec`` (see :func:`spec_violations`)."""
    problems = spec_violations(spec)
    if problems:
        raise ValueError("invalid sweep spec:\n  " + "\n  ".join(problems))


def plain(value: Any) -> Any:
    """Numpy scalars (the sweep engine's floats) as Python numbers."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict)) else value


def build_command(
    spec: Mapping[str, Any], params: Mapping[str, Any], interpreter: str = sys.executable,
    args_json_file: str | None = None,
) -> list[str]:
    """The trial's command line, with the macros filled in as ``wandb agent`` fills them.

    ``${env}`` is dropped (the agent's ``/usr/bin/env`` adds nothing here), ``${interpreter}``
    is ``interpreter``, ``${program}`` is the spec's ``program`` split like a shell would, and
    the ``${args...}`` macros come from W&B's own formatter; ``${envvar:NAME}`` is expanded.
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    command = create_sweep_command([str(c) for c in spec.get("command", DEFAULT_COMMAND)])
    formats = create_sweep_command_args({"args": {k: {"value": plain(v)} for k, v in params.items()}})
    macros: dict[str, list[str]] = {name: list(formats[name]) for name in ARGS_MACROS}
    macros.update(
        env=[], interpreter=[interpreter], program=shlex.split(str(spec.get("program", ""))),
        args_json_file=[args_json_file] if args_json_file else [],
    )
    out: list[str] = []
    for part in command:
        if part.startswith("${") and part.endswith("}") and part[2:-1] in macros:
            out += macros[part[2:-1]]
        else:
            out.append(part)
    return out


def read_history(csv_paths: Sequence[str]) -> list[dict[str, float]]:
    """Rows of the trial's ``metrics.csv`` files as ``{metric: value}`` dicts (empty cells
    dropped), the shape of a W&B run's history."""
    rows = []
    for path in csv_paths:
        if not Path(path).is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                values = {}
                for key, value in row.items():
                    try:
                        values[key] = float(value)
                    except (TypeError, ValueError):
                        continue
                rows.append(values)
    return rows


@dataclass
class Trial:
    """One finished trial: its hyperparameters and what the run reported."""

    index: int
    params: dict[str, Any]
    command: list[str]
    status: str
    metric: float | None
    seconds: float
    summary: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    run_info: str | None = None
    log_file: str | None = None


def read_trial_result(run_info_path: Path, metric: str, returncode: int) -> tuple[str, float | None, dict, list]:
    """``(status, metric value, summary, history)`` of a finished trial process.

    The metric is the final (summary) value, as W&B shows it; a run that exited non-zero or
    logged no finite value of the metric counts as failed.
    """
    if not run_info_path.is_file():
        return "failed", None, {}, []
    info = json.loads(run_info_path.read_text())
    summary = {k: float(v) for k, v in info.get("metrics", {}).items()}
    history = read_history(info.get("csv_metrics", []))
    value = summary.get(metric)
    if value is None:
        logged = [row[metric] for row in history if metric in row]
        value = logged[-1] if logged else None
    if value is not None and not math.isfinite(value):
        value = None
    status = info.get("status", "failed")
    if returncode != 0 or value is None:
        status = "failed" if status in ("running", "finished") else status
    return status, value, summary, history


def sweep_run(trial: Trial, metric: str):
    """The trial as the ``sweeps`` engine's ``SweepRun`` (what the W&B server would hold)."""
    sweeps = _sweeps()
    summary = dict(trial.summary)
    if trial.metric is not None:
        summary[metric] = trial.metric
    return sweeps.SweepRun(
        name=f"trial-{trial.index:03d}",
        state=sweeps.RunState.finished if trial.status == "finished" else sweeps.RunState.failed,
        config={k: {"value": v} for k, v in trial.params.items()},
        summaryMetrics=summary,
        sampledHistory=trial.history,
    )


def write_results(path: Path, trials: Sequence[Trial], metric: str) -> None:
    """``results.csv``: one row per trial (status, metric, each hyperparameter, paths)."""
    names = sorted({k for t in trials for k in t.params})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "status", metric, *names, "seconds", "run_info", "log"])
        for t in trials:
            writer.writerow([
                t.index, t.status, "" if t.metric is None else t.metric,
                *[t.params.get(n, "") for n in names], round(t.seconds, 1), t.run_info or "", t.log_file or "",
            ])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def best_trial(trials: Sequence[Trial], goal: str = "minimize") -> Trial | None:
    """The trial with the best metric for ``goal`` (``minimize`` or ``maximize``)."""
    done = [t for t in trials if t.metric is not None]
    if not done:
        return None
    return (max if goal == "maximize" else min)(done, key=lambda t: t.metric)


def format_table(trials: Sequence[Trial], metric: str, goal: str = "minimize") -> str:
    """The results as an aligned text table (the best trial marked with ``*``)."""
    names = sorted({k for t in trials for k in t.params})
    best = best_trial(trials, goal)
    header = ["", "trial", "status", metric, *names, "seconds"]
    rows = [
        ["*" if t is best else "", str(t.index), t.status, _cell(t.metric),
         *[_cell(t.params.get(n)) for n in names], f"{t.seconds:.0f}"]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def run_sweep(
    spec_path: str | os.PathLike,
    count: int | None,
    out_dir: str | os.PathLike | None = None,
    interpreter: str = sys.executable,
    timeout: float | None = None,
    cwd: str | os.PathLike | None = None,
) -> list[Trial]:
    """Run up to ``count`` trials of the sweep at ``spec_path`` (a grid stops when exhausted).

    Args:
        spec_path: a W&B sweep spec (YAML).
        count: trials to run; ``None`` only for grid search (every grid point).
        out_dir: where ``results.csv`` and the trial directories go (default
            ``runs/sweeps/<spec name>-<time>``).
        interpreter: the Python that runs ``${interpreter}``.
        timeout: seconds after which a trial is stopped and counts as failed.
        cwd: working directory of the trials (default: this process's).
    """
    sweeps = _sweeps()
    spec = load_spec(spec_path)
    validate_spec(spec)
    if count is None and spec["method"] != "grid":
        raise ValueError(f"--count is required for method {spec['method']!r}")
    metric = spec["metric"]["name"]
    name = spec.get("name") or Path(spec_path).stem
    out = Path(out_dir) if out_dir else Path("runs/sweeps") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env_base = dict(os.environ)
    if not env_base.get("WANDB_MODE"):
        env_base["WANDB_MODE"] = "offline"
    env_base.pop("WANDB_SWEEP_ID", None)  # not a `wandb agent` trial: nothing to report to
    # As `wandb agent` does: each trial starts its own wandb-core service, never this process's.
    env_base.pop("WANDB_SERVICE", None)
    env_base.setdefault("WANDB_RUN_GROUP", out.name)
    # W&B run ids of the trials: unique across sweeps, readable in `wandb sync` listings.
    run_id_prefix = re.sub(r"[^A-Za-z0-9_-]", "-", f"{name}-{secrets.token_hex(3)}")
    trials: list[Trial] = []
    index = 0
    while count is None or index < count:
        suggestion = sweeps.next_run(spec, [sweep_run(t, metric) for t in trials])
        if suggestion is None:
            log.info("the sweep has no more configurations to try")
            break
        params = {k: plain(v["value"]) for k, v in suggestion.config.items()}
        trial_dir = (out / f"trial-{index:03d}").resolve()  # absolute paths in results.csv
        trial_dir.mkdir(parents=True, exist_ok=True)
        run_info = trial_dir / "run_info.json"
        command = build_command(spec, params, interpreter, str(trial_dir / "args.json"))
        (trial_dir / "args.json").write_text(json.dumps(params))
        env = {**env_base, RUN_INFO_ENV: str(run_info), "WANDB_RUN_ID": f"{run_id_prefix}-{index:03d}"}
        log.info("trial %d: %s", index, " ".join(shlex.quote(c) for c in command))
        started = time.perf_counter()
        log_file = trial_dir / "output.log"
        with open(log_file, "w") as output:
            try:
                returncode = subprocess.run(
                    command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout
                ).returncode
            except subprocess.TimeoutExpired:
                returncode = -1
        status, value, summary, history = read_trial_result(run_info, metric, returncode)
        trial = Trial(
            index=index, params=params, command=command, status=status, metric=value,
            seconds=time.perf_counter() - started, summary=summary, history=history,
            run_info=str(run_info), log_file=str(log_file),
        )
        trials.append(trial)
        write_results(out / "results.csv", trials, metric)
        log.info("trial %d %s: %s = %s (%.0f s)", index, status, metric, value, trial.seconds)
        index += 1
    return trials


def main(argv: Sequence[str] | None = None) -> list[Trial]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m rlhf.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a W&B sweep spec, e.g. sweeps/ppo.yaml")
    parser.add_argument("--count", type=int, default=None, help="trials to run (grid: default all)")
    parser.add_argument("--out", default=None, help="output directory (default runs/sweeps/NAME-TIME)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per trial")
    args = parser.parse_args(argv)
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    trials = run_sweep(args.spec, args.count, args.out, timeout=args.timeout)
    metric = load_spec(args.spec)["metric"]
    print(format_table(trials, metric["name"], metric.get("goal", "minimize")))
    if trials:
        print(f"\nresults: {Path(trials[0].run_info).parent.parent / 'results.csv'}")
    return trials


if __name__ == "__main__":
    main(sys.argv[1:])
