"""Memory and speed cost of a bitsandbytes 4-bit / 8-bit base (QLoRA-style) vs a full-precision one.

    python -m benchmarks.quantized_base                   # SmolLM2-135M-shaped base, minutes on a CPU
    python -m benchmarks.quantized_base --size small      # a seconds-long smoke run

For each base precision (``none`` = fp32 weights, ``4bit`` = nf4 + double quantization,
``8bit`` = LLM.int8) a fresh subprocess loads the same random Llama-style base through
:func:`rlhf.models.loading.load_causal_lm`, adds the same LoRA adapter and times LoRA training
steps (forward + backward + AdamW) on one fixed batch, the work of every stage. Reported:
peak RSS, bytes of the weights held, seconds per step (median after one warm-up step) and the
first step's loss (the quantized bases compute a slightly different function).
Results go to ``benchmarks/results/quantized_base.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.assets import SIZES, build_assets
from benchmarks.harness import (RESULTS_DIR, Column, WorkerSpec, add_common_arguments, after_warmup, memory_mib,
                                peak_rss_bytes, ratios, run_worker, text_table, weight_bytes, work_directory,
                                write_json)

RESULTS = RESULTS_DIR / "quantized_base.json"
PRECISIONS = ("none", "4bit", "8bit")
# Each precision against the full-precision base: name in the JSON -> key of a row.
VS_FULL = {"rss_above_import_vs_full": "rss_above_import_mib", "step_seconds_vs_full": "step_seconds_median"}


@dataclass
class QuantizedSpec(WorkerSpec):
    """One base precision's run: ``quantization`` none, 4bit or 8bit; ``length`` tokens a row."""

    base: str
    quantization: str
    length: int = 128
    steps: int = 4


def run_precision(spec: QuantizedSpec) -> dict[str, Any]:
    """Load ``spec.base`` quantized as asked, add LoRA and time ``spec.steps`` training steps."""
    import torch

    from rlhf.models.loading import LoraSettings, ModelSettings, apply_lora, load_causal_lm

    import_rss = peak_rss_bytes()
    settings = ModelSettings(spec.base, dtype="float32", lora=LoraSettings(r=spec.lora_r, alpha=spec.lora_alpha),
                             quantization=None if spec.quantization == "none" else spec.quantization)
    model = apply_lora(load_causal_lm(settings), settings.lora)
    device = next(p for p in model.parameters() if p.requires_grad).device
    load_rss = peak_rss_bytes()
    generator = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, model.config.vocab_size, (spec.batch_size, spec.length), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    seconds, losses = [], []
    for _ in range(spec.steps):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "quantization": spec.quantization,
        "peak_rss_bytes": peak_rss_bytes(),
        "import_rss_bytes": import_rss,
        "after_load_rss_bytes": load_rss,
        "weight_bytes": weight_bytes(model),
        "step_seconds": seconds,
        "first_loss": losses[0],
        "device": str(device),
    }


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """MiB, seconds per step (after one warm-up step) and ratios to the full-precision base."""
    rows = {name: {**memory_mib(r),
                   "step_seconds_median": statistics.median(after_warmup(r["step_seconds"], 1, keep_all=True)),
                   "first_loss": r["first_loss"]} for name, r in results.items()}
    full = dict(rows["none"])
    for row in rows.values():
        row.update(ratios(row, full, VS_FULL))
    return rows


COLUMNS = [
    Column("base", "quantization", width=5, left=True), Column("peak RSS MiB", "peak_rss_mib", ".0f", 13),
    Column("above import", "rss_above_import_mib", ".0f", 13), Column("weights MiB", "weights_mib", ".0f", 12),
    Column("s/step", "step_seconds_median", ".2f", 8), Column("x full mem", "rss_above_import_vs_full", ".2f", 10),
    Column("x full time", "step_seconds_vs_full", ".2f", 11),
]


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Plain-text table, one line per base precision."""
    return text_table(COLUMNS, [{"quantization": name, **r} for name, r in rows.items()])


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Model size, precisions, batch shape and where the results go."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smollm2-135m", choices=sorted(SIZES))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of none,4bit,8bit")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="the first is warm-up")
    add_common_arguments(p, RESULTS)
    args = p.parse_args(argv)
    precisions = set(args.precisions.split(",")) - {""}
    if "none" not in precisions or precisions - set(PRECISIONS):
        p.error(f"--precisions must include 'none' and name only {', '.join(PRECISIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every precision, write the JSON and print the table."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    precisions = [p for p in args.precisions.split(",") if p]
    with work_directory(args.work_dir, "quantized-base-") as work:
        assets = build_assets(work / f"assets-{args.size}", SIZES[args.size], args.tokenizer,
                              prompt_count=1, prompt_length=8)
        results = {}
        for name in precisions:
            spec = QuantizedSpec(base=assets["base"], quantization=name, batch_size=args.batch_size,
                                 length=args.length, steps=args.steps, threads=args.threads)
            print(f"running {name} ...", flush=True)
            results[name] = run_worker(run_precision, spec, work, name)
    rows = summarize(results)
    out = write_json(args.out, {"size": args.size, "shape": asdict(SIZES[args.size]), "settings": vars(args),
                                "rows": rows, "raw": results})
    print(format_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
