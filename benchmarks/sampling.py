"""The per-token draw of generation: ``torch.multinomial`` vs our inverse-CDF sampler.

    python -m benchmarks.sampling            # ~5 s; prints milliseconds per draw

Both draw one token per row from ``softmax(logits / 0.7)`` over a SmolLM2-sized vocabulary
(49,152), temperature and softmax included (what ``generate``'s sampling step does per token). Nothing
is written: the numbers explain one line of the README, they are not a target.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from rlhf.ppo.sampler import sample_from_logits


def milliseconds_per_call(draw: Callable[[], torch.Tensor], repeats: int) -> float:
    """Mean wall-clock milliseconds of ``draw()`` over ``repeats`` calls after one warm-up."""
    draw()
    start = time.perf_counter()
    for _ in range(repeats):
        draw()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {args.vocab}")
    print("| rows | torch.multinomial (ms) | inverse CDF (ms) |\n| --- | --- | --- |")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab) * 3
        multinomial = milliseconds_per_call(
            lambda: torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1), args.repeats
        )
        inverse_cdf = milliseconds_per_call(lambda: sample_from_logits(logits, 0.7), args.repeats)
        print(f"| {rows} | {multinomial:.2f} | {inverse_cdf:.2f} |")


if __name__ == "__main__":
    main()
