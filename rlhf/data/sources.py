"""Turn rows of a data source into typed records, reporting or skipping bad rows.

Three schemas:

* ``fields``: one column per canonical field (remappable with ``DataSource.fields``):
  demonstration ``prompt, response`` (or ``messages``); comparison ``prompt, chosen,
  rejected[, margin]``; ranking ``prompt, completions`` (best first, or ranked by an optional
  ``ranks`` list, 1 = best, ties allowed); prompt ``prompt``.
  A prompt is a string or a list of ``{"role", "content"}`` messages.
* ``hh_rlhf``: Anthropic HH-RLHF rows ``{"chosen", "rejected"}``, each a whole dialogue
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` sharing everything before the last Assistant turn.
* ``alpaca``: ``instruction, input, output[, history]``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from rlhf.data.datasource import DataSource
from rlhf.data.errors import DataError, RowProblem, SkippedRows
from rlhf.data.readers import iter_raw_rows, row_label
from rlhf.data.records import (
    ROLES,
    Comparison,
    Conversation,
    Demonstration,
    PromptRecord,
    Ranking,
    Turn,
)

logger = logging.getLogger("rlhf.data")

RecordKind = Literal["demonstration", "comparison", "ranking", "preference", "prompt"]
OnBadRow = Literal["error", "skip"]

#: Canonical field names each schema reads (keys allowed in ``DataSource.fields``).
SCHEMA_FIELDS: dict[str, tuple[str, ...]] = {
    "fields": (
        "prompt", "response", "messages", "chosen", "rejected", "margin", "completions", "ranks"
    ),
    "hh_rlhf": ("chosen", "rejected"),
    "alpaca": ("instruction", "input", "output", "history"),
}
#: Record kinds each schema can produce.
SCHEMA_KINDS: dict[str, tuple[str, ...]] = {
    "fields": ("demonstration", "comparison", "ranking", "preference", "prompt"),
    "hh_rlhf": ("demonstration", "comparison", "preference", "prompt"),
    "alpaca": ("demonstration", "prompt"),
}
#: How many bad rows are logged one by one in skip mode.
LOGGED_BAD_ROWS = 3


@dataclass
class LoadResult:
    """The records read, and the tally of rows skipped."""

    records: list[Any]
    skipped: SkippedRows


# ----------------------------------------------------------------------------- row access


@dataclass
class _Row:
    """A raw row seen through the ``fields`` remap."""

    data: Mapping[str, Any]
    fields: Mapping[str, str]

    def column(self, name: str) -> str:
        return self.fields.get(name, name)

    def has(self, name: str) -> bool:
        return self.data.get(self.column(name)) is not None

    def get(self, name: str) -> Any:
        """The value of canonical field ``name``; missing or null is a bad row."""
        column = self.column(name)
        if column not in self.data:
            raise RowProblem(name, "missing field")
        if self.data[column] is None:
            raise RowProblem(name, "missing field", "missing field (null)")
        return self.data[column]

    def text(self, name: str) -> str:
        return _text(self.get(name), name)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _text(value: Any, name: str, what: str = "") -> str:
    """``value`` as a non-blank string, else a bad row (``what`` locates nested values)."""
    if not isinstance(value, str):
        raise RowProblem(name, "wrong type", f"{what}expected a string, got {_type_name(value)}")
    if not value.strip():
        raise RowProblem(name, "empty string", f"{what}empty string")
    return value


def _messages(value: Any, name: str) -> Conversation:
    """A list of ``{"role", "content"}`` messages as a conversation."""
    if not isinstance(value, (list, tuple)):
        problem = f"expected a string or a list of messages, got {_type_name(value)}"
        raise RowProblem(name, "wrong type", problem)
    if not value:
        raise RowProblem(name, "empty conversation", "empty list of messages")
    turns = []
    for i, message in enumerate(value, 1):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            problem = f"message {i}: expected an object with 'role' and 'content'"
            raise RowProblem(name, "wrong type", problem)
        role = message["role"]
        if role not in ROLES:
            problem = f"message {i}: role {role!r} is not one of {', '.join(ROLES)}"
            raise RowProblem(name, "bad role", problem)
        turns.append(Turn(role, _text(message["content"], name, f"message {i}: ")))
    return tuple(turns)


def _ends_with_user(conversation: Conversation, name: str) -> Conversation:
    if not conversation or conversation[-1].role != "user":
        last = conversation[-1].role if conversation else "nothing"
        problem = f"prompt must end with a user turn, ends with {last}"
        raise RowProblem(name, "prompt does not end with a user turn", problem)
    return conversation


def _prompt(row: _Row, name: str = "prompt") -> Conversation:
    """A string prompt (one user turn) or a list of messages ending with a user turn."""
    value = row.get(name)
    if isinstance(value, str):
        return (Turn("user", _text(value, name)),)
    return _ends_with_user(_messages(value, name), name)


def _margin(row: _Row) -> float | None:
    if not row.has("margin"):
        return None
    value = row.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem("margin", "wrong type", f"expected a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise RowProblem("margin", "wrong type", f"expected a finite number, got {value}")
    return float(value)


def _check_distinct(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise RowProblem("rejected", "chosen == rejected")


# ----------------------------------------------------------------------------- schema "fields"


def _fields_demonstration(row: _Row) -> Demonstration:
    if not row.has("prompt") and row.has("messages"):
        conversation = _messages(row.get("messages"), "messages")
        if len(conversation) < 2 or conversation[-1].role != "assistant":
            problem = "expected a conversation whose last message is the assistant's response"
            raise RowProblem("messages", "no assistant response", problem)
        prompt = _ends_with_user(conversation[:-1], "messages")
        return Demonstration(prompt, conversation[-1].content)
    return Demonstration(_prompt(row), row.text("response"))


def _fields_prompt(row: _Row) -> PromptRecord:
    if not row.has("prompt") and row.has("messages"):
        conversation = _messages(row.get("messages"), "messages")
        if conversation[-1].role == "assistant":
            conversation = conversation[:-1]
        return PromptRecord(_ends_with_user(conversation, "messages"))
    return PromptRecord(_prompt(row))


def _fields_comparison(row: _Row) -> Comparison:
    prompt = _prompt(row)
    chosen, rejected = row.text("chosen"), row.text("rejected")
    _check_distinct(chosen, rejected)
    return Comparison(prompt, chosen, rejected, _margin(row))


def _fields_ranking(row: _Row) -> Ranking:
    prompt = _prompt(row)
    value = row.get("completions")
    if not isinstance(value, (list, tuple)):
        raise RowProblem("completions", "wrong type", f"expected a list, got {_type_name(value)}")
    completions = tuple(
        _text(c, "completions", f"completion {i}: ") for i, c in enumerate(value, 1)
    )
    if len(completions) < 2:
        problem = f"a ranking needs at least 2 completions, got {len(completions)}"
        raise RowProblem("completions", "too few completions", problem)
    if len({c.strip() for c in completions}) < len(completions):
        raise RowProblem("completions", "duplicate completions")
    return Ranking(prompt, completions, _ranks(row, len(completions)))


def _ranks(row: _Row, k: int) -> tuple[int, ...] | None:
    """The optional ``ranks`` column: one integer per completion, 1 = best, ties allowed."""
    if row.column("ranks") not in row.data:
        return None
    value = row.data[row.column("ranks")]
    if value is None or (isinstance(value, (list, tuple)) and all(r is None for r in value)):
        raise RowProblem("ranks", "ranks not filled in", "ranks not filled in (null): rank the completions, 1 = best")
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(r, int) and not isinstance(r, bool) for r in value
    ):
        raise RowProblem("ranks", "wrong type", f"expected a list of integers, got {value!r}")
    if len(value) != k:
        raise RowProblem("ranks", "wrong length", f"{len(value)} ranks for {k} completions")
    if len(set(value)) < 2:
        raise RowProblem("ranks", "all tied", "every completion has the same rank: no preference")
    return tuple(value)


def _fields_preference(row: _Row) -> Comparison | Ranking:
    return _fields_ranking(row) if row.has("completions") else _fields_comparison(row)


# ----------------------------------------------------------------------------- schema "hh_rlhf"

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_ASSISTANT = "\n\nAssistant:"


def parse_hh_dialogue(text: str) -> Conversation:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> (user "a", assistant "b"); turns stripped."""
    text = "\n\n" + text.lstrip()
    parts = _HH_MARKER.split(text)
    if len(parts) < 3:
        raise RowProblem(None, "malformed dialogue", "no 'Human:' or 'Assistant:' turns")
    return tuple(
        Turn(_HH_ROLES[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])
    )


