"""A callback that sends this process a signal at a chosen PPO iteration, for the resume and
interrupt tests (which name it in the configs they run through ``python -m rlhf.fit``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SendSignal(L.Callback):
    """Send ``signal_name`` (``SIGKILL``, ``SIGTERM``, ``SIGINT``) ``count`` times to this
    process during PPO iteration ``iteration`` (0-based): at the start of its step
    (``where="step_start"``), or in the middle of its update, before its first optimizer step
    (``where="update"``)."""

    def __init__(self, signal_name: str, iteration: int, where: str = "update", count: int = 1) -> None:
        self.signum = getattr(signal, signal_name)
        self.iteration = iteration
        self.where = where
        self.count = count
        self.sent = False

    def _maybe_send(self, trainer: L.Trainer, where: str) -> None:
        if not self.sent and where == self.where and trainer.lightning_module.iteration == self.iteration:
            self.sent = True
            for _ in range(self.count):
                os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._maybe_send(trainer, "step_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._maybe_send(trainer, "update")
