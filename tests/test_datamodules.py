"""Tokenization, truncation, splitting and batching of the shared data layer."""

import json

import pytest

from rlhf.data.collate import IGNORE_INDEX
from rlhf.data.datamodules import (
    ComparisonDataModule,
    DemonstrationDataModule,
    PromptDataModule,
    deterministic_split,
)
from rlhf.data.errors import DataError
from rlhf.data.records import Turn
from rlhf.data.sources import DataSource
from rlhf.data.tokenization import PromptFormatter, truncate_pair
from rlhf.models.loading import load_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def set_up(cls, path, tokenizer, **options):
    """A ``cls`` data module over the JSONL file ``path`` (no validation split), set up."""
    dm = cls(train=DataSource(path), tokenizer=tokenizer, val_fraction=0.0, **options)
    dm.setup("fit")
    return dm


def first_batch(dm, batch_size=2):
    """The first batch of ``dm``'s training data in file order."""
    return next(iter(dm._loader(dm.train_dataset, batch_size, shuffle=False)))


def test_truncate_pair_keeps_response_and_prompt_end():
    pair = truncate_pair(list(range(10)), [100, 101, 102], max_length=8, max_prompt_length=5)
    assert pair.prompt_ids == [5, 6, 7, 8, 9]
    assert pair.response_ids == [100, 101, 102]
    pair = truncate_pair([1, 2], list(range(100, 120)), max_length=8, max_prompt_length=5)
    assert pair.prompt_ids == [1, 2] and pair.response_ids == list(range(100, 106))
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate_pair([1], [2], max_length=4, max_prompt_length=4)


def test_chat_template_pair_matches_full_conversation(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    fmt = PromptFormatter(tok)
    assert fmt.use_chat_template
    convo = (Turn("user", "Hi there"), Turn("assistant", "Hello."), Turn("user", "How are you?"))
    prompt = fmt.prompt_ids(convo)
    response = fmt.response_ids(convo, "Fine, thanks.")
    assert response[-1] == tok.eos_token_id and tok.eos_token_id not in response[:-1]
    full = tok.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in convo]
        + [{"role": "assistant", "content": "Fine, thanks."}],
        tokenize=False,
    )
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt) + len(response)] == prompt + response
    assert fmt.decode_response(response) == "Fine, thanks."


def test_plain_template_without_chat_template(tiny_model_dir_plain):
    tok = load_tokenizer(tiny_model_dir_plain)
    fmt = PromptFormatter(tok)
    assert not fmt.use_chat_template
    convo = (Turn("user", "Hi"),)
    assert fmt.prompt_text(convo) == "\n\nHuman: Hi\n\nAssistant:"
    assert fmt.response_ids(convo, "Yo")[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormatter(tok, use_chat_template=True)


def test_deterministic_split():
    a = deterministic_split(100, 0.1, seed=3)
    assert a == deterministic_split(100, 0.1, seed=3)
    assert a != deterministic_split(100, 0.1, seed=4)
    train, val = a
    assert len(val) == 10 and sorted(train + val) == list(range(100))
    with pytest.raises(ValueError, match="val_fraction"):
        deterministic_split(10, 1.0, 0)


def test_demonstration_batches_mask_prompt(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"question {i}?", "response": f"answer number {i}."} for i in range(20)]
    dm = DemonstrationDataModule(
        train=DataSource(write_jsonl(tmp_path / "d.jsonl", rows)),
        tokenizer=tiny_model_dir,
        val_fraction=0.2,
        batch_size=4,
        max_length=64,
        max_prompt_length=32,
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == 16 and len(dm.val_dataset) == 4
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 4
    for row in range(4):
        n_real = int(mask[row].sum())
        assert mask[row, :n_real].all() and not mask[row, n_real:].any()  # right padded
        labelled = labels[row] != IGNORE_INDEX
        first = int(labelled.nonzero()[0])
        assert not labelled[:first].any() and labelled[first:n_real].all()
        assert not labelled[n_real:].any()
        assert int(labels[row, n_real - 1]) == dm.tokenizer.eos_token_id


def test_preference_groups_encode_each_completion_once(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": "p0", "completions": ["best", "middle", "worst"]},
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "margin": 2.0},
        {"prompt": "p1", "chosen": "good", "rejected": "awful"},
    ]
    dm = set_up(ComparisonDataModule, write_jsonl(tmp_path / "c.jsonl", rows), tiny_model_dir,
                batch_size=2)
    batch = first_batch(dm)
    # 3 completions of p0 + 3 distinct completions of p1 (the "good" one shared)
    assert batch["input_ids"].shape[0] == 6
    assert batch["group"].tolist() == [0, 0, 0, 1, 1, 1]
    assert list(zip(batch["chosen_index"].tolist(), batch["rejected_index"].tolist())) == [
        (0, 1), (0, 2), (1, 2), (3, 4), (3, 5)
    ]
    assert batch["margin"].tolist() == [0.0, 0.0, 0.0, 2.0, 0.0]


