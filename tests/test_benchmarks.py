"""The benchmark harness (worker subprocesses, ratios, tables), repeats and their order, the
machine's conditions (busy runs), the probes the workers record with, and the GPU check's CPU
refusal and part runner. PPO-vs-TRL summaries, grids and end-to-end runs: test_benchmark_runs.py."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import benchmarks.conditions as conditions
from benchmarks.conditions import BusyPolicy, cpu_busy_seconds, is_busy, other_cores, run_measured
from benchmarks.gpu_check import REFUSED_EXIT, Part, run_parts
from benchmarks.harness import (Column, WorkerSpec, after_warmup, markdown_table, peak_rss_bytes, ratios,
                                run_worker, text_table)
from benchmarks.ppo_vs_trl import parse_args, results_path
from benchmarks.probes import ActivationDtypes, OptimizerSteps, response_token_counts, trained_tokens
from benchmarks.repeats import format_spread, interleaved_order, paired_ratios, spread
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


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_a_workers_peak_rss_is_its_own_not_its_parents(tmp_path, monkeypatch):
    """Linux carries ru_maxrss across fork and exec: a worker started by a parent holding
    1.2 GiB would report at least that. Its VmHWM counts only its own pages."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    ballast = bytearray(1200 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    result = run_worker(echo, EchoSpec(message="small"), tmp_path, "echo-small")
    del ballast
    assert result["peak_rss_bytes"] < 800 * 2**20, result["peak_rss_bytes"] / 2**20


def test_after_warmup_drops_the_warmup_steps():
    assert after_warmup([9.0, 1.0, 2.0], 1) == [1.0, 2.0]
    assert after_warmup([9.0], 1, keep_all=True) == [9.0]
    with pytest.raises(ValueError):
        after_warmup([9.0], 1)


def test_ratios_rename_and_leave_out_missing_or_zero_denominators():
    top, bottom = {"a": 1.0, "b": None, "c": 3.0}, {"a": 2.0, "b": 1.0, "c": 0.0}
    assert ratios(top, bottom, ["a", "b", "c"]) == {"a": 0.5}
    assert ratios(top, bottom, {"a_ratio": "a"}) == {"a_ratio": 0.5}


def test_tables_align_labels_left_and_numbers_right():
    rows = [{"size": "s", "trainer": "ours", "t": 1.234, "ratio_t": 0.617}, {"size": "s", "trainer": "trl", "t": 2.0}]
    columns = [Column("size", "size", left=True), Column("trainer", "trainer", left=True),
               Column("s", "t", ".2f", 6), Column("ratio", "ratio_t", ".2f")]
    assert text_table(columns, rows).splitlines() == [
        "size trainer      s ratio", "-" * 25, "s    ours      1.23  0.62", "s    trl       2.00"]
    assert markdown_table(columns, rows).splitlines() == [
        "| size | trainer | s | ratio |", "| --- | --- | ---: | ---: |", "| s | ours | 1.23 | 0.62 |",
        "| s | trl | 2.00 |  |"]


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
    assert results_path("main", "32", 4194304).name == "ppo_vs_trl_mmap4194304.json"
    assert results_path("scaling", "bf16", 262144).name == "ppo_vs_trl_scaling_bf16_mmap262144.json"
    assert results_path("main", "32") == REPO_ROOT / "benchmarks" / "results" / "ppo_vs_trl.json"
    for bad in ("0", str(64 * 2**20)):
        with pytest.raises(SystemExit):
            parse_args(["--malloc-mmap-threshold", bad])
    # The import-only worker is the cheapest one that reports what it saw.
    seen = run_worker(measure, RunSpec(trainer="baseline-ours"), tmp_path, "baseline",
                      extra_env={"MALLOC_MMAP_THRESHOLD_": "4194304"})
    assert seen["malloc_mmap_threshold_env"] == "4194304"
    default = run_worker(measure, RunSpec(trainer="baseline-ours"), tmp_path, "default")
    assert default["malloc_mmap_threshold_env"] is None


