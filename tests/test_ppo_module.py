"""PPOModule on the tiny model: reference = base exactly, learning a token-count reward,
staying at the reference under a huge KL coefficient, critic-free estimators."""

import json

import lightning as L
import pytest
import torch

from rlhf.data.datamodules import PromptDataModule
from rlhf.data.sources import DataSource
from rlhf.models.loading import LoraSettings, ModelSettings, load_causal_lm
from rlhf.ppo.module import PPOModule
from rlhf.models.forward import position_ids_from_mask
from rlhf.generation import SamplingSettings
from rlhf.generation.best_of_n import best_of_n
from rlhf.models.logprobs import logprobs_from_logits
from rlhf.ppo.settings import KLSettings, UpdateSettings
from rlhf.ppo.update import minibatch_loss


class TokenCountScorer:
    """Reward = number of tokens of the sequence whose id is a multiple of ``every`` (one
    vocabulary token in ``every``: a "+1 per occurrence" reward frequent enough to learn from
    on a tiny random model)."""

    def __init__(self, every: int = 8) -> None:
        self.every = every

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return ((input_ids % self.every == 0) & attention_mask.bool()).sum(dim=1).float()


def prompts(tmp_path, n=16):
    path = tmp_path / "prompts.jsonl"
    # One prompt repeated: the reward then differs only through the responses.
    path.write_text("".join(json.dumps({"prompt": "Tell me a story."}) + "\n" for _ in range(n)))
    return PromptDataModule(train=DataSource(str(path)), val_fraction=0.0, batch_size=8,
                            max_length=64, max_prompt_length=32)


def make_module(model_dir, **kwargs):
    defaults = dict(
        base=ModelSettings(model_dir, lora=LoraSettings(r=8, alpha=16)),
        sampling=SamplingSettings(max_new_tokens=8, temperature=1.0),
        kl=KLSettings(coef=0.01),
        update=UpdateSettings(ppo_epochs=2, minibatch_size=8),
        lr=3e-3, iterations=30, sample_every=0,
    )
    defaults.update(kwargs)
    module = PPOModule(**defaults)
    module.scorer = TokenCountScorer()
    return module


def fit(module, data, root):
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer.callbacks.append(Record())
    trainer.fit(module, datamodule=data)
    return history


def test_reference_logprobs_equal_the_base_model(tmp_path, tiny_model_dir):
    module = make_module(tiny_model_dir)
    module.configure_model()
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapter now changes the outputs
    base = load_causal_lm(ModelSettings(tiny_model_dir)).eval()
    ids = torch.randint(3, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    start = 7
    ref = module.reference_logprobs(ids, mask, start)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    expected = logprobs_from_logits(logits[:, start - 1 : -1], ids[:, start:], module.sampling.temperature)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)
    policy, _, _ = module.policy_forward(ids, mask, start)
    assert (policy - ref).abs().max() > 1e-3  # and the adapter is really on for the policy


def mean_of(history, key, rows):
    return sum(h[key] for h in rows) / len(rows)


def test_ppo_raises_a_token_count_reward_and_a_huge_kl_coef_holds_it_at_the_reference(
    tmp_path, tiny_policy_dir
):
    torch.manual_seed(0)
    free = fit(make_module(tiny_policy_dir), prompts(tmp_path), tmp_path)
    assert len(free) == 30
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in free)
    # Margins from seeds 0-5 (the gain is a sampled outcome): the free run's reward rose by
    # 0.63-1.95 and its KL peaked at 4.4-11.4; the held run's rose by -0.03-0.18, KL <= 1.95.
    first, last = mean_of(free, "reward/mean", free[:5]), mean_of(free, "reward/mean", free[-5:])
    assert last > first + 0.5, (first, last)
    free_kl = max(h["kl/mean"] for h in free)
    assert free_kl < 20  # bounded (8 tokens; the reference is the policy's own base)

    torch.manual_seed(0)
    held = fit(make_module(tiny_policy_dir, kl=KLSettings(coef=100.0)), prompts(tmp_path), tmp_path)
    held_kl = max(h["kl/mean"] for h in held)
    assert held_kl < 0.5 * free_kl, (held_kl, free_kl)
    first, last = mean_of(held, "reward/mean", held[:5]), mean_of(held, "reward/mean", held[-5:])
    assert last < first + 0.5, (first, last)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce"])
def test_critic_free_estimators_learn(tmp_path, tiny_policy_dir, estimator):
    torch.manual_seed(0)
    module = make_module(tiny_policy_dir, estimator=estimator, samples_per_prompt=4,
                         iterations=20)
    assert module.value_head is None
    data = prompts(tmp_path)
    data.batch_size = 4
    history = fit(module, data, tmp_path)
    first = mean_of(history, "reward/mean", history[:4])
    last = mean_of(history, "reward/mean", history[-4:])
    assert last > first + 0.5, (first, last)
    assert "value/loss" not in history[-1]



