"""Record kinds the three stages train on.

A prompt is a conversation: a tuple of :class:`Turn` (role, content), ending with a user turn.
A plain string prompt is one user turn. Records are frozen so they can be hashed and shared
between dataloader workers without copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One message of a conversation."""

    role: str
    content: str


Conversation = tuple[Turn, ...]
PromptLike = Union[str, Conversation]


def as_conversation(prompt: PromptLike) -> Conversation:
    """Return ``prompt`` as a conversation; a string becomes one user turn."""
    if isinstance(prompt, str):
        return (Turn("user", prompt),)
    return tuple(prompt)


def conversation_text(conversation: Conversation) -> str:
    """A readable one-string rendering (for logs and sample tables), not a model template."""
    if len(conversation) == 1 and conversation[0].role == "user":
        return conversation[0].content
    return "\n\n".join(f"{t.role.capitalize()}: {t.content}" for t in conversation)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt alone: what PPO samples responses for."""

    prompt: Conversation


@dataclass(frozen=True)
class Demonstration:
    """A prompt and the response a person wrote for it (SFT)."""

    prompt: Conversation
    response: str


@dataclass(frozen=True)
class Comparison:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``margin`` is an optional strength of preference (e.g. a rating difference) used by the
    reward model's margin loss.
    """

    prompt: Conversation
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class Ranking:
    """A prompt with K >= 2 completions, ordered best first, or ranked by ``ranks``.

    ``ranks[i]`` is completion ``i``'s rank (1 = best; equal ranks are ties and give no
    pair). ``None`` means the completions are already ordered best first.
    """

    prompt: Conversation
    completions: tuple[str, ...]
    ranks: tuple[int, ...] | None = None

    def pairs(self) -> list[tuple[int, int]]:
        """The ordered index pairs ``(better, worse)``: all K·(K-1)/2 of them without ties,
        e.g. K=3 -> (0,1),(0,2),(1,2); with ``ranks``, every pair of different rank."""
        k = len(self.completions)
        if self.ranks is None:
            return [(i, j) for i in range(k) for j in range(i + 1, k)]
        r = self.ranks
        return [(i, j) for i in range(k) for j in range(k) if r[i] < r[j]]

    def to_comparisons(self) -> list[Comparison]:
        """The ranking as all its ordered comparisons."""
        return [
            Comparison(self.prompt, self.completions[i], self.completions[j])
            for i, j in self.pairs()
        ]


def comparison_as_ranking(comparison: Comparison) -> Ranking:
    """A comparison is a ranking of two."""
    return Ranking(comparison.prompt, (comparison.chosen, comparison.rejected))
