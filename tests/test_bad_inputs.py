"""Bad inputs through ``rlhf.fit`` end to end: each bad data row or config gives an error that
names the place (file, line and field; config key; path), and no output directory is left.

The data layer's own tests (``test_data_loading.py``) cover every bad-row kind one by one; this
table checks that each class of problem reaches the user of the CLI intact.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from rlhf.data.errors import DataError
from rlhf.fit import main
from rlhf.models.loading import ModelNotFoundError

GOOD = {
    "demos": {"prompt": "q", "response": "an answer"},
    "prefs": {"prompt": "q", "chosen": "good", "rejected": "bad"},
    "prompts": {"prompt": "q"},
}
STAGES = {
    "demos": ("rlhf.sft.SFTModule", "rlhf.data.DemonstrationDataModule"),
    "prefs": ("rlhf.rm.RewardModule", "rlhf.data.ComparisonDataModule"),
    "prompts": ("rlhf.ppo.PPOModule", "rlhf.data.PromptDataModule"),
}


@dataclass
class Case:
    """A run of ``stage`` whose data file gets ``bad_line`` as line 2 and whose config is
    changed by ``change(config, root)``; it must raise ``error`` with all of ``says`` (``{root}``
    is the test's directory) in its message (stderr for config errors)."""

    stage: str
    error: type[BaseException]
    says: list[str]
    bad_line: bytes | dict[str, Any] | None = None
    change: Callable[[dict[str, Any], Path], None] = lambda config, root: None
    data: dict[str, Any] = field(default_factory=dict)


def init_args(config: dict[str, Any]) -> dict[str, Any]:
    return config["model"]["init_args"]


def set_model(path_of: Callable[[Path], Path]) -> Callable[[dict[str, Any], Path], None]:
    def change(config: dict[str, Any], root: Path) -> None:
        init_args(config)["base"]["name_or_path"] = str(path_of(root))

    return change


def tokenizer_without_pad_or_eos(root: Path) -> Path:
    out = root / "no-pad-model"
    shutil.copytree(root / "model", out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(pad_token=None, eos_token=None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token is None and tokenizer.eos_token is None
    return out


LONG_PROMPT = {"prompt": "tell me a story " * 200}  # ~800 tokens: longer than the 512 context

CASES = {
    "missing field": Case("demos", DataError, ["{root}/demos.jsonl: line 2: field 'response': missing field"],
                          bad_line={"prompt": "q"}),
    "wrong type": Case("demos", DataError, ["demos.jsonl: line 2: field 'response'", "expected a string, got int"],
                       bad_line={"prompt": "q", "response": 42}),
    "empty string": Case("demos", DataError, ["demos.jsonl: line 2: field 'prompt': empty string"],
                         bad_line={"prompt": "  ", "response": "a"}),
    "not UTF-8": Case("demos", DataError, ["demos.jsonl: line 2: not valid UTF-8"],
                      bad_line=b'{"prompt": "caf\xe9", "response": "a"}'),
    "ranking of one": Case("prefs", DataError, ["prefs.jsonl: line 2: field 'completions'", "at least 2 completions"],
                           bad_line={"prompt": "q", "completions": ["the only one"]}),
    "pair identical after truncation": Case(
        "prefs", DataError, [("{root}/prefs.jsonl: field 'rejected': chosen and rejected are identical after "
                              "truncation to max_length = 48 tokens"), "data.init_args.on_bad_row"],
        bad_line={"prompt": "q", "chosen": "word " * 60 + "good", "rejected": "word " * 60 + "bad"}),
    "negative KL coefficient": Case(
        "prompts", ValueError, ["kl.coef must be a finite number >= 0 (got -0.1)"],
        change=lambda config, root: init_args(config).update(kl={"coef": -0.1})),
    "zero PPO iterations": Case("prompts", ValueError, ["iterations must be >= 1 (got 0)"],
                                change=lambda config, root: init_args(config).update(iterations=0)),
    "prompt longer than the context": Case(
        "prompts", ValueError,
        ["data.init_args.max_prompt_length (500) + model.init_args.sampling.max_new_tokens (64) = 564 tokens",
         "max_position_embeddings = 512"],
        bad_line=LONG_PROMPT, data={"max_prompt_length": 500, "max_length": 600},
        change=lambda config, root: init_args(config).update(sampling={"max_new_tokens": 64})),
    "sequence longer than the context": Case(
        "demos", ValueError, ["data.init_args.max_length = 1024 tokens", "max_position_embeddings = 512"],
        bad_line={**LONG_PROMPT, "response": "the end"}, data={"max_length": 1024}),
    "unknown config key": Case("demos", SystemExit, ["learning_rate"],
                               change=lambda config, root: init_args(config).update(learning_rate=1.0)),
    "wrong config type": Case("demos", SystemExit, ["lr", "fast"],
                              change=lambda config, root: init_args(config).update(lr="fast")),
    "reward model missing": Case(
        "prompts", FileNotFoundError, ["model.init_args.reward.model: {root}/no-rm does not exist"],
        change=lambda config, root: init_args(config).update(reward={"model": str(root / "no-rm")})),
    "reward model path is not one": Case(
        "prompts", FileNotFoundError,
        ["model.init_args.reward.model: {root}/model is not a saved reward model (no reward_model.json)"],
        change=lambda config, root: init_args(config).update(reward={"model": str(root / "model")})),
    "base model missing": Case("demos", ModelNotFoundError, ["Model path '{root}/no-model' does not exist"],
                               change=set_model(lambda root: root / "no-model")),
    "tokenizer without pad or EOS": Case(
        "demos", ValueError, ["Tokenizer {root}/no-pad-model has neither a pad nor an EOS token"],
        change=set_model(tokenizer_without_pad_or_eos)),
    "data file missing": Case("demos", FileNotFoundError, ["{root}/missing.jsonl"],
                              change=lambda config, root: config["data"]["init_args"].update(
                                  train={"path": str(root / "missing.jsonl")})),
}


def write_data(path: Path, kind: str, bad_line: bytes | dict[str, Any] | None) -> None:
    lines = [json.dumps(GOOD[kind]).encode()] * 3
    if bad_line is not None:
        lines[1] = bad_line if isinstance(bad_line, bytes) else json.dumps(bad_line).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")


def stage_config(root: Path, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    module, datamodule = STAGES[kind]
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(root / "run"), "limit_val_batches": 0},
        "model": {"class_path": module, "init_args": {
            "base": {"name_or_path": str(root / "model"), "lora": {"r": 4}},
            "output_dir": str(root / "out")}},
        "data": {"class_path": datamodule, "init_args": {
            "train": {"path": str(root / f"{kind}.jsonl")}, "val_fraction": 0.0, "batch_size": 2,
            "max_length": 48, "max_prompt_length": 24, **data}},
    }


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_names_the_place_and_leaves_no_output(name, tmp_path, tiny_model_dir, capsys):
    case = CASES[name]
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    write_data(tmp_path / f"{case.stage}.jsonl", case.stage, case.bad_line)
    config = stage_config(tmp_path, case.stage, case.data)
    case.change(config, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))

    with pytest.raises(case.error) as info:
        main(["--config", str(path)])

    message = capsys.readouterr().err if case.error is SystemExit else str(info.value)
    for expected in case.says:
        assert expected.format(root=tmp_path) in message, message[-2000:]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a temporary output directory was left behind"
