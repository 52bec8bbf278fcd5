"""Multi-process launches that fail fast: a config that disagrees with the launcher, and a
rendezvous that cannot complete, stop with a clear error instead of waiting.

``rlhf.fit`` calls :func:`guard_launch` on the trainer before fitting:

- :func:`check_launch`: the processes the launcher started (``WORLD_SIZE`` from torchrun or a
  hand launch, ``SLURM_NTASKS`` under ``srun``) must equal ``trainer.num_nodes x
  trainer.devices``, and this process's node and local rank must fit in them. (Lightning
  checks this too for torchrun and SLURM, once fitting starts; under its own environment,
  where ``LOCAL_RANK`` says the processes were started outside it, it trusts the config, and a
  missing process would leave the others waiting.)
- :func:`bound_rendezvous`: joining the process group (every process connecting to
  ``MASTER_ADDR:MASTER_PORT`` and waiting for the others) gives up after the rendezvous timeout,
  ``$RLHF_RENDEZVOUS_TIMEOUT`` seconds (default :data:`DEFAULT_RENDEZVOUS_TIMEOUT_S`), with a
  :class:`LaunchError` that says what to check. Once joined, collectives get the strategy's own
  ``timeout`` back (Lightning's default: 30 minutes), so a long wait inside the run (rank 0
  writing a large model while the others wait at a barrier) is not cut short.

torchrun's own rendezvous, between the nodes' agents before any worker starts, has its own
limit: ``--rdzv-conf join_timeout=SECONDS`` (torch's default 600).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import Strategy

RENDEZVOUS_TIMEOUT_ENV = "RLHF_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0


class LaunchError(RuntimeError):
    """A multi-process run that cannot start: the config and the launch disagree, or the
    processes did not all meet at the rendezvous in time."""


def rendezvous_timeout() -> timedelta:
    """``$RLHF_RENDEZVOUS_TIMEOUT`` (seconds, > 0), else :data:`DEFAULT_RENDEZVOUS_TIMEOUT_S`."""
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return timedelta(seconds=DEFAULT_RENDEZVOUS_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"${RENDEZVOUS_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return timedelta(seconds=seconds)


def launched_world_size(trainer: Trainer) -> int | None:
    """How many processes the launcher started, as it tells them (``None``: not told, or
    Lightning starts them itself)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None or not env.creates_processes_externally:
        return None
    from lightning.fabric.plugins.environments import LightningEnvironment

    if isinstance(env, LightningEnvironment):  # its world_size() is the config's, not the launcher's
        return int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    return env.world_size()


def check_launch(trainer: Trainer) -> None:
    """Refuse (:class:`LaunchError`) a run whose ``trainer.num_nodes x trainer.devices`` is not
    the number of processes the launcher started, or whose node / local rank lies outside
    them. Nothing to check for one process, or where Lightning starts the processes."""
    launched = launched_world_size(trainer)
    if launched is None:
        return
    nodes, devices = trainer.num_nodes, trainer.num_devices
    env = trainer.strategy.cluster_environment
    setting = (f"trainer.num_nodes ({nodes}) x trainer.devices ({devices}) = {nodes * devices} "
               f"processes")
    if launched != nodes * devices:
        raise LaunchError(
            f"the launcher started {launched} process(es) ({type(env).__name__}) but the config asks for "
            f"{setting}: set --trainer.num_nodes to the number of nodes and --trainer.devices to the "
            "processes per node (torchrun --nproc-per-node, srun --ntasks-per-node)"
        )
    if not 0 <= env.node_rank() < nodes or not 0 <= env.local_rank() < devices:
        raise LaunchError(
            f"this process is node {env.node_rank()}, local rank {env.local_rank()}, outside {setting} "
            "(node ranks run 0 .. num_nodes - 1, local ranks 0 .. devices - 1)"
        )


def _rendezvous_message(strategy: Strategy, timeout: timedelta, error: BaseException) -> str:
    env = strategy.cluster_environment
    address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (
        f"process {env.global_rank()} of {env.world_size()} (node {env.node_rank()}) could not meet every "
        f"other process at the rendezvous {address} (MASTER_ADDR:MASTER_PORT) within "
        f"{timeout.total_seconds():g} s. Check that all {env.world_size()} processes were started with the "
        "same trainer.num_nodes and trainer.devices, that MASTER_ADDR is node 0's address as this node sees "
        f"it and MASTER_PORT is open between the nodes. If nodes start minutes apart, wait longer: "
        f"{RENDEZVOUS_TIMEOUT_ENV}=<seconds>. ({type(error).__name__}: {str(error).strip().splitlines()[0]})"
    )


def bound_rendezvous(strategy: Strategy, timeout: timedelta) -> None:
    """Make ``strategy`` (a Lightning DDP / FSDP / ModelParallel strategy, which join the process
    group in ``setup_environment`` with their ``timeout``) give up joining after ``timeout``,
    raising :class:`LaunchError`; afterwards the process group's collectives wait the
    strategy's own ``timeout`` again. Other strategies are left as they are."""
    if not hasattr(strategy, "_timeout") or not hasattr(strategy, "cluster_environment"):
        return
    setup = strategy.setup_environment

    def setup_environment() -> None:
        dist = torch.distributed
        collective = strategy._timeout
        strategy._timeout = timeout
        try:
            setup()
        except dist.DistError as error:
            if dist.is_initialized():
                raise
            raise LaunchError(_rendezvous_message(strategy, timeout, error)) from error
        finally:
            strategy._timeout = collective
        if dist.is_available() and dist.is_initialized() and collective is not None:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(collective)

    strategy.setup_environment = setup_environment


def guard_launch(trainer: Trainer) -> None:
    """:func:`check_launch`, then :func:`bound_rendezvous` with :func:`rendezvous_timeout`."""
    timeout = rendezvous_timeout()
    check_launch(trainer)
    bound_rendezvous(trainer.strategy, timeout)
