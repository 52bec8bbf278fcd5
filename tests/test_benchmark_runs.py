"""The PPO-vs-TRL benchmark's grids, command line and summaries (repeats, paired ratios), and
tiny end-to-end runs of ppo_vs_trl, train_vs_trl and the GPU check's CPU rehearsal (slow)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.assets import DEFAULT_TOKENIZER, SIZES
from benchmarks.ppo_report import OUR_PHASES, TRL_PHASES, format_markdown, summarize_cell, summarize_run
from benchmarks.ppo_vs_trl import GRIDS, Cell, grid_cells, parse_args, parse_trainers
from benchmarks.workers import CRITICS, RunSpec, supported_critics

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def worker_result(trainer="ours", seconds=(9.0, 2.0, 4.0, 3.0), tokens=(8.0, 8.0, 8.0, 9.0), steps=(4, 4, 4, 4)):
    """A worker result as :func:`benchmarks.workers.measure` returns it (one warm-up iteration)."""
    phases = ([{}] + [{"generation": 1.0, "policy_value": 0.1, "reference": 0.1, "reward": 0.1, "rollout": 1.5,
                       "update": t - 1.6} for t in seconds[1:]] if trainer == "ours"
              else [{"generation": 1.0, "reference": 0.1, "value": 0.1, "reward": 0.1}] * len(seconds))
    return {"trainer": trainer, "spec": {"batch_size": 2}, "iteration_seconds": list(seconds),
            "generated_tokens": list(tokens), "optimizer_steps": list(steps), "minibatches_per_epoch": 1,
            "phases": phases, "peak_rss_bytes": 300 * 2**20, "trainable_params": 10, "critic": "adapter",
            "precision_used": {"lightning_precision": "32-true"}, "activation_dtypes": {"base": {"grad": ["f32"]}}}


def test_run_summary_takes_medians_after_warmup_and_counts_steps_and_tokens():
    s = summarize_run(worker_result(), warmup=1, baseline_rss=100 * 2**20)
    assert s["iteration_seconds_median"] == 3.0 and s["iteration_seconds"] == [2.0, 4.0, 3.0]
    assert s["generated_tokens_per_s"] == pytest.approx(3.0)  # median of 8/2, 8/4, 9/3
    assert s["generated_tokens_per_iteration"] == 8 and s["mean_response_tokens"] == 4
    assert s["optimizer_steps_per_iteration"] == 4 and s["trained_tokens_per_iteration"] == 32
    assert s["rss_above_baseline_mib"] == pytest.approx(200) and s["peak_gpu_mib"] is None
    assert s["phase_seconds_median"]["rollout_other"] == pytest.approx(0.2)
    assert s["phase_seconds_median"]["other"] == pytest.approx(0.1)
    assert set(s["phase_seconds_median"]) == set(OUR_PHASES) and s["busy"] is False
    trl = summarize_run({**worker_result("trl"), "cuda_max_memory_allocated_bytes": 2**30,
                         "conditions": {"busy": True}}, warmup=1, baseline_rss=0)
    assert set(trl["phase_seconds_median"]) == set(TRL_PHASES) and trl["peak_gpu_mib"] == 1024 and trl["busy"]
    assert trl["phase_seconds_median"]["update_and_other"] == pytest.approx(3.0 - 1.3)


def test_cell_summary_gives_median_and_range_and_pairs_ratios_by_repeat():
    runs = []
    for repeat, (ours, trl) in enumerate([(1.0, 2.0), (4.0, 2.0), (3.0, 1.0)]):
        for trainer, seconds in (("ours-adapter", ours), ("trl", trl)):
            family = "trl" if trainer == "trl" else "ours"
            run = summarize_run(worker_result(family, seconds=(9.0, seconds), tokens=(8.0, 8.0), steps=(4, 4)), 1, 0)
            runs.append({"trainer": trainer, "repeat": repeat, **run, "busy": repeat == 2 and trainer == "trl"})
    runs[0]["optimizer_steps_per_iteration"] = 3  # a repeat that differs shows as a list
    cell = summarize_cell(runs)
    ours = cell["trainers"]["ours-adapter"]
    assert ours["iteration_seconds_median"] == {"median": 3.0, "min": 1.0, "max": 4.0, "n": 3}
    assert ours["optimizer_steps_per_iteration"] == [3, 4]
    assert cell["trainers"]["trl"]["optimizer_steps_per_iteration"] == 4
    assert ours["label"] == "ours, adapter critic (like-for-like)" and ours["repeats"] == 3
    # Paired: 1/2, 4/2, 3/1 -> median 2.0 (the ratio of medians would be 3/2).
    paired = cell["ratios"]["ours-adapter/trl"]["iteration_seconds"]
    assert paired == {"median": 2.0, "min": 0.5, "max": 3.0, "n": 3}
    assert cell["trainers"]["trl"]["busy_runs"] == 1 and cell["busy_runs"] == 1
    table = format_markdown([{"size": "s", "response_length": 32, "batch_size": 8, **cell}])
    lines = table.splitlines()
    assert "like-for-like" in lines[2] and "TRL" in lines[3] and "2.00 [0.50-3.00]" in lines[2]
    assert "busy runs" in lines[0] and lines[3].rstrip(" |").endswith("1/3")


def test_grids_hold_the_like_for_like_rows_the_135m_shape_and_the_scaling_steps():
    main = GRIDS["main"]
    assert Cell("smollm2-135m", 32, 8) in main.cells and main.repeats >= 3
    like_for_like = {(s, r) for s in ("small", "medium") for r in (32, 64)}
    assert {(c.size, c.response_length) for c in main.cells} >= like_for_like
    scaling = GRIDS["scaling"].cells
    assert [c.response_length for c in scaling if c.batch_size == 8] == [32, 64, 128, 256]
    assert [c.batch_size for c in scaling if c.response_length == 32] == [8, 16, 32]
    config = DEFAULT_TOKENIZER / "config.json"
    if config.is_file():  # the shape is the real model's, where the checkout has it
        real = json.loads(config.read_text())
        shape = SIZES["smollm2-135m"]
        assert (shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate) == (
            real["hidden_size"], real["num_hidden_layers"], real["num_attention_heads"],
            real["num_key_value_heads"], real["intermediate_size"])


def test_grid_cells_replace_sizes_or_make_a_custom_product():
    scaling = GRIDS["scaling"]
    medium = grid_cells(scaling, ["medium"], None, None)
    assert [c.size for c in medium] == ["medium"] * len(scaling.cells)
    assert grid_cells(GRIDS["quick"], ["tiny", "tiny"], None, None) == [Cell("tiny", 16, 4)]
    assert grid_cells(GRIDS["main"], ["tiny"], [4], [2, 3]) == [Cell("tiny", 4, 2), Cell("tiny", 4, 3)]


def test_trainers_and_command_line_are_checked():
    assert parse_trainers("ours,trl", ("shared", "adapter")) == ["ours-shared", "trl"]
    with pytest.raises(ValueError, match="unknown trainer"):
        parse_trainers("ours-big", CRITICS)
    with pytest.raises(ValueError, match="no critic 'hydra'"):
        parse_trainers("ours-hydra", ("shared", "adapter"))
    assert {"shared", "adapter"} <= set(supported_critics()) <= set(CRITICS)
    args = parse_args(["--grid", "main,scaling", "--precision", "32,bf16"])
    assert args.grids == ["main", "scaling"] and args.precisions == ["32", "bf16"]
    assert parse_args(["--quick"]).grids == ["quick"]
    for bad in (["--grid", "main,scaling", "--out", "x.json"], ["--precision", "16"], ["--sizes", "huge"],
                ["--grid", "main,scaling", "--response-lengths", "32"], ["--busy-retries", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with pytest.raises(ValueError, match="critic must be one of"):
        RunSpec(trainer="ours", critic="linear")
    with pytest.raises(ValueError, match="ours-only"):
        RunSpec(trainer="trl", quantization="4bit")


# -- end to end (tiny model) -------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("precision,repeats,trainers", [
    ("bf16", 2, "ours-adapter,ours-hydra,ours-shared,trl"), ("32", 1, "ours-adapter,trl")])
def test_tiny_grid_records_repeats_precision_steps_and_tokens(tmp_path, tiny_model_dir, precision, repeats,
                                                              trainers):
    pytest.importorskip("trl", reason="the TRL side needs the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "benchmarks.ppo_vs_trl", "--grid", "quick", "--sizes", "tiny",
               "--response-lengths", "4", "--batch-sizes", "2", "--prompt-length", "8", "--ppo-epochs", "2",
               "--warmup", "1", "--iterations", "2", "--repeats", str(repeats), "--trainers", trainers,
               "--hydra-layers", "1", "--threads", "1", "--busy-sample", "0.2", "--busy-retries", "0",
               "--tokenizer", str(tiny_model_dir), "--work-dir", str(tmp_path / "work"), "--out", str(out),
               "--precision", precision]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "like-for-like" in proc.stdout

    report = json.loads(out.read_text())
    assert report["complete"] and report["settings"]["precision"] == precision
    assert report["settings"]["repeats"] == repeats and set(report["import_baseline_rss_mib"]) == {"ours", "trl"}
    (cell,) = report["cells"]
    names = trainers.split(",")
    assert [r["trainer"] for r in cell["runs"]] == (names + names[::-1])[: repeats * len(names)]
    dtype = {"32": "torch.float32", "bf16": "torch.bfloat16 autocast"}[precision]
    for run in cell["runs"]:
        assert run["optimizer_steps_per_iteration"] == 2, run["trainer"]  # one per PPO epoch, both sides
        assert 0 < run["generated_tokens_per_iteration"] <= 2 * 4
        assert run["trained_tokens_per_iteration"] == 2 * run["generated_tokens_per_iteration"]
        assert run["conditions"]["attempts"] == 1 and "load_average_before" in run["conditions"]
        seen = {label for modes in run["activation_dtypes"].values() for labels in modes.values()
                for label in labels}
        assert seen == {dtype}, (run["trainer"], run["activation_dtypes"])  # every pass, both sides
        assert math.isfinite(run["iteration_seconds_median"]) and run["peak_rss_mib"] > 0
    trl = cell["trainers"]["trl"]["precision_used"]
    assert trl["accelerator_mixed_precision"] == {"32": "no", "bf16": "bf16"}[precision]
    ours = cell["trainers"]["ours-adapter"]["precision_used"]
    assert ours["lightning_precision"] == {"32": "32-true", "bf16": "bf16-mixed"}[precision]
    for name in names[:-1]:
        for ratio in cell["ratios"][f"{name}/trl"].values():
            assert ratio["n"] == repeats and 0 < ratio["min"] <= ratio["median"] <= ratio["max"]


@pytest.mark.slow
def test_tiny_train_vs_trl_interleaves_repeats(tmp_path, tiny_model_dir):
    pytest.importorskip("trl", reason="the TRL side needs the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "train.json"
    command = [sys.executable, "-m", "benchmarks.train_vs_trl", "--quick", "--size", "tiny", "--repeats", "2",
               "--prompt-length", "8", "--completion-length", "8", "--threads", "1", "--busy-sample", "0.2",
               "--busy-retries", "0", "--tokenizer", str(tiny_model_dir), "--work-dir", str(tmp_path / "work"),
               "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for stage in report["runs"]:
        order = [(r["trainer"], r["repeat"]) for r in stage["runs"]]
        assert order == [("ours", 0), ("trl", 0), ("trl", 1), ("ours", 1)]
        assert stage["ours"]["tokens_per_s"]["n"] == 2 and stage["ratios_ours_over_trl"]["tokens_per_s"]["n"] == 2


@pytest.mark.slow
def test_gpu_check_rehearsal_on_the_cpu_runs_the_cuda_path_code(tmp_path, tiny_model_dir):
    out = tmp_path / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--size", "tiny",
               "--threads", "1", "--parts", "quickstart_bf16,fsdp_1gpu", "--tokenizer", str(tiny_model_dir),
               "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # FSDP1 refuses a CPU
    report = json.loads(out.read_text())
    assert report["complete"] and report["device"] == "cpu" and report["torch"]
    quickstart = report["parts"]["quickstart_bf16"]
    assert quickstart["status"] == "ok", quickstart
    result = quickstart["result"]
    assert result["precision_used"]["lightning_precision"] == "bf16-mixed"
    assert result["optimizer_steps_per_iteration"] == 2 and result["iteration_seconds_median"] > 0
    fsdp = report["parts"]["fsdp_1gpu"]
    assert fsdp["status"] == "failed" and "requires a GPU accelerator" in fsdp["error"]
