"""Score prompt/response pairs with a saved reward model, and measure pairwise accuracy.

    python -m rlhf.score --model outputs/quickstart/rm \\
        --data data/hh-rlhf/helpful-online/test.jsonl.gz data/hh-rlhf/harmless-base/test.jsonl.gz \\
        --schema hh_rlhf --val-fraction 0.1 --split-seed 0 --split val --out scores.jsonl

Several ``--model`` directories (a reward ensemble, e.g. RMs trained with different seeds): each
member's accuracy, and the ensemble's with the members standardised and combined by their mean,
their min and mean - penalty * std (:mod:`rlhf.models.ensemble`); the headline is the mean's.

``--split val`` keeps exactly the prompt groups :class:`~rlhf.data.ComparisonDataModule` held
out with the same files (in the same order), ``val_fraction`` and ``split_seed``: the accuracy
on comparisons the reward model never trained on. Beside it, the accuracy of "the longer reply
wins" on the same pairs (replies as written, and as truncated for the RM): an RM is only as good
as its margin over that rule. Prompts are formatted and truncated (or,
for an RM trained with ``long_prompts: drop``, over-long ones skipped) as in training: the
settings saved in ``reward_model.json`` unless given here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf.data.collate import pad_sequences
from rlhf.data.datamodules import split_preference_prompts
from rlhf.data.records import Comparison, PromptLike, Ranking, as_conversation
from rlhf.data.sources import DataSource, load_records
from rlhf.data.tokenization import PromptFormatter, truncate_pair
from rlhf.length_bias import length_rule_accuracy
from rlhf.models.ensemble import OBJECTIVES, combine_scores

log = logging.getLogger("rlhf.score")


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="seq", file=sys.stderr)


@torch.no_grad()
def score_texts(
    model: torch.nn.Module,
    formatter: Any,
    prompts: Sequence[PromptLike],
    responses: Sequence[str],
    batch_size: int = 16,
    max_length: int = 512,
    max_prompt_length: int = 384,
    progress: bool = False,
) -> torch.Tensor:
    """Scores ``[n]`` (fp32, on the CPU) of ``responses[i]`` to ``prompts[i]``.

    Args:
        model: a :class:`~rlhf.rm.RewardModel` (``model(input_ids, attention_mask) -> [b]``).
        formatter: a :class:`PromptFormatter`, or a tokenizer (then formatted with its chat
            template when it has one, as in training by default).
        prompts: strings (one user turn) or conversations.
        responses: one response per prompt.
        batch_size: sequences per forward pass (sorted by length to pad little).
        max_length, max_prompt_length: truncation, as in training.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(formatter, PromptFormatter):
        formatter = PromptFormatter(formatter)
    seqs = []
    for prompt, response in zip(prompts, responses):
        conversation = as_conversation(prompt)
        pair = truncate_pair(
            formatter.prompt_ids(conversation),
            formatter.response_ids(conversation, response),
            max_length,
            max_prompt_length,
        )
        seqs.append(pair.prompt_ids + pair.response_ids)
    scores = torch.empty(len(seqs), dtype=torch.float32)
    if not seqs:
        return scores
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    pad_id = formatter.tokenizer.pad_token_id
    pad_id = formatter.eos_id if pad_id is None else pad_id
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    bar = _progress(len(seqs), progress, "scoring")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = [seqs[i] for i in rows]
            input_ids = pad_sequences(batch, pad_id, "right")
            mask = pad_sequences([[1] * len(s) for s in batch], 0, "right")
            out = model(input_ids.to(device), mask.to(device))
            scores[torch.tensor(rows)] = out.float().cpu()
            if bar is not None:
                bar.update(len(rows))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return scores


def response_lengths(
    formatter: PromptFormatter,
    prompts: Sequence[PromptLike],
    responses: Sequence[str],
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[int], list[int]]:
    """Token lengths ``[n]`` of each response as written and as scored (after the truncation
    :func:`score_texts` applies), for the "longer reply wins" rule."""
    written, scored = [], []
    for prompt, response in zip(prompts, responses):
        conversation = as_conversation(prompt)
        prompt_ids = formatter.prompt_ids(conversation)
        response_ids = formatter.response_ids(conversation, response)
        written.append(len(response_ids))
        scored.append(len(truncate_pair(prompt_ids, response_ids, max_length, max_prompt_length).response_ids))
    return written, scored


@dataclass
class ScoredPair:
    """One comparison to score: record ``index`` (among the good rows of all files)."""

    index: int
    source: str
    prompt: Any
    chosen: str
    rejected: str
    pair: tuple[int, int] | None = None  # (better, worse) completion indices of a ranking


