"""``rlhf.fit`` end to end on the tiny model: SFT -> RM -> PPO through LightningCLI configs."""

import json

import pytest
import yaml

from rlhf.fit import main
from rlhf.outputs import read_stage_marker


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def trainer_args(root, steps):
    return {
        "accelerator": "cpu",
        "max_steps": steps,
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root), "name": "csv"}},
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(root),
        "num_sanity_val_steps": 0,
        "val_check_interval": steps,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 1,
    }


def run(tmp_path, name, config):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["--config", str(path)])


def test_sft_rm_ppo_pipeline_through_the_cli(tmp_path, tiny_model_dir):
    demos = write(tmp_path / "demos.jsonl",
                  [{"prompt": f"q{i}", "response": f"answer {i}"} for i in range(12)])
    prefs = write(tmp_path / "prefs.jsonl",
                  [{"prompt": f"q{i}", "chosen": "good answer", "rejected": "bad"} for i in range(12)])
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}"} for i in range(12)])
    data = {"val_fraction": 0.25, "batch_size": 4, "max_length": 48, "max_prompt_length": 24}

    run(tmp_path, "sft", {
        "seed_everything": 0, "validate_before_fit": True,
        "trainer": trainer_args(tmp_path / "runs/sft", 2),
        "model": {"class_path": "rlhf.sft.SFTModule", "init_args": {
            "base": {"name_or_path": str(tiny_model_dir), "lora": {"r": 4}},
            "output_dir": str(tmp_path / "out/sft")}},
        "data": {"class_path": "rlhf.data.DemonstrationDataModule",
                 "init_args": {"train": {"path": demos}, **data}},
    })
    marker = read_stage_marker(tmp_path / "out/sft")
    assert marker["stage"] == "sft" and "val/loss" in marker["metrics_before_fit"]
    sft_model = str(tmp_path / "out/sft/model")

    run(tmp_path, "rm", {
        "seed_everything": 0,
        "trainer": trainer_args(tmp_path / "runs/rm", 2),
        "model": {"class_path": "rlhf.rm.RewardModule", "init_args": {
            "base": {"name_or_path": sft_model, "lora": {"r": 4}},
            "output_dir": str(tmp_path / "out/rm")}},
        "data": {"class_path": "rlhf.data.ComparisonDataModule",
                 "init_args": {"train": {"path": prefs}, **data}},
    })
    assert read_stage_marker(tmp_path / "out/rm")["stage"] == "rm"

    cli = run(tmp_path, "ppo", {
        "seed_everything": 0,
        "trainer": {**trainer_args(tmp_path / "runs/ppo", 2), "max_steps": -1, "max_epochs": -1},
        "model": {"class_path": "rlhf.ppo.PPOModule", "init_args": {
            "base": {"name_or_path": sft_model, "lora": {"r": 4}},
            "reward": {"model": str(tmp_path / "out/rm")},
            "sampling": {"max_new_tokens": 6},
            "update": {"ppo_epochs": 1},
            "iterations": 2, "sample_every": 1,
            "output_dir": str(tmp_path / "out/ppo")}},
        "data": {"class_path": "rlhf.data.PromptDataModule",
                 "init_args": {"train": {"path": prompts}, **data}},
    })
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
