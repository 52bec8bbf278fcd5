"""How responses are sampled."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingSettings:
    """How responses are sampled. The same temperature scales logits when log-probs are
    recomputed, so sampling and scoring see one distribution (top-k/top-p only restrict
    which tokens can be drawn)."""

    max_new_tokens: int = 64
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
