"""Reward-model stage: Bradley-Terry training on prompt groups of ranked completions."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torchmetrics import CatMetric, MeanMetric

from rlhf.distributed import shard_model
from rlhf.guards import NonFiniteError
from rlhf.models.forward import adapter_inputs_left_to_autocast
from rlhf.models.loading import ModelSettings
from rlhf.outputs import atomic_directory, write_stage_marker
from rlhf.rm.loss import bradley_terry_loss
from rlhf.rm.odin import length_decorrelation_loss, orthogonality_loss
from rlhf.rm.metrics import MeanMargin, PairwiseAccuracy, StdMetric
from rlhf.models.reward import RewardModel, text_hidden_size
from rlhf.stage import StageModule
from rlhf.tracking import log_histograms, wandb_loggers

log = logging.getLogger("rlhf.rm")

#: ODIN's batch statistics, logged per step and averaged over validation batches.
ODIN_STATS = ("quality_length_corr", "length_head_corr", "orthogonal_loss")


class RewardModule(StageModule):
    """Trains a :class:`RewardModel` on a :class:`~rlhf.data.ComparisonDataModule`.

    Each step scores every sequence of the batch once (all completions of each prompt group)
    and takes the Bradley-Terry loss over the batch's ordered pairs. Every dropout of the
    backbone is set to 0 (the backbone itself stays in train mode, so gradient checkpointing
    keeps working): dropout would make chosen and rejected scores noisy in different ways.

    Logs ``train/loss``, ``train/accuracy``, ``train/margin`` per step and ``val/loss``,
    ``val/accuracy``, ``val/margin``, ``val/reward_mean``, ``val/reward_std`` over the whole
    validation set; with a W&B logger attached also the histograms ``val/margin_hist`` (chosen
    minus rejected score per pair) and ``val/reward_hist`` (every sequence's score). When
    fitting ends it measures the score mean/std on (at most ``stats_max_rows`` sequences of)
    the training data and saves the model under ``output_dir`` (see
    :meth:`RewardModel.save_pretrained`) with a stage marker.

    Args:
        base: the SFT model to start from; with ``base.lora`` only LoRA and the score head
            train, without it the whole backbone trains (or, with ``base.train_top_layers``,
            its top blocks).
        margin_loss: subtract each pair's ``margin`` inside the sigmoid (Llama 2).
        center_coef: weight of the reward-centering term ``mean(r**2)`` (0 disables it).
        length_head: ODIN (:mod:`rlhf.rm.odin`): a second head that carries the length
            signal; the ranking loss is on the sum of the two heads, plus ``length_coef *
            (|corr(quality, length)| - corr(length head, length))`` and ``orthogonal_coef *
            |w_q . w_l|``. The saved RM's score is the quality head's (length-free); logs
            ``*/accuracy_total`` (the sum's), ``*/quality_length_corr``, ``*/length_head_corr``
            (``*/loss`` then includes the length terms, so it can be negative).
        length_coef, orthogonal_coef: the weights of those two terms.
        head_init_std: with ``length_head``, draw both heads' weights from N(0, std^2) and zero
            their biases; ``None`` keeps ``nn.Linear``'s default (uniform in +-1/sqrt(hidden)),
            whose scores start with a spread wider than a trained plain RM's.
        stats_max_rows: training sequences used for the saved score mean/std (``None``: all).
        **kwargs: optimizer and output settings of :class:`rlhf.stage.StageModule`.
    """

    stage_label = "RM"

    def __init__(
        self,
        base: ModelSettings,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_eps: float = 1e-8,
        output_dir: str | None = None,
        margin_loss: bool = False,
        center_coef: float = 0.0,
        length_head: bool = False,
        length_coef: float = 1.0,
        orthogonal_coef: float = 1.0,
        head_init_std: float | None = None,
        stats_max_rows: int | None = 2000,
    ) -> None:
        super().__init__(base, lr, weight_decay, warmup_steps, adam_eps, output_dir)
        for name, value in (("center_coef", center_coef), ("length_coef", length_coef),
                            ("orthogonal_coef", orthogonal_coef)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if head_init_std is not None and not (head_init_std > 0 and math.isfinite(head_init_std)):
            raise ValueError(f"head_init_std must be a finite number > 0 or None, got {head_init_std}")
        if head_init_std is not None and not length_head:
            raise ValueError("head_init_std applies to ODIN's two heads only: set length_head: true "
                             "(the plain RM's head starts at zero)")
        if stats_max_rows is not None and stats_max_rows < 2:
            raise ValueError(f"stats_max_rows must be >= 2 or None, got {stats_max_rows}")
        self.save_hyperparameters()
        self.margin_loss = margin_loss
        self.center_coef = center_coef
        self.length_head = length_head
        self.length_coef = length_coef
        self.orthogonal_coef = orthogonal_coef
        self.head_init_std = head_init_std
        self.stats_max_rows = stats_max_rows
        self.model: RewardModel | None = None
        self.train_accuracy = PairwiseAccuracy()
        self.train_margin = MeanMargin()
        self.val_loss = MeanMetric()
        self.val_accuracy = PairwiseAccuracy()
        self.val_margin = MeanMargin()
        self.val_reward_mean = MeanMetric()
        self.val_reward_std = StdMetric()
        # Every pair's margin and every score, kept only when a W&B logger wants histograms.
        self.val_margin_values = CatMetric()
        self.val_score_values = CatMetric()
        self.val_accuracy_total = PairwiseAccuracy()  # ODIN: the two heads' sum
        self.val_odin = torch.nn.ModuleDict({k: MeanMetric() for k in ODIN_STATS})
        self._histograms = False

    def configure_model(self) -> None:
        if self.model is not None:
            return
        backbone = self.load_base_model()
        # from_pretrained returns eval mode and Lightning keeps modules' modes; train mode is
        # needed for gradient checkpointing (dropout is 0 either way).
        if self.length_head and isinstance(getattr(self._trainer, "strategy", None), (FSDPStrategy, ModelParallelStrategy)):
            # The orthogonality term reads both heads' weights outside a forward: under FSDP
            # they are shards there. Not supported yet rather than silently wrong.
            raise ValueError("model.init_args.length_head (ODIN) does not run under FSDP yet; use DDP or one device")
        score_head, length_head = self._new_heads(backbone)
        self.model = RewardModel(backbone, score_head, length_head=length_head).train()
        shard_model(self, self.model, self.model)  # FSDP only

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores ``[n_seq]`` (fp32)."""
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            return self.model(input_ids, attention_mask)

    def _new_heads(self, backbone: torch.nn.Module) -> tuple[torch.nn.Linear | None, torch.nn.Linear | None]:
        """``(score head, length head)``: ``(None, None)`` (the RM's zero-initialised head)
        without ODIN; with it, two random heads (``head_init_std``), since a constant head has
        no correlation with length to steer."""
        if not self.length_head:
            return None, None
        hidden = text_hidden_size(backbone.config)
        heads = torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, 1)
        if self.head_init_std is not None:
            for head in heads:
                torch.nn.init.normal_(head.weight, std=self.head_init_std)
                torch.nn.init.zeros_(head.bias)
        return heads

    def _pairs(self, batch: dict[str, torch.Tensor]):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        margin = batch["margin"] if self.margin_loss else None
        if self.model.length_head is None:
            scores = self(ids, mask)
            chosen, rejected = scores[batch["chosen_index"]], scores[batch["rejected_index"]]
            loss, stats = bradley_terry_loss(chosen, rejected, margin, self.center_coef, scores)
            return scores, chosen, rejected, loss, stats
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            scores, length_scores = self.model.head_scores(ids, mask)
        total = scores + length_scores
        c, r = batch["chosen_index"], batch["rejected_index"]
        loss, stats = bradley_terry_loss(total[c], total[r], margin, self.center_coef, total)
        if "prompt_length" not in batch:
            raise ValueError("ODIN (length_head) needs each row's prompt_length in the batch, as "
                             "rlhf.data.ComparisonDataModule's collator gives it")
        lengths = mask.sum(dim=1) - batch["prompt_length"].to(mask.device)
        decorrelation, odin = length_decorrelation_loss(scores, length_scores, lengths)
        orthogonal = orthogonality_loss(self.model.score_head.weight, self.model.length_head.weight)
        loss = loss + self.length_coef * decorrelation + self.orthogonal_coef * orthogonal
        stats.update(odin, orthogonal_loss=orthogonal.detach(), chosen_total=total[c].detach(),
                     rejected_total=total[r].detach())
        return scores, scores[c], scores[r], loss, stats

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        scores, chosen, rejected, loss, stats = self._pairs(batch)
        n_pairs = chosen.shape[0]
        self.train_accuracy(chosen, rejected)
        self.train_margin(chosen, rejected)
        self.log("train/loss", loss, prog_bar=True, batch_size=n_pairs)
        self.log("train/accuracy", self.train_accuracy, on_step=True, on_epoch=False)
        self.log("train/margin", self.train_margin, on_step=True, on_epoch=False)
        if self.center_coef:
            self.log("train/center_loss", stats["center_loss"], batch_size=scores.shape[0])
        if "chosen_total" in stats:
            total_accuracy = (stats["chosen_total"] > stats["rejected_total"]).float().mean()
            self.log("train/accuracy_total", total_accuracy, batch_size=n_pairs)
            for k in ODIN_STATS:
                self.log(f"train/{k}", stats[k], batch_size=scores.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        scores, chosen, rejected, loss, stats = self._pairs(batch)
        if "chosen_total" in stats:
            self.val_accuracy_total.update(stats["chosen_total"], stats["rejected_total"])
            self.log("val/accuracy_total", self.val_accuracy_total, on_step=False, on_epoch=True)
            for k, metric in self.val_odin.items():
                metric.update(stats[k], weight=scores.shape[0])
                self.log(f"val/{k}", metric, on_step=False, on_epoch=True)
        self.val_loss.update(loss.detach(), weight=chosen.shape[0])
        self.val_accuracy.update(chosen, rejected)
        self.val_margin.update(chosen, rejected)
        self.val_reward_mean.update(scores.detach())
        self.val_reward_std.update(scores)
        if self._histograms:
            self.val_margin_values.update((chosen - rejected).detach().float())
            self.val_score_values.update(scores.detach().float())
        # Metric objects: Lightning computes them over the epoch (and processes), then resets.
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True)
        self.log("val/accuracy", self.val_accuracy, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/margin", self.val_margin, on_step=False, on_epoch=True)
        self.log("val/reward_mean", self.val_reward_mean, on_step=False, on_epoch=True)
        self.log("val/reward_std", self.val_reward_std, on_step=False, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._histograms = bool(wandb_loggers(self.trainer))

    def on_validation_epoch_end(self) -> None:
        if not self._histograms or self.val_margin_values.update_count == 0:
            return
        values = {
            "val/margin_hist": self.val_margin_values.compute(),  # gathers across processes
            "val/reward_hist": self.val_score_values.compute(),
        }
        self.val_margin_values.reset()
        self.val_score_values.reset()
        if self.trainer.is_global_zero:
            log_histograms(wandb_loggers(self.trainer), values, step=self.trainer.global_step)

    # -- outputs ---------------------------------------------------------------------------
    def _forward_context(self):
        plugin = getattr(self.trainer, "precision_plugin", None)
        return plugin.forward_context() if plugin is not None else contextlib.nullcontext()

    @torch.no_grad()
    def score_statistics(self, loader: Any, max_rows: int | None = None) -> dict[str, float]:
        """Mean and sample std of the scores of (at most ``max_rows``) sequences of ``loader``."""
        # Local to this process (rank 0 alone runs this when saving): no cross-process sync.
        std = StdMetric(sync_on_compute=False).to(self.device)
        mean = MeanMetric(sync_on_compute=False).to(self.device)
        rows = 0
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in loader:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                if max_rows is not None:
                    ids, mask = ids[: max_rows - rows], mask[: max_rows - rows]
                with self._forward_context():
                    scores = self(ids.to(self.device), mask.to(self.device))
                std.update(scores)
                mean.update(scores)
                rows += scores.shape[0]
                if max_rows is not None and rows >= max_rows:
                    break
        finally:
            self.model.train(was_training)
        return {"score_mean": float(mean.compute()), "score_std": float(std.compute()), "rows": rows}

    def _data_settings(self) -> dict[str, Any]:
        """How the training data was formatted, so scoring can format prompts the same way."""
        data = getattr(self.trainer, "datamodule", None)
        if data is None:
            return {}
        formatter = getattr(data, "formatter", None)
        return {
            "use_chat_template": getattr(formatter, "use_chat_template", data.use_chat_template),
            "system_prompt": data.system_prompt,
            "max_length": data.max_length,
            "max_prompt_length": data.max_prompt_length,
            "long_prompts": getattr(data, "long_prompts", "truncate"),
        }

    def save_outputs(self, output_dir: str) -> None:
        """``model/`` (+ ``adapter/`` with LoRA), score head, ``reward_model.json``, marker."""
        stats: dict[str, Any] = {}
        data = getattr(self.trainer, "datamodule", None)
        if data is not None and getattr(data, "train_dataset", None):
            stats = self.score_statistics(data.train_dataloader(), self.stats_max_rows)
            if not (math.isfinite(stats["score_mean"]) and math.isfinite(stats["score_std"])):
                raise NonFiniteError(
                    f"RM: training scores have mean {stats['score_mean']} and std "
                    f"{stats['score_std']}; the outputs are not written. {self._advice()}"
                )
            self.model.score_mean, self.model.score_std = stats["score_mean"], stats["score_std"]
            log.info("training scores: mean %.4f, std %.4f over %d sequences",
                     stats["score_mean"], stats["score_std"], stats["rows"])
        else:
            log.warning("no training data to measure score statistics on; saving mean 0, std 1")
        metrics = self.logged_metrics()
        info: dict[str, Any] = {
            "stage": "rm",
            "base": self.base.name_or_path,
            "metrics": metrics,
            "metrics_before_fit": self.metrics_before_fit,
            "val_accuracy": metrics.get("val/accuracy"),
            "global_step": int(self.trainer.global_step),
            "score_stats_rows": stats.get("rows", 0),
        }
        with atomic_directory(output_dir) as tmp:
            saved = self.model.save_pretrained(
                tmp, tokenizer=self.tokenizer, merge=True, extra={"data": self._data_settings()}
            )
            info.update({k: saved[k] for k in ("model_dir", "adapter_dir", "score_mean", "score_std")})
            self.check_saved_finite(tmp)
            write_stage_marker(tmp, info)
        log.info("saved reward model to %s", output_dir)
