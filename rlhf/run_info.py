"""What every ``rlhf.fit`` run records about itself: the resolved config and the git commit.

:class:`RunInfoCallback` is the CLI's config-saving callback (``LightningCLI`` writes
``config.yaml`` to the trainer's log dir with it). On top of that, when fitting starts it

- gives each W&B logger the full resolved config (``config``) and ``git_commit`` /
  ``git_dirty`` in the run's W&B config;
- writes ``config.yaml`` and ``run_info.json`` into each CSV logger's version directory, next
  to ``metrics.csv``, so every run directory says how it was made;
- writes ``run_info.json`` also to the path in ``$RLHF_RUN_INFO`` when that is set (how
  ``rlhf.sweep`` finds a trial's metrics).

``run_info.json`` holds the git commit, the command line, the config, where the metrics went
and, once fitting ends, the status and the final value of every logged metric.

Every checkpoint also records the resolved config, and resuming with a different one is
refused with the differing keys (:func:`check_resume_config`), so ``config.yaml`` never claims
values a run did not train with. Keys that change nothing trained (:data:`RESUMABLE_CHANGES`:
callbacks, loggers, output paths, ...) may differ. With ``$RLHF_RESUME_CONFIG_CHANGES=allow``
the new values apply from the checkpoint on: the run's ``config.yaml`` is kept, the new config
goes to ``config.resumed-step<N>.yaml`` and ``run_info.json`` lists the changes. Before
fitting, an ``output_dir`` whose atomic replacement would delete another stage's output or this
run's logs is refused (:func:`rlhf.outputs.check_replaceable`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from rlhf.outputs import check_replaceable
from rlhf.tracking import wandb_loggers

log = logging.getLogger("rlhf.run_info")

RUN_INFO_ENV = "RLHF_RUN_INFO"
RUN_INFO_FILE = "run_info.json"
CONFIG_KEY = "rlhf_config"  # the resolved config, in every checkpoint
ALLOW_CHANGES_ENV = "RLHF_RESUME_CONFIG_CHANGES"
# Config keys (and everything under them) a resumed run may change: what is saved, shown and
# logged where, not what is trained.
RESUMABLE_CHANGES = (
    "ckpt_path", "validate_before_fit", "model.init_args.output_dir",
    "trainer.callbacks", "trainer.logger", "trainer.default_root_dir", "trainer.enable_checkpointing",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
)
_SOURCE_DIR = Path(__file__).resolve().parent


class ResumeConfigError(ValueError):
    """Resuming a checkpoint with a config that differs from the one it was saved with."""


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"git_commit", "git_dirty", "git_root"}`` of the repository holding ``directory``.

    ``directory`` defaults to the rlhf source tree, then the working directory. Outside a
    repository (or without git) every value is ``None``; this never raises.
    """
    candidates = [Path(directory)] if directory is not None else [_SOURCE_DIR, Path.cwd()]
    for path in candidates:
        commit = _git(["rev-parse", "HEAD"], path) if path.is_dir() else None
        if commit:
            status = _git(["status", "--porcelain", "--untracked-files=no"], path)
            return {
                "git_commit": commit,
                "git_dirty": None if status is None else bool(status),
                "git_root": _git(["rev-parse", "--show-toplevel"], path),
            }
    return {"git_commit": None, "git_dirty": None, "git_root": None}


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if torch.is_tensor(value) and value.numel() == 1:
            out[key] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON via a temporary file, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model.init_args.lr": 1e-4, ...}``: the leaves of a nested config (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for the keys that differ, leaving out
    :data:`RESUMABLE_CHANGES`; a key one side lacks counts as ``None`` there (a library's new
    argument at its default is no change)."""
    old, new = flatten_config(saved), flatten_config(current)
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES):
            continue
        if old.get(key) != new.get(key):
            changes[key] = (old.get(key), new.get(key))
    return changes


def check_resume_config(trainer: Trainer, checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse (:class:`ResumeConfigError`) to resume ``checkpoint`` (read from ``path``) with a
    config other than the one it was saved with, naming each differing key; with
    ``$RLHF_RESUME_CONFIG_CHANGES=allow``, log them and let the run record them instead.
    Checkpoints without a config (from before this check) pass."""
    callback = next((cb for cb in trainer.callbacks if isinstance(cb, RunInfoCallback)), None)
    saved = checkpoint.get(CONFIG_KEY)
    if callback is None or not isinstance(saved, dict):
        return
    changes = config_changes(saved, callback.config_dict())
    if not changes:
        return
    listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if os.environ.get(ALLOW_CHANGES_ENV) != "allow":
        raise ResumeConfigError(
            f"cannot resume from {path}: the config differs from the one the run was started "
            f"with ({listed}). Resume with the original config, start a new run (without "
            f"--ckpt_path), or set {ALLOW_CHANGES_ENV}=allow to apply the new values from this "
            f"checkpoint on"
        )
    log.warning("resuming %s with config changes (%s=allow): %s", path, ALLOW_CHANGES_ENV, listed)
    callback.record_resume_changes(changes, int(checkpoint.get("global_step", 0)))