def select_comparisons(
    paths: Sequence[str],
    schema: str = "hh_rlhf",
    split: str = "all",
    val_fraction: float = 0.0,
    split_seed: int = 0,
    on_bad_row: str = "skip",
) -> list[ScoredPair]:
    """Read preference records from ``paths`` (in order) and keep the ``split`` part.

    ``train``/``val`` are the prompt groups a :class:`~rlhf.data.ComparisonDataModule` with
    ``train=paths``, the same ``val_fraction`` and ``split_seed`` trains or validates on.
    """
    records: list[tuple[str, Comparison | Ranking]] = []
    for path in paths:
        # load_records logs a summary of any skipped rows itself.
        result = load_records(DataSource(str(path), schema=schema), "preference", on_bad_row=on_bad_row)
        records.extend((str(path), r) for r in result.records)
    keep = None
    if split != "all":
        keep = set(split_preference_prompts([r for _, r in records], split, val_fraction, split_seed))
    out: list[ScoredPair] = []
    for index, (source, record) in enumerate(records):
        if keep is not None and record.prompt not in keep:
            continue
        if isinstance(record, Ranking):
            for i, j in record.pairs():
                out.append(ScoredPair(index, source, record.prompt, record.completions[i],
                                      record.completions[j], (i, j)))
        else:
            out.append(ScoredPair(index, source, record.prompt, record.chosen, record.rejected))
    return out


