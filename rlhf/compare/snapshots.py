"""Save a run's policy every few training steps, so a comparison can evaluate it along the way.

``PolicySnapshots(every_n_steps=k, dirpath=D)`` calls the stage module's own
``save_outputs(D/stepNNNNN)`` after every ``k``-th training step (``k = 0``: never): one ``training_step`` call,
i.e. a PPO iteration, a rejection-sampling round or a DPO batch, counted by Lightning's batch
progress, which a resumed run restores. Each snapshot is a complete stage output (adapter,
merged ``model/``, marker), so anything that loads a stage output loads it. The step that ends
the run is not snapshotted: the stage's final output is that policy.

Saving must not change the run: the RNG states (torch, Python, NumPy) are restored after each
save (merging loads a fresh base model), so a run with snapshots draws what it would draw
without them. The seconds each save took are written to ``D/saving.json`` (``{name: s}``), so
the run's wall time can be reported without them. When training ends, ``D/steps.json``
(``{"steps": n}``) records how many training steps the run made: the step of its final output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from rlhf.outputs import atomic_file
from rlhf.resume import capture_rng_state, restore_rng_state

SAVING_TIMES = "saving.json"
STEPS_FILE = "steps.json"


def snapshot_name(step: int) -> str:
    """``step00010`` for training step 10 (sorts in step order)."""
    return f"step{step:05d}"


def snapshot_step(name: str) -> int:
    """The training step of a snapshot directory name (``step00010`` -> 10)."""
    if not name.startswith("step") or not name[4:].isdigit():
        raise ValueError(f"not a snapshot name: {name!r} (expected stepNNNNN)")
    return int(name[4:])


def list_snapshots(dirpath: str | Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of each complete snapshot under ``dirpath`` (with its stage
    marker), in step order; empty when there is none."""
    from rlhf.outputs import STAGE_MARKER

    root = Path(dirpath)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        named = path.is_dir() and path.name.startswith("step") and path.name[4:].isdigit()
        if named and (path / STAGE_MARKER).is_file():
            found.append((snapshot_step(path.name), path))
    return sorted(found)


def read_saving_seconds(dirpath: str | Path) -> float:
    """Total seconds spent saving the snapshots under ``dirpath`` (0 when none were saved)."""
    try:
        times = json.loads((Path(dirpath) / SAVING_TIMES).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0.0
    return float(sum(times.values())) if isinstance(times, dict) else 0.0


def read_steps(dirpath: str | Path) -> int | None:
    """The training steps of a finished run (``steps.json`` under ``dirpath``), or ``None``."""
    try:
        return int(json.loads((Path(dirpath) / STEPS_FILE).read_text())["steps"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class PolicySnapshots(Callback):
    """Save the policy (the module's ``save_outputs``) every ``every_n_steps`` training steps.

    Args:
        every_n_steps: training steps (``training_step`` calls) between snapshots; 0: no
            snapshots (``steps.json`` is still written).
        dirpath: where ``stepNNNNN/`` snapshot directories go; keep it outside the stage's
            ``output_dir`` (an output directory must not hold another stage output).
    """

    def __init__(self, every_n_steps: int, dirpath: str) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.dirpath = Path(dirpath)

    @staticmethod
    def steps_done(trainer: Trainer) -> int:
        """Training steps completed, this one included (restored on resume)."""
        return trainer.fit_loop.epoch_loop.total_batch_idx + 1

    @staticmethod
    def run_ends(trainer: Trainer) -> bool:
        """Whether this step is the run's last (its policy is the stage's final output)."""
        return bool(trainer.should_stop) or 0 < trainer.max_steps <= trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = self.steps_done(trainer)
        if not self.every_n_steps or step % self.every_n_steps or self.run_ends(trainer) or not trainer.is_global_zero:
            return
        save = getattr(pl_module, "save_outputs", None)
        if save is None:
            raise TypeError(f"{type(pl_module).__name__} has no save_outputs(output_dir): PolicySnapshots "
                            f"needs a stage module")
        rng = capture_rng_state()
        start = time.perf_counter()
        try:
            save(str(self.dirpath / snapshot_name(step)))
        finally:
            restore_rng_state(rng)
        self._record_time(snapshot_name(step), time.perf_counter() - start)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not trainer.interrupted:
            _write_json(self.dirpath / STEPS_FILE, {"steps": self.steps_done(trainer)})

    def _record_time(self, name: str, seconds: float) -> None:
        path = self.dirpath / SAVING_TIMES
        try:
            times = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            times = {}
        times[name] = seconds
        _write_json(path, times)
