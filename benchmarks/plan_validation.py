"""The memory planner (``python -m rlhf.plan``) against measured peaks, on CPU.

    python -m benchmarks.plan_validation        # tiny + SmolLM2-135M shapes, 1 and 2 processes (20 min)
    python -m benchmarks.plan_validation --models tiny --stages sft --single-only   # a 1-minute smoke run

Each row fits one stage (sft, rm, dpo, ppo, rejection) for two optimizer steps (PPO: one
iteration of two PPO epochs; rejection: one RAFT round of two epochs) through its
LightningModule and data module, on 1 process or on 2 (gloo, DDP or FSDP2), in fresh
subprocesses (:func:`benchmarks.harness.run_worker`; Lightning starts the second rank). What is
measured, per process: the peak RSS from the start of training (the high-water mark is reset
there, after the weights are loaded: loading's own transient copies are not a training step's)
minus the RSS after the imports; the row's value is the larger of the ranks'. What it is compared
with: the planner's total for the same shape with ``--device cpu``, whose overhead term is the
measured value of a probe run (SFT on the tiny model, 1 sequence of 8 tokens, 1 process) less
the planner's tensors for the probe: what a process holds beyond the planner's tensors.

Models: ``tiny`` is the test suite's tiny Llama shape (hidden 64, 2 layers) with SmolLM2's 49k
tokenizer; ``135m`` is SmolLM2-135M-Instruct's ``config.json`` and tokenizer with random weights
(a random model rarely samples EOS, so responses run to their full length, as the planner
assumes). float32 throughout, LoRA r=16 on all seven projections. Every batch holds one shorter
row, so it is padded, as the planner assumes. Results: ``benchmarks/results/plan_validation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    MIB,
    REPO_ROOT,
    RESULTS_DIR,
    BenchmarkRun,
    Column,
    WorkerSpec,
    footer,
    markdown_table,
    run_worker,
    text_table,
    work_directory,
    write_json,
)

RESULTS = RESULTS_DIR / "plan_validation.json"
SMOLLM2 = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
STAGES = ("sft", "rm", "dpo", "ppo", "rejection")
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128}
TOLERANCE = 0.25
# glibc raises its mmap threshold as large blocks are freed, after which freed activations stay
# in the heap and a second step's peak RSS grows by the first's (a CPU allocator effect; CUDA's
# caching allocator reuses freed blocks). A fixed threshold returns them to the OS, so RSS
# follows live tensors. Rows marked "glibc default" run without it, to show the difference.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}
# Rows measured on 2 processes: (stage, strategy). The rejection stage is single-process.
TWO_PROCESS = (("sft", "ddp"), ("sft", "fsdp2"), ("rm", "fsdp2"), ("dpo", "fsdp2"), ("ppo", "fsdp2"))
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "box", "jugs", "of", "mead"]


@dataclass
class StageRunSpec(WorkerSpec):
    """One stage's fit: its model and data, processes and strategy, lengths in tokens."""

    stage: str = "sft"
    model: str = ""
    reward_model: str = ""
    data: str = ""
    processes: int = 1
    strategy: str = "auto"
    prompt: int = 48
    response: int = 48
    samples_per_prompt: int = 2
    steps: int = 2
    checkpointing: bool = False


# -- assets --------------------------------------------------------------------------------------
def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed + i * 7) % len(WORDS)] for i in range(n_words))