# -- repeats ----------------------------------------------------------------------------------
def test_interleaved_order_swaps_every_pair_from_one_repeat_to_the_next():
    trainers = ["ours-adapter", "ours-shared", "trl"]
    orders = [interleaved_order(trainers, r) for r in range(4)]
    assert orders[0] == orders[2] == trainers and orders[1] == orders[3] == trainers[::-1]
    for a in trainers:
        for b in trainers:
            if a != b:  # who runs first alternates for every pair
                firsts = [o.index(a) < o.index(b) for o in orders]
                assert firsts == [firsts[0], not firsts[0]] * 2
    with pytest.raises(ValueError):
        interleaved_order(trainers, -1)


def test_spread_and_paired_ratios():
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    with pytest.raises(ValueError):
        spread([])
    # Paired by repeat: 1/2, 4/2, 3/1 (not the ratio of the medians).
    assert paired_ratios([1.0, 4.0, 3.0], [2.0, 2.0, 1.0]) == [0.5, 2.0, 3.0]
    assert paired_ratios([1.0, None, 3.0], [2.0, 2.0, 0.0]) == [0.5]
    with pytest.raises(ValueError, match="unpaired"):
        paired_ratios([1.0], [1.0, 2.0])
    assert format_spread({"median": 1.234, "min": 1.0, "max": 2.0}) == "1.23 [1.00-2.00]"
    assert format_spread({"median": 5.0, "min": 5.0, "max": 5.0}, ".0f") == "5"
    assert format_spread(None) == ""


# -- conditions --------------------------------------------------------------------------------
STAT = """cpu  900 0 90 9000 10 0 0 0 0 0
cpu0 100 0 10 1000 5 0 0 0 0 0
cpu1 800 0 80 8000 5 0 0 0 0 0
intr 12345
"""


def test_cpu_busy_seconds_sums_the_non_idle_ticks_of_the_usable_cpus():
    hz = os.sysconf("SC_CLK_TCK")
    assert cpu_busy_seconds(STAT) == pytest.approx((110 + 880) / hz)  # idle and iowait left out
    assert cpu_busy_seconds(STAT, cpus={1}) == pytest.approx(880 / hz)


def test_busy_means_others_used_the_cpus_before_or_during_a_run():
    assert other_cores(busy_seconds=30.0, own_seconds=20.0, wall_seconds=10.0) == pytest.approx(1.0)
    assert other_cores(busy_seconds=19.0, own_seconds=20.0, wall_seconds=10.0) == 0.0
    with pytest.raises(ValueError):
        other_cores(1.0, 0.0, 0.0)
    assert not is_busy(0.1, 0.2, threshold=0.25)
    assert is_busy(0.3, 0.0, threshold=0.25) and is_busy(0.0, 0.3, threshold=0.25)
    # Without CPU counters: the 1-minute load average against half the cores.
    assert is_busy(None, None, 0.25, load=[1.5, 1.0, 1.0], cores=2)
    assert not is_busy(None, None, 0.25, load=[0.5, 1.0, 1.0], cores=2)
    with pytest.raises(ValueError):
        BusyPolicy(retries=-1)


def test_run_measured_reruns_a_busy_run_and_records_every_attempt(tmp_path, monkeypatch):
    before = iter([1.5, 0.0, 0.0])  # others' cores before each attempt: busy, then quiet
    monkeypatch.setattr(conditions, "sample_other_cores", lambda seconds: next(before))
    monkeypatch.setattr(conditions.CpuWatch, "other_cores", lambda self: 0.0)
    calls = []
    monkeypatch.setattr(conditions, "run_worker", lambda *a, **k: calls.append(1) or {"value": len(calls)})
    policy = BusyPolicy(sample_seconds=0.0, retries=2, wait_seconds=0.0)
    result = run_measured(echo, EchoSpec(), tmp_path, "x", policy)
    assert result["value"] == 2 and len(calls) == 2
    c = result["conditions"]
    assert c["busy"] is False and c["attempts"] == 2 and c["other_cores_before"] == 0.0
    assert [a["busy"] for a in c["earlier_attempts"]] == [True]
    assert c["load_average_before"] is None or len(c["load_average_before"]) == 3
    # Out of retries: the run is kept, marked busy.
    monkeypatch.setattr(conditions.CpuWatch, "other_cores", lambda self: 1.0)
    result = run_measured(echo, EchoSpec(), tmp_path, "x", BusyPolicy(sample_seconds=0.0, retries=0))
    assert result["conditions"]["busy"] is True and result["conditions"]["attempts"] == 1


