"""``rlhf.plot``: dashboard panels as PNG from a run's CSV log."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.plot import PANELS, detect_stage, find_metrics_csv, moving_average, read_metrics, render, series

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_plot_cli_writes_the_ppo_reward_kl_panels(tiny_quickstart, tmp_path):
    out = tmp_path / "plots"
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.plot", str(tiny_quickstart["runs"] / "ppo"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"reward", "kl", "reward_vs_kl", "entropy", "clipfrac", "explained_var", "dashboard"}
    assert {p.stem for p in out.glob("*.png")} == expected
    assert all(is_png(out / f"{name}.png") for name in expected)
    assert result.stdout.split() == [str(out / f"{p.name}.png") for p in PANELS["ppo"]] + [str(out / "dashboard.png")]


def test_plot_reward_model_and_sft_runs(tiny_quickstart, tmp_path):
    rm = render(tiny_quickstart["runs"] / "rm", tmp_path / "rm")
    assert [p.stem for p in rm] == ["loss", "accuracy", "margin", "dashboard"] and all(map(is_png, rm))
    sft = render(tiny_quickstart["runs"] / "sft", tmp_path / "sft")
    assert [p.stem for p in sft] == ["loss", "perplexity", "dashboard"] and all(map(is_png, sft))


def test_default_output_is_the_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss,val/loss\n0,,2.0\n1,1.9,\n2,1.7,1.8\n")
    written = render(run)
    assert written[-1] == run / "plots" / "dashboard.png" and all(map(is_png, written))


def test_read_metrics_keeps_sparse_rows_as_nan(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,reward/mean,val/reward/mean\n,0,,0.5\n0,0,1.0,\n0,1,2.0,\n0,1,,0.75\n")
    columns = read_metrics(path)
    assert columns["step"] == [0, 0, 1, 1]
    assert math.isnan(columns["reward/mean"][0]) and columns["reward/mean"][1:3] == [1.0, 2.0]
    assert series(columns, "step", "val/reward/mean") == ([0, 1], [0.5, 0.75])
    assert series(columns, "step", "missing") == ([], [])
    assert detect_stage(columns) == "ppo"
    assert detect_stage({"train/accuracy": []}) == "rm" and detect_stage({"train/loss": []}) == "sft"


def test_find_metrics_csv_takes_the_newest_version(tmp_path):
    for version in (0, 1):
        d = tmp_path / "csv" / f"version_{version}"
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text("step\n0\n")
        os.utime(d / "metrics.csv", (time.time() + version, time.time() + version))
    assert find_metrics_csv(tmp_path) == tmp_path / "csv" / "version_1" / "metrics.csv"
    assert find_metrics_csv(tmp_path / "csv" / "version_0") == tmp_path / "csv" / "version_0" / "metrics.csv"
    with pytest.raises(FileNotFoundError, match="no metrics.csv"):
        find_metrics_csv(tmp_path / "csv" / "missing")


def test_moving_average_is_a_trailing_mean():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 5) == [2.0, 3.0]


def test_a_run_without_the_stage_metrics_is_an_error(tmp_path):
    (tmp_path / "metrics.csv").write_text("step,other\n0,1\n")
    with pytest.raises(ValueError, match="none of the ppo panels"):
        render(tmp_path, stage="ppo")
