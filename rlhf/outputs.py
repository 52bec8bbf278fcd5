"""Stage outputs written atomically, with a marker saying they are complete.

A stage writes its whole output directory under a temporary name and renames it into place, so
a crash never leaves a directory that the next stage would take as complete. The marker file
``rlhf_stage.json`` is written last, inside the temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGE_MARKER = "rlhf_stage.json"


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` when the block succeeds.

    On an exception the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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
