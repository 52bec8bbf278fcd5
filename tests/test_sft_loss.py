"""The SFT loss only counts response tokens."""

import math

import torch

from rlhf.data.collate import IGNORE_INDEX, DemonstrationCollator
from rlhf.sft.loss import response_nll


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
