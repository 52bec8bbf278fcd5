"""Continuing a killed run from its last checkpoint as the same run.

Lightning restores weights, optimizer, LR scheduler, loop counters and callback states from a
checkpoint. What continuing *the same run* also needs is added here:

- **RNG state** (torch, CUDA, Python, NumPy) is saved in every checkpoint and restored with
  it, before the training data loader starts, so PPO sampling (and the next epoch's shuffle)
  after a resume draws what the uninterrupted run would have drawn. Validation samples under
  its own fixed seed and hands the training RNG back as it found it, so a resume that skips a
  validation does not shift the training stream.
- **Logger identity**: the CSV logger's version directory and the W&B run id are saved in the
  checkpoint and given back to the loggers on resume: metrics continue in the same
  ``metrics.csv`` (cut back to the checkpoint's step; rows the killed run logged after its
  last checkpoint are made again) and in the same W&B run (``resume="allow"``).
- **Logs are flushed** after each checkpoint (at the next step or validation), so the history
  up to a checkpoint survives ``kill -9``.
- **``--ckpt_path last``**: :func:`find_last_checkpoint` looks where this config writes
  checkpoints (``ModelCheckpoint.dirpath``, each logger's ``<save_dir>/<name>/*/checkpoints``,
  ``<default_root_dir>/checkpoints``) and takes the newest ``last*.ckpt``. Lightning's own
  ``"last"`` looks only in the directory of the *new* run's logger version, which is empty.
  With ``$RLHF_RESUME_NOT_BEFORE`` (a Unix time; ``rlhf.pipeline`` sets it to when the run it
  resumes started) older checkpoints, left by earlier runs, are not taken.
- **The same config**: a checkpoint records the run's resolved config
  (:class:`rlhf.run_info.RunInfoCallback`); resuming with different values is refused, naming
  the keys (:func:`rlhf.run_info.check_resume_config`).
- **Torn log rows**: a ``metrics.csv`` row cut short by ``kill -9`` is dropped on resume, the
  rows before it kept.

The data position is the data module's part (:mod:`rlhf.data.sampling`). Multi-process runs:
only rank 0's RNG state is saved; on resume every rank restores it.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from rlhf.outputs import STAGE_MARKER

log = logging.getLogger("rlhf.resume")

RUN_KEY = "rlhf_run"
LAST_CHECKPOINT_GLOB = "last*.ckpt"
NOT_BEFORE_ENV = "RLHF_RESUME_NOT_BEFORE"


# -- RNG ---------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and initialised CUDA) generators, Python's ``random`` and
    NumPy's global generator, in types a weights-only ``torch.load`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators from :func:`capture_rng_state`'s dict (missing parts are left)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        keys = np.asarray(n["keys"], dtype=np.int64).astype(np.uint32)
        np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_all(seed: int) -> None:
    """Seed torch (all devices), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# -- loggers ----------------------------------------------------------------------------------
def logger_identities(loggers: list[Logger]) -> list[dict[str, Any]]:
    """``[{"type", "name", "version"}]`` per logger: what makes a resumed run log to the same
    place (the CSV version, the W&B run id)."""
    return [
        {"type": type(logger).__name__, "name": logger.name, "version": logger.version}
        for logger in loggers
    ]


