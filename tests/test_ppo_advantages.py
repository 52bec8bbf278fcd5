"""Hand-computed checks for rlhf.ppo.advantages and rlhf.masks."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.generation.best_of_n import best_of_n_indices
from rlhf.ppo.advantages import (
    explained_variance,
    gae,
    grpo_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
)
from rlhf.masks import (
    last_valid_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask_from_eos,
)

T = torch.tensor
R = [0.0, 0.0, 1.0]
V = [0.5, 0.2, 0.4]


def gae_reference(rewards, values, gamma, lam):
    """Definition-based GAE for one unpadded row: A_t = sum_l (gamma*lam)^l delta_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, n)) for t in range(n)]


def _ones(n):
    return torch.ones(1, n)


# ----------------------------------------------------------------------------- GAE
def test_gae_lam1_is_return_to_go_minus_value():
    adv, ret = gae(T([R]), T([V]), _ones(3), gamma=1.0, lam=1.0)
    # return-to-go = [1, 1, 1]
    assert_close(adv, T([[0.5, 0.8, 0.6]]))
    assert_close(ret, T([[1.0, 1.0, 1.0]]))


def test_gae_lam1_gamma09():
    adv, ret = gae(T([R]), T([V]), _ones(3), gamma=0.9, lam=1.0)
    # discounted return-to-go = [0.81, 0.9, 1.0]
    assert_close(adv, T([[0.81 - 0.5, 0.9 - 0.2, 1.0 - 0.4]]))
    assert_close(ret, T([[0.81, 0.9, 1.0]]))


def test_gae_lam0_is_td_error():
    adv, ret = gae(T([R]), T([V]), _ones(3), gamma=0.9, lam=0.0)
    # delta0 = 0 + 0.9*0.2 - 0.5, delta1 = 0 + 0.9*0.4 - 0.2, delta2 = 1 + 0 - 0.4
    assert_close(adv, T([[-0.32, 0.16, 0.6]]))
    assert_close(ret, T([[-0.32 + 0.5, 0.16 + 0.2, 0.6 + 0.4]]))


def test_gae_gamma_lambda_hand():
    adv, _ = gae(T([R]), T([V]), _ones(3), gamma=0.9, lam=0.5)
    # gl = 0.45: A2 = 0.6, A1 = 0.16 + 0.45*0.6 = 0.43, A0 = -0.32 + 0.45*0.43 = -0.1265
    assert_close(adv, T([[-0.1265, 0.43, 0.6]]))


def test_gae_matches_definition_random():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 7, generator=g, dtype=torch.float64)
    v = torch.randn(4, 7, generator=g, dtype=torch.float64)
    adv, ret = gae(r, v, torch.ones(4, 7), gamma=0.97, lam=0.9)
    for i in range(4):
        exp = gae_reference(r[i].tolist(), v[i].tolist(), 0.97, 0.9)
        assert_close(adv[i], torch.tensor(exp, dtype=torch.float64))
    assert_close(ret, adv + v)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)])
