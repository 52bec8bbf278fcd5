"""NaN/inf guards in PPO: a minibatch update with a non-finite reward, advantage, loss or
gradient is skipped and counted; too many in a row stop the run, naming what went non-finite."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from resume_runs import one_thread

from rlhf.data.datamodules import PromptDataModule
from rlhf.data.sources import DataSource
from rlhf.models.loading import LoraSettings, ModelSettings
from rlhf.guards import NonFiniteError, NonFiniteGuard, gradients_finite, nonfinite_names
from rlhf.ppo.module import PPOModule
from rlhf.generation import SamplingSettings
from rlhf.ppo.settings import UpdateSettings

NAN = float("nan")


class Scorer:
    """Token-count reward; calls (iterations) listed in ``nan_calls`` give row 0 a NaN."""

    def __init__(self, nan_calls=()) -> None:
        self.nan_calls = set(nan_calls)
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        scores = ((input_ids % 8 == 0) & attention_mask.bool()).sum(dim=1).float()
        if self.calls in self.nan_calls or "all" in self.nan_calls:
            scores[0] = NAN
        self.calls += 1
        return scores


def make_module(model_dir, tmp_path, iterations=3, nan_calls=(), **update):
    module = PPOModule(
        base=ModelSettings(str(model_dir), lora=LoraSettings(r=4)),
        sampling=SamplingSettings(max_new_tokens=4, temperature=1.0),
        update=UpdateSettings(**{"ppo_epochs": 1, "minibatch_size": 4, **update}),
        lr=1e-2, iterations=iterations, sample_every=0, output_dir=str(tmp_path / "out"),
    )
    module.scorer = Scorer(nan_calls)
    return module


class Record(L.Callback):
    """Logged metrics per iteration, and the trainable weights before/after each one."""

    def __init__(self) -> None:
        self.history, self.before, self.after = [], [], []

    def _weights(self, module):
        return torch.cat([p.detach().flatten().clone() for p in module.trainable_parameters()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._weights(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._weights(pl_module))
        self.history.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, tmp_path, *callbacks):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell me story {i}."}) + "\n" for i in range(8)))
    data = PromptDataModule(train=DataSource(str(path)), val_fraction=0.0, batch_size=8,
                            max_length=32, max_prompt_length=16)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=list(callbacks))
    torch.manual_seed(0)
    with one_thread():
        trainer.fit(module, datamodule=data)
    return trainer


def test_nonfinite_names_and_guard_counting():
    assert nonfinite_names({"a": torch.ones(2), "b": torch.tensor([1.0, math.inf]), "c": None,
                            "d": torch.tensor([[NAN]])}) == ["b", "d"]
    guard = NonFiniteGuard(max_consecutive=2)
    guard.bad(["loss"], iteration=0)
    guard.good()
    guard.bad(["reward"], iteration=1)
    assert (guard.consecutive, guard.skipped, guard.names) == (1, 2, ["reward"])
    with pytest.raises(NonFiniteError, match=r"non-finite reward and kl in PPO \(last at iteration 2\)"):
        guard.bad(["kl"], iteration=2)
    never = NonFiniteGuard(max_consecutive=0)
    for _ in range(100):
        never.bad(["loss"])
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, NAN, 0.0])
    assert not gradients_finite([param]) and gradients_finite([torch.nn.Parameter(torch.ones(1))])
    param.grad = torch.tensor([1e30, 1.0, 0.0])  # huge is not non-finite
    assert gradients_finite([param])


def test_a_nan_reward_skips_and_counts_that_iterations_updates(tmp_path, tiny_policy_dir):
    module = make_module(tiny_policy_dir, tmp_path, iterations=3, nan_calls=[1])
    record = Record()
    fit(module, tmp_path, record)
    skipped = [h["nonfinite/skipped"] for h in record.history]
    assert skipped == [0.0, 2.0, 0.0]  # 2 minibatches of 4 in iteration 1
    assert record.history[-1]["nonfinite/skipped_total"] == 2.0
    assert math.isnan(record.history[1]["policy/loss"]) and math.isfinite(record.history[2]["policy/loss"])
    assert torch.equal(record.before[1], record.after[1])  # no update from the NaN rollout
    assert not torch.equal(record.before[2], record.after[2])
    assert torch.isfinite(record.after[2]).all()
    assert module.nonfinite.consecutive == 0 and module.iteration == 3
    assert (tmp_path / "out").is_dir()  # the run finished normally


class NaNGradient(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.trainable_parameters()[0].register_hook(lambda grad: torch.full_like(grad, NAN))


class NaNValueHead(L.Callback):
    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            pl_module.value_head.bias.fill_(NAN)


@pytest.mark.parametrize(("what", "nan_calls", "update", "callbacks"), [
    ("reward", ["all"], {}, []),
    ("loss", [], {"entropy_coef": NAN}, []),
    ("gradient", [], {}, [NaNGradient()]),
    ("advantage", [], {}, [NaNValueHead()]),
])
def test_consecutive_nonfinite_updates_stop_the_run_naming_what(
    tmp_path, tiny_policy_dir, what, nan_calls, update, callbacks
):
    module = make_module(tiny_policy_dir, tmp_path, iterations=5, nan_calls=nan_calls,
                         max_nonfinite_steps=3, **update)
    with pytest.raises(NonFiniteError) as info:
        fit(module, tmp_path, *callbacks)
    message = str(info.value)
    assert f"non-finite {what}" in message
    assert "iteration 1" in message and "max_nonfinite_steps = 3" in message  # 2 + 1 bad updates
    assert module.nonfinite.skipped == 3
    assert not (tmp_path / "out").exists()  # no stage output from a failed run


class NaNPolicyAfterStep(L.Callback):
    """Makes a policy LoRA weight NaN after each optimizer step (the step itself was finite)."""

    def on_train_start(self, trainer, pl_module):
        self.name, param = next((n, p) for n, p in pl_module.named_trainable_parameters()
                                if ".lora_B.policy." in n)
        trainer.optimizers[0].register_step_post_hook(lambda *_: param.data.fill_(NAN))


def test_a_step_that_leaves_the_weights_nonfinite_stops_the_run_naming_it(tmp_path, tiny_policy_dir):
    """The gradient guard passed such a step; the next rollout then drew token id = vocab size
    and failed with an unrelated index error."""
    module = make_module(tiny_policy_dir, tmp_path, iterations=3)
    nan = NaNPolicyAfterStep()
    with pytest.raises(NonFiniteError) as info:
        fit(module, tmp_path, nan)
    total = len(module.trainable_parameters())
    assert str(info.value).startswith(
        f"PPO iteration 0, epoch 0, minibatch 0: 1 of {total} trainable tensors non-finite "
        f"after the optimizer step (first: {nan.name})"
    )
    assert not (tmp_path / "out").exists()


class NaNPolicy(L.Callback):
    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            next(p for n, p in pl_module.named_parameters() if ".lora_B.policy." in n).fill_(NAN)


def test_a_nonfinite_policy_is_refused_by_the_sampler(tmp_path, tiny_policy_dir):
    module = make_module(tiny_policy_dir, tmp_path, iterations=2)
    with pytest.raises(NonFiniteError, match="cannot sample the next token: the logits of 8 of 8 rows"):
        fit(module, tmp_path, NaNPolicy())
    assert not (tmp_path / "out").exists()
