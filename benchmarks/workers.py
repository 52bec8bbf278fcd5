"""One PPO run per worker: ours (Lightning ``PPOModule``, with the spec's critic) or TRL's
``PPOTrainer``, on the same assets and settings, timed per iteration; or an import-only baseline.

:mod:`benchmarks.ppo_vs_trl` runs :func:`measure` through :func:`benchmarks.harness.run_worker`,
one fresh subprocess per spec, so that its peak RSS (``ru_maxrss``) is its own. Iteration time is
measured the same way for both: wall time between the ends of consecutive PPO iterations
(Lightning's ``on_train_batch_end``, TRL's ``on_step_end``), so data fetching, logging and
bookkeeping count for both. Both record what they ran with the same probes
(:mod:`benchmarks.probes`): optimizer steps and generated tokens per iteration, the precision
setting in force, and the dtype of one matmul's output in every kind of forward pass.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import StepTimes, WorkerSpec, device_memory, import_baseline, peak_rss_bytes

PRECISIONS = ("32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
# Our critics: "shared" a value head on the policy's detached hidden states (a lighter
# algorithm than TRL's), "adapter" a value LoRA adapter with its own trunk pass (the
# like-for-like critic), "hydra" a value branch that reuses the policy trunk's hidden states
# below the top critic_layers layers and trains its own copy of those (where rlhf.ppo has it).
CRITICS = ("shared", "adapter", "hydra")
# Where TRL autocasts under bf16: "none" (its config's bf16 flag only, which its accelerator
# never sees), "update" (the accelerator set to bf16: the wrapped policy+value forward of the
# update autocasts; rollout passes call the unwrapped models and do not) or "all" (train()
# also inside the accelerator's autocast, as Lightning's bf16-mixed wraps our whole step).
TRL_AUTOCAST = ("none", "update", "all")
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
    """One trainer's run: assets, batch shape and PPO settings (matched across trainers).

    ``critic`` (with ``critic_layers`` for hydra), ``quantization`` (a bitsandbytes
    ``4bit``/``8bit`` base) and ``strategy`` (``fsdp`` / ``fsdp2``,
    :func:`benchmarks.loop_parts.strategy_for`) are ours only;
    ``trl_autocast`` is TRL's only (see :data:`TRL_AUTOCAST`).
    """

    trainer: str  # "ours", "trl", "baseline-ours" or "baseline-trl"
    warmup: int = 1
    lr: float = 1e-5
    temperature: float = 0.7
    kl_coef: float = 0.05
    share_reward_base: bool = True
    precision: str = "32"  # "32": float32 throughout; "bf16": bf16 autocast, frozen weights in bf16
    critic: str = "shared"
    critic_layers: int = 2  # hydra: the top decoder layers its value branch copies and trains
    device: str = "auto"
    quantization: str | None = None
    strategy: str | None = None
    trl_autocast: str = "all"

    def __post_init__(self) -> None:
        for name, value, allowed in (("precision", self.precision, PRECISIONS), ("critic", self.critic, CRITICS),
                                     ("device", self.device, DEVICES),
                                     ("trl_autocast", self.trl_autocast, TRL_AUTOCAST)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.trainer == "trl" and (self.quantization or self.strategy):
            raise ValueError("quantization and strategy are ours-only settings; the TRL worker takes neither")


def supported_critics() -> tuple[str, ...]:
    """The :data:`CRITICS` that :class:`rlhf.ppo.module.PPOModule` accepts (its ``critic``
    annotation), in :data:`CRITICS` order."""
    import inspect
    import typing

    from rlhf.ppo.module import PPOModule

    annotation = inspect.signature(PPOModule.__init__, eval_str=True).parameters["critic"].annotation
    accepted = set(typing.get_args(annotation)) or {"shared", "adapter"}
    return tuple(c for c in CRITICS if c in accepted)


# -- ours ------------------------------------------------------------------------------------
def run_ours(spec: RunSpec) -> dict[str, Any]:
    """Fit :class:`rlhf.ppo.PPOModule` for ``warmup + iterations`` iterations; per-iteration
    wall time, phase breakdown (:mod:`rlhf.timing`), generated tokens and optimizer steps."""
    import lightning as L
    import torch

    from benchmarks.assets import load_prompts
    from benchmarks.loop_parts import FixedPrompts, StepClock, fit
    from benchmarks.probes import ActivationDtypes, OptimizerSteps
    from rlhf.generation import SamplingSettings
    from rlhf.models.loading import LoraSettings, ModelSettings
    from rlhf.ppo.module import PPOModule
    from rlhf.ppo.settings import KLSettings, RewardSettings, UpdateSettings
    from rlhf.timing import PhaseTimesRecorder

    import_rss = peak_rss_bytes()
    rows = load_prompts(spec.prompts)
    steps, dtypes = OptimizerSteps(), ActivationDtypes()
    used: dict[str, Any] = {}

    class Clock(StepClock):
        """Per iteration: wall time, phase times (from a :class:`PhaseTimesRecorder`, which
        must run first), generated (response) tokens and optimizer steps."""

        def __init__(self, recorder: PhaseTimesRecorder) -> None:
            super().__init__()
            self.recorder = recorder
            self.phases: list[dict[str, float]] = []
            self.tokens: list[float] = []
            self.steps: list[int] = []

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            used["lightning_precision"] = str(trainer.precision)
            used["strategy"] = type(trainer.strategy).__name__
            used["device"] = str(pl_module.device)
            dtypes.watch("base (policy, reference, value, reward)", pl_module.model)
            if getattr(pl_module, "value_branch", None) is not None:  # hydra: its own copy of the top layers
                dtypes.watch("value branch", pl_module.value_branch)
            steps.take()
            super().on_train_start()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            super().on_train_batch_end()
            self.phases.append(self.recorder.last)
            self.tokens.append(float(trainer.callback_metrics["response/length"]) * spec.batch_size)
            self.steps.append(steps.take())

    bf16 = spec.precision == "bf16"
    torch.manual_seed(spec.seed)
    setup_start = time.perf_counter()
    module = PPOModule(
        # bf16: our recipe, bf16-mixed with the frozen base stored in bf16 (dtype auto).
        base=ModelSettings(spec.base, dtype="auto" if bf16 else "float32", quantization=spec.quantization,
                           lora=LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha)),
        # Raw RM scores as TRL uses them: no normalisation, clipping or missing-EOS penalty.
        reward=RewardSettings(model=spec.rm, normalize=False, clip=None, missing_eos_penalty=None,
                              share_base=spec.share_reward_base),
        sampling=SamplingSettings(max_new_tokens=spec.response_length, temperature=spec.temperature),
        kl=KLSettings(coef=spec.kl_coef, estimator="k1"),
        # One optimizer step per epoch (minibatch = batch) and no gradient clipping, as TRL's loop.
        update=UpdateSettings(ppo_epochs=spec.ppo_epochs, minibatch_size=None, max_grad_norm=None),
        estimator="gae", critic=spec.critic,
        **({"critic_layers": spec.critic_layers} if spec.critic == "hydra" else {}),
        iterations=spec.warmup + spec.iterations, sample_every=0, lr=spec.lr, output_dir=None,
    )
    recorder = PhaseTimesRecorder()
    clock = Clock(recorder)
    fit(module, FixedPrompts(rows, spec.batch_size), [recorder, clock], device=spec.device, strategy=spec.strategy,
        precision="bf16-mixed" if bf16 else "32-true", max_epochs=-1)
    trainable = sum(p.numel() for p in module.trainable_parameters())
    frozen = str(module.model.get_base_model().get_input_embeddings().weight.dtype)
    return {
        "iteration_seconds": clock.seconds, "phases": clock.phases, "generated_tokens": clock.tokens,
        "optimizer_steps": clock.steps, "minibatches_per_epoch": 1,
        "import_rss_bytes": import_rss, "setup_and_fit_seconds": time.perf_counter() - setup_start,
        "trainable_params": trainable, "critic": spec.critic, "frozen_dtype": frozen,
        "precision_used": {**used, "frozen_weights_dtype": frozen, "quantization": spec.quantization},
        "activation_dtypes": dtypes.record(),
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
    wall time, the time of its generation, reference, value and reward calls, generated
    tokens and optimizer steps."""
    import torch
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from benchmarks.assets import load_prompts, peft_lora
    from benchmarks.probes import ActivationDtypes, OptimizerSteps, response_token_counts

    import_rss = peak_rss_bytes()
    rows = load_prompts(spec.prompts)
    n = spec.warmup + spec.iterations
    phase_times: dict[str, float] = {}
    generated = [0.0]  # response tokens generated since the last iteration ended
    steps, dtypes = OptimizerSteps(), ActivationDtypes()

    def add(name: str, seconds: float) -> None:
        phase_times[name] = phase_times.get(name, 0.0) + seconds

    # Time TRL's module-level helpers where the trainer looks them up (its own names are kept).
    original_generation, original_forward, original_reward = (
        ppo_trainer.batch_generation, ppo_trainer.forward, ppo_trainer.get_reward)

    def timed_generation(model: Any, queries: torch.Tensor, batch: int, pad_token_id: int, *args: Any,
                         **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            output = original_generation(model, queries, batch, pad_token_id, *args, **kwargs)
        finally:
            add("generation", time.perf_counter() - start)
        generated[0] += sum(response_token_counts(output[0][:, queries.shape[1]:], pad_token_id))
        return output

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
        """Per PPO update: wall time, phase times, generated tokens and optimizer steps."""

        def __init__(self) -> None:
            super().__init__()
            self.phases: list[dict[str, float]] = []
            self.tokens: list[float] = []
            self.steps: list[int] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.start()
            phase_times.clear()
            generated[0] = 0.0
            steps.take()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.lap()
            self.phases.append(dict(phase_times))
            phase_times.clear()
            self.tokens.append(generated[0])
            generated[0] = 0.0
            self.steps.append(steps.take())

    bf16 = spec.precision == "bf16"
    autocast = spec.trl_autocast if bf16 else "none"
    # TRL builds its Accelerator with no mixed_precision argument: accelerate then reads this
    # variable (its default "no"); the config's bf16 flag never reaches it.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if autocast in ("update", "all") else "no"
    use_cpu = spec.device == "cpu" or not torch.cuda.is_available()
    if spec.device == "cuda" and use_cpu:
        raise RuntimeError("device cuda asked for, but torch.cuda.is_available() is False")
    torch.manual_seed(spec.seed)
    setup_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec.base, local_files_only=True)
    tokenizer.padding_side = "left"
    # bf16: the frozen weights (the policy's base under LoRA, the reward model) in bf16 as ours;
    # the fully trained value model keeps float32 weights (AdamW on bf16 weights loses updates).
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
            # The HF TrainingArguments flag: without a GPU it takes bf16 only with use_cpu.
            bf16=bf16, use_cpu=use_cpu,
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
        for name, model in (("policy (and reference)", trainer.model.policy), ("value", value_model),
                            ("reward", reward_model)):
            dtypes.watch(name, model)
        accelerator = trainer.accelerator
        used = {"accelerator_mixed_precision": str(accelerator.mixed_precision),
                "accelerator_native_amp": bool(accelerator.native_amp), "config_bf16": bool(config.bf16),
                "autocast": autocast, "device": str(accelerator.device),
                "frozen_weights_dtype": str(policy.get_input_embeddings().weight.dtype)}
        with accelerator.autocast() if autocast == "all" else nullcontext():
            trainer.train()
    return {
        "iteration_seconds": clock.seconds, "phases": clock.phases, "generated_tokens": clock.tokens,
        "optimizer_steps": clock.steps, "minibatches_per_epoch": 1,
        "import_rss_bytes": import_rss, "setup_and_fit_seconds": time.perf_counter() - setup_start,
        "trainable_params": trainable, "critic": "value model", "frozen_dtype": used["frozen_weights_dtype"],
        "precision_used": used, "activation_dtypes": dtypes.record(),
    }


def measure(spec: RunSpec) -> dict[str, Any]:
    """Run the spec's trainer, or import what it imports (``baseline-*``); its result plus the
    spec, peak RSS (and peak CUDA memory where it used CUDA) and the allocator setting the
    worker saw."""
    if spec.trainer in ("ours", "trl"):
        result = (run_ours if spec.trainer == "ours" else run_trl)(spec)
    else:
        result = import_baseline(TRAINER_IMPORTS["ours" if spec.trainer == "baseline-ours" else "trl"])
    result.update(trainer=spec.trainer, spec=asdict(spec), peak_rss_bytes=peak_rss_bytes(),
                  malloc_mmap_threshold_env=os.environ.get("MALLOC_MMAP_THRESHOLD_"), **device_memory())
    return result
