"""PPO speed and memory, ours vs TRL's ``PPOTrainer``, side by side, with interleaved repeats.

    python -m benchmarks.ppo_vs_trl                            # the main grid, float32
    python -m benchmarks.ppo_vs_trl --grid main,scaling --precision 32,bf16   # everything: 4 JSONs
    python -m benchmarks.ppo_vs_trl --quick                    # a short smoke run (--grid quick)
    python -m benchmarks.ppo_vs_trl --grid scaling --sizes medium
    python -m benchmarks.ppo_vs_trl --trainers ours-adapter,trl --sizes medium --response-lengths 64

Grids (``--grid``; cells are size x response tokens x batch):

- ``main``: small and medium at 32 and 64 response tokens, and SmolLM2-135M's shape
  (``smollm2-135m``) at 32, all at batch 8;
- ``scaling``: size small (``--sizes`` to change), response 32/64/128/256 at batch 8, and
  batch 16/32 at response 32: how seconds per iteration grow;
- ``quick``: one small cell, 16 tokens, batch 4, 2 epochs, 1 repeat;
- ``--sizes`` replaces a preset's sizes; ``--response-lengths`` / ``--batch-sizes`` make a
  ``custom`` grid (their product with ``--sizes``, default small,medium) with the run
  settings of ``--grid`` (default main).

Trainers (``--trainers``): ``ours-adapter`` (critic: adapter, a trained value LoRA adapter on
the shared base: the like-for-like side of TRL's trained value model), ``ours-hydra`` (where
``rlhf.ppo`` accepts ``critic: hydra``), ``ours-shared`` (a value head on the policy's
detached hidden states: a lighter algorithm, not the same work) and ``trl``; ``ours`` is
``ours-shared``. Every cell runs each trainer ``--repeats`` times (default 3), in the given
order on even repeats and reversed on odd ones (:mod:`benchmarks.repeats`); the tables show
the median and the min-max over repeats, and each ``ours-*`` / TRL ratio paired by repeat.

Both trainers get the same random Llama-style base, reward-model weights and prompts (all
exactly ``--prompt-length`` tokens), batch, PPO epochs (one optimizer step each: minibatch =
batch), response length and sampling (temperature 0.7, no top-k/top-p), LoRA on the policy
and the reference = the adapter disabled. Each run is its own subprocess
(:mod:`benchmarks.workers`): its peak RSS is its own; an import-only subprocess per trainer
gives the RSS baseline. Each run records its precision setting as used and the dtype of one
matmul's output in every kind of forward, optimizer steps and generated / trained tokens per
iteration, the load average before it, and whether other processes used the CPUs before or
during it (:mod:`benchmarks.conditions`: busy runs are marked and re-run).

``--precision bf16``: ours runs Lightning's ``bf16-mixed``; TRL's accelerator is set to bf16
and, with ``--trl-autocast all`` (the default), its ``train()`` runs inside the accelerator's
autocast too, since its rollout calls the unwrapped models; ``update`` and ``none`` reproduce
TRL's own scopes. Frozen weights are stored in bf16 on both sides, trained ones in float32.

``--malloc-mmap-threshold BYTES`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in every worker
(see docs/performance-notes.md); results go to a file named after it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.assets import SIZES, build_assets
from benchmarks.conditions import add_busy_arguments, busy_policy_from, run_measured
from benchmarks.harness import MIB, RESULTS_DIR, BenchmarkRun, add_common_arguments, footer, work_directory, write_json
from benchmarks.ppo_report import (TRAINER_LABELS, format_breakdown, format_markdown, format_precision, format_table,
                                   summarize_cell, summarize_run)
from benchmarks.repeats import interleaved_order
from benchmarks.workers import DEVICES, PRECISIONS, TRL_AUTOCAST, RunSpec, measure, supported_critics

RESULTS = RESULTS_DIR / "ppo_vs_trl.json"
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc ignores larger values on 64-bit systems


@dataclass(frozen=True)
class Cell:
    """One grid cell: model size, response tokens and prompts per PPO iteration."""

    size: str
    response_length: int
    batch_size: int


@dataclass(frozen=True)
class Grid:
    """A preset: its cells and run settings (each a default the command line may override)."""

    cells: tuple[Cell, ...]
    prompt_length: int = 64
    ppo_epochs: int = 4
    iterations: int = 3
    warmup: int = 1
    repeats: int = 3


GRIDS = {
    "main": Grid((*(Cell(s, r, 8) for s in ("small", "medium") for r in (32, 64)), Cell("smollm2-135m", 32, 8))),
    "scaling": Grid((*(Cell("small", r, 8) for r in (32, 64, 128, 256)), Cell("small", 32, 16), Cell("small", 32, 32))),
    "quick": Grid((Cell("small", 16, 4),), prompt_length=32, ppo_epochs=2, iterations=2, repeats=1),
}


def allocator_env(mmap_threshold: int | None) -> dict[str, str]:
    """Worker environment for ``--malloc-mmap-threshold`` (empty: glibc's default, dynamic)."""
    if mmap_threshold is None:
        return {}
    if not 0 < mmap_threshold <= MAX_MMAP_THRESHOLD:
        raise ValueError(f"--malloc-mmap-threshold must be in 1..{MAX_MMAP_THRESHOLD} bytes, got {mmap_threshold}")
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)}


