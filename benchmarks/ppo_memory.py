"""Peak memory of PPO with one shared base vs separate models, same settings.

    python -m benchmarks.ppo_memory                 # SmolLM2-135M-shaped base, minutes on a CPU
    python -m benchmarks.ppo_memory --size small    # a seconds-long smoke run

Two layouts of the same PPO (same random Llama-style base, reward weights, prompts, batch,
response length, PPO epochs, LoRA rank; policy and critic both trained as LoRA adapters):

- ``separate``: policy (base + LoRA), reference (a frozen copy of the base), critic (another
  copy of the base + its own LoRA + value head) and reward model (its own merged copy): four
  sets of base weights, the layout of TRL / DeepSpeed-Chat style trainers.
- ``shared``: one frozen base with named adapters: ``policy``, ``value`` (critic) and
  ``reward``; the reference is the base with the adapters disabled. One set of base weights.

Each layout runs in its own subprocess (:func:`benchmarks.harness.run_worker`), so its peak RSS (and on CUDA its peak
allocated GPU memory) is its own. Results go to ``benchmarks/results/ppo_memory.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.assets import SIZES, build_assets
from benchmarks.harness import (MIB, RESULTS_DIR, Column, add_common_arguments, after_warmup, memory_mib,
                                peak_rss_bytes, ratios, run_worker, text_table, weight_bytes, work_directory,
                                write_json)
from benchmarks.workers import PPOSpec

RESULTS = RESULTS_DIR / "ppo_memory.json"
LAYOUTS = ("separate", "shared")
RATIO_KEYS = ("peak_rss_mib", "rss_above_import_mib", "weights_mib", "cuda_peak_allocated_mib",
              "iteration_seconds_median")


@dataclass
class MemorySpec(PPOSpec):
    """One layout's run (everything else is the same for both layouts)."""

    layout: str  # "separate" or "shared"


def separate_models_module() -> type:
    """``PPOModule`` with the reference, critic and reward as their own models (layout (a))."""
    import torch
    from torch import nn

    from rlhf.models.forward import disable_dropout, trunk_hidden
    from rlhf.models.loading import apply_lora, load_causal_lm
    from rlhf.models.logprobs import response_logprobs
    from rlhf.models.reward import text_hidden_size
    from rlhf.ppo.module import POLICY, VALUE, PPOModule

    class SeparateModelsPPO(PPOModule):
        """Policy, reference, critic and reward as four models; the maths is PPOModule's."""

        def configure_model(self) -> None:
            """Policy (base + LoRA), a frozen reference copy, a critic copy with its own LoRA and
            value head, and the reward model on its own base."""
            if self.model is not None:
                return
            self.model = apply_lora(load_causal_lm(self.base), self.base.lora, adapter_name=POLICY)
            disable_dropout(self.model)
            self.reference_model = load_causal_lm(self.base).eval().requires_grad_(False)
            self.value_model = apply_lora(load_causal_lm(self.base), self.base.lora, adapter_name=VALUE)
            disable_dropout(self.value_model)
            hidden = text_hidden_size(self.model.get_base_model().config)
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            if self.scorer is None:
                self.scorer = self.build_scorer()  # reward.share_base is off: its own model

        def adapter_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
            """Values from the critic's own trunk."""
            value_hidden = trunk_hidden(self.value_model, input_ids, attention_mask)
            return self._values_from(value_hidden[:, start - 1 : -1])

        def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               start: int) -> torch.Tensor:
            """Response log-probs under the frozen reference copy."""
            with torch.no_grad():
                hidden = trunk_hidden(self.reference_model, input_ids, attention_mask)
                logp, _ = response_logprobs(
                    self.reference_model, hidden, start, input_ids[:, start:], self.sampling.temperature
                )
            return logp

    return SeparateModelsPPO


