"""Log-prob and entropy kernels shared by every stage that scores tokens under a policy.

Shapes: token tensors ``[batch, seq]``; logits ``[batch, seq, vocab]``; a rollout or
evaluation batch is ``[batch, prompt + response]`` with every response starting at column
``response_start`` (prompts left-padded). All log-probs are under ``softmax(logits /
temperature)``: the same temperature as sampling, or ratios and KL are off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlhf.distributed import root_forward
from rlhf.models.forward import causal_lm_of, trunk_hidden

__all__ = [
    "check_temperature",
    "entropy_from_logits",
    "half_precision_matmul",
    "head_logprobs",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "response_logprobs",
    "sequence_logprobs",
]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    ``H = -sum(p * log p)`` with ``log p = log_softmax(z)`` (stable for large logits), one row
    of the batch at a time: the temporaries are ``[t, v]``, not ``[b, t, v]``, and a row's
    ``[t, v]`` stays in cache (faster on a CPU than whole-batch softmax arithmetic on a large
    vocabulary).  Computed in float32 for half/bfloat16 input; differentiable.

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
    for half/bfloat16 input -- done for accuracy), ``vocab`` floats per token.  To bound the
    peak it is computed one row of the batch at a time, so the extra memory is ``[t, v]``
    rather than ``[b, t, v]``.

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
# block at a time, so the half-precision ``[n, V]`` logits never exist whole beside them, and
# the Jacobian's matmul reads the softmax one block at a time too.
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


# Response positions per LM-head call in :func:`response_logprobs`: the call's ``[positions,
# vocab]`` logits grow with it, while on the CPU the head's matmul is bound by reading its
# ``[vocab, hidden]`` weight, so fewer positions a call cost more in all (see
# docs/performance-notes.md).
HEAD_CHUNK_POSITIONS = 128
# The same when the head's matmul runs in float16 / bfloat16: the softmax is still float32, so
# a call's float32 buffer is twice the logits the matmul makes; half the positions keep the
# peak down at little cost in time.
HEAD_CHUNK_POSITIONS_HALF = 64


def response_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    response_start: int,
    tokens: torch.Tensor,
    temperature: float,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, R]`` of the response ``tokens`` ``[B, R]`` (and, with ``entropy``, the
    entropies ``[B, R]``) under ``softmax(lm_head(hidden) / temperature)``.

    The hidden state at column ``t`` predicts token ``t + 1``, so response token ``i`` (column
    ``response_start + i``) is predicted from column ``response_start + i - 1``. The LM head runs
    on a few rows of the batch at a time (about :data:`HEAD_CHUNK_POSITIONS` positions, or
    :data:`HEAD_CHUNK_POSITIONS_HALF` when its matmul runs in half precision; at least one row):
    the ``[B, R, vocab]`` logits never exist at once (on a 49k vocabulary they are the update's
    largest tensors). A frozen ``nn.Linear`` head without ``entropy_grad`` goes through
    :func:`head_logprobs`, which keeps ``[rows * R, hidden]`` per chunk for
    backward instead of the chunk's logits; otherwise the logits are kept, and in backward each
    chunk's logit gradient is freed before the next. Each chunk's ``[rows * R, hidden]`` input is
    made contiguous, so ``nn.Linear`` takes its plain matmul path. A head without a bias is
    linear, so the temperature divides its ``[rows * R, hidden]`` input instead of the
    ``vocab``-times larger logits (and their gradient). ``entropy_grad`` keeps the entropy in the
    autograd graph.
    """
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    predicting = hidden[:, response_start - 1 : -1]
    batch, length = tokens.shape
    weight = getattr(head, "weight", None)
    half = isinstance(weight, torch.Tensor) and half_precision_matmul(hidden, weight)
    rows_per_call = max(1, (HEAD_CHUNK_POSITIONS_HALF if half else HEAD_CHUNK_POSITIONS) // max(1, length))
    fold = temperature != 1.0 and isinstance(head, nn.Linear) and head.bias is None
    if fold:
        check_temperature(temperature)
    logits_temperature = 1.0 if fold else temperature
    # A frozen plain nn.Linear head (the usual LoRA setup) goes through head_logprobs, which
    # keeps [positions, hidden] for backward instead of the [positions, vocab] logits. A
    # trained, quantised or adapter-wrapped head, or an entropy bonus, takes the head + softmax path.
    frozen_linear = (
        type(head) is nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
        and not entropy_grad
    )

    def chunked() -> tuple[torch.Tensor, torch.Tensor | None]:
        logps, entropies = [], []
        for lo in range(0, batch, rows_per_call):
            rows = predicting[lo : lo + rows_per_call]
            flat = rows.reshape(-1, rows.shape[-1])  # [rows * R, hidden], contiguous
            if fold:
                flat = flat / temperature
            row_tokens = tokens[lo : lo + rows_per_call]
            if frozen_linear:
                logp, ent = head_logprobs(flat, head.weight, head.bias, row_tokens.reshape(-1), logits_temperature, entropy)
                logps.append(logp.view(row_tokens.shape))
                if entropy:
                    entropies.append(ent.view(row_tokens.shape))
                continue
            logits = head(flat).view(rows.shape[0], length, -1)
            if entropy:
                logp, ent = logprobs_and_entropy(logits, row_tokens, logits_temperature, entropy_grad)
                entropies.append(ent)
            else:
                logp = logprobs_from_logits(logits, row_tokens, logits_temperature)
            logps.append(logp)
        if not logps:
            empty = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)
            return empty, (empty.clone() if entropy else None)
        return torch.cat(logps), (torch.cat(entropies) if entropy else None)

    return root_forward(lm, chunked)


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response log-probs ``[B, R]`` and the trunk's hidden states ``[B, R, hidden]`` that
    predicted them (what a shared value head reads)."""
    hidden = trunk_hidden(model, input_ids, attention_mask)
    logp, _ = response_logprobs(model, hidden, response_start, input_ids[:, response_start:], temperature)
    return logp, hidden[:, response_start - 1 : -1]
