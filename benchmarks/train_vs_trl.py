"""SFT and reward-model training throughput, ours vs TRL's ``SFTTrainer`` / ``RewardTrainer``.

    python -m benchmarks.train_vs_trl            # size small, batch 8, 64 + 64 tokens
    python -m benchmarks.train_vs_trl --quick

Both sides train a LoRA (same rank and targets) on the same random base (the PPO
benchmark's assets), on the same pre-tokenised rows: SFT rows are a prompt and a completion
(loss on the completion only), RM rows a prompt with a chosen and a rejected completion
(Bradley-Terry loss). Every row has exactly ``--prompt-length + --completion-length``
tokens, so there is no padding and tokens/s is ``rows x tokens / step seconds`` (median
after warm-up, one optimizer step per batch, fp32, no gradient checkpointing). Each run is
its own subprocess (peak RSS, as in :mod:`benchmarks.ppo_vs_trl`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.assets import DEFAULT_TOKENIZER, REPO_ROOT, SIZES, build_assets, load_benchmark_tokenizer, prompt_rows

RESULTS = REPO_ROOT / "benchmarks" / "results" / "train_vs_trl.json"
MIB = 2**20


@dataclass
class TrainSpec:
    """One training-throughput run (``stage`` sft or rm, ``trainer`` ours or trl)."""

    stage: str
    trainer: str
    base: str
    rows: str
    batch_size: int = 8
    warmup: int = 2
    steps: int = 5
    lr: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    threads: int | None = None


def write_rows(path: Path, tokenizer: Any, count: int, prompt_length: int, completion_length: int) -> None:
    """Token rows for both stages: ``prompt``, ``chosen`` and ``rejected`` of fixed lengths
    (completions are other prompts' tokens: throughput does not depend on the text)."""
    pool = prompt_rows(tokenizer, 3 * count, max(prompt_length, completion_length))
    rows = [{"prompt": pool[3 * i][-prompt_length:], "chosen": pool[3 * i + 1][:completion_length],
             "rejected": pool[3 * i + 2][:completion_length]} for i in range(count)]
    path.write_text(json.dumps(rows))


# -- workers ---------------------------------------------------------------------------------
def _ours(spec: TrainSpec, rows: list[dict[str, list[int]]]) -> tuple[list[float], int]:
    """Fit our SFT or reward module; per-step seconds and trainable parameter count."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.loop_parts import StepClock
    from rlhf.models.loading import LoraSettings, ModelSettings

    base = ModelSettings(spec.base, dtype="float32", lora=LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha))
    if spec.stage == "sft":
        from rlhf.sft.module import SFTModule

        module: L.LightningModule = SFTModule(base, lr=spec.lr)

        def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
            ids = torch.tensor([r["prompt"] + r["chosen"] for r in items])
            labels = torch.tensor([[-100] * len(r["prompt"]) + r["chosen"] for r in items])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    else:
        from rlhf.rm.module import RewardModule

        module = RewardModule(base, lr=spec.lr)

        def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
            ids = torch.tensor([r["prompt"] + r["chosen"] for r in items] + [r["prompt"] + r["rejected"] for r in items])
            n = len(items)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "chosen_index": torch.arange(n),
                    "rejected_index": torch.arange(n, 2 * n), "margin": torch.zeros(n)}

    class Rows(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.batch_size = spec.batch_size

        def train_dataloader(self) -> DataLoader:
            return DataLoader(rows, batch_size=spec.batch_size, shuffle=False, collate_fn=collate, drop_last=True)

    clock = StepClock()
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="auto", devices=1, max_steps=spec.warmup + spec.steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock], default_root_dir=root)
        trainer.fit(module, datamodule=Rows())
    return clock.seconds, sum(p.numel() for p in module.trainable_parameters())


def _trl(spec: TrainSpec, rows: list[dict[str, list[int]]]) -> tuple[list[float], int]:
    """Train with TRL's SFTTrainer or RewardTrainer; per-step seconds and trainable parameters."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from benchmarks.assets import LORA_TARGETS

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._last = 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self._last = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            self.seconds.append(now - self._last)
            self._last = now

    tokenizer = AutoTokenizer.from_pretrained(spec.base, local_files_only=True)
    common = dict(report_to="none", save_strategy="no", seed=spec.seed, per_device_train_batch_size=spec.batch_size,
                  gradient_accumulation_steps=1, max_steps=spec.warmup + spec.steps, learning_rate=spec.lr,
                  bf16=False, gradient_checkpointing=False, disable_tqdm=True, logging_steps=1,
                  dataloader_num_workers=0, lr_scheduler_type="linear", max_length=None)
    clock = Clock()
    with tempfile.TemporaryDirectory() as root:
        if spec.stage == "sft":
            from transformers import AutoModelForCausalLM
            from trl import SFTConfig, SFTTrainer

            model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32, local_files_only=True)
            data = Dataset.from_dict({
                "input_ids": [r["prompt"] + r["chosen"] for r in rows],
                "completion_mask": [[0] * len(r["prompt"]) + [1] * len(r["chosen"]) for r in rows],
            })
            config = SFTConfig(output_dir=root, packing=False, completion_only_loss=True, **common)
            peft = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                              target_modules=LORA_TARGETS, bias="none", task_type="CAUSAL_LM")
            trainer: Any = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                      peft_config=peft, callbacks=[clock])
        else:
            from transformers import AutoModelForSequenceClassification
            from trl import RewardConfig, RewardTrainer

            model = AutoModelForSequenceClassification.from_pretrained(
                spec.base, num_labels=1, dtype=torch.float32, local_files_only=True)
            model.config.pad_token_id = tokenizer.pad_token_id
            data = Dataset.from_dict({"chosen_ids": [r["prompt"] + r["chosen"] for r in rows],
                                      "rejected_ids": [r["prompt"] + r["rejected"] for r in rows]})
            config = RewardConfig(output_dir=root, **common)
            peft = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                              target_modules=LORA_TARGETS, bias="none", task_type="SEQ_CLS")
            trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                    peft_config=peft, callbacks=[clock])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    return clock.seconds, trainable


