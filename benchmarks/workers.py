"""One PPO run per worker: ours (Lightning ``PPOModule``) or TRL's ``PPOTrainer``, on the same
assets and settings, timed per iteration; or an import-only baseline.

:mod:`benchmarks.ppo_vs_trl` runs :func:`measure` through :func:`benchmarks.harness.run_worker`,
one fresh subprocess per spec, so that its peak RSS (``ru_maxrss``) is its own. Iteration time is
measured the same way for both: wall time between the ends of consecutive PPO iterations
(Lightning's ``on_train_batch_end``, TRL's ``on_step_end``), so data fetching, logging and
bookkeeping count for both.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import StepTimes, WorkerSpec, import_baseline, peak_rss_bytes

PRECISIONS = ("32", "bf16")
# The libraries each trainer's worker loads; its import-only baseline imports these and nothing else.
TRAINER_IMPORTS = {
    "ours": ("lightning", "torch", "rlhf.ppo.module"),
    "trl": ("datasets", "peft", "torch", "transformers", "trl.experimental.ppo"),
}


@dataclass(kw_only=True)
class PPOSpec(WorkerSpec):
    """A PPO run's assets (paths from :func:`benchmarks.assets.build_assets`) and its shape."""

    base: str = ""
    rm: str = ""
    prompts: str = ""
    response_length: int = 32
    ppo_epochs: int = 4
    iterations: int = 3


@dataclass
class RunSpec(PPOSpec):
    """One trainer's run: assets, batch shape and PPO settings (matched across trainers)."""

    trainer: str  # "ours", "trl", "baseline-ours" or "baseline-trl"
    warmup: int = 1
    lr: float = 1e-5
    temperature: float = 0.7
    kl_coef: float = 0.05
    share_reward_base: bool = True
    precision: str = "32"  # "32": float32 throughout; "bf16": bf16 autocast, frozen weights in bf16

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


# -- ours ------------------------------------------------------------------------------------
def run_ours(spec: RunSpec) -> dict[str, Any]:
    """Fit :class:`rlhf.ppo.PPOModule` for ``warmup + iterations`` iterations; per-iteration
    wall time, phase breakdown (:mod:`rlhf.timing`) and generated tokens."""
    import lightning as L
    import torch

    from benchmarks.assets import load_prompts
    from benchmarks.loop_parts import FixedPrompts, StepClock, fit
    from rlhf.generation import SamplingSettings
    from rlhf.models.loading import LoraSettings, ModelSettings
    from rlhf.ppo.module import PPOModule
    from rlhf.ppo.settings import KLSettings, RewardSettings, UpdateSettings
    from rlhf.timing import PhaseTimesRecorder

    import_rss = peak_rss_bytes()
    rows = load_prompts(spec.prompts)

    class Clock(StepClock):
        """Iteration wall times plus phase times (from a :class:`PhaseTimesRecorder`, which
        must run first) and response tokens, one entry per iteration."""

        def __init__(self, recorder: PhaseTimesRecorder) -> None:
            super().__init__()
            self.recorder = recorder
            self.phases: list[dict[str, float]] = []
            self.tokens: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            super().on_train_batch_end()
            self.phases.append(self.recorder.last)
            length = float(trainer.callback_metrics["response/length"])
            self.tokens.append(length * spec.batch_size)

    bf16 = spec.precision == "bf16"
    torch.manual_seed(spec.seed)
    setup_start = time.perf_counter()
    module = PPOModule(
        # bf16: our recipe, bf16-mixed with the frozen base stored in bf16 (dtype auto).
        base=ModelSettings(spec.base, dtype="auto" if bf16 else "float32",
                           lora=LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha)),
        # Raw RM scores as TRL uses them: no normalisation, clipping or missing-EOS penalty.
        reward=RewardSettings(model=spec.rm, normalize=False, clip=None, missing_eos_penalty=None,
                              share_base=spec.share_reward_base),
        sampling=SamplingSettings(max_new_tokens=spec.response_length, temperature=spec.temperature),
        kl=KLSettings(coef=spec.kl_coef, estimator="k1"),
        # One optimizer step per epoch (minibatch = batch) and no gradient clipping, as TRL's loop.
        update=UpdateSettings(ppo_epochs=spec.ppo_epochs, minibatch_size=None, max_grad_norm=None),
        estimator="gae", critic="shared",
        iterations=spec.warmup + spec.iterations, sample_every=0, lr=spec.lr, output_dir=None,
    )
    recorder = PhaseTimesRecorder()
    clock = Clock(recorder)
    fit(module, FixedPrompts(rows, spec.batch_size), [recorder, clock],
        precision="bf16-mixed" if bf16 else "32-true", max_epochs=-1)
    trainable = sum(p.numel() for p in module.trainable_parameters())
    return {
        "iteration_seconds": clock.seconds, "phases": clock.phases, "response_tokens": clock.tokens,
        "import_rss_bytes": import_rss, "setup_and_fit_seconds": time.perf_counter() - setup_start,
        "trainable_params": trainable,
        "frozen_dtype": str(module.model.get_base_model().get_input_embeddings().weight.dtype),
    }


