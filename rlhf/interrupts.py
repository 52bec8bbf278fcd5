"""SIGTERM and Ctrl-C: finish the current step, save a checkpoint, exit non-zero.

Lightning's signal connector notes a SIGTERM (``trainer.received_sigterm``) and, at the end of
the current training step (or validation batch), raises ``SIGTERMException``: a clean point,
with the iteration complete. :class:`CheckpointOnInterrupt` saves ``last.ckpt`` there (through
Lightning's fault-tolerant ``on_exception`` hook), where ``--ckpt_path last`` finds it, and
makes a first Ctrl-C (SIGINT) behave the same way; a second Ctrl-C stops at once, without a
checkpoint. Lightning's ``KeyboardInterrupt`` handling would otherwise stop mid-step, where a
checkpoint would hold half an iteration. ``rlhf.fit`` exits with 128 + the signal number
(143 for SIGTERM, 130 for SIGINT). An interrupted run never writes the stage's
``output_dir`` (see :meth:`rlhf.stage.StageModule.on_train_end`).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("rlhf.interrupts")


def interrupt_checkpoint_dir(trainer: Trainer) -> Path:
    """Where a ``ModelCheckpoint`` would write: its directory when there is one, else (as
    ``ModelCheckpoint`` resolves it) ``<save_dir>/<name>/<version>/checkpoints`` of the first
    logger, else ``<default_root_dir>/checkpoints``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return Path(callback.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
    return Path(trainer.default_root_dir) / "checkpoints"


class CheckpointOnInterrupt(Callback):
    """Save ``<checkpoint dir>/<filename>.ckpt`` when a fit stops on SIGTERM or a first SIGINT.

    Args:
        filename: checkpoint file name without ``.ckpt``; ``last`` (the default) is what
            ``--ckpt_path last`` looks for.

    Attributes:
        signal_received: the signal that stopped the run (``None`` while it has not).
        saved_path: where the interrupt checkpoint was written.
    """

    def __init__(self, filename: str = "last") -> None:
        if not filename:
            raise ValueError("filename must not be empty")
        self.filename = filename
        self.signal_received: signal.Signals | None = None
        self.saved_path: Path | None = None
        self._previous_sigint: Any = None

    @property
    def exit_code(self) -> int:
        """``128 + signal`` for the signal that stopped the run (SIGTERM when unknown)."""
        return 128 + int(self.signal_received or signal.SIGTERM)

    # -- signal handling -------------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_received is not None:
            raise KeyboardInterrupt  # second Ctrl-C: stop now (no checkpoint)
        self.signal_received = signal.SIGINT
        log.warning(
            "interrupted: finishing the current step, then saving a checkpoint "
            "(Ctrl-C again to stop at once, without one)"
        )
        on_sigterm = signal.getsignal(signal.SIGTERM)  # Lightning's notifier while fitting
        if callable(on_sigterm):
            on_sigterm(signal.SIGTERM, frame)
        else:
            raise KeyboardInterrupt

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signal_received, self.saved_path = None, None
        if stage == TrainerFn.FITTING and threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_sigint()

    # -- saving -------------------------------------------------------------------------------------
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.signal_received is None:
            self.signal_received = signal.SIGTERM
        path = interrupt_checkpoint_dir(trainer) / f"{self.filename}.ckpt"
        trainer.save_checkpoint(path)
        self.saved_path = path
        log.warning(
            "%s: saved checkpoint %s (global step %d); resume with --ckpt_path last",
            self.signal_received.name, path, trainer.global_step,
        )


def interrupt_exit_code(trainer: Trainer) -> int:
    """The exit status of a run stopped by a signal: ``128 + signal`` (143 for SIGTERM)."""
    for callback in trainer.callbacks:
        if isinstance(callback, CheckpointOnInterrupt):
            return callback.exit_code
    return 128 + int(signal.SIGTERM)