def test_gae_padding_does_not_leak(gamma, lam):
    ref_adv, ref_ret = gae(T([R]), T([V]), _ones(3), gamma=gamma, lam=lam)
    # right padding with garbage rewards/values (nan included)
    rewards = T([R + [100.0, float("nan")], [-7.0, -7.0] + R])
    values = T([V + [-50.0, 3.0], [float("nan"), 9.0] + V])
    mask = T([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close(adv[0, :3], ref_adv[0])
    assert_close(ret[0, :3], ref_ret[0])
    assert_close(adv[1, 2:], ref_adv[0])
    assert_close(ret[1, 2:], ref_ret[0])
    assert_close(adv[0, 3:], torch.zeros(2))
    assert_close(adv[1, :2], torch.zeros(2))
    assert_close(ret[0, 3:], torch.zeros(2))
    assert_close(ret[1, :2], torch.zeros(2))


def test_gae_float_mask_and_interior_gap_is_transparent():
    # documented behaviour: an interior masked token is skipped, not an episode boundary
    ref_adv, _ = gae(T([R]), T([V]), _ones(3), gamma=0.9, lam=0.8)
    adv, _ = gae(T([[0.0, 5.0, 0.0, 1.0]]), T([[0.5, 7.0, 0.2, 0.4]]), T([[1.0, 0.0, 1.0, 1.0]]), gamma=0.9, lam=0.8)
    assert_close(adv[0, [0, 2, 3]], ref_adv[0])
    assert adv[0, 1] == 0


# ----------------------------------------------------------------------------- masks
X = T([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, -3.0]])
M = T([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_masked_mean_sum_var():
    assert_close(masked_sum(X, M), T(15.0))
    assert_close(masked_mean(X, M), T(3.0))
    assert_close(masked_mean(X, M, dim=1), T([2.0, 4.5]))
    assert_close(masked_sum(X, M, dim=1), T([6.0, 9.0]))
    # valid = 1..5, mean 3, squared deviations 4+1+0+1+4 = 10
    assert_close(masked_var(X, M, unbiased=False), T(2.0))
    assert_close(masked_var(X, M), T(2.5))
    assert_close(masked_mean(X, torch.zeros(2, 4)), T(0.0))
    assert_close(masked_mean(X, T([[0, 0, 0, 0], [1, 0, 0, 0]]), dim=1), T([0.0, 4.0]))


def test_masked_whiten():
    w = masked_whiten(X, M)
    s = math.sqrt(2.5)
    expected = T([[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]])
    assert_close(w, expected)
    assert_close(masked_mean(w, M), T(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(w, M), T(1.0), atol=1e-6, rtol=1e-6)
    # padding values (even nan/inf) change nothing
    X2 = X.clone()
    X2[0, 3] = float("nan")
    X2[1, 2:] = T([float("inf"), 1e9])
    assert_close(masked_whiten(X2, M.bool()), expected)
    # shift_mean=False keeps the mean
    assert_close(masked_whiten(X, M, shift_mean=False), T([[3 - 2 / s, 3 - 1 / s, 3.0, 0.0], [3 + 1 / s, 3 + 2 / s, 0.0, 0.0]]))


def test_response_mask_from_eos():
    tokens = T([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0], [5, 6, 7, 0, 0]])
    exp = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(response_mask_from_eos(tokens, 2), exp)
    pad = T([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    exp_pad = exp.clone()
    exp_pad[3] = T([1, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(response_mask_from_eos(tokens, 2, pad_mask=pad), exp_pad)


def test_response_mask_pad_equals_eos_and_multiple_eos_ids():
    # pad id == eos id; left-padded row: padding must not count as the EOS
    tokens = T([[5, 2, 2, 2], [2, 2, 5, 6], [5, 9, 7, 3]])
    pad = T([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    exp = T([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(response_mask_from_eos(tokens, 2, pad_mask=pad), exp)
    exp_multi = T([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask_from_eos(tokens, [2, 9], pad_mask=pad), exp_multi)


def test_last_valid_index():
    mask = T([[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1]])
    assert torch.equal(last_valid_index(mask), T([1, 2, -1, 2]))
    assert torch.equal(last_valid_index(mask.bool()), T([1, 2, -1, 2]))


# ----------------------------------------------------------------------------- RLOO / GRPO
def test_rloo_k3():
    adv = rloo_advantages(T([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), k=3)
    # 1 - (2+6)/2, 2 - (1+6)/2, 6 - (1+2)/2 ; 0 - (0+3)/2, 0 - (0+3)/2, 3 - 0
    assert_close(adv, T([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))


def test_rloo_bad_k():
    with pytest.raises(ValueError):
        rloo_advantages(T([1.0, 2.0]), k=1)
    with pytest.raises(ValueError):
        rloo_advantages(T([1.0, 2.0, 3.0]), k=2)


def test_grpo():
    scores = T([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 1: mean 2, population std sqrt(2/3); group 2: std 0 -> advantages 0
    s = math.sqrt(2.0 / 3.0)
    assert_close(grpo_advantages(scores, k=3), T([-1 / (s + 1e-6), 0.0, 1 / (s + 1e-6), 0.0, 0.0, 0.0]))
    assert_close(grpo_advantages(scores, k=3, unbiased=True), T([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), 0.0, 0.0, 0.0]))
    assert_close(grpo_advantages(scores, k=3, scale=False), T([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def test_sequence_to_token_advantages():
    out = sequence_to_token_advantages(T([2.0, -1.0]), T([[1, 1, 0], [0, 1, 1]]))
    assert_close(out, T([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]))


# ----------------------------------------------------------------------------- misc
def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert_close(explained_variance(returns.clone(), returns, mask), T(1.0))
    assert_close(explained_variance(torch.full((1, 4), 2.5), returns, mask), T(0.0))
    # residual [0,0,0,1]: var 0.1875; var(returns) 1.25 -> 1 - 0.15
    assert_close(explained_variance(T([[1.0, 2.0, 3.0, 3.0]]), returns, mask), T(0.85))
    # masked: garbage in padding is ignored
    r2 = T([[1.0, 2.0, 3.0, 4.0, 99.0]])
    v2 = T([[1.0, 2.0, 3.0, 4.0, -99.0]])
    assert_close(explained_variance(v2, r2, T([[1, 1, 1, 1, 0]])), T(1.0))
    # Var[returns] == 0 -> nan
    assert torch.isnan(explained_variance(T([[0.0, 1.0]]), T([[2.0, 2.0]]), torch.ones(1, 2)))


def test_best_of_n_indices():
    assert torch.equal(best_of_n_indices(T([1.0, 5.0, 3.0, 2.0, 0.0, 2.0]), k=3), T([1, 3]))
