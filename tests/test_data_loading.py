"""Loading records from files and `datasets`: schemas, containers, and bad-row reporting."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from rlhf.data import (
    Comparison,
    DataError,
    DataSource,
    Demonstration,
    PromptRecord,
    Ranking,
    SkippedRows,
    Turn,
    iter_rows,
    load_records,
    parse_hh_dialogue,
    split_hh_pair,
)

REPO = Path(__file__).resolve().parents[1]
HH = REPO / "data" / "hh-rlhf"
SEED_TASKS = REPO / "data" / "self-instruct-seed" / "seed_tasks.jsonl"
LIMA = Path("/work/shared/data/lima/lima.json")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def load(path: Path, kind: str, on_bad_row: str = "error", **kw: Any):
    return load_records(DataSource(str(path), **kw), kind, on_bad_row)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep `datasets` caches inside the test's tmp dir."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets.disable_progress_bars()
    return tmp_path


# ----------------------------------------------------------------------------- records


def test_ranking_of_three_gives_three_ordered_pairs() -> None:
    ranking = Ranking((Turn("user", "q"),), ("best", "mid", "worst"))
    assert ranking.pairs() == [(0, 1), (0, 2), (1, 2)]
    assert [(c.chosen, c.rejected) for c in ranking.to_comparisons()] == [
        ("best", "mid"),
        ("best", "worst"),
        ("mid", "worst"),
    ]
    assert all(c.prompt == ranking.prompt for c in ranking.to_comparisons())


def test_ranking_rows_load_best_first(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "completions": ["a", "b", "c"]}])
    [ranking] = load(path, "ranking").records
    assert ranking == Ranking((Turn("user", "q"),), ("a", "b", "c"))
    assert len(ranking.to_comparisons()) == 3


def test_preference_mixes_comparisons_and_rankings(tmp_path: Path) -> None:
    rows = [
        {"prompt": "q1", "chosen": "good", "rejected": "bad", "margin": 2},
        {"prompt": "q2", "completions": ["x", "y", "z"]},
    ]
    comparison, ranking = load(write_jsonl(tmp_path / "p.jsonl", rows), "preference").records
    assert comparison == Comparison((Turn("user", "q1"),), "good", "bad", 2.0)
    assert isinstance(ranking, Ranking) and ranking.completions == ("x", "y", "z")


# ----------------------------------------------------------------------------- hh-rlhf


def test_parse_hh_dialogue_and_split_pair() -> None:
    chosen = "\n\nHuman: Hi there \n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant:  Sure. "
    rejected = "\n\nHuman: Hi there \n\nAssistant: Hello!\n\nHuman: Help?\n\nAssistant: No."
    assert parse_hh_dialogue(chosen) == (
        Turn("user", "Hi there"),
        Turn("assistant", "Hello!"),
        Turn("user", "Help?"),
        Turn("assistant", "Sure."),
    )
    prompt, good, bad = split_hh_pair(chosen, rejected)
    assert prompt == (Turn("user", "Hi there"), Turn("assistant", "Hello!"), Turn("user", "Help?"))
    assert (good, bad) == ("Sure.", "No.")
    with pytest.raises(ValueError, match="differ"):
        split_hh_pair(chosen, rejected.replace("Help?", "Help me?"))
    with pytest.raises(ValueError, match="chosen == rejected"):
        split_hh_pair(chosen, chosen)
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_pair("\n\nHuman: only a question", rejected)


def test_hh_real_rows_harmless_base() -> None:
    path = HH / "harmless-base" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    result = load(path, "comparison", "skip", schema="hh_rlhf")
    # 2312 rows: 4 with an empty chosen reply, 5 whose chosen/rejected prompts differ
    # because one side has two Assistant turns in a row; none with chosen == rejected.
    assert len(raw) == 2312
    assert len(result.records) == 2303
    assert result.skipped.total == 9
    assert result.skipped == {"empty string": 4, "prompt does not end with a user turn": 5}

    first, row = result.records[0], raw[0]
    cut = row["chosen"].rfind("\n\nAssistant:")
    assert row["rejected"][:cut] == row["chosen"][:cut]
    assert first.chosen == row["chosen"][cut + len("\n\nAssistant:") :].strip()
    assert first.rejected == row["rejected"][cut + len("\n\nAssistant:") :].strip()
    assert [t.role for t in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0].content == "what are some pranks with a pen i can do?"
    assert first.prompt[2].content == "yep"
    assert first.prompt[-1].content == "okay some of these do not have anything to do with pens"
    turns = row["chosen"][:cut].split("\n\nHuman: ")[1:]
    assert [t.content for t in first.prompt if t.role == "user"] == [
        t.split("\n\nAssistant: ")[0].strip() for t in turns
    ]

    with pytest.raises(DataError) as info:
        load(path, "comparison", schema="hh_rlhf")
    assert str(info.value) == f"{path}: line 87: field 'chosen': empty final Assistant reply"


def test_hh_real_rows_chosen_equals_rejected_dropped() -> None:
    path = HH / "helpful-rejection-sampled" / "test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    same = sum(r["chosen"] == r["rejected"] for r in rows)
    result = load(path, "preference", "skip", schema="hh_rlhf")
    assert same == 32
    assert result.skipped["chosen == rejected"] == same
    assert len(result.records) + result.skipped.total == len(rows)
    assert all(isinstance(r, Comparison) and r.chosen != r.rejected for r in result.records)


def test_hh_demonstrations_and_prompts() -> None:
    path = HH / "helpful-online" / "test.jsonl.gz"
    demos = load(path, "demonstration", "skip", schema="hh_rlhf").records
    prompts = load(path, "prompt", "skip", schema="hh_rlhf", limit=10).records
    assert all(isinstance(d, Demonstration) and d.response for d in demos)
    assert len(demos) == 1137  # demonstrations read only "chosen", which is never empty here
    assert len(prompts) == 10 and prompts[0] == PromptRecord(demos[0].prompt)


def test_hh_fields_remap(tmp_path: Path) -> None:
    row = {"good": "\n\nHuman: q\n\nAssistant: a", "bad": "\n\nHuman: q\n\nAssistant: b"}
    path = write_jsonl(tmp_path / "hh.jsonl", [row])
    fields = {"chosen": "good", "rejected": "bad"}
    [c] = load(path, "comparison", schema="hh_rlhf", fields=fields).records
    assert c == Comparison((Turn("user", "q"),), "a", "b")


# ----------------------------------------------------------------------------- bad rows

GOOD = {
    "demonstration": {"prompt": "q", "response": "a"},
    "comparison": {"prompt": "q", "chosen": "a", "rejected": "b"},
    "ranking": {"prompt": "q", "completions": ["a", "b"]},
}

Q = {"prompt": "q"}
BAD_ROWS = [
    ("demonstration", {"prompt": "q"}, "response", "missing field"),
    ("demonstration", {**Q, "response": None}, "response", "missing field"),
    ("demonstration", {"prompt": 3, "response": "a"}, "prompt", "expected a string"),
    ("demonstration", {**Q, "response": 42}, "response", "expected a string, got int"),
    ("demonstration", {"prompt": "", "response": "a"}, "prompt", "empty string"),
    ("demonstration", {**Q, "response": " \n\t"}, "response", "empty string"),
    ("demonstration", {"messages": [{"role": "user", "content": "q"}]}, "messages", "assistant"),
    (
        "demonstration",
        {"prompt": [{"role": "bot", "content": "q"}], "response": "a"},
        "prompt",
        "role 'bot'",
    ),
    (
        "demonstration",
        {"prompt": [{"role": "assistant", "content": "q"}], "response": "a"},
        "prompt",
        "end with a user turn",
    ),
    ("comparison", {**Q, "chosen": "a", "rejected": "a"}, "rejected", "chosen == rejected"),
    ("comparison", {**Q, "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "a number"),
    ("ranking", {**Q, "completions": ["a"]}, "completions", "at least 2 completions"),
    ("ranking", {**Q, "completions": ["a", "b", "a"]}, "completions", "duplicate completions"),
    ("ranking", {**Q, "completions": ["a", ""]}, "completions", "completion 2: empty string"),
    ("ranking", {**Q, "completions": "a, b"}, "completions", "expected a list"),
]


@pytest.mark.parametrize(("kind", "row", "field", "problem"), BAD_ROWS)
def test_bad_row_error_names_file_line_and_field(
    tmp_path: Path, kind: str, row: dict, field: str, problem: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[kind], row])
    with pytest.raises(DataError) as info:
        load(path, kind)
    err = info.value
    assert (err.source, err.row, err.field, err.row_label) == (str(path), 2, field, "line")
    assert str(err).startswith(f"{path}: line 2: field '{field}': ")
    assert problem in str(err)


def test_bad_hh_row_without_assistant_turn(tmp_path: Path) -> None:
    row = {"chosen": "\n\nHuman: hello", "rejected": "\n\nHuman: hello\n\nAssistant: hi"}
    path = write_jsonl(tmp_path / "hh.jsonl", [row])
    with pytest.raises(DataError, match=r"line 1: field 'chosen': .*no 'Assistant:' turn"):
        load(path, "comparison", schema="hh_rlhf")


def test_bad_row_names_remapped_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "  "}])
    fields = {"prompt": "question", "response": "answer"}
    with pytest.raises(DataError) as info:
        load(path, "demonstration", fields=fields)
    assert str(info.value) == f"{path}: line 1: field 'response' (column 'answer'): empty string"


def test_data_error_message_format() -> None:
    assert str(DataError("f.json", 3, "x", "bad", "item")) == "f.json: item 3: field 'x': bad"
    assert str(DataError("f.jsonl", 3, None, "bad")) == "f.jsonl: line 3: bad"
    assert str(DataError("f.jsonl", None, None, "bad")) == "f.jsonl: bad"
    assert isinstance(DataError("f", 1, None, "bad"), ValueError)


def test_skip_mode_counts_logs_and_limits(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "a", "rejected": "a"},
        {"prompt": "q3", "chosen": "", "rejected": "b"},
        {"prompt": "q4", "chosen": "a", "rejected": "b"},
        {"prompt": "q5", "chosen": " ", "rejected": "b"},
        {"prompt": "q6", "rejected": "b"},
        {"prompt": "q7", "chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        result = load(path, "comparison", "skip")
    assert [r.prompt[0].content for r in result.records] == ["q1", "q4", "q7"]
    assert result.skipped == {"empty string": 2, "chosen == rejected": 1, "missing field": 1}
    assert result.skipped.total == 4
    assert result.skipped.summary() == (
        f"skipped 4 bad rows in {path} (2 empty string, 1 chosen == rejected, 1 missing field)"
    )
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4  # the first 3 bad rows, then the summary
    assert f"{path}: line 2: field 'rejected'" in messages[0]
    assert messages[-1] == result.skipped.summary()

    limited = load(path, "comparison", "skip", limit=2)
    assert [r.prompt[0].content for r in limited.records] == ["q1", "q4"]
    assert limited.skipped.total == 2  # reading stops at the second good row


def test_skipped_rows_summary() -> None:
    skipped = SkippedRows("data/x.jsonl")
    for kind in ["empty string", "chosen == rejected", "empty string"]:
        skipped.add(kind)
    assert skipped.summary() == (
        "skipped 3 bad rows in data/x.jsonl (2 empty string, 1 chosen == rejected)"
    )


# ----------------------------------------------------------------------------- containers

ROWS = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
REMAP = {"prompt": "question", "response": "answer"}
EXPECTED = [Demonstration((Turn("user", "q1"),), "a1"), Demonstration((Turn("user", "q2"),), "a2")]


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl_containers_with_field_remap(tmp_path: Path, name: str) -> None:
    path = write_jsonl(tmp_path / name, ROWS)
    assert load(path, "demonstration", fields=REMAP).records == EXPECTED


@pytest.mark.parametrize("key", [None, "data", "rows"])
@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_json_containers(tmp_path: Path, name: str, key: str | None) -> None:
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        json.dump(ROWS if key is None else {key: ROWS}, f, indent=2)
    assert load(path, "demonstration", fields=REMAP).records == EXPECTED


def test_json_bad_item_is_named_by_item(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([ROWS[0], {"question": "q"}]))
    message = r"d\.json: item 2: field 'response' \(column 'answer'\): missing field"
    with pytest.raises(DataError, match=message):
        load(path, "demonstration", fields=REMAP)


def test_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    good = json.dumps({"prompt": "q", "response": "a"}).encode()
    lines = [good, b"{not json", b"[1, 2]", b"", b'{"prompt": "\xff"}', good]
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = iter_rows(DataSource(str(path)))
    assert next(rows) == (1, {"prompt": "q", "response": "a"})
    with pytest.raises(DataError, match=rf"^{path}: line 2: invalid JSON"):
        next(rows)
    result = load(path, "demonstration", "skip")
    assert len(result.records) == 2
    assert result.skipped == {"invalid JSON": 1, "not an object": 1, "not UTF-8": 1}

    path.write_bytes(good + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 2: not valid UTF-8"):
        load(path, "demonstration")
    path.write_bytes(good + b"\n" + b'"just a string"\n')
    with pytest.raises(DataError, match=rf"^{path}: line 2: expected a JSON object, got string"):
        load(path, "demonstration")


def test_invalid_json_file_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "q", "response": "a"},\n  {"prompt": oops}\n]')
    with pytest.raises(DataError, match=rf"^{path}: line 3: invalid JSON"):
        load(path, "demonstration")


MISSING = ["./missing.jsonl", "/nonexistent/train.json", "~/nope-rlhf.jsonl.gz", "missing.parquet"]


@pytest.mark.parametrize("path", MISSING)
def test_missing_local_file_is_not_a_hub_lookup(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    import datasets

    def no_hub(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_dataset must not be called for a local path")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for fmt in ("auto", "datasets"):
        with pytest.raises(FileNotFoundError, match=path.replace(".", r"\.")):
            load_records(DataSource(path, format=fmt), "demonstration")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_local_datasets_dir(hf_cache: Path, ext: str) -> None:
    import datasets

    ds = datasets.Dataset.from_list([*ROWS, {"question": "q3", "answer": None}])
    data_dir = hf_cache / "local-ds"
    data_dir.mkdir()
    if ext == "parquet":
        ds.to_parquet(str(data_dir / "train.parquet"))
    else:
        ds.to_json(str(data_dir / "train.jsonl"), lines=True)
    source = DataSource(str(data_dir), format="datasets", fields=REMAP)
    with pytest.raises(DataError) as info:
        load_records(source, "demonstration")
    assert (info.value.row_label, info.value.row, info.value.field) == ("row", 3, "response")
    result = load_records(source, "demonstration", "skip")
    assert result.records == EXPECTED and result.skipped == {"missing field": 1}


def test_save_to_disk_auto_detected(hf_cache: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(hf_cache / "single"))
    assert load(hf_cache / "single", "demonstration", fields=REMAP).records == EXPECTED

    both = datasets.DatasetDict({"train": ds, "test": ds.select([1])})
    both.save_to_disk(str(hf_cache / "dict"))
    test = load(hf_cache / "dict", "demonstration", fields=REMAP, split="test").records
    assert test == EXPECTED[1:]


# ----------------------------------------------------------------------------- alpaca, messages


def test_alpaca_with_input_and_history(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate", "input": "bonjour", "output": "hello", "history": []},
        {
            "instruction": "And again?",
            "input": "",
            "output": "hi",
            "history": [["Hey", "Hello!"], ["Q", "A"]],
        },
    ]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    first, second = load(path, "demonstration", schema="alpaca").records
    assert first == Demonstration((Turn("user", "Translate\n\nbonjour"),), "hello")
    assert second.prompt == (
        Turn("user", "Hey"),
        Turn("assistant", "Hello!"),
        Turn("user", "Q"),
        Turn("assistant", "A"),
        Turn("user", "And again?"),
    )
    assert second.response == "hi"
    [prompt, _] = load(path, "prompt", schema="alpaca").records
    assert prompt == PromptRecord(first.prompt)
    with pytest.raises(ValueError, match="alpaca"):
        load(path, "comparison", schema="alpaca")


def test_dolly_by_remap(tmp_path: Path) -> None:
    row = {"instruction": "Summarize", "context": "Text.", "response": "Short.", "category": "x"}
    path = write_jsonl(tmp_path / "dolly.jsonl", [row])
    fields = {"input": "context", "output": "response"}
    [demo] = load(path, "demonstration", schema="alpaca", fields=fields).records
    assert demo == Demonstration((Turn("user", "Summarize\n\nText."),), "Short.")


@pytest.mark.skipif(not LIMA.exists(), reason="LIMA is only in the shared data dir")
def test_lima_alpaca() -> None:
    records = load(LIMA, "demonstration", schema="alpaca").records
    assert len(records) == 1029
    multi = [r for r in records if len(r.prompt) > 1]
    assert multi and all(len(r.prompt) % 2 == 1 and r.prompt[-1].role == "user" for r in multi)


def test_messages_format(tmp_path: Path) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
    ]
    expected_prompt = tuple(Turn(m["role"], m["content"]) for m in chat)
    rows = [
        {"prompt": chat, "chosen": "Bye.", "rejected": "No."},
        {"messages": [*chat, {"role": "assistant", "content": "Bye."}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    [comparison] = load(path, "comparison", limit=1).records
    assert comparison == Comparison(expected_prompt, "Bye.", "No.")
    demos = load(tmp_path / "chat.jsonl", "demonstration", "skip").records
    assert demos == [Demonstration(expected_prompt, "Bye.")]  # row 1 has no response
    prompts = load(path, "prompt").records
    assert prompts == [PromptRecord(expected_prompt)] * 2


def test_self_instruct_seed_prompts() -> None:
    records = load(SEED_TASKS, "prompt", fields={"prompt": "instruction"}).records
    assert len(records) == 175
    assert all(len(r.prompt) == 1 and r.prompt[0].role == "user" for r in records)


def test_config_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match="unknown field"):
        load(path, "demonstration", fields={"respons": "answer"})
    with pytest.raises(ValueError, match="hh_rlhf"):
        load(path, "ranking", schema="hh_rlhf")
    with pytest.raises(ValueError, match="on_bad_row"):
        load(path, "demonstration", "ignore")
