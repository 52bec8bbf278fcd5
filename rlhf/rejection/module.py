"""Rejection-sampling fine-tuning: RAFT and ReST as two settings of one module.

One ``training_step`` is one round on one batch of prompts (``data.batch_size`` prompts a
round; a fresh batch each round):

1. sample ``samples_per_prompt`` responses per prompt from the current policy (a LoRA adapter
   on the frozen SFT model), stopping at EOS;
2. without grad: score each sequence (a saved reward model, or a gold function on the decoded
   response) and its KL to the reference, the same weights under ``disable_adapter()``;
3. select (:mod:`rlhf.rejection.selection`): ``raft`` keeps each prompt's best sample, ``rest``
   every sample at or above the round's threshold (a rising schedule);
4. ``sft_epochs`` passes of shuffled minibatches over the kept sequences: the NLL of their
   response tokens (temperature 1, prompt tokens carry no loss), one optimizer step a minibatch.

A whole round is one step so that its selection sees all of its scores (ReST's quantile is over
the round) and checkpoints fall between rounds. A round that keeps nothing makes no update; it
is logged and counted (``rejection/skipped_rounds``). A round's ``reward/*``, ``kl/mean`` and
``response/*`` describe its samples, i.e. the policy before that round's update; scores are raw
(the RM's own units, also for fixed ReST thresholds). Checkpoints carry the round counter and
the ReST threshold; the LR schedule steps once per round (``warmup_steps`` counts rounds).
Single-process (a multi-process run is refused in ``setup``): under DDP the ranks' kept counts,
hence their optimizer steps, could differ.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
from torch import nn

from rlhf.distributed import shard_model
from rlhf.generation import (
    SamplingSettings,
    Scorer,
    assemble_sequences,
    sample_responses,
)
from rlhf.guards import gradients_finite
from rlhf.masks import masked_sum
from rlhf.models.forward import (
    adapter_inputs_left_to_autocast,
    disable_dropout,
)
from rlhf.models.loading import ModelSettings
from rlhf.models.logprobs import sequence_logprobs
from rlhf.rejection.outputs import ADAPTER, save_rejection_outputs
from rlhf.rejection.samples import Samples, round_metrics
from rlhf.rejection.selection import (
    check_schedule,
    eligible,
    select_above,
    select_best,
    threshold_for_round,
)
from rlhf.stage import StageModule
from rlhf.timing import phase, timed

torch.serialization.add_safe_globals([SamplingSettings])

log = logging.getLogger("rlhf.rejection")

DEFAULT_QUANTILES = [0.5, 0.75, 0.9]


class RejectionSamplingModule(StageModule):
    """RAFT / ReST on a LoRA policy over a frozen SFT base (manual optimization).

    Args:
        base: the SFT model (merged); ``base.lora`` configures the policy adapter (required).
        mode: ``raft`` (best of ``samples_per_prompt`` per prompt) or ``rest`` (all samples at
            or above the round's threshold).
        reward_model: a reward-model stage output that scores the samples.
        share_base: load a LoRA reward model as an adapter on the policy's base when it was
            trained on that same base (one copy of the weights).
        gold: a gold function (:data:`rlhf.gold.GOLD_FUNCTIONS`, e.g. ``vader``) of the decoded
            response: the score when ``reward_model`` is unset, else logged as ``gold/mean``.
            Neither set requires a ``scorer`` attribute set before fitting (tests).
        sampling: how responses are sampled (its temperature also scales the logged KL).
        samples_per_prompt: responses per prompt each round (``K``).
        rounds: rounds to run (one prompt batch each).
        quantiles: ReST: the threshold of round ``r`` is this quantile of the round's scores
            (entry ``r``, the last one past the end); default ``[0.5, 0.75, 0.9]``.
        thresholds: ReST: fixed thresholds per round in the score's units, instead of quantiles.
            Either schedule must not decrease, and the threshold never falls below the
            previous round's.
        require_eos: keep only responses that ended with EOS (truncated ones never qualify).
        sft_epochs: passes over the kept sequences each round.
        minibatch_size: kept sequences per optimizer step.
        micro_batch_size: sequences per forward/backward (``None``: the minibatch).
        generation_batch_size: sequences sampled and scored per call (``None``: all at once).
        max_grad_norm: gradient clipping norm (``None`` disables).
        lr, weight_decay, warmup_steps, adam_eps, output_dir: see :class:`StageModule`.
    """

    def __init__(
        self,
        base: ModelSettings,
        mode: Literal["raft", "rest"] = "raft",
        reward_model: str | None = None,
        share_base: bool = True,
        gold: str | None = None,
        sampling: SamplingSettings | None = None,
        samples_per_prompt: int = 4,
        rounds: int = 4,
        quantiles: list[float] | None = None,
        thresholds: list[float] | None = None,
        require_eos: bool = False,
        sft_epochs: int = 2,
        minibatch_size: int = 8,
        micro_batch_size: int | None = None,
        generation_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_eps: float = 1e-8,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(base, lr, weight_decay, warmup_steps, adam_eps, output_dir)
        if base.lora is None:
            raise ValueError("rejection sampling trains a LoRA policy: set model.init_args.base.lora "
                             "(e.g. {r: 16, alpha: 32})")
        if mode == "raft" and samples_per_prompt < 2:
            raise ValueError("mode raft keeps the best of samples_per_prompt: set it >= 2")
        if mode == "raft" and (quantiles is not None or thresholds is not None):
            raise ValueError("quantiles and thresholds are ReST's threshold schedule: set mode: rest")
        if mode == "rest" and quantiles is not None and thresholds is not None:
            raise ValueError("set one ReST schedule: quantiles or thresholds, not both")
        if mode == "rest" and thresholds is None:
            quantiles = list(quantiles or DEFAULT_QUANTILES)
            check_schedule(quantiles, "quantiles", 0.0, 1.0)
        if thresholds is not None:
            check_schedule(thresholds, "thresholds")
        for name, value in [("samples_per_prompt", samples_per_prompt), ("rounds", rounds),
                            ("sft_epochs", sft_epochs), ("minibatch_size", minibatch_size)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if gold is not None:
            from rlhf.gold import gold_function

            gold_function(gold)  # unknown names fail at construction
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.mode = mode
        self.reward_model, self.share_base, self.gold = reward_model, share_base, gold
        self.sampling = sampling or SamplingSettings()
        self.samples_per_prompt, self.rounds = samples_per_prompt, rounds
        self.quantiles, self.thresholds = quantiles, thresholds
        self.require_eos = require_eos
        self.sft_epochs, self.minibatch_size = sft_epochs, minibatch_size
        self.micro_batch_size = micro_batch_size or minibatch_size
        self.generation_batch_size = generation_batch_size
        self.max_grad_norm = max_grad_norm
        self.model: nn.Module | None = None
        self.scorer: Scorer | None = None
        self.round = 0
        self.threshold: float | None = None  # ReST: the last round's threshold (the floor)
        self.skipped_rounds = 0
        self.nonfinite_steps = 0

    # -- models ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.load_base_model(adapter_name=ADAPTER)
        if self.scorer is None and self.reward_model is not None:
            from rlhf.models.scorers import load_scorer

            self.scorer, _, _ = load_scorer(self.reward_model, self.share_base, self.model, self.base, self.tokenizer)
        disable_dropout(self.model)  # sampling, scoring and the update see one policy
        shard_model(self, self.model.get_base_model(), self.model)

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self._trainer.world_size > 1:
            raise ValueError(
                f"rejection sampling runs on one process (this run has {self._trainer.world_size}): the "
                "processes would keep different numbers of samples, take different numbers of optimizer "
                "steps and wait on each other until the collective timeout; set trainer.devices: 1 and "
                "trainer.num_nodes: 1"
            )
        super().setup(stage)
        if stage not in ("fit", "validate") or self.scorer is not None:
            return
        if self.reward_model is None and self.gold is None:
            raise ValueError("no reward: set model.init_args.reward_model (a reward-model stage output) "
                             "or model.init_args.gold (a gold function, e.g. vader)")
        if self.reward_model is not None:
            from rlhf.models.scorers import check_reward_model

            check_reward_model(self.reward_model, "model.init_args.reward_model")

    def sequence_budget(self) -> tuple[int, str] | None:
        """Prompt (left-truncated to ``max_prompt_length``) plus ``max_new_tokens``."""
        prompt = getattr(getattr(self.trainer, "datamodule", None), "max_prompt_length", None)
        if not prompt:
            return None
        new = self.sampling.max_new_tokens
        return prompt + new, (f"data.init_args.max_prompt_length ({prompt}) + "
                              f"model.init_args.sampling.max_new_tokens ({new})")

    @staticmethod
    def _is_trained(name: str) -> bool:
        return f".{ADAPTER}." in name  # the policy's LoRA weights, not a shared reward adapter

    def trainable_parameters(self) -> list[nn.Parameter]:
        # By name: set_adapter() (a shared reward adapter) toggles requires_grad per adapter.
        return [p for name, p in self.named_parameters() if self._is_trained(name)]

    def total_steps(self) -> int:
        return self.rounds  # the LR schedule steps once per round

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {name for name, _ in self.named_parameters() if self._is_trained(name)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["rejection"] = {"round": self.round, "threshold": self.threshold,
                                   "skipped_rounds": self.skipped_rounds, "nonfinite_steps": self.nonfinite_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("rejection", {})
        self.round = int(state.get("round", 0))
        self.threshold = state.get("threshold")
        self.skipped_rounds = int(state.get("skipped_rounds", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))

    # -- sampling and scoring ----------------------------------------------------------------
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, responses: list[list[int]]) -> torch.Tensor:
        """Scores ``[B]`` of whole sequences ``[B, T]``: the scorer's, else the gold function's
        on the decoded ``responses``."""
        if self.scorer is not None:
            return self.scorer(input_ids, attention_mask).float()
        return torch.tensor(self.gold_scores(responses), dtype=torch.float32, device=input_ids.device)

    def gold_scores(self, responses: list[list[int]]) -> list[float]:
        from rlhf.gold import gold_function

        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        return gold_function(self.gold)(texts)

    @torch.no_grad()
    def response_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Log-probs ``[B, R]`` of the responses under the current policy (sampling temperature)."""
        return sequence_logprobs(self.model, input_ids, attention_mask, start, self.sampling.temperature)[0]

    @torch.no_grad()
    def sample_chunk(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Samples:
        """Sample one response per left-padded prompt row ``[B, P]``; score it; its KL."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        responses = sample_responses(self.model, prompt_ids, prompt_mask, self.sampling, eos, pad)
        ids, mask, response_mask, has_eos = assemble_sequences(prompt_ids, prompt_mask, responses, eos, pad)
        start = prompt_ids.shape[1]
        samples = Samples(ids, mask, start, response_mask, has_eos, torch.empty(0), torch.empty(0))
        with phase("reward"):
            samples.scores = self.score(ids, mask, [samples.response_ids(i) for i in range(len(samples))])
        with phase("reference"):
            logp = self.response_logprobs(ids, mask, start)
            with self.model.disable_adapter():
                ref = self.response_logprobs(ids, mask, start)
        samples.kl = masked_sum((logp - ref).float(), response_mask, dim=1)
        return samples

    @timed("rollout")
    @torch.no_grad()
    def collect(self, batch: dict[str, torch.Tensor], k: int) -> Samples:
        """``k`` samples per prompt of ``batch`` (``[B, P]``, left-padded): ``B * k`` rows, a
        prompt's ``k`` contiguous, sampled and scored ``generation_batch_size`` at a time."""
        self.model.eval()
        ids = batch["input_ids"].repeat_interleave(k, dim=0)
        mask = batch["attention_mask"].repeat_interleave(k, dim=0)
        chunk = self.generation_batch_size or len(ids)
        parts = [self.sample_chunk(ids[i : i + chunk], mask[i : i + chunk]) for i in range(0, len(ids), chunk)]
        return Samples.cat(parts, self.tokenizer.pad_token_id)

    # -- selection and update ----------------------------------------------------------------
    def select(self, samples: Samples) -> tuple[torch.Tensor, float | None]:
        """This round's kept indices ``[n_kept]`` and (ReST) threshold."""
        valid = samples.has_eos if self.require_eos else None
        if self.mode == "raft":
            return select_best(samples.scores, self.samples_per_prompt, valid), None
        ok = eligible(samples.scores, valid)
        threshold = threshold_for_round(samples.scores[ok], self.round, self.quantiles, self.thresholds, self.threshold)
        if math.isfinite(threshold):
            self.threshold = threshold
        return select_above(samples.scores, threshold, valid), threshold

    def response_nll(self, s: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL of the response tokens of ``s`` (temperature 1) and their count."""
        s = s.trimmed()
        logp, _ = sequence_logprobs(self.model, s.input_ids, s.attention_mask, s.response_start, 1.0)
        return -masked_sum(logp, s.response_mask), s.response_mask.sum()

    def minibatch_step(self, kept: Samples, index: torch.Tensor) -> float | None:
        """One optimizer step on the token-mean response NLL of ``kept[index]`` (gradients
        accumulated over micro-batches); ``None`` when the loss or gradient was not finite
        (the step is skipped and counted)."""
        optimizer = self.optimizers()
        tokens = kept.select(index).lengths.sum().clamp(min=1)
        total = 0.0
        for lo in range(0, len(index), self.micro_batch_size):
            nll, _ = self.response_nll(kept.select(index[lo : lo + self.micro_batch_size]))
            loss = nll / tokens
            self.manual_backward(loss)
            total += float(loss.detach())
        if not math.isfinite(total) or not gradients_finite(self.trainable_parameters()):
            optimizer.zero_grad(set_to_none=True)
            self.nonfinite_steps += 1
            log.warning("skipped a non-finite update in round %d (%d so far)", self.round, self.nonfinite_steps)
            return None
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        optimizer.step()
        self.check_weights_finite({"round": self.round})
        optimizer.zero_grad(set_to_none=True)
        return total

    @timed("update")
    def finetune(self, kept: Samples) -> dict[str, float]:
        """``sft_epochs`` passes of shuffled minibatches over ``kept``; the mean loss and steps."""
        self.model.train()
        losses = []
        for _ in range(self.sft_epochs):
            order = torch.randperm(len(kept), device=kept.input_ids.device)
            for lo in range(0, len(kept), self.minibatch_size):
                loss = self.minibatch_step(kept, order[lo : lo + self.minibatch_size])
                if loss is not None:
                    losses.append(loss)
        self.model.eval()
        stats = {"train/steps": float(len(losses))}
        if losses:
            stats["train/loss"] = sum(losses) / len(losses)
        return stats

    # -- Lightning hooks ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            samples = self.collect(batch, self.samples_per_prompt)
            index, threshold = self.select(samples)
            kept = samples.select(index)
            stats = self.finetune(kept) if len(kept) else {}
        if not len(kept):
            self.skipped_rounds += 1
            log.warning("round %d kept no sample (threshold %s): no update (%d such rounds)",
                        self.round, threshold, self.skipped_rounds)
        metrics = {**round_metrics(samples, kept), **stats,
                   "rejection/kept": float(len(kept)),
                   "rejection/skipped_rounds": float(self.skipped_rounds),
                   "nonfinite/skipped_total": float(self.nonfinite_steps),
                   "round": float(self.round),
                   "lr": self.lr_schedulers().get_last_lr()[0]}
        if threshold is not None:
            metrics["rejection/threshold"] = threshold
        if self.gold is not None and self.scorer is not None:
            gold = self.gold_scores([samples.response_ids(i) for i in range(len(samples))])
            metrics["gold/mean"] = sum(gold) / max(1, len(gold))
        self.log_dict(metrics, batch_size=len(samples))
        self.log("reward", metrics["reward/mean"], prog_bar=True, logger=False, batch_size=len(samples))
        self.log("kept", metrics["rejection/kept_frac"], prog_bar=True, logger=False, batch_size=len(samples))
        self.lr_schedulers().step()
        self.round += 1
        if self.round >= self.rounds:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """One sample per held-out prompt: ``val/reward/mean``, ``val/kl/mean``, ``val/response/length``."""
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            samples = self.collect(batch, 1)
        metrics = round_metrics(samples, samples, prefix="val/")
        for key in ("val/reward/mean", "val/kl/mean", "val/response/length", "val/response/eos_frac"):
            self.log(key, metrics[key], batch_size=len(samples), prog_bar=key == "val/reward/mean")

    # -- outputs -----------------------------------------------------------------------------
    def save_outputs(self, output_dir: str) -> None:
        """``adapter/`` (policy LoRA), ``model/`` (merged policy), marker."""
        save_rejection_outputs(self, output_dir)
