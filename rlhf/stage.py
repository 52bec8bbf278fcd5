"""What the stage modules share: model settings, optimizer, lean checkpoints, outputs, and the
non-finite guards (a NaN/inf loss or trainable weight stops the run with an error naming the
stage and step; a stage never saves non-finite tensors as a complete output)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch

from rlhf.distributed import consolidate_on_rank_zero
from rlhf.guards import (
    NonFiniteError,
    nonfinite_parameters,
    nonfinite_saved_tensors,
    tensors_finite,
)
from rlhf.models.loading import (
    LoraSettings,
    ModelSettings,
    apply_lora,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
)

# Hyperparameters hold these dataclasses; let Lightning's weights-only checkpoint loading read them.
torch.serialization.add_safe_globals([ModelSettings, LoraSettings])


def model_context_length(settings: ModelSettings) -> int | None:
    """The model's context window (``max_position_embeddings`` of its text config), read from
    its ``config.json`` without loading weights; ``None`` when the config does not say."""
    from transformers import AutoConfig

    path = resolve_model_path(settings.name_or_path, settings.revision)
    config = AutoConfig.from_pretrained(
        path, local_files_only=True, trust_remote_code=settings.trust_remote_code
    )
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def warmup_linear_decay(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up over ``warmup_steps``, then linear decay to 0 at the end."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / remaining)

    return factor


class StageModule(L.LightningModule):
    """Base of the SFT, reward-model and PPO modules.

    Args:
        base: the model to start from (path or Hub id, dtype, LoRA, quantization, ...).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps; the LR then decays linearly to 0.
        adam_eps: AdamW epsilon.
        output_dir: where the stage's final model is saved (atomically) when fitting ends;
            ``None`` saves nothing.
    """

    # Checkpoints hold only trainable tensors (LoRA, heads); the frozen base comes from
    # ``base`` again on load, so loading is non-strict.
    strict_loading = False
    #: How messages name the stage ("SFT", "RM"); empty: the class name without ``Module``.
    stage_label: ClassVar[str] = ""

    def __init__(
        self,
        base: ModelSettings,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_eps: float = 1e-8,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.base = base
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.adam_eps = adam_eps
        self.output_dir = output_dir
        self.tokenizer = load_tokenizer(base.name_or_path, revision=base.revision)
        self.metrics_before_fit: dict[str, float] = {}

    @property
    def stage_name(self) -> str:
        return self.stage_label or type(self).__name__.removesuffix("Module")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """``(name, parameter)`` of each of :meth:`trainable_parameters`."""
        trainable = {id(p) for p in self.trainable_parameters()}
        return [(name, p) for name, p in self.named_parameters() if id(p) in trainable]

    def load_base_model(self, adapter_name: str = "default") -> torch.nn.Module:
        """The ``base`` causal LM at the run's precision (:meth:`run_precision`), with a LoRA
        adapter named ``adapter_name`` when ``base.lora`` is set (base frozen then)."""
        model = load_causal_lm(self.base, self.run_precision())
        return apply_lora(model, self.base.lora, adapter_name) if self.base.lora else model

    def run_precision(self) -> str | None:
        """The attached trainer's precision (``"bf16-mixed"``, ``"32-true"``, ...), or ``None``
        without a trainer; :func:`rlhf.models.loading.load_causal_lm` reads it for frozen bases."""
        trainer = self._trainer
        return None if trainer is None else str(trainer.precision)

    def on_fit_start(self) -> None:
        # A ``trainer.validate`` before ``fit`` (validate_before_fit) resets torchmetrics states
        # under inference mode, leaving inference tensors that the fit loop's validation (run
        # under no_grad) cannot update in place; fresh states fix that.
        from torchmetrics import Metric

        with torch.inference_mode(False):
            for module in self.modules():
                if isinstance(module, Metric):
                    module.reset()

    def setup(self, stage: str) -> None:
        """Checks that need the data module, before the model is loaded."""
        if stage in ("fit", "validate"):
            self.check_context()

    def sequence_budget(self) -> tuple[int, str] | None:
        """The longest sequence this stage gives the model, in tokens, and the config keys that
        set it (for messages); ``None`` without a data module that says."""
        data = getattr(self.trainer, "datamodule", None)
        length = getattr(data, "max_length", None)
        return (length, "data.init_args.max_length") if length else None

    def check_context(self) -> None:
        """Refuse sequences longer than the model's context window (positions past it would
        index out of the position table or silently degrade), naming the config keys."""
        budget = self.sequence_budget()
        context = model_context_length(self.base) if budget else None
        if budget and context and budget[0] > context:
            tokens, keys = budget
            raise ValueError(
                f"{keys} = {tokens} tokens is longer than the context of "
                f"{self.base.name_or_path} (max_position_embeddings = {context}); lower it"
            )

    def total_steps(self) -> int:
        steps = self.trainer.estimated_stepping_batches
        return int(steps) if math.isfinite(steps) else 1_000_000

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        optimizer = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, eps=self.adam_eps
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(self.warmup_steps, self.total_steps())
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- non-finite guards --------------------------------------------------------------------
    def _place(self, where: str | Mapping[str, Any] | None) -> str:
        """``step N`` (the trainer's global step, as in the logged metrics) by default;
        ``iteration 1, epoch 0, minibatch 2`` for a mapping."""
        if where is None:
            trainer = self._trainer
            return f"step {trainer.global_step if trainer is not None else 0}"
        if isinstance(where, Mapping):
            return ", ".join(f"{k} {v}" for k, v in where.items())
        return where

    def _on_any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (every process must call this together)."""
        trainer = self._trainer
        if trainer is None:
            return flag
        return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _advice(self) -> str:
        return (f"Lower the learning rate (model.init_args.lr = {self.lr:g}), clip gradients "
                "(trainer.gradient_clip_val) or check the data; no stage output is written.")

    def check_loss_finite(self, loss: torch.Tensor, where: str | Mapping[str, Any] | None = None) -> None:
        """Raise :class:`NonFiniteError` (on every process) when ``loss`` is NaN/inf on any."""
        value = loss.detach().float().reshape(-1)
        finite = bool(torch.isfinite(value).all())
        if not self._on_any_process(not finite):
            return
        shown = "non-finite on another process" if finite else f"{value[~torch.isfinite(value)][0].item()}"
        raise NonFiniteError(
            f"{self.stage_name} {self._place(where)}: loss is {shown}; stopping before the "
            f"optimizer step. {self._advice()}"
        )

    def check_weights_finite(
        self, where: str | Mapping[str, Any] | None = None, when: str = "after the optimizer step"
    ) -> None:
        """Raise :class:`NonFiniteError` (on every process) naming how many trainable tensors
        hold a NaN/inf and the first one; call it after each optimizer step (manual
        optimisation: right after ``optimizer.step()``). ``where`` locates the step (default:
        the global step)."""
        finite = tensors_finite(self.trainable_parameters())
        if not self._on_any_process(not finite):
            return
        named = self.named_trainable_parameters()
        bad, total = nonfinite_parameters(named) if not finite else ([], len(named))
        first = bad[0] if bad else "on another process"
        raise NonFiniteError(
            f"{self.stage_name} {self._place(where)}: {len(bad)} of {total} trainable tensors "
            f"non-finite {when} (first: {first}). {self._advice()}"
        )

    def check_saved_finite(self, directory: str | Path) -> None:
        """Raise :class:`NonFiniteError` when a tensor saved under ``directory`` (safetensors,
        ``.pt``) holds a NaN/inf; call it before writing the stage marker."""
        bad, total = nonfinite_saved_tensors(directory)
        if bad:
            raise NonFiniteError(
                f"{self.stage_name}: {len(bad)} of {total} saved tensors non-finite (first: "
                f"{bad[0]}); the outputs are not written. {self._advice()}"
            )

    def on_before_backward(self, loss: torch.Tensor) -> None:
        if self.automatic_optimization:  # manual optimisation (PPO) checks its own losses
            self.check_loss_finite(loss)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.check_weights_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }

    def on_train_start(self) -> None:
        if self.metrics_before_fit and self.global_step == 0:
            for logger in self.trainer.loggers:
                logger.log_metrics(self.metrics_before_fit, step=0)

    def on_train_end(self) -> None:
        if self.output_dir is None or self.trainer.interrupted:
            return
        self.check_weights_finite(f"at the end of training (step {self.trainer.global_step})",
                                  when="before saving the outputs")
        consolidate_on_rank_zero(self)  # sharded (FSDP) runs: full weights on rank 0
        if self.trainer.is_global_zero:
            self.save_outputs(self.output_dir)
        self.trainer.strategy.barrier("rlhf-save-outputs")

    def save_outputs(self, output_dir: str) -> None:
        """Write the stage's final model to ``output_dir`` (rank zero only); call
        :meth:`check_saved_finite` on the files before writing the stage marker."""
        raise NotImplementedError

    def logged_metrics(self) -> dict[str, float]:
        """Last values of the logged metrics, as plain floats (for the stage marker)."""
        return {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if torch.is_tensor(v)
        }
