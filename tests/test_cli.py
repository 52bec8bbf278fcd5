"""``rlhf.fit`` end to end on the tiny model: SFT -> RM -> PPO through LightningCLI configs."""

import json

import pytest
import yaml

from rlhf.fit import main
from rlhf.outputs import read_stage_marker
from stage_configs import ppo_config, rm_config, sft_config, tiny_data_files


def run(tmp_path, name, config):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["--config", str(path)])


def test_sft_rm_ppo_pipeline_through_the_cli(tmp_path, tiny_model_dir):
    files = tiny_data_files(tmp_path)
    run(tmp_path, "sft", sft_config(tmp_path, str(tiny_model_dir), files["demos"]))
    marker = read_stage_marker(tmp_path / "out/sft")
    assert marker["stage"] == "sft" and "val/loss" in marker["metrics_before_fit"]
    sft_model = str(tmp_path / "out/sft/model")

    run(tmp_path, "rm", rm_config(tmp_path, sft_model, files["prefs"]))
    assert read_stage_marker(tmp_path / "out/rm")["stage"] == "rm"

    cli = run(tmp_path, "ppo", ppo_config(tmp_path, sft_model, files["prompts"]))
    # The RM was a LoRA adapter on the same SFT base: PPO shares that base.
    assert type(cli.model.scorer).__name__ == "SharedBaseScorer"
    assert cli.model.iteration == 2
    marker = read_stage_marker(tmp_path / "out/ppo")
    assert marker["stage"] == "ppo" and marker["model_dir"] == "model"
    assert "reward/mean" in marker["metrics"] and "kl/coef" in marker["metrics"]
    samples = (tmp_path / "runs/ppo/samples.jsonl").read_text().splitlines()
    assert len(samples) >= 2 and set(json.loads(samples[0])) == {"iteration", "prompt", "response", "reward", "kl"}


def test_unknown_config_key_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "bad", {
            "model": {"class_path": "rlhf.sft.SFTModule", "init_args": {
                "base": {"name_or_path": str(tiny_model_dir)}, "learning_rate": 1.0}},
            "data": {"class_path": "rlhf.data.DemonstrationDataModule",
                     "init_args": {"train": {"path": "x.jsonl"}}},
        })
    assert "learning_rate" in capsys.readouterr().err


def test_known_harmless_warnings_are_filtered_and_others_still_show():
    import warnings

    from lightning.pytorch.utilities._pytree import _tree_flatten

    from rlhf.console import quiet_known_warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_warnings()
        _tree_flatten(1)  # Lightning's pytree helper: torch's LeafSpec deprecation
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no ...")
        warnings.warn("some other API is deprecated", FutureWarning)
        warnings.warn("Using ModelCheckpoint wrongly")
        warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning)  # another category
    assert [(str(w.message), w.category) for w in caught] == [
        ("some other API is deprecated", FutureWarning),
        ("Using ModelCheckpoint wrongly", UserWarning),
        ("`is_gradient_checkpointing` is deprecated", UserWarning),
    ]


def test_lightnings_litlogger_tip_is_dropped_and_its_other_messages_kept():
    import logging

    from rlhf.console import quiet_known_warnings

    quiet_known_warnings()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def record(msg):
        return logging.LogRecord(rank_zero.name, logging.INFO, __file__, 1, msg, None, None)

    assert not rank_zero.filter(record("💡 Tip: For seamless cloud logging and experiment tracking, try ..."))
    assert rank_zero.filter(record("GPU available: False, used: False"))


def test_the_default_model_summary_becomes_one_line(caplog):
    import logging

    import torch
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelSummary

    from rlhf.console import CompactModelSummary, use_compact_model_summary

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.frozen = torch.nn.Linear(4, 2).requires_grad_(False)  # 10 params
            self.head = torch.nn.Linear(2, 1)  # 3 params
            self.no_params = torch.nn.ReLU()

    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    use_compact_model_summary(trainer)
    summaries = [c for c in trainer.callbacks if isinstance(c, ModelSummary)]
    assert [type(c) for c in summaries] == [CompactModelSummary]
    with caplog.at_level(logging.INFO, logger="rlhf.console"):
        summaries[0].on_fit_start(trainer, Tiny())
    assert [r.getMessage() for r in caplog.records if r.name == "rlhf.console"] == [
        "Tiny: 13 params, 3 trainable (frozen Linear 10, head Linear 3)"
    ]

    quiet = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False)
    use_compact_model_summary(quiet)
    assert not [c for c in quiet.callbacks if isinstance(c, ModelSummary)]
    deep = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[ModelSummary(max_depth=2)])
    use_compact_model_summary(deep)
    assert [type(c) for c in deep.callbacks if isinstance(c, ModelSummary)] == [ModelSummary]
