"""What the three stage modules share: model settings, optimizer, lean checkpoints, outputs."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch

from rlhf.distributed import consolidate_on_rank_zero
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

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

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
        consolidate_on_rank_zero(self)  # sharded (FSDP) runs: full weights on rank 0
        if self.trainer.is_global_zero:
            self.save_outputs(self.output_dir)
        self.trainer.strategy.barrier("rlhf-save-outputs")

    def save_outputs(self, output_dir: str) -> None:
        """Write the stage's final model to ``output_dir`` (rank zero only)."""
        raise NotImplementedError

    def logged_metrics(self) -> dict[str, float]:
        """Last values of the logged metrics, as plain floats (for the stage marker)."""
        return {
            k: float(v) for k, v in self.trainer.callback_metrics.items() if torch.is_tensor(v)
        }
