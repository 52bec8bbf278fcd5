"""Hand-computed checks for the pure pieces of a PPO iteration: score shaping, the choice of
advantage estimator, and the update's bookkeeping."""

import pytest
import torch
from torch.testing import assert_close

from rlhf.masks import masked_sum, masked_whiten
from rlhf.ppo.advantages import (
    compute_advantages,
    gae,
    reinforce_advantages,
    rloo_advantages,
    scale_sequence_advantages,
    sequence_to_token_advantages,
)
from rlhf.ppo.kl import kl_estimate, masked_kl, per_token_rewards
from rlhf.ppo.scores import shape_scores
from rlhf.ppo.settings import RewardSettings
from rlhf.ppo.update import UpdateTally, shuffled_minibatches

T = torch.tensor


def test_shape_scores_normalise_length_clip_and_penalise_in_that_order():
    raw = T([3.0, -9.0, 1.0, 5.0])
    has_eos = T([True, True, True, False])
    lengths = T([2, 1, 0, 4])
    settings = RewardSettings(model="rm", normalize=True, clip=2.0, missing_eos_penalty=-1.0, length_normalize=True)
    # (raw - 1) / 2 -> [1, -5, 0, 2]; / max(length, 1) -> [0.5, -5, 0, 0.5]; clip -> [0.5, -2, 0, 0.5];
    # no EOS -> -1
    assert_close(shape_scores(raw, has_eos, lengths, settings, mean=1.0, std=2.0), T([0.5, -2.0, 0.0, -1.0]))


def test_shape_scores_leave_what_is_switched_off():
    raw = T([3.0, -9.0], dtype=torch.bfloat16)
    has_eos = T([False, True])
    settings = RewardSettings(model="rm", normalize=False, clip=None, missing_eos_penalty=None)
    out = shape_scores(raw, has_eos, T([1, 1]), settings, mean=100.0, std=0.0)
    assert out.dtype == torch.float32
    assert_close(out, T([3.0, -9.0]))
    assert_close(shape_scores(raw, has_eos, T([1, 1]), None), T([3.0, -9.0]))  # custom scorer


def test_shape_scores_guard_a_zero_std():
    settings = RewardSettings(model="rm", clip=None, missing_eos_penalty=None)
    out = shape_scores(T([1.0]), T([True]), T([1]), settings, mean=0.0, std=0.0)
    assert torch.isfinite(out).all() and float(out) == pytest.approx(1e8)


