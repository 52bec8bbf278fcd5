"""Hand-computed checks for rlhf.ppo.losses and the log-prob kernels of rlhf.models.logprobs."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.models import logprobs as losses
from rlhf.models.logprobs import entropy_from_logits, head_logprobs, logprobs_and_entropy, logprobs_from_logits
from rlhf.ppo.losses import policy_loss, value_loss

T = torch.tensor

# (ratio, advantage, per-token loss, clipped-term active) for clip_range = 0.2
CASES = [
    (1.1, 2.0, -2.2, False),  # A>0, inside: -A*r
    (1.5, 2.0, -2.4, True),  # A>0, above 1+eps: -A*1.2 (clipped, no gradient)
    (0.5, 2.0, -1.0, False),  # A>0, below 1-eps: pessimistic unclipped -A*r
    (0.9, -1.0, 0.9, False),  # A<0, inside
    (0.5, -1.0, 0.8, True),  # A<0, below 1-eps: -A*0.8 (clipped)
    (1.5, -1.0, 1.5, False),  # A<0, above 1+eps: unclipped -A*r
]


def _policy_inputs(pad=False):
    ratios = [c[0] for c in CASES]
    advs = [c[1] for c in CASES]
    mask = [1.0] * len(CASES)
    old = [0.3] * len(CASES)
    if pad:  # garbage padding token: huge ratio and advantage
        ratios, advs, mask, old = ratios + [50.0], advs + [1e4], mask + [0.0], old + [float("nan")]
    old_logp = T([old], dtype=torch.float64)
    logp = (T([[math.log(r) for r in ratios]], dtype=torch.float64) + old_logp.nan_to_num(0.0)).requires_grad_()
    return logp, old_logp, T([advs], dtype=torch.float64), T([mask], dtype=torch.float64)


def test_policy_loss_four_quadrants_and_stats():
    n = len(CASES)
    for pad in (False, True):
        logp, old, adv, mask = _policy_inputs(pad)
        loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
        assert_close(loss, T(sum(c[2] for c in CASES) / n, dtype=torch.float64))  # = -0.4
        assert_close(loss, T(-0.4, dtype=torch.float64))
        assert_close(stats["clipfrac"], T(2 / 6, dtype=torch.float64))
        assert_close(stats["ratio_mean"], T(1.0, dtype=torch.float64))
        assert_close(stats["ratio_max"], T(1.5, dtype=torch.float64))
        k2 = sum(0.5 * math.log(c[0]) ** 2 for c in CASES) / n
        k3 = sum((c[0] - 1) - math.log(c[0]) for c in CASES) / n
        assert_close(stats["approx_kl"], T(k2, dtype=torch.float64))
        assert_close(stats["approx_kl_k3"], T(k3, dtype=torch.float64))
        # gradient: d/dlogp of -A*r/n = -A*r/n for unclipped tokens, 0 for clipped ones / padding
        loss.backward()
        exp_grad = [0.0 if c[3] else -c[1] * c[0] / n for c in CASES] + ([0.0] if pad else [])
        assert_close(logp.grad, T([exp_grad], dtype=torch.float64))


def test_policy_loss_ratio_one_equals_minus_mean_advantage():
    logp = torch.zeros(2, 3)
    adv = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, stats = policy_loss(logp, logp, adv, mask)
    assert_close(loss, T(-(1.0 + 2.0 + 4.0) / 3))
    assert_close(stats["clipfrac"], T(0.0))
    assert_close(stats["approx_kl"], T(0.0))


def test_value_loss_both_branches():
    # (v, old, R): loss term, clipped active
    values = T([[1.1, 1.5, 1.5, 0.5, 123.0]])
    old = T([[1.0, 1.0, 1.0, 1.0, -5.0]])
    returns = T([[2.0, 2.0, 1.0, 2.0, 77.0]])
    mask = T([[1, 1, 1, 1, 0]])
    # 1: inside clip, (1.1-2)^2 = 0.81 both
    # 2: v_clip = 1.2, max(0.25, 0.64) = 0.64 (clipped active)
    # 3: v_clip = 1.2, max(0.25, 0.04) = 0.25
    # 4: v_clip = 0.8, max(2.25, 1.44) = 2.25
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    assert_close(loss, T(0.5 * (0.81 + 0.64 + 0.25 + 2.25) / 4))
    assert_close(stats["clipfrac"], T(0.25))


def test_logprobs_from_logits_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    for temp in (1.0, 0.7, 2.0):
        exp = torch.log_softmax(logits / temp, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        assert_close(logprobs_from_logits(logits, tokens, temperature=temp), exp)
    # hand values: logits [0, ln 3] -> probs [1/4, 3/4]; at T=2 -> [1, sqrt 3] / (1 + sqrt 3)
    two = T([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    toks = T([[1, 0]])
    assert_close(logprobs_from_logits(two, toks), T([[math.log(0.75), math.log(0.25)]]))
    s3 = math.sqrt(3.0)
    assert_close(logprobs_from_logits(two, toks, temperature=2.0), T([[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]]))
    # bfloat16 input is computed in float32
    out = logprobs_from_logits(two.bfloat16(), toks)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_from_logits_gradient(temperature):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 4, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    tokens = torch.randint(0, 7, (2, 4), generator=g)
    torch.autograd.gradcheck(lambda z: logprobs_from_logits(z, tokens, temperature), (logits,))
    # bf16 logits: the gradient comes back in bf16, equal to the float32 one up to bf16 rounding
    low = logits.detach().bfloat16().requires_grad_()
    weights = torch.randn(2, 4, generator=g)
    (logprobs_from_logits(low, tokens, temperature) * weights).sum().backward()
    ref = low.detach().float().requires_grad_()
    (torch.log_softmax(ref / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1) * weights).sum().backward()
    assert low.grad.dtype == torch.bfloat16
    assert_close(low.grad.float(), ref.grad, atol=2e-2, rtol=1e-2)


def test_entropy_from_logits():
    v = 7
    assert_close(entropy_from_logits(torch.zeros(2, 3, v)), torch.full((2, 3), math.log(v)))
    assert_close(entropy_from_logits(torch.full((1, 1, v), 1e4)), T([[math.log(v)]]))
    # probs [1/4, 3/4]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert_close(entropy_from_logits(T([[[0.0, math.log(3.0)]]])), T([[h]]))
    # near-deterministic with huge logits: ~0, finite
    e = entropy_from_logits(T([[[1e4, -1e4, 0.0]]]))
    assert torch.isfinite(e).all()
    assert_close(e, T([[0.0]]))


def test_logprobs_and_entropy_match_the_separate_functions_and_their_gradients():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    tokens = torch.randint(0, 11, (3, 5))
    for temp in (1.0, 0.7):
        fused = logits.clone().requires_grad_()
        logp, ent = logprobs_and_entropy(fused, tokens, temp, entropy_grad=True)
        assert_close(logp, logprobs_from_logits(logits, tokens, temp))
        assert_close(ent, entropy_from_logits(logits / temp))
        # Gradients of a loss using both equal those of the separate computations.
        separate = logits.clone().requires_grad_()
        (logprobs_from_logits(separate, tokens, temp).sum() - 0.1 * entropy_from_logits(separate / temp).sum()).backward()
        (logp.sum() - 0.1 * ent.sum()).backward()
        assert_close(fused.grad, separate.grad)


def test_logged_entropy_stays_out_of_the_graph():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    tokens = torch.randint(0, 9, (2, 4))
    logp, ent = logprobs_and_entropy(logits, tokens, entropy_grad=False)
    assert logp.requires_grad and not ent.requires_grad
    assert_close(ent, entropy_from_logits(logits.detach()))
    bf16 = logprobs_and_entropy(logits.detach().bfloat16(), tokens)
    assert all(x.dtype == torch.float32 for x in bf16)


def _head_reference(hidden, weight, bias, tokens, temperature):
    logp_all = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias) / temperature, -1)
    return logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_logprobs_match_head_then_log_softmax(temperature, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 5, generator=g, dtype=torch.float64) * 2
    bias = torch.randn(13, generator=g, dtype=torch.float64) if with_bias else None
    tokens = torch.randint(0, 13, (6,), generator=g)
    expected_logp, expected_entropy = _head_reference(hidden, weight, bias, tokens, temperature)
    with torch.no_grad():
        logp, entropy = head_logprobs(hidden, weight, bias, tokens, temperature, entropy=True)
    assert_close(logp, expected_logp)
    assert_close(entropy, expected_entropy)
    assert head_logprobs(hidden, weight, bias, tokens, temperature)[1] is None
    # d logp / d hidden, exact in float64 (gradcheck), and equal to autograd through the head
    torch.autograd.gradcheck(
        lambda h: head_logprobs(h, weight, bias, tokens, temperature)[0], (hidden.clone().requires_grad_(),)
    )
    mine, ref = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    weights = torch.randn(6, generator=g, dtype=torch.float64)
    logp, entropy = head_logprobs(mine, weight, bias, tokens, temperature, entropy=True)
    assert logp.requires_grad and not entropy.requires_grad  # the entropy never carries grad
    assert_close(entropy, expected_entropy)
    (logp * weights).sum().backward()
    (_head_reference(ref, weight, bias, tokens, temperature)[0] * weights).sum().backward()
    assert_close(mine.grad, ref.grad)


@pytest.mark.parametrize("vocab_block", [8192, 16, 7])  # one block; 4 blocks; 8 with a last one of 1 row
@pytest.mark.parametrize("bf16_weight", [True, False])  # a bf16 weight, or a float32 one autocast casts
def test_head_logprobs_bf16_under_autocast_and_a_near_one_hot_softmax(monkeypatch, vocab_block, bf16_weight):
    monkeypatch.setattr(losses, "HEAD_VOCAB_BLOCK", vocab_block)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    tokens = torch.randint(0, 50, (8,), generator=g)
    tokens[0] = int((hidden[0] @ weight.T).argmax())
    hidden[0] *= 30  # the softmax of row 0 is ~one-hot on its token: log-prob ~0, gradient ~0
    low = hidden.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy = head_logprobs(low, weight.bfloat16() if bf16_weight else weight, None, tokens, entropy=True)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert low.grad.dtype == torch.bfloat16
    ref = low.detach().float().requires_grad_()
    expected, expected_entropy = _head_reference(ref, weight.bfloat16().float(), None, tokens, 1.0)
    expected.sum().backward()
    assert_close(logp, expected, atol=5e-2, rtol=1e-2)
    assert_close(entropy, expected_entropy.detach(), atol=5e-2, rtol=1e-2)
    assert_close(low.grad.float(), ref.grad, atol=5e-2, rtol=2e-2)
    assert torch.isfinite(logp).all() and logp[0].abs() < 1e-2


def test_head_logprobs_refuse_a_trained_head():
    weight = torch.randn(7, 3, requires_grad=True)
    with pytest.raises(ValueError, match="frozen head"):
        head_logprobs(torch.randn(2, 3), weight, None, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        head_logprobs(torch.randn(2, 3), weight.detach(), None, torch.tensor([0, 1]), 0.0)
