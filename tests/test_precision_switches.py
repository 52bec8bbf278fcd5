"""The memory switches as config keys, through ``rlhf.fit``: ``trainer.precision: bf16-mixed``
really runs the matmuls in bf16, and ``base.gradient_checkpointing: true`` really recomputes
the decoder layers in the backward pass, in every stage."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from stage_configs import ppo_config, rm_config, sft_config, tiny_data_files

from rlhf.fit import main


class LayerProbe(L.Callback):
    """Counts grad-enabled calls of the first decoder layer's attention query projection inside
    training steps (the recomputation of checkpointing included) and records its output dtypes."""

    def __init__(self) -> None:
        self.calls = 0
        self.dtypes: set[torch.dtype] = set()
        self._in_step = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layer = next(m for n, m in pl_module.named_modules() if n.endswith("layers.0"))
        proj = next(m for n, m in layer.named_modules() if n.endswith("q_proj.base_layer"))
        # transformers checkpoints the layer's ``forward`` (its own hooks run once), and the
        # recomputation may stop early: count the projection's pre-hook, first in the layer.
        proj.register_forward_pre_hook(self._layer_called)
        proj.register_forward_hook(self._projected)

    def _layer_called(self, *_: object) -> None:
        if self._in_step and torch.is_grad_enabled():
            self.calls += 1

    def _projected(self, _module: object, _inputs: object, output: torch.Tensor) -> None:
        if self._in_step and torch.is_grad_enabled():
            self.dtypes.add(output.dtype)

    def on_train_batch_start(self, *_: object) -> None:
        self._in_step = True

    def on_train_batch_end(self, *_: object) -> None:
        self._in_step = False


def fit(root: Path, name: str, config: dict, bf16: bool, checkpointing: bool) -> tuple[LayerProbe, float]:
    """Fit ``config`` with the switches set; the probe and the last training loss."""
    config["trainer"]["precision"] = "bf16-mixed" if bf16 else "32-true"
    config["trainer"]["callbacks"] = [{"class_path": f"{__name__}.LayerProbe"}]
    config["model"]["init_args"]["base"]["gradient_checkpointing"] = checkpointing
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["--config", str(path)])
    probe = next(c for c in cli.trainer.callbacks if isinstance(c, LayerProbe))
    metrics = cli.trainer.callback_metrics
    loss = metrics["train/loss"] if "train/loss" in metrics else metrics["policy/loss"]
    return probe, float(loss)


def run_recipe(root: Path, model: str, bf16: bool, checkpointing: bool) -> dict[str, tuple[LayerProbe, float]]:
    """SFT, RM and PPO (on that RM), one step / iteration each."""
    data = tiny_data_files(root)
    return {
        "sft": fit(root, "sft", sft_config(root, model, data["demos"], steps=1), bf16, checkpointing),
        "rm": fit(root, "rm", rm_config(root, model, data["prefs"], steps=1), bf16, checkpointing),
        "ppo": fit(root, "ppo", ppo_config(root, model, data["prompts"], iterations=1), bf16, checkpointing),
    }


@pytest.fixture(scope="module")
def plain_and_switched(tmp_path_factory, tiny_model_dir):
    plain = run_recipe(tmp_path_factory.mktemp("plain"), str(tiny_model_dir), bf16=False, checkpointing=False)
    switched = run_recipe(tmp_path_factory.mktemp("switched"), str(tiny_model_dir), bf16=True, checkpointing=True)
    return plain, switched


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_bf16_mixed_and_gradient_checkpointing_switches(plain_and_switched, stage):
    plain, switched = plain_and_switched[0][stage], plain_and_switched[1][stage]
    (plain_probe, plain_loss), (switched_probe, switched_loss) = plain, switched
    assert plain_probe.dtypes == {torch.float32}
    assert switched_probe.dtypes == {torch.bfloat16}
    # Checkpointing runs each layer once more in the backward pass (the recomputation).
    assert plain_probe.calls > 0
    assert switched_probe.calls == 2 * plain_probe.calls
    assert math.isfinite(plain_loss) and math.isfinite(switched_loss)
    if stage != "ppo":  # same data and seed: bf16 changes the first loss only by rounding
        assert switched_loss == pytest.approx(plain_loss, rel=0.05)
