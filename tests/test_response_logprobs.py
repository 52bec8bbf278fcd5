"""``response_logprobs``: the chunked LM head (temperature folded into its input when it has no
bias) gives the log-probs, entropies and gradients of the plain full-logits computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlhf.models.forward import trunk_hidden
from rlhf.models.loading import ModelSettings, load_causal_lm
from rlhf.models import logprobs
from rlhf.models.logprobs import head_logprobs, response_logprobs


@pytest.mark.parametrize("chunk_positions", [1, 5, 12, 1000])  # 1, 1, 3 (and a remainder of 2), 5 rows a call
@pytest.mark.parametrize("head_bias", [False, True])
# "frozen": a frozen head and no entropy bonus take head_logprobs (the Jacobian path); an entropy
# bonus ("entropy_grad") or a trained head takes the head + softmax path.
@pytest.mark.parametrize("path", ["frozen", "entropy_grad", "trained_head"])
def test_response_logprobs_match_the_full_logits(monkeypatch, tiny_policy_dir, chunk_positions, head_bias, path):
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_POSITIONS", chunk_positions)
    calls = []
    monkeypatch.setattr(logprobs, "head_logprobs", lambda *a: calls.append(1) or head_logprobs(*a))
    torch.manual_seed(0)
    model = load_causal_lm(ModelSettings(str(tiny_policy_dir)))
    if head_bias:  # not linear: the temperature must divide the logits, not the head's input
        tied = model.get_output_embeddings().weight
        head = nn.Linear(tied.shape[1], tied.shape[0], bias=True)
        with torch.no_grad():
            head.weight.copy_(tied)
            head.bias.normal_(std=2.0)
        model.set_output_embeddings(head)
    model.requires_grad_(path == "trained_head")
    entropy_grad = path == "entropy_grad"
    ids = torch.randint(3, 200, (5, 10))
    mask = torch.ones_like(ids)
    start, temperature = 6, 0.7
    with torch.no_grad():
        features = trunk_hidden(model, ids, mask)
    hidden = features.clone().requires_grad_()
    logp, entropy = response_logprobs(model, hidden, start, ids[:, start:], temperature,
                                      entropy=True, entropy_grad=entropy_grad)
    assert entropy.requires_grad == entropy_grad
    assert bool(calls) == (path == "frozen")
    (logp.sum() - 0.1 * entropy.sum()).backward()
    head_grad = model.get_output_embeddings().weight.grad
    if path == "trained_head":
        assert head_grad is not None and head_grad.abs().sum() > 0
        model.zero_grad()

    plain = features.clone().requires_grad_()
    full = F.log_softmax(model.get_output_embeddings()(plain[:, start - 1 : -1]) / temperature, dim=-1)
    expected_logp = full.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)
    expected_entropy = -(full.exp() * full).sum(-1)
    (expected_logp.sum() - 0.1 * (expected_entropy if entropy_grad else expected_entropy.detach()).sum()).backward()
    if path == "trained_head":
        torch.testing.assert_close(head_grad, model.get_output_embeddings().weight.grad, rtol=0, atol=2e-5)

    torch.testing.assert_close(logp, expected_logp, rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=2e-5)
    torch.testing.assert_close(hidden.grad, plain.grad, rtol=0, atol=2e-5)


def test_response_logprobs_reject_a_non_positive_temperature(tiny_policy_dir):
    model = load_causal_lm(ModelSettings(str(tiny_policy_dir)))
    ids = torch.randint(3, 200, (2, 6))
    hidden = trunk_hidden(model, ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        response_logprobs(model, hidden, 3, ids[:, 3:], 0.0)


@pytest.mark.parametrize("precision", ["float32", "bf16_autocast", "bf16_weights"])
def test_response_logprobs_chunk_size_follows_the_head_matmul_precision(monkeypatch, tiny_policy_dir, precision):
    """Half-precision head matmuls take :data:`HEAD_CHUNK_POSITIONS_HALF` positions a call."""
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_POSITIONS", 8)  # 2 rows of 4 response tokens a call
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_POSITIONS_HALF", 4)  # 1 row a call
    positions = []
    monkeypatch.setattr(logprobs, "head_logprobs", lambda h, *a: positions.append(h.shape[0]) or head_logprobs(h, *a))
    model = load_causal_lm(ModelSettings(str(tiny_policy_dir))).requires_grad_(False)
    if precision == "bf16_weights":
        model = model.to(torch.bfloat16)
    ids = torch.randint(3, 200, (5, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16_autocast"):
        hidden = trunk_hidden(model, ids, torch.ones_like(ids))
        logp, _ = response_logprobs(model, hidden, 6, ids[:, 6:], 1.0)
    assert positions == ([8, 8, 4] if precision == "float32" else [4] * 5)
    assert logp.shape == (5, 4) and torch.isfinite(logp).all()
