"""PPO speed and memory, ours vs TRL's ``PPOTrainer``, side by side in one run.

    python -m benchmarks.ppo_vs_trl              # default grid: 2 sizes x 2 response lengths
    python -m benchmarks.ppo_vs_trl --quick      # ~1-2 min smoke run
    python -m benchmarks.ppo_vs_trl --precision bf16   # both in bf16 mixed precision
    python -m benchmarks.ppo_vs_trl --malloc-mmap-threshold 4194304   # both with a fixed glibc mmap threshold
    python -m benchmarks.ppo_vs_trl --sizes small,medium,smollm2-135m --response-lengths 32,64

For every (model size, response length) both trainers run on the same random Llama-style
base, the same reward-model weights, the same prompts (all exactly ``--prompt-length``
tokens), batch, PPO epochs (one optimizer step each: minibatch = batch), response length
and sampling (temperature 0.7, no top-k/top-p), LoRA on the policy and the reference = the
adapter disabled. Each trainer runs in its own subprocess (:mod:`benchmarks.workers`), so
its peak RSS is its own; an import-only subprocess per trainer gives the RSS baseline.

Reported per run: seconds per PPO iteration (median over the iterations after
``--warmup``), generated tokens/s (response tokens per second of iteration), peak RSS and
RSS above the import-only baseline, the ratios ours/TRL, and the phase breakdown of both.
Results go to ``benchmarks/results/ppo_vs_trl.json`` (with machine info and the load
average before and after: numbers taken on a busy machine are not comparable).

``--malloc-mmap-threshold BYTES`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in every worker
(both trainers and both import baselines): allocations of at least that size are mmapped and
go back to the OS when freed. By default glibc raises the threshold each time a large block is
freed (up to 32 MiB), after which tensors below it come from the heap, whose freed holes count
in RSS until reused. The setting shows how much of each trainer's peak is such retained memory;
it changes nothing off glibc (macOS, musl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.assets import DEFAULT_TOKENIZER, REPO_ROOT, SIZES, build_assets
from benchmarks.workers import PRECISIONS, RunSpec

RESULTS = REPO_ROOT / "benchmarks" / "results" / "ppo_vs_trl.json"
RESULTS_BF16 = REPO_ROOT / "benchmarks" / "results" / "ppo_vs_trl_bf16.json"
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc ignores larger values on 64-bit systems
MIB = 2**20
# Phases of our iteration in the order they run; "rollout_other" and "other" are remainders.
OUR_PHASES = ["generation", "policy_value", "reference", "reward", "rollout_other", "update", "other"]
TRL_PHASES = ["generation", "reference", "value", "reward", "update_and_other"]


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, library versions and the current load average."""
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl_version,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "libc": " ".join(platform.libc_ver()).strip() or None,
        "rlhf_commit": source_commit(),
    }
    return info


def source_commit() -> str | None:
    """The repository's ``HEAD`` commit (``+dirty`` with uncommitted changes to tracked files
    outside ``benchmarks/results/``, which earlier runs rewrite), or ``None`` outside a git
    checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def allocator_env(mmap_threshold: int | None) -> dict[str, str]:
    """Worker environment for ``--malloc-mmap-threshold`` (empty: glibc's default, dynamic)."""
    if mmap_threshold is None:
        return {}
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"--malloc-mmap-threshold must be in 1..{MAX_MMAP_THRESHOLD} bytes, got {mmap_threshold}")
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}