def split_hh_dialogue(text: str, require_reply: bool = True) -> tuple[Conversation, str]:
    """Split one HH dialogue at its last Assistant turn into (prompt, final reply)."""
    text = "\n\n" + text.lstrip()
    cut = text.rfind(_HH_ASSISTANT)
    if cut < 0:
        raise RowProblem(None, "no Assistant turn", "dialogue has no 'Assistant:' turn")
    prompt = parse_hh_dialogue(text[:cut]) if text[:cut].strip() else ()
    reply = text[cut + len(_HH_ASSISTANT) :].strip()
    if not prompt:
        raise RowProblem(None, "malformed dialogue", "no Human turn before the last Assistant turn")
    if prompt[-1].role != "user":
        problem = "the last Assistant turn follows another Assistant turn, not a Human turn"
        raise RowProblem(None, "prompt does not end with a user turn", problem)
    if require_reply and not reply:
        raise RowProblem(None, "empty string", "empty final Assistant reply")
    return prompt, reply


def split_hh_pair(chosen: str, rejected: str) -> tuple[Conversation, str, str]:
    """Split an HH pair into (shared prompt, chosen reply, rejected reply).

    Raises :class:`RowProblem` (a ValueError) when either dialogue is malformed, the two
    prompts differ, or the two replies are the same.
    """
    prompt, chosen_reply = _hh_field(chosen, "chosen")
    rejected_prompt, rejected_reply = _hh_field(rejected, "rejected")
    if prompt != rejected_prompt:
        problem = "chosen and rejected differ before their last Assistant turn"
        raise RowProblem("rejected", "prompts differ", problem)
    _check_distinct(chosen_reply, rejected_reply)
    return prompt, chosen_reply, rejected_reply


