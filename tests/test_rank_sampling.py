"""Rollout data per process, without starting processes (the rank and world size are given):

- prompts: each process's share of an epoch is disjoint from the others' and none repeats, so
  no prompt is sampled twice in one global PPO iteration (Lightning's default sampler pads an
  uneven epoch with repeats, which can put one prompt on two processes in the same iteration);
- seeds: each process samples with its own seed, derived from one shared draw of the global RNG
  and its rank: different between ranks, the same on a re-run, and the global RNG advances
  alike on every rank.

``tests/test_multinode.py`` records the same from real two-node PPO runs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.data.datamodules import DemonstrationDataModule, PromptDataModule
from rlhf.data.sampling import even_distributed_sampler
from rlhf.data.sources import DataSource
from rlhf.generation import SamplingSettings, sample_and_record, sample_responses
from rlhf.generation.seeds import process_generator, process_seed


def test_process_seeds_differ_between_ranks_and_repeat_on_a_rerun():
    seeds = [process_seed(1234, rank) for rank in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [process_seed(1234, rank) for rank in range(64)]
    assert process_seed(1235, 0) not in seeds  # the next shared seed: unrelated too
    with pytest.raises(ValueError, match="rank must be >= 0"):
        process_seed(1, -1)


def draw_on(rank: int, seed: int = 0) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Seed the global RNG as ``seed_everything`` does on every process, take ``rank``'s
    generator: ``(its seed, 8 of its uniforms, the next global draw)``."""
    torch.manual_seed(seed)
    generator = process_generator(torch.device("cpu"), rank)
    return generator.initial_seed(), torch.rand(8, generator=generator), torch.rand(3)


def test_process_generators_draw_differently_per_rank_and_leave_the_global_stream_alike():
    seed0, draws0, after0 = draw_on(0)
    seed1, draws1, after1 = draw_on(1)
    assert seed0 != seed1 and not torch.equal(draws0, draws1)
    assert torch.equal(after0, after1)  # one shared draw on every rank, whatever it samples
    again = draw_on(1)
    assert again[0] == seed1 and torch.equal(again[1], draws1)  # a re-run: the same numbers
    assert draw_on(1, seed=1)[0] != seed1  # another run seed: another stream


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=11,
                         pad_token_id=10)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    return model


@pytest.mark.parametrize("record", [False, True])
def test_two_ranks_with_the_same_prompts_sample_different_responses(record):
    """The rollout's two sampling paths (plain, and recording log-probs) draw from the
    generator they are given: the same prompts on two ranks give different responses, and
    each rank's responses repeat on a re-run."""
    model, sampling = tiny_model(), SamplingSettings(max_new_tokens=6, temperature=1.0)
    prompts = torch.tensor([[1, 5, 7], [2, 3, 4]]).repeat(4, 1)

    def responses(rank: int) -> torch.Tensor:
        torch.manual_seed(7)
        generator = process_generator(torch.device("cpu"), rank)
        if record:
            return sample_and_record(model, prompts, torch.ones_like(prompts), sampling, 11, 10, generator)[0]
        return sample_responses(model, prompts, torch.ones_like(prompts), sampling, 11, 10, generator=generator)

    assert not torch.equal(responses(0), responses(1))
    assert torch.equal(responses(1), responses(1))


# -- prompts -----------------------------------------------------------------------------------
def shares(size: int, world: int, epoch: int, sampler=even_distributed_sampler) -> list[list[int]]:
    """Each rank's indices for ``epoch``."""
    out = []
    for rank in range(world):
        s = sampler(list(range(size)), world, rank)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("size,world", [(3, 2), (7, 2), (8, 2), (10, 4), (5, 5)])
def test_each_epoch_splits_into_disjoint_equal_shares(size, world, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    orders = []
    for epoch in range(4):
        parts = shares(size, world, epoch)
        flat = [i for part in parts for i in part]
        assert all(len(part) == size // world for part in parts)
        assert len(set(flat)) == len(flat) == size - size % world  # none twice; the rest sits out
        orders.append(flat)
    assert len({tuple(o) for o in orders}) > 1  # reshuffled every epoch
    assert shares(size, world, 2) == shares(size, world, 2)  # the same on a re-run


def test_lightnings_default_sampler_repeats_a_prompt_in_one_global_step():
    """Why prompts do not use it: 3 prompts, 2 processes, batches of 2 (one global step an
    epoch): the padding repeats a prompt on the other process in the same step."""
    parts = shares(3, 2, 0, sampler=lambda data, world, rank: DistributedSampler(data, world, rank, seed=0))
    flat = [i for part in parts for i in part]
    assert len(flat) == 4 and len(set(flat)) == 3


def test_fewer_items_than_processes_is_refused():
    with pytest.raises(ValueError, match="3 training items cannot give each of the 4 processes one"):
        even_distributed_sampler(list(range(3)), 4, 0)


def prompt_module(root, tokenizer, cls=PromptDataModule, rows: int = 7, batch_size: int = 2):
    path = root / "data.jsonl"
    fields = {"prompt": "Q {i}?", "response": "A {i}."} if cls is DemonstrationDataModule else {"prompt": "Q {i}?"}
    path.write_text("".join(json.dumps({k: v.format(i=i) for k, v in fields.items()}) + "\n" for i in range(rows)))
    dm = cls(train=DataSource(str(path)), tokenizer=str(tokenizer), val_fraction=0.0, batch_size=batch_size,
             max_length=32, max_prompt_length=16)
    dm.setup("fit")
    return dm


def test_prompt_batches_of_two_processes_never_share_a_prompt(tmp_path, tiny_model_dir):
    """7 prompts, 2 processes, batches of 2: each epoch each process takes 3 prompts in two
    iterations (2, then 1), and no prompt comes twice in an iteration or in the epoch."""
    loaders = []
    for rank in range(2):
        dm = prompt_module(tmp_path, tiny_model_dir)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.drop_last
        loaders.append(loader)
    for epoch in range(3):
        for loader in loaders:
            loader.sampler.set_epoch(epoch)  # what Lightning does each epoch
        iterations = list(zip(*[[b["index"].tolist() for b in loader] for loader in loaders]))
        assert [[len(r) for r in it] for it in iterations] == [[2, 2], [1, 1]]
        for ranks in iterations:
            assert not set(ranks[0]) & set(ranks[1])
        seen = [i for ranks in iterations for r in ranks for i in r]
        assert len(seen) == len(set(seen)) == 6


def test_other_stages_keep_lightnings_sampler(tmp_path, tiny_model_dir):
    dm = prompt_module(tmp_path, tiny_model_dir, cls=DemonstrationDataModule)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0)
    assert isinstance(dm.train_dataloader().sampler, RandomSampler)  # Lightning swaps in its own
