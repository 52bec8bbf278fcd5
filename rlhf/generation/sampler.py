"""Drawing the next token: temperature, top-k and top-p, then one inverse-CDF draw per row.

``torch.multinomial`` on a ``[B, vocab]`` probability table draws one exponential variate per
vocabulary entry. Inverse-CDF sampling draws from the same distribution with one uniform per row
and a binary search over cumulative sums, which :func:`draw_inverse_cdf` keeps in two levels
(float32 sums of blocks, float64 cumulative sums of the block sums and of the chosen block) so
no float64 copy of a whole row is made. ``python -m benchmarks.sampling`` compares the two;
the measurements are in docs/performance-notes.md.

:class:`InverseCDFSampler` plugs this into ``transformers``' ``generate`` as the last logits
processor of a *greedy* search: it draws the token itself and hands back scores that are
``-inf`` everywhere but there, so the greedy ``argmax`` keeps the drawn token. KV caching,
EOS handling and FSDP's ``synced_gpus`` stepping stay ``generate``'s.

Logits that cannot be sampled (a NaN or +inf anywhere in a row, or ``-inf`` for every token:
what a diverged model gives) raise :class:`rlhf.guards.NonFiniteError` (one device sync per
draw) instead of drawing an index past the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor

from rlhf.guards import NonFiniteError
from rlhf.models.logprobs import check_temperature


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


# Inverse-CDF sampling in two levels: the cumulative mass of blocks of this many vocabulary
# entries, then the cumulative mass inside the one block the uniform falls in.
CDF_BLOCK = 256


def draw_inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row ``[B]``, drawn with probability proportional to ``weights`` ``[B, V]``
    (non-negative, finite, a positive sum per row; unnormalised is fine).

    Inverse CDF: one uniform in ``[0, total)`` per row and the first index whose cumulative
    weight exceeds it. In two levels: block sums (one pass over the row), their cumulative sum,
    then the cumulative sum of the chosen block alone, instead of a float64 copy and cumulative
    sum of the whole ``[B, V]``. The cumulative sums are float64, so even a token of probability
    ~1e-12 keeps its own interval. A zero-weight index is never drawn.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // CDF_BLOCK)
    if blocks * CDF_BLOCK != vocab:
        weights = F.pad(weights, (0, blocks * CDF_BLOCK - vocab))
    by_block = weights.view(rows, blocks, CDF_BLOCK)
    # Block sums in float32 (relative error ~1e-7 of a block's mass, which only shifts which
    # block is drawn by as much); the cumulative sums, where intervals are resolved, in float64.
    block_cdf = by_block.sum(dim=-1).double().cumsum(dim=-1)  # [B, blocks]
    total = block_cdf[:, -1:]
    uniform = torch.rand(total.shape, dtype=total.dtype, device=total.device, generator=generator) * total
    # Strictly below the total even if the product rounded up, so the first cumulative value
    # above it belongs to a token of non-zero probability (no host sync, unlike a check).
    uniform = torch.minimum(uniform, torch.nextafter(total, torch.zeros_like(total)))
    block = torch.searchsorted(block_cdf, uniform, right=True).clamp_(max=blocks - 1)  # [B, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    inside = by_block.gather(1, block.unsqueeze(-1).expand(rows, 1, CDF_BLOCK)).squeeze(1)
    inside_cdf = inside.double().cumsum(dim=-1)  # [B, CDF_BLOCK]
    # The block's own sum may round differently from the first level's: stay inside it.
    rest = torch.minimum(uniform - before, torch.nextafter(inside_cdf[:, -1:], torch.zeros_like(total)))
    return (block * CDF_BLOCK + torch.searchsorted(inside_cdf, rest, right=True)).squeeze(1)


def check_samplable(row_max: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` unless every row's largest scaled logit ``row_max``
    ``[B, 1]`` is finite: ``amax`` is NaN for a row with a NaN, ``+inf`` for one with ``+inf``
    and ``-inf`` for one that is ``-inf`` everywhere, and such rows cannot be sampled."""
    bad = ~torch.isfinite(row_max)
    if bool(bad.any()):
        raise NonFiniteError(
            f"cannot sample the next token: the logits of {int(bad.sum())} of {bad.numel()} rows "
            "are not finite (NaN or +inf, or -inf for every token); the model's weights or "
            "inputs have gone non-finite (a diverged policy: lower the learning rate)"
        )


