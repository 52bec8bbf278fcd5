"""How ``rlhf.pipeline`` runs a stage: next to each output ``<dir>/<name>`` a lock and a record,
and the stage as a child process that the pipeline's signals reach.

- ``<dir>/.<name>.pipeline.lock`` is held (``fcntl.flock``) while a pipeline runs with that
  output, so a second pipeline on the same outputs refuses to start (:func:`hold_locks`). The
  operating system releases it however the holder exits, so a lock file left by a killed
  pipeline blocks nothing.
- ``<dir>/.<name>.pipeline.json`` records the stage's fingerprint (:func:`fingerprint`: its
  command, a hash of each config file, the stamps of the earlier stages' outputs) when it last
  started (``"status": "started"``) and completed (``"complete"``). A complete output whose
  recorded fingerprint no longer matches is stale; a started run with the same fingerprint is
  the one to resume. Data files a config names are not fingerprinted.
- :func:`run_child` passes SIGINT / SIGTERM on to the stage (as SIGTERM: finish the step, save
  a checkpoint, exit), and on Linux the stage gets SIGTERM if the pipeline dies.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import IO, Any

from rlhf.outputs import STAGE_MARKER, atomic_file

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class PipelineLockedError(RuntimeError):
    """Another pipeline holds the lock of one of this pipeline's outputs."""


def sidecar(output: Path, kind: str) -> Path:
    """``<dir>/.<name>.pipeline.<kind>`` next to the output ``<dir>/<name>``."""
    return output.parent / f".{output.name}.pipeline.{kind}"


def output_stamp(output: Path, fit: bool) -> int | None:
    """When an output was last written (ns): its stage marker for a ``fit`` stage; else the
    output itself, or for a directory the newest of it and its entries. ``None``: missing."""
    path = output / STAGE_MARKER if fit else output
    try:
        stamp = path.stat().st_mtime_ns
        if path.is_dir():
            stamp = max([stamp, *(entry.stat().st_mtime_ns for entry in os.scandir(path))])
    except FileNotFoundError:
        return None
    return stamp


def file_hash(path: Path) -> str | None:
    """SHA-256 of a file's bytes; ``None`` when it is missing."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def fingerprint(command: Sequence[str], configs: Sequence[Path], inputs: dict[str, int | None]) -> dict[str, Any]:
    """What a stage's output depends on: its command, its config files' hashes and the stamps
    of the earlier stages' outputs (``inputs``, by stage name)."""
    return {
        "command": list(command),
        "configs": {str(path): file_hash(path) for path in configs},
        "inputs": dict(inputs),
    }


def fingerprint_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Why ``recorded`` no longer matches ``current``, in words (empty when it matches)."""
    reasons = []
    if recorded.get("command") != current["command"]:
        reasons.append("its command or args changed")
    changed = [p for p, h in current["configs"].items() if recorded.get("configs", {}).get(p) != h]
    if changed:
        reasons.append(f"config {', '.join(changed)} changed")
    inputs = recorded.get("inputs", {})
    newer = [name for name, stamp in current["inputs"].items() if inputs.get(name) != stamp]
    if newer:
        reasons.append(f"{', '.join(newer)} changed since it ran")
    return reasons


def read_record(output: Path) -> dict[str, Any] | None:
    """The record next to ``output``, or ``None`` (none, or unreadable)."""
    try:
        record = json.loads(sidecar(output, "json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_record(output: Path, record: dict[str, Any]) -> None:
    """Write the record next to ``output`` atomically."""
    with atomic_file(sidecar(output, "json")) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _lock(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 (held open for the pipeline's run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise PipelineLockedError(
            f"another rlhf.pipeline (pid {holder}) is running with the output "
            f"{path.parent / path.name.removeprefix('.').removesuffix('.pipeline.lock')} "
            f"(lock {path}); wait for it to finish or stop it, then run again"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


@contextmanager
def hold_locks(outputs: Sequence[Path]) -> Iterator[None]:
    """Hold the lock of each output (in a fixed order) for the block; raise
    :class:`PipelineLockedError` naming the output another pipeline holds."""
    with ExitStack() as stack:
        for output in sorted({Path(os.path.abspath(o)) for o in outputs}):
            stack.enter_context(_lock(sidecar(output, "lock")))
        yield


# -- the stage process ---------------------------------------------------------------------------
def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: on Linux the stage gets SIGTERM (saves a checkpoint, exits) if the
    pipeline dies, even by ``kill -9``; elsewhere nothing."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform == "linux" else None

    def setup() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the pipeline died before that
                os.kill(os.getpid(), signal.SIGTERM)

    return setup


def run_child(command: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run ``command``, passing each SIGINT / SIGTERM this process gets on to it as SIGTERM
    (which a stage handles as a first Ctrl-C: finish the step, save a checkpoint, exit; one it
    also got from the terminal makes no difference). Returns its exit code and the first
    signal received (``None`` if none)."""
    process: subprocess.Popen | None = None
    received: list[int] = []

    def stop_child() -> None:
        try:
            if process is not None:
                process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        os.write(2, f"[rlhf.pipeline] {signal.Signals(signum).name}: stopping the stage\n".encode())
        stop_child()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS} if main_thread else {}
    try:
        # (preexec_fn: the pipeline runs no threads.)
        process = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent(os.getpid()))  # noqa: PLW1509
        if received:  # a signal came while it started
            stop_child()
        while True:
            try:
                return process.wait(), (received[0] if received else None)
            except KeyboardInterrupt:  # no handler (not the main thread): Ctrl-C came here
                forward(signal.SIGINT, None)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupted_exit_code(code: int, signum: int) -> int:
    """The pipeline's exit code when ``signum`` stopped a stage that exited with ``code``: the
    stage's own when it reports a signal (``128 + n``, or killed by one), else ``128 + signum``."""
    if code >= 128:
        return code
    return 128 - code if code < 0 else 128 + signum
