"""``python -m rlhf.plan``: memory per GPU of each stage, before renting the GPUs.

    python -m rlhf.plan --model 8b --gpus 8 --gpu-mem 80 --strategy fsdp2 --lora-r 16 \\
        --batch 8 --prompt 512 --response 512
    python -m rlhf.plan --model models/SmolLM2-135M-Instruct --gpus 1 --json

Reads only the model's ``config.json`` (a local folder, a Hub id in the HF cache) or a named
shape (``135m``, ``1b``, ``8b``, ``70b``), and prints for each stage (sft, rm, dpo, ppo,
rejection) the frozen base, adapters, gradients, optimizer state, activations with and without
gradient checkpointing, the LM-head logits, the KV cache and passes without gradients, an
overhead term, the total and whether it fits in ``--gpu-mem``. The formulas and their
validation: ``docs/scaling.md#memory-planner``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from rlhf.planning.memory import (
    GIB,
    STAGES,
    PlanSettings,
    StagePlan,
    base_weight_bytes,
    plan_all,
)
from rlhf.planning.shapes import (
    PRESETS,
    PROJECTIONS,
    ModelShape,
    ModelShapeError,
    load_shape,
    lora_params,
    total_params,
)


def build_parser() -> argparse.ArgumentParser:
    """The planner's options (``--help`` lists them with their defaults)."""
    p = argparse.ArgumentParser(prog="python -m rlhf.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"a preset ({', '.join(PRESETS)}), a local model folder or a Hub id (config.json only)")
    p.add_argument("--gpus", type=int, default=1, help="processes (one GPU each)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="memory per GPU, GiB")
    p.add_argument("--strategy", choices=("ddp", "fsdp2", "fsdp"), default="ddp",
                   help="ddp replicates the model; fsdp2/fsdp shard base, adapters, gradients and optimizer")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--lora-targets", default=",".join(PROJECTIONS),
                   help="comma-separated projections with LoRA (the stages' default: all seven)")
    p.add_argument("--quant", choices=("none", "8bit", "4bit"), default="none", help="bitsandbytes base")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: trainer precision bf16-mixed (bf16 frozen base); fp32: 32-true")
    p.add_argument("--batch", type=int, default=8,
                   help="per GPU: sequences (sft), comparisons (rm, dpo), prompts (ppo, rejection)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens")
    p.add_argument("--response", type=int, default=512, help="response tokens")
    p.add_argument("--grad-checkpointing", choices=("both", "on", "off"), default="both",
                   help="which totals to print")
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="responses per prompt (default: the stage's, ppo 1, rejection 4)")
    p.add_argument("--critic", choices=("shared", "adapter"), default="shared",
                   help="PPO critic: a head on the policy trunk, or its own LoRA adapter (a second trunk pass)")
    p.add_argument("--reward", choices=("shared", "separate"), default="shared",
                   help="ppo/rejection reward model: an adapter on the policy's base, or its own model")
    p.add_argument("--ppo-micro-batch", type=int, default=None,
                   help="PPO sequences per forward/backward (default: the whole rollout, as update.micro_batch_size null)")
    p.add_argument("--rejection-micro-batch", type=int, default=None,
                   help="rejection sequences per forward/backward (default: min(8, batch))")
    p.add_argument("--no-padding", action="store_true",
                   help="batches without padding (no attention mask: smaller attention activations)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: no CUDA overhead term (compare with RSS above the import baseline)")
    p.add_argument("--overhead-gib", type=float, default=None,
                   help="fixed overhead per process (default: 2.0 on cuda, assumed; 0 on cpu)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to plan")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def settings_from_args(args: argparse.Namespace) -> PlanSettings:
    """:class:`PlanSettings` from parsed arguments (``ValueError`` names a bad one)."""
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return PlanSettings(
        gpus=args.gpus, gpu_mem_gib=args.gpu_mem, strategy=args.strategy, lora_r=args.lora_r,
        lora_targets=targets, quant=args.quant, precision=args.precision, batch=args.batch, prompt=args.prompt,
        response=args.response, samples_per_prompt=args.samples_per_prompt, critic=args.critic,
        reward=args.reward, ppo_micro_batch=args.ppo_micro_batch, rejection_micro_batch=args.rejection_micro_batch,
        device=args.device, overhead_gib=args.overhead_gib, padded=not args.no_padding,
    )


def verdict(total: int, s: PlanSettings) -> str:
    return "fits" if total <= s.gpu_mem_gib * GIB else "does not fit"


