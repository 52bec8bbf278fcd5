"""Run a recipe's stages in order: ``python -m rlhf.pipeline --config configs/quickstart.yaml``.

A pipeline config lists stages; each reads what the previous ones saved::

    stages:
      - name: sft
        fit: configs/quickstart/sft.yaml          # python -m rlhf.fit --config ...
      - name: rm
        fit: configs/quickstart/rm.yaml
        args: [--trainer.max_steps=50]            # optional extra arguments
      - name: eval
        run: [rlhf.evaluate, --policy, sft=..., --out, outputs/quickstart/eval]
        output: outputs/quickstart/eval           # what this stage writes

A ``fit`` stage's output is its config's ``model.init_args.output_dir``; it is complete when
the stage marker (``rlhf_stage.json``) is there, which the stage writes last and atomically. A
``run`` stage (any ``python -m`` module) is complete when its ``output`` exists (write it
atomically). Complete stages are skipped unless ``--force`` (or ``--from NAME``); once a stage
runs, every later stage runs too, since its inputs changed. Each stage is a subprocess, so a
crash in one leaves the completed ones intact and the next run resumes from there. The run ends
with a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.console import quiet_known_warnings
from rlhf.outputs import read_stage_marker


class PipelineConfigError(ValueError):
    """A pipeline config that cannot be run (names the file and the stage)."""


@dataclass
class Stage:
    """One step of a pipeline.

    Attributes:
        name: unique stage name.
        command: the ``python -m`` arguments (module first).
        output: what the stage writes; its presence (with a marker for fit stages) means done.
        kind: ``fit`` or ``run``.
    """

    name: str
    command: list[str]
    output: Path
    kind: str

    def is_complete(self) -> bool:
        if self.kind == "fit":
            return read_stage_marker(self.output) is not None
        return self.output.exists()


@dataclass
class StageResult:
    """What happened to a stage in this invocation."""

    stage: Stage
    status: str  # "ran", "skipped", "failed", "interrupted", "not run"
    seconds: float = 0.0
    summary: dict[str, str] = field(default_factory=dict)


def _fit_output_dir(config: Path, where: str) -> Path:
    try:
        data = yaml.safe_load(config.read_text())
    except FileNotFoundError:
        raise PipelineConfigError(f"{where}: fit config {config} does not exist") from None
    except yaml.YAMLError as e:
        raise PipelineConfigError(f"{where}: {config} is not valid YAML: {e}") from None
    output = (((data or {}).get("model") or {}).get("init_args") or {}).get("output_dir")
    if not output:
        raise PipelineConfigError(
            f"{where}: {config} sets no model.init_args.output_dir, so the pipeline cannot tell "
            f"when the stage is complete"
        )
    return Path(output)


def _override_output_dir(args: Sequence[str]) -> str | None:
    for arg in args:
        if arg.startswith("--model.init_args.output_dir="):
            return arg.split("=", 1)[1]
    return None


def load_pipeline(path: str | os.PathLike) -> list[Stage]:
    """Parse a pipeline config into stages (clear errors name the file and the stage)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineConfigError(f"pipeline config {path} does not exist") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise PipelineConfigError(f"{path}: expected a mapping with a non-empty 'stages' list")
    unknown = set(data) - {"stages"}
    if unknown:
        raise PipelineConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected 'stages'")
    stages: list[Stage] = []
    for i, entry in enumerate(data["stages"], 1):
        where = f"{path}: stage {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PipelineConfigError(f"{where}: each stage needs a 'name'")
        where = f"{path}: stage {i} ({entry['name']})"
        unknown = set(entry) - {"name", "fit", "run", "args", "output"}
        if unknown:
            raise PipelineConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
        extra = entry.get("args") or []
        if not isinstance(extra, list) or not all(isinstance(a, (str, int, float)) for a in extra):
            raise PipelineConfigError(f"{where}: 'args' must be a list of strings")
        extra = [str(a) for a in extra]
        if ("fit" in entry) == ("run" in entry):
            raise PipelineConfigError(f"{where}: give exactly one of 'fit' (a config) or 'run' (a module and args)")
        if "fit" in entry:
            configs = entry["fit"] if isinstance(entry["fit"], list) else [entry["fit"]]
            command = ["rlhf.fit"]
            for config in configs:
                command += ["--config", str(config)]
            command += extra
            output = entry.get("output") or _override_output_dir(extra)
            output = Path(output) if output else _fit_output_dir(Path(configs[-1]), where)
            stages.append(Stage(entry["name"], command, output, "fit"))
        else:
            run = entry["run"]
            if not isinstance(run, list) or not run or not all(isinstance(a, (str, int, float)) for a in run):
                raise PipelineConfigError(f"{where}: 'run' must be a list: [module, arg, ...]")
            if not entry.get("output"):
                raise PipelineConfigError(f"{where}: a 'run' stage needs 'output' (what it writes)")
            stages.append(Stage(entry["name"], [str(a) for a in run] + extra, Path(entry["output"]), "run"))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise PipelineConfigError(f"{path}: stage names must be unique, got {names}")
    return stages


