"""Resume: a tiny PPO run killed with ``kill -9`` in the middle of an update continues from its
last checkpoint with ``--ckpt_path last`` and produces the uninterrupted run's metrics (killed
once mid-epoch and once right after an epoch ended, the two ways a data position resumes)."""

from __future__ import annotations

import math
import random
import signal

import numpy as np
import pytest
import torch
from resume_runs import (
    build_tiny_reward_model,
    checkpoints,
    metrics,
    one_thread,
    ppo_config,
    run_fit,
    samples,
    signal_callback,
    write_config,
    write_prompts,
)

from rlhf.data.sampling import ResumableRandomSampler, ResumedDataLoader
from rlhf.fit import main
from rlhf.outputs import read_stage_marker
from rlhf.resume import RUN_KEY, capture_rng_state, restore_rng_state

ITERATIONS = 7  # 3 an epoch; a checkpoint every 2 iterations (after iterations 1, 3, 5)
FIRST_KILL = 5  # mid-update: resumes after iteration 3, one batch into epoch 1
SECOND_KILL = 6  # mid-update: resumes after iteration 5, the end of epoch 1


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_policy_dir):
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-rm"), tiny_policy_dir)


def adaptive_kl(config):
    """The adaptive KL controller, whose state must travel in checkpoints too."""
    config["model"]["init_args"]["kl"] = {"coef": 0.05, "adaptive": True, "target": 1.0, "horizon": 50}
    return config


def assert_same_metrics(expected: list[dict[str, str]], got: list[dict[str, str]]) -> None:
    assert [row["step"] for row in got] == [row["step"] for row in expected]
    for want, have in zip(expected, got):
        assert set(have) == set(want)
        for key, value in want.items():
            if value == have[key]:
                continue
            assert value and have[key], (want["step"], key, value, have[key])
            assert math.isclose(float(value), float(have[key]), rel_tol=1e-5, abs_tol=1e-7), (
                want["step"], key, value, have[key])


def test_kill_9_mid_ppo_resumes_the_same_run(tmp_path, tiny_policy_dir, reward_model):
    prompts = write_prompts(tmp_path / "prompts.jsonl")

    reference = tmp_path / "reference"
    reference.mkdir()
    with one_thread():
        main(["--config", str(write_config(reference / "ppo.yaml", adaptive_kl(
            ppo_config(reference, tiny_policy_dir, reward_model, prompts, ITERATIONS))))])
    expected = metrics(reference)
    assert len(expected) == ITERATIONS

    killed = tmp_path / "killed"
    killed.mkdir()
    config = adaptive_kl(ppo_config(killed, tiny_policy_dir, reward_model, prompts, ITERATIONS, checkpoint_every=2))
    config_path = write_config(killed / "ppo.yaml", config)

    def run_killed_at(iteration: int, *args: str):
        callbacks = [*config["trainer"]["callbacks"], signal_callback("SIGKILL", iteration)]
        killing = {**config, "trainer": {**config["trainer"], "callbacks": callbacks}}
        result = run_fit(write_config(killed / f"kill-{iteration}.yaml", killing), *args)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        assert not (killed / "out").exists()
        [last] = [p for p in checkpoints(killed) if p.name == "last.ckpt"]
        return result, last, torch.load(last, weights_only=True)

    _, last, state = run_killed_at(FIRST_KILL)
    assert state["ppo"]["iteration"] == FIRST_KILL - 1
    assert {"rng", "loggers"} <= set(state[RUN_KEY])
    assert state["PromptDataModule"]["batches_done"] == 1  # mid-epoch
    # The killed run got past its checkpoint: iteration 4 was sampled, then lost.
    assert max(row["iteration"] for row in samples(killed)) == FIRST_KILL - 1

    second, last, state = run_killed_at(SECOND_KILL, "--ckpt_path", "last")
    assert f"resuming from {last}" in second.stderr
    assert state["ppo"]["iteration"] == SECOND_KILL
    assert state["PromptDataModule"]["batches_done"] == 3  # the end of an epoch

    resumed = run_fit(config_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stderr

    assert_same_metrics(expected, metrics(killed))  # one CSV version dir, history continued
    assert samples(killed) == samples(reference)  # same prompts, same responses
    marker = read_stage_marker(killed / "out")
    assert marker["iterations"] == ITERATIONS
    assert marker["kl_controller"] == read_stage_marker(reference / "out")["kl_controller"]


def test_rng_state_round_trips_every_generator():
    state = capture_rng_state()
    draws = torch.rand(3), random.random(), np.random.rand()
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), draws[0])
    assert random.random() == draws[1]
    assert np.random.rand() == draws[2]


def test_resumable_sampler_draws_like_random_sampler_and_replays_an_epoch():
    torch.manual_seed(0)
    expected = [list(torch.utils.data.RandomSampler(range(10))) for _ in range(3)]
    after = torch.rand(1)
    torch.manual_seed(0)
    sampler = ResumableRandomSampler(10)
    epochs, seeds = [], []
    for _ in range(3):
        epochs.append(list(sampler))
        seeds.append(sampler.epoch_seed)
    assert epochs == expected and torch.equal(torch.rand(1), after)  # same draws, same orders
    sampler.resume(seeds[1], skip=4)
    state = torch.get_rng_state()
    assert list(sampler) == epochs[1][4:]
    assert torch.equal(torch.get_rng_state(), state)  # a replayed epoch draws nothing


def test_resumed_loader_draws_no_base_seed_for_its_first_epoch_only():
    loader = ResumedDataLoader(range(4), batch_size=2, generator=torch.Generator())
    state = torch.get_rng_state()
    list(loader)
    assert torch.equal(torch.get_rng_state(), state)
    list(loader)
    assert not torch.equal(torch.get_rng_state(), state)