def general_notes(shape: ModelShape, s: PlanSettings) -> list[str]:
    """Notes for every stage: global batch, loading into host memory."""
    notes = [f"global batch: {s.batch} x {s.gpus} processes = {s.batch * s.gpus}"]
    if s.quant == "none":
        full = base_weight_bytes(shape, "none", s.precision) / GIB
        notes.append(f"loading: each process reads the whole base ({full:.1f} GiB) into CPU memory before "
                     "sharding or moving it; a safetensors file already in the load dtype is memory-mapped "
                     "(one copy in the page cache), otherwise each process converts its own: "
                     f"{s.gpus} processes on one machine then need {s.gpus * full:.1f} GiB of host RAM")
    return notes


def plan_record(shape: ModelShape, s: PlanSettings, plans: dict[str, StagePlan]) -> dict[str, Any]:
    """The JSON the planner prints with ``--json``: settings, model, and per stage every term
    in bytes, the totals, whether each fits, and notes."""
    stages = {}
    for name, plan in plans.items():
        totals = {"no_checkpointing": plan.total(False), "checkpointing": plan.total(True)}
        stages[name] = {
            "resident": plan.resident, "train": plan.train, "train_checkpointed": plan.train_checkpointed,
            "no_grad": plan.no_grad, "overhead": plan.overhead, "total_bytes": totals,
            "total_gib": {k: v / GIB for k, v in totals.items()},
            "fits": {k: v <= s.gpu_mem_gib * GIB for k, v in totals.items()}, "notes": plan.notes,
        }
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s).items()}
    model = {**shape.as_dict(), "params": total_params(shape), "lora_params": lora_params(shape, s.lora_r, s.lora_targets)}
    return {"settings": settings, "model": model, "notes": general_notes(shape, s), "stages": stages}


def format_stage(plan: StagePlan, s: PlanSettings, columns: Sequence[bool]) -> str:
    """One stage's table: a row per term, a column per checkpointing choice in ``columns``."""
    rows: list[tuple[str, Sequence[float | str]]] = [("resident", [])]
    rows += [(f"  {k}", [v] * len(columns)) for k, v in plan.resident.items()]
    rows.append(("training pass (forward + backward)", []))
    for key in dict.fromkeys([*plan.train, *plan.train_checkpointed]):
        rows.append((f"  {key}", [(plan.train_checkpointed if c else plan.train).get(key, 0) for c in columns]))
    if plan.no_grad:
        rows.append(("passes without gradients (a phase of their own)", []))
        rows += [(f"  {k}", [v] * len(columns)) for k, v in plan.no_grad.items()]
    what = "CUDA context, workspaces, allocator: assumed" if s.device == "cuda" else "given"
    rows.append((f"overhead ({what})", [plan.overhead] * len(columns)))
    totals = [plan.total(c) for c in columns]
    rows.append(("total = resident + max(training, no-grad) + overhead", totals))
    rows.append((f"verdict on {s.gpu_mem_gib:g} GiB", [verdict(t, s) for t in totals]))
    width = max(len(label) for label, _ in rows) + 2
    header = "".join(f"{'checkpointing' if c else 'no checkpointing':>18}" for c in columns)
    lines = [f"== {plan.stage} ==", " " * width + header]
    for label, values in rows:
        cells = "".join(f"{v:>18}" if isinstance(v, str) else f"{v / GIB:>14.2f} GiB" for v in values)
        lines.append(f"{label:<{width}}{cells}".rstrip())
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_report(shape: ModelShape, s: PlanSettings, plans: dict[str, StagePlan], columns: Sequence[bool]) -> str:
    """The planner's text output: the model and settings, then one table per stage."""
    head = [
        (f"model: {shape.source} -- {total_params(shape) / 1e9:.3f}B params, hidden {shape.hidden}, "
         f"{shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab}"),
        (f"per GPU: {s.gpus} x {s.gpu_mem_gib:g} GiB, {s.strategy}, {s.precision}, quant {s.quant}, "
         f"LoRA r={s.lora_r} on {','.join(s.lora_targets)} "
         f"({lora_params(shape, s.lora_r, s.lora_targets) / 1e6:.1f}M params), "
         f"batch {s.batch}, prompt {s.prompt} + response {s.response} tokens"),
        *[f"note: {n}" for n in general_notes(shape, s)],
    ]
    return "\n\n".join(["\n".join(head), *(format_stage(p, s, columns) for p in plans.values())])


def main(argv: Sequence[str] | None = None) -> int:
    """Plan and print; exit status 2 for a bad option or model."""
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = tuple(x.strip() for x in args.stages.split(",") if x.strip())
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    try:
        settings = settings_from_args(args)
        shape = load_shape(args.model)
        plans = plan_all(shape, settings, stages)
    except (ModelShapeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan_record(shape, settings, plans), indent=2))
        return 0
    columns = {"both": (False, True), "on": (True,), "off": (False,)}[args.grad_checkpointing]
    print(format_report(shape, settings, plans, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