class RunInfoCallback(SaveConfigCallback):
    """Saves the config like Lightning's ``SaveConfigCallback`` and records the run (see the
    module docstring). Used by ``rlhf.fit`` for every run; rank zero writes everything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info: dict[str, Any] = {}
        self.paths: list[Path] = []
        self.resume_changes: dict[str, list[Any]] = {}
        self._config_dict: dict[str, Any] | None = None

    def config_dict(self) -> dict[str, Any]:
        """The full resolved config as plain YAML types."""
        if self._config_dict is None:
            self._config_dict = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        return self._config_dict

    def record_resume_changes(self, changes: dict[str, tuple[Any, Any]], step: int) -> None:
        """Resuming at ``step`` with ``changes`` (allowed): the run's ``config.yaml`` stays as
        it was, the new config is saved as ``config.resumed-step<step>.yaml``, and
        ``run_info.json`` lists the changes."""
        self.resume_changes = {key: [old, new] for key, (old, new) in changes.items()}
        stem, suffix = os.path.splitext(self.config_filename)
        self.config_filename = f"{stem}.resumed-step{step}{suffix}"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        output_dir = getattr(pl_module, "output_dir", None)
        if stage in ("fit", "validate") and output_dir:
            keep = [trainer.default_root_dir, *(lg.save_dir for lg in trainer.loggers if lg.save_dir)]
            check_replaceable(output_dir, keep=tuple(keep))  # before any training
        super().setup(trainer, pl_module, stage)
        # Not in save_config: a validate-before-fit pass runs setup first with the loggers
        # detached, and the base class saves only once.
        if stage == "fit" and not self.info and trainer.is_global_zero:
            self.record_start(trainer)

    def record_start(self, trainer: Trainer) -> None:
        """Write ``config.yaml`` + ``run_info.json`` per CSV log dir, fill the W&B config."""
        config = self.config_dict()
        self.info = {
            **git_info(),
            "status": "running",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": list(sys.argv),
            "csv_metrics": [],
            "wandb": [],
            "config": config,
            **({"resumed_with_changes": self.resume_changes} if self.resume_changes else {}),
        }
        self.paths = []
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                log_dir = Path(logger.log_dir)
                log_dir.mkdir(parents=True, exist_ok=True)
                self.parser.save(
                    self.config, str(log_dir / self.config_filename), skip_none=False, overwrite=True
                )
                self.info["csv_metrics"].append(str((log_dir / "metrics.csv").resolve()))
                self.paths.append(log_dir / RUN_INFO_FILE)
        for logger in wandb_loggers(trainer):
            run = logger.experiment
            run.config.update(
                {"config": config, **{k: self.info[k] for k in ("git_commit", "git_dirty")}},
                allow_val_change=True,
            )
            self.info["wandb"].append(
                {"id": getattr(run, "id", None), "dir": getattr(run, "dir", None), "project": logger.name}
            )
        if os.environ.get(RUN_INFO_ENV):
            self.paths.append(Path(os.environ[RUN_INFO_ENV]))
        self._write()

    def _write(self) -> None:
        for path in self.paths:
            write_json(path, self.info)

    def _finish(self, trainer: Trainer, status: str, error: str | None = None) -> None:
        if not self.info or not trainer.is_global_zero:
            return
        self.info.update(
            status=status,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            global_step=int(trainer.global_step),
            metrics=_plain_metrics(dict(trainer.callback_metrics)),
        )
        if error is not None:
            self.info["error"] = error
        self._write()

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.config_dict()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish(trainer, "interrupted" if trainer.interrupted else "finished")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._finish(trainer, status, f"{type(exception).__name__}: {exception}")


def read_run_info(path: str | os.PathLike) -> dict[str, Any]:
    """A ``run_info.json`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_INFO_FILE
    return json.loads(path.read_text())
