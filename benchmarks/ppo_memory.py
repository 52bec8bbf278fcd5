"""Peak memory of PPO with one shared base vs separate models, same settings.

    python -m benchmarks.ppo_memory                 # SmolLM2-135M-shaped base, ~5 min on 2 CPU cores
    python -m benchmarks.ppo_memory --size small    # a seconds-long smoke run

Two layouts of the same PPO (same random Llama-style base, reward weights, prompts, batch,
response length, PPO epochs, LoRA rank; policy and critic both trained as LoRA adapters):

- ``separate``: policy (base + LoRA), reference (a frozen copy of the base), critic (another
  copy of the base + its own LoRA + value head) and reward model (its own merged copy): four
  sets of base weights, the layout of TRL / DeepSpeed-Chat style trainers.
- ``shared``: one frozen base with named adapters: ``policy``, ``value`` (critic) and
  ``reward``; the reference is the base with the adapters disabled. One set of base weights.

Each layout runs in its own subprocess (``--worker``), so its peak RSS (and on CUDA its peak
allocated GPU memory) is its own. Results go to ``benchmarks/results/ppo_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.assets import DEFAULT_TOKENIZER, REPO_ROOT, SIZES, build_assets
from benchmarks.workers import peak_rss_bytes

RESULTS = REPO_ROOT / "benchmarks" / "results" / "ppo_memory.json"
MIB = 2**20
LAYOUTS = ("separate", "shared")


@dataclass
class MemorySpec:
    """One layout's run (everything else is the same for both layouts)."""

    layout: str  # "separate" or "shared"
    base: str
    rm: str
    prompts: str
    batch_size: int = 8
    response_length: int = 32
    ppo_epochs: int = 2
    iterations: int = 3
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    threads: int | None = None


def weight_bytes(*modules: Any) -> int:
    """Bytes of the distinct parameter and buffer storages held by ``modules`` (shared
    tensors, e.g. tied embeddings or one base under several adapters, count once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def separate_models_module():
    """``PPOModule`` with the reference, critic and reward as their own models (layout (a))."""
    from torch import nn

    from rlhf.models.forward import disable_dropout
    from rlhf.models.loading import apply_lora, load_causal_lm
    from rlhf.ppo.module import POLICY, VALUE, PPOModule
    from rlhf.models.forward import trunk_hidden
    from rlhf.models.logprobs import response_logprobs

    class SeparateModelsPPO(PPOModule):
        """Policy, reference, critic and reward as four models; the maths is PPOModule's."""

        def configure_model(self) -> None:
            if self.model is not None:
                return
            self.model = apply_lora(load_causal_lm(self.base), self.base.lora, adapter_name=POLICY)
            disable_dropout(self.model)
            self.reference_model = load_causal_lm(self.base).eval().requires_grad_(False)
            self.value_model = apply_lora(load_causal_lm(self.base), self.base.lora, adapter_name=VALUE)
            disable_dropout(self.value_model)
            hidden = self.model.get_base_model().config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            if self.scorer is None:
                self.scorer = self.build_scorer()  # reward.share_base is off: its own model

        def adapter_values(self, input_ids, attention_mask, start):
            value_hidden = trunk_hidden(self.value_model, input_ids, attention_mask)
            return self._values_from(value_hidden[:, start - 1 : -1])

        def reference_logprobs(self, input_ids, attention_mask, start):
            import torch

            with torch.no_grad():
                hidden = trunk_hidden(self.reference_model, input_ids, attention_mask)
                logp, _ = response_logprobs(
                    self.reference_model, hidden, start, input_ids[:, start:], self.sampling.temperature
                )
            return logp

    return SeparateModelsPPO