def _hh_field(text: Any, name: str, require_reply: bool = True) -> tuple[Conversation, str]:
    """:func:`split_hh_dialogue` on field ``name``, with problems attributed to it."""
    try:
        return split_hh_dialogue(_text(text, name), require_reply)
    except RowProblem as p:
        if p.field is None:
            p.field = name
        raise


def _hh_demonstration(row: _Row) -> Demonstration:
    return Demonstration(*_hh_field(row.get("chosen"), "chosen"))


def _hh_prompt(row: _Row) -> PromptRecord:
    return PromptRecord(_hh_field(row.get("chosen"), "chosen", require_reply=False)[0])


def _hh_comparison(row: _Row) -> Comparison:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    return Comparison(*split_hh_pair(_text(chosen, "chosen"), _text(rejected, "rejected")))


# ----------------------------------------------------------------------------- schema "alpaca"


def _alpaca_prompt(row: _Row) -> Conversation:
    """History turns, then the instruction (and input, after a blank line) as the user turn."""
    user = row.text("instruction")
    if row.has("input"):
        extra = row.get("input")
        if not isinstance(extra, str):
            raise RowProblem("input", "wrong type", f"expected a string, got {_type_name(extra)}")
        if extra.strip():
            user = f"{user}\n\n{extra}"
    turns: list[Turn] = []
    if row.has("history"):
        history = row.get("history")
        if not isinstance(history, (list, tuple)):
            problem = f"expected a list of [user, assistant] pairs, got {_type_name(history)}"
            raise RowProblem("history", "wrong type", problem)
        for i, pair in enumerate(history, 1):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                problem = f"entry {i}: expected a [user, assistant] pair"
                raise RowProblem("history", "wrong type", problem)
            turns.append(Turn("user", _text(pair[0], "history", f"entry {i}: ")))
            turns.append(Turn("assistant", _text(pair[1], "history", f"entry {i}: ")))
    return (*turns, Turn("user", user))