MASK = T([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
KL = T([[0.1, 0.2, 0.0], [0.0, 0.1, 0.1], [0.3, 0.0, 0.0], [0.2, 0.2, 0.0]])
SCORES = T([1.0, 0.0, 2.0, -1.0])


def test_compute_advantages_gae_is_per_token_rewards_then_gae():
    values = T([[0.1, 0.2, 0.0], [0.3, 0.1, 0.2], [0.5, 0.0, 0.0], [0.0, 0.4, 0.0]])
    rewards, adv, ret = compute_advantages("gae", SCORES, KL, values, MASK, beta=0.5, gamma=1.0, lam=0.9,
                                           whiten=False)
    expected_rewards = per_token_rewards(SCORES, KL, MASK, 0.5)
    assert_close(rewards, expected_rewards)
    # row 0: r = [-0.05, 1 - 0.1] ; delta_1 = 0.9 - 0.2 = 0.7, delta_0 = -0.05 + 0.2 - 0.1 = 0.05
    # A_1 = 0.7, A_0 = 0.05 + 0.9 * 0.7 = 0.68
    assert_close(adv[0, :2], T([0.68, 0.7]))
    expected_adv, expected_ret = gae(expected_rewards, values, MASK, 1.0, 0.9)
    assert_close(adv, expected_adv)
    assert_close(ret, expected_ret)


def test_compute_advantages_rloo_uses_the_sequence_reward_and_zero_returns():
    _, adv, ret = compute_advantages("rloo", SCORES, KL, torch.zeros(4, 3), MASK, beta=1.0,
                                     samples_per_prompt=2, whiten=False)
    # sequence rewards: 1 - 0.3 = 0.7, 0 - 0.2 = -0.2, 2 - 0.3 = 1.7, -1 - 0.4 = -1.4;
    # leave-one-out with k = 2: [0.9, -0.9, 3.1, -3.1] on each row's valid tokens
    assert_close(adv, T([[0.9, 0.9, 0.0], [-0.9, -0.9, -0.9], [3.1, 0.0, 0.0], [-3.1, -3.1, 0.0]]))
    assert torch.equal(ret, torch.zeros(4, 3))


def test_compute_advantages_gae_whitening_is_the_masked_whiten_of_the_unwhitened():
    values = torch.zeros(4, 3)
    plain = compute_advantages("gae", SCORES, KL, values, MASK, 0.1, whiten=False)[1]
    whitened = compute_advantages("gae", SCORES, KL, values, MASK, 0.1, whiten=True)[1]
    assert_close(whitened, masked_whiten(plain, MASK))


def test_critic_free_whitening_keeps_order_signs_and_group_sums():
    # The case token-level whitening got wrong: sequence advantages [1.0, 0.8, 0.2, -0.5] on
    # responses of 40, 36, 4 and 3 tokens. Token-weighted re-centring (mean ~0.87) made the
    # second-best response's advantage negative.
    lengths = [40, 36, 4, 3]
    mask = torch.zeros(4, 40)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    sequence = T([1.0, 0.8, 0.2, -0.5])
    token_whitened = masked_whiten(sequence_to_token_advantages(sequence, mask), mask)
    assert float(token_whitened[1, 0]) < 0  # the defect, for the record
    scaled = scale_sequence_advantages(sequence)
    assert (scaled > 0).tolist() == [True, True, True, False]
    assert torch.equal(torch.argsort(scaled), torch.argsort(sequence))
    assert_close(scaled / sequence, torch.full((4,), float(scaled[0] / sequence[0])))  # one scale
    # Through compute_advantages: RLOO groups of 4 keep their zero sum and their order.
    scores = T([1.0, 0.8, 0.2, -0.5, 0.3, 0.1, 0.0, 0.9])
    mask8 = torch.cat([mask, mask])
    kl = torch.zeros(8, 40)
    _, adv, _ = compute_advantages("rloo", scores, kl, torch.zeros(8, 40), mask8, 0.1, samples_per_prompt=4)
    first_token = adv[:, 0]
    assert_close(first_token.view(2, 4).sum(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    for group in range(2):
        rows = slice(4 * group, 4 * group + 4)
        assert torch.equal(torch.argsort(first_token[rows]), torch.argsort(scores[rows]))
    assert torch.equal(adv != 0, mask8.bool())  # every valid token of a row, nothing else


def test_reinforce_uses_the_batch_mean_baseline():
    _, adv, ret = compute_advantages("reinforce", SCORES, KL, torch.zeros(4, 3), MASK, beta=1.0, whiten=False)
    # sequence rewards [0.7, -0.2, 1.7, -1.4], mean 0.2
    assert_close(adv[:, 0], T([0.5, -0.4, 1.5, -1.6]))
    assert torch.equal(ret, torch.zeros(4, 3))
    assert_close(reinforce_advantages(T([1.0, 3.0])), T([-1.0, 1.0]))


def test_masked_kl_keeps_nonfinite_padding_out():
    logp = T([[-1.0, float("nan")], [-0.5, -2.0]])
    ref = T([[-1.5, -1.0], [-0.5, float("-inf")]])
    mask = T([[1, 0], [1, 0]])
    kl = masked_kl(logp, ref, mask)
    assert torch.equal(kl, T([[0.5, 0.0], [0.0, 0.0]]))
    assert torch.isnan(kl_estimate(logp, ref) * mask).any()  # what multiplying did
    rloo = rloo_advantages(SCORES - 0.1 * masked_sum(KL, MASK, dim=1), 2)
    assert_close(compute_advantages("rloo", SCORES, KL, torch.zeros(4, 3), MASK, 0.1, 2, whiten=False)[1],
                 sequence_to_token_advantages(rloo, MASK))


def test_compute_advantages_rejects_an_unknown_estimator():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", SCORES, KL, torch.zeros(4, 3), MASK, 0.1)


def test_shuffled_minibatches_cover_every_row_once_per_epoch():
    torch.manual_seed(0)
    batches = list(shuffled_minibatches(10, 4, torch.device("cpu")))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_update_tally_means_over_steps_made():
    tally = UpdateTally()
    tally.add({"clipfrac": 0.2, "approx_kl": 0.01})
    tally.add({"clipfrac": 0.4, "approx_kl": 0.03})
    tally.skipped = 1
    assert tally.means() == pytest.approx(
        {"clipfrac": 0.3, "approx_kl": 0.02, "early_stopped": 0.0, "optimizer_steps": 2.0, "skipped": 1.0}
    )
    assert UpdateTally(skipped=3).means() == {"early_stopped": 0.0, "optimizer_steps": 0.0, "skipped": 3.0}