def results_path(grid: str, precision: str, mmap_threshold: int | None = None) -> Path:
    """Where a grid's results go: ``ppo_vs_trl[_GRID][_bf16][_mmapN].json`` (main: no grid part)."""
    name = "ppo_vs_trl" + ("" if grid == "main" else f"_{grid}") + ("_bf16" if precision == "bf16" else "")
    return RESULTS.with_name(name + ("" if mmap_threshold is None else f"_mmap{mmap_threshold}") + ".json")


def grid_cells(grid: Grid, sizes: list[str] | None, lengths: list[int] | None,
               batches: list[int] | None) -> list[Cell]:
    """The grid's cells, sizes replaced by ``sizes`` (duplicates dropped, order kept); given
    ``lengths`` or ``batches``, the product of sizes (default small, medium), lengths
    (default 32, 64) and batches (default 8) instead."""
    if lengths or batches:
        return [Cell(s, r, b) for s in sizes or ["small", "medium"] for r in lengths or [32, 64]
                for b in batches or [8]]
    cells = [replace(c, size=s) for c in grid.cells for s in sizes] if sizes else list(grid.cells)
    return list(dict.fromkeys(cells))


def parse_trainers(text: str, critics: tuple[str, ...]) -> list[str]:
    """``--trainers`` names (``ours`` = ``ours-shared``), checked against :data:`TRAINER_LABELS`
    and the ``critics`` rlhf.ppo accepts."""
    names = [{"ours": "ours-shared"}.get(t.strip(), t.strip()) for t in text.split(",") if t.strip()]
    for name in names:
        if name not in TRAINER_LABELS:
            raise ValueError(f"unknown trainer {name!r}: choose from {', '.join(TRAINER_LABELS)} (or ours)")
        if name.startswith("ours-") and name[5:] not in critics:
            raise ValueError(f"{name}: rlhf.ppo's PPOModule has no critic {name[5:]!r} (it accepts "
                             f"{', '.join(critics)})")
    return list(dict.fromkeys(names))