def _alpaca_demonstration(row: _Row) -> Demonstration:
    return Demonstration(_alpaca_prompt(row), row.text("output"))


def _alpaca_prompt_record(row: _Row) -> PromptRecord:
    return PromptRecord(_alpaca_prompt(row))


# ----------------------------------------------------------------------------- loading

_PARSERS: dict[tuple[str, str], Callable[[_Row], Any]] = {
    ("fields", "demonstration"): _fields_demonstration,
    ("fields", "comparison"): _fields_comparison,
    ("fields", "ranking"): _fields_ranking,
    ("fields", "preference"): _fields_preference,
    ("fields", "prompt"): _fields_prompt,
    ("hh_rlhf", "demonstration"): _hh_demonstration,
    ("hh_rlhf", "comparison"): _hh_comparison,
    ("hh_rlhf", "preference"): _hh_comparison,
    ("hh_rlhf", "prompt"): _hh_prompt,
    ("alpaca", "demonstration"): _alpaca_demonstration,
    ("alpaca", "prompt"): _alpaca_prompt_record,
}


def _check_config(source: DataSource, kind: str, on_bad_row: str) -> None:
    """Reject a kind/schema/fields/on_bad_row combination before reading anything."""
    if source.schema not in SCHEMA_KINDS:
        raise ValueError(f"unknown schema {source.schema!r}; use one of {', '.join(SCHEMA_KINDS)}")
    if kind not in SCHEMA_KINDS["fields"]:
        kinds = ", ".join(SCHEMA_KINDS["fields"])
        raise ValueError(f"unknown record kind {kind!r}; use one of {kinds}")
    if kind not in SCHEMA_KINDS[source.schema]:
        raise ValueError(
            f"schema {source.schema!r} cannot give {kind} records; "
            f"it gives {', '.join(SCHEMA_KINDS[source.schema])}"
        )
    unknown = sorted(set(source.fields) - set(SCHEMA_FIELDS[source.schema]))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)} in fields for schema {source.schema!r}; "
            f"known: {', '.join(SCHEMA_FIELDS[source.schema])}"
        )
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if source.limit is not None and source.limit < 0:
        raise ValueError(f"limit must be >= 0, got {source.limit}")


def load_records(
    source: DataSource, kind: RecordKind, on_bad_row: OnBadRow = "error"
) -> LoadResult:
    """Read ``source`` as records of ``kind``.

    ``kind`` gives :class:`Demonstration`, :class:`Comparison`, :class:`Ranking` or
    :class:`PromptRecord`; "preference" gives a Comparison or a Ranking per row. A bad row
    raises :class:`DataError` (``on_bad_row="error"``) or is counted and skipped ("skip").
    """
    _check_config(source, kind, on_bad_row)
    parse = _PARSERS[(source.schema, kind)]
    label = row_label(source)
    records: list[Any] = []
    skipped = SkippedRows(source.path)
    if source.limit == 0:
        return LoadResult(records, skipped)
    for n, raw in iter_raw_rows(source):
        if isinstance(raw, DataError):
            error = raw
        else:
            try:
                records.append(parse(_Row(raw, source.fields)))
            except RowProblem as p:
                if p.field is not None and p.column is None:
                    p.column = source.fields.get(p.field, p.field)
                error = DataError.from_problem(source.path, n, p, label)
            else:
                if source.limit is not None and len(records) >= source.limit:
                    break
                continue
        if on_bad_row == "error":
            raise error
        skipped.add(error.kind)
        if skipped.total <= LOGGED_BAD_ROWS:
            logger.warning("skipping bad row: %s", error)
    if skipped.total:
        logger.warning(skipped.summary())
    return LoadResult(records, skipped)
