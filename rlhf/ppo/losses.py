"""PPO losses and log-prob / entropy helpers.

References: Schulman et al. 2017 (PPO); Huang et al., "The N (and N+) implementation
details of RLHF with PPO" (token-level masked mean, clipped value loss with factor 0.5,
clipfrac / approx_kl statistics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.ppo.masks import _bool_mask, masked_mean

__all__ = [
    "check_temperature",
    "entropy_from_logits",
    "half_precision_matmul",
    "head_logprobs",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "policy_loss",
    "value_loss",
]


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss (to minimise).

    ``ratio = exp(logp - old_logp)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``, the mean
    taken over all valid tokens of the batch (token-level aggregation).

    Args:
        logp: ``[b, t]`` log-probs of the taken tokens under the current policy (with grad).
        old_logp: ``[b, t]`` log-probs under the rollout policy (detached here).
        advantages: ``[b, t]`` advantages (detached here; whiten beforehand if desired).
        mask: ``[b, t]`` bool/float; non-zero = valid.
        clip_range: ``eps``.

    Returns:
        ``(loss, stats)``: ``loss`` is a scalar; ``stats`` holds detached scalars

        * ``clipfrac``: fraction of valid tokens where the clipped term is the active one
          (``-A * clip(ratio) > -A * ratio``; those tokens get zero gradient),
        * ``approx_kl``: masked mean of ``0.5 * (logp - old_logp)**2`` (k2),
        * ``approx_kl_k3``: masked mean of ``(ratio - 1) - log(ratio)`` (k3 of KL(old||new)),
        * ``ratio_mean``, ``ratio_max``: over valid tokens (``ratio_max = 0`` if none).
    """
    m = _bool_mask(mask, logp)
    log_ratio = logp - old_logp.detach()
    # garbage at invalid positions must not produce inf/nan that poisons gradients
    log_ratio = torch.where(m, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(logp.dtype), m).detach(),
            "approx_kl": masked_mean(0.5 * lr.square(), m),
            "approx_kl_k3": masked_mean(torch.expm1(lr) - lr, m),
            "ratio_mean": masked_mean(r, m),
            "ratio_max": torch.where(m, r, torch.zeros_like(r)).max(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss (to minimise).

    ``v_clip = clip(values, old_values - eps, old_values + eps)``;
    ``loss = 0.5 * masked_mean(max((values - R)**2, (v_clip - R)**2))``.

    Args:
        values: ``[b, t]`` current value predictions (with grad).
        old_values: ``[b, t]`` value predictions at rollout time (detached here).
        returns: ``[b, t]`` targets ``R`` (detached here).
        mask: ``[b, t]`` bool/float; non-zero = valid.
        clip_range: ``eps`` (absolute, in value units).

    Returns:
        ``(loss, stats)``; ``stats["clipfrac"]`` = fraction of valid tokens where the
        clipped error is the larger (active) one.
    """
    m = _bool_mask(mask, values)
    old = old_values.detach()
    ret = returns.detach()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)
    old = torch.where(m, old, zero)
    ret = torch.where(m, ret, zero)
    v_clipped = old + torch.clamp(v - old, -clip_range, clip_range)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), m)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    ``H = -sum(p * log p)`` with ``log p = log_softmax(z)`` (stable for large logits), one row
    of the batch at a time: the temporaries are ``[t, v]``, not ``[b, t, v]``, and a row's
    ``[t, v]`` stays in cache, 2-6x faster on one CPU thread than whole-batch softmax arithmetic on a 49k
    vocabulary.  Computed in float32 for half/bfloat16 input; differentiable.

    Args:
        logits: ``[b, t, v]``.

    Returns:
        ``[b, t]`` float32 (or input dtype if float32/float64); not masked.
    """
    rows = [_row_entropy(F.log_softmax(_float(row), dim=-1)) for row in logits]
    if not rows:
        return torch.empty(logits.shape[:2], dtype=_float(logits).dtype, device=logits.device)
    return torch.stack(rows, dim=0)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _row_entropy(logp: torch.Tensor) -> torch.Tensor:
    """``[t]`` entropies from ``[t, v]`` log-probabilities."""
    return -(logp.exp() * logp).sum(dim=-1)


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens`` and the entropy at each position, both under
    ``softmax(logits / temperature)``, from one ``log_softmax`` per row of the batch.

    The PPO update needs both; computing the entropy from the same ``log_softmax`` costs one
    ``exp`` and a sum instead of a second softmax over the vocabulary.

    Args:
        logits: ``[b, t, v]``, aligned with ``tokens`` (see :func:`logprobs_from_logits`).
        tokens: ``[b, t]`` int64 token ids.
        temperature: sampling temperature, ``> 0``.
        entropy_grad: keep the entropy in the autograd graph (an entropy bonus); otherwise
            it is computed under ``no_grad`` (logged only: no ``[t, v]`` saved for backward).

    Returns:
        ``(logp, entropy)``, each ``[b, t]`` float32 (float64 for float64 logits); ``logp``
        is differentiable.
    """
    check_temperature(temperature)
    logps, entropies = [], []
    for row_logits, row_tokens in zip(logits, tokens):
        logp, token_logp = _row_log_softmax(row_logits, row_tokens, temperature)
        logps.append(token_logp)
        if entropy_grad:
            entropies.append(_row_entropy(logp))
        else:
            with torch.no_grad():
                entropies.append(_row_entropy(logp.detach()))
    if not logps:
        empty = _empty_logprobs(logits, tokens)
        return empty, empty.clone()
    return torch.stack(logps, dim=0), torch.stack(entropies, dim=0)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of ``tokens`` under ``softmax(logits / temperature)``.

    Divide by the *same* temperature used for sampling, otherwise the rollout log-probs
    and ratios are off (N+ implementation details).  The logits must already be aligned
    with ``tokens`` (``logits[:, i]`` predicts ``tokens[:, i]``; shift them beforehand).

    Memory: ``log_softmax`` materialises a full ``[b, t, v]`` tensor (plus a float32 copy
    for half/bfloat16 input -- done for accuracy); for a 150k vocabulary that is
    ~0.6 MB per token.  To bound the peak it is computed one row of the batch at a time,
    so the extra memory is ``[t, v]`` rather than ``[b, t, v]``.

    Args:
        logits: ``[b, t, v]`` (logits of the positions that predict ``tokens``).
        tokens: ``[b, t]`` int64 token ids.
        temperature: sampling temperature, ``> 0``.

    Returns:
        ``[b, t]`` float32 (float64 for float64 logits) log-probs; differentiable.
    """
    check_temperature(temperature)
    rows = [_TokenLogprob.apply(row_logits, row_tokens, temperature) for row_logits, row_tokens in zip(logits, tokens)]
    if not rows:
        return _empty_logprobs(logits, tokens)
    return torch.stack(rows, dim=0)


class _TokenLogprob(torch.autograd.Function):
    """``log_softmax(logits / T)[token]`` for one row ``[t, v]`` -> ``[t]`` (float32 for half /
    bfloat16 logits), without keeping the ``[t, v]`` log-softmax for backward.

    Saved for backward are the logits as given (bf16 logits stay bf16) and the ``[t]``
    log-normalisers; backward recomputes the softmax from them: ``d logp / d z = (onehot -
    softmax(z / T)) / T``. Against ``log_softmax`` + ``gather`` this saves the float32
    ``[t, v]`` log-softmax kept per row until backward, and the zero-filled ``[t, v]`` gradient
    that ``gather``'s backward scatters into.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        z = _float(logits)
        if temperature != 1.0:
            z = z / temperature
        index = tokens.long().unsqueeze(-1)
        lse = torch.logsumexp(z, dim=-1)
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature = temperature
        return z.gather(-1, index).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, index, lse = ctx.saved_tensors
        z = _float(logits)
        if ctx.temperature != 1.0:
            z = z / ctx.temperature
        grad_z = (z - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -g * softmax
        grad_z.scatter_add_(-1, index, grad.unsqueeze(-1))  # + g at the token
        if ctx.temperature != 1.0:
            grad_z = grad_z.div_(ctx.temperature)
        return grad_z.to(logits.dtype), None, None


def head_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[n]`` of ``tokens`` ``[n]`` under ``softmax((hidden @ weight.T + bias) /
    temperature)``, and with ``entropy`` the entropies ``[n]`` (never in the autograd graph):
    an LM head and :func:`logprobs_from_logits` in one step, for a *frozen* head.

    ``hidden`` is ``[n, H]``, ``weight`` ``[V, H]``, ``bias`` ``[V]`` or ``None``; the result is
    float32 (float64 for float64 logits) and differentiable with respect to ``hidden`` only.
    For backward it keeps ``d logp / d hidden = (onehot(token) - softmax) @ weight / T``,
    ``[n, H]``, made while the ``[n, V]`` logits exist, instead of the logits themselves: a
    ``V / H`` times smaller tensor (49k / 576 = 85x for SmolLM2), and backward makes no
    ``[n, V]`` tensor at all. The matmul that makes it is the one the head's backward would
    have run. A half-precision matmul runs in blocks of :data:`HEAD_VOCAB_BLOCK` vocabulary
    rows, so only the float32 ``[n, V]`` logits exist whole. Raises ``ValueError`` when
    ``weight`` or ``bias`` requires grad (a trained head needs the softmax in backward: use the
    head and :func:`logprobs_from_logits`).
    """
    check_temperature(temperature)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("head_logprobs is for a frozen head: weight and bias must not require grad")
    if torch.is_grad_enabled() and hidden.requires_grad:
        logp, ent = _HeadLogprob.apply(hidden, weight, bias, tokens, temperature, entropy)
    else:
        logp, ent, _ = _head_logprob_forward(hidden, weight, bias, tokens, temperature, entropy, False)
    return logp, (ent if entropy else None)


# Vocabulary rows of the head's weight per matmul in :func:`head_logprobs` when the matmul runs
# in half precision (bf16 weights, or autocast): the float32 ``[n, V]`` logits are filled one
# block at a time, so the half-precision ``[n, V]`` logits (12 MiB for 128 x 49k) never exist
# whole beside them (a block: 2 MiB), and the Jacobian's matmul reads the softmax one block at
# a time too.
HEAD_VOCAB_BLOCK = 8192


def half_precision_matmul(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear(hidden, weight)`` computes in float16 / bfloat16 here."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device) in (torch.float16, torch.bfloat16)
    return weight.dtype in (torch.float16, torch.bfloat16)


def _float_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, half: bool) -> torch.Tensor:
    """``F.linear(hidden, weight, bias)`` ``[n, V]`` in float32 (float64 stays float64); a
    half-precision matmul runs in blocks of :data:`HEAD_VOCAB_BLOCK` vocabulary rows."""
    if not half:
        return F.linear(hidden, weight, bias)
    vocab = weight.shape[0]
    z = torch.empty(hidden.shape[0], vocab, dtype=torch.float32, device=hidden.device)
    for lo in range(0, vocab, HEAD_VOCAB_BLOCK):
        hi = min(vocab, lo + HEAD_VOCAB_BLOCK)
        z[:, lo:hi] = F.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi])
    return z