def _shifted_exp(scaled: torch.Tensor, check: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d, e)`` for ``[B, V]`` scaled logits: ``d = scaled - rowmax``, ``e = exp(d)`` (the
    unnormalised probabilities, ``0`` where ``scaled`` is ``-inf``); with ``check``, rows that
    cannot be sampled raise (:func:`check_samplable`)."""
    row_max = scaled.amax(dim=-1, keepdim=True)
    if check:
        check_samplable(row_max)
    d = scaled - row_max
    return d, d.exp()


def _logprob_and_entropy(
    d: torch.Tensor, e: torch.Tensor, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` and entropies ``[B]`` from :func:`_shifted_exp`'s ``(d, e)``:
    ``log p = d - log sum(e)`` and ``H = log sum(e) - sum(e * d) / sum(e)``."""
    total = e.sum(dim=-1)
    log_total = total.log()
    logp = d.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_total
    e_times_d = (e * d).masked_fill_(e == 0, 0.0)  # 0 * -inf from masked tokens counts as 0
    return logp, log_total - e_times_d.sum(dim=-1) / total


def sample_from_logits(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row ``[B]`` drawn from ``softmax(filter_logits(logits, ...))`` by
    :func:`draw_inverse_cdf`; raises :class:`NonFiniteError` for logits that cannot be
    sampled (:func:`check_samplable`)."""
    _, weights = _shifted_exp(filter_logits(logits, temperature, top_k, top_p), check=True)
    return draw_inverse_cdf(weights, generator)


def tempered_logprob_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``tokens`` ``[B]`` and the entropy ``[B]`` under ``softmax(logits / temperature)``
    (``logits`` ``[B, V]``; float32; no top-k / top-p: the distribution PPO's log-probs use)."""
    return _logprob_and_entropy(*_shifted_exp(logits.float() / temperature), tokens)


class InverseCDFSampler(LogitsProcessor):
    """A logits processor that samples: returns ``[B, V]`` scores that are ``0`` at the token
    drawn by :func:`sample_from_logits` and ``-inf`` elsewhere (use with greedy ``generate``).

    With ``record``, each call also keeps the drawn tokens' log-probs and the entropies
    (:func:`tempered_logprob_and_entropy`; without top-k / top-p from the same exponentials
    as the draw); :meth:`recorded` stacks them ``[B, steps]``.
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0,
                 generator: torch.Generator | None = None, record: bool = False) -> None:
        check_temperature(temperature)
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.record = record
        self._logprobs: list[torch.Tensor] = []
        self._entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.record and self.top_k == 0 and self.top_p >= 1.0:
            d, e = _shifted_exp(scores.float() / self.temperature, check=True)
            tokens = draw_inverse_cdf(e, self.generator)
            logp, entropy = _logprob_and_entropy(d, e, tokens)
        else:
            tokens = sample_from_logits(scores, self.temperature, self.top_k, self.top_p, self.generator)
            if self.record:
                logp, entropy = tempered_logprob_and_entropy(scores, tokens, self.temperature)
        if self.record:
            self._logprobs.append(logp)
            self._entropies.append(entropy)
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(1, tokens.unsqueeze(1), 0.0)

    def recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprobs, entropies)``, each ``[B, steps]``, of the draws made since construction."""
        if not self._logprobs:
            raise RuntimeError("nothing recorded: construct with record=True and sample first")
        return torch.stack(self._logprobs, dim=1), torch.stack(self._entropies, dim=1)