def run_layout(spec: MemorySpec) -> dict[str, Any]:
    """Fit ``spec.iterations`` PPO iterations in ``spec.layout``; peak memory and timings."""
    import lightning as L
    import torch

    from benchmarks.loop_parts import FixedPrompts, StepClock
    from rlhf.models.loading import LoraSettings, ModelSettings
    from rlhf.ppo.module import PPOModule
    from rlhf.generation import SamplingSettings
    from rlhf.ppo.settings import RewardSettings, UpdateSettings

    rows = json.loads(Path(spec.prompts).read_text())["rows"]
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
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="auto", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root,
        )
        trainer.fit(module, datamodule=FixedPrompts(rows, spec.batch_size))
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


def run_worker(spec: MemorySpec, work_dir: Path) -> dict[str, Any]:
    """One layout in a fresh subprocess (so peak RSS is its own)."""
    spec_file = work_dir / f"{spec.layout}.spec.json"
    result_file = work_dir / f"{spec.layout}.result.json"
    log_file = work_dir / f"{spec.layout}.log"
    spec_file.write_text(json.dumps(asdict(spec)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.ppo_memory", "--worker", str(spec_file),
                               str(result_file)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{spec.layout} worker failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-layout MiB and seconds, and the ratios shared / separate."""
    rows = {}
    for layout, r in results.items():
        seconds = r["iteration_seconds"][1:] or r["iteration_seconds"]  # the first is warm-up
        rows[layout] = {
            "peak_rss_mib": r["peak_rss_bytes"] / MIB,
            "rss_above_import_mib": (r["peak_rss_bytes"] - r["import_rss_bytes"]) / MIB,
            "weights_mib": r["weight_bytes"] / MIB,
            "cuda_peak_allocated_mib": r["cuda_peak_allocated_bytes"] / MIB if r["cuda_peak_allocated_bytes"] else None,
            "trainable_params": r["trainable_params"],
            "iteration_seconds_median": statistics.median(seconds),
        }
    a, b = rows["separate"], rows["shared"]
    ratios = {
        key: b[key] / a[key]
        for key in ("peak_rss_mib", "rss_above_import_mib", "weights_mib", "cuda_peak_allocated_mib",
                    "iteration_seconds_median")
        if a[key] and b[key] is not None
    }
    return {"layouts": rows, "shared_over_separate": ratios}


def format_table(summary: dict[str, Any]) -> str:
    """Plain-text table of both layouts and the ratio."""
    lines = [f"{'layout':<10}{'peak RSS MiB':>14}{'above import':>14}{'weights MiB':>13}{'s/iter':>9}"]
    for layout, r in summary["layouts"].items():
        lines.append(f"{layout:<10}{r['peak_rss_mib']:>14.0f}{r['rss_above_import_mib']:>14.0f}"
                     f"{r['weights_mib']:>13.0f}{r['iteration_seconds_median']:>9.2f}")
    q = summary["shared_over_separate"]
    lines.append(f"{'(b)/(a)':<10}{q['peak_rss_mib']:>14.2f}{q['rss_above_import_mib']:>14.2f}"
                 f"{q['weights_mib']:>13.2f}{q['iteration_seconds_median']:>9.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ppo_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smollm2-135m", choices=sorted(SIZES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=3, help="the first is warm-up for timing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--work-dir", default=None, help="assets and logs (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        spec = MemorySpec(**json.loads(Path(argv[1]).read_text()))
        if spec.threads:
            import torch

            torch.set_num_threads(spec.threads)
        Path(argv[2]).write_text(json.dumps(run_layout(spec), indent=2))
        return
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        assets = build_assets(work / f"assets-{args.size}", SIZES[args.size], args.tokenizer,
                              prompt_count=args.batch_size * args.iterations, prompt_length=args.prompt_length)
        results = {}
        for layout in LAYOUTS:
            spec = MemorySpec(layout, assets["base"], assets["rm"], assets["prompts"], args.batch_size,
                              args.response_length, args.ppo_epochs, args.iterations, threads=args.threads)
            print(f"running {layout} ...", flush=True)
            results[layout] = run_worker(spec, work)
    summary = summarize(results)
    record = {"size": args.size, "shape": asdict(SIZES[args.size]), "settings": vars(args), **summary,
              "raw": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(format_table(summary))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
