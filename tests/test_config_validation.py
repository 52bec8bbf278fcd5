"""PPO config values that used to be accepted silently now fail early, naming the key:
a negative ``kl.coef``, ``iterations: 0``, and an ``update.minibatch_size`` larger than the
rollout (``data.init_args.batch_size`` x ``samples_per_prompt``). The CLI path of the first two
is in ``test_bad_inputs.py``."""

from __future__ import annotations

import json

import lightning as L
import pytest

from rlhf.data.datamodules import PromptDataModule
from rlhf.data.sources import DataSource
from rlhf.generation import SamplingSettings
from rlhf.models.loading import LoraSettings, ModelSettings
from rlhf.ppo.module import PPOModule
from rlhf.ppo.settings import KLSettings, UpdateSettings


def test_settings_refuse_values_that_make_no_sense():
    with pytest.raises(ValueError, match=r"kl\.coef must be a finite number >= 0 \(got -0\.01\)"):
        KLSettings(coef=-0.01)
    with pytest.raises(ValueError, match=r"kl\.coef must be a finite number >= 0 \(got nan\)"):
        KLSettings(coef=float("nan"))
    KLSettings(coef=0.0)  # no KL penalty is allowed
    with pytest.raises(ValueError, match=r"update\.ppo_epochs must be >= 1 \(got 0\)"):
        UpdateSettings(ppo_epochs=0)
    with pytest.raises(ValueError, match=r"update\.minibatch_size must be >= 1 or null \(got 0\)"):
        UpdateSettings(minibatch_size=0)
    with pytest.raises(ValueError, match=r"update\.micro_batch_size must be >= 1 or null \(got -2\)"):
        UpdateSettings(micro_batch_size=-2)


def test_minibatch_larger_than_the_rollout_is_refused():
    update = UpdateSettings(minibatch_size=16)
    update.check_rollout(batch_size=8, samples_per_prompt=2)  # 16 sequences: fits exactly
    update.check_rollout(batch_size=None, samples_per_prompt=2)  # unknown: not checked
    UpdateSettings().check_rollout(batch_size=1, samples_per_prompt=1)  # null: the whole rollout
    with pytest.raises(ValueError, match=(
        r"update\.minibatch_size \(16\) is larger than the rollout: data\.init_args\.batch_size \(4\) "
        r"x model\.init_args\.samples_per_prompt \(2\) = 8 sequences"
    )):
        update.check_rollout(batch_size=4, samples_per_prompt=2)


@pytest.mark.parametrize(("change", "says"), [
    ({"iterations": 0}, r"iterations must be >= 1 \(got 0\)"),
    ({"samples_per_prompt": 0}, r"samples_per_prompt must be >= 1 \(got 0\)"),
])
def test_ppo_module_refuses_zero_iterations_or_samples(tiny_policy_dir, change, says):
    with pytest.raises(ValueError, match=says):
        PPOModule(base=ModelSettings(str(tiny_policy_dir), lora=LoraSettings(r=4)), **change)


def test_ppo_fit_refuses_a_minibatch_larger_than_the_rollout_before_loading(tmp_path, tiny_policy_dir):
    """Silently one minibatch of the whole rollout before; needs the data module, so it is
    checked when fitting starts (before the policy is loaded)."""
    module = PPOModule(
        base=ModelSettings(str(tiny_policy_dir), lora=LoraSettings(r=4)),
        sampling=SamplingSettings(max_new_tokens=4), update=UpdateSettings(minibatch_size=16),
        samples_per_prompt=2, iterations=1, output_dir=str(tmp_path / "out"),
    )
    module.scorer = lambda ids, mask: ids.new_zeros(ids.shape[0]).float()
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Story {i}."}) + "\n" for i in range(8)))
    data = PromptDataModule(train=DataSource(str(path)), val_fraction=0.0, batch_size=4,
                            max_length=32, max_prompt_length=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"update\.minibatch_size \(16\) is larger than the rollout: "
                                         r"data\.init_args\.batch_size \(4\) x model\.init_args\."
                                         r"samples_per_prompt \(2\) = 8 sequences"):
        trainer.fit(module, datamodule=data)
    assert module.model is None  # refused before the policy was loaded
    assert not (tmp_path / "out").exists()
