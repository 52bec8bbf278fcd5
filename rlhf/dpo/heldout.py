"""``python -m rlhf.dpo.heldout``: the prompts a preference stage held out, as a prompt file.

A DPO policy has trained on the prompts of its training pairs, so comparing it with SFT on
prompts from another split would reward memorised replies. This writes exactly the prompt
groups a :class:`~rlhf.data.ComparisonDataModule` (the RM's and DPO's data) holds out with the
same files (in the same order), ``val_fraction`` and ``split_seed``, to ``OUT/prompts.jsonl``
(``{"prompt": [{"role", "content"}, ...]}`` rows, schema ``fields``), for example::

    python -m rlhf.dpo.heldout --schema hh_rlhf --val-fraction 0.2 --split-seed 0 \\
        --data data/hh-rlhf/helpful-online/test.jsonl.gz data/hh-rlhf/helpful-rejection-sampled/test.jsonl.gz \\
        --out outputs/quickstart/dpo_heldout
    python -m rlhf.evaluate ... --data outputs/quickstart/dpo_heldout/prompts.jsonl --schema fields --split all

The directory is written atomically (a pipeline ``run`` stage is complete when it exists).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rlhf.data.datamodules import split_preference_prompts
from rlhf.data.datasource import DataSource
from rlhf.data.records import Conversation
from rlhf.data.sources import load_records
from rlhf.outputs import atomic_directory


def heldout_prompts(
    paths: Sequence[str], schema: str, val_fraction: float, split_seed: int, split: str = "val"
) -> list[Conversation]:
    """The prompts of the ``split`` (``val`` or ``train``) prompt groups of a
    ``ComparisonDataModule`` over ``paths`` (bad rows skipped, as ``on_bad_row: skip``)."""
    records = []
    for path in paths:
        records += load_records(DataSource(str(path), schema=schema), "preference", on_bad_row="skip").records
    return split_preference_prompts(records, split, val_fraction, split_seed)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.dpo.heldout", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="preference files, in the training order")
    p.add_argument("--schema", default="fields", choices=["fields", "hh_rlhf", "alpaca"])
    p.add_argument("--val-fraction", type=float, required=True)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--out", required=True, help="output directory (prompts.jsonl)")
    args = p.parse_args(argv)
    prompts = heldout_prompts(args.data, args.schema, args.val_fraction, args.split_seed, args.split)
    with atomic_directory(args.out) as tmp:
        with open(tmp / "prompts.jsonl", "w") as f:
            for prompt in prompts:
                turns = [{"role": t.role, "content": t.content} for t in prompt]
                f.write(json.dumps({"prompt": turns}) + "\n")
    print(f"wrote {len(prompts)} {args.split} prompts to {args.out}/prompts.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
