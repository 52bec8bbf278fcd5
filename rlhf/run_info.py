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
"""

from __future__ import annotations

import json
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

from rlhf.tracking import wandb_loggers

RUN_INFO_ENV = "RLHF_RUN_INFO"
RUN_INFO_FILE = "run_info.json"
_SOURCE_DIR = Path(__file__).resolve().parent


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


class RunInfoCallback(SaveConfigCallback):
    """Saves the config like Lightning's ``SaveConfigCallback`` and records the run (see the
    module docstring). Used by ``rlhf.fit`` for every run; rank zero writes everything."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info: dict[str, Any] = {}
        self.paths: list[Path] = []

    def config_dict(self) -> dict[str, Any]:
        """The full resolved config as plain YAML types."""
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
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