def accuracy_summary(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (ties wrong), its 95% normal-approximation interval, mean margin."""
    n = int(chosen.numel())
    correct = (chosen > rejected).float()
    acc = float(correct.mean()) if n else float("nan")
    se = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
    return {
        "n": n,
        "accuracy": acc,
        "accuracy_se": se,
        "accuracy_ci95_low": acc - 1.96 * se,
        "accuracy_ci95_high": acc + 1.96 * se,
        "mean_margin": float((chosen - rejected).mean()) if n else float("nan"),
        "mean_chosen": float(chosen.mean()) if n else float("nan"),
        "mean_rejected": float(rejected.mean()) if n else float("nan"),
    }


def score_length_correlation(scores: torch.Tensor, lengths: Sequence[int]) -> float:
    """Pearson correlation of the scores ``[N]`` with the reply lengths ``[N]`` the model saw
    (NaN when either is constant): how much of the score is length."""
    x, y = scores.double().cpu().numpy(), np.asarray(lengths, dtype=np.float64)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def ensemble_accuracies(scores: torch.Tensor, n: int, names: Sequence[str], penalty: float) -> dict[str, Any]:
    """Each member's accuracy and the ensemble's under every objective.

    Args:
        scores: ``[K, 2n]`` standardised scores of K members: the n chosen replies, then the n
            rejected ones.
        n: the number of pairs.
        names: K member names.
        penalty: the ``uncertainty`` objective's std weight.

    Returns:
        ``{"members": {name: accuracy_summary}, "ensemble": {objective: accuracy_summary}}``.
    """
    out: dict[str, Any] = {"members": {}, "ensemble": {}}
    for name, row in zip(names, scores):
        out["members"][str(name)] = accuracy_summary(row[:n], row[n:])
    for objective in OBJECTIVES:
        combined = combine_scores(scores, objective, penalty)  # type: ignore[arg-type]
        out["ensemble"][objective] = accuracy_summary(combined[:n], combined[n:])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rlhf.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, nargs="+",
                   help="saved reward model directory (reward_model.json); several: each one's accuracy "
                   "and the ensemble's (members standardised, then combined as rlhf.models.ensemble)")
    p.add_argument("--ensemble-penalty", type=float, default=1.0,
                   help="the std weight of the ensemble's 'uncertainty' objective (mean - penalty * std)")
    p.add_argument("--data", required=True, nargs="+", help="comparison file(s), in training order")
    p.add_argument("--schema", default="hh_rlhf", choices=["hh_rlhf", "fields"])
    p.add_argument("--out", default=None, help="JSONL with one row per comparison")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=None, help="default: as trained, else 512")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: as trained, else 384")
    p.add_argument("--long-prompts", default=None, choices=["truncate", "drop"],
                   help="prompts over --max-prompt-length: truncate, or skip the comparison; "
                   "default: as trained, else truncate")
    p.add_argument("--limit", type=int, default=None, help="score only the first N comparisons")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split", default="all", choices=["all", "train", "val"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="backbone dtype; default auto (bf16 on CUDA)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the CLI; returns the summary (also printed as JSON)."""
    from rlhf.models.loading import load_tokenizer
    from rlhf.models.reward import load_reward_model, read_reward_model_info

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.split != "all" and not 0.0 < args.val_fraction < 1.0:
        raise SystemExit("--split train/val needs --val-fraction in (0, 1), as in training")
    infos = [read_reward_model_info(path) for path in args.model]
    info = infos[0]
    trained = info.get("data") or {}
    for path, other in zip(args.model[1:], infos[1:]):
        if (other.get("data") or {}) != trained:
            log.warning("%s was trained with other data settings than %s; scoring all with the first's",
                        path, args.model[0])
    max_length = args.max_length or trained.get("max_length") or 512
    max_prompt_length = args.max_prompt_length or trained.get("max_prompt_length") or 384
    if max_prompt_length >= max_length:
        raise SystemExit(f"--max-prompt-length ({max_prompt_length}) must be < --max-length ({max_length})")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer_dir = info.get("tokenizer_dir") or info.get("model_dir") or info.get("adapter_dir")
    tokenizer = load_tokenizer(str(Path(args.model[0]) / tokenizer_dir))
    formatter = PromptFormatter(tokenizer, trained.get("use_chat_template"), trained.get("system_prompt"))

    pairs = select_comparisons(args.data, args.schema, args.split, args.val_fraction, args.split_seed)
    if (args.long_prompts or trained.get("long_prompts") or "truncate") == "drop":
        pairs = [p for p in pairs if len(formatter.prompt_ids(as_conversation(p.prompt))) <= max_prompt_length]
    if args.limit is not None:
        pairs = pairs[: args.limit]
    if not pairs:
        raise SystemExit("no comparisons to score")
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    member_scores = []
    for path in args.model:  # one model in memory at a time
        model = load_reward_model(path, device=device, dtype=args.dtype)
        scores = score_texts(model, formatter, prompts, responses, args.batch_size, max_length,
                             max_prompt_length, progress=not args.no_progress)
        member_scores.append(model.normalize(scores) if len(args.model) > 1 else scores)
        del model
    if len(args.model) == 1:
        scores = member_scores[0]
        members: dict[str, Any] = {}
    else:
        stacked = torch.stack(member_scores)  # [K, 2n], each member standardised
        members = ensemble_accuracies(stacked, len(pairs), args.model, args.ensemble_penalty)
        scores = combine_scores(stacked, "mean")
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    summary = accuracy_summary(chosen, rejected)
    summary.update(members)
    written, scored = response_lengths(formatter, prompts, responses, max_length, max_prompt_length)
    n = len(pairs)
    summary.update(length_rule_accuracy(written[:n], written[n:]))
    summary.update({f"scored_{k}": v for k, v in length_rule_accuracy(scored[:n], scored[n:]).items()})
    summary["score_length_corr"] = score_length_correlation(scores, scored)
    summary["split"] = args.split

    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w") as f:
            for p, c, r in zip(pairs, chosen.tolist(), rejected.tolist()):
                row = {"index": p.index, "source": p.source, "chosen_score": c,
                       "rejected_score": r, "correct": c > r}
                if p.pair is not None:
                    row["pair"] = list(p.pair)
                f.write(json.dumps(row) + "\n")
    for name, part in members.get("members", {}).items():
        print(f"member {name}: pairwise accuracy {part['accuracy']:.4f} (±{1.96 * part['accuracy_se']:.4f})")
    for objective, part in members.get("ensemble", {}).items():
        print(f"ensemble ({objective}): pairwise accuracy {part['accuracy']:.4f} (±{1.96 * part['accuracy_se']:.4f})")
    print(
        ("ensemble (mean): " if members else "")
        + f"pairwise accuracy {summary['accuracy']:.4f} "
        f"(95% CI {summary['accuracy_ci95_low']:.4f}-{summary['accuracy_ci95_high']:.4f}, "
        f"±{1.96 * summary['accuracy_se']:.4f}), mean margin {summary['mean_margin']:.4f}, "
        f"n={summary['n']} ({args.split})"
    )
    print(
        f'"the longer reply wins" on the same pairs: {summary["length_rule_accuracy"]:.4f} '
        f'(±{1.96 * summary["length_rule_accuracy_se"]:.4f}; replies as written), '
        f'{summary["scored_length_rule_accuracy"]:.4f} (as the RM saw them, truncated to --max-length); '
        f'correlation of the score with the scored reply length {summary["score_length_corr"]:+.3f}'
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
