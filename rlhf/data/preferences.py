"""Preference groups: every comparison of one prompt as its distinct completions and ordered
``(better, worse)`` pairs, and dropping the pairs that truncation made identical."""

from __future__ import annotations

from rlhf.data.records import Comparison, Conversation, Ranking


class PreferenceGroup:
    """All comparisons of one prompt: its distinct completions and ``(better, worse)`` pairs."""

    def __init__(self, prompt: Conversation) -> None:
        self.prompt = prompt
        self.completions: list[str] = []
        self.pairs: list[tuple[int, int]] = []
        self.margins: list[float] = []

    def _slot(self, completion: str) -> int:
        if completion not in self.completions:
            self.completions.append(completion)
        return self.completions.index(completion)

    def add(self, better: str, worse: str, margin: float | None = None) -> None:
        self.pairs.append((self._slot(better), self._slot(worse)))
        self.margins.append(0.0 if margin is None else float(margin))


def group_preferences(records: list[Comparison | Ranking]) -> list[PreferenceGroup]:
    """Group comparisons and rankings by prompt, in order of first appearance."""
    groups: dict[Conversation, PreferenceGroup] = {}
    for record in records:
        group = groups.setdefault(record.prompt, PreferenceGroup(record.prompt))
        if isinstance(record, Ranking):
            for i, j in record.pairs():
                group.add(record.completions[i], record.completions[j])
        else:
            group.add(record.chosen, record.rejected, record.margin)
    return list(groups.values())


def drop_identical_pairs(
    completions: list[list[int]], pairs: list[tuple[int, int]], margins: list[float]
) -> tuple[list[list[int]], list[tuple[int, int]], list[float], int]:
    """``completions`` (token ids), ``pairs`` and ``margins`` without the pairs whose two
    completions are the same ids (texts that differ only past the truncation), and how many
    were dropped. Completions left in no pair are dropped too and the pairs re-indexed."""
    kept = [(pair, margin) for pair, margin in zip(pairs, margins)
            if completions[pair[0]] != completions[pair[1]]]
    used = sorted({k for pair, _ in kept for k in pair})
    new_index = {old: new for new, old in enumerate(used)}
    return (
        [completions[k] for k in used],
        [(new_index[i], new_index[j]) for (i, j), _ in kept],
        [margin for _, margin in kept],
        len(pairs) - len(kept),
    )
