"""Two-process (gloo) runs of the stages for the scale-out tests: configs sized so that one
process with the whole data set as its batch and two processes with half of it each take the
same optimizer steps, a runner stacking ``configs/strategy/*.yaml``, and a PPO probe that
records log-probs, reference log-probs, values and rewards of a fixed batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from resume_runs import subprocess_env, tiny_ppo_model

REPO = Path(__file__).resolve().parents[1]
STRATEGY_CONFIGS = {name: REPO / "configs" / "strategy" / f"{name}.yaml" for name in ("ddp", "fsdp2", "fsdp")}
ROWS = 8  # every data set: one global batch of 8 (8 on one process, 4 on each of two)


def write_data(root: Path) -> dict[str, str]:
    """Demonstrations, comparisons and prompts, ``ROWS`` each. Every demonstration has the same
    response (the same number of loss tokens per process, so the mean of the per-process token
    means is the one-process token mean)."""
    files = {
        "demos": [{"prompt": f"Question {i}?", "response": "A fine answer."} for i in range(ROWS)],
        "prefs": [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": "Bad."}
                  for i in range(ROWS)],
        "prompts": [{"prompt": f"Tell me story {i}."} for i in range(ROWS)],
    }
    paths = {}
    for name, rows in files.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(path)
    return paths


def trainer_args(root: Path, max_steps: int, checkpoint_every: int | None = None,
                 callbacks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A quiet CPU trainer without validation; ``checkpoint_every`` optimizer steps a
    ``last.ckpt`` goes to ``root/ckpt``."""
    callbacks = list(callbacks or [])
    if checkpoint_every:
        callbacks.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                          "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": 0,
                                        "every_n_train_steps": checkpoint_every}})
    return {
        "accelerator": "cpu", "max_steps": max_steps, "max_epochs": -1, "log_every_n_steps": 1,
        "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "enable_progress_bar": False, "enable_model_summary": False,
        "enable_checkpointing": bool(checkpoint_every), "default_root_dir": str(root / "run"),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root / "run"), "name": "csv"}},
        "callbacks": callbacks,
    }


def data_args(path: str, batch_size: int) -> dict[str, Any]:
    return {"train": {"path": path}, "val_fraction": 0.0, "batch_size": batch_size,
            "max_length": 48, "max_prompt_length": 24}


def lora_stage_config(root: Path, model_class: str, model: Path, data_class: str, data: str,
                      batch_size: int, steps: int, **trainer: Any) -> dict[str, Any]:
    """``model_class`` (a rank-4 LoRA on ``model``, lr 1e-2, saving to ``root/out``) trained
    on ``data_class`` over the file ``data`` for ``steps`` optimizer steps."""
    return {
        "seed_everything": 0,
        "trainer": trainer_args(root, steps, **trainer),
        "model": {"class_path": model_class, "init_args": {
            "base": {"name_or_path": str(model), "lora": {"r": 4}}, "lr": 1e-2,
            "output_dir": str(root / "out")}},
        "data": {"class_path": data_class, "init_args": data_args(data, batch_size)},
    }


def sft_config(root: Path, model: Path, demos: str, batch_size: int, steps: int, **trainer: Any) -> dict[str, Any]:
    return lora_stage_config(root, "rlhf.sft.SFTModule", model, "rlhf.data.DemonstrationDataModule", demos,
                             batch_size, steps, **trainer)


def rm_config(root: Path, model: Path, prefs: str, batch_size: int, steps: int, **trainer: Any) -> dict[str, Any]:
    return lora_stage_config(root, "rlhf.rm.RewardModule", model, "rlhf.data.ComparisonDataModule", prefs,
                             batch_size, steps, **trainer)


def ppo_config(root: Path, policy: Path, reward_model: Path, prompts: str, batch_size: int,
               iterations: int, probe: str, **trainer: Any) -> dict[str, Any]:
    """PPO with 2 optimizer steps an iteration (minibatches of 2 of ``batch_size`` sequences);
    a :class:`PPOProbe` writes ``root/<probe>-<event>.json``."""
    callbacks = [{"class_path": "distributed_runs.PPOProbe", "init_args": {"prefix": str(root / probe)}}]
    return {
        "seed_everything": 0,
        "trainer": trainer_args(root, -1, callbacks=callbacks, **trainer),
        "model": tiny_ppo_model(policy, reward_model, iterations, 3e-2, root / "out"),
        "data": {"class_path": "rlhf.data.PromptDataModule", "init_args": data_args(prompts, batch_size)},
    }