def test_prompts_are_left_padded(tmp_path, tiny_model_dir):
    rows = [{"prompt": "short"}, {"prompt": "a much longer prompt than the other one"}]
    dm = set_up(PromptDataModule, write_jsonl(tmp_path / "p.jsonl", rows), tiny_model_dir,
                batch_size=2)
    batch = first_batch(dm)
    mask = batch["attention_mask"]
    assert mask[:, -1].all()  # every prompt ends at the last column
    assert not mask[0, 0] and mask[1, 0]
    assert batch["index"].tolist() == [0, 1]
    assert dm.train_units[1].prompt[-1].content.startswith("a much longer")


@pytest.mark.parametrize("kind", ["prompt", "demonstration", "comparison"])
def test_long_prompts_drop_or_truncate(tmp_path, tiny_model_dir, kind):
    short, long = "hi", " ".join(["word"] * 60)
    def row(prompt):
        if kind == "prompt":
            return {"prompt": prompt}
        if kind == "demonstration":
            return {"prompt": prompt, "response": "an answer."}
        return {"prompt": prompt, "chosen": "good", "rejected": "bad"}
    cls = {"prompt": PromptDataModule, "demonstration": DemonstrationDataModule,
           "comparison": ComparisonDataModule}[kind]
    path = write_jsonl(tmp_path / "rows.jsonl", [row(short), row(long), row(short + "!")])

    def encoded(long_prompts):
        dm = set_up(cls, path, tiny_model_dir, max_length=48, max_prompt_length=24,
                    long_prompts=long_prompts)
        return dm, [len(item["prompt_ids"]) for item in dm.train_dataset]

    dm, lengths = encoded("truncate")
    assert len(lengths) == 3 and lengths[1] == 24 and "long_prompts_dropped" not in dm.stats
    dm, lengths = encoded("drop")
    assert len(lengths) == 2 and max(lengths) < 24
    assert dm.stats["long_prompts_dropped"] == 1 and dm.stats["dropped_units"] == 1
    with pytest.raises(ValueError, match="long_prompts"):
        cls(train=DataSource(path), long_prompts="cut")


def test_config_errors_are_early():
    with pytest.raises(ValueError, match="max_prompt_length"):
        PromptDataModule(train=DataSource("x.jsonl"), max_length=8, max_prompt_length=8)
    with pytest.raises(ValueError, match="val_fraction"):
        PromptDataModule(train=DataSource("x.jsonl"), val_fraction=1.5)


def test_pairs_identical_after_truncation_are_skipped_and_counted_or_refused(tmp_path, tiny_model_dir, caplog):
    same_start = " ".join(["word"] * 60)
    rows = [
        {"prompt": "p0", "chosen": same_start + " good", "rejected": same_start + " bad"},
        {"prompt": "p1", "completions": ["short", same_start + " one", same_start + " two"]},
        {"prompt": "p2", "chosen": "good", "rejected": "bad"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with caplog.at_level("INFO", logger="rlhf.data"):
        dm = set_up(ComparisonDataModule, path, tiny_model_dir, max_length=32, max_prompt_length=16,
                    on_bad_row="skip")
    # p0 lost its only pair (dropped); p1 kept short > one and short > two, not one > two.
    assert len(dm.train_dataset) == 2 and dm.stats["dropped_units"] == 1
    assert dm.stats["train_identical_pairs_skipped"] == 2
    p1 = dm.train_dataset[0]
    assert p1["pairs"] == [(0, 1), (0, 2)] and len(p1["completion_ids"]) == 3
    assert p1["completion_ids"][1] == p1["completion_ids"][2]
    assert "train: 0 of 2 prompts truncated" in caplog.text
    assert "2 pairs skipped as identical after truncation" in caplog.text
    with pytest.raises(DataError, match=r"c\.jsonl: field 'rejected': chosen and rejected are "
                                        r"identical after truncation to max_length = 32 tokens"):
        set_up(ComparisonDataModule, path, tiny_model_dir, max_length=32, max_prompt_length=16)


@pytest.mark.parametrize("kind", ["prompt", "demonstration"])
def test_truncated_prompts_and_responses_are_counted_per_split(tmp_path, tiny_model_dir, caplog, kind):
    long = " ".join(["word"] * 60)
    rows = [{"prompt": long if i % 2 else "hi", "response": long if i % 3 == 0 else "ok"} for i in range(6)]
    if kind == "prompt":
        rows = [{"prompt": r["prompt"]} for r in rows]
    cls = PromptDataModule if kind == "prompt" else DemonstrationDataModule
    dm = cls(train=DataSource(write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer=tiny_model_dir,
             val_fraction=0.5, max_length=48, max_prompt_length=24)
    with caplog.at_level("INFO", logger="rlhf.data"):
        dm.setup("fit")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith(("train: ", "val: "))]
    assert [line.split(":")[0] for line in lines] == ["train", "val"]
    prompts = dm.stats["train_truncated_prompts"] + dm.stats["val_truncated_prompts"]
    responses = dm.stats["train_truncated_responses"] + dm.stats["val_truncated_responses"]
    assert prompts == 3 and responses == (0 if kind == "prompt" else 2)
    assert f"{dm.stats['train_truncated_prompts']} of 3 prompts truncated to max_prompt_length = 24" in lines[0]
    assert ("responses truncated to fit max_length = 48" in lines[0]) == (kind == "demonstration")
