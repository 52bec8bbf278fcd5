"""PPO with an in-loop rollout buffer: one ``training_step`` is one PPO iteration.

Per iteration (CleanRL-style, every step visible here):
1. sample ``samples_per_prompt`` responses per prompt from the policy (LoRA adapter on the
   frozen SFT model), stopping at EOS;
2. without grad: old log-probs and values (policy), reference log-probs (same model under
   ``disable_adapter()``: no second copy of the weights), and reward-model scores;
3. shape scores (normalise, clip, missing-EOS penalty), per-token reward ``-beta * KL_t`` plus
   the score on the last token, then GAE (or RLOO / GRPO sequence advantages);
4. ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss, clipped value loss,
   entropy bonus, gradient clipping, optional early stop on approximate KL;
5. update the KL controller and log the metrics.

A minibatch update with non-finite rewards, advantages, returns, loss or gradient is skipped
and counted (``nonfinite/skipped``); ``update.max_nonfinite_steps`` such updates in a row stop
the run (:mod:`rlhf.guards`). Checkpoints carry the KL controller, the iteration and these
counts; RNG, data position and logger identity are :mod:`rlhf.resume`'s.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from torch import nn

from rlhf.data.records import conversation_text
from rlhf.distributed import shard_model
from rlhf.models.forward import adapter_inputs_left_to_autocast, causal_lm_of, disable_dropout
from rlhf.models.loading import ModelSettings, apply_lora, load_causal_lm
from rlhf.outputs import atomic_directory, atomic_file, write_stage_marker
from rlhf.ppo.advantages import (
    best_of_n_indices,
    explained_variance,
    gae,
    grpo_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
)
from rlhf.generation import SamplingSettings, Scorer, assemble_sequences, sample_and_record, sample_responses
from rlhf.guards import NonFiniteGuard, gradients_finite, join_names, nonfinite_names
from rlhf.masks import masked_mean, masked_sum, masked_whiten
from rlhf.models.forward import trunk_hidden
from rlhf.models.logprobs import response_logprobs
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate, per_token_rewards
from rlhf.ppo.losses import policy_loss, value_loss
from rlhf.ppo.rollout import Rollout
from rlhf.ppo.settings import KLSettings, RewardSettings, UpdateSettings
from rlhf.timing import phase, timed
from rlhf.stage import StageModule

log = logging.getLogger("rlhf.ppo")

# Hyperparameters hold these dataclasses; let weights-only checkpoint loading read them.
torch.serialization.add_safe_globals([RewardSettings, SamplingSettings, KLSettings, UpdateSettings])

POLICY = "policy"
VALUE = "value"
SAMPLES_FILE = "samples.jsonl"


def drop_samples_from(path: Path, iteration: int) -> None:
    """Remove the rows of iteration ``iteration`` and later from a ``samples.jsonl`` (a resumed
    run makes them again)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("iteration", 0) < iteration]
    if len(kept) != len(lines):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(kept))


