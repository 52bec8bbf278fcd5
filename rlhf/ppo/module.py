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

The maths are pure functions: :func:`rlhf.ppo.scores.shape_scores`,
:func:`rlhf.ppo.advantages.compute_advantages`, :mod:`rlhf.ppo.kl`, :mod:`rlhf.ppo.losses`; the
update loop is :func:`rlhf.ppo.update.ppo_update` (non-finite minibatches skipped and counted,
:mod:`rlhf.guards`). Checkpoints carry the KL controller, the iteration and the skip counts;
RNG, data position and logger identity are :mod:`rlhf.resume`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.distributed import shard_model
from rlhf.generation import SamplingSettings, Scorer, assemble_sequences, sample_and_record, sample_responses
from rlhf.generation.seeds import process_generator
from rlhf.guards import NonFiniteGuard
from rlhf.models.forward import adapter_inputs_left_to_autocast, disable_dropout, trunk_hidden
from rlhf.masks import masked_sum
from rlhf.models.loading import ModelSettings, apply_lora, load_causal_lm
from rlhf.models.logprobs import response_logprobs, sequence_logprobs
from rlhf.models.reward import text_hidden_size
from rlhf.models.value_branch import ValueBranch
from rlhf.ppo.advantages import GROUPED, Estimator, compute_advantages
from rlhf.ppo.critics import Critic, branch_inputs, check_critic
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, masked_kl, update_from_sequences
from rlhf.ppo.metrics import gold_scores, rollout_metrics, update_metrics
from rlhf.ppo.outputs import save_ppo_outputs
from rlhf.ppo.rollout import Rollout, logprobs_from_generation
from rlhf.ppo.samples import SAMPLES_FILE, drop_samples_from, log_sample_table
from rlhf.ppo.scores import shape_scores
from rlhf.ppo.settings import POLICY, VALUE, KLSettings, RewardSettings, UpdateSettings
from rlhf.ppo.update import ppo_update
from rlhf.stage import StageModule
from rlhf.timing import phase, timed

