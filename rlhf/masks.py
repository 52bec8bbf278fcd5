"""Masked reductions and response-mask helpers.

Conventions used throughout :mod:`rlhf`:

* Token tensors are ``[batch, seq]`` (``[b, t]``); vocab logits are ``[b, t, v]``.
* A *mask* is a bool or float ``[b, t]`` tensor, non-zero (``1``/``True``) for valid
  response tokens and zero for padding and for anything after the first EOS.
* Invalid positions never contribute to any statistic.  Values at invalid positions
  are selected away with :func:`torch.where`, not multiplied by 0, so even ``nan`` /
  ``inf`` garbage in padding cannot leak (``nan * 0 == nan``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "bool_mask",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "response_mask_from_eos",
    "last_valid_index",
]


def bool_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return ``mask != 0`` as bool, broadcast to ``like.shape``."""
    m = mask if mask.dtype == torch.bool else mask != 0
    if m.shape != like.shape:
        m = torch.broadcast_to(m, like.shape)
    return m


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x`` over valid positions.

    Args:
        x: ``[b, t]`` (any shape) values.
        mask: ``[b, t]`` bool/float, broadcastable to ``x``; non-zero = valid.
        dim: reduce over these dims; ``None`` reduces everything to a scalar.

    Returns:
        Scalar (``dim=None``) or ``x`` reduced over ``dim`` (e.g. ``[b]`` for ``dim=1``).
    """
    m = bool_mask(mask, x)
    xs = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xs.sum() if dim is None else xs.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions only.

    Args:
        x: ``[b, t]`` values (any shape works).
        mask: ``[b, t]`` bool/float, broadcastable to ``x``; non-zero = valid.
        dim: ``None`` -> one mean over all valid tokens of the batch (scalar, the
            "token-level" mean used by the PPO losses); ``1`` -> per-row mean ``[b]``.

    Returns:
        Scalar or reduced tensor.  Where there is no valid position the result is ``0``
        (not ``nan``).
    """
    m = bool_mask(mask, x)
    num = masked_sum(x, m, dim)
    den = m.sum() if dim is None else m.sum(dim=dim)
    den = den.to(num.dtype)
    return torch.where(den > 0, num / den.clamp_min(1), torch.zeros_like(num))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of all valid entries of ``x`` (one scalar over the whole batch).

    Args:
        x: ``[b, t]`` values.
        mask: ``[b, t]`` bool/float; non-zero = valid.
        unbiased: apply Bessel's correction ``N / (N - 1)`` where ``N`` is the number of
            valid tokens (as TRL / the N-implementation-details reproduction do).

    Returns:
        Scalar tensor.  With ``N == 0`` the result is ``0``; with ``N == 1`` and
        ``unbiased=True`` the correction is skipped (result ``0``) instead of dividing by
        zero -- no host sync / exception, so it is safe inside compiled/GPU code.
    """
    m = bool_mask(mask, x)
    mean = masked_mean(x, m)
    centered = torch.where(m, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    n = m.sum().to(x.dtype)
    var = (centered * centered).sum() / n.clamp_min(1)
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1), var)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` with the mean/variance of its valid entries (batch-global).

    ``(x - mean) / sqrt(var + eps)`` with ``var`` the *unbiased* masked variance (as in
    TRL's ``masked_whiten``); with ``shift_mean=False`` the mean is added back
    (used for rewards: scale only, keep the offset).

    Args:
        x: ``[b, t]`` values.
        mask: ``[b, t]`` bool/float; non-zero = valid.
        shift_mean: whether the result has zero mean.
        eps: added to the variance.

    Returns:
        ``[b, t]``; invalid positions are ``0``.
    """
    m = bool_mask(mask, x)
    mean = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(m, whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


def response_mask_from_eos(
    tokens: torch.Tensor,
    eos_id: int | Sequence[int],
    pad_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask of response tokens up to and including the first EOS.

    Args:
        tokens: ``[b, t]`` generated response token ids.
        eos_id: EOS id, or several ids (e.g. ``<|eot_id|>`` and ``<|end_of_text|>``).
        pad_mask: optional ``[b, t]`` bool/float, non-zero for real (non-padding)
            tokens.  Padding is never valid and never counts as an EOS, so
            ``pad_token_id == eos_token_id`` is fine as long as ``pad_mask`` is given.

    Returns:
        ``[b, t]`` bool: ``True`` up to and including the first EOS of each row, ``False``
        after it.  Rows without an EOS are all ``True`` (except padding): a truncated
        response is still a response (penalise it via the score if desired).
    """
    if isinstance(eos_id, int):
        is_eos = tokens == eos_id
    else:
        is_eos = torch.isin(tokens, torch.as_tensor(list(eos_id), dtype=tokens.dtype, device=tokens.device))
    valid = None
    if pad_mask is not None:
        valid = bool_mask(pad_mask, tokens)
        is_eos = is_eos & valid
    eos_count = torch.cumsum(is_eos.to(torch.int32), dim=1)
    # number of EOS strictly before position j; > 0 means we are past the first EOS
    before = eos_count - is_eos.to(torch.int32)
    mask = before == 0
    if valid is not None:
        mask = mask & valid
    return mask


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid token of each row.

    Works for right padding, left padding and non-contiguous masks.

    Args:
        mask: ``[b, t]`` bool/float; non-zero = valid.

    Returns:
        ``[b]`` int64; ``-1`` for rows without any valid token.
    """
    m = mask if mask.dtype == torch.bool else mask != 0
    idx = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values
