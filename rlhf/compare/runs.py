"""Running a comparison: each (method, seed) trains as an ``rlhf.fit`` child process, then is
evaluated; both leave completion records, so a re-run does only what is missing.

Layout under the config's ``out`` (``<out>/<method>/seed<S>/``):

- ``policy/``: the run's final stage output (``model.init_args.output_dir``);
- ``snapshots/stepNNNNN/``: the policy every ``snapshot_every`` training steps
  (:class:`rlhf.compare.snapshots.PolicySnapshots`), with ``saving.json`` and ``steps.json``;
- ``logs/``: the run's CSV log and checkpoints (``trainer.default_root_dir``);
- ``eval.json``: its evaluation (:meth:`rlhf.compare.evaluation.PolicyEvaluator.evaluate`);
- ``train_time.json``: the seconds of each training attempt.

The records are :mod:`rlhf.pipeline`'s own: a training run is a pipeline ``fit`` stage (skipped
when complete with an unchanged fingerprint: command, config hashes, the reference and proxy
outputs; an interrupted one resumes from its last checkpoint, ``--ckpt_path last``), and an
evaluation a ``run`` stage whose fingerprint holds the evaluation settings and the policy's
stamp. One lock on ``out`` keeps a second comparison off the same outputs.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlhf.compare.config import CompareConfig, Method
from rlhf.compare.snapshots import (
    STEPS_FILE,
    list_snapshots,
    read_saving_seconds,
    read_steps,
)
from rlhf.outputs import atomic_file, read_stage_marker
from rlhf.pipeline import Stage, run_stage, stale_reason
from rlhf.pipeline_state import (
    fingerprint,
    hold_locks,
    output_stamp,
    read_record,
    write_record,
)

log = logging.getLogger("rlhf.compare")

EVAL_COMMAND = "rlhf.compare.evaluate"  # names the evaluation in its fingerprint (not a module)


class Evaluator(Protocol):
    """What evaluates a (method, seed): :class:`rlhf.compare.evaluation.PolicyEvaluator`."""

    def evaluate(self, kind: str, seed: int, points: list[tuple[int, Path]] | None = None,
                 n: int | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class RunPaths:
    """Where one (method, seed) keeps its files (see the module doc)."""

    root: Path

    @property
    def policy(self) -> Path:
        return self.root / "policy"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.json"

    @property
    def train_time(self) -> Path:
        return self.root / "train_time.json"


def run_paths(config: CompareConfig, method: str, seed: int) -> RunPaths:
    return RunPaths(config.out / method / f"seed{seed}")


def fit_command(config: CompareConfig, method: Method, seed: int) -> list[str]:
    """``rlhf.fit`` and its arguments for ``method`` at ``seed``: the method's config and args,
    then the run's seed, output, log directory (a CSV logger: the W&B logger of a config is
    replaced) and the snapshot callback."""
    paths = run_paths(config, method.name, seed)
    logger = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
               "init_args": {"save_dir": str(paths.logs), "name": "csv"}}]
    snapshots = {"class_path": "rlhf.compare.snapshots.PolicySnapshots",
                 "init_args": {"every_n_steps": method.snapshot_every or 0, "dirpath": str(paths.snapshots)}}
    return [
        "rlhf.fit", "--config", str(method.fit), *method.args,
        f"--seed_everything={seed}",
        f"--model.init_args.output_dir={paths.policy}",
        f"--trainer.default_root_dir={paths.logs}",
        f"--trainer.logger={json.dumps(logger)}",
        f"--trainer.callbacks+={json.dumps(snapshots)}",
    ]


def fit_stage(config: CompareConfig, method: Method, seed: int) -> Stage:
    """The training run of ``method`` at ``seed`` as a pipeline ``fit`` stage."""
    return Stage(f"{method.name}/seed{seed}", fit_command(config, method, seed),
                 run_paths(config, method.name, seed).policy, "fit", (method.fit,))  # type: ignore[arg-type]


def input_stamps(config: CompareConfig) -> dict[str, int | None]:
    """When the reference and the proxy were last written (their stage markers)."""
    return {"reference": output_stamp(config.reference, True), "proxy": output_stamp(config.proxy, True)}


def train_inputs(config: CompareConfig, method: Method) -> dict[str, int | None]:
    """:func:`input_stamps` plus the stamps of the method's own reward models."""
    stamps = input_stamps(config)
    stamps.update({f"reward {path}": output_stamp(path, True) for path in method.rewards})
    return stamps


def train_fingerprint(config: CompareConfig, method: Method, seed: int) -> dict[str, Any]:
    stage = fit_stage(config, method, seed)
    return fingerprint(stage.command, stage.configs, train_inputs(config, method))