def _keep_row(row: dict[str, str], max_step: int | None) -> bool:
    if max_step is None:
        return True
    try:
        return int(float(row.get("step") or 0)) <= max_step
    except ValueError:
        return True


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """``(fields, rows, torn line numbers)`` of a ``metrics.csv``: a last line without its
    newline (cut by a kill mid-write) and rows with more or fewer fields than the header are
    torn and left out."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    torn = [len(lines)] if lines and not lines[-1].endswith(("\n", "\r")) else []
    reader = csv.DictReader(lines[: len(lines) - len(torn)])
    fields = list(reader.fieldnames or [])
    rows = []
    for row in reader:
        if None in row or None in row.values():
            torn.append(reader.line_num)
        else:
            rows.append(row)
    return fields, rows, sorted(torn)


def restore_csv_history(logger: CSVLogger, max_step: int | None) -> int:
    """Reopen ``logger``'s existing ``metrics.csv`` for appending, keeping the rows up to
    ``max_step`` (torn rows dropped, see :func:`read_csv_rows`); returns how many were kept.

    (Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts; this reads the
    rows first and writes them back through the new writer.)
    """
    path = Path(logger.log_dir) / "metrics.csv"
    fields: list[str] = []
    rows: list[dict[str, str]] = []
    if path.is_file():
        fields, rows, torn = read_csv_rows(path)
        rows = [row for row in rows if _keep_row(row, max_step)]
        if torn:
            log.warning("%s: dropped torn row(s) at line(s) %s", path, ", ".join(map(str, torn)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
        writer = logger.experiment
    if rows:
        writer.metrics_keys = fields
        writer.metrics = rows
        writer.save()
    return len(rows)


def resume_loggers(
    trainer: Trainer, saved: list[dict[str, Any]], max_step: int | None = None
) -> None:
    """Point the trainer's (not yet started) loggers at the run recorded in ``saved`` (see
    :func:`logger_identities`): the same CSV version directory, with its ``metrics.csv`` kept
    up to ``max_step``, and the same W&B run id. Loggers configured with an explicit
    version/id keep it.
    """
    for logger, entry in zip(trainer.loggers, saved):
        version = entry.get("version")
        if version is None or type(logger).__name__ != entry.get("type"):
            continue
        if isinstance(logger, WandbLogger):
            if logger._experiment is None and logger._id is None:
                logger._id = logger._wandb_init["id"] = str(version)
                logger._wandb_init.setdefault("resume", "allow")
                log.info("resuming W&B run %s", version)
        elif getattr(logger, "_version", "unset") is None:
            logger._version = version
            if isinstance(logger, CSVLogger) and rank_zero_only.rank == 0:
                kept = restore_csv_history(logger, max_step)
                log.info("resuming CSV log %s (%d rows kept)", logger.log_dir, kept)


# -- finding the checkpoint --------------------------------------------------------------------
def checkpoint_dirs(trainer: Trainer) -> list[Path]:
    """Where checkpoints of this trainer's config can be: explicit ``ModelCheckpoint``
    directories, every version directory of each logger, and ``<default_root_dir>/checkpoints``."""
    dirs: list[Path] = []
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            dirs.append(Path(callback.dirpath))
    for logger in trainer.loggers:
        save_dir = logger.save_dir or trainer.default_root_dir
        if logger.name:
            dirs.extend(sorted(Path(save_dir, str(logger.name)).glob("*/checkpoints")))
    dirs.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(dirs))


def find_last_checkpoint(trainer: Trainer) -> Path | None:
    """The most recently written ``last*.ckpt`` in :func:`checkpoint_dirs`, or ``None``; with
    ``$RLHF_RESUME_NOT_BEFORE`` set, only one written at or after that Unix time."""
    dirs = checkpoint_dirs(trainer)
    candidates = [p for d in dirs for p in d.glob(LAST_CHECKPOINT_GLOB) if p.is_file()]
    not_before = os.environ.get(NOT_BEFORE_ENV)
    if not_before:
        older = [p for p in candidates if p.stat().st_mtime < float(not_before)]
        for path in older:
            log.info("not resuming from %s: written before the run to resume started", path)
        candidates = [p for p in candidates if p not in older]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def logged_step(checkpoint: dict[str, Any]) -> int | None:
    """The logger step a checkpoint was saved at (Lightning's ``_batches_that_stepped``)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"])
    except (KeyError, TypeError, ValueError):
        return None


def prepare_resume(trainer: Trainer, ckpt_path: str | None) -> str | None:
    """Resolve ``--ckpt_path`` (``"last"``, a file, or ``None``) and set up the trainer's loggers
    to continue the checkpoint's run. Call before fitting (before any logger has started).

    Returns the checkpoint file to give ``trainer.fit``; ``None`` when there is nothing to
    resume (``"last"`` with no checkpoint yet starts a new run, as in Lightning). Other
    Lightning keywords (``"best"``, ``"hpc"``, ...) pass through unchanged. A checkpoint of a
    run with a different config is refused (:func:`rlhf.run_info.check_resume_config`).
    """
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        path = find_last_checkpoint(trainer)
        if path is None:
            where = ", ".join(str(d) for d in checkpoint_dirs(trainer))
            log.warning("--ckpt_path last: no last checkpoint in %s; starting a new run", where)
            return None
    elif ckpt_path in ("best", "hpc", "registry") or "://" in ckpt_path:
        return ckpt_path
    else:
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    from rlhf.run_info import check_resume_config

    check_resume_config(trainer, checkpoint, path)  # before anything is changed
    saved = checkpoint.get(RUN_KEY) or {}
    resume_loggers(trainer, saved.get("loggers", []), logged_step(checkpoint))
    log.info("resuming from %s", path)
    return str(path)


def stop_finished_run(trainer: Trainer, output_dir: str | None) -> str | None:
    """For a run resumed from its final checkpoint (nothing left to train): stop before another
    step, and return where to save the stage output; ``None`` when a complete output written
    after the checkpoint is there already (saving again would only lose its metrics)."""
    trainer.should_stop = True
    ckpt = trainer.ckpt_path
    marker = Path(output_dir) / STAGE_MARKER if output_dir else None
    keep = bool(
        marker and ckpt and marker.is_file() and Path(ckpt).is_file()
        and marker.stat().st_mtime >= Path(ckpt).stat().st_mtime
    )
    keep = trainer.strategy.broadcast(keep, src=0)  # every rank saves, or none
    log.info("resumed from the run's final checkpoint %s: nothing left to train%s", ckpt,
             f"; keeping the output saved after it, {output_dir}" if keep else "")
    return None if keep else output_dir


# -- the callback ---------------------------------------------------------------------------------
class RunContinuity(Callback):
    """Saves what a resumed run needs beyond Lightning's own state (RNG, logger identity) into
    every checkpoint and restores the RNG from it, runs validation under a fixed seed without
    disturbing the training RNG, and flushes the loggers after each checkpoint. ``rlhf.fit``
    adds it to every run.

    Args:
        validation_seed: seed of the validation RNG; ``None`` takes the run's
            ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
    """

    def __init__(self, validation_seed: int | None = None) -> None:
        self.validation_seed = validation_seed
        self._training_rng: dict[str, Any] | None = None  # set while validating
        self._flush_pending = False

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        rng = self._training_rng if self._training_rng is not None else capture_rng_state()
        checkpoint[RUN_KEY] = {"rng": rng, "loggers": logger_identities(trainer.loggers)}
        self._flush_pending = True

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores checkpoints after the model is built and before the training
        # data loader starts: from here on the RNG stream is the interrupted run's.
        rng = (checkpoint.get(RUN_KEY) or {}).get("rng")
        if rng is not None:
            restore_rng_state(rng)

    def _flush(self, trainer: Trainer) -> None:
        if self._flush_pending:
            self._flush_pending = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)
        self._training_rng = capture_rng_state()
        seed = self.validation_seed
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed_all(seed)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._training_rng is not None:
            restore_rng_state(self._training_rng)
            self._training_rng = None


def make_resumable(trainer: Trainer) -> None:
    """Give ``trainer`` what resuming and interrupting need: :class:`RunContinuity`,
    :class:`rlhf.interrupts.CheckpointOnInterrupt` (each unless already there) and atomic
    checkpoint files (:func:`rlhf.outputs.use_atomic_checkpoints`)."""
    from rlhf.interrupts import CheckpointOnInterrupt
    from rlhf.outputs import use_atomic_checkpoints

    for kind in (RunContinuity, CheckpointOnInterrupt):
        if not any(isinstance(cb, kind) for cb in trainer.callbacks):
            trainer.callbacks.append(kind())
    use_atomic_checkpoints(trainer)
