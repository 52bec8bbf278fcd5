"""Drawing the next token: temperature, top-k and top-p, then one inverse-CDF draw per row.

``torch.multinomial`` on a ``[B, vocab]`` probability table draws one exponential variate per
vocabulary entry. With the temperature and softmax included, a draw over a 49k vocabulary took
7.1-8.6 ms for 8 rows (32-37 ms for 32 rows) on the 2-core CPU, against 2.5-3.2 ms (6.9-10.8 ms)
for a cumulative sum, one uniform per row and a binary search, which draw from the same
distribution (``python -m benchmarks.sampling``, six runs). Generating 64 tokens for 8 prompts
with the benchmark's medium model (LoRA on): 3.20-3.57 s with ``generate``'s own sampling,
2.79-3.11 s with this one (``python -m benchmarks.sampling --generate``, two runs).

:class:`InverseCDFSampler` plugs this into ``transformers``' ``generate`` as the last logits
processor of a *greedy* search: it draws the token itself and hands back scores that are
``-inf`` everywhere but there, so the greedy ``argmax`` keeps the drawn token. KV caching,
EOS handling and FSDP's ``synced_gpus`` stepping stay ``generate``'s.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from rlhf.ppo.losses import check_temperature


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits / temperature`` ``[B, V]`` (float32) with tokens outside the top-``k`` (``0``: no
    limit) or outside the smallest set whose probability reaches ``top_p`` set to ``-inf``.
    The most likely token always stays."""
    check_temperature(temperature)
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row ``[B]`` drawn from ``softmax(filter_logits(logits, ...))``.

    Inverse-CDF sampling: the row's cumulative probabilities (in float64, so even a token of
    probability ~1e-12 keeps its own interval), one uniform in ``[0, total)`` and a binary
    search for the first cumulative value above it.
    """
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    uniform = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device, generator=generator) * total
    # Strictly below the total even if the product rounded up, so the first cumulative value
    # above it belongs to a token of non-zero probability (no host sync, unlike a check).
    uniform = torch.minimum(uniform, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, uniform, right=True).squeeze(1)


def tempered_logprob_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``tokens`` ``[B]`` and the entropy ``[B]`` under ``softmax(logits / temperature)``
    (``logits`` ``[B, V]``; float32; no top-k / top-p: the distribution PPO's log-probs use)."""
    scaled = logits.float() / temperature
    lse = torch.logsumexp(scaled, dim=-1)
    logp = scaled.gather(1, tokens.unsqueeze(1)).squeeze(1) - lse
    probs = torch.exp(scaled - lse.unsqueeze(1))
    return logp, lse - (probs * scaled).sum(dim=-1)


class InverseCDFSampler(LogitsProcessor):
    """A logits processor that samples: returns ``[B, V]`` scores that are ``0`` at the token
    drawn by :func:`sample_from_logits` and ``-inf`` elsewhere (use with greedy ``generate``).

    With ``record``, each call also keeps the drawn tokens' log-probs and the entropies
    (:func:`tempered_logprob_and_entropy`); :meth:`recorded` stacks them ``[B, steps]``.
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, record: bool = False) -> None:
        check_temperature(temperature)
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.record = record
        self._logprobs: list[torch.Tensor] = []
        self._entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        tokens = sample_from_logits(scores, self.temperature, self.top_k, self.top_p, self.generator)
        if self.record:
            logp, entropy = tempered_logprob_and_entropy(scores, tokens, self.temperature)
            self._logprobs.append(logp)
            self._entropies.append(entropy)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens.unsqueeze(1), 0.0)

    def recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropies)``, each ``[B, steps]``, of the draws made since construction."""
        if not self._logprobs:
            raise RuntimeError("nothing recorded: construct with record=True and sample first")
        return torch.stack(self._logprobs, dim=1), torch.stack(self._entropies, dim=1)
