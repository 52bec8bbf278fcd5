"""Gold reward functions: a known "human" for overoptimisation experiments (Gao et al. 2022).

The gold labeller ranks policy samples, a proxy reward model learns from those ranks, PPO
optimises the proxy, and the gold score of PPO's samples shows whether the proxy's gains are
real. ``python -m rlhf.gold plot RUN_DIR`` draws gold and proxy reward against sqrt(KL).

``vader``: VADER (Hutto & Gilbert 2014, a published, rule-based sentiment lexicon on PyPI as
``vaderSentiment``), scored as the positive minus the negative proportion of the text, in
``[-1, 1]``. Proportions do not grow with length (VADER's ``compound`` score does: it sums
word valences before squashing), so a policy cannot raise the gold score by writing more,
only by writing more positively.

``vader_substantive``: the same positivity scaled by ``min(1, words / 12)``. VADER alone scores
a one-word "Yes." at 1.0, above any helpful answer, and a policy that learns to stop answering
wins under it; this "human" wants at least a sentence before warmth counts in full. Past 12
words length earns nothing (most SFT replies on the gold task are 15-22 words).

``python -m rlhf.gold relabel RANKINGS --gold NAME --out OUT`` re-ranks an exported ranking file
under another gold function without sampling again.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from rlhf.plot import find_metrics_csv, moving_average, read_metrics

GoldFunction = Callable[[Sequence[str]], list[float]]


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as e:  # pragma: no cover
        raise ImportError("the 'vader' gold function needs `pip install vaderSentiment`") from e
    return SentimentIntensityAnalyzer()


def vader_positivity(texts: Sequence[str]) -> list[float]:
    """VADER positive minus negative proportion of each text, in ``[-1, 1]`` (0 for empty)."""
    analyzer = _vader()
    scores = []
    for text in texts:
        polarity = analyzer.polarity_scores(text)
        scores.append(float(polarity["pos"] - polarity["neg"]))
    return scores


SUBSTANTIVE_MIN_WORDS = 12


def substantive_positivity(texts: Sequence[str], min_words: int = SUBSTANTIVE_MIN_WORDS) -> list[float]:
    """:func:`vader_positivity` times ``min(1, words / min_words)`` (words: whitespace-split)."""
    if min_words < 1:
        raise ValueError(f"min_words must be >= 1, got {min_words}")
    return [s * min(1.0, len(t.split()) / min_words) for s, t in zip(vader_positivity(texts), texts)]


GOLD_FUNCTIONS: dict[str, GoldFunction] = {"vader": vader_positivity, "vader_substantive": substantive_positivity}


def gold_function(name: str) -> GoldFunction:
    """The gold function registered as ``name`` (see :data:`GOLD_FUNCTIONS`)."""
    if name not in GOLD_FUNCTIONS:
        raise ValueError(f"unknown gold function {name!r}; known: {sorted(GOLD_FUNCTIONS)}")
    return GOLD_FUNCTIONS[name]


def competition_ranks(scores: Sequence[float]) -> list[int]:
    """Ranks with 1 = best; equal scores share a rank (``[0.5, 0.9, 0.5] -> [2, 1, 2]``)."""
    return [1 + sum(other > s for other in scores) for s in scores]


def gold_ranking(completions: Sequence[str], gold: str) -> dict[str, Any] | None:
    """The gold fields of a ranking row for ``completions``: ``ranks`` (1 = best),
    ``gold_scores`` and ``gold`` (the function's name); ``None`` when all completions tie."""
    scores = gold_function(gold)(completions)
    ranks = competition_ranks(scores)
    return None if len(set(ranks)) < 2 else {"ranks": ranks, "gold_scores": scores, "gold": gold}


def relabel_rankings(rankings: str | Path, gold: str) -> tuple[list[dict], int]:
    """The rows of the ranking file ``rankings`` (JSONL, as :mod:`rlhf.export` writes it)
    re-ranked by the gold function ``gold``, and how many rows were dropped because all their
    completions tie under it. Other fields (prompt, completions, policy) are kept as they are.
    A bad row raises :class:`rlhf.data.DataError` naming the file and line."""
    from rlhf.data import DataError, DataSource, iter_rows

    gold_function(gold)  # an unknown name fails before reading
    rows, tied = [], 0
    for line, row in iter_rows(DataSource(path=str(rankings), format="jsonl")):
        completions = row.get("completions")
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            raise DataError(str(rankings), line, "completions", "expected a list of strings (a ranking row)")
        ranked = gold_ranking(completions, gold)
        if ranked is None:
            tied += 1
            continue
        rows.append(row | ranked)
    return rows, tied


# --------------------------------------------------------------------------- the figure
def gold_proxy_curve(columns: dict[str, list[float]], prefix: str = "") -> dict[str, list[float]]:
    """``step``, ``sqrt_kl``, ``proxy`` and ``gold`` series from the rows of a CSV log (columns
    as :func:`rlhf.plot.read_metrics` gives them) that have all three of KL, RM and gold."""
    names = (f"{prefix}kl/mean", f"{prefix}reward/mean", f"{prefix}gold/mean")
    series: dict[str, list[float]] = {"step": [], "sqrt_kl": [], "proxy": [], "gold": []}
    if not all(n in columns for n in names):
        return series
    kl, proxy, gold = (columns[n] for n in names)
    steps = columns.get("step", [float(i) for i in range(len(kl))])
    for i in range(len(kl)):
        if all(math.isfinite(v) for v in (kl[i], proxy[i], gold[i])):
            series["step"].append(steps[i])
            series["sqrt_kl"].append(math.sqrt(max(0.0, kl[i])))
            series["proxy"].append(proxy[i])
            series["gold"].append(gold[i])
    return series


def plot_gold_vs_proxy(run_dir: str | Path, out: str | Path, smooth: int = 5) -> Path:
    """Gold and proxy reward (training rollouts, moving average of ``smooth`` iterations, and
    held-out validation points when logged) against sqrt(KL to the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = read_metrics(find_metrics_csv(run_dir))
    train, val = gold_proxy_curve(columns), gold_proxy_curve(columns, "val/")
    if not train["gold"]:
        raise ValueError(f"{run_dir}: no rows with kl/mean, reward/mean and gold/mean (was `gold` set?)")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "proxy", "proxy RM score (raw)"), (axes[1], "gold", "gold score")):
        ax.plot(train["sqrt_kl"], train[key], ".", alpha=0.3, label="train rollouts")
        ax.plot(moving_average(train["sqrt_kl"], smooth), moving_average(train[key], smooth), "-",
                label=f"moving avg ({smooth})")
        if val[key]:
            ax.plot(val["sqrt_kl"], val[key], "o-", color="black", label="held-out prompts")
        ax.set_xlabel("sqrt(KL to reference) [sqrt nats]")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"gold vs proxy reward during PPO ({Path(run_dir).name})")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.gold", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="gold and proxy reward vs sqrt(KL) from a PPO run's CSV log")
    plot.add_argument("run_dir")
    plot.add_argument("--out", required=True, help="PNG path")
    plot.add_argument("--smooth", type=int, default=5)
    score = sub.add_parser("score", help="print the gold score of each line of stdin")
    score.add_argument("--gold", default="vader", choices=sorted(GOLD_FUNCTIONS))
    relabel = sub.add_parser("relabel", help="re-rank an exported ranking file under another gold function")
    relabel.add_argument("rankings", help="JSONL from `python -m rlhf.export`")
    relabel.add_argument("--gold", required=True, choices=sorted(GOLD_FUNCTIONS))
    relabel.add_argument("--out", required=True, help="JSONL to write (renamed into place when complete)")
    args = p.parse_args(argv)
    if args.command == "plot":
        print(f"wrote {plot_gold_vs_proxy(args.run_dir, args.out, args.smooth)}")
    elif args.command == "relabel":
        from rlhf.outputs import write_jsonl

        rows, tied = relabel_rankings(args.rankings, args.gold)
        if not rows:
            raise SystemExit(f"{args.rankings}: every row ties under {args.gold!r}; nothing written")
        write_jsonl(rows, args.out)
        print(f"wrote {len(rows)} rankings under {args.gold!r} to {args.out} (dropped {tied} all tied)")
    else:
        lines = [line.rstrip("\n") for line in sys.stdin]
        for line, s in zip(lines, gold_function(args.gold)(lines)):
            print(f"{s:+.4f}\t{line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
