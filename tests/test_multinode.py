"""Multi-node runs simulated on this machine: two "nodes" of one CPU process each (gloo), started
through the launchers users use (``tests/multinode_runs.py``), each run checked against one
process as ``tests/test_distributed.py`` checks two processes on one node:

- torchrun: two agents, ``--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint
  localhost:PORT``, running ``rlhf.fit ... --trainer.num_nodes 2 --trainer.devices 1``
  (Lightning's ``TorchElasticEnvironment``): SFT (DDP) ends at the one-process weights; PPO
  (FSDP2) ends equal to an unsharded model built from its outputs, its processes sample
  disjoint prompts with their own seeds, and a run stopped after two iterations and resumed
  with ``--ckpt_path last`` ends where the uninterrupted run ends, having sampled the same
  prompts with the same seeds.
- Lightning's own ``num_nodes`` with the variables ``srun`` sets (``SLURMEnvironment``) or a
  hand launch sets (``LightningEnvironment``): the reward model (DDP) ends at the one-process
  weights.
- Bad launches exit non-zero with a clear message within a stated time, never hang: a rendezvous
  nobody answers, a node that never comes, a config for more processes than were launched,
  and torchrun with one of two nodes missing.

All ``slow``: each run starts two fresh Python processes (plus two torchrun agents).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from distributed_runs import (
    ROWS,
    max_abs_diff,
    ppo_config,
    probe_ppo,
    read_safetensors,
    rm_config,
    sft_config,
    stop_after,
    unsharded_ppo_from_outputs,
    write_data,
)
from multinode_runs import (
    check_nodes,
    env_nodes,
    fit_args,
    free_port,
    hand_env,
    launch,
    node_env,
    read_rollout_record,
    torchrun_argv,
    torchrun_nodes,
    with_rollout_record,
)
from resume_runs import build_tiny_reward_model, one_thread, write_config
from test_distributed import (
    PROBE_TOL,
    STEPS,
    WEIGHT_TOL,
    assert_probes_close,
    check_lean_checkpoint,
    one_process,
    read_probe,
    rm_weights,
)

from rlhf.outputs import read_stage_marker

pytestmark = pytest.mark.slow

PPO_PROMPTS = 7  # odd: each process gets 3 a epoch and one sits out (a repeat under Lightning's sampler)
BAD_LAUNCH_RENDEZVOUS_S = 8
# Starting Python, torch and Lightning, building the CLI, then the rendezvous timeout: one
# process took 17-28 s here with an 8-10 s timeout on two shared cores; this bounds it.
BAD_LAUNCH_LIMIT_S = 120


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode-data")
    files = write_data(root)
    prompts = root / "prompts7.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me story {i}."}) + "\n" for i in range(PPO_PROMPTS)))
    return {**files, "prompts7": str(prompts)}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_policy_dir):
    return build_tiny_reward_model(tmp_path_factory.mktemp("multinode-rm"), tiny_policy_dir)


def test_sft_on_two_torchrun_nodes_matches_one_process(tmp_path, tmp_path_factory, tiny_policy_dir, data):
    reference = tmp_path_factory.mktemp("sft-one-process")
    one_process(reference, sft_config(reference, tiny_policy_dir, data["demos"], batch_size=ROWS, steps=STEPS))
    expected = read_safetensors(reference / "out" / "adapter" / "adapter_model.safetensors")

    config = sft_config(tmp_path, tiny_policy_dir, data["demos"], batch_size=ROWS // 2, steps=STEPS)
    results = torchrun_nodes(write_config(tmp_path / "config.yaml", config), strategy="ddp")
    check_nodes(results)
    got = read_safetensors(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in expected.items() if "lora_B" in k) > 1e-2  # trained
    assert max_abs_diff(got, expected) < WEIGHT_TOL


@pytest.mark.parametrize("kind", ["slurm", "hand"])
def test_reward_model_on_two_nodes_of_lightnings_num_nodes_matches_one_process(tmp_path, tmp_path_factory,
                                                                               tiny_policy_dir, data, kind):
    reference = tmp_path_factory.mktemp("rm-one-process")
    one_process(reference, rm_config(reference, tiny_policy_dir, data["prefs"], batch_size=ROWS, steps=STEPS))

    config = rm_config(tmp_path, tiny_policy_dir, data["prefs"], batch_size=ROWS // 2, steps=STEPS)
    results = env_nodes(write_config(tmp_path / "config.yaml", config), strategy="ddp", kind=kind)
    check_nodes(results)
    if kind == "slurm":  # Lightning took the SLURM variables (its SLURMEnvironment), not its own
        assert "SLURM auto-requeueing enabled" in "".join(r.stderr for r in results)
    expected = rm_weights(reference / "out")
    assert float(expected["score_head.weight"].abs().max()) > 1e-2  # trained
    assert max_abs_diff(rm_weights(tmp_path / "out"), expected) < WEIGHT_TOL
    assert read_stage_marker(tmp_path / "out")["score_stats_rows"] == 2 * ROWS  # rank 0 saw all


def ppo_nodes_config(root, policy, reward_model, prompts, name: str, stop_at: int | None = None):
    """Three PPO iterations of 2 optimizer steps (3 prompts a process, minibatches of 2), a
    checkpoint every iteration, the probe and the rollout record named ``name``."""
    config = ppo_config(root, policy, reward_model, prompts, batch_size=4, iterations=3, probe=name,
                        checkpoint_every=2)
    config = with_rollout_record(config, root / f"{name}-rollouts.jsonl")
    return write_config(root / f"{name}.yaml", stop_after(config, stop_at) if stop_at else config)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_policy_dir, data, reward_model):
    """An uninterrupted PPO run on two torchrun nodes under FSDP2."""
    root = tmp_path_factory.mktemp("ppo-two-nodes")
    check_nodes(torchrun_nodes(ppo_nodes_config(root, tiny_policy_dir, reward_model, data["prompts7"], "run"),
                               strategy="fsdp2"))
    return root


def test_ppo_on_two_torchrun_nodes_equals_unsharded_outputs(ppo_run, tiny_policy_dir, reward_model):
    checkpoint = check_lean_checkpoint(ppo_run / "ckpt" / "last.ckpt", step=6)
    assert checkpoint["ppo"]["iteration"] == 3
    assert read_stage_marker(ppo_run / "out")["iterations"] == 3
    final = read_probe(ppo_run, "run-train_end")  # both processes agree
    assert final["iteration"] == 3
    with one_thread():
        expected = probe_ppo(unsharded_ppo_from_outputs(tiny_policy_dir, reward_model, ppo_run / "out"))
    assert_probes_close(final, expected, PROBE_TOL)
    policy, reference = torch.tensor(final["logprobs"]), torch.tensor(final["ref_logprobs"])
    assert float((policy - reference).abs().max()) > 1e-3  # the policy moved off the reference


def test_ppo_processes_sample_disjoint_prompts_with_their_own_seeds(ppo_run):
    record = read_rollout_record(ppo_run / "run-rollouts.jsonl")
    assert sorted(record) == [1, 2, 3]
    for ranks in record.values():
        first, second = ranks[0]["prompts"], ranks[1]["prompts"]
        assert len(first) == len(second) == PPO_PROMPTS // 2
        assert not set(first) & set(second) and len(set(first)) == len(first)  # no prompt twice
        assert ranks[0]["seed"] != ranks[1]["seed"]
    seeds = [r["seed"] for ranks in record.values() for r in ranks]
    assert len(set(seeds)) == len(seeds)  # and a new seed every iteration


def test_ppo_on_two_torchrun_nodes_resumes_to_the_uninterrupted_result(tmp_path, ppo_run, tiny_policy_dir, data,
                                                                       reward_model):
    first = torchrun_nodes(ppo_nodes_config(tmp_path, tiny_policy_dir, reward_model, data["prompts7"], "first",
                                            stop_at=4), strategy="fsdp2")  # two of three iterations
    check_nodes(first)
    assert check_lean_checkpoint(tmp_path / "ckpt" / "last.ckpt", step=4)["ppo"]["iteration"] == 2
    second = torchrun_nodes(ppo_nodes_config(tmp_path, tiny_policy_dir, reward_model, data["prompts7"], "second"),
                            "--ckpt_path", "last", strategy="fsdp2")
    check_nodes(second)
    assert sum("resuming from" in r.stderr for r in second) == 2  # on both nodes
    assert read_probe(tmp_path, "second-train_start")["iteration"] == 2

    resumed, uninterrupted = read_probe(tmp_path, "second-train_end"), read_probe(ppo_run, "run-train_end")
    assert resumed["iteration"] == 3
    assert_probes_close(resumed, uninterrupted, 1e-6)
    # The same prompts with the same per-process seeds as the uninterrupted run: iterations 1-2
    # re-run from the start, iteration 3 from the checkpoint's RNG state and epoch.
    record = {**read_rollout_record(tmp_path / "first-rollouts.jsonl"),
              **read_rollout_record(tmp_path / "second-rollouts.jsonl")}
    assert record == read_rollout_record(ppo_run / "run-rollouts.jsonl")


# -- bad launches ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_file(tmp_path_factory, tiny_policy_dir, data):
    root = tmp_path_factory.mktemp("bad-launch")
    return write_config(root / "config.yaml",
                        sft_config(root, tiny_policy_dir, data["demos"], batch_size=ROWS // 2, steps=1))


def run_alone(config, env, logs, timeout: float = BAD_LAUNCH_LIMIT_S):
    """One process of a 2-node launch, ``rlhf.fit`` started with ``env``; its result."""
    [result] = launch([([sys.executable, *fit_args(config, "ddp", 2)], env)], config.parent, timeout, logs)
    assert result.returncode != 0 and result.seconds < timeout
    return result


def short_rendezvous(env: dict[str, str]) -> dict[str, str]:
    return {**env, "RLHF_RENDEZVOUS_TIMEOUT": str(BAD_LAUNCH_RENDEZVOUS_S)}


def test_an_unreachable_rendezvous_fails_within_the_timeout(sft_file, tmp_path):
    port = free_port()  # nobody listens there
    result = run_alone(sft_file, short_rendezvous(hand_env(1, port)), tmp_path)
    assert (f"LaunchError: process 1 of 2 (node 1) could not meet every other process at the rendezvous "
            f"127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within {BAD_LAUNCH_RENDEZVOUS_S} s") in result.stderr


def test_a_node_that_never_comes_fails_within_the_timeout(sft_file, tmp_path):
    result = run_alone(sft_file, short_rendezvous(hand_env(0, free_port())), tmp_path)
    assert "LaunchError: process 0 of 2 (node 0) could not meet every other process" in result.stderr
    assert "1/2 clients joined" in result.stderr


def test_more_processes_in_the_config_than_launched_is_refused_at_once(sft_file, tmp_path):
    result = run_alone(sft_file, short_rendezvous(hand_env(0, free_port(), world_size=1)), tmp_path)
    assert ("LaunchError: the launcher started 1 process(es) (LightningEnvironment) but the config asks for "
            "trainer.num_nodes (2) x trainer.devices (1) = 2 processes") in result.stderr
    assert "Initializing distributed" not in result.stderr  # refused before any rendezvous


def test_torchrun_for_one_node_with_a_two_node_config_is_refused(sft_file, tmp_path):
    argv = [*torchrun_argv(free_port(), 0, nnodes=1), *fit_args(sft_file, "ddp", 2)]
    [result] = launch([(argv, node_env())], sft_file.parent, BAD_LAUNCH_LIMIT_S, tmp_path)
    assert result.returncode != 0
    assert ("LaunchError: the launcher started 1 process(es) (TorchElasticEnvironment) but the config asks for "
            "trainer.num_nodes (2) x trainer.devices (1) = 2 processes") in result.stderr
    assert "Initializing distributed" not in result.stderr


def test_torchrun_with_a_node_missing_fails_after_its_join_timeout(sft_file, tmp_path):
    argv = [*torchrun_argv(free_port(), 0, join_timeout=BAD_LAUNCH_RENDEZVOUS_S), *fit_args(sft_file, "ddp", 2)]
    [result] = launch([(argv, node_env())], sft_file.parent, BAD_LAUNCH_LIMIT_S, tmp_path)
    assert result.returncode != 0 and "RendezvousTimeoutError" in result.stderr
    assert result.seconds < BAD_LAUNCH_RENDEZVOUS_S + 60
