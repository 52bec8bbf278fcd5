"""Wall-clock timers for the phases of a PPO iteration, off unless someone records.

:class:`rlhf.ppo.module.PPOModule` marks its phases (``generation``, ``policy_value``,
``reference``, ``reward``, ``update``, and ``rollout`` around the whole rollout) with
:func:`phase` / :func:`timed`. With no recorder active these cost one global lookup; a
benchmark activates a :class:`PhaseTimes` per iteration::

    times = PhaseTimes()
    with recording(times):
        module.training_step(batch, 0)
    times.seconds  # {"generation": 1.2, "reference": 0.3, ...}

On CUDA the device is synchronised at each phase boundary (only while recording), so a
phase's time includes the kernels it launched.

:class:`PhaseTimesLogger` does that for a training run and logs the seconds of each iteration's
phases as metrics (``time/<phase>_s``, plus ``time/iteration_s``)::

    python -m rlhf.fit --config configs/quickstart/ppo.yaml \
        --trainer.callbacks+=rlhf.timing.PhaseTimesLogger
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lightning as L
import torch

F = TypeVar("F", bound=Callable[..., Any])

_active: PhaseTimes | None = None


@dataclass
class PhaseTimes:
    """Seconds and call counts per phase name (phases may nest: ``rollout`` holds others)."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to phase ``name`` and count the call."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def active() -> PhaseTimes | None:
    """The recorder phases are added to now, or ``None``."""
    return _active


@contextmanager
def recording(times: PhaseTimes) -> Iterator[PhaseTimes]:
    """Add every phase run inside the block to ``times`` (the previous recorder is restored)."""
    global _active
    previous, _active = _active, times
    try:
        yield times
    finally:
        _active = previous


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as phase ``name`` when a recorder is active (a no-op otherwise)."""
    times = _active
    if times is None:
        yield
        return
    _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        times.add(name, time.perf_counter() - start)


def timed(name: str) -> Callable[[F], F]:
    """Decorator: each call of the function is phase ``name`` (see :func:`phase`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if _active is None:
                return fn(*args, **kwargs)
            with phase(name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


class PhaseTimesRecorder(L.Callback):
    """Record each training step's phases: after a step, :attr:`last` holds its
    ``{phase: seconds}`` and :attr:`last_step_seconds` its wall time (batch start to end).
    Recording adds a device synchronisation per phase on CUDA, none on the CPU."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.last_step_seconds = 0.0
        self._stack: ExitStack | None = None
        self._times: PhaseTimes | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._close()
        self._times, self._stack = PhaseTimes(), ExitStack()
        self._stack.enter_context(recording(self._times))
        _sync()
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._times is None:
            return
        _sync()
        self.last_step_seconds = time.perf_counter() - self._start
        self.last = dict(self._times.seconds)
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack = self._times = None


class PhaseTimesLogger(PhaseTimesRecorder):
    """Log each training step's phase seconds as ``time/<phase>_s`` and its wall time as
    ``time/iteration_s`` (to every logger: CSV, W&B); for a PPO run a step is one iteration."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Recording has stopped: the logger's own time is not a phase.
        metrics = {f"time/{name}_s": seconds for name, seconds in self.last.items()}
        metrics["time/iteration_s"] = self.last_step_seconds
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)