# Hyperparameters hold these dataclasses; let weights-only checkpoint loading read them.
torch.serialization.add_safe_globals([RewardSettings, SamplingSettings, KLSettings, UpdateSettings])


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
            ``samples_per_prompt >= 2``) or ``reinforce`` (critic-free, batch-mean baseline).
        samples_per_prompt: responses sampled per prompt.
        critic: ``shared``: a value head reading the policy trunk's features (detached, so
            the value loss cannot disturb the policy; one trunk pass serves both);
            ``adapter``: a value head on its own LoRA adapter on the same base (a stronger
            critic, one more trunk pass per forward); ``hydra``: a value head on a trained
            copy of the top ``critic_layers`` layers, fed the policy trunk's detached hidden
            states below them (:mod:`rlhf.ppo.critics`).
        critic_layers: ``hydra`` only: the layers ``k`` the value branch copies and trains
            (``1 <= k < L``); its cost is ``k`` layers per forward and backward, its memory
            ``k / L`` of the base's layers plus their optimizer state.
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
        estimator: Estimator = "gae",
        samples_per_prompt: int = 1,
        critic: Critic = "shared",
        critic_layers: int = 2,
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
        if estimator in GROUPED and samples_per_prompt < 2:
            raise ValueError(f"estimator={estimator} needs samples_per_prompt >= 2")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1 (got {iterations})")
        if samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1 (got {samples_per_prompt})")
        check_critic(critic, critic_layers, base)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.reward_settings = reward
        self.sampling = sampling or SamplingSettings()
        self.kl_settings = kl or KLSettings()
        self.update_settings = update or UpdateSettings()
        self.estimator = estimator
        self.samples_per_prompt = samples_per_prompt
        self.critic = critic
        self.critic_layers = critic_layers
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
        self.value_branch: ValueBranch | None = None
        self.scorer: Scorer | None = None
        self.score_mean, self.score_std = 0.0, 1.0
        self.iteration = 0
        self.sampling_seed: int | None = None  # this process's seed of the last rollout
        self.nonfinite = NonFiniteGuard(self.update_settings.max_nonfinite_steps)
        self._resumed = False

    # -- models ----------------------------------------------------------------------------
    @property
    def uses_critic(self) -> bool:
        return self.estimator == "gae"

    def configure_model(self) -> None:
        if self.model is not None:
            return
        lm = load_causal_lm(self.base, self.run_precision())
        # The hydra branch copies the base's top layers before the policy LoRA wraps them.
        branch = None
        if self.uses_critic and self.critic == "hydra":
            branch = ValueBranch.from_top_layers(lm, self.critic_layers, self.base.name_or_path)
        model = apply_lora(lm, self.base.lora, adapter_name=POLICY)
        if self.uses_critic and self.critic == "adapter":
            model = apply_lora(model, self.base.lora, adapter_name=VALUE)
            model.set_adapter(POLICY)
        disable_dropout(model)
        self.model = model
        if self.uses_critic:
            hidden = text_hidden_size(model.get_base_model().config)
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if branch is not None:  # trained in the dtype of the other trained weights (the head's)
            self.value_branch = branch.to(self.value_head.weight.dtype)
            disable_dropout(self.value_branch)
        if self.scorer is None:
            self.scorer = self.build_scorer()
            disable_dropout(self.model)  # a shared reward adapter was just added
        # FSDP only; after the scorer, so a shared reward adapter is sharded with its layers.
        heads = [h for h in (self.value_head, self.value_branch) if h is not None]
        shard_model(self, model.get_base_model(), model, heads)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            batch = getattr(self.trainer.datamodule, "batch_size", None)
            self.update_settings.check_rollout(batch, self.samples_per_prompt)
        if stage in ("fit", "validate") and self.scorer is None:
            if self.reward_settings is None:
                raise ValueError("no reward: set model.init_args.reward.model to the RM stage output")
            from rlhf.models.scorers import check_reward_model

            for path in self.reward_settings.models:  # before the policy is loaded
                check_reward_model(path)

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
        from rlhf.models.scorers import load_scorer

        r = self.reward_settings
        scorer, mean, std = load_scorer(r.models, r.share_base, self.model, self.base, self.tokenizer,
                                        r.ensemble, r.ensemble_penalty)
        self.score_mean, self.score_std = mean, std
        return scorer

    @staticmethod
    def _is_trained(name: str) -> bool:
        """Policy and value adapter weights, the value head and a hydra value branch (not a
        shared reward adapter)."""
        return f".{POLICY}." in name or f".{VALUE}." in name or name.startswith(("value_head.", "value_branch."))

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
        from rlhf.ppo.samples import start_samples_anew
        from rlhf.resume import stop_finished_run

        if self.trainer.is_global_zero:
            samples = Path(self.trainer.default_root_dir) / SAMPLES_FILE
            if self._resumed:  # the rows the killed run logged after its checkpoint come again
                drop_samples_from(samples, self.iteration)
            else:  # a new run never appends to an earlier run's rows
                start_samples_anew(samples)
        if self._resumed and self.iteration >= self.iterations:
            self.output_dir = stop_finished_run(self.trainer, self.output_dir)

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
        with branch_inputs(self.model, self.value_branch) as lower:
            hidden = trunk_hidden(self.model, input_ids, attention_mask)
        logp, entropies = response_logprobs(
            self.model, hidden, start, input_ids[:, start:], self.sampling.temperature, entropy, entropy_grad
        )
        values = self.critic_values(input_ids, attention_mask, start, hidden[:, start - 1 : -1], lower)
        return logp, values, entropies

    def critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                      response_hidden: torch.Tensor, recorded: list[torch.Tensor] | None = None) -> torch.Tensor | None:
        """Values ``[B, R]`` of the critic (``None`` without one): an ``adapter`` critic's own
        trunk pass; a ``hydra`` branch on the policy's lower hidden states ``recorded`` by
        :func:`rlhf.ppo.critics.branch_inputs`; or the shared head on the policy's hidden states
        ``response_hidden`` ``[B, R, hidden]`` (those that predict the response tokens)."""
        if not self.uses_critic:
            return None
        if self.critic == "adapter":
            return self.adapter_values(input_ids, attention_mask, start)
        if self.critic == "hydra":  # detached inside: the branch's gradients stop at its input
            length = response_hidden.shape[1]
            return self._values_from(self.value_branch.response_states(recorded or [], attention_mask, start, length))
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
            logp, _ = sequence_logprobs(self.model, input_ids, attention_mask, start, self.sampling.temperature)
        return logp

    # -- rollout -------------------------------------------------------------------------------
    def old_logprobs_from_generation(self) -> bool:
        """Whether this rollout takes its old log-probs from generation (``update.old_logprobs``)."""
        trainer = getattr(self, "_trainer", None)
        precision = None if trainer is None else str(trainer.precision)
        return logprobs_from_generation(self.update_settings.old_logprobs, self.model, precision, self.device.type)

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
        generator = process_generator(self.device, self.global_rank)  # this process's own draws
        self.sampling_seed = generator.initial_seed()
        if from_generation:
            with branch_inputs(self.model, self.value_branch) as lower:
                responses, record = sample_and_record(self.model, prompt_ids, prompt_mask, self.sampling, eos, pad,
                                                      generator)
        else:
            responses = sample_responses(self.model, prompt_ids, prompt_mask, self.sampling, eos, pad,
                                         generator=generator)
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
                values = self.critic_values(input_ids, attention_mask, start, record.hidden, lower)
            else:
                logprobs, values, entropy = self.policy_forward(input_ids, attention_mask, start, entropy=True)
        with phase("reference"):
            ref_logprobs = self.reference_logprobs(input_ids, attention_mask, start)
        with phase("reward"):
            raw_scores = self.scorer(input_ids, attention_mask).float()
        scores = shape_scores(raw_scores, has_eos, response_mask.sum(dim=1), self.reward_settings,
                              self.score_mean, self.score_std)
        kl = masked_kl(logprobs, ref_logprobs, response_mask, self.kl_settings.estimator)
        if values is None:
            values = torch.zeros_like(logprobs)
        u = self.update_settings
        rewards, advantages, returns = compute_advantages(
            self.estimator, scores, kl, values, response_mask, self.kl_controller.value,
            self.samples_per_prompt, u.gamma, u.lam, u.whiten_advantages,
        )
        return Rollout(
            input_ids=input_ids, attention_mask=attention_mask, response_start=start,
            response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
            values=values, raw_scores=raw_scores, scores=scores, kl=kl, rewards=rewards,
            advantages=advantages, returns=returns, has_eos=has_eos, entropy=entropy,
        )

    # -- update --------------------------------------------------------------------------------
    def mean_over_processes(self, value: float) -> float:
        """``value`` averaged over the processes of a multi-process run (so they all decide alike)."""
        return float(self.trainer.strategy.reduce(torch.tensor(value, device=self.device), reduce_op="mean"))

    # -- Lightning hooks -------------------------------------------------------------------------
    def rollout_metrics(self, r: Rollout, prefix: str = "") -> dict[str, float]:
        """:func:`rlhf.ppo.metrics.rollout_metrics`, with ``gold/mean`` when ``gold`` is set and
        ``reward/ensemble_std`` (the members' disagreement) for a reward ensemble."""
        metrics = rollout_metrics(r, prefix, gold_scores(self.gold, self.tokenizer, r) if self.gold else None)
        spread = getattr(self.scorer, "last_spread", None)
        if spread is not None:
            metrics[f"{prefix}reward/ensemble_std"] = spread
        return metrics

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            rollout = self.make_rollout(batch)
            stats = ppo_update(self, rollout)
        metrics = {
            **self.rollout_metrics(rollout),
            **update_metrics(stats, rollout, self.uses_critic),
            "kl/coef": self.kl_controller.value,
            "nonfinite/skipped_total": float(self.nonfinite.skipped),
            "iteration": float(self.iteration),
            "lr": self.lr_schedulers().get_last_lr()[0],
        }
        if self.kl_settings.adaptive:  # by the global rollout: every process keeps the same beta
            sum_over_processes = lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")  # noqa: E731
            update_from_sequences(self.kl_controller, masked_sum(rollout.kl, rollout.response_mask, dim=1),
                                  sum_over_processes)
        self.log_dict(metrics, batch_size=len(rollout), prog_bar=False)
        self.log("reward", metrics["reward/mean"], prog_bar=True, logger=False, batch_size=len(rollout))
        self.log("kl", metrics["kl/mean"], prog_bar=True, logger=False, batch_size=len(rollout))
        if self.sample_every and self.iteration % self.sample_every == 0:
            log_sample_table(self, rollout, batch)
        self.iteration += 1
        if self.iteration >= self.iterations:
            self.trainer.should_stop = True

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        with adapter_inputs_left_to_autocast(self.model, self.device.type):
            rollout = self.make_rollout(batch)
        for key, value in self.rollout_metrics(rollout, prefix="val/").items():
            self.log(key, value, batch_size=len(rollout), prog_bar=key == "val/reward/mean")

    # -- outputs ---------------------------------------------------------------------------------
    def save_outputs(self, output_dir: str) -> None:
        """``adapter/`` (policy LoRA), ``model/`` (merged policy), ``value_head.pt``, a hydra
        critic's ``value_branch.pt``, marker."""
        save_ppo_outputs(self, output_dir)
