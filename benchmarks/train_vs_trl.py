"""SFT and reward-model training throughput, ours vs TRL's ``SFTTrainer`` / ``RewardTrainer``.

    python -m benchmarks.train_vs_trl            # size small, batch 8, 64 + 64 tokens, 3 repeats
    python -m benchmarks.train_vs_trl --quick

Both sides train a LoRA (same rank and targets) on the same random base (the PPO
benchmark's assets), on the same pre-tokenised rows: SFT rows are a prompt and a completion
(loss on the completion only), RM rows a prompt with a chosen and a rejected completion
(Bradley-Terry loss). Every row has exactly ``--prompt-length + --completion-length``
tokens, so there is no padding and tokens/s is ``rows x tokens / step seconds`` (median
after warm-up, one optimizer step per batch, fp32, no gradient checkpointing). Each run is
its own subprocess (peak RSS, as in :mod:`benchmarks.ppo_vs_trl`). Each stage runs each trainer
``--repeats`` times, interleaved (ours first on even repeats, TRL first on odd ones); the table
shows the median and min-max over repeats, the ratios paired by repeat, and the runs started
or run on a busy machine (:mod:`benchmarks.conditions`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.assets import SIZES, build_assets, load_benchmark_tokenizer, prompt_rows
from benchmarks.conditions import add_busy_arguments, busy_policy_from, run_measured
from benchmarks.harness import (MIB, RESULTS_DIR, BenchmarkRun, Column, StepTimes, WorkerSpec,
                                add_common_arguments, after_warmup, footer, peak_rss_bytes, text_table,
                                work_directory, write_json)
from benchmarks.repeats import format_spread, interleaved_order, paired_ratios, spread

RESULTS = RESULTS_DIR / "train_vs_trl.json"


@dataclass
class TrainSpec(WorkerSpec):
    """One training-throughput run (``stage`` sft or rm, ``trainer`` ours or trl)."""

    stage: str
    trainer: str
    base: str
    rows: str
    warmup: int = 2
    steps: int = 5
    lr: float = 1e-4


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

    from benchmarks.loop_parts import StepClock, fit
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
            ids = torch.tensor([r["prompt"] + r["chosen"] for r in items]
                               + [r["prompt"] + r["rejected"] for r in items])
            n = len(items)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "chosen_index": torch.arange(n),
                    "rejected_index": torch.arange(n, 2 * n), "margin": torch.zeros(n)}

    class Rows(L.LightningDataModule):
        """The rows in order, ``batch_size`` a step."""

        def __init__(self) -> None:
            super().__init__()
            self.batch_size = spec.batch_size

        def train_dataloader(self) -> DataLoader:
            return DataLoader(rows, batch_size=spec.batch_size, shuffle=False, collate_fn=collate, drop_last=True)

    clock = StepClock()
    fit(module, Rows(), [clock], max_steps=spec.warmup + spec.steps)
    return clock.seconds, sum(p.numel() for p in module.trainable_parameters())


def _trl(spec: TrainSpec, rows: list[dict[str, list[int]]]) -> tuple[list[float], int]:
    """Train with TRL's SFTTrainer or RewardTrainer; per-step seconds and trainable parameters."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from benchmarks.assets import peft_lora

    class Clock(StepTimes, TrainerCallback):
        """Wall time of each optimizer step."""

        on_train_begin, on_step_end = StepTimes.start, StepTimes.lap

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
            trainer: Any = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                      peft_config=peft_lora(spec.lora_r, spec.lora_alpha, "CAUSAL_LM"),
                                      callbacks=[clock])
        else:
            from transformers import AutoModelForSequenceClassification
            from trl import RewardConfig, RewardTrainer

            model = AutoModelForSequenceClassification.from_pretrained(
                spec.base, num_labels=1, dtype=torch.float32, local_files_only=True)
            model.config.pad_token_id = tokenizer.pad_token_id
            data = Dataset.from_dict({"chosen_ids": [r["prompt"] + r["chosen"] for r in rows],
                                      "rejected_ids": [r["prompt"] + r["rejected"] for r in rows]})
            config = RewardConfig(output_dir=root, **common)
            trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                    peft_config=peft_lora(spec.lora_r, spec.lora_alpha, "SEQ_CLS"),
                                    callbacks=[clock])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    return clock.seconds, trainable


def measure_training(spec: TrainSpec) -> dict[str, Any]:
    """Run one training spec: per-step seconds, trainable parameters and peak RSS."""
    rows = json.loads(Path(spec.rows).read_text())[: spec.batch_size * (spec.warmup + spec.steps)]
    seconds, trainable = (_ours if spec.trainer == "ours" else _trl)(spec, rows)
    return {"spec": asdict(spec), "step_seconds": seconds, "trainable_params": trainable,
            "peak_rss_bytes": peak_rss_bytes()}


# -- orchestration ----------------------------------------------------------------------------
TRAINERS = ("ours", "trl")
COLUMNS = [
    Column("stage", "stage", left=True), Column("trainer", "trainer", left=True),
    Column("s/step", "seconds"), Column("tokens/s", "tokens_per_s"), Column("peak MiB", "peak"),
    Column("ours / TRL tokens/s", "ratio_tokens_per_s"), Column("ours / TRL peak", "ratio_peak"),
    Column("busy runs", "busy"),
]


