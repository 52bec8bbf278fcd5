"""Read raw rows (dicts) from JSONL / JSON files, `datasets` datasets and ``save_to_disk`` dirs.

Rows are numbered from 1: the line of a JSONL file, the item of a JSON array, the row of a
`datasets` split. Bad lines raise :class:`~rlhf.data.errors.DataError` naming file and line.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from typing import IO, Any

from rlhf.data.datasource import Container, DataSource
from rlhf.data.errors import DataError, RowLabel

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
JSON_SUFFIXES = (".json", ".json.gz")
#: Single data files that `datasets` reads with a packaged builder.
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
LOCAL_SUFFIXES = (*JSONL_SUFFIXES, *JSON_SUFFIXES, *FILE_BUILDERS)
#: Files that ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` write.
DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
ROW_LABELS: dict[str, RowLabel] = {
    "jsonl": "line", "json": "item", "datasets": "row", "disk": "row"
}


def looks_local(path: str) -> bool:
    """Whether ``path`` names a local file or directory rather than a hub dataset."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or path.endswith(LOCAL_SUFFIXES)
        or os.path.exists(path)
    )


def resolve_format(source: DataSource) -> Container:
    """The container of ``source``: its ``format``, or guessed from suffix / dir contents."""
    if source.format != "auto":
        return source.format
    path = os.path.expanduser(source.path)
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, m)) for m in DISK_MARKERS):
            return "disk"
        return "datasets"
    if path.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.endswith(JSON_SUFFIXES):
        return "json"
    return "datasets"


def row_label(source: DataSource) -> RowLabel:
    """How rows of ``source`` are numbered in messages: "line", "item" or "row"."""
    return ROW_LABELS[resolve_format(source)]


def iter_rows(source: DataSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(number, raw row)`` pairs from ``source``; the first bad line raises DataError.

    Raises FileNotFoundError at once (not on first ``next``) for a missing local path.
    """
    raw = iter_raw_rows(source)

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        for n, row in raw:
            if isinstance(row, DataError):
                raise row
            yield n, row

    return rows()


def iter_raw_rows(source: DataSource) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """Like :func:`iter_rows` but yields per-line DataErrors instead of raising them.

    File-level problems (missing file, bad gzip, JSON that does not parse) still raise.
    """
    fmt = resolve_format(source)
    path = os.path.expanduser(source.path)
    if (fmt in ("jsonl", "json", "disk") or looks_local(source.path)) and not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "data source not found", source.path)
    if fmt == "jsonl":
        return _iter_jsonl(path, source.path)
    if fmt == "json":
        return _iter_json(path, source.path)
    if fmt == "disk":
        return _iter_dataset(_load_disk(path, source.split))
    if fmt == "datasets":
        return _iter_dataset(_load_datasets(source, path))
    raise ValueError(f"unknown data format {fmt!r}; use auto, jsonl, json, datasets or disk")


def _open_binary(path: str) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing ``.gz``."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _json_type(value: Any) -> str:
    """JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _not_object(display: str, n: int, value: Any, label: RowLabel) -> DataError:
    return DataError(
        display, n, None, f"expected a JSON object, got {_json_type(value)}", label,
        kind="not an object",
    )


def _iter_jsonl(path: str, display: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """One JSON object per line; blank lines are ignored but still counted."""
    try:
        with _open_binary(path) as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    problem = f"not valid UTF-8 (byte {e.start + 1} of the line)"
                    yield n, DataError(display, n, None, problem, "line", kind="not UTF-8")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    problem = f"invalid JSON: {e.msg} (column {e.colno})"
                    yield n, DataError(display, n, None, problem, "line", kind="invalid JSON")
                    continue
                yield n, obj if isinstance(obj, dict) else _not_object(display, n, obj, "line")
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(display, None, None, f"not a valid gzip file ({e})") from e


def _iter_json(path: str, display: str) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """A JSON array of objects, or an object holding the array under "data" or "rows"."""
    try:
        with _open_binary(path) as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(display, None, None, f"not a valid gzip file ({e})") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(display, line, None, "not valid UTF-8", "line", kind="not UTF-8") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"invalid JSON: {e.msg} (column {e.colno})"
        raise DataError(display, e.lineno, None, problem, "line", kind="invalid JSON") from e
    if isinstance(value, dict):
        inner = next((value[k] for k in ("data", "rows") if isinstance(value.get(k), list)), None)
        if inner is None:
            problem = "expected a JSON array of objects, or an object with a 'data' or 'rows' array"
            raise DataError(display, None, None, problem)
        value = inner
    if not isinstance(value, list):
        raise DataError(display, None, None, f"expected a JSON array, got {_json_type(value)}")
    return (
        (n, item if isinstance(item, dict) else _not_object(display, n, item, "item"))
        for n, item in enumerate(value, 1)
    )


def _load_disk(path: str, split: str) -> Any:
    """A ``save_to_disk`` directory; for a DatasetDict, its ``split``."""
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (has: {', '.join(ds)})")
        ds = ds[split]
    return ds


def _load_datasets(source: DataSource, path: str) -> Any:
    """``datasets.load_dataset`` by name or local data dir; a single data file by its builder."""
    import datasets

    suffix = os.path.splitext(path)[1]
    if os.path.isfile(path):
        builder = FILE_BUILDERS.get(suffix) or ("json" if path.endswith(LOCAL_SUFFIXES) else None)
        if builder is None:
            raise ValueError(f"{source.path}: cannot tell how to read this file; name its format")
        return datasets.load_dataset(builder, data_files=path, split=source.split)
    return datasets.load_dataset(
        path if looks_local(source.path) else source.path,
        name=source.subset,
        split=source.split,
        data_dir=source.data_dir,
    )


def _iter_dataset(ds: Any) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """Rows of a `datasets` Dataset as plain dicts."""
    for n, row in enumerate(ds, 1):
        yield n, dict(row)
