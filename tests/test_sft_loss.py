"""The SFT loss only counts response tokens."""

import math

import torch

from rlhf.data.collate import IGNORE_INDEX, DemonstrationCollator
from rlhf.sft.loss import labelled_nll, response_nll


def test_response_nll_matches_hand_computed_value():
    # vocab 3; sequence: prompt [0], response [1, 2]; position t predicts token t+1.
    logits = torch.zeros(1, 3, 3)
    logits[0, 0] = torch.tensor([0.0, math.log(3.0), 0.0])  # p(1) = 3/5
    logits[0, 1] = torch.tensor([0.0, 0.0, 0.0])  # p(2) = 1/3
    labels = torch.tensor([[IGNORE_INDEX, 1, 2]])
    nll, n = response_nll(logits, labels)
    assert int(n) == 2
    torch.testing.assert_close(nll, torch.tensor(-math.log(3 / 5) - math.log(1 / 3)))


def test_prompt_and_padding_tokens_carry_no_loss():
    """Changing the logits that predict prompt or padding tokens must not change the loss;
    changing one that predicts a response token must."""
    batch = DemonstrationCollator(pad_id=0)(
        [
            {"prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
            {"prompt_ids": [5], "response_ids": [8, 9, 4, 3]},
        ]
    )
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX] * 3 + [8, 9],
        [IGNORE_INDEX, 8, 9, 4, 3],
    ]
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 10)
    base, n = response_nll(logits, batch["labels"])
    assert int(n) == 2 + 4
    prompt_changed = logits.clone()
    prompt_changed[0, :2] += torch.randn(2, 10) * 5  # predict prompt tokens 6, 7
    torch.testing.assert_close(response_nll(prompt_changed, batch["labels"])[0], base)
    response_changed = logits.clone()
    response_changed[0, 2] += torch.randn(10) * 5  # predicts response token 8
    assert not torch.allclose(response_nll(response_changed, batch["labels"])[0], base)


def test_labelled_nll_equals_the_full_logits_loss_and_gradients():
    """The LM head on labelled positions only gives the same loss and gradients as the head
    over every position followed by response_nll."""
    batch = DemonstrationCollator(pad_id=0)(
        [
            {"prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
            {"prompt_ids": [5], "response_ids": [8, 9, 4, 3]},
        ]
    )
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 10, bias=False)
    hidden = torch.randn(2, 5, 6, requires_grad=True)
    full_nll, full_n = response_nll(head(hidden), batch["labels"])
    full_nll.backward()
    full_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    nll, n = labelled_nll(hidden, batch["labels"], head)
    nll.backward()
    assert int(n) == int(full_n) == 6
    torch.testing.assert_close(nll, full_nll)
    torch.testing.assert_close(hidden.grad, full_grads[0])
    torch.testing.assert_close(head.weight.grad, full_grads[1])
    # No gradient reaches positions that predict prompt or padding tokens.
    assert hidden.grad[0, :2].abs().sum() == 0