def run_worker(spec: RunSpec, work_dir: Path, name: str, timeout: float | None = None,
               extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one :mod:`benchmarks.workers` subprocess (``extra_env`` added to its environment)
    and return its result (its log on failure)."""
    spec_file, result_file, log_file = (work_dir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_file.write_text(json.dumps(asdict(spec)))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.workers", str(spec_file), str(result_file)],
                              cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


def summarize(result: dict[str, Any], warmup: int, baseline_rss: int, phases: list[str]) -> dict[str, Any]:
    """Median iteration time, tokens/s, RSS and the median phase breakdown after warm-up."""
    seconds = result["iteration_seconds"][warmup:]
    tokens = result["response_tokens"][warmup:]
    if not seconds:
        raise ValueError(f"{result['trainer']}: no iterations after {warmup} warm-up")
    breakdown: dict[str, list[float]] = {name: [] for name in phases}
    for total, times in zip(seconds, result["phases"][warmup:]):
        if "rollout" in times:  # ours: nested phases, remainders computed here
            inner = sum(times.get(k, 0.0) for k in ("generation", "policy_value", "reference", "reward"))
            times = {**times, "rollout_other": times["rollout"] - inner,
                     "other": total - times["rollout"] - times.get("update", 0.0)}
        else:
            times = {**times, "update_and_other": total - sum(times.values())}
        for name in phases:
            breakdown[name].append(times.get(name, 0.0))
    median = statistics.median(seconds)
    generation = statistics.median(breakdown["generation"])
    return {
        "iteration_seconds_median": median,
        "iteration_seconds": seconds,
        "generated_tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds)),
        "generation_tokens_per_s": statistics.median(tokens) / generation if generation > 0 else None,
        "mean_response_tokens": statistics.mean(tokens) / result["spec"]["batch_size"],
        "peak_rss_mib": result["peak_rss_bytes"] / MIB,
        "rss_above_baseline_mib": (result["peak_rss_bytes"] - baseline_rss) / MIB,
        "import_baseline_rss_mib": baseline_rss / MIB,
        "trainable_params": result["trainable_params"],
        "frozen_dtype": result.get("frozen_dtype"),
        "malloc_mmap_threshold_env": result.get("malloc_mmap_threshold_env"),
        "phase_seconds_median": {name: statistics.median(values) for name, values in breakdown.items()},
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table (one line per trainer and configuration, ratios on ours' line)."""
    header = (f"{'size':<13}{'resp':>5} {'trainer':<6}{'s/iter':>8}{'tok/s':>8}{'peak MiB':>10}"
              f"{'>base MiB':>10}   {'ratio s/iter':>12}{'tok/s':>7}{'peak':>6}{'>base':>7}")
    lines = [header, "-" * len(header)]
    for row in rows:
        for trainer in ("ours", "trl"):
            r = row.get(trainer)
            if r is None:
                continue
            line = (f"{row['size']:<13}{row['response_length']:>5} {trainer:<6}"
                    f"{r['iteration_seconds_median']:>8.2f}{r['generated_tokens_per_s']:>8.1f}"
                    f"{r['peak_rss_mib']:>10.0f}{r['rss_above_baseline_mib']:>10.0f}")
            ratios = row.get("ratios_ours_over_trl")
            if trainer == "ours" and ratios:
                line += (f"   {ratios['iteration_seconds']:>12.2f}{ratios['generated_tokens_per_s']:>7.2f}"
                         f"{ratios['peak_rss']:>6.2f}{ratios['rss_above_baseline']:>7.2f}")
            lines.append(line)
    return "\n".join(lines)


def format_markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown (what the README's Benchmarks section shows)."""
    lines = ["| size | response tokens | trainer | s / iteration | generated tokens/s | peak RSS MiB "
             "| RSS above import baseline MiB | ours / TRL: time, tokens/s, peak, above baseline |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        for trainer in ("ours", "trl"):
            r = row.get(trainer)
            if r is None:
                continue
            ratios = row.get("ratios_ours_over_trl") if trainer == "ours" else None
            ratio_text = (f"{ratios['iteration_seconds']:.2f}, {ratios['generated_tokens_per_s']:.2f}, "
                          f"{ratios['peak_rss']:.2f}, {ratios['rss_above_baseline']:.2f}") if ratios else ""
            lines.append(f"| {row['size']} | {row['response_length']} | {trainer} | "
                         f"{r['iteration_seconds_median']:.2f} | {r['generated_tokens_per_s']:.1f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['rss_above_baseline_mib']:.0f} | {ratio_text} |")
    return "\n".join(lines)


def machine_busy(load: list[float] | None, cores: int | None) -> bool:
    """Whether the 1-minute load average says something else was running (> half the cores)."""
    return bool(load and cores and load[0] > 0.5 * cores)


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """Median seconds per phase of one iteration, for each trainer and configuration."""
    lines = []
    for row in rows:
        for trainer, phases in (("ours", OUR_PHASES), ("trl", TRL_PHASES)):
            r = row.get(trainer)
            if r is None:
                continue
            total = r["iteration_seconds_median"]
            parts = ", ".join(f"{name} {r['phase_seconds_median'][name]:.2f}s "
                              f"({100 * r['phase_seconds_median'][name] / total:.0f}%)" for name in phases)
            lines.append(f"{row['size']} resp {row['response_length']} {trainer}: {total:.2f}s = {parts}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--response-lengths", default="32,64", help="comma-separated new tokens per response")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per PPO iteration (= minibatch)")
    parser.add_argument("--prompt-length", type=int, default=64, help="tokens per prompt (all equal)")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first iterations")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--trainers", default="ours,trl", help="ours, trl or both")
    parser.add_argument("--separate-reward-model", action="store_true",
                        help="ours loads the RM as its own model instead of an adapter on the policy base")
    parser.add_argument("--precision", choices=PRECISIONS, default="32",
                        help="32: float32 in both; bf16: bf16 mixed precision in both (ours: bf16-mixed; TRL: "
                             "bf16=True), frozen weights (policy base, reward model) stored in bf16, trained "
                             "weights (adapters, heads, TRL's value model) in float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in every worker, both trainers alike (default: "
                             "glibc's dynamic threshold); results go to a file named after it")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer directory for both")
    parser.add_argument("--work-dir", default=None, help="assets and worker logs (default: a temp dir)")
    parser.add_argument("--out", default=None,
                        help=f"result JSON (default: {RESULTS.relative_to(REPO_ROOT)}; "
                             f"with --precision bf16, {RESULTS_BF16.relative_to(REPO_ROOT)}; "
                             "with --malloc-mmap-threshold N, _mmapN before .json)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: size small, 16 new tokens, batch 4, 2 epochs, 2 timed iterations")
    args = parser.parse_args(argv)
    try:
        allocator_env(args.malloc_mmap_threshold)
    except ValueError as error:
        parser.error(str(error))
    if args.out is None:
        default = RESULTS_BF16 if args.precision == "bf16" else RESULTS
        if args.malloc_mmap_threshold is not None:
            default = default.with_name(f"{default.stem}_mmap{args.malloc_mmap_threshold}.json")
        args.out = str(default)
    if args.quick:
        args.sizes, args.response_lengths, args.batch_size = "small", "16", 4
        args.prompt_length, args.ppo_epochs, args.iterations = 32, 2, 2
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build assets, run every (size, response length) for the chosen trainers, write the JSON."""
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    lengths = [int(x) for x in args.response_lengths.split(",")]
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [s for s in sizes if s not in SIZES] + [t for t in trainers if t not in ("ours", "trl")]
    if unknown:
        raise SystemExit(f"unknown size or trainer: {', '.join(unknown)}")
    started, load_before = time.time(), load_average()
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="ppo-bench-")
    work = Path(args.work_dir or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = dict(batch_size=args.batch_size, ppo_epochs=args.ppo_epochs, warmup=args.warmup,
                  iterations=args.iterations, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                  threads=args.threads, share_reward_base=not args.separate_reward_model, precision=args.precision)
    extra_env = allocator_env(args.malloc_mmap_threshold)
    try:
        baselines = {t: run_worker(RunSpec(trainer=f"baseline-{t}", threads=args.threads), work, f"baseline-{t}",
                                   extra_env=extra_env)
                     ["import_rss_bytes"] for t in trainers}
        rows = []
        for size in sizes:
            prompts = args.batch_size * (args.warmup + args.iterations)
            assets = build_assets(work / size, SIZES[size], args.tokenizer, prompts, args.prompt_length,
                                  lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
            for length in lengths:
                row: dict[str, Any] = {"size": size, "shape": asdict(SIZES[size]), "response_length": length}
                for trainer in trainers:
                    spec = RunSpec(trainer=trainer, base=assets["base"], rm=assets["rm"], prompts=assets["prompts"],
                                   response_length=length, **common)
                    print(f"[bench] {size} resp {length}: {trainer} ...", flush=True)
                    result = run_worker(spec, work, f"{size}-{length}-{trainer}", extra_env=extra_env)
                    phases = OUR_PHASES if trainer == "ours" else TRL_PHASES
                    row[trainer] = summarize(result, args.warmup, baselines[trainer], phases)
                if "ours" in row and "trl" in row:
                    ours, trl = row["ours"], row["trl"]
                    row["ratios_ours_over_trl"] = {
                        "iteration_seconds": ours["iteration_seconds_median"] / trl["iteration_seconds_median"],
                        "generated_tokens_per_s": ours["generated_tokens_per_s"] / trl["generated_tokens_per_s"],
                        "peak_rss": ours["peak_rss_mib"] / trl["peak_rss_mib"],
                        "rss_above_baseline": ours["rss_above_baseline_mib"] / trl["rss_above_baseline_mib"],
                    }
                rows.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()
    report = {
        "benchmark": "ppo_vs_trl",
        "command": "python -m benchmarks.ppo_vs_trl " + " ".join(sys.argv[1:]),
        "settings": {**common, "prompt_length": args.prompt_length, "temperature": 0.7, "kl_coef": 0.05,
                     "minibatch": "= batch", "tokenizer": str(args.tokenizer),
                     "malloc_mmap_threshold": args.malloc_mmap_threshold, "worker_env": extra_env},
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "machine_busy_at_start": machine_busy(load_before, os.cpu_count()),
        "wall_seconds": time.time() - started,
        "import_baseline_rss_mib": {t: b / MIB for t, b in baselines.items()},
        "runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table and the phase breakdown."""
    args = parse_args(argv)
    load = load_average()
    if machine_busy(load, os.cpu_count()):
        print(f"[bench] WARNING: load average {load} on {os.cpu_count()} cores: something else is running, "
              "timings will not be comparable", flush=True)
    report = run(args)
    print(format_table(report["runs"]))
    print()
    print(format_breakdown(report["runs"]))
    print()
    print(format_markdown(report["runs"]))
    print(f"\nwall {report['wall_seconds']:.0f}s, load average before {report['load_average_before']} "
          f"after {report['load_average_after']}; written to {args.out}")


if __name__ == "__main__":
    main()
