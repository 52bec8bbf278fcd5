"""W&B logging that is offline unless asked otherwise.

Lightning's ``WandbLogger(offline=True)`` overwrites ``WANDB_MODE`` with ``dryrun``, so a user
who sets ``WANDB_MODE=online`` still gets an offline run; without ``offline`` it is online by
default, which hangs or fails with no network or account. :class:`WandbLogger` here resolves
the mode once, in this order:

1. ``mode`` given in the config (``online``, ``offline`` or ``disabled``);
2. the ``WANDB_MODE`` environment variable (``dryrun`` and ``run`` are W&B's old names);
3. ``online`` when ``WANDB_SWEEP_ID`` is set: the run was started by ``wandb agent``, which
   only works online, so sweeps run unchanged for users with an account;
4. otherwise ``offline``: runs are written under ``save_dir/wandb`` and can be uploaded
   later with ``wandb sync``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

WandbMode = Literal["online", "offline", "disabled"]
_MODES = ("online", "offline", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online"}


def resolve_wandb_mode(mode: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode a run should use: ``mode`` if given, else ``WANDB_MODE``, else ``online``
    under ``wandb agent`` (``WANDB_SWEEP_ID`` set), else ``offline``."""
    env = os.environ if environ is None else environ
    if mode is None:
        value = env.get("WANDB_MODE", "").strip().lower()
        if value:
            mode = _ALIASES.get(value, value)
        elif env.get("WANDB_SWEEP_ID"):
            mode = "online"
        else:
            mode = "offline"
    if mode not in _MODES:
        raise ValueError(f"W&B mode must be one of {_MODES}, got {mode!r}")
    return mode


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger``, offline unless the config, ``WANDB_MODE`` or ``wandb agent``
    says online (see the module docstring).

    Args:
        mode: ``online``, ``offline`` or ``disabled``; ``None`` resolves it from the
            environment (offline by default).
        offline: Lightning's flag, kept for old configs: ``True`` means ``mode: offline``.
        **kwargs: the other arguments of Lightning's ``WandbLogger`` (``project``, ``name``,
            ``save_dir``, ...).
    """

    def __init__(self, mode: WandbMode | None = None, offline: bool = False, **kwargs: Any) -> None:
        resolved = resolve_wandb_mode("offline" if offline and mode is None else mode)
        # offline=False keeps Lightning from overwriting WANDB_MODE; the resolved mode goes
        # to wandb.init, where it takes precedence over the environment.
        super().__init__(offline=False, mode=resolved, **kwargs)
        self.mode = resolved
        if resolved != "online":
            disable_wandb_telemetry()


def disable_wandb_telemetry() -> None:
    """Turn off wandb's own usage analytics for this process. They follow the process-wide
    mode (``WANDB_MODE``), not the run's: an offline run started without ``WANDB_MODE`` would
    otherwise still post telemetry to W&B's servers (wandb 0.31)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy
    except ImportError:  # an older or newer wandb without it
        return
    disable = getattr(opentelemetry_proxy, "disable", None)
    if callable(disable):
        disable()


def wandb_loggers(trainer: Trainer | None) -> list[LightningWandbLogger]:
    """The trainer's W&B loggers (any ``WandbLogger``, ours or Lightning's)."""
    if trainer is None:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)]


def log_histograms(
    loggers: list[LightningWandbLogger], values: Mapping[str, Any], step: int, num_bins: int = 64
) -> None:
    """Log each ``values[key]`` (a tensor or array of any shape) as a ``wandb.Histogram``
    at ``step`` to every logger in ``loggers``; empty arrays are skipped."""
    if not loggers:
        return
    import numpy as np
    import wandb

    payload = {}
    for key, value in values.items():
        array = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        array = array.reshape(-1)
        if array.size:
            payload[key] = wandb.Histogram(array, num_bins=num_bins)
    if payload:
        for logger in loggers:
            logger.log_metrics(payload, step=step)
