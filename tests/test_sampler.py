"""The inverse-CDF sampler: its draws follow softmax(logits / T) after top-k / top-p, and
sample_responses (greedy generate + the sampler) draws the model's tempered distribution."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.generation import SamplingSettings, sample_responses
from rlhf.generation.sampler import (
    CDF_BLOCK,
    InverseCDFSampler,
    draw_inverse_cdf,
    filter_logits,
    sample_from_logits,
    tempered_logprob_and_entropy,
)
from rlhf.guards import NonFiniteError

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def test_draws_follow_the_tempered_softmax():
    torch.manual_seed(0)
    n = 200_000
    tokens = sample_from_logits(LOGITS.expand(n, -1), temperature=0.7)
    expected = torch.softmax(LOGITS.double() / 0.7, dim=-1)
    # Standard error of each frequency is <= 0.0012 at n = 200k: 5 SE.
    assert torch.allclose(frequencies(tokens, 6), expected, atol=0.006)


def test_top_k_and_top_p_limit_the_draws_and_renormalise():
    torch.manual_seed(1)
    n = 100_000
    top2 = sample_from_logits(LOGITS.expand(n, -1), temperature=1.0, top_k=2)
    p = torch.softmax(LOGITS[:2].double(), dim=-1)
    assert torch.allclose(frequencies(top2, 6), torch.cat([p, torch.zeros(4, dtype=p.dtype)]), atol=0.008)
    probs = torch.softmax(LOGITS, dim=-1)  # 0.561, 0.206, 0.125, ...: 0.767 < 0.85 <= 0.892
    kept = filter_logits(LOGITS.unsqueeze(0), 1.0, top_p=0.85)[0]
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False, False]
    assert float(probs[:2].sum()) < 0.85 <= float(probs[:3].sum())
    # The most likely token stays even when top_p is below its own probability.
    assert torch.isfinite(filter_logits(LOGITS.unsqueeze(0), 1.0, top_p=0.01)[0]).tolist() == [True] + [False] * 5


def test_processor_leaves_one_finite_score_per_row_at_the_drawn_token():
    torch.manual_seed(2)
    scores = torch.randn(5, 11)
    out = InverseCDFSampler(temperature=0.7)(torch.zeros(5, 1, dtype=torch.long), scores.clone())
    assert (torch.isfinite(out).sum(dim=1) == 1).all()
    assert (out.max(dim=1).values == 0).all()
    with pytest.raises(ValueError, match="temperature"):
        InverseCDFSampler(temperature=0.0)


def test_sample_responses_draws_the_models_tempered_distribution():
    """The first sampled token over many copies of one prompt: ``generate`` must apply no
    processor of its own (its defaults include top_k=50) besides the sampler."""
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=11,
                         pad_token_id=10)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked distribution, far from uniform
    n = 40_000
    prompt = torch.tensor([[1, 5, 7]]).expand(n, -1)
    mask = torch.ones_like(prompt)
    sampling = SamplingSettings(max_new_tokens=1, temperature=0.7)
    first = sample_responses(model, prompt, mask, sampling, eos_id=11, pad_id=10)[:, 0]
    with torch.no_grad():
        logits = model(input_ids=prompt[:1], attention_mask=mask[:1]).logits[0, -1]
    expected = torch.softmax(logits.double() / 0.7, dim=-1)
    assert torch.allclose(frequencies(first, 12), expected, atol=0.012)


def test_a_uniform_at_the_top_end_still_draws_a_token_with_probability(monkeypatch):
    """``rand() * total`` may round up to the total; the draw must not fall on the filtered
    (zero-probability) tokens after the last kept one."""
    monkeypatch.setattr(torch, "rand", lambda shape, dtype, device, generator: torch.ones(shape, dtype=dtype))
    logits = torch.tensor([[0.0, 5.0, -1.0, -2.0]])
    assert sample_from_logits(logits, 1.0, top_k=2).tolist() == [1]  # tokens 2, 3 are filtered
    assert sample_from_logits(logits, 1.0).tolist() == [3]


def test_the_lm_head_gets_contiguous_inputs_during_generation_only():
    """generate's prefill slices ``hidden[:, -1:, :]``; a strided input sends the bias-free
    head through matmul's batched path, which copies its weight once per row."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=11,
                         pad_token_id=10)
    model = LlamaForCausalLM(config).eval()
    seen: list[bool] = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    prompt = torch.tensor([[1, 5, 7, 2], [3, 4, 6, 8]])
    sample_responses(model, prompt, torch.ones_like(prompt), SamplingSettings(max_new_tokens=3),
                     eos_id=11, pad_id=10)
    assert len(seen) == 3 and all(seen)  # prefill + 2 decode steps
    assert not model.lm_head._forward_pre_hooks  # the hook is removed afterwards


