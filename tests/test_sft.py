"""SFT on the tiny model: it learns, and its saved outputs load back to the same model."""

import json

import lightning as L
import torch

from rlhf.data.datamodules import DemonstrationDataModule
from rlhf.data.sources import DataSource
from rlhf.models.loading import LoraSettings, ModelSettings, load_causal_lm
from rlhf.outputs import read_stage_marker
from rlhf.sft import SFTModule


def make_data(tmp_path, n=32):
    rows = [{"prompt": f"Say the word {i % 4}.", "response": f"word {i % 4} word"} for i in range(n)]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DemonstrationDataModule(
        train=DataSource(str(path)), val_fraction=0.25, batch_size=8, max_length=64,
        max_prompt_length=48,
    )


def fit(module, data, steps, root):
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        num_sanity_val_steps=0, val_check_interval=steps, check_val_every_n_epoch=None,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def test_sft_lowers_validation_loss_and_saves_merged_model(tmp_path, tiny_model_dir):
    torch.manual_seed(0)
    data = make_data(tmp_path)
    out = tmp_path / "sft_out"
    module = SFTModule(
        ModelSettings(tiny_model_dir, lora=LoraSettings(r=8, alpha=16)),
        lr=3e-3, output_dir=str(out),
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer = fit(module, data, 30, tmp_path)
    after = float(trainer.callback_metrics["val/loss"])
    assert after < before - 0.5, (before, after)
    perplexity = float(trainer.callback_metrics["val/perplexity"])
    assert abs(perplexity - torch.exp(torch.tensor(after)).item()) < 1e-3 * perplexity

    marker = read_stage_marker(out)
    assert marker["stage"] == "sft" and marker["model_dir"] == "model"
    assert (out / "adapter" / "adapter_config.json").is_file()
    # The merged model on disk computes what the trained module computes.
    reloaded = load_causal_lm(ModelSettings(str(out / "model"))).eval()
    batch = next(iter(data.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"])
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".sft_out.tmp-*")), "temporary output dir left behind"


def test_checkpoint_holds_only_trainable_tensors_and_resumes(tmp_path, tiny_model_dir):
    data = make_data(tmp_path)
    module = SFTModule(ModelSettings(tiny_model_dir, lora=LoraSettings(r=4)), lr=1e-3)
    trainer = fit(module, data, 2, tmp_path)
    ckpt = tmp_path / "c.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), sorted(state)[:3]
    resumed = SFTModule(ModelSettings(tiny_model_dir, lora=LoraSettings(r=4)), lr=1e-3)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(resumed, datamodule=data, ckpt_path=str(ckpt))
    assert trainer.global_step == 3
