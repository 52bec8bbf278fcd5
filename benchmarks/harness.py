"""What every benchmark shares: one worker per fresh subprocess, its memory and step times, the
machine it ran on, and the tables of its results.

A benchmark defines what it measures: a spec (a :class:`WorkerSpec` dataclass) and a function
``measure(spec) -> dict`` in an importable module. :func:`run_worker` runs that function in
``python -m benchmarks.harness SPEC.json RESULT.json``, so the worker's peak RSS (its
``VmHWM``: :func:`peak_rss_bytes`) is its own, and returns the JSON result.

Only the standard library is imported at the top: an import-only baseline worker measures what
its trainer imports, not what this module does.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
MIB = 2**20
# Worker environment unless the caller's sets them: offline, no W&B, TRL's experimental warning off.
WORKER_ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1"}


@dataclass(kw_only=True)
class WorkerSpec:
    """What every worker takes: batch, LoRA shape, seed and torch threads (``None``: torch's)."""

    batch_size: int = 8
    lora_r: int = 8
    lora_alpha: int = 16
    seed: int = 0
    threads: int | None = None


# -- measuring inside a worker -------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` on Linux, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: the kernel carries it across fork and exec, so a worker's
    would start at its parent's RSS at the fork (the benchmark driver's, which holds the
    assets it built) and hide any smaller peak of the worker's own. ``VmHWM`` belongs to the
    worker's own address space, which exec creates new.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def device_memory() -> dict[str, Any]:
    """This process's peak CUDA memory (``torch.cuda.max_memory_allocated`` and
    ``max_memory_reserved``, bytes) and the device's name when it used CUDA, else ``{}``.
    Imports nothing: an import-only worker stays import-only."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_device": torch.cuda.get_device_name(0),
            "cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_memory_reserved_bytes": torch.cuda.max_memory_reserved()}


def import_baseline(modules: Iterable[str]) -> dict[str, int]:
    """Import ``modules`` and nothing else: the peak RSS of a worker that only imports."""
    for name in modules:
        importlib.import_module(name)
    return {"import_rss_bytes": peak_rss_bytes()}


def weight_bytes(*modules: Any) -> int:
    """Bytes of the distinct parameter and buffer storages held by ``modules`` (shared
    tensors, e.g. tied embeddings or one base under several adapters, count once)."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class StepTimes:
    """Wall time of each step, from the end of the previous one (the first from :meth:`start`).

    A trainer's callback mixes it in and names its hooks, e.g. Lightning's
    ``on_train_start = StepTimes.start`` and ``on_train_batch_end = StepTimes.lap``.
    """

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last = 0.0

    def start(self, *args: Any, **kwargs: Any) -> None:
        """Start the clock (training begins)."""
        self._last = time.perf_counter()

    def lap(self, *args: Any, **kwargs: Any) -> None:
        """Record the step that just ended."""
        now = time.perf_counter()
        self.seconds.append(now - self._last)
        self._last = now


def after_warmup(seconds: Sequence[float], warmup: int, *, keep_all: bool = False) -> list[float]:
    """The step times after ``warmup`` warm-up steps (``keep_all``: all of them when there are
    no more); at least one, or a ``ValueError``."""
    timed = list(seconds[warmup:]) or (list(seconds) if keep_all else [])
    if not timed:
        raise ValueError(f"no timed steps after {warmup} warm-up")
    return timed


# -- the worker subprocess -----------------------------------------------------------------------
def qualified_name(obj: Any) -> str:
    """``module:qualname`` of a module-level function or class, by the name its module imports
    as (a module run with ``python -m`` is ``__main__`` to itself)."""
    module = obj.__module__
    if module == "__main__":
        main_spec = getattr(sys.modules["__main__"], "__spec__", None)
        if main_spec is None:
            raise RuntimeError("run benchmarks as modules: python -m benchmarks.<name>")
        module = main_spec.name
    return f"{module}:{obj.__qualname__}"


def resolve(name: str) -> Any:
    """The object a :func:`qualified_name` names."""
    module, _, attribute = name.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def run_worker(measure: Callable[[Any], dict[str, Any]], spec: WorkerSpec, work_dir: Path, name: str, *,
               timeout: float | None = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``measure(spec)`` in a fresh subprocess (``extra_env`` added to its environment) and
    return its result; ``work_dir/name.*`` keep the spec, result and log (its tail on failure)."""
    import subprocess

    spec_file, result_file, log_file = (work_dir / f"{name}.{ext}" for ext in ("spec.json", "result.json", "log"))
    spec_file.write_text(json.dumps({"measure": qualified_name(measure), "spec_type": qualified_name(type(spec)),
                                     "spec": asdict(spec)}))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, **(extra_env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    for key, value in WORKER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.harness", str(spec_file), str(result_file)],
                              cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not result_file.is_file():
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{name} worker failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(result_file.read_text())


def worker_main(argv: list[str]) -> None:
    """``SPEC.json RESULT.json``: set the spec's torch threads, measure, write the result."""
    request = json.loads(Path(argv[0]).read_text())
    spec = resolve(request["spec_type"])(**request["spec"])
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    result = resolve(request["measure"])(spec)
    Path(argv[1]).write_text(json.dumps(result, indent=2))


# -- the machine ---------------------------------------------------------------------------------
def source_commit() -> str | None:
    """The repository's ``HEAD`` commit (``+dirty`` with uncommitted changes to tracked files
    outside ``benchmarks/results/``, which earlier runs rewrite), or ``None`` outside a git
    checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_busy(load: list[float] | None, cores: int | None) -> bool:
    """Whether the 1-minute load average says something else was running (> half the cores)."""
    return bool(load and cores and load[0] > 0.5 * cores)


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, library versions, the libc and the source commit."""
    import platform

    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl_version,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "libc": " ".join(platform.libc_ver()).strip() or None,
        "rlhf_commit": source_commit(),
    }