def eval_stage(config: CompareConfig, method: Method, seed: int) -> tuple[Stage, dict[str, Any]]:
    """The evaluation of ``method`` at ``seed`` as a pipeline ``run`` stage, and its
    fingerprint: the evaluation settings, gold function, method kind, and the stamps of the
    reference, the proxy and (``fit``) the trained policy."""
    paths = run_paths(config, method.name, seed)
    settings = {"eval": config.eval.as_dict(), "gold": config.gold, "kind": method.kind, "n": method.n,
                "seed": seed, "snapshot_every": method.snapshot_every}
    command = [EVAL_COMMAND, json.dumps(settings, sort_keys=True)]
    inputs = input_stamps(config)
    if method.kind == "fit":
        inputs["policy"] = output_stamp(paths.policy, True)
    return Stage(f"{method.name}/seed{seed} eval", command, paths.eval_file, "run"), fingerprint(command, (), inputs)


def resumable(stage: Stage, current: dict[str, Any]) -> bool:
    """Whether ``run_stage`` will resume ``stage``'s interrupted run (the same test as
    :mod:`rlhf.pipeline`'s: a ``started`` record with the same fingerprint)."""
    record = read_record(stage.output)
    return bool(record) and record.get("status") == "started" and record.get("fingerprint") == current


# ------------------------------------------------------------------------------- the plan
@dataclass
class Action:
    """What a comparison does for one (method, seed) step: ``what`` is ``train`` or
    ``evaluate``; ``action`` is ``skip`` (complete and up to date), ``run`` or ``resume``."""

    method: str
    seed: int
    what: str
    action: str
    reason: str = ""
    command: list[str] | None = None

    def line(self) -> str:
        text = f"{self.method}/seed{self.seed} {self.what}: {self.action}"
        if self.reason:
            text += f" ({self.reason})"
        if self.command and self.action != "skip":
            text += "\n    python -m " + shlex.join(self.command)
        return text


def plan_run(config: CompareConfig, method: Method, seed: int) -> list[Action]:
    """What a comparison would do for ``method`` at ``seed`` now."""
    actions = []
    trains = False
    if method.kind == "fit":
        stage = fit_stage(config, method, seed)
        current = train_fingerprint(config, method, seed)
        why = stale_reason(stage, [], current)
        trains = why is not None
        action = "skip" if not trains else "resume" if resumable(stage, current) else "run"
        actions.append(Action(method.name, seed, "train", action, why or "complete", stage.command))
    stage, current = eval_stage(config, method, seed)
    why = "after training" if trains else stale_reason(stage, [], current)
    actions.append(Action(method.name, seed, "evaluate", "skip" if why is None else "run", why or "complete"))
    return actions


def plan(config: CompareConfig, methods: Sequence[str], seeds: Sequence[int]) -> list[Action]:
    """Every step of the chosen methods and seeds, in the order they would run."""
    return [a for m in methods for s in seeds for a in plan_run(config, config.methods[m], s)]


# ------------------------------------------------------------------------------- running
def last_write(paths: RunPaths) -> float | None:
    """When the run last wrote to its logs or snapshots (Unix time), or ``None``."""
    stamps = [f.stat().st_mtime for d in (paths.logs, paths.snapshots) if d.is_dir() for f in d.rglob("*") if f.is_file()]
    return max(stamps, default=None)


def start_attempt(paths: RunPaths, fresh: bool) -> None:
    """Open a training attempt in ``train_time.json`` (``fresh``: forget earlier attempts,
    which belonged to a run that is not being resumed). An attempt still open from an earlier
    invocation was killed with it: it is closed at the run's last write, a lower bound."""
    attempts = [] if fresh else read_json(paths.train_time, {}).get("attempts", [])
    for attempt in attempts:
        if attempt.get("status") == "running":
            end = last_write(paths) or attempt["started_at"]
            attempt.update(seconds=max(0.0, end - attempt["started_at"]), status="killed (timed to its last write)")
    attempts.append({"status": "running", "started_at": time.time(), "seconds": 0.0})
    _write_attempts(paths.train_time, attempts)


def finish_attempt(paths: RunPaths, seconds: float, status: str) -> None:
    """Close the open attempt with the seconds the stage ran and how it ended."""
    attempts = read_json(paths.train_time, {}).get("attempts", [])
    if not attempts or attempts[-1].get("status") != "running":
        attempts.append({"started_at": time.time() - seconds})
    attempts[-1].update(seconds=seconds, status=status, finished_at=time.time())
    _write_attempts(paths.train_time, attempts)


def _write_attempts(path: Path, attempts: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"attempts": attempts}, indent=2) + "\n")


def read_json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def train_seconds(paths: RunPaths) -> float | None:
    """The run's training wall time: its attempts' seconds less the snapshot saving time
    (``None`` when no attempt was recorded). An attempt killed together with the comparison
    counts up to the run's last write (:func:`start_attempt`)."""
    attempts = read_json(paths.train_time, {}).get("attempts", [])
    if not attempts:
        return None
    return sum(a["seconds"] for a in attempts) - read_saving_seconds(paths.snapshots)