def run_fit(config: Path, *args: str, strategy: str | None = None, devices: int = 2,
            timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m rlhf.fit --config config [--config configs/strategy/<strategy>.yaml
    --trainer.devices N]`` in a fresh process, one torch thread per process."""
    extra = ["--config", str(STRATEGY_CONFIGS[strategy]), "--trainer.devices", str(devices)] if strategy else []
    return subprocess.run(
        [sys.executable, "-m", "rlhf.fit", "--config", str(config), *extra, *args],
        cwd=config.parent, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest elementwise difference between two state dicts with the same keys and shapes."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- the PPO probe -----------------------------------------------------------------------------
def probe_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A fixed batch ``(input_ids [4, 14], attention_mask, response_start=8)``: one row with a
    left-padded prompt, one with a response that ends early."""
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(3, vocab, (4, 14), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 11:] = 0  # response ended (right padding)
    return ids, mask, 8


@torch.no_grad()
def probe_ppo(module: Any) -> dict[str, list]:
    """Policy and reference log-probs, values and reward-model scores of :func:`probe_batch`
    under ``module`` (a :class:`rlhf.ppo.PPOModule`, sharded or not). Every process of a
    sharded run must call it (each forward is a collective)."""
    training = module.model.training
    module.model.eval()
    try:
        ids, mask, start = probe_batch(len(module.tokenizer))
        ids, mask = ids.to(module.device), mask.to(module.device)
        logprobs, values, _ = module.policy_forward(ids, mask, start, entropy=False)
        ref = module.reference_logprobs(ids, mask, start)
        scores = module.scorer(ids, mask)
    finally:
        module.model.train(training)
    return {"logprobs": logprobs.tolist(), "ref_logprobs": ref.tolist(), "values": values.tolist(),
            "scores": scores.tolist(), "kl_coef": module.kl_controller.value}


class PPOProbe(Callback):
    """Writes :func:`probe_ppo` at the start and the end of training to
    ``<prefix>-train_start.json`` / ``<prefix>-train_end.json`` (rank 0): rank 0's result, the
    iteration, and every rank's result under ``ranks`` (the replicas must agree)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _write(self, trainer: Trainer, module: LightningModule, event: str) -> None:
        result = probe_ppo(module)
        ranks = [result]
        if trainer.world_size > 1:
            ranks = [None] * trainer.world_size
            torch.distributed.all_gather_object(ranks, result)
        if trainer.is_global_zero:
            record = {**result, "ranks": ranks, "world_size": trainer.world_size, "iteration": module.iteration}
            Path(f"{self.prefix}-{event}.json").write_text(json.dumps(record))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "train_start")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, "train_end")


class StopAfter(Callback):
    """Stop fitting after optimizer step ``step`` (a clean end, unlike a kill; unlike a lower
    ``max_steps`` it leaves the LR schedule of the full run as it was)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def stop_after(config: dict[str, Any], step: int) -> dict[str, Any]:
    """``config`` with a :class:`StopAfter` callback."""
    callbacks = [*config["trainer"]["callbacks"],
                 {"class_path": "distributed_runs.StopAfter", "init_args": {"step": step}}]
    return {**config, "trainer": {**config["trainer"], "callbacks": callbacks}}


def unsharded_ppo_from_outputs(policy: Path, reward_model: Path, out: Path) -> Any:
    """A one-process :class:`rlhf.ppo.PPOModule` with the policy adapter and value head a PPO
    run saved in ``out`` (``adapter/policy``, ``value_head.pt``)."""
    from peft import set_peft_model_state_dict

    from rlhf.models.loading import LoraSettings, ModelSettings
    from rlhf.ppo import PPOModule
    from rlhf.generation import SamplingSettings
    from rlhf.ppo.settings import RewardSettings

    module = PPOModule(ModelSettings(str(policy), lora=LoraSettings(r=4)),
                       reward=RewardSettings(model=str(reward_model)),
                       sampling=SamplingSettings(max_new_tokens=6, temperature=1.0))
    module.configure_model()
    adapter = read_safetensors(out / "adapter" / "policy" / "adapter_model.safetensors")
    result = set_peft_model_state_dict(module.model, adapter, adapter_name="policy")
    assert not result.unexpected_keys, result.unexpected_keys
    module.value_head.load_state_dict(torch.load(out / "value_head.pt", weights_only=True))
    return module