def _softmax_matmul(coefficients: torch.Tensor, weight: torch.Tensor, half: bool) -> torch.Tensor:
    """``coefficients @ weight``: ``[n, V] x [V, H] -> [n, H]``, float32; a half-precision
    matmul runs in blocks of vocabulary rows (each block's coefficients cast to half on their
    own) and sums the blocks in float32."""
    if not half:
        return coefficients @ weight
    out = torch.zeros(coefficients.shape[0], weight.shape[1], dtype=torch.float32, device=coefficients.device)
    for lo in range(0, weight.shape[0], HEAD_VOCAB_BLOCK):
        hi = min(weight.shape[0], lo + HEAD_VOCAB_BLOCK)
        out += coefficients[:, lo:hi].to(weight.dtype) @ weight[lo:hi]
    return out


def _head_logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float,
    entropy: bool,
    jacobian: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`head_logprobs`' arithmetic: log-probs ``[n]``, entropies ``[n]`` (empty unless
    ``entropy``) and, with ``jacobian``, ``(onehot - softmax) @ weight / T`` ``[n, H]``. Works
    in place on the float32 ``[n, V]`` logits (and one more ``[n, V]`` buffer with ``entropy``)."""
    half = half_precision_matmul(hidden, weight)
    z = _float_logits(hidden, weight, bias, half)  # [n, V]
    if temperature != 1.0:
        z = z.div_(temperature)
    index = tokens.long().unsqueeze(-1)
    token_z = z.gather(-1, index).squeeze(-1)
    top = z.amax(dim=-1, keepdim=True)
    shifted = z.sub_(top)  # z - max, <= 0
    exp = shifted.exp() if entropy else shifted.exp_()
    total = exp.sum(dim=-1, keepdim=True)
    lse = (top + total.log()).squeeze(-1)
    logp = token_z - lse
    ent = torch.empty(0, dtype=logp.dtype, device=logp.device)
    if entropy:
        # H = lse - sum(p * z) = log(total) - sum(p * (z - max))
        ent = total.log().squeeze(-1) - shifted.mul_(exp).sum(dim=-1) / total.squeeze(-1)
        del shifted
    jac = None
    if jacobian:
        minus_p = exp.div_(-total)  # -softmax, in place
        minus_p.scatter_add_(-1, index, torch.ones_like(token_z).unsqueeze(-1))
        if temperature != 1.0:
            minus_p.div_(temperature)
        jac = _softmax_matmul(minus_p, weight, half)  # [n, H]
    return logp, ent, jac


class _HeadLogprob(torch.autograd.Function):
    """:func:`head_logprobs` with grad: saves only the ``[n, H]`` Jacobian rows."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        tokens: torch.Tensor,
        temperature: float,
        entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logp, ent, jac = _head_logprob_forward(hidden, weight, bias, tokens, temperature, entropy, True)
        ctx.save_for_backward(jac)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (jac,) = ctx.saved_tensors
        grad_hidden = (jac.to(grad.dtype) * grad.unsqueeze(-1)).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None


def check_temperature(temperature: float) -> None:
    """Raise ``ValueError`` unless ``temperature > 0`` (log-probs and sampling divide by it)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _row_log_softmax(
    row_logits: torch.Tensor, row_tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row of the batch: the ``[t, v]`` log-softmax of ``logits / temperature`` (float32
    for half/bfloat16 input) and the ``[t]`` log-probs of ``row_tokens`` in it."""
    z = _float(row_logits)
    if temperature != 1.0:
        z = z / temperature
    logp = F.log_softmax(z, dim=-1)
    return logp, logp.gather(-1, row_tokens.long().unsqueeze(-1)).squeeze(-1)


def _empty_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[0, t]`` log-probs of an empty batch, in the dtype a non-empty one would have."""
    return torch.empty(tokens.shape, dtype=_float(logits).dtype, device=logits.device)
