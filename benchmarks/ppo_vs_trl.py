"""PPO speed and memory, ours vs TRL's ``PPOTrainer``, side by side in one run.

    python -m benchmarks.ppo_vs_trl              # default grid: 2 sizes x 2 response lengths
    python -m benchmarks.ppo_vs_trl --quick      # a short smoke run
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
import statistics
import sys
from dataclasses import asdict
from typing import Any

from benchmarks.assets import SIZES, build_assets
from benchmarks.harness import (MIB, REPO_ROOT, RESULTS_DIR, BenchmarkRun, Column, add_common_arguments,
                                after_warmup, footer, markdown_table, ratios, run_worker, side_by_side_rows,
                                text_table, work_directory, write_json)
from benchmarks.workers import PRECISIONS, RunSpec, measure

RESULTS = RESULTS_DIR / "ppo_vs_trl.json"
RESULTS_BF16 = RESULTS_DIR / "ppo_vs_trl_bf16.json"
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc ignores larger values on 64-bit systems
# Phases of our iteration in the order they run; "rollout_other" and "other" are remainders.
OUR_PHASES = ["generation", "policy_value", "reference", "reward", "rollout_other", "update", "other"]
TRL_PHASES = ["generation", "reference", "value", "reward", "update_and_other"]
# The ratios ours / TRL: name in the JSON -> key of a trainer's summary.
RATIOS = {"iteration_seconds": "iteration_seconds_median", "generated_tokens_per_s": "generated_tokens_per_s",
          "peak_rss": "peak_rss_mib", "rss_above_baseline": "rss_above_baseline_mib"}


def allocator_env(mmap_threshold: int | None) -> dict[str, str]:
    """Worker environment for ``--malloc-mmap-threshold`` (empty: glibc's default, dynamic)."""
    if mmap_threshold is None:
        return {}
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"--malloc-mmap-threshold must be in 1..{MAX_MMAP_THRESHOLD} bytes, got {mmap_threshold}")
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}


def summarize(result: dict[str, Any], warmup: int, baseline_rss: int, phases: list[str]) -> dict[str, Any]:
    """Median iteration time, tokens/s, RSS and the median phase breakdown after warm-up."""
    seconds = after_warmup(result["iteration_seconds"], warmup)
    tokens = result["response_tokens"][warmup:]
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


TEXT_COLUMNS = [
    Column("size", "size", width=12, left=True), Column("resp", "response_length", width=4),
    Column("trainer", "trainer", left=True), Column("s/iter", "iteration_seconds_median", ".2f", 7),
    Column("tok/s", "generated_tokens_per_s", ".1f", 7), Column("peak MiB", "peak_rss_mib", ".0f"),
    Column(">base MiB", "rss_above_baseline_mib", ".0f"),
    Column("ratio s/iter", "ratio_iteration_seconds", ".2f", 14),
    Column("tok/s", "ratio_generated_tokens_per_s", ".2f"), Column("peak", "ratio_peak_rss", ".2f"),
    Column(">base", "ratio_rss_above_baseline", ".2f"),
]
MARKDOWN_COLUMNS = [
    Column("size", "size", left=True), Column("response tokens", "response_length"),
    Column("trainer", "trainer", left=True), Column("s / iteration", "iteration_seconds_median", ".2f"),
    Column("generated tokens/s", "generated_tokens_per_s", ".1f"), Column("peak RSS MiB", "peak_rss_mib", ".0f"),
    Column("RSS above import baseline MiB", "rss_above_baseline_mib", ".0f"),
    Column("ours / TRL: time, tokens/s, peak, above baseline", "ratio_text", left=True),
]


def format_table(runs: list[dict[str, Any]]) -> str:
    """The side-by-side table (one line per trainer and configuration, ratios on ours' line)."""
    return text_table(TEXT_COLUMNS, side_by_side_rows(runs))


def format_markdown(runs: list[dict[str, Any]]) -> str:
    """The table as Markdown (what docs/benchmarks.md shows)."""
    rows = side_by_side_rows(runs)
    for row in rows:
        if "ratio_iteration_seconds" in row:
            row["ratio_text"] = ", ".join(f"{row['ratio_' + name]:.2f}" for name in RATIOS)
    return markdown_table(MARKDOWN_COLUMNS, rows)


def format_breakdown(runs: list[dict[str, Any]]) -> str:
    """Median seconds per phase of one iteration, for each trainer and configuration."""
    lines = []
    for r in side_by_side_rows(runs):
        total, phases = r["iteration_seconds_median"], OUR_PHASES if r["trainer"] == "ours" else TRL_PHASES
        parts = ", ".join(f"{name} {r['phase_seconds_median'][name]:.2f}s "
                          f"({100 * r['phase_seconds_median'][name] / total:.0f}%)" for name in phases)
        lines.append(f"{r['size']} resp {r['response_length']} {r['trainer']}: {total:.2f}s = {parts}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The grid, the PPO settings and where the results go (``--quick``: a smoke run)."""
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
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ in every worker, both trainers alike (default: "
                             "glibc's dynamic threshold); results go to a file named after it")
    add_common_arguments(parser, None, f"result JSON (default: {RESULTS.relative_to(REPO_ROOT)}; with "
                                       f"--precision bf16, {RESULTS_BF16.relative_to(REPO_ROOT)}; with "
                                       "--malloc-mmap-threshold N, _mmapN before .json)")
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


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Build assets, run every (size, response length) for the chosen trainers, write the JSON
    (``argv``: the command line it records, by default this process's)."""
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    lengths = [int(x) for x in args.response_lengths.split(",")]
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = [s for s in sizes if s not in SIZES] + [t for t in trainers if t not in ("ours", "trl")]
    if unknown:
        raise SystemExit(f"unknown size or trainer: {', '.join(unknown)}")
    session = BenchmarkRun("ppo_vs_trl", sys.argv[1:] if argv is None else argv)
    common = dict(batch_size=args.batch_size, ppo_epochs=args.ppo_epochs, warmup=args.warmup,
                  iterations=args.iterations, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                  threads=args.threads, share_reward_base=not args.separate_reward_model, precision=args.precision)
    extra_env = allocator_env(args.malloc_mmap_threshold)
    with work_directory(args.work_dir, "ppo-bench-") as work:
        baselines = {t: run_worker(measure, RunSpec(trainer=f"baseline-{t}", threads=args.threads), work,
                                   f"baseline-{t}", extra_env=extra_env)["import_rss_bytes"] for t in trainers}
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
                    result = run_worker(measure, spec, work, f"{size}-{length}-{trainer}", extra_env=extra_env)
                    phases = OUR_PHASES if trainer == "ours" else TRL_PHASES
                    row[trainer] = summarize(result, args.warmup, baselines[trainer], phases)
                if "ours" in row and "trl" in row:
                    row["ratios_ours_over_trl"] = ratios(row["ours"], row["trl"], RATIOS)
                rows.append(row)
    report = session.report(
        {**common, "prompt_length": args.prompt_length, "temperature": 0.7, "kl_coef": 0.05,
         "minibatch": "= batch", "tokenizer": str(args.tokenizer),
         "malloc_mmap_threshold": args.malloc_mmap_threshold, "worker_env": extra_env},
        import_baseline_rss_mib={t: b / MIB for t, b in baselines.items()},
        runs=rows,
    )
    write_json(args.out, report)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table, the phase breakdown and the Markdown table."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    report = run(args, argv)
    print(format_table(report["runs"]))
    print()
    print(format_breakdown(report["runs"]))
    print()
    print(format_markdown(report["runs"]))
    print("\n" + footer(report, args.out))


if __name__ == "__main__":
    main()
