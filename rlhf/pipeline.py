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
atomically). Each stage is a subprocess, so a crash in one leaves the completed ones intact.

A re-run skips a complete stage only while it is up to date: the pipeline records each stage's
fingerprint (command, config file hashes, the earlier stages' outputs; see
:mod:`rlhf.pipeline_state`), and a stage whose fingerprint changed runs again, as does every
stage after one that runs. ``--force`` re-runs every stage, ``--from NAME`` that one and the
rest. A ``fit`` stage whose run was interrupted (Ctrl-C, SIGTERM, kill -9, a crash) resumes
from its checkpoint (``--ckpt_path last``) when its fingerprint is unchanged, else starts anew.

Ctrl-C or SIGTERM to the pipeline reaches the running stage (as SIGTERM), which saves a
checkpoint and exits; the pipeline then exits with the stage's code. If the pipeline is killed
outright the stage gets SIGTERM (Linux). A second pipeline on the same outputs refuses to start
(a lock per output). The run ends with a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.console import quiet_known_warnings
from rlhf.fit_config import FitConfigError, fit_setting
from rlhf.outputs import read_stage_marker
from rlhf.pipeline_state import (
    PipelineLockedError,
    fingerprint,
    fingerprint_changes,
    hold_locks,
    interrupted_exit_code,
    output_stamp,
    read_record,
    run_child,
    write_record,
)
from rlhf.resume import NOT_BEFORE_ENV

EXIT_LOCKED = 3


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
        configs: a ``fit`` stage's config files (fingerprinted).
    """

    name: str
    command: list[str]
    output: Path
    kind: str
    configs: tuple[Path, ...] = ()

    def is_complete(self) -> bool:
        if self.kind == "fit":
            return read_stage_marker(self.output) is not None
        return self.output.exists()

    def stamp(self) -> int | None:
        """When its output was last written (see :func:`rlhf.pipeline_state.output_stamp`)."""
        return output_stamp(self.output, self.kind == "fit")


@dataclass
class StageResult:
    """What happened to a stage in this invocation."""

    stage: Stage
    status: str  # "ran", "skipped", "failed", "interrupted", "not run"
    seconds: float = 0.0
    summary: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None  # the pipeline's, when a signal stopped it here


def _fit_output_dir(configs: Sequence[Path], args: Sequence[str], where: str) -> Path:
    try:
        output = fit_setting(configs, args, "model.init_args.output_dir")
    except FitConfigError as e:
        raise PipelineConfigError(f"{where}: {e}") from None
    if not output:
        raise PipelineConfigError(
            f"{where}: {', '.join(map(str, configs))} set no model.init_args.output_dir, so the "
            f"pipeline cannot tell when the stage is complete"
        )
    return Path(output)


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
            output = entry.get("output")
            output = Path(output) if output else _fit_output_dir([Path(c) for c in configs], extra, where)
            stages.append(Stage(entry["name"], command, output, "fit", tuple(Path(c) for c in configs)))
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
    check_outputs_apart(stages, path)
    return stages


def check_outputs_apart(stages: Sequence[Stage], path: Path) -> None:
    """Refuse two stages with one output, or one output inside another: a stage replaces its
    whole output directory when it saves, which would delete the other."""
    resolved = [(stage, stage.output.resolve()) for stage in stages]
    for a, out_a in resolved:
        for b, out_b in resolved:
            if a is not b and (out_a == out_b or out_a in out_b.parents):
                raise PipelineConfigError(
                    f"{path}: stage {a.name}'s output {a.output} contains stage {b.name}'s output "
                    f"{b.output}; saving {a.name} replaces its output whole and would delete "
                    f"{b.name}'s: give each stage its own output"
                )


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
        if "lc_win_rate" in c:
            summary[f"{c['policy']} length-controlled win rate"] = (
                f"{c['lc_win_rate']:.3f} (95% CI {c['lc_win_rate_ci95_low']:.3f}-{c['lc_win_rate_ci95_high']:.3f})"
            )
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
def stale_reason(stage: Stage, earlier: Sequence[Stage], current: dict[str, Any]) -> str | None:
    """Why ``stage`` must run (``None``: it is complete and up to date). Without a record (an
    output from before the pipeline kept them, or made by hand) it is stale when an earlier
    stage's output is newer than its own."""
    if not stage.is_complete():
        return "not complete"
    record = read_record(stage.output)
    if record is None:
        own = stage.stamp() or 0
        newer = [s.name for s in earlier if (s.stamp() or 0) > own]
        return f"{', '.join(newer)} newer than its output" if newer else None
    if record.get("status") != "complete":
        return "its last run did not finish"
    return "; ".join(fingerprint_changes(record.get("fingerprint") or {}, current)) or None


