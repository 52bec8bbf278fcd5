"""Dynamic padding: each batch is padded to its own longest sequence.

Encoded items are plain dicts of Python lists (cheap to pickle to dataloader workers); the
collators here turn a list of them into tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


def pad_sequences(
    sequences: list[list[int]], pad_value: int, side: str = "right", multiple_of: int = 1
) -> torch.Tensor:
    """Stack variable-length lists into ``[batch, seq]``, padded on ``side`` ("right"/"left")."""
    longest = max(len(s) for s in sequences)
    length = -(-longest // multiple_of) * multiple_of
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if side == "right":
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            out[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def attention_mask_for(sequences: list[list[int]], like: torch.Tensor, side: str) -> torch.Tensor:
    """``[batch, seq]`` mask with 1 on real tokens, for sequences padded as ``like``."""
    return pad_sequences([[1] * len(s) for s in sequences], 0, side, like.shape[1]).to(like.dtype)


@dataclass
class DemonstrationCollator:
    """Right-pads prompt+response ids; ``labels`` are -100 on prompt and padding tokens.

    Batch: ``input_ids``, ``attention_mask``, ``labels``: ``[batch, seq]``.
    """

    pad_id: int
    multiple_of: int = 1

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [it["prompt_ids"] + it["response_ids"] for it in items]
        labels = [[IGNORE_INDEX] * len(it["prompt_ids"]) + it["response_ids"] for it in items]
        input_ids = pad_sequences(seqs, self.pad_id, "right", self.multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask_for(seqs, input_ids, "right"),
            "labels": pad_sequences(labels, IGNORE_INDEX, "right", self.multiple_of),
        }


@dataclass
class PreferenceCollator:
    """Flattens groups (one prompt, K completions, their ordered pairs) into one batch.

    Each completion is encoded once with its prompt, however many pairs it is in (the K-wise
    form of InstructGPT). Batch: ``input_ids``/``attention_mask`` ``[n_sequences, seq]``;
    ``chosen_index``/``rejected_index`` ``[n_pairs]`` rows of ``input_ids``; ``margin``
    ``[n_pairs]`` (0 where none); ``group`` ``[n_sequences]`` the group each row came from;
    ``prompt_length`` ``[n_sequences]`` the prompt's token count for each row (its response
    starts there).
    """

    pad_id: int
    multiple_of: int = 1

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs: list[list[int]] = []
        chosen, rejected, margins, groups = [], [], [], []
        for g, it in enumerate(items):
            offset = len(seqs)
            seqs.extend(it["prompt_ids"] + c for c in it["completion_ids"])
            groups.extend([g] * len(it["completion_ids"]))
            for (i, j), m in zip(it["pairs"], it["margins"]):
                chosen.append(offset + i)
                rejected.append(offset + j)
                margins.append(m)
        input_ids = pad_sequences(seqs, self.pad_id, "right", self.multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask_for(seqs, input_ids, "right"),
            "chosen_index": torch.tensor(chosen, dtype=torch.long),
            "rejected_index": torch.tensor(rejected, dtype=torch.long),
            "margin": torch.tensor(margins, dtype=torch.float32),
            "group": torch.tensor(groups, dtype=torch.long),
            "prompt_length": torch.tensor([len(it["prompt_ids"]) for it in items for _ in it["completion_ids"]],
                                          dtype=torch.long),
        }


@dataclass
class PromptCollator:
    """Left-pads prompts for generation. Batch: ``input_ids``/``attention_mask`` ``[batch, seq]``,
    ``index`` ``[batch]`` (row of the dataset, to look the prompt text up for sample tables)."""

    pad_id: int
    multiple_of: int = 1

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [it["prompt_ids"] for it in items]
        input_ids = pad_sequences(seqs, self.pad_id, "left", self.multiple_of)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask_for(seqs, input_ids, "left"),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
