"""Direct preference optimisation: a LoRA policy trained on preference pairs against its base.

The policy is a LoRA adapter on ``base`` (the merged SFT model); the reference is the same
base with the adapter disabled (``disable_adapter()``), so one set of base weights serves both
and the reference costs one no-grad forward per step, not a second model in memory.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torchmetrics import MeanMetric, SumMetric

from rlhf.distributed import shard_model
from rlhf.dpo.batch import identical_pairs, response_mask
from rlhf.dpo.losses import LossType, preference_loss
from rlhf.masks import masked_sum
from rlhf.models.forward import adapter_inputs_left_to_autocast, disable_dropout
from rlhf.models.loading import ModelSettings, save_merged_model
from rlhf.models.logprobs import sequence_logprobs
from rlhf.outputs import atomic_directory, write_stage_marker
from rlhf.stage import StageModule

log = logging.getLogger("rlhf.dpo")

#: Per-pair statistics logged as ``train/<name>`` each step and ``val/<name>`` over the whole
#: validation set (``length_rule_accuracy``: validation only).
PAIR_STATS = ("loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "logp_chosen", "logp_rejected")
VAL_STATS = (*PAIR_STATS, "length_rule_accuracy")


class DPOModule(StageModule):
    """Trains a LoRA policy on a :class:`~rlhf.dpo.DPODataModule` (or a plain
    :class:`~rlhf.data.ComparisonDataModule`) with the DPO, cDPO or IPO loss.

    Each step scores every sequence of the batch once under the reference (adapter off, no
    grad) and once under the policy, sums the per-token log-probs (temperature 1) over each
    response's tokens, and takes the loss over the batch's ordered pairs. Dropout is off, so
    both passes are deterministic. Pairs whose chosen and rejected token ids are identical
    (e.g. after truncation) are skipped and counted (``train/skipped_pairs``, a running
    total; ``val/skipped_pairs``), never trained on.

    Logs ``train/{loss, reward_chosen, reward_rejected, margin, accuracy, logp_chosen,
    logp_rejected}`` per step and the same under ``val/`` over the whole validation set, plus
    ``val/length_rule_accuracy`` (the accuracy of "the longer response wins", a coin flip on
    equal lengths, which truncation makes common: the baseline the implicit reward's accuracy
    should beat). Rewards are the implicit rewards
    ``beta * (log pi - log pi_ref)`` of the summed log-probs. When fitting ends it saves
    ``adapter/`` (LoRA), ``model/`` (merged into a fresh copy of the base; not for a quantized
    base) and the stage marker under ``output_dir``.

    Args:
        base: the SFT model (merged) with ``base.lora`` set: the policy's adapter.
        beta: inverse temperature of the implicit reward (IPO: its ``tau``).
        loss_type: ``"sigmoid"`` (DPO, or cDPO with ``label_smoothing`` > 0) or ``"ipo"``
            (per-token-averaged log-probs; see :func:`rlhf.dpo.losses.preference_loss`).
        label_smoothing: cDPO's label-noise rate in ``[0, 0.5)``.
        **kwargs: optimizer and output settings of :class:`rlhf.stage.StageModule`.
    """

    def __init__(
        self,
        base: ModelSettings,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_eps: float = 1e-8,
        output_dir: str | None = None,
        beta: float = 0.1,
        loss_type: LossType = "sigmoid",
        label_smoothing: float = 0.0,
    ) -> None:
        if base.lora is None:
            raise ValueError(
                "DPO needs model.init_args.base.lora: the policy is a LoRA adapter and the "
                "reference is the same base with the adapter disabled (e.g. base.lora: {r: 16, alpha: 32})"
            )
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if loss_type == "ipo" and label_smoothing:
            raise ValueError("label_smoothing (cDPO) is for loss_type 'sigmoid', not 'ipo'")
        super().__init__(base, lr, weight_decay, warmup_steps, adam_eps, output_dir)
        self.save_hyperparameters()
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.model: torch.nn.Module | None = None
        self.skipped_pairs = 0  # training pairs skipped as identical, over the whole run
        self.val_means = torch.nn.ModuleDict({name: MeanMetric() for name in VAL_STATS})
        self.val_skipped = SumMetric()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.load_base_model()
        disable_dropout(model)
        # Train mode (dropout is off either way) keeps gradient checkpointing active.
        self.model = model.train()
        shard_model(self, model.get_base_model(), model)  # FSDP only

    # -- log-probs ---------------------------------------------------------------------------
    def summed_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """``[N]`` log-probs of each row's response tokens (``mask`` ``[N, T]``) under the model
        as it is now (adapter on or off), summed; the LM head runs from the first response column."""
        columns = mask.any(dim=0).nonzero()
        if columns.numel() == 0:
            return torch.zeros(input_ids.shape[0], device=input_ids.device)
        start = max(1, int(columns[0]))
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            logp, _ = sequence_logprobs(self.model, input_ids, attention_mask, start, 1.0)
        return masked_sum(logp, mask[:, start:], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Policy log-probs ``[N]`` of the responses (``mask`` ``[N, T]``)."""
        return self.summed_logprobs(input_ids, attention_mask, mask)

    @torch.no_grad()
    def reference_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Reference log-probs ``[N]``: the same weights with the adapter disabled."""
        with self.model.disable_adapter():
            return self.summed_logprobs(input_ids, attention_mask, mask)

    # -- loss ----------------------------------------------------------------------------------
    def pair_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], int, int]:
        """``(loss, stats, pairs, skipped)`` over the batch's pairs; ``loss`` is ``None`` (and
        nothing is computed) when every pair is skipped as identical."""
        skip = identical_pairs(batch)
        skipped = int(skip.sum())
        keep = ~skip
        chosen, rejected = batch["chosen_index"][keep], batch["rejected_index"][keep]
        if chosen.numel() == 0:
            return None, {}, 0, skipped
        ids, attention = batch["input_ids"], batch["attention_mask"]
        mask = response_mask(batch)
        reference = self.reference_logprobs(ids, attention, mask)  # first: no activations kept yet
        policy = self(ids, attention, mask)
        lengths = mask.sum(dim=1)
        loss, stats = preference_loss(
            policy[chosen], policy[rejected], reference[chosen], reference[rejected],
            self.beta, self.loss_type, self.label_smoothing, lengths[chosen], lengths[rejected],
        )
        stats["logp_chosen"] = policy[chosen].detach().mean()
        stats["logp_rejected"] = policy[rejected].detach().mean()
        longer, tie = lengths[chosen] > lengths[rejected], lengths[chosen] == lengths[rejected]
        stats["length_rule_accuracy"] = (longer.float() + 0.5 * tie.float()).mean()
        return loss, stats, int(chosen.numel()), skipped

    def _note_skipped(self, skipped: int, where: str) -> None:
        if skipped:
            log.warning(
                "%s: skipped %d pair(s) whose chosen and rejected token ids are identical "
                "(after truncation: raise data.init_args.max_length to keep them)", where, skipped
            )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss, stats, pairs, skipped = self.pair_loss(batch)
        self.skipped_pairs += skipped
        self._note_skipped(skipped, f"training step {self.global_step}")
        self.log("train/skipped_pairs", float(self.skipped_pairs), batch_size=1)
        if loss is None:
            return None  # nothing to learn from this batch: Lightning skips the update
        for name in PAIR_STATS:
            self.log(f"train/{name}", stats[name], prog_bar=name in ("loss", "accuracy"), batch_size=pairs)
        return loss

    # -- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, stats, pairs, skipped = self.pair_loss(batch)
        self._note_skipped(skipped, "validation")
        self.val_skipped.update(torch.tensor(float(skipped), device=self.device))
        self.log("val/skipped_pairs", self.val_skipped, on_step=False, on_epoch=True)
        if not pairs:
            return
        for name in VAL_STATS:
            metric = self.val_means[name]
            metric.update(stats[name], weight=pairs)  # a per-pair mean over the whole set
            self.log(f"val/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "accuracy")

    # -- checkpoints and outputs ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo"] = {"skipped_pairs": self.skipped_pairs}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_pairs = int(checkpoint.get("dpo", {}).get("skipped_pairs", 0))

    def save_outputs(self, output_dir: str) -> None:
        """``adapter/`` (LoRA + tokenizer), ``model/`` (merged + tokenizer), the stage marker."""

        metrics = self.logged_metrics()
        info: dict[str, Any] = {
            "stage": "dpo",
            "base": self.base.name_or_path,
            "loss_type": self.loss_type,
            "beta": self.beta,
            "label_smoothing": self.label_smoothing,
            "global_step": int(self.trainer.global_step),
            "skipped_pairs": self.skipped_pairs,
            "val_accuracy": metrics.get("val/accuracy"),
            "metrics": metrics,
            "metrics_before_fit": self.metrics_before_fit,
        }
        with atomic_directory(output_dir) as tmp:
            self.model.save_pretrained(tmp / "adapter")
            self.tokenizer.save_pretrained(tmp / "adapter")
            info["adapter_dir"] = "adapter"
            if self.base.quantization:
                log.warning("not merging the adapter into a quantized base; saved the adapter only")
            else:
                save_merged_model(self.base, tmp / "adapter", self.tokenizer, tmp / "model")
                info["model_dir"] = "model"
            self.check_saved_finite(tmp)
            write_stage_marker(tmp, info)
        log.info("saved DPO outputs to %s", output_dir)
