"""Scale-out: SFT, reward model and PPO on two CPU processes (gloo) under DDP and FSDP2
(``configs/strategy/*.yaml`` stacked onto a stage config), each checked against one process.

SFT and RM: one process with the whole data set as its batch and two processes with half of
it each take the same optimizer steps (the data order cannot matter), so the trained LoRA
weights (and score head) must agree. PPO samples different responses on each process, so the
check is on a fixed batch instead: policy and reference log-probs, values and reward-model
scores computed by the sharded model must equal those of an unsharded model loaded from the
run's saved outputs. Checkpoints: a run stopped early resumes with ``--ckpt_path last`` and
(SFT, RM) still lands on the one-process weights, whose Adam state it needs for that.

One two-process FSDP2 run per stage runs by default (about 50 s of CPU time; 1.5-2 minutes
on two cores shared with other jobs); the DDP runs and the stop-and-resume runs are ``slow``.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_runs import (
    ROWS,
    STRATEGY_CONFIGS,
    max_abs_diff,
    ppo_config,
    probe_ppo,
    read_safetensors,
    rm_config,
    run_fit,
    sft_config,
    stop_after,
    unsharded_ppo_from_outputs,
    write_data,
)
from resume_runs import build_tiny_reward_model, one_thread, write_config

from rlhf.fit import main
from rlhf.outputs import read_stage_marker

STEPS = 3
# Two processes average two half-batch gradients where one process sums the whole batch: the
# same numbers in another float order (~1e-7 relative in fp32). Three Adam steps at lr 1e-2
# keep the trained weights within ~4e-6 of each other; an unsynchronised process (each
# training on its half) or a lost optimizer state on resume moves them by ~1e-3 and more.
WEIGHT_TOL = 5e-5
PROBE_TOL = 1e-5  # the same weights, sharded vs unsharded forward


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("dist-data"))


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_policy_dir):
    return build_tiny_reward_model(tmp_path_factory.mktemp("dist-rm"), tiny_policy_dir)


def one_process(root, config) -> None:
    """Fit ``config`` in this process (one device, the whole data set as the batch)."""
    root.mkdir(parents=True, exist_ok=True)
    with one_thread():
        main(["--config", str(write_config(root / "config.yaml", config))])


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, tiny_policy_dir, data):
    root = tmp_path_factory.mktemp("sft-one-process")
    one_process(root, sft_config(root, tiny_policy_dir, data["demos"], batch_size=ROWS, steps=STEPS))
    return read_safetensors(root / "out" / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def rm_reference(tmp_path_factory, tiny_policy_dir, data):
    root = tmp_path_factory.mktemp("rm-one-process")
    one_process(root, rm_config(root, tiny_policy_dir, data["prefs"], batch_size=ROWS, steps=STEPS))
    return rm_weights(root / "out")


def rm_weights(out) -> dict[str, torch.Tensor]:
    weights = read_safetensors(out / "adapter" / "adapter_model.safetensors")
    weights.update({f"score_head.{k}": v for k, v in read_safetensors(out / "score_head.safetensors").items()})
    return weights


def fit_two_processes(root, config: dict, strategy: str, resume: bool) -> None:
    """Fit ``config`` on two processes; with ``resume``, stop one step early (a checkpoint
    every step), then finish from ``last.ckpt``."""
    config_path = write_config(root / "config.yaml", config)
    if not resume:
        result = run_fit(config_path, strategy=strategy)
        assert result.returncode == 0, result.stderr[-4000:]
        check_processes(result.stderr, strategy)
        return
    first = run_fit(write_config(root / "stopped.yaml", stop_after(config, STEPS - 1)), strategy=strategy)
    assert first.returncode == 0, first.stderr[-4000:]
    check_processes(first.stderr, strategy)
    check_lean_checkpoint(root / "ckpt" / "last.ckpt", step=STEPS - 1)
    second = run_fit(config_path, "--ckpt_path", "last", strategy=strategy)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr


def check_processes(stderr: str, strategy: str) -> None:
    """Both processes ran, and under FSDP2 both sharded the model."""
    assert "MEMBER: 2/2" in stderr, stderr[-3000:]
    if strategy == "fsdp2":
        assert stderr.count("over 2 processes") == 2, stderr[-3000:]


def check_lean_checkpoint(path, step: int) -> dict:
    """One consolidated file holding only trained tensors (LoRA, heads) and the optimizer."""
    assert path.is_file(), path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == step
    keys = list(checkpoint["state_dict"])
    assert keys and all("lora_" in k or "head" in k for k in keys), keys
    assert any("lora_B" in k for k in keys)
    assert checkpoint["optimizer_states"][0]["state"], "no Adam moments saved"
    return checkpoint


@pytest.mark.parametrize("strategy,resume", [
    ("fsdp2", False),
    pytest.param("fsdp2", True, marks=pytest.mark.slow),
    pytest.param("ddp", False, marks=pytest.mark.slow),
])
def test_sft_on_two_processes_matches_one(tmp_path, tiny_policy_dir, data, sft_reference, strategy, resume):
    config = sft_config(tmp_path, tiny_policy_dir, data["demos"], batch_size=ROWS // 2, steps=STEPS,
                        checkpoint_every=1 if resume else None)
    fit_two_processes(tmp_path, config, strategy, resume)

    got = read_safetensors(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in sft_reference.items() if "lora_B" in k) > 1e-2  # trained
    assert max_abs_diff(got, sft_reference) < WEIGHT_TOL
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()  # merged, from rank 0


@pytest.mark.parametrize("strategy,resume", [
    ("fsdp2", False),
    pytest.param("ddp", True, marks=pytest.mark.slow),
])
def test_reward_model_on_two_processes_matches_one(tmp_path, tiny_policy_dir, data, rm_reference, strategy, resume):
    config = rm_config(tmp_path, tiny_policy_dir, data["prefs"], batch_size=ROWS // 2, steps=STEPS,
                       checkpoint_every=1 if resume else None)
    fit_two_processes(tmp_path, config, strategy, resume)

    got = rm_weights(tmp_path / "out")
    assert float(rm_reference["score_head.weight"].abs().max()) > 1e-2  # trained
    assert max_abs_diff(got, rm_reference) < WEIGHT_TOL
    assert read_stage_marker(tmp_path / "out")["score_stats_rows"] == 2 * ROWS  # rank 0 saw all


def assert_probes_close(got: dict, expected: dict, tol: float) -> None:
    for key in ("logprobs", "ref_logprobs", "values", "scores"):
        a, b = torch.tensor(got[key]), torch.tensor(expected[key])
        assert a.shape == b.shape, key
        assert torch.allclose(a, b, atol=tol, rtol=0), (key, float((a - b).abs().max()))


def ppo_run_config(root, policy, reward_model, prompts, probe: str, stop_at: int | None = None):
    """Three PPO iterations of 2 optimizer steps, a checkpoint after each iteration; with
    ``stop_at``, the run stops cleanly after that optimizer step (the config otherwise the same,
    so a resume of it is a resume of the same run)."""
    config = ppo_config(root, policy, reward_model, prompts, batch_size=ROWS // 2, iterations=3, probe=probe,
                        checkpoint_every=2)
    return write_config(root / f"{probe}.yaml", stop_after(config, stop_at) if stop_at else config)


def read_probe(root, name: str) -> dict:
    """A :class:`distributed_runs.PPOProbe` record, checking that both processes agree."""
    probe = json.loads((root / f"{name}.json").read_text())
    assert probe["world_size"] == 2 and len(probe["ranks"]) == 2
    assert_probes_close(probe["ranks"][1], probe["ranks"][0], 1e-6)  # replicas in sync
    return probe


@pytest.mark.parametrize("strategy", ["fsdp2", pytest.param("ddp", marks=pytest.mark.slow)])
def test_ppo_on_two_processes_equals_unsharded_outputs(tmp_path, tiny_policy_dir, data, reward_model, strategy):
    result = run_fit(ppo_run_config(tmp_path, tiny_policy_dir, reward_model, data["prompts"], "run"),
                     strategy=strategy)
    assert result.returncode == 0, result.stderr[-4000:]
    check_processes(result.stderr, strategy)
    checkpoint = check_lean_checkpoint(tmp_path / "ckpt" / "last.ckpt", step=6)
    assert {"value_head.weight", "value_head.bias"} <= set(checkpoint["state_dict"])
    assert all(".policy." in k or k.startswith("value_head.") for k in checkpoint["state_dict"])  # no reward adapter
    assert checkpoint["ppo"]["iteration"] == 3
    assert read_stage_marker(tmp_path / "out")["iterations"] == 3

    # The sharded model at the end of training equals an unsharded one built from the outputs:
    # policy (LoRA), reference (adapter disabled), value head, shared-base reward adapter.
    final = read_probe(tmp_path, "run-train_end")
    assert final["iteration"] == 3
    with one_thread():
        expected = probe_ppo(unsharded_ppo_from_outputs(tiny_policy_dir, reward_model, tmp_path / "out"))
    assert_probes_close(final, expected, PROBE_TOL)
    policy, reference = torch.tensor(final["logprobs"]), torch.tensor(final["ref_logprobs"])
    assert float((policy - reference).abs().max()) > 1e-3  # the policy moved off the reference
    assert float(torch.tensor(final["values"]).abs().max()) > 1e-4  # the value head trained


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_ppo_on_two_processes_resumes(tmp_path, tiny_policy_dir, data, reward_model, strategy):
    first = run_fit(ppo_run_config(tmp_path, tiny_policy_dir, reward_model, data["prompts"], "first", stop_at=4),
                    strategy=strategy)  # two of three iterations
    assert first.returncode == 0, first.stderr[-4000:]
    stopped = read_probe(tmp_path, "first-train_end")
    assert stopped["iteration"] == 2
    assert check_lean_checkpoint(tmp_path / "ckpt" / "last.ckpt", step=4)["ppo"]["iteration"] == 2

    second = run_fit(ppo_run_config(tmp_path, tiny_policy_dir, reward_model, data["prompts"], "second"),
                     "--ckpt_path", "last", strategy=strategy)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr
    resumed = read_probe(tmp_path, "second-train_start")
    assert resumed["iteration"] == 2
    assert_probes_close(resumed, stopped, 1e-6)  # the checkpoint's weights, sharded again
    assert read_probe(tmp_path, "second-train_end")["iteration"] == 3
    assert read_stage_marker(tmp_path / "out")["iterations"] == 3


@pytest.mark.slow
def test_adaptive_kl_coefficient_moves_by_the_global_rollout_on_both_processes(tmp_path, tiny_policy_dir, data,
                                                                              reward_model):
    # A target far above any KL holds the controller's error at its clip, -0.2, so each iteration
    # multiplies beta by 1 - 0.2 * n / horizon with n the sequences of the iteration: the global
    # count (both processes' batches), not one process's. tests/test_ppo_kl.py checks the mean.
    result = run_fit(ppo_run_config(tmp_path, tiny_policy_dir, reward_model, data["prompts"], "run"),
                     "--model.init_args.kl.adaptive=true", "--model.init_args.kl.target=1000000",
                     "--model.init_args.kl.horizon=100", strategy="ddp")
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = read_probe(tmp_path, "run-train_end")["ranks"]
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"]
    global_batch = 2 * (ROWS // 2)
    assert ranks[0]["kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * global_batch / 100) ** 3, rel=1e-9)


def test_fsdp1_config_refuses_a_cpu_with_a_clear_error(tmp_path, tiny_policy_dir, data):
    """``FSDPStrategy`` is the GPU path: on a CPU Lightning stops before loading anything."""
    config = write_config(tmp_path / "sft.yaml",
                          sft_config(tmp_path, tiny_policy_dir, data["demos"], batch_size=ROWS // 2, steps=1))
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        main(["--config", str(config), "--config", str(STRATEGY_CONFIGS["fsdp"]),
              "--trainer.devices", "2", "--trainer.accelerator", "cpu"])
