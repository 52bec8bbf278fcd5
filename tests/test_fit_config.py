"""Reading one setting of a fit run the way LightningCLI will (``rlhf.fit_config``)."""

from __future__ import annotations

import pytest
import yaml

from rlhf.fit_config import FitConfigError, fit_setting, override_value
from rlhf.pipeline import load_pipeline

KEY = "model.init_args.output_dir"


def write(path, output_dir=None):
    init_args = {"lr": 1e-3} if output_dir is None else {"output_dir": output_dir}
    path.write_text(yaml.safe_dump({"model": {"class_path": "m", "init_args": init_args}}))
    return path


def test_the_last_override_wins_in_either_form():
    assert override_value([f"--{KEY}", "a", f"--{KEY}=b", "--lr", "1"], KEY) == "b"
    assert override_value([f"--{KEY}=a", f"--{KEY}", "b"], KEY) == "b"
    assert override_value(["--model.init_args.output_dir_x=a"], KEY) is None
    assert override_value(["--model.init_args.reward.model=[a, b]"], "model.init_args.reward.model") == ["a", "b"]
    with pytest.raises(FitConfigError, match="not a valid list"):
        override_value(["--k=[a, b"], "k")


def test_an_override_beats_the_files_and_the_last_file_that_sets_it_beats_earlier_ones(tmp_path):
    first, second, silent = write(tmp_path / "a.yaml", "out/a"), write(tmp_path / "b.yaml", "out/b"), write(tmp_path / "c.yaml")
    assert fit_setting([first, second], [], KEY) == "out/b"
    assert fit_setting([first, silent], [], KEY) == "out/a"
    assert fit_setting([first, second], [f"--{KEY}", "out/cli"], KEY) == "out/cli"
    assert fit_setting([silent], [], KEY) is None
    assert fit_setting([first], [], "model.init_args.output_dir.deeper") is None


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FitConfigError, match=r"fit config .*nope\.yaml does not exist"):
        fit_setting([tmp_path / "nope.yaml"], [], KEY)
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(FitConfigError, match=r"bad\.yaml is not valid YAML"):
        fit_setting([tmp_path / "bad.yaml"], [], KEY)


def test_a_pipeline_fit_stage_finds_its_output_as_the_fit_will(tmp_path):
    first, silent = write(tmp_path / "a.yaml", "out/a"), write(tmp_path / "c.yaml")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "two_configs", "fit": [str(first), str(silent)]},
        {"name": "space_override", "fit": str(first), "args": [f"--{KEY}", "out/cli"]},
    ]}))
    assert [stage.output.as_posix() for stage in load_pipeline(path)] == ["out/a", "out/cli"]
