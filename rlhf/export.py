"""Export K sampled responses per prompt as a ranking file, for the next round of labelling.

    python -m rlhf.export --policy outputs/quickstart/ppo --data prompts.jsonl --k 4 \\
        --out round2/rankings.jsonl                 # ranks left empty for people to fill in
    python -m rlhf.export ... --gold vader           # ranks from a gold function

InstructGPT's "steps 2 and 3 are repeated": sample from the current policy, have the samples
ranked, train the next reward model and policy on them. Each output row is what the
comparison loader reads (schema ``fields``, kind ``ranking``/``preference``)::

    {"prompt": [{"role": "user", "content": "..."}], "completions": ["...", "..."],
     "ranks": [2, 1], "gold_scores": [0.1, 0.4], "policy": "outputs/quickstart/ppo"}

``ranks`` (1 = best, ties share a rank) is ``null`` until someone fills it in; the loader
refuses unfilled rows with a message saying so. Duplicate and empty samples are dropped;
prompts left with fewer than 2 distinct completions (or, with ``--gold``, all tied) are
skipped and counted. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf.console import quiet_known_warnings
from rlhf.data.datamodules import PromptDataModule
from rlhf.data.records import Conversation
from rlhf.generation import SamplingSettings
from rlhf.gold import GOLD_FUNCTIONS, gold_ranking
from rlhf.outputs import write_jsonl
from rlhf.policies import (
    add_prompt_sampling_arguments,
    load_policy,
    progress_bar,
    prompt_batches,
    prompt_data_from_args,
    resolve_device,
    sample_batches,
    sampling_from_args,
)

log = logging.getLogger("rlhf.export")


@dataclass
class ExportStats:
    """How many prompts were written and why others were skipped."""

    written: int = 0
    too_few_distinct: int = 0
    all_tied: int = 0


def ranking_row(
    prompt: Conversation,
    samples: Sequence[str],
    policy: str,
    gold: str | None = None,
) -> tuple[dict[str, Any] | None, str | None]:
    """One ranking row from a prompt's samples, or ``(None, reason)`` when it is unusable.

    Empty and duplicate samples are dropped (first occurrence kept). With ``gold`` the row
    carries ``gold_scores`` and the ranks they imply; otherwise ``ranks`` is ``None``.
    """
    completions: list[str] = []
    seen: set[str] = set()
    for text in samples:
        key = text.strip()
        if key and key not in seen:
            seen.add(key)
            completions.append(text)
    if len(completions) < 2:
        return None, "too_few_distinct"
    row: dict[str, Any] = {
        "prompt": [{"role": t.role, "content": t.content} for t in prompt],
        "completions": completions,
        "ranks": None,
        "policy": policy,
    }
    if gold is not None:
        ranked = gold_ranking(completions, gold)
        if ranked is None:
            return None, "all_tied"
        row.update(ranked)
    return row, None


@torch.no_grad()
def sample_k(
    model: torch.nn.Module,
    tokenizer: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    n_prompts: int,
    k: int,
    sampling: SamplingSettings,
    device: torch.device,
    precision: str = "bf16-mixed",
    progress: bool = True,
) -> list[list[str]]:
    """``k`` decoded samples for each of ``n_prompts`` prompts (indexed by batch ``index``)."""
    samples: list[list[str]] = [[] for _ in range(n_prompts)]
    with progress_bar(n_prompts * k, "sampling", progress) as bar:
        for batch, gen in sample_batches(model, tokenizer, batches, sampling, device, precision, repeats=k, bar=bar):
            for row in range(len(gen.input_ids)):
                samples[int(batch["index"][row // k])].append(gen.response_text(row, tokenizer))
    return samples


def write_rankings(rows: Sequence[dict[str, Any]], out: str | Path) -> Path:
    """Write ``rows`` as JSONL to ``out`` via a temporary file renamed into place."""
    return write_jsonl(rows, out)


def export_rankings(
    policy: str,
    data: PromptDataModule,
    out: str | Path,
    k: int = 4,
    sampling: SamplingSettings | None = None,
    gold: str | None = None,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "bf16-mixed",
    progress: bool = True,
) -> ExportStats:
    """Sample ``k`` responses per prompt from ``policy`` and write the ranking file ``out``."""
    if k < 2:
        raise ValueError(f"k must be >= 2 to rank anything, got {k}")
    dev = resolve_device(device)
    batches, prompts = prompt_batches(data, split, limit)
    model = load_policy(policy, dev, precision=precision)
    torch.manual_seed(seed)
    samples = sample_k(model, data.tokenizer, batches, len(prompts), k, sampling or SamplingSettings(), dev, precision, progress)
    stats = ExportStats()
    rows = []
    for prompt, texts in zip(prompts, samples):
        row, reason = ranking_row(prompt, texts, str(policy), gold)
        if row is None:
            setattr(stats, reason, getattr(stats, reason) + 1)
        else:
            rows.append(row)
    stats.written = len(rows)
    if not rows:
        raise ValueError(f"no usable prompts to export ({stats})")
    write_rankings(rows, out)
    log.info("wrote %d rankings to %s (%s)", len(rows), out, stats)
    return stats


def main(argv: Sequence[str] | None = None) -> ExportStats:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_known_warnings()
    p = argparse.ArgumentParser(prog="python -m rlhf.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="stage output or model dir to sample from")
    add_prompt_sampling_arguments(p, split="train", batch_size=8, temperature=1.0)
    p.add_argument("--k", type=int, default=4, help="samples per prompt (batch-size x k sequences a batch)")
    p.add_argument("--gold", choices=sorted(GOLD_FUNCTIONS), default=None, help="rank with a gold function")
    p.add_argument("--out", required=True, help="ranking file to write (.jsonl)")
    args = p.parse_args(argv)
    data = prompt_data_from_args(args, args.policy)
    sampling = sampling_from_args(args)
    stats = export_rankings(
        args.policy, data, args.out, args.k, sampling, args.gold, args.split, args.limit,
        args.seed, args.device, args.precision, not args.no_progress,
    )
    print(f"wrote {stats.written} prompts x up to {args.k} completions to {args.out} "
          f"(skipped: {stats.too_few_distinct} with < 2 distinct samples, {stats.all_tied} all tied)")
    return stats


if __name__ == "__main__":
    main(sys.argv[1:])
