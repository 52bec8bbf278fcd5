"""RejectionSamplingModule on the tiny model: RAFT and ReST rounds raise a token-count reward,
save a loadable policy, count a round that keeps nothing, resume at the round counter, and
refuse configs without LoRA or a reward."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from rlhf.data.datamodules import PromptDataModule
from rlhf.data.sources import DataSource
from rlhf.generation import SamplingSettings
from rlhf.models.loading import LoraSettings, ModelSettings, load_causal_lm
from rlhf.outputs import read_stage_marker
from rlhf.policies import resolve_model_dir
from rlhf.rejection import RejectionSamplingModule


class TokenCountScorer:
    """Reward = number of tokens whose id is a multiple of ``every`` (as in test_ppo_module)."""

    def __init__(self, every: int = 8) -> None:
        self.every = every

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return ((input_ids % self.every == 0) & attention_mask.bool()).sum(dim=1).float()


def prompts(tmp_path, n=16, batch_size=8):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": "Tell me a story."}) + "\n" for _ in range(n)))
    return PromptDataModule(train=DataSource(str(path)), val_fraction=0.0, batch_size=batch_size,
                            max_length=64, max_prompt_length=32)


def make_module(model_dir, scorer=True, **kwargs):
    defaults = {
        "base": ModelSettings(str(model_dir), lora=LoraSettings(r=8, alpha=16)),
        "sampling": SamplingSettings(max_new_tokens=8, temperature=1.0),
        "samples_per_prompt": 4, "rounds": 2, "sft_epochs": 4, "minibatch_size": 8, "lr": 3e-3,
    }
    defaults.update(kwargs)
    module = RejectionSamplingModule(**defaults)
    if scorer:
        module.scorer = TokenCountScorer()
    return module


def fit(module, data, root, ckpt_path=None, callbacks=()):
    history = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=bool(callbacks),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, callbacks=[Record(), *callbacks])
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return history, trainer


def lora_b(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_B" in n}


def test_raft_rounds_raise_the_reward_and_save_a_loadable_policy(tmp_path, tiny_policy_dir):
    torch.manual_seed(0)
    module = make_module(tiny_policy_dir, samples_per_prompt=8, sft_epochs=8, lr=1e-2, output_dir=str(tmp_path / "out"))
    history, trainer = fit(module, prompts(tmp_path), tmp_path)
    assert [h["round"] for h in history] == [0.0, 1.0] and module.round == 2
    first, second = history
    assert first["rejection/kept"] == 8 and first["rejection/kept_frac"] == 1 / 8  # one of 8 per prompt
    assert first["reward/kept_mean"] > first["reward/mean"]
    # Seeds 0-3 raised the mean reward of the samples by 0.7-1.3 (of ~2.7), the kept set's by 0.4-0.8.
    assert second["reward/mean"] > first["reward/mean"] + 0.3, (first["reward/mean"], second["reward/mean"])
    assert second["reward/kept_mean"] > first["reward/kept_mean"]
    assert abs(first["kl/mean"]) < 1e-4 < second["kl/mean"]  # the zero-initialised adapter is the reference
    assert first["train/steps"] == 8 and trainer.global_step == 16 and first["train/loss"] > second["train/loss"]
    out = tmp_path / "out"
    marker = read_stage_marker(out)
    assert marker["stage"] == "rejection" and marker["mode"] == "raft" and marker["rounds"] == 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    model_dir = resolve_model_dir(out)
    assert model_dir == str(out / "model")
    merged = load_causal_lm(ModelSettings(model_dir)).eval()  # the policy, adapter merged in
    ids = torch.randint(3, 500, (2, 10))
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_rest_keeps_the_samples_above_a_rising_quantile_threshold(tmp_path, tiny_policy_dir):
    torch.manual_seed(0)
    module = make_module(tiny_policy_dir, mode="rest", quantiles=[0.25, 0.75], sft_epochs=1, minibatch_size=16)
    seen, collect = [], module.collect

    def spy(batch, k):
        seen.append(collect(batch, k))
        return seen[-1]

    module.collect = spy
    history, _ = fit(module, prompts(tmp_path), tmp_path)
    thresholds = [h["rejection/threshold"] for h in history]
    assert thresholds[0] == pytest.approx(float(torch.quantile(seen[0].scores, 0.25)))
    assert thresholds[1] >= max(thresholds[0], float(torch.quantile(seen[1].scores, 0.75))) - 1e-6
    assert module.threshold == thresholds[1]
    for h, samples, threshold in zip(history, seen, thresholds):
        assert h["rejection/kept"] == int((samples.scores >= threshold).sum()) > 0
        assert h["reward/kept_mean"] >= threshold


def test_a_round_that_keeps_nothing_is_counted_and_makes_no_update(tmp_path, tiny_policy_dir):
    module = make_module(tiny_policy_dir, mode="rest", thresholds=[1e9])
    module.configure_model()
    before = lora_b(module)
    history, trainer = fit(module, prompts(tmp_path), tmp_path)
    assert [h["rejection/skipped_rounds"] for h in history] == [1.0, 2.0]
    assert all(h["rejection/kept"] == 0 and "train/loss" not in h for h in history)
    assert trainer.global_step == 0 and module.round == 2
    assert all(torch.equal(before[n], p) for n, p in lora_b(module).items())


def test_resume_continues_at_the_checkpointed_round(tmp_path, tiny_policy_dir):
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1)
    fit(make_module(tiny_policy_dir, rounds=1, sft_epochs=1), prompts(tmp_path), tmp_path,
        callbacks=[checkpoint])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["rejection"]["round"] == 1 and all("lora_" in k for k in saved["state_dict"])
    module = make_module(tiny_policy_dir, rounds=2, sft_epochs=1)
    history, _ = fit(module, prompts(tmp_path), tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [h["round"] for h in history] == [1.0] and module.round == 2


def test_configs_without_lora_or_a_reward_are_refused(tmp_path, tiny_policy_dir):
    with pytest.raises(ValueError, match="base.lora"):
        RejectionSamplingModule(base=ModelSettings(str(tiny_policy_dir)))
    with pytest.raises(ValueError, match="mode: rest"):
        make_module(tiny_policy_dir, quantiles=[0.5])
    with pytest.raises(ValueError, match="unknown gold function"):
        make_module(tiny_policy_dir, gold="nope")
    module = make_module(tiny_policy_dir, scorer=False)
    with pytest.raises(ValueError, match="model.init_args.reward_model"):
        fit(module, prompts(tmp_path), tmp_path)
    module = make_module(tiny_policy_dir, scorer=False, reward_model=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="model.init_args.reward_model"):
        fit(module, prompts(tmp_path), tmp_path)


def test_a_multi_process_run_is_refused(tiny_policy_dir):
    from types import SimpleNamespace

    module = make_module(tiny_policy_dir)
    module._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="one process \\(this run has 2\\)"):
        module.setup("fit")


def test_a_gold_function_scores_the_decoded_responses(tiny_policy_dir):
    pytest.importorskip("vaderSentiment")
    from rlhf.gold import vader_positivity

    module = make_module(tiny_policy_dir, scorer=False, gold="vader")
    tokenizer = module.tokenizer
    texts = ["What a wonderful, happy day!", "This is awful and sad."]
    responses = [tokenizer(t)["input_ids"] for t in texts]
    ids = torch.tensor([responses[0][:4], responses[1][:4]])
    scores = module.score(ids, torch.ones_like(ids), responses)
    assert scores.tolist() == pytest.approx(vader_positivity(texts)) and scores[0] > 0 > scores[1]
