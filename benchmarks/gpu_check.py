"""One command for a CUDA machine: does the GPU path run, and how fast and large is it?

    python -m benchmarks.gpu_check                 # < 8 min on one GPU; needs the bench extra for the grid
    python -m benchmarks.gpu_check --out gpu.json --parts quickstart_bf16,qlora_4bit

Parts, in order, each its own subprocess with its own timeout, all under one time budget
(``--budget``, default 450 s from the start, building the model assets included; a part
that would not fit is skipped):

- ``quickstart_bf16``: PPO iterations at the quickstart's shape (SmolLM2-135M shape, batch 8,
  64-token prompts, 32-token responses, LoRA r=16, 2 PPO epochs), ``bf16-mixed``;
- ``qlora_4bit``: the same on a bitsandbytes 4-bit (nf4) base with the LoRA policy;
- ``fsdp_1gpu``: the same under Lightning's ``FSDPStrategy`` (FSDP1, the GPU-only path of
  ``configs/strategy/fsdp.yaml``) on one GPU;
- ``ppo_vs_trl_quick``: ``python -m benchmarks.ppo_vs_trl --grid quick --precision bf16
  --device cuda`` (ours with each critic and TRL's PPOTrainer);
- ``fsdp2_1gpu``: as ``fsdp_1gpu`` with FSDP2 (``configs/strategy/fsdp2.yaml``).

The PPO parts are :func:`benchmarks.workers.measure` run by :func:`benchmarks.harness.run_worker`
(the CPU benchmarks' own worker) with ``device: cuda``, summarised by
:func:`benchmarks.ppo_report.summarize_run`. One JSON (``benchmarks/results/gpu_check.json``)
holds the device name, torch and CUDA versions, each part's status, timings and peak GPU
memory (``torch.cuda.max_memory_allocated`` in the part's process); it is rewritten after every
part, so a failed or timed-out part leaves the others' results. Without CUDA it exits with a
message and status 2, having run nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import (REPO_ROOT, RESULTS_DIR, add_common_arguments, machine_info, run_worker,
                                work_directory, write_json)

RESULTS = RESULTS_DIR / "gpu_check.json"
REFUSED_EXIT = 2  # no CUDA device, or no tokenizer: nothing was run
# The quickstart's PPO shape (configs/quickstart/ppo.yaml): batch 8, 64-token prompts, 32 new
# tokens, LoRA r=16 / alpha 32, 2 PPO epochs with minibatch = batch.
QUICKSTART = dict(batch_size=8, response_length=32, ppo_epochs=2, lora_r=16, lora_alpha=32, warmup=1, iterations=2)
PROMPT_LENGTH = 64


@dataclass(frozen=True)
class Part:
    """One check: its name, its timeout in seconds, what it runs (``run(context, timeout)``)
    and whether it needs the quickstart-shaped assets."""

    name: str
    timeout: float
    run: Callable[[dict[str, Any], float], dict[str, Any]]
    uses_assets: bool = True


def no_cuda_message(torch_version: str, cuda_build: str | None) -> str:
    """What the script says on a machine without a usable CUDA device."""
    return (f"gpu_check needs a CUDA GPU, and torch.cuda.is_available() is False here (torch {torch_version}, "
            f"built for CUDA {cuda_build or 'none: a CPU-only build'}). Nothing was run. Run it on a machine "
            "with an NVIDIA GPU and a CUDA build of torch; the CPU benchmarks are "
            "python -m benchmarks.ppo_vs_trl and python -m benchmarks.train_vs_trl.")


def ppo_part(name: str, **spec_fields: Any) -> Callable[[dict[str, Any], float], dict[str, Any]]:
    """A part that runs our PPO worker at the quickstart's shape with ``spec_fields`` on top."""

    def run(context: dict[str, Any], timeout: float) -> dict[str, Any]:
        from benchmarks.ppo_report import summarize_run
        from benchmarks.workers import RunSpec, measure

        assets = context.get("assets")
        if assets is None:
            raise RuntimeError(f"the model assets were not built: {context.get('assets_error', 'no error recorded')}")
        spec = RunSpec(trainer="ours", critic="shared", precision="bf16", device=context["device"],
                       threads=context.get("threads"), base=assets["base"], rm=assets["rm"], prompts=assets["prompts"],
                       **{**QUICKSTART, **spec_fields})
        result = run_worker(measure, spec, context["work"], name, timeout=timeout)
        summary = summarize_run(result, spec.warmup, result["import_rss_bytes"])
        keep = ("iteration_seconds_median", "iteration_seconds", "generated_tokens_per_s",
                "optimizer_steps_per_iteration", "generated_tokens_per_iteration", "trained_tokens_per_iteration",
                "peak_rss_mib", "peak_gpu_mib", "trainable_params", "precision_used", "activation_dtypes",
                "phase_seconds_median")
        return {**{k: summary[k] for k in keep}, "setup_and_fit_seconds": result["setup_and_fit_seconds"],
                **{k: result[k] for k in ("cuda_device", "cuda_max_memory_allocated_bytes",
                                          "cuda_max_memory_reserved_bytes") if k in result}}

    return run