def worker(argv: list[str]) -> None:
    """``SPEC.json RESULT.json``: run one training spec in this process."""
    from benchmarks.workers import peak_rss_bytes

    spec = TrainSpec(**json.loads(Path(argv[0]).read_text()))
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    rows = json.loads(Path(spec.rows).read_text())[: spec.batch_size * (spec.warmup + spec.steps)]
    seconds, trainable = (_ours if spec.trainer == "ours" else _trl)(spec, rows)
    result = {"spec": asdict(spec), "step_seconds": seconds, "trainable_params": trainable,
              "peak_rss_bytes": peak_rss_bytes()}
    Path(argv[1]).write_text(json.dumps(result, indent=2))


# -- orchestration ----------------------------------------------------------------------------
def run_worker(spec: TrainSpec, work: Path, name: str) -> dict[str, Any]:
    """Run :func:`worker` in a subprocess; its result (its log's tail on failure)."""
    import subprocess

    spec_file, result_file, log_file = (work / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_file.write_text(json.dumps(asdict(spec)))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.train_vs_trl", "--worker", str(spec_file),
                               str(result_file)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--stages", default="sft,rm")
    parser.add_argument("--batch-size", type=int, default=8, help="rows (SFT) or pairs (RM) per step")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--quick", action="store_true", help="batch 4, 32 + 32 tokens, 1 + 2 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.prompt_length, args.completion_length, args.warmup, args.steps = 4, 32, 32, 1, 2
    return args


def main(argv: list[str] | None = None) -> None:
    """Run SFT and RM for both trainers, print tokens/s and peak RSS, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1:])
        return
    args = parse_args(argv)
    from benchmarks.ppo_vs_trl import load_average, machine_busy, machine_info

    started, load_before = time.time(), load_average()
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="train-bench-")
    work = Path(args.work_dir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    count = args.batch_size * (args.warmup + args.steps)
    runs = []
    try:
        assets = build_assets(work / args.size, SIZES[args.size], args.tokenizer, 1, 8)
        rows_file = work / f"rows-{args.prompt_length}-{args.completion_length}.json"
        write_rows(rows_file, load_benchmark_tokenizer(assets["base"]), count, args.prompt_length,
                   args.completion_length)
        tokens_per_row = args.prompt_length + args.completion_length
        for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
            row: dict[str, Any] = {"stage": stage}
            for trainer in ("ours", "trl"):
                print(f"[bench] {stage}: {trainer} ...", flush=True)
                spec = TrainSpec(stage=stage, trainer=trainer, base=assets["base"], rows=str(rows_file),
                                 batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                                 threads=args.threads)
                result = run_worker(spec, work, f"{stage}-{trainer}")
                seconds = result["step_seconds"][args.warmup:]
                step = statistics.median(seconds)
                tokens = args.batch_size * tokens_per_row * (2 if stage == "rm" else 1)
                row[trainer] = {"step_seconds_median": step, "step_seconds": seconds, "tokens_per_s": tokens / step,
                                "peak_rss_mib": result["peak_rss_bytes"] / MIB,
                                "trainable_params": result["trainable_params"]}
            row["ratios_ours_over_trl"] = {
                "tokens_per_s": row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"],
                "peak_rss": row["ours"]["peak_rss_mib"] / row["trl"]["peak_rss_mib"],
            }
            runs.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {
        "benchmark": "train_vs_trl", "command": "python -m benchmarks.train_vs_trl " + " ".join(argv),
        "settings": {"size": args.size, "shape": asdict(SIZES[args.size]), "batch_size": args.batch_size,
                     "prompt_length": args.prompt_length, "completion_length": args.completion_length,
                     "warmup": args.warmup, "steps": args.steps, "lora_r": 8, "dtype": "float32"},
        "machine": machine_info(), "load_average_before": load_before, "load_average_after": load_average(),
        "machine_busy_at_start": machine_busy(load_before, os.cpu_count()),
        "wall_seconds": time.time() - started, "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'stage':<6}{'trainer':<8}{'s/step':>8}{'tokens/s':>10}{'peak MiB':>10}   ratio tok/s  peak")
    for row in runs:
        for trainer in ("ours", "trl"):
            r = row[trainer]
            line = f"{row['stage']:<6}{trainer:<8}{r['step_seconds_median']:>8.2f}{r['tokens_per_s']:>10.0f}" \
                   f"{r['peak_rss_mib']:>10.0f}"
            if trainer == "ours":
                ratios = row["ratios_ours_over_trl"]
                line += f"   {ratios['tokens_per_s']:>11.2f}{ratios['peak_rss']:>6.2f}"
            print(line)
    print(f"\nwall {report['wall_seconds']:.0f}s, load average before {load_before} after "
          f"{report['load_average_after']}; written to {args.out}")


if __name__ == "__main__":
    main()
