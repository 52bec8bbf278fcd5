"""Memory and speed cost of a bitsandbytes 4-bit / 8-bit base (QLoRA-style) vs a full-precision one.

    python -m benchmarks.quantized_base                   # SmolLM2-135M-shaped base, ~3 min on 2 CPU cores
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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.assets import DEFAULT_TOKENIZER, REPO_ROOT, SIZES, build_assets
from benchmarks.ppo_memory import MIB, peak_rss_bytes, weight_bytes

RESULTS = REPO_ROOT / "benchmarks" / "results" / "quantized_base.json"
PRECISIONS = ("none", "4bit", "8bit")


def run_precision(base: str, quantization: str, batch: int, length: int, steps: int) -> dict[str, Any]:
    """Load ``base`` quantized as asked, add LoRA and time ``steps`` training steps."""
    import torch

    from rlhf.models.loading import LoraSettings, ModelSettings, apply_lora, load_causal_lm

    import_rss = peak_rss_bytes()
    settings = ModelSettings(base, dtype="float32", lora=LoraSettings(r=8, alpha=16),
                             quantization=None if quantization == "none" else quantization)
    model = apply_lora(load_causal_lm(settings), settings.lora)
    device = next(p for p in model.parameters() if p.requires_grad).device
    load_rss = peak_rss_bytes()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    seconds, losses = [], []
    for _ in range(steps):
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
        "quantization": quantization,
        "peak_rss_bytes": peak_rss_bytes(),
        "import_rss_bytes": import_rss,
        "after_load_rss_bytes": load_rss,
        "weight_bytes": weight_bytes(model),
        "step_seconds": seconds,
        "first_loss": losses[0],
        "device": str(device),
    }


def run_worker(args: argparse.Namespace, base: str, quantization: str, work: Path) -> dict[str, Any]:
    """One precision in a fresh subprocess (so peak RSS is its own)."""
    result_file, log_file = work / f"{quantization}.json", work / f"{quantization}.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [sys.executable, "-m", "benchmarks.quantized_base", "--worker", base, quantization, str(args.batch_size),
           str(args.length), str(args.steps), str(args.threads or 0), str(result_file)]
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{quantization} worker failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """MiB, seconds per step and ratios to the full-precision base, per precision."""
    rows = {}
    for name, r in results.items():
        steps = r["step_seconds"][1:] or r["step_seconds"]
        rows[name] = {
            "peak_rss_mib": r["peak_rss_bytes"] / MIB,
            "rss_above_import_mib": (r["peak_rss_bytes"] - r["import_rss_bytes"]) / MIB,
            "weights_mib": r["weight_bytes"] / MIB,
            "step_seconds_median": statistics.median(steps),
            "first_loss": r["first_loss"],
        }
    full = rows["none"]
    for row in rows.values():
        row["rss_above_import_vs_full"] = row["rss_above_import_mib"] / full["rss_above_import_mib"]
        row["step_seconds_vs_full"] = row["step_seconds_median"] / full["step_seconds_median"]
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    lines = [f"{'base':<6}{'peak RSS MiB':>14}{'above import':>14}{'weights MiB':>13}{'s/step':>9}"
             f"{'x full mem':>11}{'x full time':>12}"]
    for name, r in rows.items():
        lines.append(f"{name:<6}{r['peak_rss_mib']:>14.0f}{r['rss_above_import_mib']:>14.0f}{r['weights_mib']:>13.0f}"
                     f"{r['step_seconds_median']:>9.2f}{r['rss_above_import_vs_full']:>11.2f}"
                     f"{r['step_seconds_vs_full']:>12.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized_base", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smollm2-135m", choices=sorted(SIZES))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated subset of none,4bit,8bit")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="the first is warm-up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--work-dir", default=None)
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        base, quantization, batch, length, steps, threads, out = argv[1:]
        if int(threads):
            import torch

            torch.set_num_threads(int(threads))
        result = run_precision(base, quantization, int(batch), int(length), int(steps))
        Path(out).write_text(json.dumps(result, indent=2))
        return
    args = parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]
    if "none" not in precisions or set(precisions) - set(PRECISIONS):
        raise SystemExit(f"--precisions must include 'none' and name only {', '.join(PRECISIONS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        assets = build_assets(work / f"assets-{args.size}", SIZES[args.size], args.tokenizer,
                              prompt_count=1, prompt_length=8)
        results = {}
        for name in precisions:
            print(f"running {name} ...", flush=True)
            results[name] = run_worker(args, assets["base"], name, work)
    rows = summarize(results)
    record = {"size": args.size, "shape": SIZES[args.size].__dict__, "settings": vars(args), "rows": rows,
              "raw": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(format_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