# -- TRL -------------------------------------------------------------------------------------
def _sequence_classifier(rm_dir: str, pad_token_id: int, dtype: Any = None) -> Any:
    """Our saved reward model (merged backbone + head) as an ``AutoModelForSequenceClassification``."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    info = json.loads((Path(rm_dir) / "reward_model.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(
        str(Path(rm_dir) / info["model_dir"]), num_labels=1, dtype=dtype or torch.float32, local_files_only=True
    )
    head = load_file(str(Path(rm_dir) / info["score_head"]))
    if float(head["bias"].abs().max()) != 0.0:
        raise ValueError("TRL's score layer has no bias: build the RM with a zero head bias")
    with torch.no_grad():
        model.score.weight.copy_(head["weight"])
    model.config.pad_token_id = pad_token_id
    return model


def run_trl(spec: RunSpec) -> dict[str, Any]:
    """Train with TRL's ``PPOTrainer`` for ``warmup + iterations`` iterations; per-iteration
    wall time and the time of its generation, reference, value and reward calls."""
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.assets import load_prompts, peft_lora

    import_rss = peak_rss_bytes()
    rows = load_prompts(spec.prompts)
    n = spec.warmup + spec.iterations
    phase_times: dict[str, float] = {}

    def add(name: str, seconds: float) -> None:
        phase_times[name] = phase_times.get(name, 0.0) + seconds

    # Time TRL's module-level helpers where the trainer looks them up (its own names are kept).
    original_generation, original_forward, original_reward = (
        ppo_trainer.batch_generation, ppo_trainer.forward, ppo_trainer.get_reward)

    def timed_generation(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_generation(*args, **kwargs)
        finally:
            add("generation", time.perf_counter() - start)

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():  # the update's policy forward: part of "update"
            return original_forward(*args, **kwargs)
        start = time.perf_counter()
        try:
            return original_forward(*args, **kwargs)
        finally:
            add("reference", time.perf_counter() - start)

    def timed_reward(model: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original_reward(model, *args, **kwargs)
        finally:
            add("reward" if model is reward_model else "value", time.perf_counter() - start)

    ppo_trainer.batch_generation, ppo_trainer.forward, ppo_trainer.get_reward = (
        timed_generation, timed_forward, timed_reward)

    class Clock(StepTimes, TrainerCallback):
        """Iteration wall times and phase times, one entry per PPO update."""

        def __init__(self) -> None:
            super().__init__()
            self.phases: list[dict[str, float]] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start()
            phase_times.clear()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.lap()
            self.phases.append(dict(phase_times))
            phase_times.clear()

    torch.manual_seed(spec.seed)
    setup_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.base, local_files_only=True)
    tokenizer.padding_side = "left"
    # bf16: the frozen weights (the policy's base under LoRA, the reward model) in bf16 as ours;
    # the fully trained value model keeps float32 weights (AdamW on bf16 weights loses updates).
    bf16 = spec.precision == "bf16"
    frozen = torch.bfloat16 if bf16 else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(spec.base, dtype=frozen, local_files_only=True)
    reward_model = _sequence_classifier(spec.rm, tokenizer.pad_token_id, frozen)
    value_model = _sequence_classifier(spec.rm, tokenizer.pad_token_id)  # critic initialised from the RM
    clock = Clock()
    with tempfile.TemporaryDirectory() as root:
        config = PPOConfig(
            output_dir=root, report_to="none", save_strategy="no", seed=spec.seed,
            per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1, num_mini_batches=1,
            num_ppo_epochs=spec.ppo_epochs, total_episodes=n * spec.batch_size,
            local_rollout_forward_batch_size=spec.batch_size, response_length=spec.response_length,
            temperature=spec.temperature, stop_token=None, missing_eos_penalty=None, kl_coef=spec.kl_coef,
            kl_estimator="k1", learning_rate=spec.lr, num_sample_generations=0,
            # bf16: the HF Trainer's autocast; without a GPU it takes bf16 only with use_cpu.
            bf16=bf16, use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=False, disable_tqdm=True, logging_steps=1, dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=config, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward_model,
            value_model=value_model, train_dataset=Dataset.from_dict({"input_ids": rows}),
            eval_dataset=Dataset.from_dict({"input_ids": rows[: spec.batch_size]}),
            peft_config=peft_lora(spec.lora_r, spec.lora_alpha, "CAUSAL_LM"),
            callbacks=[clock],
        )
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    return {
        "iteration_seconds": clock.seconds, "phases": clock.phases,
        "response_tokens": [float(spec.batch_size * spec.response_length)] * len(clock.seconds),
        "import_rss_bytes": import_rss, "setup_and_fit_seconds": time.perf_counter() - setup_start,
        "trainable_params": trainable,
        "frozen_dtype": str(policy.get_input_embeddings().weight.dtype),
    }


def measure(spec: RunSpec) -> dict[str, Any]:
    """Run the spec's trainer, or import what it imports (``baseline-*``); its result plus the
    spec, peak RSS and the allocator setting the worker saw."""
    if spec.trainer in ("ours", "trl"):
        result = (run_ours if spec.trainer == "ours" else run_trl)(spec)
    else:
        result = import_baseline(TRAINER_IMPORTS["ours" if spec.trainer == "baseline-ours" else "trl"])
    result.update(trainer=spec.trainer, spec=asdict(spec), peak_rss_bytes=peak_rss_bytes(),
                  malloc_mmap_threshold_env=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    return result
