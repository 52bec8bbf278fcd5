"""``rlhf.pipeline`` re-runs: a stage is skipped only while its fingerprint (config, command,
earlier outputs) is unchanged; an interrupted ``fit`` stage resumes from its checkpoint, and only
its own run; signals to the pipeline reach the stage (no orphan); a second pipeline on the same
outputs refuses to start. Stages here are stand-ins (a fake ``python`` for ``rlhf.fit``, a
sleeping module), so no model trains; ``test_pipeline.py`` interrupts and resumes a real PPO
stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf.pipeline import PipelineConfigError, load_pipeline, main, run_pipeline
from rlhf.pipeline_state import hold_locks, read_record, sidecar
from rlhf.resume import NOT_BEFORE_ENV

FAKE_PYTHON = '''#!{python}
"""Stands in for python: ``-m rlhf.fit --config C ...`` logs its call to calls.jsonl next to C,
then writes C's output_dir with a stage marker; with a file ``interrupt-<C's stem>`` there it
sends SIGTERM to the pipeline and exits 143 when the pipeline passes it on. Other modules run."""
import json, os, signal, sys, time
from pathlib import Path

if sys.argv[1:3] != ["-m", "rlhf.fit"]:
    os.execv({python!r}, [{python!r}, *sys.argv[1:]])
args = sys.argv[3:]
config = Path(args[args.index("--config") + 1])
with open(config.parent / "calls.jsonl", "a") as f:
    f.write(json.dumps({{"stage": config.stem, "args": args, "not_before": os.environ.get({env!r})}}) + "\\n")
if (config.parent / f"interrupt-{{config.stem}}").exists():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.kill(os.getppid(), signal.SIGTERM)
    time.sleep(30)
    sys.exit(1)
import yaml
out = Path(yaml.safe_load(config.read_text())["model"]["init_args"]["output_dir"])
out.mkdir(parents=True, exist_ok=True)
(out / "rlhf_stage.json").write_text(json.dumps({{"stage": config.stem}}))
'''

SLEEPER = '''"""``python -m sleeper DIR OUT``: writes its pid to DIR/pid, logs each SIGINT / SIGTERM to
DIR/signals and exits 128 + the signal; writes OUT once DIR/release exists."""
import os, signal, sys, time
from pathlib import Path

d, out = Path(sys.argv[1]), Path(sys.argv[2])

def stop(signum, frame):
    with open(d / "signals", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
(d / "pid").write_text(str(os.getpid()))
while not (d / "release").exists():
    time.sleep(0.05)
out.write_text("done")
'''


# -- fit stages through a fake python -------------------------------------------------------------
@pytest.fixture
def fit_stages(tmp_path):
    """A pipeline of three fit stages (sft, rm, ppo) and the fake python that "runs" them:
    ``(pipeline path, fake python, calls())``."""
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable, env=NOT_BEFORE_ENV))
    python.chmod(0o755)
    stages = []
    for name in ("sft", "rm", "ppo"):
        config = {"model": {"init_args": {"output_dir": str(tmp_path / "out" / name), "lr": 1e-4}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        stages.append({"name": name, "fit": str(tmp_path / f"{name}.yaml")})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))

    def calls() -> list[dict]:
        log = tmp_path / "calls.jsonl"
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        log.unlink(missing_ok=True)
        return rows

    return path, str(python), calls


def statuses(path, python, **kwargs) -> list[str]:
    return [r.status for r in run_pipeline(load_pipeline(path), python=python, **kwargs)]


def change_config(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    config["model"]["init_args"]["lr"] *= 2
    path.write_text(yaml.safe_dump(config))


def test_interrupted_fit_stage_resumes_and_stale_stages_rerun(fit_stages, tmp_path):
    path, python, calls = fit_stages
    assert statuses(path, python) == ["ran", "ran", "ran"]
    assert [c["stage"] for c in calls()] == ["sft", "rm", "ppo"]

    # The case: --force, interrupted (SIGTERM to the pipeline) during PPO ...
    (tmp_path / "interrupt-ppo").touch()
    results = run_pipeline(load_pipeline(path), force=True, python=python)
    assert [r.status for r in results] == ["ran", "ran", "interrupted"]
    assert results[-1].exit_code == 143
    calls()
    (tmp_path / "interrupt-ppo").unlink()
    # ... then a plain re-run: PPO's old output predates the new RM; it resumes its own run.
    assert statuses(path, python) == ["skipped", "skipped", "ran"]
    [ppo] = calls()
    assert ppo["args"][-2:] == ["--ckpt_path", "last"]
    assert float(ppo["not_before"]) == read_record(tmp_path / "out/ppo")["started_at"]
    assert statuses(path, python) == ["skipped"] * 3

    # A changed config re-runs that stage and the later ones, anew.
    change_config(tmp_path / "rm.yaml")
    assert statuses(path, python) == ["skipped", "ran", "ran"]
    assert all("--ckpt_path" not in c["args"] and c["not_before"] is None for c in calls())

    # An interrupted run whose inputs changed since is not resumed.
    (tmp_path / "interrupt-ppo").touch()
    assert statuses(path, python, start_from="ppo") == ["skipped", "skipped", "interrupted"]
    (tmp_path / "interrupt-ppo").unlink()
    change_config(tmp_path / "rm.yaml")
    calls()
    assert statuses(path, python) == ["skipped", "ran", "ran"]
    assert all("--ckpt_path" not in c["args"] for c in calls())

    # A forced stage starts anew even when it has an interrupted run to resume.
    (tmp_path / "interrupt-ppo").touch()
    statuses(path, python, start_from="ppo")
    (tmp_path / "interrupt-ppo").unlink()
    calls()
    assert statuses(path, python, start_from="ppo") == ["skipped", "skipped", "ran"]
    assert "--ckpt_path" not in calls()[0]["args"]


def test_without_records_a_stage_older_than_an_earlier_one_reruns(fit_stages, tmp_path):
    """Outputs made before the pipeline kept records (or by hand): compared by time."""
    path, python, _ = fit_stages
    statuses(path, python)
    for name in ("sft", "rm", "ppo"):
        sidecar(tmp_path / "out" / name, "json").unlink()
    assert statuses(path, python) == ["skipped"] * 3
    marker = tmp_path / "out/rm/rlhf_stage.json"
    later = (tmp_path / "out/ppo/rlhf_stage.json").stat().st_mtime + 5
    os.utime(marker, (later, later))
    assert statuses(path, python) == ["skipped", "skipped", "ran"]


def test_an_output_inside_another_stage_output_is_refused(tmp_path):
    stages = [{"name": "a", "run": ["x"], "output": str(tmp_path / "out")},
              {"name": "b", "run": ["x"], "output": str(tmp_path / "out" / "b")}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    with pytest.raises(PipelineConfigError, match="stage a's output .* contains stage b's output"):
        load_pipeline(path)


# -- signals and the lock, with a sleeping stage --------------------------------------------------
def sleeper_pipeline(tmp_path) -> tuple[Path, dict[str, str]]:
    """A pipeline of one ``sleeper`` stage (see :data:`SLEEPER`) and the env that finds it."""
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    path = tmp_path / "pipeline.yaml"
    out = tmp_path / "out.txt"
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "sleep", "run": ["sleeper", str(tmp_path), str(out)], "output": str(out)}]}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return path, env


def start_pipeline(path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start ``python -m rlhf.pipeline`` and wait for its stage to start: (process, stage pid)."""
    process = subprocess.Popen([sys.executable, "-m", "rlhf.pipeline", "--config", str(path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pid_file = path.parent / "pid"
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    return process, int(pid_file.read_text())


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_pipeline_stops_the_stage_and_exits_with_its_code(tmp_path, signum):
    """Sent to the pipeline alone (``kill``, not a terminal's Ctrl-C): passed on as SIGTERM."""
    path, env = sleeper_pipeline(tmp_path)
    process, stage = start_pipeline(path, env)
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    assert (tmp_path / "signals").read_text() == "SIGTERM\n"
    assert "interrupted" in output and wait_gone(stage)


@pytest.mark.skipif(sys.platform != "linux", reason="the stage learns of its parent's death on Linux")
def test_a_killed_pipeline_leaves_no_stage_running(tmp_path):
    path, env = sleeper_pipeline(tmp_path)
    process, stage = start_pipeline(path, env)
    process.kill()
    process.communicate(timeout=60)
    assert wait_gone(stage), "the stage outlived the pipeline"
    assert (tmp_path / "signals").read_text() == "SIGTERM\n"


def test_a_second_pipeline_on_the_same_outputs_refuses_to_start(tmp_path, capsys):
    path, env = sleeper_pipeline(tmp_path)
    process, _ = start_pipeline(path, env)
    assert main(["--config", str(path)]) == 3
    err = capsys.readouterr().err
    assert f"another rlhf.pipeline (pid {process.pid}) is running with the output {tmp_path / 'out.txt'}" in err
    (tmp_path / "release").touch()
    assert process.communicate(timeout=120)[0] and process.returncode == 0  # the first one finished
    assert (tmp_path / "out.txt").read_text() == "done"


def test_a_lock_left_by_a_killed_pipeline_blocks_nothing(tmp_path):
    path, _ = sleeper_pipeline(tmp_path)
    lock = sidecar(tmp_path / "out.txt", "lock")
    lock.write_text("999999999")  # the pid of a pipeline that was killed
    (tmp_path / "out.txt").write_text("done")
    assert [r.status for r in run_pipeline(load_pipeline(path))] == ["skipped"]
    with hold_locks([tmp_path / "out.txt"]):  # and it is taken, then released
        assert lock.read_text() == str(os.getpid())
    with hold_locks([tmp_path / "out.txt"]):
        pass
