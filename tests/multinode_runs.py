"""Two "nodes" on this machine, each one CPU process (gloo), started the ways users start
multi-node runs: two ``torchrun`` agents meeting at a c10d rendezvous endpoint on localhost, or
two processes given the environment ``srun`` (SLURM) or a hand launch gives them, for
Lightning's own ``trainer.num_nodes``. Plus a callback recording which prompts each process
sampled with which seed, every PPO iteration.

Every launch has a wall-clock limit (the processes are killed, and the test fails, past it), a
short rendezvous timeout (``$RLHF_RENDEZVOUS_TIMEOUT``) and one torch thread per process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from distributed_runs import STRATEGY_CONFIGS
from lightning.pytorch import Callback, LightningModule, Trainer
from resume_runs import subprocess_env

NODES = 2
RENDEZVOUS_S = 60  # generous on two busy cores; the bad-launch tests set their own
JOIN_TIMEOUT_S = 60  # torchrun's agents' rendezvous (torch's default: 600)


def free_port() -> int:
    """A TCP port nobody listens on right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_args(config: Path, strategy: str | None, nodes: int = NODES, *args: str) -> list[str]:
    """``-m rlhf.fit`` arguments: the config, a strategy config, ``nodes`` x 1 process."""
    extra = ["--config", str(STRATEGY_CONFIGS[strategy])] if strategy else []
    return ["-m", "rlhf.fit", "--config", str(config), *extra,
            "--trainer.num_nodes", str(nodes), "--trainer.devices", "1", *args]


@dataclass
class NodeResult:
    """One launched process: its exit code, output, and seconds until it exited."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def launch(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float,
           logs: Path | None = None) -> list[NodeResult]:
    """Start every ``(argv, env)`` in ``cwd`` at once (a process group each, output to files in
    ``logs``, default ``cwd``) and wait for all; past ``timeout`` seconds every group still
    running is killed and ``TimeoutError`` raised."""
    start = time.monotonic()
    procs, logs = [], logs or cwd
    for i, (argv, env) in enumerate(commands):
        with open(logs / f"node{i}.out.log", "w") as out, open(logs / f"node{i}.err.log", "w") as err:
            procs.append(subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True))
    ended: dict[int, float] = {}
    try:
        while len(ended) < len(procs):
            for i, proc in enumerate(procs):
                if i not in ended and proc.poll() is not None:
                    ended[i] = time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"launch still running after {timeout} s: {[c[0][-8:] for c in commands]}")
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [NodeResult(proc.returncode, (logs / f"node{i}.out.log").read_text(),
                       (logs / f"node{i}.err.log").read_text(), ended[i]) for i, proc in enumerate(procs)]


def node_env(**extra: str | int) -> dict[str, str]:
    """The test subprocess environment (offline, one thread, ``tests/`` importable), a short
    rendezvous timeout, and ``extra``. Launcher variables of the calling process are dropped."""
    env = subprocess_env()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["RLHF_RENDEZVOUS_TIMEOUT"] = str(RENDEZVOUS_S)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def torchrun_argv(port: int, node_rank: int, nnodes: int = NODES, join_timeout: int = JOIN_TIMEOUT_S) -> list[str]:
    """``torchrun --nnodes N --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint
    localhost:PORT --node-rank I`` (as ``python -m torch.distributed.run``, which is torchrun)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
            "--rdzv-conf", f"join_timeout={join_timeout}", "--node-rank", str(node_rank)]


def torchrun_nodes(config: Path, *args: str, strategy: str | None = "ddp", timeout: float = 420) -> list[NodeResult]:
    """``rlhf.fit`` of ``config`` on two torchrun "nodes" (one process each)."""
    port = free_port()
    commands = [([*torchrun_argv(port, i), *fit_args(config, strategy, NODES, *args)], node_env())
                for i in range(NODES)]
    return launch(commands, config.parent, timeout)


def slurm_env(node: int, port: int, nodes: int = NODES) -> dict[str, str]:
    """What ``srun`` gives task ``node`` of a ``--nodes=N --ntasks-per-node=1`` job (the
    variables Lightning's ``SLURMEnvironment`` reads), with the rendezvous on localhost."""
    return node_env(SLURM_NTASKS=nodes, SLURM_NTASKS_PER_NODE=1, SLURM_NNODES=nodes, SLURM_PROCID=node,
                    SLURM_LOCALID=0, SLURM_NODEID=node, SLURM_JOB_NAME="rlhf-test", SLURM_JOB_ID=4242,
                    SLURM_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def hand_env(node: int, port: int, world_size: int = NODES) -> dict[str, str]:
    """A hand (or mpirun-style) launch for Lightning's own environment: ``MASTER_ADDR``,
    ``MASTER_PORT``, ``WORLD_SIZE``, ``NODE_RANK`` and ``LOCAL_RANK`` (one process a node)."""
    return node_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=world_size, NODE_RANK=node,
                    LOCAL_RANK=0)


def env_nodes(config: Path, *args: str, strategy: str | None = "ddp", kind: str = "slurm",
              timeout: float = 420) -> list[NodeResult]:
    """``rlhf.fit`` of ``config`` on two processes started with :func:`slurm_env` or
    :func:`hand_env` (``kind``)."""
    port = free_port()
    env = slurm_env if kind == "slurm" else hand_env
    commands = [([sys.executable, *fit_args(config, strategy, NODES, *args)], env(i, port)) for i in range(NODES)]
    return launch(commands, config.parent, timeout)


def check_nodes(results: list[NodeResult]) -> None:
    """Both processes exited 0 and both joined one 2-process group."""
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    logs = "".join(r.stderr for r in results)
    assert "MEMBER: 1/2" in logs and "MEMBER: 2/2" in logs, logs[-3000:]


class RolloutRecord(Callback):
    """After each PPO iteration, rank 0 appends a JSON line to ``path``: the iteration and, per
    rank, the dataset rows of its prompts (``batch["index"]``) and its sampling seed
    (``module.sampling_seed``)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mine = {"rank": trainer.global_rank, "prompts": batch["index"].tolist(), "seed": pl_module.sampling_seed}
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, mine)
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps({"iteration": pl_module.iteration, "ranks": ranks}) + "\n")


def with_rollout_record(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """``config`` with a :class:`RolloutRecord` writing to ``path``."""
    callbacks = [*config["trainer"]["callbacks"],
                 {"class_path": "multinode_runs.RolloutRecord", "init_args": {"path": str(path)}}]
    return {**config, "trainer": {**config["trainer"], "callbacks": callbacks}}


def read_rollout_record(path: Path) -> dict[int, list[dict[str, Any]]]:
    """``{iteration: [per-rank {"rank", "prompts", "seed"}]}`` of a :class:`RolloutRecord` file."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {row["iteration"]: sorted(row["ranks"], key=lambda r: r["rank"]) for row in rows}