def grid_part(context: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``python -m benchmarks.ppo_vs_trl --grid quick --precision bf16`` on the check's device."""
    out = context["work"] / "ppo_vs_trl_quick.json"
    command = [sys.executable, "-m", "benchmarks.ppo_vs_trl", "--grid", "quick", "--precision", "bf16",
               "--device", context["device"], "--tokenizer", context["tokenizer"], "--out", str(out),
               "--work-dir", str(context["work"] / "grid"), "--busy-retries", "0", "--busy-sample", "1"]
    if context.get("threads"):
        command += ["--threads", str(context["threads"])]
    log = context["work"] / "ppo_vs_trl_quick.log"
    with open(log, "w") as fh:
        proc = subprocess.run(command, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"ppo_vs_trl exited {proc.returncode}; log {log}:\n{tail}")
    report = json.loads(out.read_text())
    return {"command": " ".join(command[1:]), "cells": [{k: v for k, v in cell.items() if k != "runs"}
                                                         for cell in report["cells"]]}


PARTS = [
    Part("quickstart_bf16", 150, ppo_part("quickstart_bf16")),
    Part("qlora_4bit", 150, ppo_part("qlora_4bit", quantization="4bit")),
    Part("fsdp_1gpu", 150, ppo_part("fsdp_1gpu", strategy="fsdp")),
    Part("ppo_vs_trl_quick", 240, grid_part, uses_assets=False),
    Part("fsdp2_1gpu", 120, ppo_part("fsdp2_1gpu", strategy="fsdp2")),
]


def run_parts(parts: list[Part], context: dict[str, Any], deadline: float, report: dict[str, Any], out: Path,
              min_seconds: float = 30.0) -> None:
    """Run ``parts`` in order until ``deadline`` (``time.monotonic()``): each gets ``min(its
    timeout, time left)``, none starts with less than ``min_seconds`` left (``skipped``). Each
    part's status (``ok``, ``failed``, ``timeout``, ``skipped``), seconds and result or error
    go into ``report["parts"]``; the report is written to ``out`` after every part."""
    for part in parts:
        left = deadline - time.monotonic()
        entry: dict[str, Any] = {"timeout_seconds": round(min(part.timeout, left), 1)}
        if left < min_seconds:
            entry.update(status="skipped", reason=f"{max(left, 0):.0f} s of the budget left")
        else:
            print(f"[gpu_check] {part.name} (timeout {entry['timeout_seconds']:.0f} s) ...", flush=True)
            start = time.monotonic()
            try:
                entry.update(status="ok", result=part.run(context, min(part.timeout, left)))
            except subprocess.TimeoutExpired as error:
                entry.update(status="timeout", error=str(error))
            except Exception as error:  # a failed part is recorded; the next still runs
                entry.update(status="failed", error=f"{type(error).__name__}: {error}",
                             traceback=traceback.format_exc(limit=3))
            entry["seconds"] = round(time.monotonic() - start, 1)
            print(f"[gpu_check] {part.name}: {entry['status']} in {entry['seconds']:.0f} s", flush=True)
        report["parts"][part.name] = entry
        report["complete"] = len(report["parts"]) == len(parts)
        write_json(out, report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parts, budget, model size and where the JSON goes."""
    from benchmarks.assets import SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS),
                        help="comma-separated, in the order given above")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    parser.add_argument("--size", default="smollm2-135m", choices=sorted(SIZES), help="model shape of the PPO parts")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: rehearse the parts on the CPU (tests of this script; FSDP1 refuses a CPU)")
    add_common_arguments(parser, RESULTS)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in {p.name for p in PARTS}]
    if unknown or not names:
        parser.error(f"unknown or no parts: {', '.join(unknown)}; choose from {', '.join(p.name for p in PARTS)}")
    args.part_list = [p for p in PARTS if p.name in names]
    return args


def main(argv: list[str] | None = None) -> int:
    """Refuse without CUDA or without the tokenizer (exit 2, nothing run); else run the parts
    and write the JSON (exit 0, or 1 when a part did not finish ``ok``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(no_cuda_message(torch.__version__, torch.version.cuda), file=sys.stderr)
        return REFUSED_EXIT
    if not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        print(f"gpu_check: no tokenizer in {args.tokenizer}: prepare the quickstart model first "
              "(python -m rlhf.models.prepare) or pass --tokenizer DIR", file=sys.stderr)
        return REFUSED_EXIT
    from benchmarks.assets import SIZES, build_assets

    started, deadline = time.time(), time.monotonic() + args.budget
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "command": "python -m benchmarks.gpu_check " + " ".join(argv),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
        "size": args.size, "quickstart_shape": {**QUICKSTART, "prompt_length": PROMPT_LENGTH},
        "budget_seconds": args.budget, "machine": machine_info(), "parts": {}, "complete": False,
    }
    with work_directory(args.work_dir, "gpu-check-") as work:
        context: dict[str, Any] = {"device": args.device, "work": work, "tokenizer": str(args.tokenizer),
                                   "threads": args.threads}
        if any(p.uses_assets for p in args.part_list):
            start = time.monotonic()
            count = QUICKSTART["batch_size"] * (QUICKSTART["warmup"] + QUICKSTART["iterations"])
            try:
                context["assets"] = build_assets(work / args.size, SIZES[args.size], args.tokenizer, count,
                                                 PROMPT_LENGTH, lora_r=QUICKSTART["lora_r"],
                                                 lora_alpha=QUICKSTART["lora_alpha"])
            except Exception as error:  # the PPO parts then fail with this; the grid part still runs
                context["assets_error"] = report["assets_error"] = f"{type(error).__name__}: {error}"
            report["assets_seconds"] = round(time.monotonic() - start, 1)
        run_parts(args.part_list, context, deadline, report, Path(args.out))
    report["wall_seconds"] = round(time.time() - started, 1)
    write_json(args.out, report)
    for name, entry in report["parts"].items():
        result = entry.get("result", {})
        gpu = result.get("peak_gpu_mib")
        print(f"{name:18} {entry['status']:8} {entry.get('seconds', 0):6.0f} s"
              + (f"  {result['iteration_seconds_median']:.2f} s/iter" if "iteration_seconds_median" in result else "")
              + (f"  peak GPU {gpu:.0f} MiB" if gpu is not None else ""))
    print(f"wall {report['wall_seconds']:.0f} s; written to {args.out}")
    return 0 if all(e["status"] == "ok" for e in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
