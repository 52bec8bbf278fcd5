"""Rejection-sampling selection: RAFT keeps each prompt's argmax, ReST keeps exactly the samples
at or above a threshold that rises round by round; sample buffers join and trim."""

import pytest
import torch

from rlhf.rejection.samples import Samples
from rlhf.rejection.selection import (
    check_schedule,
    select_above,
    select_best,
    threshold_for_round,
)


def test_raft_keeps_the_argmax_of_each_prompt():
    scores = torch.tensor([0.1, 0.9, 0.3,   # prompt 0 -> index 1
                           2.0, -1.0, 1.0,  # prompt 1 -> index 3
                           0.5, 0.5, 0.7])  # prompt 2 -> index 8
    assert select_best(scores, k=3).tolist() == [1, 3, 8]
    assert select_best(torch.tensor([1.0, 1.0]), k=2).tolist() == [0]  # ties -> the first


def test_raft_skips_ineligible_samples_and_prompts_with_none_left():
    scores = torch.tensor([5.0, 1.0, float("nan"), 2.0, 3.0, 4.0])
    valid = torch.tensor([False, True, True, True, False, False])
    # prompt 0: the 5.0 is not valid -> 1.0 (index 1); prompt 1: NaN skipped -> index 3; prompt 2: none
    assert select_best(scores, k=2, valid=valid).tolist() == [1, 3]
    assert select_best(torch.full((4,), float("nan")), k=2).numel() == 0


def test_raft_rejects_scores_that_do_not_split_into_prompts():
    with pytest.raises(ValueError, match="multiple of k"):
        select_best(torch.zeros(5), k=2)


def test_rest_keeps_exactly_the_samples_at_or_above_the_threshold():
    scores = torch.tensor([0.2, 1.5, -0.3, 1.0, float("inf"), float("nan"), 0.99])
    assert select_above(scores, 1.0).tolist() == [1, 3]  # inf / NaN never kept
    assert select_above(scores, 1.0, valid=torch.tensor([1, 0, 1, 1, 1, 1, 1]).bool()).tolist() == [3]
    assert select_above(scores, 10.0).numel() == 0


def test_quantile_threshold_rises_per_round_and_keeps_the_top_share():
    scores = torch.arange(100, dtype=torch.float32)
    quantiles = [0.5, 0.75, 0.9]
    t = [threshold_for_round(scores, r, quantiles=quantiles) for r in range(4)]
    assert t == pytest.approx([49.5, 74.25, 89.1, 89.1])  # past the schedule: its last entry
    assert [len(select_above(scores, x)) for x in t[:3]] == [50, 25, 10]
    # Never below the previous round's, even when this round's scores are lower.
    assert threshold_for_round(scores - 100, 1, quantiles=quantiles, floor=t[0]) == t[0]
    # No finite score: the floor (nothing kept without one).
    nan = torch.full((3,), float("nan"))
    assert threshold_for_round(nan, 0, quantiles=quantiles) == float("inf")
    assert threshold_for_round(nan, 1, quantiles=quantiles, floor=2.0) == 2.0


def test_fixed_thresholds_and_schedule_checks():
    scores = torch.zeros(3)
    assert [threshold_for_round(scores, r, thresholds=[0.1, 0.3]) for r in range(3)] == [0.1, 0.3, 0.3]
    with pytest.raises(ValueError, match="exactly one"):
        threshold_for_round(scores, 0)
    with pytest.raises(ValueError, match="exactly one"):
        threshold_for_round(scores, 0, quantiles=[0.5], thresholds=[1.0])
    with pytest.raises(ValueError, match="must not decrease"):
        check_schedule([0.5, 0.4], "quantiles", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\]"):
        check_schedule([0.5, 1.5], "quantiles", 0.0, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        check_schedule([], "thresholds")


def samples(prompt_mask, response_mask, ids=None):
    prompt_mask, response_mask = torch.tensor(prompt_mask), torch.tensor(response_mask)
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    n = len(mask)
    ids = torch.arange(mask.numel()).view_as(mask) if ids is None else ids
    return Samples(ids, mask, prompt_mask.shape[1], response_mask, response_mask[:, -1] == 0,
                   torch.arange(n, dtype=torch.float32), torch.zeros(n))


def test_samples_join_across_response_widths_and_trim_padding():
    a = samples([[0, 1, 1]], [[1, 1, 0]])
    b = samples([[0, 0, 1]], [[1, 1, 1, 1]])
    joined = Samples.cat([a, b], pad_id=99)
    assert joined.input_ids.shape == (2, 7) and joined.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert joined.input_ids[0, 6].item() == 99 and joined.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert joined.lengths.tolist() == [2, 4]
    first = joined.select(torch.tensor([0]))
    trimmed = first.trimmed()  # one all-pad prompt column and two empty response columns go
    assert trimmed.response_start == 2 and trimmed.input_ids.tolist() == [a.input_ids[0, 1:5].tolist()]
    assert trimmed.response_mask.tolist() == [[1, 1]] and first.response_ids(0) == a.response_ids(0)
    with pytest.raises(ValueError, match="prompt width"):
        Samples.cat([a, samples([[1, 1]], [[1]])], pad_id=0)