def eval_points(config: CompareConfig, method: Method, seed: int) -> list[tuple[int, Path]]:
    """``(training step, policy dir)`` to evaluate for a trained run: its snapshots, then the
    final policy at the run's step count (``steps.json``)."""
    paths = run_paths(config, method.name, seed)
    final = read_steps(paths.snapshots)
    if final is None:
        raise FileNotFoundError(f"{paths.snapshots / STEPS_FILE} is missing: the run did not finish "
                                f"under rlhf.compare (its PolicySnapshots callback writes it)")
    points = [(step, path) for step, path in list_snapshots(paths.snapshots) if step < final]
    for _, path in points:
        model_dir = (read_stage_marker(path) or {}).get("model_dir")
        if not model_dir or not (path / model_dir).is_dir():
            raise FileNotFoundError(f"snapshot {path} has no merged model (pruned by --prune-snapshots?): "
                                    f"to evaluate it again, delete {paths.root} and train the run again")
    return [*points, (final, paths.policy)]


@dataclass
class Outcome:
    """What a comparison invocation did: ``(method, seed, what, status, seconds)`` per step,
    and the exit code (0 done, 1 a run failed, 128 + n stopped by signal n)."""

    steps: list[tuple[str, int, str, str, float]]
    exit_code: int = 0


def train(config: CompareConfig, method: Method, seed: int, python: str,
          say: Callable[[str], None]) -> tuple[str, float, int | None]:
    """Train ``method`` at ``seed`` unless complete; ``(status, seconds, exit code when a
    signal stopped it)``."""
    stage = fit_stage(config, method, seed)
    current = train_fingerprint(config, method, seed)
    why = stale_reason(stage, [], current)
    if why is None:
        say(f"{stage.name} train: complete, skipped")
        return "skipped", 0.0, None
    paths = run_paths(config, method.name, seed)
    fresh = not resumable(stage, current)
    if fresh:  # snapshots and times of an older run are not this run's
        shutil.rmtree(paths.snapshots, ignore_errors=True)
    start_attempt(paths, fresh)
    result = run_stage(stage, current, python, resume=True)
    finish_attempt(paths, result.seconds, result.status)
    return result.status, result.seconds, result.exit_code


def evaluate(config: CompareConfig, method: Method, seed: int, evaluator: Evaluator,
             say: Callable[[str], None]) -> tuple[str, float]:
    """Evaluate ``method`` at ``seed`` unless its evaluation is complete and up to date."""
    stage, current = eval_stage(config, method, seed)
    why = stale_reason(stage, [], current)
    if why is None:
        say(f"{stage.name}: complete, skipped")
        return "skipped", 0.0
    say(f"{stage.name}: running ({why})")
    started = time.time()
    write_record(stage.output, {"stage": stage.name, "status": "started", "started_at": started, "fingerprint": current})
    points = eval_points(config, method, seed) if method.kind == "fit" else None
    start = time.perf_counter()
    record = evaluator.evaluate(method.kind, seed, points, method.n)
    record.update(method=method.name, seed=seed, kind=method.kind, budget=method.budget)
    stage.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(stage.output) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    write_record(stage.output, {"stage": stage.name, "status": "complete", "started_at": started,
                                "finished_at": time.time(), "fingerprint": current})
    return "ran", time.perf_counter() - start


def prune_snapshots(paths: RunPaths) -> int:
    """Delete the merged ``model/`` of each snapshot (adapters and markers stay); their numbers
    are in ``eval.json``, and re-evaluating them then needs the run trained again. Returns how
    many were removed."""
    removed = 0
    for _, path in list_snapshots(paths.snapshots):
        model_dir = (read_stage_marker(path) or {}).get("model_dir")
        if model_dir and (path / model_dir).is_dir():
            shutil.rmtree(path / model_dir)
            removed += 1
    return removed


def run_comparison(
    config: CompareConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    evaluator: Evaluator,
    python: str = sys.executable,
    prune: bool = False,
    say: Callable[[str], None] = lambda text: print(f"[rlhf.compare] {text}", flush=True),
) -> Outcome:
    """Train and evaluate each chosen (method, seed) that is not complete and up to date, in
    config order, holding the lock on ``config.out``. A failed run is reported and the others
    go on; a signal stops the comparison (the running stage saves a checkpoint)."""
    outcome = Outcome([])
    with hold_locks([config.out]):
        for name in methods:
            method = config.methods[name]
            for seed in seeds:
                if method.kind == "fit":
                    status, seconds, code = train(config, method, seed, python, say)
                    outcome.steps.append((name, seed, "train", status, seconds))
                    if code is not None or status == "interrupted":
                        outcome.exit_code = code if code is not None else 130
                        return outcome
                    if status == "failed":
                        outcome.exit_code = 1
                        continue
                try:
                    status, seconds = evaluate(config, method, seed, evaluator, say)
                except Exception:  # reported with its traceback; the other runs go on
                    log.exception("%s/seed%d eval failed", name, seed)
                    outcome.steps.append((name, seed, "evaluate", "failed", 0.0))
                    outcome.exit_code = 1
                    continue
                outcome.steps.append((name, seed, "evaluate", status, seconds))
                if prune and method.kind == "fit":
                    prune_snapshots(run_paths(config, name, seed))
    return outcome
