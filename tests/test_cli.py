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
