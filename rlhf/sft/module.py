"""Supervised fine-tuning on demonstrations: causal-LM loss on response tokens only."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rlhf.distributed import language_model, root_forward, shard_model
from rlhf.models.forward import (
    adapter_inputs_left_to_autocast,
    causal_lm_of,
    trunk_hidden,
)
from rlhf.models.loading import ModelSettings
from rlhf.outputs import atomic_directory, write_stage_marker
from rlhf.sft.loss import labelled_nll
from rlhf.stage import StageModule

log = logging.getLogger("rlhf.sft")


class SFTModule(StageModule):
    """Fine-tunes ``base`` (usually with LoRA) on a :class:`DemonstrationDataModule`.

    Logs ``train/loss``, ``train/tokens_per_s``, ``val/loss`` and ``val/perplexity`` (token-
    weighted over the whole validation set). When fitting ends it saves ``adapter/`` (LoRA
    only) and ``model/`` (merged weights + tokenizer, what the next stage loads) under
    ``output_dir``.

    Args:
        base: model settings; see :class:`rlhf.models.loading.ModelSettings`.
        merge_adapter: also save the adapter merged into the base as ``model/``.
        **kwargs: optimizer and output settings of :class:`rlhf.stage.StageModule`.
    """

    stage_label = "SFT"

    def __init__(
        self,
        base: ModelSettings,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_eps: float = 1e-8,
        output_dir: str | None = None,
        merge_adapter: bool = True,
    ) -> None:
        super().__init__(base, lr, weight_decay, warmup_steps, adam_eps, output_dir)
        self.save_hyperparameters()
        self.merge_adapter = merge_adapter
        self.model: torch.nn.Module | None = None
        self._val_sums = torch.zeros(2, dtype=torch.float64)  # summed nll, token count
        self._step_started = 0.0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.load_base_model()
        # from_pretrained returns eval mode and Lightning keeps module modes: train mode is
        # what makes dropout and gradient checkpointing act.
        self.model = model.train()
        shard_model(self, language_model(model), model)  # FSDP only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _nll(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response NLL and labelled-token count; the LM head runs on labelled
        positions only (:func:`rlhf.sft.loss.labelled_nll`)."""
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            hidden = trunk_hidden(self.model, batch["input_ids"], batch["attention_mask"])
        lm = causal_lm_of(self.model)
        return root_forward(lm, labelled_nll, hidden, batch["labels"], lm.get_output_embeddings())

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, n = self._nll(batch)
        loss = nll / n.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._step_started
        tokens = float(batch["attention_mask"].sum())
        self.log("train/tokens_per_s", tokens / max(seconds, 1e-9), batch_size=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, n = self._nll(batch)
        self._val_sums += torch.stack([nll.detach().double().cpu(), n.double().cpu()])

    def on_validation_epoch_start(self) -> None:
        self._val_sums.zero_()

    def on_validation_epoch_end(self) -> None:
        # Token-weighted over the whole validation set (and over processes).
        sums = self.trainer.strategy.reduce(self._val_sums.to(self.device), reduce_op="sum")
        if sums[1] > 0:
            loss = (sums[0] / sums[1]).float()
            self.log("val/loss", loss, prog_bar=True, sync_dist=False)
            self.log("val/perplexity", torch.exp(loss), sync_dist=False)

    def save_outputs(self, output_dir: str) -> None:
        """``adapter/`` (LoRA weights), ``model/`` (merged weights), tokenizer, marker."""
        info: dict[str, Any] = {
            "stage": "sft",
            "base": self.base.name_or_path,
            "metrics": self.logged_metrics(),
            "metrics_before_fit": self.metrics_before_fit,
        }
        with atomic_directory(output_dir) as tmp:
            model = self.model
            if self.base.lora:
                model.save_pretrained(tmp / "adapter")
                self.tokenizer.save_pretrained(tmp / "adapter")
                info["adapter_dir"] = "adapter"
                if self.merge_adapter and self.base.quantization:
                    log.warning("not merging the adapter into a quantized base; saved adapter only")
                    model = None
                elif self.merge_adapter:
                    self.model = model = model.merge_and_unload()
                else:
                    model = None
            if model is not None:
                model.save_pretrained(tmp / "model")
                self.tokenizer.save_pretrained(tmp / "model")
                info["model_dir"] = "model"
            self.check_saved_finite(tmp)
            write_stage_marker(tmp, info)
        log.info("saved SFT outputs to %s", output_dir)