# ------------------------------------------------------------------------------- summaries
def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stage_summary(stage: Stage) -> dict[str, str]:
    """Headline numbers of a completed stage: held-out metrics before -> after for fit stages,
    the comparison for an evaluation report."""
    if stage.kind == "fit":
        marker = read_stage_marker(stage.output) or {}
        after, before = marker.get("metrics", {}), marker.get("metrics_before_fit", {})
        summary = {}
        for key in sorted(k for k in after if k.startswith("val/") and k.count("/") <= 2):
            if key.endswith(("_std", "/std", "normalized_std", "/perplexity")):
                continue
            summary[key] = f"{_fmt(before[key])} -> {_fmt(after[key])}" if key in before else _fmt(after[key])
        return summary
    report = stage.output / "report.json" if stage.output.is_dir() else None
    if report is None or not report.is_file():
        return {}
    data = json.loads(report.read_text())
    summary = {
        f"{name} reward": f"{p['reward_mean']:+.4f} ± {p['reward_se']:.4f} (KL {p['kl_mean']:.2f})"
        for name, p in data.get("policies", {}).items()
    }
    for c in data.get("comparisons", []):
        summary[f"{c['policy']} win rate vs {c['baseline']}"] = f"{c['win_rate']:.3f} ± {c['win_rate_se']:.3f}"
        if c.get("same_ending_pairs"):
            summary[f"{c['policy']} win rate, replies ending alike"] = (
                f"{c['same_ending_win_rate']:.3f} ± {c['same_ending_win_rate_se']:.3f} "
                f"({c['same_ending_pairs']} pairs)"
            )
    return summary


def print_summary(results: Sequence[StageResult], total_seconds: float) -> None:
    """A table of stages: status, time, output and headline metrics, printed after whatever is
    pending on stderr so that it is the last thing on screen."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pipeline summary ({total_seconds / 60:.1f} min)")
    for column in ("stage", "status", "time", "output", "results"):
        table.add_column(column)
    for r in results:
        results_text = "\n".join(f"{k}: {v}" for k, v in r.summary.items())
        time_text = f"{r.seconds / 60:.1f} min" if r.seconds else "-"
        table.add_row(r.stage.name, r.status, time_text, str(r.stage.output), results_text)
    sys.stderr.flush()
    sys.stdout.flush()
    Console(width=max(120, Console().width)).print(table)


# ------------------------------------------------------------------------------- running
def run_pipeline(
    stages: Sequence[Stage],
    force: bool = False,
    start_from: str | None = None,
    until: str | None = None,
    python: str = sys.executable,
) -> list[StageResult]:
    """Run the stages that are not complete (see the module doc); stops at the first failure."""
    names = [s.name for s in stages]
    for name in (start_from, until):
        if name is not None and name not in names:
            raise PipelineConfigError(f"no stage named {name!r}; stages are {names}")
    first_forced = 0 if force else names.index(start_from) if start_from else len(stages)
    last = names.index(until) if until else len(stages) - 1
    results: list[StageResult] = []
    rerun_rest = False
    failed = False
    for i, stage in enumerate(stages):
        if failed or i > last:
            results.append(StageResult(stage, "not run"))
            continue
        if not rerun_rest and i < first_forced and stage.is_complete():
            print(f"[rlhf.pipeline] {stage.name}: complete ({stage.output}), skipped", flush=True)
            results.append(StageResult(stage, "skipped", summary=stage_summary(stage)))
            continue
        rerun_rest = True
        command = [python, "-m", *stage.command]
        print(f"[rlhf.pipeline] {stage.name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        process = subprocess.Popen(command)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            # The stage got the same Ctrl-C (one process group): let it save and exit.
            code = process.wait()
            print(f"[rlhf.pipeline] {stage.name} interrupted", file=sys.stderr, flush=True)
            results.append(StageResult(stage, "interrupted", time.perf_counter() - start))
            failed = True
            continue
        seconds = time.perf_counter() - start
        if code != 0 or not stage.is_complete():
            why = f"exit code {code}" if code else f"finished but {stage.output} is not complete"
            print(f"[rlhf.pipeline] {stage.name} failed ({why})", file=sys.stderr, flush=True)
            results.append(StageResult(stage, "failed", seconds))
            failed = True
            continue
        results.append(StageResult(stage, "ran", seconds, stage_summary(stage)))
    return results


def build_parser(
    prog: str = "python -m rlhf.pipeline", description: str | None = None, config: bool = True
) -> argparse.ArgumentParser:
    """The pipeline's arguments; ``config=False`` leaves ``--config`` out (a fixed recipe)."""
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0])
    if config:
        p.add_argument("--config", required=True, help="pipeline config (a YAML 'stages' list)")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    p.add_argument("--from", dest="start_from", metavar="NAME", help="re-run from this stage on")
    p.add_argument("--until", metavar="NAME", help="stop after this stage")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the pipeline ``argv`` describes; the exit code (0 done, 1 a stage failed, 2 a bad
    config, 130 interrupted). The summary table is the last thing printed."""
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        stages = load_pipeline(args.config)
        start = time.perf_counter()
        results = run_pipeline(stages, args.force, args.start_from, args.until)
    except PipelineConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_summary(results, time.perf_counter() - start)
    if any(r.status == "interrupted" for r in results):
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