def _csv(text: str | None, kind: type = str) -> list[Any] | None:
    return None if text is None else [kind(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The grids, trainers, precisions, PPO settings, busy policy and where results go."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="main", help=f"comma-separated, of {', '.join(GRIDS)}")
    parser.add_argument("--quick", action="store_true", help="= --grid quick")
    parser.add_argument("--sizes", default=None, help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--response-lengths", default=None, help="comma-separated new tokens per response")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated prompts per iteration (= minibatch)")
    parser.add_argument("--trainers", default=None,
                        help=f"comma-separated, of {', '.join(TRAINER_LABELS)} (default: all rlhf.ppo supports)")
    parser.add_argument("--precision", default="32", help="comma-separated, of 32, bf16: one result file each")
    parser.add_argument("--trl-autocast", choices=TRL_AUTOCAST, default="all",
                        help="bf16 only: where TRL autocasts (see benchmarks.workers.TRL_AUTOCAST)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per trainer and cell (grid default: 3)")
    parser.add_argument("--prompt-length", type=int, default=None, help="tokens per prompt (grid default)")
    parser.add_argument("--ppo-epochs", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations per run, after warm-up")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first iterations per run")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--hydra-layers", type=int, default=2,
                        help="ours-hydra: the top decoder layers its value branch copies and trains")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--separate-reward-model", action="store_true",
                        help="ours loads the RM as its own model instead of an adapter on the policy base")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc's MALLOC_MMAP_THRESHOLD_ in every worker (default: glibc's dynamic threshold)")
    add_busy_arguments(parser)
    add_common_arguments(parser, None, "result JSON (only with one grid and one precision; default: "
                                       "benchmarks/results/ppo_vs_trl[_GRID][_bf16][_mmapN].json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.grid = "quick"
    args.grids = _csv(args.grid)
    args.precisions = _csv(args.precision)
    try:
        allocator_env(args.malloc_mmap_threshold)
        args.busy_policy = busy_policy_from(args)
    except ValueError as error:
        parser.error(str(error))
    bad = [g for g in args.grids if g not in GRIDS] + [p for p in args.precisions if p not in PRECISIONS]
    bad += [s for s in _csv(args.sizes) or [] if s not in SIZES]
    if bad:
        parser.error(f"unknown grid, precision or size: {', '.join(bad)}")
    if (args.response_lengths or args.batch_sizes) and len(args.grids) > 1:
        parser.error("--response-lengths / --batch-sizes make one custom grid: give at most one --grid")
    if args.out and len(args.grids) * len(args.precisions) > 1:
        parser.error("--out names one file: give one --grid and one --precision")
    return args


def run_grid(args: argparse.Namespace, grid_name: str, precision: str, trainers: list[str],
             baselines: dict[str, int], work: Path, argv: list[str]) -> dict[str, Any]:
    """Run one grid at one precision: every cell, repeat and trainer, interleaved; the report
    is written after every cell (``complete`` false until the last)."""
    grid = GRIDS[grid_name]
    custom = args.response_lengths or args.batch_sizes
    cells = grid_cells(grid, _csv(args.sizes), _csv(args.response_lengths, int), _csv(args.batch_sizes, int))
    name = "custom" if custom else grid_name
    out = Path(args.out) if args.out else results_path(name, precision, args.malloc_mmap_threshold)
    pick = {k: getattr(args, k) if getattr(args, k) is not None else getattr(grid, k)
            for k in ("prompt_length", "ppo_epochs", "iterations", "warmup", "repeats")}
    common = dict(ppo_epochs=pick["ppo_epochs"], warmup=pick["warmup"], iterations=pick["iterations"],
                  lora_r=args.lora_r, lora_alpha=2 * args.lora_r, threads=args.threads, device=args.device,
                  share_reward_base=not args.separate_reward_model, precision=precision,
                  trl_autocast=args.trl_autocast, critic_layers=args.hydra_layers)
    session = BenchmarkRun("ppo_vs_trl", argv)
    settings = {**common, "grid": name, "grid_cells": [asdict(c) for c in cells], "trainers": trainers,
                "repeats": pick["repeats"], "order": "given order on even repeats, reversed on odd ones",
                "prompt_length": pick["prompt_length"], "temperature": 0.7, "kl_coef": 0.05, "minibatch": "= batch",
                "tokenizer": str(args.tokenizer), "malloc_mmap_threshold": args.malloc_mmap_threshold,
                "busy_policy": asdict(args.busy_policy)}
    extra_env = allocator_env(args.malloc_mmap_threshold)
    shallow = sorted({c.size for c in cells if SIZES[c.size].layers <= args.hydra_layers})
    if "ours-hydra" in trainers and shallow:
        raise SystemExit(f"--hydra-layers {args.hydra_layers} needs more decoder layers than size(s) "
                         f"{', '.join(shallow)} have: lower it or drop ours-hydra from --trainers")
    prompts_needed: dict[str, int] = {}
    for cell in cells:
        need = cell.batch_size * (pick["warmup"] + pick["iterations"])
        prompts_needed[cell.size] = max(prompts_needed.get(cell.size, 0), need)
    assets = {size: build_assets(work / size, SIZES[size], args.tokenizer, count, pick["prompt_length"],
                                 lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
              for size, count in prompts_needed.items()}
    done: list[dict[str, Any]] = []
    total, count = len(cells) * pick["repeats"] * len(trainers), 0
    for cell in cells:
        runs = []
        for repeat in range(pick["repeats"]):
            for position, trainer in enumerate(interleaved_order(trainers, repeat)):
                count += 1
                family, critic = ("trl", "shared") if trainer == "trl" else ("ours", trainer[5:])
                spec = RunSpec(trainer=family, critic=critic, base=assets[cell.size]["base"],
                               rm=assets[cell.size]["rm"], prompts=assets[cell.size]["prompts"],
                               response_length=cell.response_length, batch_size=cell.batch_size, **common)
                label = f"{cell.size}-{cell.response_length}-{cell.batch_size}-{precision}-{trainer}-r{repeat}"
                print(f"[bench] ({count}/{total}) {label} ...", flush=True)
                result = run_measured(measure, spec, work, label, args.busy_policy, extra_env=extra_env)
                summary = summarize_run(result, pick["warmup"], baselines[family])
                runs.append({"trainer": trainer, "repeat": repeat, "position": position, **summary})
        done.append({**asdict(cell), "shape": asdict(SIZES[cell.size]), "precision": precision,
                     **summarize_cell(runs), "runs": runs})
        report = session.report(settings, complete=len(done) == len(cells),
                                busy_runs=sum(c["busy_runs"] for c in done),
                                import_baseline_rss_mib={t: b / MIB for t, b in baselines.items()}, cells=done)
        write_json(out, report)
    report["out"] = str(out)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run every requested grid at every precision; print and write each one's tables."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        critics = supported_critics()
        default = [t for t in TRAINER_LABELS if t == "trl" or t[5:] in critics]
        trainers = parse_trainers(args.trainers, critics) if args.trainers else default
    except ValueError as error:
        raise SystemExit(str(error)) from None
    families = sorted({"trl" if t == "trl" else "ours" for t in trainers})
    with work_directory(args.work_dir, "ppo-bench-") as work:
        baselines = {f: run_measured(measure, RunSpec(trainer=f"baseline-{f}", threads=args.threads), work,
                                     f"baseline-{f}", args.busy_policy,
                                     extra_env=allocator_env(args.malloc_mmap_threshold))["import_rss_bytes"]
                     for f in families}
        for grid_name in args.grids:
            for precision in args.precisions:
                report = run_grid(args, grid_name, precision, trainers, baselines, work, argv)
                print(f"\n== {report['settings']['grid']}, precision {precision} ==")
                for text in (format_table(report["cells"]), format_breakdown(report["cells"]),
                             format_precision(report["cells"]), format_markdown(report["cells"])):
                    print(text + "\n")
                print(footer(report, report["out"]))


if __name__ == "__main__":
    main()
