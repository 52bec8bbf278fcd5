"""The sample table of a PPO run: a few prompt / response / reward rows every few iterations,
to W&B (when used) and to ``samples.jsonl`` in the run directory.

``samples.jsonl`` is append-only within a run: a resumed run keeps the rows before its
checkpoint's iteration, dropping (and logging) a line cut short by ``kill -9``
(:func:`drop_samples_from`); a new run moves the previous run's file to
``samples.previous.jsonl`` and starts anew (:func:`start_samples_anew`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf.data.records import conversation_text
from rlhf.masks import masked_sum
from rlhf.outputs import atomic_file
from rlhf.ppo.rollout import Rollout

if TYPE_CHECKING:
    from rlhf.ppo.module import PPOModule

SAMPLES_FILE = "samples.jsonl"
PREVIOUS_SAMPLES_FILE = "samples.previous.jsonl"
COLUMNS = ["iteration", "prompt", "response", "reward", "kl"]

log = logging.getLogger("rlhf.ppo")


def read_sample_lines(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """``(line, row)`` for each row of a ``samples.jsonl``, and the numbers of its torn lines
    (not a JSON object, or a last line without its newline: cut short by a kill mid-write)."""
    rows, torn = [], []
    lines = path.read_text().splitlines(keepends=True)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or (number == len(lines) and not line.endswith("\n")):
            torn.append(number)
        else:
            rows.append((line, row))
    return rows, torn


def drop_samples_from(path: Path, iteration: int) -> None:
    """Remove the rows of iteration ``iteration`` and later, and torn lines (logged), from a
    ``samples.jsonl`` (a resumed run makes those rows again)."""
    if not path.is_file():
        return
    rows, torn = read_sample_lines(path)
    if torn:
        log.warning("%s: dropped torn line(s) %s", path, ", ".join(map(str, torn)))
    kept = [line for line, row in rows if row.get("iteration", 0) < iteration]
    if torn or len(kept) != len(rows):
        with atomic_file(path) as tmp:
            tmp.write_text("".join(kept))


def start_samples_anew(path: Path) -> None:
    """For a new (not resumed) run: move an existing ``samples.jsonl`` to
    ``samples.previous.jsonl``, so the run never appends to another run's rows."""
    if path.is_file():
        previous = path.with_name(PREVIOUS_SAMPLES_FILE)
        os.replace(path, previous)
        log.info("a new run: moved the previous run's %s to %s", path.name, previous)


def response_ids(r: Rollout) -> list[list[int]]:
    """Each sequence's response tokens (up to and including EOS)."""
    return [r.input_ids[i, r.response_start :][r.response_mask[i].bool()].tolist() for i in range(len(r))]


def sample_rows(
    rollout: Rollout, prompts: Sequence[str], iteration: int, decode: Callable[[list[int]], str], limit: int = 4
) -> list[list[Any]]:
    """``[iteration, prompt, response, raw score, KL]`` rows for the first ``limit`` sequences;
    ``prompts[i]`` is sequence ``i``'s prompt text."""
    rows = []
    for i, ids in enumerate(response_ids(rollout)[:limit]):
        kl = float(masked_sum(rollout.kl[i], rollout.response_mask[i]))
        rows.append([iteration, prompts[i], decode(ids), float(rollout.raw_scores[i]), kl])
    return rows


def append_samples(path: Path, rows: list[list[Any]]) -> None:
    """Append ``rows`` to ``path`` as JSON lines keyed by :data:`COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(dict(zip(COLUMNS, row))) + "\n")


def log_sample_table(module: PPOModule, rollout: Rollout, batch: dict[str, torch.Tensor], limit: int = 4) -> None:
    """A few rows of ``rollout`` (prompts from ``batch["index"]`` into the training data) to
    every logger with ``log_table`` (W&B) and, on rank zero, to ``samples.jsonl``."""
    units = module.trainer.datamodule.train_units
    prompts = [
        conversation_text(units[int(batch["index"][i // module.samples_per_prompt])].prompt)
        for i in range(min(limit, len(rollout)))
    ]
    rows = sample_rows(rollout, prompts, module.iteration,
                       lambda ids: module.tokenizer.decode(ids, skip_special_tokens=True), limit)
    for logger in module.trainer.loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key="samples", columns=COLUMNS, data=rows, step=module.global_step)
    if module.trainer.is_global_zero:
        append_samples(Path(module.trainer.default_root_dir) / SAMPLES_FILE, rows)
