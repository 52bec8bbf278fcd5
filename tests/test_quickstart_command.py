"""``rlhf-quickstart`` without running a model: it prepares the model, then runs the quickstart
pipeline offline (unless the environment says otherwise), from the repository root only; and
the tests themselves run offline by default (tests/conftest.py)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from rlhf import quickstart

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """What ``rlhf-quickstart`` asked of ``prepare`` and ``rlhf.pipeline.main``, in order, with
    the environment each saw."""
    seen: list[tuple] = []

    def env() -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in quickstart.OFFLINE_DEFAULTS}

    def prepare(out_dir: Path) -> Path:
        seen.append(("prepare", out_dir, env()))
        return out_dir

    def pipeline(argv: list[str]) -> int:
        seen.append(("pipeline", argv, env()))
        return 0

    monkeypatch.setattr("rlhf.models.prepare.prepare", prepare)
    monkeypatch.setattr("rlhf.pipeline.main", pipeline)
    return seen


def test_prepares_the_model_then_runs_the_pipeline_offline(tmp_path, monkeypatch, calls):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/quickstart.yaml").write_text("stages: []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's own setting wins

    assert quickstart.main(["--force", "--from", "ppo"]) == 0
    offline = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "online"}
    assert calls == [
        ("prepare", Path("models/SmolLM2-135M-Instruct"), offline),
        ("pipeline", ["--config", "configs/quickstart.yaml", "--force", "--from", "ppo"], offline),
    ]


def test_outside_the_repository_root_is_a_clear_error(tmp_path, monkeypatch, capsys, calls):
    monkeypatch.chdir(tmp_path)
    assert quickstart.main([]) == 2
    assert "run rlhf-quickstart from the repository root" in capsys.readouterr().err
    assert calls == []


def test_help_and_bad_arguments_stop_before_the_model_is_fetched(monkeypatch, capsys, calls):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:
        quickstart.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rlhf-quickstart" in out and "--from NAME" in out and "--config" not in out
    with pytest.raises(SystemExit) as done:
        quickstart.main(["--forse"])
    assert done.value.code == 2 and "unrecognized arguments: --forse" in capsys.readouterr().err
    assert calls == []


def test_the_console_script_points_at_main():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["rlhf-quickstart"].partition(":")
    assert getattr(importlib.import_module(module), name) is quickstart.main
    assert (ROOT / quickstart.CONFIG).is_file()


def test_tests_run_offline_unless_the_environment_says_otherwise():
    # conftest sets the defaults before huggingface_hub is imported, which reads them once.
    from huggingface_hub import constants

    offline = os.environ["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}
    assert constants.HF_HUB_OFFLINE == offline
    assert os.environ["WANDB_MODE"]
