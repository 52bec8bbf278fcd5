"""Bad multi-process launches fail fast and say why (``rlhf.launch``), in this process: the
launcher's process count against the config, the rendezvous timeout setting, and a bounded
rendezvous (a process alone, or aimed at a port nobody listens on, gives up after the timeout
with a :class:`LaunchError`; a group that forms gets the collective timeout back).
``tests/test_multinode.py`` checks the same through ``rlhf.fit`` in separate processes."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
from lightning.pytorch import Trainer
from multinode_runs import free_port

from rlhf.launch import (
    DEFAULT_RENDEZVOUS_TIMEOUT_S,
    RENDEZVOUS_TIMEOUT_ENV,
    LaunchError,
    bound_rendezvous,
    check_launch,
    rendezvous_timeout,
)

LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "PL_GLOBAL_SEED")


@pytest.fixture
def launcher_env(monkeypatch):
    """A clean launcher environment; returns a setter for the variables a hand launch gives."""
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)

    def set_env(**values: object) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, str(value))

    return set_env


def trainer(nodes: int, devices: int = 1) -> Trainer:
    return Trainer(accelerator="cpu", strategy="ddp", num_nodes=nodes, devices=devices, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_rendezvous_timeout_setting(monkeypatch):
    monkeypatch.delenv(RENDEZVOUS_TIMEOUT_ENV, raising=False)
    assert rendezvous_timeout() == timedelta(seconds=DEFAULT_RENDEZVOUS_TIMEOUT_S) == timedelta(minutes=5)
    monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, "12.5")
    assert rendezvous_timeout() == timedelta(seconds=12.5)
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(RENDEZVOUS_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"RLHF_RENDEZVOUS_TIMEOUT must be a number of seconds > 0, got '{bad}'"):
            rendezvous_timeout()


def test_a_config_for_more_processes_than_the_launcher_started_is_refused(launcher_env):
    launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), LOCAL_RANK=0, NODE_RANK=0, WORLD_SIZE=1)
    with pytest.raises(LaunchError, match=r"the launcher started 1 process\(es\) \(LightningEnvironment\) but the "
                                          r"config asks for trainer.num_nodes \(2\) x trainer.devices \(1\) = 2"):
        check_launch(trainer(nodes=2))


def test_a_node_rank_outside_the_config_is_refused(launcher_env):
    launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), LOCAL_RANK=0, NODE_RANK=2, WORLD_SIZE=2)
    with pytest.raises(LaunchError, match="this process is node 2, local rank 0, outside trainer.num_nodes"):
        check_launch(trainer(nodes=2))


def test_matching_or_unknown_launches_pass(launcher_env):
    check_launch(trainer(nodes=2))  # Lightning starts the processes itself: nothing to compare
    launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), LOCAL_RANK=0, NODE_RANK=1)
    check_launch(trainer(nodes=2))  # a hand launch without WORLD_SIZE: the rendezvous decides
    launcher_env(WORLD_SIZE=2)
    check_launch(trainer(nodes=2))


def bounded_setup(nodes: int, node_rank: int, port: int, seconds: float, set_env) -> tuple[float, Exception | None]:
    """Set up a DDP strategy's process group as process ``node_rank`` of ``nodes`` x 1 with a
    ``seconds`` rendezvous timeout; ``(seconds taken, error)``. Leaves no process group."""
    set_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, LOCAL_RANK=0, NODE_RANK=node_rank, WORLD_SIZE=nodes)
    strategy = trainer(nodes).strategy
    bound_rendezvous(strategy, timedelta(seconds=seconds))
    start = time.monotonic()
    try:
        strategy.setup_environment()
    except Exception as error:  # noqa: BLE001 (returned to the test)
        return time.monotonic() - start, error
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return time.monotonic() - start, None


def test_an_unreachable_rendezvous_gives_up_after_the_timeout(launcher_env):
    port = free_port()  # nobody listens there
    seconds, error = bounded_setup(nodes=2, node_rank=1, port=port, seconds=2, set_env=launcher_env)
    assert isinstance(error, LaunchError), error
    message = str(error)
    assert f"process 1 of 2 (node 1) could not meet every other process at the rendezvous 127.0.0.1:{port}" in message
    assert "within 2 s" in message and "RLHF_RENDEZVOUS_TIMEOUT=<seconds>" in message
    assert "DistNetworkError" in message  # the cause, kept
    assert 1.5 < seconds < 30


def test_a_process_whose_peers_never_come_gives_up_after_the_timeout(launcher_env):
    seconds, error = bounded_setup(nodes=2, node_rank=0, port=free_port(), seconds=2, set_env=launcher_env)
    assert isinstance(error, LaunchError), error
    assert "process 0 of 2 (node 0) could not meet every other process" in str(error)
    assert "1/2 clients joined" in str(error)
    assert 1.5 < seconds < 30


def test_a_formed_group_gets_the_collective_timeout_back(launcher_env):
    launcher_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(), LOCAL_RANK=0, NODE_RANK=0, WORLD_SIZE=1)
    strategy = trainer(nodes=1).strategy
    assert strategy._timeout == timedelta(minutes=30)  # Lightning's default collective timeout
    bound_rendezvous(strategy, timedelta(seconds=2))
    try:
        strategy.setup_environment()
        backend = torch.distributed.group.WORLD._get_backend(torch.device("cpu"))
        assert backend.options._timeout == timedelta(minutes=30)
        assert strategy._timeout == timedelta(minutes=30)
    finally:
        torch.distributed.destroy_process_group()