def test_best_of_n_returns_the_best_scored_sample(tmp_path, tiny_policy_dir):
    torch.manual_seed(0)
    module = make_module(tiny_policy_dir)
    module.configure_model()
    data = prompts(tmp_path)
    data.tokenizer_name = str(tiny_policy_dir)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    texts, best = best_of_n(module.model, module.scorer, module.tokenizer, batch["input_ids"], batch["attention_mask"],
                            module.sampling, n=8)
    assert len(texts) == len(best) == batch["input_ids"].shape[0]
    torch.manual_seed(0)
    _, single = best_of_n(module.model, module.scorer, module.tokenizer, batch["input_ids"], batch["attention_mask"],
                          module.sampling, n=1)
    assert best.mean() > single.mean()


# Recorded during KV-cached generation the numbers differ from a full pass by float rounding
# (up to ~2e-5 on this large-logit tiny policy); recomputed they are the same computation.
@pytest.mark.parametrize("old_logprobs, atol", [("generation", 1e-4), ("recompute", 1e-5)])
def test_rollout_logprobs_values_and_entropy_are_the_sampling_policys(tmp_path, tiny_policy_dir, old_logprobs, atol):
    torch.manual_seed(0)
    module = make_module(tiny_policy_dir, sampling=SamplingSettings(max_new_tokens=8, temperature=0.7),
                         update=UpdateSettings(ppo_epochs=2, minibatch_size=8, old_logprobs=old_logprobs))
    module.configure_model()
    with torch.no_grad():
        module.value_head.weight.normal_()  # zero-initialised: give the values something to show
    data = prompts(tmp_path)
    data.tokenizer_name = str(tiny_policy_dir)
    data.setup("fit")
    rollout = module.make_rollout(next(iter(data.train_dataloader())))
    ids, mask, start = rollout.input_ids, rollout.attention_mask, rollout.response_start
    with torch.no_grad():
        out = module.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                           output_hidden_states=True)
        values = module.value_head(out.hidden_states[-1][:, start - 1 : -1]).squeeze(-1)
    logp = torch.log_softmax(out.logits[:, start - 1 : -1] / 0.7, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    token_logp = logp.gather(-1, ids[:, start:].unsqueeze(-1)).squeeze(-1)
    on = rollout.response_mask.bool()
    for got, expected in [(rollout.logprobs, token_logp), (rollout.entropy, entropy), (rollout.values, values)]:
        torch.testing.assert_close(got[on], expected[on], rtol=0, atol=atol)
    logged = module.rollout_metrics(rollout)["policy/entropy"]
    assert logged == pytest.approx(float(entropy[on].mean()), abs=atol)

    module.model.eval()  # no adapter dropout: the two losses see the same policy
    without, _ = minibatch_loss(module, rollout)
    module.update_settings.entropy_coef = 0.1
    with_bonus, _ = minibatch_loss(module, rollout)
    current = float(entropy[on].mean())  # the policy has not moved since the rollout
    assert float((without - with_bonus).detach()) == pytest.approx(0.1 * current, abs=1e-5)


def test_auto_old_logprobs_come_from_generation_only_in_full_precision(tiny_policy_dir, monkeypatch):
    module = make_module(tiny_policy_dir)
    assert module.update_settings.old_logprobs == "auto"
    module.configure_model()
    assert module.old_logprobs_from_generation()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not module.old_logprobs_from_generation()
    monkeypatch.setattr(module, "_trainer", type("T", (), {"precision": "bf16-mixed"})())
    assert not module.old_logprobs_from_generation()
    module.update_settings.old_logprobs = "generation"
    assert module.old_logprobs_from_generation()
    bf16 = make_module(tiny_policy_dir)
    bf16.configure_model()
    bf16.model.to(torch.bfloat16)
    assert not bf16.old_logprobs_from_generation()
    with pytest.raises(ValueError, match="old_logprobs must be"):
        UpdateSettings(old_logprobs="cached")


def test_an_adapter_critic_makes_its_own_value_pass_with_generation_logprobs(tmp_path, tiny_policy_dir):
    torch.manual_seed(0)
    module = make_module(tiny_policy_dir, critic="adapter")
    module.configure_model()
    with torch.no_grad():
        module.value_head.weight.normal_()
    data = prompts(tmp_path)
    data.tokenizer_name = str(tiny_policy_dir)
    data.setup("fit")
    rollout = module.make_rollout(next(iter(data.train_dataloader())))
    with torch.no_grad():
        expected = module.adapter_values(rollout.input_ids, rollout.attention_mask, rollout.response_start)
    torch.testing.assert_close(rollout.values, expected, rtol=0, atol=0)
    assert module.model.active_adapter == "policy"  # switched back after the value pass


def test_kl_controller_state_and_iteration_travel_in_checkpoints(tmp_path, tiny_policy_dir):
    module = make_module(tiny_policy_dir, kl=KLSettings(coef=0.1, adaptive=True, target=1.0), iterations=3)
    fit(module, prompts(tmp_path), tmp_path)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["ppo"]["iteration"] == 3
    assert checkpoint["ppo"]["kl_controller"]["value"] != 0.1  # the adaptive controller moved
    assert all(".policy." in k or k.startswith("value_head.") for k in checkpoint["state_dict"])
    fresh = make_module(tiny_policy_dir, kl=KLSettings(coef=0.1, adaptive=True, target=1.0))
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.iteration == 3
    assert fresh.kl_controller.value == module.kl_controller.value