class PPOModule(StageModule):
    """RLHF-PPO on a LoRA policy over a frozen SFT base (manual optimization).

    Args:
        base: the SFT model (merged). ``base.lora`` configures the policy adapter (required).
        reward: the reward model and score shaping; ``None`` requires a ``scorer`` attribute
            to be set before fitting (tests, custom reward functions).
        sampling: sampling settings (temperature also scales log-probs).
        kl: KL penalty and controller.
        update: PPO epochs, minibatches, clipping, coefficients.
        estimator: ``gae`` (critic), ``rloo`` or ``grpo`` (critic-free, need
            ``samples_per_prompt >= 2``).
        samples_per_prompt: responses sampled per prompt.
        critic: ``shared``: a value head reading the policy trunk's features (detached, so
            the value loss cannot disturb the policy; one trunk pass serves both), or
            ``adapter``: a value head on its own LoRA adapter on the same base (a stronger
            critic, one more trunk pass per forward).
        iterations: PPO iterations to run (the LR anneals to 0 over them).
        sample_every: log a prompt/response/reward table every this many iterations.
        gold: a gold reward function (:data:`rlhf.gold.GOLD_FUNCTIONS`, e.g. ``vader``) to
            log as ``gold/mean`` beside the RM score on every rollout (overoptimisation runs).
        lr, weight_decay, warmup_steps, adam_eps, output_dir: see :class:`StageModule`.
    """

    def __init__(
        self,
        base: ModelSettings,
        reward: RewardSettings | None = None,
        sampling: SamplingSettings | None = None,
        kl: KLSettings | None = None,
        update: UpdateSettings | None = None,
        estimator: Literal["gae", "rloo", "grpo"] = "gae",
        samples_per_prompt: int = 1,
        critic: Literal["shared", "adapter"] = "shared",
        iterations: int = 100,
        sample_every: int = 10,
        gold: str | None = None,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        adam_eps: float = 1e-5,
        output_dir: str | None = None,
    ) -> None:
        super().__init__(base, lr, weight_decay, warmup_steps, adam_eps, output_dir)
        if base.lora is None:
            raise ValueError("PPO trains a LoRA policy: set base.lora (e.g. {r: 16, alpha: 32})")
        if estimator in ("rloo", "grpo") and samples_per_prompt < 2:
            raise ValueError(f"estimator={estimator} needs samples_per_prompt >= 2")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.reward_settings = reward
        self.sampling = sampling or SamplingSettings()
        self.kl_settings = kl or KLSettings()
        self.update_settings = update or UpdateSettings()
        self.estimator = estimator
        self.samples_per_prompt = samples_per_prompt
        self.critic = critic
        self.iterations = iterations
        self.sample_every = sample_every
        self.gold = gold
        if gold is not None:
            from rlhf.gold import gold_function

            gold_function(gold)  # unknown names fail at construction
        self.kl_controller = (
            AdaptiveKLController(self.kl_settings.coef, self.kl_settings.target, self.kl_settings.horizon)
            if self.kl_settings.adaptive
            else FixedKLController(self.kl_settings.coef)
        )
        self.model: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        self.scorer: Scorer | None = None
        self.score_mean, self.score_std = 0.0, 1.0
        self.iteration = 0
        self.nonfinite = NonFiniteGuard(self.update_settings.max_nonfinite_steps)
        self._resumed = False

    # -- models ----------------------------------------------------------------------------
    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = load_causal_lm(self.base, self.run_precision())
        model = apply_lora(model, self.base.lora, adapter_name=POLICY)
        if self.uses_critic and self.critic == "adapter":
            model = apply_lora(model, self.base.lora, adapter_name=VALUE)
            model.set_adapter(POLICY)
        disable_dropout(model)
        self.model = model
        if self.uses_critic:
            hidden = model.get_base_model().config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if self.scorer is None:
            self.scorer = self.build_scorer()
            disable_dropout(self.model)  # a shared reward adapter was just added
        # FSDP only; after the scorer, so a shared reward adapter is sharded with its layers.
        heads = [self.value_head] if self.value_head is not None else []
        shard_model(self, model.get_base_model(), model, heads)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage in ("fit", "validate") and self.scorer is None:
            if self.reward_settings is None:
                raise ValueError("no reward: set model.init_args.reward.model to the RM stage output")
            from rlhf.ppo.reward import check_reward_model

            check_reward_model(self.reward_settings.model)  # before the policy is loaded

    def sequence_budget(self) -> tuple[int, str] | None:
        """Prompt (left-truncated to ``max_prompt_length``) plus ``max_new_tokens``."""
        data = getattr(self.trainer, "datamodule", None)
        prompt = getattr(data, "max_prompt_length", None)
        if not prompt:
            return None
        new = self.sampling.max_new_tokens
        keys = (f"data.init_args.max_prompt_length ({prompt}) + "
                f"model.init_args.sampling.max_new_tokens ({new})")
        return prompt + new, keys

    def build_scorer(self) -> Scorer:
        """The reward model of ``reward.model`` as a scorer (sharing the base when it can)."""
        if self.reward_settings is None:
            raise ValueError("no reward: set model.init_args.reward.model to the RM stage output")
        from rlhf.ppo.reward import load_scorer

        scorer, mean, std = load_scorer(self.reward_settings, self.model, self.base, self.tokenizer)
        self.score_mean, self.score_std = mean, std
        return scorer

    @staticmethod
    def _is_trained(name: str) -> bool:
        """Policy and value adapter weights and the value head (not a shared reward adapter)."""
        return f".{POLICY}." in name or f".{VALUE}." in name or name.startswith("value_head.")

    def trainable_parameters(self) -> list[nn.Parameter]:
        # Selected by name, not requires_grad: set_adapter() toggles requires_grad per adapter.
        return [p for name, p in self.named_parameters() if self._is_trained(name)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {name for name, _ in self.named_parameters() if self._is_trained(name)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["ppo"] = {
            "kl_controller": self.kl_controller.state_dict(),
            "iteration": self.iteration,
            "nonfinite": self.nonfinite.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ppo", {})
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        self.iteration = state.get("iteration", 0)
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        self._resumed = True

    def on_train_start(self) -> None:
        super().on_train_start()
        if self._resumed and self.trainer.is_global_zero:
            # Samples the killed run logged after its checkpoint are made again from here.
            drop_samples_from(Path(self.trainer.default_root_dir) / SAMPLES_FILE, self.iteration)

    def optimizer_steps_per_iteration(self) -> int:
        batch = self.trainer.datamodule.batch_size * self.samples_per_prompt
        minibatch = self.update_settings.minibatch_size or batch
        return self.update_settings.ppo_epochs * math.ceil(batch / minibatch)

    def total_steps(self) -> int:
        return self.iterations * self.optimizer_steps_per_iteration()

    # -- forward passes ----------------------------------------------------------------------
    def _values_from(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.value_head(hidden.float()).squeeze(-1)

    def policy_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        entropy: bool = True,
        entropy_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Log-probs ``[B, R]``, values ``[B, R]`` (``None`` without a critic) and entropies
        ``[B, R]`` (``None`` unless ``entropy``) of the response under the current
        (temperature-scaled) policy; the entropy is in the autograd graph only with
        ``entropy_grad``."""
        hidden = trunk_hidden(self.model, input_ids, attention_mask)
        logp, entropies = response_logprobs(
            self.model, hidden, start, input_ids[:, start:], self.sampling.temperature, entropy, entropy_grad
        )
        values = self.critic_values(input_ids, attention_mask, start, hidden[:, start - 1 : -1])
        return logp, values, entropies

    def critic_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, response_hidden: torch.Tensor
    ) -> torch.Tensor | None:
        """Values ``[B, R]`` of the critic (``None`` without one): an ``adapter`` critic's own
        trunk pass, or the shared head on the policy's hidden states ``response_hidden``
        ``[B, R, hidden]`` (those that predict the response tokens)."""
        if not self.uses_critic:
            return None
        if self.critic == "adapter":
            return self.adapter_values(input_ids, attention_mask, start)
        # The shared head reads the policy's features without moving them: value-loss
        # gradients (returns can be large) never reach the policy adapter.
        return self._values_from(response_hidden.detach())

    def adapter_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Values ``[B, R]`` of an ``adapter`` critic: a trunk pass with the value adapter on."""
        self.model.set_adapter(VALUE)
        try:
            hidden = trunk_hidden(self.model, input_ids, attention_mask)
        finally:
            self.model.set_adapter(POLICY)
        return self._values_from(hidden[:, start - 1 : -1])

    @torch.no_grad()
    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Log-probs ``[B, R]`` of the frozen base: the same weights with the adapters off."""
        with self.model.disable_adapter():
            hidden = trunk_hidden(self.model, input_ids, attention_mask)
            logp, _ = response_logprobs(self.model, hidden, start, input_ids[:, start:], self.sampling.temperature)
        return logp

    # -- rollout -------------------------------------------------------------------------------
    def shape_scores(self, raw: torch.Tensor, has_eos: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Normalise, length-normalise and clip scores ``[B]``; missing-EOS rows get the penalty."""
        settings = self.reward_settings
        scores = raw.float()
        if settings is None:
            return scores
        if settings.normalize:
            scores = (scores - self.score_mean) / max(self.score_std, 1e-8)
        if settings.length_normalize:
            scores = scores / lengths.clamp(min=1).float()
        if settings.clip is not None:
            scores = scores.clamp(-settings.clip, settings.clip)
        if settings.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, torch.full_like(scores, settings.missing_eos_penalty))
        return scores

    def old_logprobs_from_generation(self) -> bool:
        """Whether this rollout takes its old log-probs from generation (``update.old_logprobs``;
        ``auto``: only when the policy computes in float32/float64: weights in full precision,
        no autocast, and a full-precision trainer, since FSDP's mixed precision casts the
        weights themselves)."""
        choice = self.update_settings.old_logprobs
        if choice != "auto":
            return choice == "generation"
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and "16" in str(trainer.precision):
            return False
        compute = causal_lm_of(self.model).get_input_embeddings().weight.dtype
        return compute in (torch.float32, torch.float64) and not torch.is_autocast_enabled(self.device.type)

    @timed("rollout")
    @torch.no_grad()
    def make_rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        """Sample, score and compute advantages for one batch of prompts (the buffer)."""
        self.model.eval()
        k = self.samples_per_prompt
        prompt_ids = batch["input_ids"].repeat_interleave(k, dim=0)
        prompt_mask = batch["attention_mask"].repeat_interleave(k, dim=0)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        from_generation = self.old_logprobs_from_generation()
        if from_generation:
            responses, record = sample_and_record(self.model, prompt_ids, prompt_mask, self.sampling, eos, pad)
        else:
            responses = sample_responses(self.model, prompt_ids, prompt_mask, self.sampling, eos, pad)
        input_ids, attention_mask, response_mask, has_eos = assemble_sequences(
            prompt_ids, prompt_mask, responses, eos, pad
        )
        start = prompt_ids.shape[1]
        with phase("policy_value"):
            # The logged entropy is the rollout's (no grad, once an iteration), not the update's:
            # at the default entropy_coef 0 the update then makes no [R, vocab] exp.
            if from_generation:
                record = record.trimmed(response_mask.shape[1])
                logprobs, entropy = record.logprobs, record.entropy
                values = self.critic_values(input_ids, attention_mask, start, record.hidden)
            else:
                logprobs, values, entropy = self.policy_forward(input_ids, attention_mask, start, entropy=True)
        with phase("reference"):
            ref_logprobs = self.reference_logprobs(input_ids, attention_mask, start)
        with phase("reward"):
            raw_scores = self.scorer(input_ids, attention_mask).float()
        lengths = response_mask.sum(dim=1)
        scores = self.shape_scores(raw_scores, has_eos, lengths)
        kl = kl_estimate(logprobs, ref_logprobs, self.kl_settings.estimator) * response_mask
        beta = self.kl_controller.value
        if values is None:
            values = torch.zeros_like(logprobs)
        if self.estimator == "gae":
            rewards = per_token_rewards(scores, kl, response_mask, beta)
            advantages, returns = gae(
                rewards, values, response_mask, self.update_settings.gamma, self.update_settings.lam
            )
        else:
            # Critic-free: one sequence reward (score - beta * summed KL), advantage per sequence.
            sequence_reward = scores - beta * masked_sum(kl, response_mask, dim=1)
            adv = (rloo_advantages if self.estimator == "rloo" else grpo_advantages)(sequence_reward, k)
            advantages = sequence_to_token_advantages(adv, response_mask)
            rewards = per_token_rewards(scores, kl, response_mask, beta)
            returns = torch.zeros_like(advantages)
        if self.update_settings.whiten_advantages:
            advantages = masked_whiten(advantages, response_mask)
        return Rollout(
            input_ids=input_ids, attention_mask=attention_mask, response_start=start,
            response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
            values=values, raw_scores=raw_scores, scores=scores, kl=kl, rewards=rewards,
            advantages=advantages, returns=returns, has_eos=has_eos, entropy=entropy,
        )

    @torch.no_grad()
    def best_of_n(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int
    ) -> tuple[list[str], torch.Tensor]:
        """Best-of-``n`` sampling (evaluation): sample ``n`` responses per left-padded prompt
        ``[B, P]`` from the policy and keep the one the scorer ranks highest.

        Returns the ``B`` chosen responses as text and their raw scores ``[B]``.
        """
        self.model.eval()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        prompt_ids = input_ids.repeat_interleave(n, dim=0)
        prompt_mask = attention_mask.repeat_interleave(n, dim=0)
        responses = sample_responses(self.model, prompt_ids, prompt_mask, self.sampling, eos, pad)
        ids, mask, response_mask, _ = assemble_sequences(prompt_ids, prompt_mask, responses, eos, pad)
        scores = self.scorer(ids, mask).float()
        best = best_of_n_indices(scores, n)
        start = prompt_ids.shape[1]
        texts = [
            self.tokenizer.decode(ids[i, start:][response_mask[i].bool()], skip_special_tokens=True)
            for i in best.tolist()
        ]
        return texts, scores[best]

    # -- update --------------------------------------------------------------------------------
    def minibatch_loss(self, mb: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped policy loss + ``vf_coef`` * clipped value loss - ``entropy_coef`` * entropy."""
        u = self.update_settings
        # The entropy is computed here only for an entropy bonus (the logged one is the
        # rollout's): at the default ``entropy_coef: 0`` no [R, vocab] exp is made per minibatch.
        bonus = u.entropy_coef != 0
        logp, values, entropy_per_token = self.policy_forward(
            mb.input_ids, mb.attention_mask, mb.response_start, entropy=bonus, entropy_grad=bonus
        )
        pg_loss, stats = policy_loss(logp, mb.logprobs, mb.advantages, mb.response_mask, u.clip_range)
        loss = pg_loss
        if bonus:
            loss = pg_loss - u.entropy_coef * masked_mean(entropy_per_token, mb.response_mask)
        stats = {**stats, "policy_loss": pg_loss.detach()}
        if values is not None:
            vf_loss, vstats = value_loss(values, mb.values, mb.returns, mb.response_mask, u.value_clip_range)
            loss = loss + u.vf_coef * vf_loss
            stats.update(value_loss=vf_loss.detach(), value_clipfrac=vstats["clipfrac"])
        return loss, stats

    def nonfinite_inputs(self, mb: Rollout) -> list[str]:
        """What in a minibatch's rollout rows is NaN/inf: ``reward``, ``kl``, ``advantage``,
        ``return``, ``value`` (the last two with a critic)."""
        critic = self.uses_critic
        return nonfinite_names({
            "reward": torch.cat([mb.raw_scores.float(), mb.scores.float()]),
            "kl": mb.kl,
            "advantage": mb.advantages,
            "return": mb.returns if critic else None,
            "value": mb.values if critic else None,
        })

    def _mean_over_processes(self, value: float) -> float:
        """``value`` averaged over the processes of a multi-process run (so they all decide alike)."""
        return float(self.trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="mean"))

    @timed("update")
    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; returns the mean of each stat over
        the updates made, and ``skipped``: minibatch updates skipped because something was not
        finite (see :class:`rlhf.guards.NonFiniteGuard`; the LR schedule still moves on)."""
        u = self.update_settings
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n = len(rollout)
        minibatch = u.minibatch_size or n
        micro = min(u.micro_batch_size or minibatch, minibatch)
        # Under fp16 a GradScaler skips steps with inf gradients itself (and adjusts its scale).
        check_gradients = getattr(self.trainer.precision_plugin, "scaler", None) is None
        totals: dict[str, float] = {}
        count, skipped, stopped_early = 0, 0, False
        self.model.train()
        for epoch in range(u.ppo_epochs):
            order = torch.randperm(n, device=rollout.input_ids.device)
            for number, mb_start in enumerate(range(0, n, minibatch)):
                mb_index = order[mb_start : mb_start + minibatch]
                mb_stats: dict[str, float] = {}
                bad = self.nonfinite_inputs(rollout.select(mb_index))
                # Multi-process runs (DDP, FSDP): every forward/backward is a collective, so the
                # processes skip together or compute together.
                if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False) and not bad:
                    bad = ["values (on another process)"]
                skip = bool(bad)
                for mc_start in range(0, len(mb_index), micro):
                    if skip:
                        break
                    part = rollout.select(mb_index[mc_start : mc_start + micro])
                    loss, stats = self.minibatch_loss(part)
                    if not bool(torch.isfinite(loss)):
                        bad = ["loss"]  # still backpropagated (see above); the update is skipped
                    weight = len(part) / len(mb_index)
                    self.manual_backward(loss * weight)
                    for key, value in stats.items():
                        mb_stats[key] = mb_stats.get(key, 0.0) + float(value) * weight
                if not bad and check_gradients and not gradients_finite(self.trainable_parameters()):
                    bad = ["gradient"]
                if self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    skipped += 1
                    where = {"iteration": self.iteration, "epoch": epoch, "minibatch": number}
                    log.warning("skipped a PPO minibatch update: non-finite %s (%s)", join_names(bad),
                                ", ".join(f"{k} {v}" for k, v in where.items()))
                    self.nonfinite.bad(bad or ["values (on another process)"], **where)
                    continue
                self.nonfinite.good()
                if u.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=u.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                for key, value in mb_stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
                if u.target_approx_kl is not None and (
                    self._mean_over_processes(mb_stats["approx_kl"]) > u.target_approx_kl
                ):
                    stopped_early = True
                    break
            if stopped_early:
                break
        self.model.eval()
        means = {key: value / count for key, value in totals.items()}
        means["early_stopped"] = float(stopped_early)
        means["optimizer_steps"] = float(count)
        means["skipped"] = float(skipped)
        return means

    # -- Lightning hooks -------------------------------------------------------------------------
    def rollout_metrics(self, r: Rollout, prefix: str = "") -> dict[str, float]:
        """Reward, KL and response metrics of a rollout (names as in DESIGN.md)."""
        kl_per_seq = masked_sum(r.kl, r.response_mask, dim=1)
        metrics = {
            f"{prefix}reward/mean": float(r.raw_scores.mean()),
            f"{prefix}reward/std": float(r.raw_scores.std()) if len(r) > 1 else 0.0,
            f"{prefix}reward/normalized_mean": float(r.scores.mean()),
            f"{prefix}reward/normalized_std": float(r.scores.std()) if len(r) > 1 else 0.0,
            f"{prefix}kl/mean": float(kl_per_seq.mean()),
            f"{prefix}response/length": float(r.response_mask.sum(dim=1).float().mean()),
            f"{prefix}response/eos_frac": float(r.has_eos.float().mean()),
            # The rollout policy's mean per-token entropy (temperature-scaled, before top-k/top-p).
            f"{prefix}policy/entropy": float(masked_mean(r.entropy, r.response_mask)),
        }
        if self.gold is not None:
            from rlhf.gold import gold_function

            texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in self.response_ids(r)]
            metrics[f"{prefix}gold/mean"] = sum(gold_function(self.gold)(texts)) / max(1, len(texts))
        return metrics

    @staticmethod
    def response_ids(r: Rollout) -> list[list[int]]:
        """Each sequence's response tokens (up to and including EOS)."""
        return [
            r.input_ids[i, r.response_start :][r.response_mask[i].bool()].tolist() for i in range(len(r))
        ]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            rollout = self.make_rollout(batch)
            stats = self.ppo_update(rollout)
        metrics = self.rollout_metrics(rollout)
        nan = float("nan")  # policy/value stats of an iteration whose updates were all skipped
        metrics.update(
            {
                "kl/coef": self.kl_controller.value,
                "policy/ratio": stats.get("ratio_mean", nan),
                "policy/ratio_max": stats.get("ratio_max", nan),
                "policy/clipfrac": stats.get("clipfrac", nan),
                "policy/approx_kl": stats.get("approx_kl", nan),
                "policy/loss": stats.get("policy_loss", nan),
                "policy/early_stopped": stats["early_stopped"],
                "nonfinite/skipped": stats["skipped"],
                "nonfinite/skipped_total": float(self.nonfinite.skipped),
                "iteration": float(self.iteration),
                "lr": self.lr_schedulers().get_last_lr()[0],
            }
        )
        if self.uses_critic:
            metrics["value/loss"] = stats.get("value_loss", nan)
            metrics["value/clipfrac"] = stats.get("value_clipfrac", nan)
            metrics["value/explained_var"] = float(
                explained_variance(rollout.values, rollout.returns, rollout.response_mask)
            )
        if math.isfinite(metrics["kl/mean"]):  # a NaN would poison an adaptive controller
            self.kl_controller.update(metrics["kl/mean"], len(rollout))
        self.log_dict(metrics, batch_size=len(rollout), prog_bar=False)
        self.log("reward", metrics["reward/mean"], prog_bar=True, logger=False, batch_size=len(rollout))
        self.log("kl", metrics["kl/mean"], prog_bar=True, logger=False, batch_size=len(rollout))
        if self.sample_every and self.iteration % self.sample_every == 0:
            self.log_samples(rollout, batch)
        self.iteration += 1
        if self.iteration >= self.iterations:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            rollout = self.make_rollout(batch)
        for key, value in self.rollout_metrics(rollout, prefix="val/").items():
            self.log(key, value, batch_size=len(rollout), prog_bar=key == "val/reward/mean")

    # -- samples and outputs -------------------------------------------------------------------
    def sample_rows(self, rollout: Rollout, batch: dict[str, torch.Tensor], limit: int = 4) -> list[list[Any]]:
        """``[iteration, prompt, response, raw score, KL]`` rows for a few sequences."""
        units = self.trainer.datamodule.train_units
        rows = []
        for i in range(min(limit, len(rollout))):
            prompt = conversation_text(units[int(batch["index"][i // self.samples_per_prompt])].prompt)
            response_ids = rollout.input_ids[i, rollout.response_start :][rollout.response_mask[i].bool()]
            rows.append([
                self.iteration, prompt, self.tokenizer.decode(response_ids, skip_special_tokens=True),
                float(rollout.raw_scores[i]), float(masked_sum(rollout.kl[i], rollout.response_mask[i])),
            ])
        return rows

    def log_samples(self, rollout: Rollout, batch: dict[str, torch.Tensor]) -> None:
        """Sample table to W&B (when used) and to ``samples.jsonl`` in the run directory."""
        columns = ["iteration", "prompt", "response", "reward", "kl"]
        rows = self.sample_rows(rollout, batch)
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="samples", columns=columns, data=rows, step=self.global_step)
        if self.trainer.is_global_zero:
            path = Path(self.trainer.default_root_dir) / SAMPLES_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                for row in rows:
                    f.write(json.dumps(dict(zip(columns, row))) + "\n")

    def save_outputs(self, output_dir: str) -> None:
        """``adapter/`` (policy LoRA), ``model/`` (merged policy), ``value_head.pt``, marker."""
        info: dict[str, Any] = {
            "stage": "ppo",
            "base": self.base.name_or_path,
            "iterations": self.iteration,
            "kl_controller": self.kl_controller.state_dict(),
            "metrics": self.logged_metrics(),
            "metrics_before_fit": self.metrics_before_fit,
        }
        with atomic_directory(output_dir) as tmp:
            self.model.save_pretrained(tmp / "adapter", selected_adapters=[POLICY])
            self.tokenizer.save_pretrained(tmp / "adapter")
            if self.value_head is not None:
                torch.save(self.value_head.state_dict(), tmp / "value_head.pt")
            if not self.base.quantization:
                # Merge a fresh copy: the live model must keep its adapter (the reference is
                # the base with the adapter off).
                fresh = load_causal_lm(replace(self.base, lora=None))
                merged = PeftModel.from_pretrained(fresh, tmp / "adapter" / POLICY).merge_and_unload()
                merged.save_pretrained(tmp / "model")
                self.tokenizer.save_pretrained(tmp / "model")
                info["model_dir"] = "model"
            write_stage_marker(tmp, info)
        log.info("saved PPO outputs to %s", output_dir)
