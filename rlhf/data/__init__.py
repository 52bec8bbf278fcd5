"""Data records and loaders: typed records, located data errors, and data sources."""

from __future__ import annotations

from rlhf.data.datamodules import (
    ComparisonDataModule,
    DemonstrationDataModule,
    PromptDataModule,
    RLHFDataModule,
)
from rlhf.data.datasource import DataSource
from rlhf.data.errors import DataError, RowProblem, SkippedRows
from rlhf.data.readers import iter_rows
from rlhf.data.records import (
    ROLES,
    Comparison,
    Conversation,
    Demonstration,
    PromptLike,
    PromptRecord,
    Ranking,
    Turn,
    as_conversation,
    comparison_as_ranking,
    conversation_text,
)
from rlhf.data.sources import (
    LoadResult,
    RecordKind,
    load_records,
    parse_hh_dialogue,
    split_hh_dialogue,
    split_hh_pair,
)

__all__ = [
    "ComparisonDataModule",
    "DemonstrationDataModule",
    "PromptDataModule",
    "RLHFDataModule",
    "ROLES",
    "Comparison",
    "Conversation",
    "DataError",
    "DataSource",
    "Demonstration",
    "LoadResult",
    "PromptLike",
    "PromptRecord",
    "Ranking",
    "RecordKind",
    "RowProblem",
    "SkippedRows",
    "Turn",
    "as_conversation",
    "comparison_as_ranking",
    "conversation_text",
    "iter_rows",
    "load_records",
    "parse_hh_dialogue",
    "split_hh_dialogue",
    "split_hh_pair",
]
