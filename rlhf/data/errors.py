"""Errors for bad data rows, and a tally of the rows skipped.

A :class:`DataError` always says where the problem is: the file (or dataset name), the
line / item / row number and the field, e.g.
``data/train.jsonl: line 12: field 'response' (column 'answer'): empty string``.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

RowLabel = Literal["line", "item", "row"]


class RowProblem(ValueError):
    """One row is unusable; raised by per-row parsers, which do not know file or line.

    ``kind`` is a short category used to tally skipped rows ("empty string", "wrong type",
    ...); ``problem`` is the full explanation; ``column`` is the column name in the data
    when it differs from the canonical ``field``.
    """

    def __init__(
        self,
        field: str | None,
        kind: str,
        problem: str | None = None,
        column: str | None = None,
    ) -> None:
        self.field = field
        self.kind = kind
        self.problem = problem or kind
        self.column = column
        super().__init__(_where(None, "row", field, column) + self.problem)


class DataError(ValueError):
    """A bad row (or file), located by ``source``, ``row`` and ``field``."""

    def __init__(
        self,
        source: str,
        row: int | None,
        field: str | None,
        problem: str,
        row_label: RowLabel = "line",
        *,
        column: str | None = None,
        kind: str | None = None,
    ) -> None:
        self.source = source
        self.row = row
        self.field = field
        self.problem = problem
        self.row_label = row_label
        self.column = column
        self.kind = kind or problem
        super().__init__(f"{source}: " + _where(row, row_label, field, column) + problem)

    @classmethod
    def from_problem(
        cls, source: str, row: int | None, problem: RowProblem, row_label: RowLabel = "line"
    ) -> DataError:
        """Locate a :class:`RowProblem` in ``source`` at ``row``."""
        return cls(
            source,
            row,
            problem.field,
            problem.problem,
            row_label,
            column=problem.column,
            kind=problem.kind,
        )


def _where(row: int | None, row_label: str, field: str | None, column: str | None) -> str:
    """The ``line 3: field 'x': `` part of a message (parts omitted when unknown)."""
    out = f"{row_label} {row}: " if row is not None else ""
    if field is not None:
        out += f"field '{field}'"
        if column is not None and column != field:
            out += f" (column '{column}')"
        out += ": "
    return out


class SkippedRows(Counter):
    """Counts of skipped rows by problem kind, for one source."""

    def __init__(self, source: str = "") -> None:
        super().__init__()
        self.source = source

    def add(self, kind: str) -> None:
        """Count one skipped row with problem ``kind``."""
        self[kind] += 1

    @property
    def total(self) -> int:
        """Number of rows skipped."""
        return sum(self.values())

    def summary(self) -> str:
        """E.g. ``skipped 3 bad rows in data/x.jsonl (2 empty string, 1 chosen == rejected)``."""
        total = self.total
        noun = "row" if total == 1 else "rows"
        where = f" in {self.source}" if self.source else ""
        parts = ", ".join(f"{n} {kind}" for kind, n in self.most_common())
        return f"skipped {total} bad {noun}{where}" + (f" ({parts})" if parts else "")
