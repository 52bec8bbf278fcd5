"""Evaluate policies the same way for every method: sample the held-out prompts, score each
response with the gold function and the proxy RM, and measure KL to the reference, length and
EOS (:func:`rlhf.evaluate.sample_policy` does the sampling and the proxy and KL; the gold
function reads the decoded responses, as PPO's ``gold/mean`` does).

One :class:`PolicyEvaluator` loads the reference, the proxy RM and the prompt batches once and
serves every policy of a comparison. The sampling seed of seed ``s`` is ``eval.seed + s`` for
every method, so within a seed all methods see one random stream.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from rlhf.compare.config import CompareConfig, EvalSettings
from rlhf.compare.stats import Scored, best_of_n, best_of_n_kl_bound, summarise

log = logging.getLogger("rlhf.compare")

#: Responses kept in each evaluation record (of its last point), to read beside the numbers.
SHOWN_SAMPLES = 4


def sampling_seed(settings: EvalSettings, seed: int) -> int:
    """The evaluation sampling seed of training seed ``seed`` (the same for every method)."""
    return settings.seed + seed


class PolicyEvaluator:
    """Samples and scores policies on the comparison's held-out prompts.

    Models load on first use: the reference (also the sampler of ``reference`` and
    best-of-n methods), the proxy RM, and the prompt batches (tokenised with the reference's
    tokenizer, which every policy of the comparison shares).
    """

    def __init__(self, config: CompareConfig, progress: bool = False) -> None:
        self.config = config
        self.settings = config.eval
        self.progress = progress
        self._loaded: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._loaded is not None:
            return self._loaded
        from rlhf.data.datamodules import PromptDataModule
        from rlhf.data.records import conversation_text
        from rlhf.data.sources import DataSource
        from rlhf.evaluate import check_reward_tokenizer
        from rlhf.models.loading import resolve_dtype
        from rlhf.models.reward import load_reward_model
        from rlhf.policies import (
            load_policy,
            prompt_batches,
            resolve_device,
            resolve_model_dir,
        )

        s = self.settings
        data = PromptDataModule(
            train=[DataSource(path=path, schema=s.schema) for path in s.data],
            val_fraction=s.val_fraction if s.split != "all" else 0.0,
            split_seed=s.split_seed,
            tokenizer=resolve_model_dir(self.config.reference),
            max_length=s.max_length,
            max_prompt_length=s.max_prompt_length,
            long_prompts=s.long_prompts,
            batch_size=s.batch_size,
            eval_batch_size=s.batch_size,
            on_bad_row="skip",
        )
        batches, prompts = prompt_batches(data, s.split, s.limit)
        device = resolve_device(s.device)
        check_reward_tokenizer(self.config.proxy, data.tokenizer)
        self._loaded = {
            "device": device,
            "tokenizer": data.tokenizer,
            "batches": batches,
            "texts": [conversation_text(p) for p in prompts],
            "reference": load_policy(self.config.reference, device, precision=s.precision),
            "proxy": load_reward_model(self.config.proxy, device=device, dtype=resolve_dtype("auto", s.precision)),
        }
        log.info("evaluating on %d held-out prompts x %d samples", len(prompts), s.samples_per_prompt)
        return self._loaded

    @property
    def prompts(self) -> int:
        return len(self._load()["texts"])

    def sample(self, policy: Path | None, seed: int, samples_per_prompt: int, name: str = "policy") -> tuple[list[Scored], list[dict[str, Any]]]:
        """Sample ``samples_per_prompt`` responses per prompt from ``policy`` (``None``: the
        reference) with sampling seed ``seed``; returns the scored rows and, for the first
        :data:`SHOWN_SAMPLES`, their prompt and response text."""
        from rlhf.evaluate import sample_policy
        from rlhf.generation import SamplingSettings
        from rlhf.gold import gold_function
        from rlhf.policies import load_policy

        loaded, s = self._load(), self.settings
        reference = loaded["reference"]
        model = reference if policy is None else load_policy(policy, loaded["device"], precision=s.precision)
        try:
            rows = sample_policy(
                name, model, reference, loaded["proxy"], loaded["tokenizer"], loaded["batches"], loaded["texts"],
                SamplingSettings(s.max_new_tokens, s.temperature), samples_per_prompt, seed, loaded["device"],
                s.precision, self.progress,
            )
        finally:
            if model is not reference:
                del model
        gold = gold_function(self.config.gold)([r.response for r in rows])
        scored = [Scored(r.prompt_id, r.sample, r.reward, g, r.kl, r.length, r.eos) for r, g in zip(rows, gold)]
        shown = [{"prompt": r.prompt, "response": r.response, "proxy": r.reward, "gold": g}
                 for r, g in zip(rows[:SHOWN_SAMPLES], gold)]
        return scored, shown

    def evaluate(self, kind: str, seed: int, points: list[tuple[int, Path]] | None = None, n: int | None = None) -> dict[str, Any]:
        """One (method, seed)'s evaluation record.

        Args:
            kind: ``fit`` (evaluate ``points``: ``(training step, policy dir)`` in step
                order), ``reference`` (the reference, step 0) or ``best_of_n`` (``n`` draws
                per response from the reference, the best under the proxy; KL is the
                analytic bound, :func:`rlhf.compare.stats.best_of_n_kl_bound`).
            seed: the training seed (sampling seed: :func:`sampling_seed`).

        Returns:
            ``{"points": [{"step", "policy", "gold", "proxy", "kl", "sqrt_kl", "length",
            "eos_rate", "samples"}], "samples": [...], "eval_seconds", "sampling_seed",
            "prompts"}`` (plus ``n`` and ``kl_is_bound`` for best-of-n).
        """
        start = time.perf_counter()
        k = self.settings.samples_per_prompt
        stream = sampling_seed(self.settings, seed)
        record: dict[str, Any] = {"sampling_seed": stream}
        if kind == "fit":
            if not points:
                raise ValueError("a fit method's evaluation needs at least one policy")
            out, shown = [], []
            for step, path in points:
                rows, shown = self.sample(path, stream, k, name=f"step {step}")
                out.append({"step": step, "policy": str(path), **summarise(rows)})
        elif kind == "reference":
            rows, shown = self.sample(None, stream, k, name="reference")
            out = [{"step": 0, "policy": str(self.config.reference), **summarise(rows)}]
        elif kind == "best_of_n":
            if n is None or n < 1:
                raise ValueError(f"best_of_n needs n >= 1, got {n}")
            rows, _ = self.sample(None, stream, k * n, name=f"best of {n}")
            chosen = best_of_n(rows, n)
            bound = best_of_n_kl_bound(n)
            out = [{"step": 0, "policy": str(self.config.reference), **summarise(chosen, kl=bound)}]
            record.update(n=n, kl_is_bound=True)
            shown = []
        else:
            raise ValueError(f"unknown method kind {kind!r}")
        record.update(points=out, samples=shown, prompts=self.prompts,
                      eval_seconds=time.perf_counter() - start)
        return record

    def close(self) -> None:
        """Free the loaded models."""
        self._loaded = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