# -- probes ------------------------------------------------------------------------------------
def test_response_token_counts_stop_at_the_first_pad():
    responses = torch.tensor([[5, 6, 7, 8], [5, 0, 7, 0], [0, 0, 0, 0]])
    assert response_token_counts(responses, pad_token_id=0) == [4, 1, 0]
    with pytest.raises(ValueError, match="batch, length"):
        response_token_counts(torch.tensor([1, 2]), 0)


def test_trained_tokens_are_the_response_tokens_of_every_optimizer_step():
    assert trained_tokens(256, optimizer_steps=4) == 1024  # minibatch = batch: one step per epoch
    assert trained_tokens(256, optimizer_steps=8, minibatches_per_epoch=2) == 1024
    with pytest.raises(ValueError):
        trained_tokens(256, 4, minibatches_per_epoch=0)


def test_optimizer_steps_count_every_step_once():
    counter = OptimizerSteps()
    try:
        weight = nn.Parameter(torch.ones(2))
        optimizer = torch.optim.AdamW([weight], lr=0.1)
        for _ in range(3):
            weight.sum().backward()
            optimizer.step()
        assert counter.take() == 3 and counter.take() == 0
    finally:
        counter.remove()


class _Block(nn.Module):
    """One ``mlp.down_proj`` layer, as a decoder layer names it."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(x)


def test_activation_dtypes_see_autocast_and_grad_mode():
    model, dtypes = _Block(), ActivationDtypes()
    assert dtypes.watch("policy", model) == "mlp.down_proj"
    x = torch.ones(2, 4)
    with torch.no_grad():
        model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert dtypes.record() == {"policy": {"no_grad": ["torch.float32"], "grad": ["torch.bfloat16 autocast"]}}
    dtypes.remove()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # unhooked: not recorded
    assert dtypes.record()["policy"]["no_grad"] == ["torch.float32"]
    with pytest.raises(ValueError, match="no module named"):
        ActivationDtypes().watch("value", nn.Linear(2, 2))


# -- the GPU check -----------------------------------------------------------------------------
def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == REFUSED_EXIT, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs a CUDA GPU" in proc.stderr and "Nothing was run" in proc.stderr
    assert not out.exists()


def test_gpu_check_parts_fail_time_out_or_are_skipped_alone_and_the_json_keeps_the_rest(tmp_path):
    def ok(context, timeout):
        return {"timeout_given": timeout}

    def broken(context, timeout):
        raise RuntimeError("worker failed")

    def slow(context, timeout):
        raise subprocess.TimeoutExpired("worker", timeout)

    out = tmp_path / "gpu.json"
    report = {"parts": {}}
    run_parts([Part("a", 100, ok), Part("b", 100, broken), Part("c", 100, slow)], {}, time.monotonic() + 50,
              report, out)
    saved = json.loads(out.read_text())
    assert [saved["parts"][n]["status"] for n in "abc"] == ["ok", "failed", "timeout"]
    assert saved["parts"]["a"]["result"]["timeout_given"] <= 50  # never past the deadline
    assert "worker failed" in saved["parts"]["b"]["error"] and saved["complete"] is True
    report = {"parts": {}}
    run_parts([Part("d", 100, ok)], {}, time.monotonic() + 5, report, out)  # under min_seconds left
    assert json.loads(out.read_text())["parts"]["d"]["status"] == "skipped"