def _resumable(stage: Stage, current: dict[str, Any]) -> dict[str, Any] | None:
    """The record of ``stage``'s interrupted run when it is the run to resume: a ``fit``
    stage's, started with the same fingerprint (the same config, command and inputs)."""
    record = read_record(stage.output)
    if stage.kind != "fit" or record is None or record.get("status") != "started":
        return None
    if any(arg == "--ckpt_path" or arg.startswith("--ckpt_path=") for arg in stage.command):
        return None  # the stage says where to resume from itself
    if record.get("fingerprint") != current:
        print(f"[rlhf.pipeline] {stage.name}: its interrupted run had other inputs or config; "
              f"starting anew", flush=True)
        return None
    return record


def run_stage(stage: Stage, current: dict[str, Any], python: str, resume: bool) -> StageResult:
    """Run one stage (resuming its interrupted run when ``resume`` and there is one) and record
    it; a signal to the pipeline stops it (see :func:`rlhf.pipeline_state.run_child`)."""
    interrupted = _resumable(stage, current) if resume else None
    started_at = interrupted["started_at"] if interrupted else time.time()
    write_record(stage.output, {"stage": stage.name, "status": "started", "started_at": started_at,
                                "fingerprint": current})
    command = [python, "-m", *stage.command, *(["--ckpt_path", "last"] if interrupted else [])]
    env = {k: v for k, v in os.environ.items() if k != NOT_BEFORE_ENV}
    if interrupted:  # only that run's checkpoints, not an older run's
        env[NOT_BEFORE_ENV] = repr(started_at)
    print(f"[rlhf.pipeline] {stage.name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    code, signum = run_child(command, env)
    seconds = time.perf_counter() - start
    complete = code == 0 and stage.is_complete()
    if signum is not None and not complete:
        print(f"[rlhf.pipeline] {stage.name} interrupted", file=sys.stderr, flush=True)
        return StageResult(stage, "interrupted", seconds, exit_code=interrupted_exit_code(code, signum))
    if not complete:
        why = f"exit code {code}" if code else f"finished but {stage.output} is not complete"
        print(f"[rlhf.pipeline] {stage.name} failed ({why})", file=sys.stderr, flush=True)
        return StageResult(stage, "failed", seconds)
    write_record(stage.output, {"stage": stage.name, "status": "complete", "started_at": started_at,
                                "finished_at": time.time(), "fingerprint": current})
    return StageResult(stage, "ran", seconds, stage_summary(stage), 128 + signum if signum else None)


def run_pipeline(
    stages: Sequence[Stage],
    force: bool = False,
    start_from: str | None = None,
    until: str | None = None,
    python: str = sys.executable,
) -> list[StageResult]:
    """Run the stages that are not complete and up to date (see the module doc), holding each
    output's lock; stops at the first failure or signal."""
    names = [s.name for s in stages]
    for name in (start_from, until):
        if name is not None and name not in names:
            raise PipelineConfigError(f"no stage named {name!r}; stages are {names}")
    first_forced = 0 if force else names.index(start_from) if start_from else len(stages)
    last = names.index(until) if until else len(stages) - 1
    results: list[StageResult] = []
    rerun_rest = stopped = False
    with hold_locks([s.output for s in stages]):
        for i, stage in enumerate(stages):
            if stopped or i > last:
                results.append(StageResult(stage, "not run"))
                continue
            current = fingerprint(stage.command, stage.configs, {s.name: s.stamp() for s in stages[:i]})
            forced = i >= first_forced
            if not rerun_rest and not forced:
                why = stale_reason(stage, stages[:i], current)
                if why is None:
                    print(f"[rlhf.pipeline] {stage.name}: complete ({stage.output}), skipped", flush=True)
                    results.append(StageResult(stage, "skipped", summary=stage_summary(stage)))
                    continue
                if why != "not complete":
                    print(f"[rlhf.pipeline] {stage.name}: out of date ({why})", flush=True)
            rerun_rest = True
            result = run_stage(stage, current, python, resume=not forced)
            results.append(result)
            stopped = result.status != "ran" or result.exit_code is not None
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
    config, 3 another pipeline is running on these outputs, 128 + n stopped by signal n: the
    stage's code). The summary table is the last thing printed."""
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        stages = load_pipeline(args.config)
        start = time.perf_counter()
        results = run_pipeline(stages, args.force, args.start_from, args.until)
    except PipelineConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineLockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    print_summary(results, time.perf_counter() - start)
    stopped = [r.exit_code for r in results if r.exit_code is not None]
    if stopped:
        return stopped[0]
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
