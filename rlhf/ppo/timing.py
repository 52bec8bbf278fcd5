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
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
