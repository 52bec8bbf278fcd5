"""The samples of one rejection-sampling round: prompt + response sequences with their scores
and KL, concatenated across generation chunks, selected and trimmed for the update."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    """``x`` ``[N, T]`` padded on the right with ``value`` to ``[N, width]`` (``width >= T``)."""
    return F.pad(x, (0, width - x.shape[1]), value=value)


@dataclass
class Samples:
    """Sequences sampled in one round, every response starting at column ``response_start``.

    Attributes:
        input_ids: ``[N, P + R]`` left-padded prompt + right-padded response.
        attention_mask: ``[N, P + R]``, 0 on padding and after the first EOS.
        response_start: ``P``.
        response_mask: ``[N, R]``, 1 on response tokens up to and including the first EOS.
        has_eos: ``[N]`` bool, the response ended with EOS.
        scores: ``[N]`` float32 rewards of the whole sequences.
        kl: ``[N]`` float32 ``log pi(y|x) - log pi_ref(y|x)`` summed over response tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    has_eos: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Response lengths in tokens ``[N]``."""
        return self.response_mask.sum(dim=1)

    def response_ids(self, row: int) -> list[int]:
        """The response tokens of ``row`` (EOS included when present)."""
        return self.input_ids[row, self.response_start :][self.response_mask[row].bool()].tolist()

    def select(self, index: torch.Tensor) -> Samples:
        """The rows ``index`` ``[n]`` (int64)."""
        return Samples(**{
            f.name: getattr(self, f.name) if f.name == "response_start" else getattr(self, f.name)[index]
            for f in fields(self)
        })

    def trimmed(self) -> Samples:
        """The same rows without the prompt columns that are padding in every row and the
        response columns past the longest response (fewer tokens through the model)."""
        prompt_real = self.attention_mask[:, : self.response_start].bool().any(dim=0)
        lead = int(prompt_real.float().argmax()) if bool(prompt_real.any()) else self.response_start - 1
        lead = min(lead, self.response_start - 1)  # keep one prompt column: it predicts token 0
        width = max(1, int(self.lengths.max())) if len(self) else 1
        end = self.response_start + width
        return Samples(
            input_ids=self.input_ids[:, lead:end], attention_mask=self.attention_mask[:, lead:end],
            response_start=self.response_start - lead, response_mask=self.response_mask[:, :width],
            has_eos=self.has_eos, scores=self.scores, kl=self.kl,
        )

    @staticmethod
    def cat(parts: Sequence[Samples], pad_id: int) -> Samples:
        """Rows of ``parts`` (one prompt width ``P``, any response widths) in one ``Samples``,
        responses right-padded (``pad_id``, mask 0) to the widest."""
        start = parts[0].response_start
        if any(p.response_start != start for p in parts):
            raise ValueError("samples to join must share one prompt width")
        width = max(p.response_mask.shape[1] for p in parts)
        return Samples(
            input_ids=torch.cat([pad_right(p.input_ids, start + width, pad_id) for p in parts]),
            attention_mask=torch.cat([pad_right(p.attention_mask, start + width, 0) for p in parts]),
            response_start=start,
            response_mask=torch.cat([pad_right(p.response_mask, width, 0) for p in parts]),
            has_eos=torch.cat([p.has_eos for p in parts]),
            scores=torch.cat([p.scores for p in parts]),
            kl=torch.cat([p.kl for p in parts]),
        )


def round_metrics(samples: Samples, kept: Samples, prefix: str = "") -> dict[str, float]:
    """Reward, KL and length of all of a round's samples, and what was kept of them."""
    finite = samples.scores[torch.isfinite(samples.scores)]
    metrics = {
        f"{prefix}reward/mean": float(finite.mean()) if finite.numel() else float("nan"),
        f"{prefix}reward/std": float(finite.std()) if finite.numel() > 1 else 0.0,
        f"{prefix}kl/mean": float(samples.kl.mean()),
        f"{prefix}response/length": float(samples.lengths.float().mean()),
        f"{prefix}response/eos_frac": float(samples.has_eos.float().mean()),
        f"{prefix}rejection/kept_frac": len(kept) / max(1, len(samples)),
    }
    if len(kept):
        metrics[f"{prefix}reward/kept_mean"] = float(kept.scores.mean())
        metrics[f"{prefix}response/kept_length"] = float(kept.lengths.float().mean())
    return metrics
