"""Stage outputs and checkpoints written atomically, with a marker saying outputs are complete.

A stage writes its whole output directory under a temporary name and renames it into place, so
a crash never leaves a directory that the next stage would take as complete. The marker file
``rlhf_stage.json`` is written last, inside the temporary directory. Checkpoint files go the
same way (:func:`atomic_file`, :class:`AtomicCheckpointIO`): written to a hidden temporary
file next to the target, flushed to disk, then renamed over it, so ``last.ckpt`` is always
either the previous checkpoint or the new one, never half of one.

Temporaries a killed save left behind (``.<name>.tmp-*``, ``.<name>.old-*``) are removed by
the next save of the same target (:func:`remove_stale_temporaries`; one writer per target:
rank zero saves, and the pipeline holds a lock per output). A directory that holds another
stage's output is never replaced whole (:func:`check_replaceable`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

STAGE_MARKER = "rlhf_stage.json"
TEMPORARY_TAGS = (".tmp-", ".old-")

log = logging.getLogger("rlhf.outputs")


class OutputDirError(ValueError):
    """An output directory that saving would replace together with other outputs in it."""


def remove_stale_temporaries(final: str | os.PathLike) -> list[Path]:
    """Delete what killed saves of ``final`` left next to it (``.<name>.tmp-*`` files or
    directories, ``.<name>.old-*`` directories); returns what was removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    for tag in TEMPORARY_TAGS:
        for path in final.parent.glob(f".{final.name}{tag}*"):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted save of %s", len(removed), final)
    return removed


def nested_stage_output(directory: str | os.PathLike) -> Path | None:
    """A directory strictly inside ``directory`` holding a stage marker (another stage's
    output), or ``None``."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for root, dirs, files in os.walk(directory):
        if STAGE_MARKER in files and Path(root) != directory:
            return Path(root)
        dirs.sort()
    return None


def check_replaceable(final: str | os.PathLike, keep: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse (:class:`OutputDirError`) an output directory whose atomic replacement would
    delete another stage's output, or one of the ``keep`` paths (a run's logs and checkpoints)
    inside it."""
    final = Path(final).resolve()
    nested = nested_stage_output(final)
    if nested is not None:
        raise OutputDirError(
            f"output_dir {final} holds another stage's output {nested} ({STAGE_MARKER}); saving "
            f"replaces {final} whole and would delete it: choose an output_dir that is not a "
            f"parent of another output"
        )
    for path in keep:
        path = Path(path).resolve()
        if path == final or final in path.parents:
            raise OutputDirError(
                f"output_dir {final} contains {path} (this run's logs / checkpoints); saving "
                f"replaces {final} whole and would delete them: choose another output_dir"
            )


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` when the block succeeds.

    On an exception the temporary directory is removed and ``final`` is left as it was. Refuses
    (:func:`check_replaceable`) a ``final`` that holds another stage's output.
    """
    final = Path(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def write_stage_marker(directory: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write the completeness marker (stage name, metrics, paths) into ``directory``."""
    with open(Path(directory) / STAGE_MARKER, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True, default=str)


def read_stage_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The marker of a complete stage output, or ``None`` when the directory is not complete."""
    path = Path(directory) / STAGE_MARKER
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``final``'s directory; when the block succeeds the file there
    is flushed to disk and renamed to ``final`` (replacing it). On an exception the temporary
    file is removed and ``final`` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(rows: Iterable[dict[str, Any]], out: str | os.PathLike) -> Path:
    """Write ``rows`` as JSON lines to ``out`` through :func:`atomic_file`: a reader never sees a
    half-written file, and an interrupted write leaves the old one."""
    out = Path(out)
    with atomic_file(out) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return out


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, writing local files through :func:`atomic_file`.

    (Lightning's own "atomic" save stages the file in the system temp directory and moves it,
    which is a copy, not a rename, when that is another file system.) Remote paths
    (``s3://...``) keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)


def use_atomic_checkpoints(trainer: Any) -> None:
    """Make ``trainer`` (a Lightning ``Trainer``) write checkpoints with
    :class:`AtomicCheckpointIO` when it uses the default single-file checkpoint IO (sharded
    strategies keep their own)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
