"""Hand-computed checks for rlhf.ppo.kl."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, kl_estimate, per_token_rewards, update_from_sequences

T = torch.tensor
LN2 = math.log(2.0)


def test_kl_estimators_values():
    logp = T([[math.log(0.5), math.log(0.2)]], dtype=torch.float64)
    ref = T([[math.log(0.25), math.log(0.4)]], dtype=torch.float64)
    k1 = kl_estimate(logp, ref, "k1")
    assert_close(k1, T([[LN2, -LN2]], dtype=torch.float64))
    assert k1[0, 0] > 0 and k1[0, 1] < 0  # sign follows logp - ref
    assert_close(kl_estimate(logp, ref, "k2"), T([[0.5 * LN2**2, 0.5 * LN2**2]], dtype=torch.float64))
    # ref/pi = 0.5 -> 0.5 - 1 - ln 0.5 ; ref/pi = 2 -> 2 - 1 - ln 2
    assert_close(kl_estimate(logp, ref, "k3"), T([[0.5 - 1 + LN2, 2 - 1 - LN2]], dtype=torch.float64))


def test_kl_estimators_nonnegative_and_zero_at_equal():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(8, 16, generator=g) * 3
    ref = torch.randn(8, 16, generator=g) * 3
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    for kind in ("k1", "k2", "k3"):
        assert_close(kl_estimate(logp, logp, kind), torch.zeros(8, 16))
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k4")


def test_k1_k3_unbiased_monte_carlo():
    p = T([0.5, 0.3, 0.2], dtype=torch.float64)
    q = T([0.2, 0.2, 0.6], dtype=torch.float64)
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[idx], q.log()[idx]
    assert abs(kl_estimate(logp, logq, "k1").mean().item() - true_kl) < 0.01
    assert abs(kl_estimate(logp, logq, "k3").mean().item() - true_kl) < 0.01


def test_per_token_rewards_score_on_last_valid_token():
    score = T([1.0, 2.0, 3.0, 4.0])
    kl = T([[0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 9.0, 9.0], [9.0, 0.4, 0.2, 0.1], [9.0, 9.0, 9.0, 9.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    out = per_token_rewards(score, kl, mask, beta=0.1)
    expected = T(
        [
            [-0.01, -0.02, -0.03 + 1.0, 0.0],
            [-0.05, -0.05 + 2.0, 0.0, 0.0],
            [0.0, -0.04, -0.02, -0.01 + 3.0],
            [0.0, 0.0, 0.0, 0.0],  # no valid token: nothing, not even the score
        ]
    )
    assert_close(out, expected)
    assert_close(per_token_rewards(score, kl, mask.bool(), beta=T(0.1)), expected)


def test_fixed_controller():
    c = FixedKLController(0.05)
    c.update(100.0, 64)
    c.update(0.0, 64)
    assert c.value == 0.05
    c2 = FixedKLController(1.0)
    c2.load_state_dict(c.state_dict())
    assert c2.value == 0.05


def test_adaptive_controller_updates_and_clipping():
    c = AdaptiveKLController(init_coef=0.15, target=6.0, horizon=10000)
    c.update(6.6, n_steps=64)  # error = 0.1 -> * (1 + 0.1*64/10000)
    assert math.isclose(c.value, 0.15 * 1.00064, rel_tol=1e-12)

    c = AdaptiveKLController(0.15, 6.0, 10000)
    c.update(5.4, 64)  # error = -0.1
    assert math.isclose(c.value, 0.15 * 0.99936, rel_tol=1e-12)

    c = AdaptiveKLController(0.15, 6.0, 10000)
    c.update(100.0, 64)  # error 15.67 clipped to 0.2
    assert math.isclose(c.value, 0.15 * 1.00128, rel_tol=1e-12)

    c = AdaptiveKLController(0.15, 6.0, 10000)
    c.update(torch.tensor(0.0), 64)  # error -1 clipped to -0.2; tensors accepted
    assert math.isclose(c.value, 0.15 * 0.99872, rel_tol=1e-12)

    c = AdaptiveKLController(0.15, 6.0, 10000)
    c.update(6.0, 64)  # on target: unchanged
    assert c.value == 0.15


def test_adaptive_controller_state_round_trip():
    c = AdaptiveKLController(0.2, target=4.0, horizon=5000)
    for kl in (1.0, 10.0, 4.5):
        c.update(kl, 128)
    state = c.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    d = AdaptiveKLController()
    d.load_state_dict(state)
    assert (d.value, d.target, d.horizon) == (c.value, c.target, c.horizon)
    c.update(7.0, 32)
    d.update(7.0, 32)
    assert d.value == c.value


def test_adaptive_kl_moves_by_the_global_rollout_on_every_process():
    # Two processes with different local KLs: each sums its [kl, count] with the other's.
    rank_kl = [T([2.0, 4.0, 6.0]), T([12.0])]
    locals_ = [torch.stack([kl.double().sum(), torch.tensor(float(kl.numel()), dtype=torch.float64)])
               for kl in rank_kl]
    total = locals_[0] + locals_[1]
    controllers = [AdaptiveKLController(0.1, target=5.0, horizon=100) for _ in rank_kl]
    for controller, kl in zip(controllers, rank_kl):
        update_from_sequences(controller, kl, lambda local: total)
    one_process = AdaptiveKLController(0.1, target=5.0, horizon=100)
    update_from_sequences(one_process, torch.cat(rank_kl))
    # global mean 6 over 4 sequences: error clip(6 / 5 - 1) = 0.2, value *= 1 + 0.2 * 4 / 100
    assert controllers[0].value == controllers[1].value == one_process.value == pytest.approx(0.1 * 1.008)
    per_rank = AdaptiveKLController(0.1, target=5.0, horizon=100)
    per_rank.update(float(rank_kl[0].mean()), 3)  # what each process did on its own before
    assert per_rank.value != controllers[0].value


def test_adaptive_kl_ignores_a_non_finite_rollout():
    controller = AdaptiveKLController(0.1, target=5.0, horizon=100)
    update_from_sequences(controller, T([1.0, float("nan")]))
    update_from_sequences(controller, T([]))
    assert controller.value == 0.1