def write_data(out: Path, rows: int, prompt: int, response: int) -> str:
    """Demonstrations, comparisons and prompts whose prompts pass ``prompt`` tokens and whose
    responses pass ``response`` (truncation makes them exact), except in row 1: a response (the
    rejected one of a comparison) 8 words short, and a prompt half as long, so every batch is
    padded while SFT's labelled tokens stay close to ``batch x response``."""
    out.mkdir(parents=True, exist_ok=True)
    long_p, long_r = 2 * prompt, 2 * response
    demos, prefs, prompts = [], [], []
    for i in range(rows):
        short_r = response - 8 if i == 1 else long_r
        p = text(long_p, i)
        demos.append({"prompt": p, "response": text(short_r, i + 1)})
        prefs.append({"prompt": p, "chosen": text(long_r, i + 1), "rejected": text(short_r, i + 3)})
        prompts.append({"prompt": text(prompt // 2 if i == 1 else long_p, i)})
    for name, items in (("demos", demos), ("prefs", prefs), ("prompts", prompts)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    return str(out)


def build_models(out: Path, name: str) -> dict[str, str]:
    """``base/`` (random Llama of ``name``'s shape + SmolLM2's tokenizer) and ``rm/`` (a random
    LoRA reward model on it, saved as an adapter so PPO and rejection share the base)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlhf.models.loading import (
        LoraSettings,
        ModelSettings,
        apply_lora,
        load_causal_lm,
    )
    from rlhf.models.reward import RewardModel

    base, rm = out / name / "base", out / name / "rm"
    if (rm / "reward_model.json").is_file():
        return {"base": str(base), "rm": str(rm)}
    tokenizer = AutoTokenizer.from_pretrained(str(SMOLLM2), local_files_only=True)
    config = LlamaConfig.from_pretrained(str(SMOLLM2), local_files_only=True)
    if name == "tiny":
        for key, value in TINY.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(base)
    tokenizer.save_pretrained(base)
    backbone = apply_lora(load_causal_lm(ModelSettings(str(base), dtype="float32")), LoraSettings(r=16, alpha=32))
    head = torch.nn.Linear(config.hidden_size, 1)
    RewardModel(backbone, head).save_pretrained(rm, tokenizer=tokenizer, merge=False)
    return {"base": str(base), "rm": str(rm)}


# -- the worker ----------------------------------------------------------------------------------
def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (``VmHWM``) to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_rss() -> int:
    """This process's RSS high-water mark, ``VmHWM`` (Linux). Unlike ``ru_maxrss``, which a
    child starts with its parent's RSS at the fork, it counts only this program's pages."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def stage_objects(spec: StageRunSpec) -> tuple[Any, Any]:
    """The stage's LightningModule and data module for ``spec`` (float32, LoRA r=16)."""
    from rlhf.data import (
        ComparisonDataModule,
        DemonstrationDataModule,
        PromptDataModule,
    )
    from rlhf.data.datasource import DataSource
    from rlhf.generation import SamplingSettings
    from rlhf.models.loading import LoraSettings, ModelSettings

    base = ModelSettings(spec.model, dtype="float32", lora=LoraSettings(r=spec.lora_r, alpha=2 * spec.lora_r),
                         gradient_checkpointing=spec.checkpointing)
    data = Path(spec.data)
    lengths = {"val_fraction": 0.0, "batch_size": spec.batch_size, "max_prompt_length": spec.prompt,
               "max_length": spec.prompt + spec.response}
    sampling = SamplingSettings(max_new_tokens=spec.response, temperature=1.0)
    if spec.stage == "sft":
        from rlhf.sft import SFTModule

        return SFTModule(base, lr=1e-4), DemonstrationDataModule(DataSource(str(data / "demos.jsonl")), **lengths)
    if spec.stage == "rm":
        from rlhf.rm import RewardModule

        return RewardModule(base, lr=1e-4), ComparisonDataModule(DataSource(str(data / "prefs.jsonl")), **lengths)
    if spec.stage == "dpo":
        from rlhf.dpo import DPODataModule, DPOModule

        return DPOModule(base, lr=1e-4), DPODataModule(DataSource(str(data / "prefs.jsonl")), **lengths)
    prompts = PromptDataModule(DataSource(str(data / "prompts.jsonl")), **lengths)
    if spec.stage == "ppo":
        from rlhf.ppo import PPOModule
        from rlhf.ppo.settings import RewardSettings, UpdateSettings

        module = PPOModule(base, reward=RewardSettings(model=spec.reward_model), sampling=sampling,
                           update=UpdateSettings(ppo_epochs=spec.steps), iterations=1, sample_every=0, lr=1e-5)
        return module, prompts
    from rlhf.rejection import RejectionSamplingModule

    module = RejectionSamplingModule(base, mode="raft", reward_model=spec.reward_model, sampling=sampling,
                                     samples_per_prompt=spec.samples_per_prompt, rounds=1, sft_epochs=spec.steps)
    return module, prompts


def measure_stage(spec: StageRunSpec) -> dict[str, Any]:
    """Fit ``spec.stage``; per rank: RSS after imports, at the start of training and its peak
    during training (rank 0 returns every rank's; the other ranks exit after fitting)."""
    import importlib

    import lightning as L
    import torch

    for name in ("rlhf.data", "rlhf.distributed", "rlhf.generation", f"rlhf.{spec.stage}"):
        importlib.import_module(name)  # the code the fit runs, before the baseline
    import_rss = peak_rss()
    record: dict[str, Any] = {}

    class PeakRSS(L.Callback):
        """RSS at the start of training (high-water mark reset there) and its peak at the end."""

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            reset_peak_rss()
            record["train_start_rss_bytes"] = peak_rss()

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            mine = {**record, "peak_rss_bytes": peak_rss(), "import_rss_bytes": import_rss,
                    "rank": trainer.global_rank, "optimizer_steps": trainer.global_step}
            ranks = [mine]
            if trainer.world_size > 1:
                ranks = [None] * trainer.world_size
                torch.distributed.all_gather_object(ranks, mine)
            record["ranks"] = ranks

    torch.manual_seed(spec.seed)
    module, data = stage_objects(spec)
    strategy: Any = spec.strategy
    if spec.strategy == "fsdp2":
        from rlhf.distributed import FSDP2Strategy

        strategy = FSDP2Strategy()
    automatic = spec.stage in ("sft", "rm", "dpo")
    trainer = L.Trainer(accelerator="cpu", devices=spec.processes, strategy=strategy, precision="32-true",
                        max_steps=spec.steps if automatic else -1, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[PeakRSS()],
                        default_root_dir=str(Path(spec.data) / "runs" / f"{spec.stage}-{spec.processes}"))
    trainer.fit(module, datamodule=data)
    if trainer.global_rank != 0:
        os._exit(0)  # rank 0 reports every rank's numbers
    ranks = record["ranks"]
    above = [r["peak_rss_bytes"] - r["import_rss_bytes"] for r in ranks]
    return {"stage": spec.stage, "processes": spec.processes, "strategy": spec.strategy, "ranks": ranks,
            "rss_above_import_bytes": max(above), "spec": asdict(spec)}


# -- the planner's side --------------------------------------------------------------------------
def planned(spec: StageRunSpec, overhead_bytes: int) -> dict[str, Any]:
    """The planner's total for ``spec`` on CPU (``overhead_bytes`` as its overhead term)."""
    from rlhf.planning import PlanSettings, load_shape, plan_stage

    strategy = "ddp" if spec.strategy in ("auto", "ddp") else spec.strategy
    settings = PlanSettings(gpus=spec.processes, strategy=strategy, lora_r=spec.lora_r, precision="fp32",
                            batch=spec.batch_size, prompt=spec.prompt, response=spec.response,
                            samples_per_prompt=1 if spec.stage == "ppo" else spec.samples_per_prompt,
                            device="cpu", overhead_gib=overhead_bytes / 2**30)
    plan = plan_stage(load_shape(spec.model), settings, spec.stage)
    total = plan.total(spec.checkpointing)
    train = plan.train_checkpointed if spec.checkpointing else plan.train
    return {"total_bytes": total, "tensor_bytes": total - plan.overhead,
            "resident_bytes": sum(plan.resident.values()), "terms": {**plan.resident, **train},
            "no_grad_terms": plan.no_grad}


def compare(measured: dict[str, Any], plan: dict[str, Any], overhead: int) -> dict[str, Any]:
    """One table row: measured and planned MiB, their ratio and whether it is within 25%."""
    value = measured["rss_above_import_bytes"]
    ratio = plan["total_bytes"] / value
    tensors = value - overhead
    return {"measured_mib": value / MIB, "planned_mib": plan["total_bytes"] / MIB, "ratio": ratio,
            "within_25pct": abs(ratio - 1) <= TOLERANCE, "measured_minus_overhead_mib": tensors / MIB,
            "planned_tensors_mib": plan["tensor_bytes"] / MIB,
            "tensor_ratio": plan["tensor_bytes"] / tensors if tensors > 0 else None}


COLUMNS = [Column("model", "model", width=5, left=True), Column("stage", "stage", width=9, left=True),
           Column("procs", "processes", "d", 5), Column("strategy", "strategy", width=8, left=True),
           Column("ckpt", "checkpointing", width=4, left=True), Column("allocator", "allocator", width=20, left=True),
           Column("measured MiB", "measured_mib", ".0f", 12), Column("planned MiB", "planned_mib", ".0f", 11),
           Column("planned/measured", "ratio", ".2f", 16),
           Column("tensors: measured-overhead", "measured_minus_overhead_mib", ".0f", 12),
           Column("tensors: planned", "planned_tensors_mib", ".0f", 10)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plan_validation", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,135m", help="comma-separated: tiny, 135m")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--response", type=int, default=48)
    p.add_argument("--single-only", action="store_true", help="skip the 2-process rows")
    p.add_argument("--two-process-only", action="store_true", help="only the 2-process rows")
    p.add_argument("--checkpointing-stages", default="sft,ppo",
                   help="135m stages also run with gradient checkpointing (1 process)")
    p.add_argument("--default-malloc-stages", default="sft,ppo",
                   help="135m stages also run with glibc's default allocator settings (1 process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--work-dir", default=None, help="models, data and worker logs (default: a temporary directory)")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Probe the overhead, run every row, compare with the planner, write the JSON."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = BenchmarkRun("plan_validation", sys.argv[1:] if argv is None else argv)
    models = [m for m in args.models.split(",") if m]
    stages = [s for s in args.stages.split(",") if s]
    rows, raw = [], {}
    with work_directory(args.work_dir, "plan-validation-") as work:
        data = write_data(work / "data", 4 * args.batch_size, args.prompt, args.response)
        assets = {name: build_models(work / "models", name) for name in {"tiny", *models}}
        common = {"data": data, "threads": args.threads, "batch_size": args.batch_size, "lora_r": 16}
        probe_spec = StageRunSpec(stage="sft", model=assets["tiny"]["base"], prompt=4, response=4,
                                  **{**common, "batch_size": 1})
        print("running the overhead probe ...", flush=True)
        probe = run_worker(measure_stage, probe_spec, work, "probe", extra_env=FIXED_MMAP)
        # What the process holds beyond the planner's tensors (the probe's own are a few MiB).
        overhead = max(0, probe["rss_above_import_bytes"] - planned(probe_spec, 0)["tensor_bytes"])
        raw["probe"] = probe
        # (model, stage, processes, strategy, fixed mmap threshold, gradient checkpointing)
        runs = [] if args.two_process_only else [(m, s, 1, "auto", True, False) for m in models for s in stages]
        if not args.single_only:
            runs += [(m, s, 2, strat, True, False) for m in models for s, strat in TWO_PROCESS if s in stages]
        big = [m for m in models if m == "135m"]
        runs += [(m, s, 1, "auto", True, True) for m in big for s in args.checkpointing_stages.split(",") if s in stages]
        runs += [(m, s, 1, "auto", False, False) for m in big
                 for s in args.default_malloc_stages.split(",") if s in stages]
        for model, stage, processes, strategy, fixed, checkpointing in runs:
            name = (f"{model}-{stage}-{processes}-{strategy}" + ("" if fixed else "-glibc-default")
                    + ("-checkpointing" if checkpointing else ""))
            spec = StageRunSpec(stage=stage, model=assets[model]["base"], reward_model=assets[model]["rm"],
                                processes=processes, strategy=strategy, prompt=args.prompt,
                                response=args.response, checkpointing=checkpointing, **common)
            print(f"running {name} ...", flush=True)
            measured = run_worker(measure_stage, spec, work, name, timeout=1200,
                                  extra_env=FIXED_MMAP if fixed else None)
            plan = planned(spec, overhead)
            row = {"model": model, "stage": stage, "processes": processes, "strategy": strategy,
                   "checkpointing": "yes" if checkpointing else "no",
                   "allocator": "fixed mmap threshold" if fixed else "glibc default",
                   **compare(measured, plan, overhead)}
            rows.append(row)
            raw[name] = {"measured": measured, "planned": plan}
            print(text_table(COLUMNS, [row]).splitlines()[-1], flush=True)
    settings = {**vars(args), "precision": "32-true", "lora_r": 16, "tolerance": TOLERANCE, "worker_env": FIXED_MMAP,
                "overhead_probe_mib": overhead / MIB}
    checked = [r for r in rows if r["allocator"] != "glibc default"]
    report = run.report(settings, rows=rows, all_within_25pct=all(r["within_25pct"] for r in checked), raw=raw)
    out = write_json(args.out, report)
    print(text_table(COLUMNS, rows))
    print(markdown_table(COLUMNS, rows))
    print(footer(report, out))


if __name__ == "__main__":
    main()
