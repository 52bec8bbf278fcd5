"""Where a data set's rows come from and how they are laid out: :class:`DataSource`.

Both the row readers (:mod:`rlhf.data.readers`) and the record parsers
(:mod:`rlhf.data.sources`) take a DataSource; neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

#: How a source's file or folder is read ("auto" guesses from suffix / folder contents).
Container = Literal["jsonl", "json", "datasets", "disk"]
#: How a row's columns map onto a record (see :mod:`rlhf.data.sources`).
Schema = Literal["fields", "hh_rlhf", "alpaca"]


@dataclass
class DataSource:
    """Where records come from and how their rows are laid out."""

    path: str  # file, save_to_disk dir, or a `datasets` name / local data dir
    format: Literal["auto", "jsonl", "json", "datasets", "disk"] = "auto"
    schema: Schema = "fields"
    fields: dict[str, str] = field(default_factory=dict)  # canonical name -> column name
    split: str = "train"  # datasets / disk only
    subset: str | None = None  # datasets config name
    data_dir: str | None = None
    limit: int | None = None  # keep the first N good rows
