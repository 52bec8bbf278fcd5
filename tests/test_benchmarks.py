"""The benchmark harness (worker subprocesses, ratios, tables) and the PPO-vs-TRL benchmark: its
summary arithmetic, and one tiny side-by-side run."""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.harness import (
    Column,
    WorkerSpec,
    after_warmup,
    markdown_table,
    peak_rss_bytes,
    ratios,
    run_worker,
    side_by_side_rows,
    text_table,
)
from benchmarks.ppo_vs_trl import (
    OUR_PHASES,
    RESULTS,
    TRL_PHASES,
    parse_args,
    summarize,
)
from benchmarks.workers import RunSpec, measure

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class EchoSpec(WorkerSpec):
    """A worker that loads no model: it echoes ``message`` (``"fail"``: raises)."""

    message: str = ""


def echo(spec: EchoSpec) -> dict:
    """The message, the worker's process id, peak RSS and one environment variable."""
    if spec.message == "fail":
        raise RuntimeError("asked to fail")
    return {"message": spec.message, "pid": os.getpid(), "peak_rss_bytes": peak_rss_bytes(),
            "x_bench": os.environ.get("X_BENCH")}


def test_run_worker_measures_in_a_fresh_process_and_shows_a_failure_log(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the worker imports this module
    result = run_worker(echo, EchoSpec(message="hi"), tmp_path, "echo", extra_env={"X_BENCH": "1"})
    assert result["message"] == "hi" and result["x_bench"] == "1"
    assert result["pid"] != os.getpid() and result["peak_rss_bytes"] > 0
    with pytest.raises(RuntimeError, match=r"(?s)echo-fail worker failed.*asked to fail"):
        run_worker(echo, EchoSpec(message="fail"), tmp_path, "echo-fail")


def test_after_warmup_drops_the_warmup_steps():
    assert after_warmup([9.0, 1.0, 2.0], 1) == [1.0, 2.0]
    assert after_warmup([9.0], 1, keep_all=True) == [9.0]
    with pytest.raises(ValueError):
        after_warmup([9.0], 1)


def test_ratios_rename_and_leave_out_missing_or_zero_denominators():
    top, bottom = {"a": 1.0, "b": None, "c": 3.0}, {"a": 2.0, "b": 1.0, "c": 0.0}
    assert ratios(top, bottom, ["a", "b", "c"]) == {"a": 0.5}
    assert ratios(top, bottom, {"a_ratio": "a"}) == {"a_ratio": 0.5}


def test_tables_put_the_ratios_on_the_first_trainers_row():
    runs = [{"size": "s", "shape": {"hidden": 1}, "ours": {"t": 1.234}, "trl": {"t": 2.0},
             "ratios_ours_over_trl": {"t": 0.617}}]
    rows = side_by_side_rows(runs)
    assert [(r["size"], r["trainer"], r.get("ratio_t")) for r in rows] == [("s", "ours", 0.617), ("s", "trl", None)]
    columns = [Column("size", "size", left=True), Column("trainer", "trainer", left=True),
               Column("s", "t", ".2f", 6), Column("ratio", "ratio_t", ".2f")]
    assert text_table(columns, rows).splitlines() == [
        "size trainer      s ratio", "-" * 25, "s    ours      1.23  0.62", "s    trl       2.00"]
    assert markdown_table(columns, rows).splitlines() == [
        "| size | trainer | s | ratio |", "| --- | --- | ---: | ---: |", "| s | ours | 1.23 | 0.62 |",
        "| s | trl | 2.00 |  |"]


def test_summary_takes_medians_after_warmup_and_fills_the_remainders():
    result = {
        "trainer": "ours",
        "spec": {"batch_size": 2},
        "iteration_seconds": [9.0, 2.0, 4.0, 3.0],
        "response_tokens": [8.0, 8.0, 8.0, 9.0],
        "phases": [{}] + [
            {"generation": 1.0, "policy_value": 0.1, "reference": 0.1, "reward": 0.1, "rollout": 1.5,
             "update": t - 1.6} for t in (2.0, 4.0, 3.0)
        ],
        "peak_rss_bytes": 300 * 2**20,
        "trainable_params": 10,
    }
    s = summarize(result, warmup=1, baseline_rss=100 * 2**20, phases=OUR_PHASES)
    assert s["iteration_seconds_median"] == 3.0
    assert s["generated_tokens_per_s"] == pytest.approx(3.0)  # median of 8/2, 8/4, 9/3
    assert s["rss_above_baseline_mib"] == pytest.approx(200)
    assert s["mean_response_tokens"] == pytest.approx(25 / 3 / 2)
    assert s["phase_seconds_median"]["rollout_other"] == pytest.approx(0.2)
    assert s["phase_seconds_median"]["other"] == pytest.approx(0.1)


def test_source_commit_names_head_and_marks_uncommitted_changes(tmp_path, monkeypatch):
    import benchmarks.harness as bench

    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f.txt").write_text("a\n")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(bench, "REPO_ROOT", repo)
    assert bench.source_commit() == head
    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "r.json").write_text("{}")
    subprocess.run([*git, "add", "benchmarks"], check=True)
    subprocess.run([*git, "commit", "-qm", "two"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (results / "r.json").write_text('{"rewritten": 1}')  # a benchmark's own output: still clean
    assert bench.source_commit() == head
    (repo / "f.txt").write_text("b\n")
    assert bench.source_commit() == head + "+dirty"
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path / "elsewhere")
    assert bench.source_commit() is None


def test_malloc_mmap_threshold_names_the_results_and_reaches_the_workers(tmp_path, monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    args = parse_args(["--malloc-mmap-threshold", "4194304"])
    assert Path(args.out) == RESULTS.with_name("ppo_vs_trl_mmap4194304.json")
    assert Path(parse_args(["--precision", "bf16", "--malloc-mmap-threshold", "262144"]).out).name == (
        "ppo_vs_trl_bf16_mmap262144.json")
    assert Path(parse_args([]).out) == RESULTS
    for bad in ("0", str(64 * 2**20)):
        with pytest.raises(SystemExit):
            parse_args(["--malloc-mmap-threshold", bad])
    # The import-only worker is the cheapest one that reports what it saw.
    seen = run_worker(measure, RunSpec(trainer="baseline-ours"), tmp_path, "baseline",
                      extra_env={"MALLOC_MMAP_THRESHOLD_": "4194304"})
    assert seen["malloc_mmap_threshold_env"] == "4194304"
    assert run_worker(measure, RunSpec(trainer="baseline-ours"), tmp_path, "default")["malloc_mmap_threshold_env"] is None


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_tiny_side_by_side_run_writes_sane_results(tmp_path, tiny_model_dir, precision):
    pytest.importorskip("trl", reason="the TRL side needs the bench extra: pip install -e '.[bench]'")
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "benchmarks.ppo_vs_trl", "--sizes", "tiny", "--response-lengths", "4",
               "--batch-size", "2", "--prompt-length", "8", "--ppo-epochs", "1", "--warmup", "1",
               "--iterations", "2", "--threads", "1", "--tokenizer", str(tiny_model_dir),
               "--work-dir", str(tmp_path / "work"), "--out", str(out), "--precision", precision]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ours" in proc.stdout and "trl" in proc.stdout

    report = json.loads(out.read_text())
    assert report["machine"]["torch"] and report["machine"]["cpu_count"] >= 1
    assert set(report["import_baseline_rss_mib"]) == {"ours", "trl"}
    assert report["settings"]["precision"] == precision
    (run,) = report["runs"]
    assert run["size"] == "tiny" and run["response_length"] == 4
    for trainer, phases in (("ours", OUR_PHASES), ("trl", TRL_PHASES)):
        r = run[trainer]
        assert len(r["iteration_seconds"]) == 2
        for key in ("iteration_seconds_median", "generated_tokens_per_s", "peak_rss_mib",
                    "import_baseline_rss_mib", "trainable_params"):
            assert math.isfinite(r[key]) and r[key] > 0, (trainer, key, r[key])
        assert r["peak_rss_mib"] > r["import_baseline_rss_mib"] * 0.5
        assert set(r["phase_seconds_median"]) == set(phases)
        assert r["phase_seconds_median"]["generation"] > 0
        assert r["frozen_dtype"] == {"32": "torch.float32", "bf16": "torch.bfloat16"}[precision], trainer
        assert 0 < r["mean_response_tokens"] <= 4
    for key, value in run["ratios_ours_over_trl"].items():
        assert math.isfinite(value) and value > 0, key
