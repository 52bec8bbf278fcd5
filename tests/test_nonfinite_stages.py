"""Non-finite guards of the SFT and reward-model stages (any :class:`rlhf.stage.StageModule`
with automatic optimisation): a NaN/inf loss, or trainable weights left NaN/inf by an optimizer
step, stop the run with one error naming the stage, the step and what went non-finite; the
stage output (and its completeness marker) is never written with non-finite tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from resume_runs import one_thread

from rlhf.data.datamodules import ComparisonDataModule, DemonstrationDataModule
from rlhf.data.sources import DataSource
from rlhf.guards import NonFiniteError
from rlhf.models.loading import LoraSettings, ModelSettings
from rlhf.outputs import read_stage_marker
from rlhf.rm import RewardModule
from rlhf.sft import SFTModule

NAN = float("nan")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def demonstrations(root: Path) -> DemonstrationDataModule:
    rows = [{"prompt": f"Say the word {i % 4}.", "response": f"word {i % 4} word"} for i in range(16)]
    return DemonstrationDataModule(train=DataSource(write_jsonl(root / "demos.jsonl", rows)),
                                   val_fraction=0.0, batch_size=8, max_length=64, max_prompt_length=48)


def comparisons(root: Path) -> ComparisonDataModule:
    rows = [{"prompt": f"Question {i}: what should I eat?", "chosen": f"An apple {i}.",
             "rejected": f"A stone {i}."} for i in range(8)]
    return ComparisonDataModule(train=DataSource(write_jsonl(root / "prefs.jsonl", rows)),
                                val_fraction=0.0, batch_size=4, max_length=48, max_prompt_length=32)


def fit(module: L.LightningModule, data: L.LightningDataModule, root: Path, steps: int,
        *callbacks: L.Callback) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, callbacks=list(callbacks))
    torch.manual_seed(0)
    with one_thread():
        trainer.fit(module, datamodule=data)
    return trainer


def assert_no_output(root: Path, out: Path) -> None:
    assert not out.exists() and read_stage_marker(out) is None
    assert not list(root.glob(f".{out.name}.*")), "a temporary output directory was left behind"


class NaNAfterStep(L.Callback):
    """Makes the first trainable tensor named ``like`` NaN after every optimizer step."""

    def __init__(self, like: str) -> None:
        self.like = like

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        name, param = next((n, p) for n, p in pl_module.named_trainable_parameters() if self.like in n)
        self.name = name
        trainer.optimizers[0].register_step_post_hook(lambda *_: param.data.fill_(NAN))


def test_sft_at_a_huge_lr_stops_on_the_nan_loss_and_writes_no_model(tmp_path, tiny_model_dir):
    """The reproduction: lr 1e20 makes the loss NaN from step 1; the run used to go on, exit 0
    and save a merged model with 14 of 20 tensors non-finite and a complete marker."""
    out = tmp_path / "sft_out"
    module = SFTModule(ModelSettings(str(tiny_model_dir), lora=LoraSettings(r=4)), lr=1e20,
                       output_dir=str(out))
    with pytest.raises(NonFiniteError, match=r"^SFT step 1: loss is nan; stopping before the optimizer "
                                             r"step\. Lower the learning rate \(model\.init_args\.lr = 1e\+20\)"):
        fit(module, demonstrations(tmp_path), tmp_path, steps=4)
    assert_no_output(tmp_path, out)


class InfAtTheEnd(L.Callback):
    """Makes the first tensor named ``like`` (trainable or frozen) inf when training ends,
    before the stage saves its outputs."""

    def __init__(self, like: str) -> None:
        self.like = like

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        with torch.no_grad():
            next(p for n, p in pl_module.named_parameters() if self.like in n).fill_(math.inf)


END_OF_TRAINING = (r"^SFT at the end of training \(step 1\): 1 of \d+ trainable tensors non-finite before saving "
                   r"the outputs \(first: model\.base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B")
SAVED = (r"^SFT: 1 of \d+ saved tensors non-finite \(first: model/model\.safetensors: "
         r"model\.layers\.0\.mlp\.down_proj\.weight\); the outputs are not written")


@pytest.mark.parametrize(("like", "says"), [("lora_B", END_OF_TRAINING), ("down_proj.base_layer", SAVED)])
def test_sft_never_saves_nonfinite_tensors(tmp_path, tiny_model_dir, like, says):
    """Checked twice: the trainable weights before saving, and every saved tensor (a frozen
    base tensor, or a merge that overflows) before the marker is written."""
    out = tmp_path / "sft_out"
    module = SFTModule(ModelSettings(str(tiny_model_dir), lora=LoraSettings(r=4)), output_dir=str(out))
    with pytest.raises(NonFiniteError, match=says):
        fit(module, demonstrations(tmp_path), tmp_path, 1, InfAtTheEnd(like))
    assert_no_output(tmp_path, out)


def test_rm_stops_when_a_step_leaves_weights_nonfinite(tmp_path, tiny_model_dir):
    out = tmp_path / "rm_out"
    module = RewardModule(ModelSettings(str(tiny_model_dir), lora=LoraSettings(r=4)), lr=1e-3,
                          output_dir=str(out))
    nan = NaNAfterStep("score_head")
    with pytest.raises(NonFiniteError) as info:
        fit(module, comparisons(tmp_path), tmp_path, 3, nan)
    total = len(module.named_trainable_parameters())
    assert str(info.value).startswith(
        f"RM step 0: 1 of {total} trainable tensors non-finite after the optimizer step (first: {nan.name})"
    )
    assert_no_output(tmp_path, out)


def test_weights_check_names_the_stage_place_and_first_tensor(tiny_model_dir):
    module = SFTModule(ModelSettings(str(tiny_model_dir), lora=LoraSettings(r=4)))
    module.configure_model()
    module.check_weights_finite()  # all finite: nothing happens
    named = module.named_trainable_parameters()
    with torch.no_grad():
        named[3][1].fill_(math.inf)
        named[5][1][0] = NAN
    where = {"iteration": 2, "epoch": 0, "minibatch": 1}
    with pytest.raises(NonFiniteError, match=(
        rf"^SFT iteration 2, epoch 0, minibatch 1: 2 of {len(named)} trainable tensors non-finite "
        rf"after the optimizer step \(first: {named[3][0]}\)"
    )):
        module.check_weights_finite(where)
    with pytest.raises(NonFiniteError, match=r"^SFT step 0: loss is inf"):
        module.check_loss_finite(torch.tensor(math.inf))