@dataclass
class BenchmarkRun:
    """One ``python -m benchmarks.<name>`` run: its start and the load average then (a warning
    is printed when the machine is busy); :meth:`report` frames the results."""

    name: str
    argv: list[str]
    started: float = field(default_factory=time.time)
    load_before: list[float] | None = field(default_factory=load_average)

    def __post_init__(self) -> None:
        if machine_busy(self.load_before, os.cpu_count()):
            print(f"[bench] WARNING: load average {self.load_before} on {os.cpu_count()} cores: something else "
                  "is running, timings will not be comparable", flush=True)

    def report(self, settings: dict[str, Any], **results: Any) -> dict[str, Any]:
        """The result JSON: command, settings, machine, load before and after, wall time, ``results``."""
        return {
            "benchmark": self.name,
            "command": f"python -m benchmarks.{self.name} " + " ".join(self.argv),
            "settings": settings,
            "machine": machine_info(),
            "load_average_before": self.load_before,
            "load_average_after": load_average(),
            "machine_busy_at_start": machine_busy(self.load_before, os.cpu_count()),
            "wall_seconds": time.time() - self.started,
            **results,
        }


def footer(report: dict[str, Any], out: str | Path) -> str:
    """The closing line: wall time, load averages, where the JSON went."""
    return (f"wall {report['wall_seconds']:.0f}s, load average before {report['load_average_before']} "
            f"after {report['load_average_after']}; written to {out}")


# -- files and command lines ---------------------------------------------------------------------
@contextmanager
def work_directory(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` (created if missing), or a temporary directory removed afterwards."""
    if path:
        work = Path(path).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp).resolve()


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (indented) to ``path``, creating its directory."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return out


def add_common_arguments(parser: Any, out: Path | None, out_help: str | None = None) -> None:
    """The options every worker-based benchmark takes: threads, tokenizer, work dir and the
    result JSON (``out`` its default; ``None``: chosen after parsing, as ``out_help`` says)."""
    from benchmarks.assets import DEFAULT_TOKENIZER

    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer directory for the assets")
    parser.add_argument("--work-dir", default=None, help="assets and worker logs (default: a temporary directory)")
    parser.add_argument("--out", default=out and str(out),
                        help=out_help or f"result JSON (default: {out and out.relative_to(REPO_ROOT)})")


# -- summaries and tables ------------------------------------------------------------------------
def memory_mib(result: dict[str, Any]) -> dict[str, float]:
    """A worker's peak RSS, RSS above its own import-time RSS and held weights, in MiB."""
    return {
        "peak_rss_mib": result["peak_rss_bytes"] / MIB,
        "rss_above_import_mib": (result["peak_rss_bytes"] - result["import_rss_bytes"]) / MIB,
        "weights_mib": result["weight_bytes"] / MIB,
    }


def ratios(top: dict[str, Any], bottom: dict[str, Any], keys: Mapping[str, str] | Iterable[str]) -> dict[str, float]:
    """``top[key] / bottom[key]`` for each key (a mapping renames: ``{name: key}``), leaving out
    keys where ``top`` has no value or ``bottom`` is zero or missing."""
    names = keys if isinstance(keys, Mapping) else {key: key for key in keys}
    return {name: top[key] / bottom[key] for name, key in names.items() if bottom[key] and top[key] is not None}


@dataclass(frozen=True)
class Column:
    """One table column: its header, the row key it shows, ``fmt`` (a format spec) for numbers
    (strings show as they are, ``None`` blank), the text width (at least the header's) and
    ``left`` alignment for labels."""

    header: str
    key: str
    fmt: str = ""
    width: int = 0
    left: bool = False

    def cell(self, row: dict[str, Any]) -> str:
        """The row's value, formatted."""
        value = row.get(self.key)
        return "" if value is None else value if isinstance(value, str) else format(value, self.fmt)


def text_table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """A plain-text, fixed-width table: header, rule, one line per row."""
    widths = [max(c.width, len(c.header)) for c in columns]

    def line(cells: Iterable[str]) -> str:
        return " ".join(f"{text:{'<' if c.left else '>'}{w}}" for c, w, text in zip(columns, widths, cells)).rstrip()

    header = line(c.header for c in columns)
    return "\n".join([header, "-" * len(header), *(line(c.cell(row) for c in columns) for row in rows)])


def markdown_table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """The same table in Markdown (labels left-aligned, numbers right-aligned)."""
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "| " + " | ".join("---" if c.left else "---:" for c in columns) + " |"]
    lines += ["| " + " | ".join(c.cell(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