def summarize_stage(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A stage's repeats (run rows with ``trainer`` and ``repeat``): per trainer the median and
    range of seconds per step, tokens/s and peak RSS, busy runs; ours / TRL ratios paired by
    repeat."""
    summary: dict[str, Any] = {}
    for trainer in TRAINERS:
        own = sorted((r for r in runs if r["trainer"] == trainer), key=lambda r: r["repeat"])
        if own:
            summary[trainer] = {key: spread([r[key] for r in own])
                                for key in ("step_seconds_median", "tokens_per_s", "peak_rss_mib")}
            summary[trainer].update(repeats=len(own), busy_runs=sum(r["busy"] for r in own),
                                    trainable_params=own[0]["trainable_params"])
    if len(summary) == len(TRAINERS):
        pairs = {r["repeat"]: r for r in runs if r["trainer"] == "trl"}
        ours = [r for r in runs if r["trainer"] == "ours" and r["repeat"] in pairs]
        summary["ratios_ours_over_trl"] = {
            name: spread(paired_ratios([r[key] for r in ours], [pairs[r["repeat"]][key] for r in ours]))
            for name, key in (("tokens_per_s", "tokens_per_s"), ("peak_rss", "peak_rss_mib"))}
    return summary


def table_rows(stages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per stage and trainer: ``median [min-max]`` over repeats, ratios on ours' row."""
    rows = []
    for stage in stages:
        ratio = stage.get("ratios_ours_over_trl", {})
        for trainer in TRAINERS:
            t = stage.get(trainer)
            if t is None:
                continue
            rows.append({"stage": stage["stage"], "trainer": trainer,
                         "seconds": format_spread(t["step_seconds_median"]),
                         "tokens_per_s": format_spread(t["tokens_per_s"], ".0f"),
                         "peak": format_spread(t["peak_rss_mib"], ".0f"),
                         "ratio_tokens_per_s": format_spread(ratio.get("tokens_per_s")) if trainer == "ours" else "",
                         "ratio_peak": format_spread(ratio.get("peak_rss")) if trainer == "ours" else "",
                         "busy": f"{t['busy_runs']}/{t['repeats']}" if t["busy_runs"] else ""})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Size, stages, batch shape, steps, repeats and where the results go (``--quick``: a smoke run)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--stages", default="sft,rm")
    parser.add_argument("--batch-size", type=int, default=8, help="rows (SFT) or pairs (RM) per step")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per trainer and stage, ours first on even repeats (default 3; --quick 1)")
    add_busy_arguments(parser)
    add_common_arguments(parser, RESULTS)
    parser.add_argument("--quick", action="store_true", help="batch 4, 32 + 32 tokens, 1 + 2 steps, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.prompt_length, args.completion_length, args.warmup, args.steps = 4, 32, 32, 1, 2
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    try:
        args.busy_policy = busy_policy_from(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    """Run SFT and RM for both trainers, interleaved repeats; print tokens/s and peak RSS, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    session = BenchmarkRun("train_vs_trl", argv)
    count = args.batch_size * (args.warmup + args.steps)
    tokens_per_row = args.prompt_length + args.completion_length
    stages = []
    with work_directory(args.work_dir, "train-bench-") as work:
        assets = build_assets(work / args.size, SIZES[args.size], args.tokenizer, 1, 8)
        rows_file = work / f"rows-{args.prompt_length}-{args.completion_length}.json"
        write_rows(rows_file, load_benchmark_tokenizer(assets["base"]), count, args.prompt_length,
                   args.completion_length)
        for stage in [s.strip() for s in args.stages.split(",") if s.strip()]:
            runs = []
            for repeat in range(args.repeats):
                for trainer in interleaved_order(TRAINERS, repeat):
                    print(f"[bench] {stage} repeat {repeat + 1}/{args.repeats}: {trainer} ...", flush=True)
                    spec = TrainSpec(stage=stage, trainer=trainer, base=assets["base"], rows=str(rows_file),
                                     batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                                     threads=args.threads)
                    result = run_measured(measure_training, spec, work, f"{stage}-{trainer}-r{repeat}",
                                          args.busy_policy)
                    seconds = after_warmup(result["step_seconds"], args.warmup)
                    step = statistics.median(seconds)
                    tokens = args.batch_size * tokens_per_row * (2 if stage == "rm" else 1)
                    runs.append({"trainer": trainer, "repeat": repeat, "step_seconds_median": step,
                                 "step_seconds": seconds, "tokens_per_s": tokens / step,
                                 "peak_rss_mib": result["peak_rss_bytes"] / MIB,
                                 "trainable_params": result["trainable_params"],
                                 "busy": result["conditions"]["busy"], "conditions": result["conditions"]})
            stages.append({"stage": stage, **summarize_stage(runs), "runs": runs})
    report = session.report(
        {"size": args.size, "shape": asdict(SIZES[args.size]), "batch_size": args.batch_size,
         "prompt_length": args.prompt_length, "completion_length": args.completion_length,
         "warmup": args.warmup, "steps": args.steps, "lora_r": 8, "dtype": "float32", "repeats": args.repeats,
         "order": "ours first on even repeats, TRL first on odd ones", "busy_policy": asdict(args.busy_policy)},
        runs=stages,
    )
    write_json(args.out, report)
    print(text_table(COLUMNS, table_rows(stages)))
    print("\n" + footer(report, args.out))


if __name__ == "__main__":
    main()
