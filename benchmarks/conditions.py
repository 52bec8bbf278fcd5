"""Was the machine quiet? The conditions of each benchmark worker run, and re-runs of busy ones.

The 1-minute load average is recorded before every run, but it is not the busy test: it decays
over about a minute, so it still counts the previous worker of the same benchmark. The test is
the CPU time that *other* processes used, from ``/proc/stat`` over the CPUs this process may
run on, minus the CPU time of this process and its workers (``getrusage``):

- ``other_cores_before``: average cores in use by others while the benchmark sleeps for
  ``sample_seconds`` just before a worker starts;
- ``other_cores_during``: the same over the worker's whole run.

A run is busy when either is above ``threshold_cores``; where ``/proc/stat`` is missing
(macOS), when the 1-minute load average is above half the cores. A busy run is re-run up to
``retries`` times after ``wait_seconds``; the last attempt's result is kept, with every
attempt's conditions beside it.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import WorkerSpec, load_average, machine_busy, run_worker

PROC_STAT = Path("/proc/stat")
# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal ...
IDLE_COLUMNS = (3, 4)  # idle, iowait


@dataclass(frozen=True)
class BusyPolicy:
    """When a run counts as busy and what to do then (see the module docstring)."""

    threshold_cores: float = 0.25
    sample_seconds: float = 2.0
    retries: int = 1
    wait_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.threshold_cores < 0 or self.sample_seconds < 0 or self.retries < 0 or self.wait_seconds < 0:
            raise ValueError(f"busy policy values must be >= 0: {self}")


def add_busy_arguments(parser: Any) -> None:
    """The ``--busy-*`` options of a benchmark's command line (defaults: :class:`BusyPolicy`'s)."""
    policy = BusyPolicy()
    parser.add_argument("--busy-threshold", type=float, default=policy.threshold_cores,
                        help="cores others may use before or during a run before it counts as busy")
    parser.add_argument("--busy-sample", type=float, default=policy.sample_seconds,
                        help="seconds to watch the CPUs before each run")
    parser.add_argument("--busy-retries", type=int, default=policy.retries, help="re-runs of a busy run")
    parser.add_argument("--busy-wait", type=float, default=policy.wait_seconds, help="seconds before a re-run")


def busy_policy_from(args: Any) -> BusyPolicy:
    """The :class:`BusyPolicy` of parsed ``--busy-*`` options (a ``ValueError`` for negatives)."""
    return BusyPolicy(args.busy_threshold, args.busy_sample, args.busy_retries, args.busy_wait)


def usable_cpus() -> set[int] | None:
    """The CPU numbers this process may run on (``None`` where the OS does not say)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def cpu_busy_seconds(stat_text: str | None = None, cpus: set[int] | None = None) -> float | None:
    """Non-idle CPU seconds since boot, summed over ``cpus`` (all CPUs when ``None``), from
    ``/proc/stat`` (or ``stat_text``, its contents); ``None`` without it."""
    if stat_text is None:
        try:
            stat_text = PROC_STAT.read_text()
        except OSError:
            return None
    ticks = 0
    for line in stat_text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        columns = [int(x) for x in rest.split()[:8]]
        ticks += sum(v for i, v in enumerate(columns) if i not in IDLE_COLUMNS)
    return ticks / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished child processes."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def other_cores(busy_seconds: float, own_seconds: float, wall_seconds: float) -> float:
    """Average cores used by other processes: CPU time of all (``busy_seconds``) minus ours
    (``own_seconds``), over ``wall_seconds``; never below 0 (the two clocks tick apart)."""
    if wall_seconds <= 0:
        raise ValueError(f"wall_seconds must be > 0, got {wall_seconds}")
    return max(0.0, (busy_seconds - own_seconds) / wall_seconds)


def is_busy(other_before: float | None, other_during: float | None, threshold: float,
            load: list[float] | None = None, cores: int | None = None) -> bool:
    """Whether others used more than ``threshold`` cores before or during the run; without
    CPU counters, whether the 1-minute ``load`` was above half the ``cores``."""
    known = [x for x in (other_before, other_during) if x is not None]
    if not known:
        return machine_busy(load, cores)
    return any(x > threshold for x in known)


class CpuWatch:
    """Others' CPU use from now until :meth:`other_cores` is called."""

    def __init__(self) -> None:
        self.cpus = usable_cpus()
        self.start_busy = cpu_busy_seconds(cpus=self.cpus)
        self.start_own = own_cpu_seconds()
        self.start_wall = time.perf_counter()

    def other_cores(self) -> float | None:
        """Average cores others used since the watch started (``None`` without ``/proc/stat``)."""
        busy = cpu_busy_seconds(cpus=self.cpus)
        if busy is None or self.start_busy is None:
            return None
        return other_cores(busy - self.start_busy, own_cpu_seconds() - self.start_own,
                           time.perf_counter() - self.start_wall)


def sample_other_cores(seconds: float) -> float | None:
    """Sleep ``seconds`` and return the cores others used meanwhile (``None``: not measured)."""
    if seconds <= 0:
        return None
    watch = CpuWatch()
    time.sleep(seconds)
    return watch.other_cores()


def run_measured(measure: Callable[[Any], dict[str, Any]], spec: WorkerSpec, work_dir: Path, name: str,
                 policy: BusyPolicy, **run_kwargs: Any) -> dict[str, Any]:
    """:func:`benchmarks.harness.run_worker` with the machine's conditions: the result gains
    ``conditions`` (load average and others' cores before and during, ``busy``, the attempt
    count and the earlier attempts' conditions); busy runs are re-run as ``policy`` says."""
    attempts: list[dict[str, Any]] = []
    cores = len(usable_cpus() or ()) or os.cpu_count()
    while True:
        if attempts:
            time.sleep(policy.wait_seconds)
        load = load_average()
        before = sample_other_cores(policy.sample_seconds)
        watch = CpuWatch()
        started = time.time()
        result = run_worker(measure, spec, work_dir, name, **run_kwargs)
        during = watch.other_cores()
        busy = is_busy(before, during, policy.threshold_cores, load, cores)
        attempts.append({"started": started, "load_average_before": load,
                         "other_cores_before": before, "other_cores_during": during, "busy": busy})
        if not busy or len(attempts) > policy.retries:
            break
    result["conditions"] = {**attempts[-1], "attempts": len(attempts), "earlier_attempts": attempts[:-1],
                            "policy": asdict(policy)}
    return result
