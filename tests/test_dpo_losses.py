"""DPO, conservative DPO and IPO losses against hand-computed values."""

import math

import pytest
import torch

from rlhf.dpo.losses import ipo_loss, log_ratio_difference, preference_loss, sigmoid_loss

# Two pairs, beta = 0.5. Log-ratios: chosen (pc - rc) = [0.5, -1.0], rejected (pr - rr) =
# [-0.5, 0.5], so h = [1.0, -1.5] and beta * h = [0.5, -0.75].
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -1.5])
BETA = 0.5
# -logsigmoid(x) = log(1 + exp(-x)):
NLS_P05 = 0.4740769841801067  # x = 0.5
NLS_M05 = 0.9740769841801067  # x = -0.5
NLS_M075 = 1.1368710061148999  # x = -0.75
NLS_P075 = 0.3868710061148999  # x = 0.75


def test_log_ratio_difference():
    torch.testing.assert_close(log_ratio_difference(PC, PR, RC, RR), torch.tensor([1.0, -1.5]))
    with pytest.raises(ValueError, match="one \\[P\\] shape"):
        log_ratio_difference(PC, PR[:1], RC, RR)


def test_dpo_sigmoid_loss_matches_hand_computed_values():
    loss, stats = preference_loss(PC, PR, RC, RR, BETA)
    assert loss.item() == pytest.approx((NLS_P05 + NLS_M075) / 2, abs=1e-6)
    torch.testing.assert_close(sigmoid_loss(torch.tensor([1.0, -1.5]), BETA), torch.tensor([NLS_P05, NLS_M075]))
    # Implicit rewards beta * (policy - reference): chosen [0.25, -0.5], rejected [-0.25, 0.25].
    assert stats["reward_chosen"].item() == pytest.approx(-0.125)
    assert stats["reward_rejected"].item() == pytest.approx(0.0)
    assert stats["margin"].item() == pytest.approx(-0.125)
    assert stats["accuracy"].item() == 0.5
    assert stats["loss"].item() == pytest.approx(loss.item())


def test_conservative_dpo_matches_hand_computed_values_and_eps_zero_is_dpo():
    eps = 0.1
    loss, _ = preference_loss(PC, PR, RC, RR, BETA, label_smoothing=eps)
    expected = ((1 - eps) * NLS_P05 + eps * NLS_M05 + (1 - eps) * NLS_M075 + eps * NLS_P075) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    dpo, _ = preference_loss(PC, PR, RC, RR, BETA)
    cdpo0, _ = preference_loss(PC, PR, RC, RR, BETA, label_smoothing=0.0)
    assert cdpo0.item() == dpo.item()
    h = torch.randn(16)
    torch.testing.assert_close(sigmoid_loss(h, 0.3, 0.0), sigmoid_loss(h, 0.3))


def test_ipo_loss_summed_and_per_token_averaged():
    # Summed log-probs: target 1 / (2 * 0.5) = 1, h = [1.0, -1.5] -> [0, 6.25].
    loss, stats = preference_loss(PC, PR, RC, RR, BETA, loss_type="ipo")
    assert loss.item() == pytest.approx(3.125)
    torch.testing.assert_close(ipo_loss(torch.tensor([1.0, -1.5]), BETA), torch.tensor([0.0, 6.25]))
    # Averaged over lengths chosen [2, 4], rejected [1, 3]: h = [0.25 + 0.5, -0.25 - 1/6].
    loss, avg_stats = preference_loss(PC, PR, RC, RR, BETA, loss_type="ipo",
                                      chosen_lengths=torch.tensor([2, 4]), rejected_lengths=torch.tensor([1, 3]))
    h2 = -0.25 - 1 / 6
    assert loss.item() == pytest.approx(((0.75 - 1) ** 2 + (h2 - 1) ** 2) / 2, abs=1e-6)
    # Rewards are of the summed log-probs whatever the loss.
    assert avg_stats["reward_chosen"].item() == stats["reward_chosen"].item() == pytest.approx(-0.125)


def test_ties_count_as_wrong_and_cost_log2():
    zeros = torch.zeros(3)
    loss, stats = preference_loss(zeros, zeros, zeros, zeros, 0.1)
    assert loss.item() == pytest.approx(math.log(2)) and stats["accuracy"].item() == 0.0


def test_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    for loss_type in ("sigmoid", "ipo"):
        pc.grad = pr.grad = None
        loss, _ = preference_loss(pc, pr, RC, RR, BETA, loss_type=loss_type)
        loss.backward()
        assert (pc.grad[1] < 0) and (pr.grad[1] > 0), loss_type  # the pair it gets wrong


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0.0}, "beta"),
    ({"label_smoothing": 0.5}, "label_smoothing"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "not IPO"),
    ({"loss_type": "hinge"}, "loss_type"),
    ({"loss_type": "ipo", "chosen_lengths": torch.ones(2)}, "both"),
])
def test_bad_settings_are_refused(kwargs, match):
    args = {"beta": BETA, **kwargs}
    with pytest.raises(ValueError, match=match):
        preference_loss(PC, PR, RC, RR, **args)
