"""Reward-model ensembles: the combined objectives on given scores, the config checks, K reward
adapters on one shared base, and PPO scoring with an ensemble."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlhf.models.ensemble import EnsembleScorer, check_ensemble, combine_scores
from rlhf.models.loading import LoraSettings, ModelSettings, apply_lora, load_causal_lm, load_tokenizer
from rlhf.models.reward import RewardModel, load_reward_model
from rlhf.models.scorers import SharedBaseScorer, load_scorer
from rlhf.ppo.settings import RewardSettings

SCORES = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, 0.5], [2.0, 1.0, 0.5]])  # [K=3, B=3]


def test_the_mean_objective_averages_the_members():
    assert combine_scores(SCORES, "mean").tolist() == pytest.approx([2.0, -1 / 3, 0.5])


def test_the_uncertainty_objective_is_mean_minus_penalty_times_the_population_std():
    # response 0: members 1, 3, 2 -> mean 2, population std sqrt(2/3)
    # response 1: members -2, 0, 1 -> mean -1/3, population std sqrt(((5/3)^2 + (1/3)^2 + (4/3)^2) / 3)
    std1 = math.sqrt(((5 / 3) ** 2 + (1 / 3) ** 2 + (4 / 3) ** 2) / 3)
    expected = [2.0 - 0.5 * math.sqrt(2 / 3), -1 / 3 - 0.5 * std1, 0.5]
    assert combine_scores(SCORES, "uncertainty", 0.5).tolist() == pytest.approx(expected)
    assert combine_scores(SCORES, "uncertainty", 0.0).tolist() == pytest.approx(combine_scores(SCORES).tolist())


def test_the_min_objective_takes_the_worst_member():
    assert combine_scores(SCORES, "min").tolist() == [1.0, -2.0, 0.5]


def test_one_member_combines_to_itself():
    one = SCORES[:1]
    for objective in ("mean", "uncertainty", "min"):
        assert combine_scores(one, objective).tolist() == one[0].tolist()


@pytest.mark.parametrize(("models", "objective", "penalty", "message"), [
    (["a", "b"], "median", 1.0, "unknown objective 'median'"),
    (["a", "b"], "uncertainty", -0.1, "ensemble_penalty must be a finite number >= 0"),
    (["a", "b"], "uncertainty", math.inf, "ensemble_penalty must be a finite number >= 0"),
    (["a", "a"], "mean", 1.0, "a is named twice"),
    (["a"], "min", 1.0, "'min' needs at least 2 reward models"),
    ([], "mean", 1.0, "no reward model given"),
])
def test_bad_ensemble_configs_are_refused(models, objective, penalty, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_ensemble(models, objective, penalty)


def test_reward_settings_accept_one_model_or_a_list_and_check_the_ensemble():
    assert RewardSettings(model="rm").models == ["rm"]
    assert RewardSettings(model=["rm0", "rm1"], ensemble="min").models == ["rm0", "rm1"]
    with pytest.raises(ValueError, match="needs at least 2 reward models"):
        RewardSettings(model="rm", ensemble="uncertainty")


class Constant(nn.Module):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = torch.tensor(values)

    def forward(self, input_ids, attention_mask):
        return self.values


def test_the_ensemble_scorer_standardises_each_member_before_combining():
    members = [Constant([1.0, 3.0]), Constant([10.0, 30.0])]
    scorer = EnsembleScorer(members, [(1.0, 2.0), (10.0, 20.0)], "min")
    ids = torch.zeros(2, 3, dtype=torch.long)
    # both members standardise to [0, 1]: the same preference on different scales
    assert scorer.member_scores(ids, torch.ones_like(ids)).tolist() == [[0.0, 1.0], [0.0, 1.0]]
    assert scorer(ids, torch.ones_like(ids)).tolist() == [0.0, 1.0]
    assert scorer.last_spread == 0.0


# ------------------------------------------------------------------------------- one base
def save_reward_adapter(base_dir, out, seed: int) -> None:
    """A reward model saved as a LoRA adapter on ``base_dir`` with random (seeded) weights."""
    torch.manual_seed(seed)
    lm = load_causal_lm(ModelSettings(str(base_dir), dtype="float32"))
    backbone = apply_lora(lm, LoraSettings(r=4, alpha=8))
    for name, p in backbone.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero: make each member's adapter differ
            nn.init.normal_(p, std=0.5)
    head = nn.Linear(backbone.get_base_model().config.hidden_size, 1)
    RewardModel(backbone, head, score_mean=0.1 * seed, score_std=1.0 + seed).save_pretrained(
        out, load_tokenizer(str(base_dir)), merge=False)


@pytest.fixture(scope="module")
def three_reward_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    paths = [root / f"rm{i}" for i in range(3)]
    for i, path in enumerate(paths):
        save_reward_adapter(tiny_model_dir, path, seed=i)
    return paths


def test_an_ensemble_shares_one_base_and_scores_as_its_members_alone(tiny_model_dir, three_reward_adapters):
    settings = ModelSettings(str(tiny_model_dir), dtype="float32", lora=LoraSettings(r=4, alpha=8))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    base_params = sum(p.numel() for p in load_causal_lm(settings).parameters())
    policy = apply_lora(load_causal_lm(settings), settings.lora, adapter_name="policy")
    adapter_params = sum(p.numel() for n, p in policy.named_parameters() if ".policy." in n)
    scorer, mean, std = load_scorer([str(p) for p in three_reward_adapters], True, policy, settings, tokenizer,
                                    "uncertainty", 0.5)
    assert (mean, std) == (0.0, 1.0)
    assert all(isinstance(m, SharedBaseScorer) for m in scorer.members)
    # one base: the policy model grew by three reward adapters of the policy adapter's size
    # (same r and targets), nothing else; the scorer owns only the three score heads.
    assert sum(p.numel() for p in policy.parameters()) == base_params + 4 * adapter_params
    hidden = policy.get_base_model().config.hidden_size
    assert sum(p.numel() for p in scorer.parameters()) == 3 * (hidden + 1)
    assert policy.active_adapter == "policy"

    ids = torch.randint(5, 100, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # one left-padded row
    alone = []
    for path in three_reward_adapters:
        rm = load_reward_model(path, dtype="float32", prefer_adapter=True)
        with torch.no_grad():
            alone.append(rm.normalize(rm(ids, mask)))
    alone = torch.stack(alone)
    assert torch.allclose(scorer.member_scores(ids, mask), alone, atol=1e-5)
    assert torch.allclose(scorer(ids, mask), combine_scores(alone, "uncertainty", 0.5), atol=1e-5)
    assert policy.active_adapter == "policy"  # scoring left the policy adapter active
    assert scorer.last_spread == pytest.approx(float(alone.std(dim=0, correction=0).mean()), abs=1e-5)


def test_ppo_scores_with_an_ensemble_and_logs_its_spread(tmp_path, tiny_model_dir, three_reward_adapters):
    import json

    from rlhf.data import DataSource, PromptDataModule
    from rlhf.generation import SamplingSettings
    from rlhf.ppo import PPOModule
    from rlhf.ppo.settings import KLSettings, UpdateSettings

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell me story {i}."}) + "\n" for i in range(8)))
    data = PromptDataModule(train=DataSource(str(path)), val_fraction=0.0, batch_size=4,
                            max_length=48, max_prompt_length=24, tokenizer=str(tiny_model_dir))
    data.setup("fit")
    module = PPOModule(
        base=ModelSettings(str(tiny_model_dir), lora=LoraSettings(r=4, alpha=8)),
        reward=RewardSettings(model=[str(p) for p in three_reward_adapters], ensemble="min", missing_eos_penalty=None),
        sampling=SamplingSettings(max_new_tokens=6, temperature=1.0), kl=KLSettings(coef=0.01),
        update=UpdateSettings(ppo_epochs=1, minibatch_size=4), iterations=1, sample_every=0,
    )
    module.tokenizer = data.tokenizer
    module.configure_model()
    assert len(module.scorer.members) == 3
    batch = next(iter(data.train_dataloader()))
    rollout = module.make_rollout(batch)
    metrics = module.rollout_metrics(rollout)
    assert metrics["reward/ensemble_std"] > 0
    member = module.scorer.member_scores(rollout.input_ids, rollout.attention_mask)
    assert torch.allclose(rollout.raw_scores, member.min(dim=0).values, atol=1e-5)


def test_ensemble_accuracies_score_members_and_every_objective():
    from rlhf.score import ensemble_accuracies

    # 2 pairs: chosen replies in columns 0-1, rejected in 2-3
    scores = torch.tensor([[1.0, 0.0, 0.0, 1.0],    # member a: right on pair 0 only
                           [2.0, 2.0, 0.0, 0.0],    # member b: right on both
                           [0.5, -3.0, 0.0, 0.0]])  # member c: right on pair 0 only
    out = ensemble_accuracies(scores, 2, ["a", "b", "c"], penalty=1.0)
    assert [out["members"][m]["accuracy"] for m in "abc"] == [0.5, 1.0, 0.5]
    # mean: pair 0 7/6 > 0; pair 1 -1/3 < 1/3 -> 0.5; min: pair 0 0.5 > 0, pair 1 -3 < 0 -> 0.5
    assert out["ensemble"]["mean"]["accuracy"] == 0.5
    assert out["ensemble"]["min"]["accuracy"] == 0.5
    assert set(out["ensemble"]) == {"mean", "uncertainty", "min"}


def test_the_score_command_reports_members_and_the_ensemble(three_reward_adapters, tmp_path):
    import json

    from rlhf.score import main

    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": "A kind reply " * (i % 3 + 1), "rejected": f"No {i}."}
            for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", str(data), "--schema", "fields", "--no-progress", "--batch-size", "4"]
    summary = main(["--model", *map(str, three_reward_adapters), *common])
    alone = [main(["--model", str(p), *common]) for p in three_reward_adapters]
    assert [m["accuracy"] for m in summary["members"].values()] == [a["accuracy"] for a in alone]
    assert summary["accuracy"] == summary["ensemble"]["mean"]["accuracy"]
    assert summary["n"] == 12


def test_a_reward_adapter_shares_a_quantized_base(tiny_model_dir, three_reward_adapters):
    """With a 4-bit base the RM adapter loads on the policy's quantized model (one base), not
    as a second, unquantized model; its scores follow the RM's as trained up to quantization."""
    pytest.importorskip("bitsandbytes")
    settings = ModelSettings(str(tiny_model_dir), quantization="4bit", lora=LoraSettings(r=4, alpha=8))
    try:
        policy = apply_lora(load_causal_lm(settings), settings.lora, adapter_name="policy")
    except Exception as err:  # noqa: BLE001 - report why the backend is unusable here
        pytest.skip(f"bitsandbytes 4-bit does not work on this machine: {type(err).__name__}: {err}")
    before = sum(p.numel() for p in policy.parameters())
    adapter = sum(p.numel() for n, p in policy.named_parameters() if ".policy." in n)
    scorer, _, _ = load_scorer(str(three_reward_adapters[0]), True, policy, settings,
                               load_tokenizer(str(tiny_model_dir)))
    assert isinstance(scorer, SharedBaseScorer)
    assert sum(p.numel() for p in policy.parameters()) == before + adapter  # one reward adapter, no base
    ids = torch.randint(5, 100, (6, 9))
    mask = torch.ones_like(ids)
    rm = load_reward_model(three_reward_adapters[0], dtype="float32", prefer_adapter=True)
    with torch.no_grad():
        quantized, exact = scorer(ids, mask), rm(ids, mask)
    assert torch.isfinite(quantized).all()
    assert float(torch.corrcoef(torch.stack([quantized, exact]))[0, 1]) > 0.9