def test_recording_sampler_keeps_the_untruncated_tempered_logprob_and_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 6) * 3
    sampler = InverseCDFSampler(0.7, top_k=2, record=True)
    drawn = [sampler(torch.zeros(4, 1, dtype=torch.long), logits).argmax(-1) for _ in range(3)]
    logp, entropy = sampler.recorded()
    assert logp.shape == entropy.shape == (4, 3)
    full = torch.log_softmax(logits / 0.7, dim=-1)  # no top-k: what the update's log-probs use
    for step, tokens in enumerate(drawn):
        torch.testing.assert_close(logp[:, step], full.gather(1, tokens.unsqueeze(1)).squeeze(1))
        torch.testing.assert_close(entropy[:, step], -(full.exp() * full).sum(-1))
    with pytest.raises(RuntimeError, match="nothing recorded"):
        InverseCDFSampler(1.0).recorded()


def test_two_level_draw_over_several_blocks_follows_the_weights_and_skips_zeros():
    torch.manual_seed(4)
    vocab = 3 * CDF_BLOCK + 37  # several blocks and a padded last one
    weights = torch.rand(vocab) ** 4
    weights[::3] = 0.0  # never drawn
    weights[CDF_BLOCK : 2 * CDF_BLOCK] = 0.0  # a whole empty block
    weights[5] = 200.0  # one heavy token
    n = 200_000
    drawn = draw_inverse_cdf(weights.expand(n, -1).contiguous())
    freq = frequencies(drawn, vocab)
    assert freq[weights == 0].sum() == 0
    expected = weights.double() / weights.double().sum()
    assert torch.allclose(freq, expected, atol=0.005)  # heavy token p ~0.6: SE 0.0011
    assert (freq[5] - expected[5]).abs() < 0.005


def test_entropy_and_logprob_with_masked_tokens_are_finite():
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]])
    logp, entropy = tempered_logprob_and_entropy(logits, torch.tensor([2]), 1.0)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), dim=-1)
    torch.testing.assert_close(logp, p[1:2].log())
    torch.testing.assert_close(entropy, -(p * p.log()).sum().unsqueeze(0))


@pytest.mark.parametrize("bad", ["nan", "inf", "all -inf"])
@pytest.mark.parametrize("how", ["sample_from_logits", "top_k", "processor", "recording processor"])
def test_logits_that_cannot_be_sampled_are_refused(bad, how):
    """A diverged model's logits (a NaN or +inf, or -inf everywhere) used to draw token id =
    vocab size, which failed later with an unrelated index error."""
    logits = LOGITS.expand(3, -1).clone()
    logits[1] = float("-inf") if bad == "all -inf" else logits[1]
    if bad != "all -inf":
        logits[1, 2] = float(bad)
    match = r"cannot sample the next token: the logits of 1 of 3 rows are not finite"
    with pytest.raises(NonFiniteError, match=match):
        if how == "sample_from_logits":
            sample_from_logits(logits, temperature=1.0)
        elif how == "top_k":
            sample_from_logits(logits, temperature=0.7, top_k=2, top_p=0.9)
        else:
            sampler = InverseCDFSampler(temperature=1.0, record=how == "recording processor")
            sampler(torch.zeros(3, 1, dtype=torch.long), logits)
    # Some -inf in a row (masked tokens) is fine.
    logits = LOGITS.expand(3, -1).clone()
    logits[1, 1:] = float("-inf")
    assert sample_from_logits(logits, temperature=1.0)[1] == 0