def run_layout(spec: MemorySpec) -> dict[str, Any]:
    """Fit ``spec.iterations`` PPO iterations in ``spec.layout``; peak memory and timings."""
    import torch

    from benchmarks.assets import load_prompts
    from benchmarks.loop_parts import FixedPrompts, StepClock, fit
    from rlhf.generation import SamplingSettings
    from rlhf.models.loading import LoraSettings, ModelSettings
    from rlhf.ppo.module import PPOModule
    from rlhf.ppo.settings import RewardSettings, UpdateSettings

    rows = load_prompts(spec.prompts)
    import_rss = peak_rss_bytes()

    torch.manual_seed(spec.seed)
    cls = separate_models_module() if spec.layout == "separate" else PPOModule
    module = cls(
        base=ModelSettings(spec.base, dtype="float32", lora=LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha)),
        reward=RewardSettings(model=spec.rm, share_base=spec.layout == "shared"),
        sampling=SamplingSettings(max_new_tokens=spec.response_length, temperature=0.7),
        update=UpdateSettings(ppo_epochs=spec.ppo_epochs),
        estimator="gae", critic="adapter", iterations=spec.iterations, sample_every=0, output_dir=None,
    )
    clock = StepClock()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fit(module, FixedPrompts(rows, spec.batch_size), [clock], max_epochs=-1)
    held = [module.model, module.value_head, module.scorer]
    held += [m for m in (getattr(module, "reference_model", None), getattr(module, "value_model", None)) if m]
    scorer_models = [getattr(module.scorer, "reward_model", None)]
    return {
        "layout": spec.layout,
        "spec": asdict(spec),
        "peak_rss_bytes": peak_rss_bytes(),
        "import_rss_bytes": import_rss,
        "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "weight_bytes": weight_bytes(*held, *[m for m in scorer_models if m is not None]),
        "trainable_params": sum(p.numel() for p in module.trainable_parameters()),
        "iteration_seconds": clock.seconds,
    }


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-layout MiB and seconds (the first iteration is warm-up), and the ratios shared / separate."""
    rows = {}
    for layout, r in results.items():
        cuda = r["cuda_peak_allocated_bytes"]
        rows[layout] = {
            **memory_mib(r),
            "cuda_peak_allocated_mib": cuda / MIB if cuda else None,
            "trainable_params": r["trainable_params"],
            "iteration_seconds_median": statistics.median(after_warmup(r["iteration_seconds"], 1, keep_all=True)),
        }
    return {"layouts": rows, "shared_over_separate": ratios(rows["shared"], rows["separate"], RATIO_KEYS)}


COLUMNS = [
    Column("layout", "layout", width=9, left=True), Column("peak RSS MiB", "peak_rss_mib", ".0f", 13),
    Column("above import", "rss_above_import_mib", ".0f", 13), Column("weights MiB", "weights_mib", ".0f", 12),
    Column("s/iter", "iteration_seconds_median", ".2f", 8),
]


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text table of both layouts and the ratio."""
    quotient = {key: f"{value:.2f}" for key, value in summary["shared_over_separate"].items()}
    rows = [{"layout": layout, **r} for layout, r in summary["layouts"].items()]
    return text_table(COLUMNS, [*rows, {"layout": "(b)/(a)", **quotient}])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Model size, PPO shape and where the results go."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ppo_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smollm2-135m", choices=sorted(SIZES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3, help="the first is warm-up for timing")
    add_common_arguments(p, RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run both layouts, write the JSON and print the table."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with work_directory(args.work_dir, "ppo-memory-") as work:
        assets = build_assets(work / f"assets-{args.size}", SIZES[args.size], args.tokenizer,
                              prompt_count=args.batch_size * args.iterations, prompt_length=args.prompt_length)
        results = {}
        for layout in LAYOUTS:
            spec = MemorySpec(layout, base=assets["base"], rm=assets["rm"], prompts=assets["prompts"],
                              batch_size=args.batch_size, response_length=args.response_length,
                              ppo_epochs=args.ppo_epochs, iterations=args.iterations, threads=args.threads)
            print(f"running {layout} ...", flush=True)
            results[layout] = run_worker(run_layout, spec, work, layout)
    summary = summarize(results)
    out = write_json(args.out, {"size": args.size, "shape": asdict(SIZES[args.size]), "settings": vars(args),
                                **summary, "raw": results})
    print(format_table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
