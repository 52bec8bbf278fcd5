"""Reward model on the tiny Llama: loss, metrics, padding, learning, saving, scoring CLI."""

import json
import math

import lightning as L
import pytest
import torch

from rlhf.data.datamodules import ComparisonDataModule
from rlhf.data.records import as_conversation
from rlhf.data.sources import DataSource
from rlhf.models.loading import LoraSettings, ModelSettings, apply_lora, load_causal_lm, load_tokenizer
from rlhf.outputs import read_stage_marker
from rlhf.rm import (
    MeanMargin,
    PairwiseAccuracy,
    RewardModel,
    RewardModule,
    StdMetric,
    bradley_terry_loss,
    last_token_index,
    load_reward_model,
    position_ids_from_mask,
)
from rlhf.models.reward import read_reward_model_info

# log(1 + exp(-d)) for the differences used below.
LOG1P_EXP_M1 = 0.31326168751822286  # d = 1
LOG1P_EXP_P05 = 0.9740769841801067  # d = -0.5
LOG1P_EXP_M05 = 0.4740769841801067  # d = 0.5


# ----------------------------------------------------------------------------- loss, metrics


def test_bradley_terry_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])  # d = 1, -0.5
    loss, stats = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((LOG1P_EXP_M1 + LOG1P_EXP_P05) / 2, abs=1e-6)
    assert stats["accuracy"].item() == 0.5
    assert stats["margin"].item() == pytest.approx(0.25)
    # A zero margin is the plain loss.
    zero, _ = bradley_terry_loss(chosen, rejected, torch.zeros(2))
    assert zero.item() == pytest.approx(loss.item(), abs=1e-7)


def test_margin_and_centering_terms():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0])
    loss, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.0]))  # 0.5, -0.5
    assert loss.item() == pytest.approx((LOG1P_EXP_M05 + LOG1P_EXP_P05) / 2, abs=1e-6)
    all_scores = torch.tensor([2.0, 0.5, 1.0])  # each sequence once: mean square 1.75
    loss, stats = bradley_terry_loss(chosen, rejected, center_coef=0.1, all_scores=all_scores)
    plain = (LOG1P_EXP_M1 + LOG1P_EXP_P05) / 2
    assert stats["center_loss"].item() == pytest.approx(1.75)
    assert loss.item() == pytest.approx(plain + 0.175, abs=1e-6)
    # Without all_scores, centering is over chosen and rejected: (4 + .25 + 1 + 1) / 4.
    _, stats = bradley_terry_loss(chosen, rejected, center_coef=0.1)
    assert stats["center_loss"].item() == pytest.approx(1.5625)


def test_loss_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    loss, _ = bradley_terry_loss(chosen, rejected)
    loss.backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    assert chosen.grad[0].item() == pytest.approx(-0.25)  # -sigmoid(0) / P


def test_pairwise_accuracy_counts_ties_as_wrong_and_other_metrics():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 4.0])
    acc = PairwiseAccuracy()
    acc.update(chosen[:2], rejected[:2])
    acc.update(chosen[2:], rejected[2:])
    assert acc.compute().item() == pytest.approx(1 / 3)
    _, stats = bradley_terry_loss(chosen, rejected)
    assert stats["accuracy"].item() == pytest.approx(1 / 3)
    margin = MeanMargin()
    margin.update(chosen, rejected)
    assert margin.compute().item() == pytest.approx(0.0)
    values = torch.randn(50) * 3 + 10
    std = StdMetric()
    for part in values.split(7):
        std.update(part)
    assert std.compute().item() == pytest.approx(values.std().item(), rel=1e-5)


# ----------------------------------------------------------------------------- data


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ranking_of_three_gives_three_ordered_pairs(tmp_path, tiny_model_dir):
    path = _write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Rank these.", "completions": ["best", "middle", "worst"]},
        {"prompt": "Pick one.", "chosen": "yes", "rejected": "no", "margin": 2.0},
    ])
    data = ComparisonDataModule(train=DataSource(str(path)), val_fraction=0.0,
                                tokenizer=str(tiny_model_dir), max_length=64, max_prompt_length=32)
    data.setup("fit")
    batch = data.collator()(list(data.train_dataset.items))
    assert batch["input_ids"].shape[0] == 5  # 3 + 2 completions, each encoded once
    assert batch["chosen_index"].tolist() == [0, 0, 1, 3]
    assert batch["rejected_index"].tolist() == [1, 2, 2, 4]
    assert batch["margin"].tolist() == [0.0, 0.0, 0.0, 2.0]
    assert batch["group"].tolist() == [0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------- model


def _tiny_rm(model_dir, lora=None, seed=0):
    torch.manual_seed(seed)
    backbone = load_causal_lm(ModelSettings(str(model_dir), dtype="float32"))
    if lora is not None:
        backbone = apply_lora(backbone, lora)
    return RewardModel(backbone).eval()


def _pad(seqs, pad_id, side):
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def test_last_token_index_and_positions():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]
    assert position_ids_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 0, 0]]


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_right_and_left_padding_give_the_same_scores(tiny_model_dir, lora):
    model = _tiny_rm(tiny_model_dir, lora)
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token_id == tok.eos_token_id  # the padding must not be found by id
    texts = ["Hello there, how are you?", "Hi", "A much longer sentence with many more tokens in it."]
    seqs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    with torch.no_grad():
        right = model(*_pad(seqs, tok.pad_token_id, "right"))
        left = model(*_pad(seqs, tok.pad_token_id, "left"))
        alone = torch.cat([model(*_pad([s], tok.pad_token_id, "right")) for s in seqs])
        # The body path equals the LM's own last hidden state at the last token.
        ids, mask = _pad(seqs, tok.pad_token_id, "right")
        hidden = model.language_model(input_ids=ids, attention_mask=mask,
                                      output_hidden_states=True).hidden_states[-1]
        via_lm = model.score_head(hidden[torch.arange(3), last_token_index(mask)]).squeeze(-1)
    assert model.body is not None and model.body is not model.language_model
    assert right.dtype == torch.float32 and right.shape == (3,)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=0)
    torch.testing.assert_close(via_lm, right, atol=1e-5, rtol=0)


def test_dropout_is_disabled_in_train_mode(tiny_model_dir):
    backbone = load_causal_lm(ModelSettings(str(tiny_model_dir), dtype="float32"))
    backbone.config.attention_dropout = 0.5
    backbone = apply_lora(backbone, LoraSettings(r=4, alpha=8, dropout=0.5))
    for name, module in backbone.named_modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    model = RewardModel(backbone).train()
    assert not any(p for m in model.modules() for k, p in vars(m).items()
                   if "dropout" in k and isinstance(p, float))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), model(ids, mask), atol=0, rtol=0)


def test_untied_lm_head_is_frozen_tied_embeddings_train(tiny_model_dir):
    backbone = load_causal_lm(ModelSettings(str(tiny_model_dir), dtype="float32"))
    model = RewardModel(backbone)
    assert model.language_model.get_input_embeddings().weight.requires_grad  # tied: trains
    backbone = load_causal_lm(ModelSettings(str(tiny_model_dir), dtype="float32"))
    backbone.lm_head.weight = torch.nn.Parameter(backbone.lm_head.weight.detach().clone())
    model = RewardModel(backbone)
    assert not model.language_model.lm_head.weight.requires_grad
    assert model.language_model.get_input_embeddings().weight.requires_grad


def test_lora_save_load_round_trip(tmp_path, tiny_model_dir):
    model = _tiny_rm(tiny_model_dir, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    model.score_mean, model.score_std = 0.5, 2.0
    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = _pad([tok("one two three")["input_ids"], tok("four")["input_ids"]], tok.pad_token_id, "right")
    with torch.no_grad():
        expected = model(ids, mask)
    info = model.save_pretrained(tmp_path / "rm", tokenizer=tok)
    assert info["adapter_dir"] == "adapter" and info["model_dir"] == "model"
    assert (tmp_path / "rm" / "adapter" / "adapter_config.json").is_file()
    assert read_reward_model_info(tmp_path / "rm")["score_std"] == 2.0
    for prefer_adapter in (False, True):
        loaded = load_reward_model(tmp_path / "rm", prefer_adapter=prefer_adapter)
        assert loaded.score_mean == 0.5 and loaded.score_std == 2.0
        assert loaded.score_head.weight.dtype == torch.float32
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids, mask), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- training


def _synthetic_rows(n=40):
    # The preferred reply always says "apple", the other "stone": trivially separable.
    return [
        {"prompt": f"Question number {i}: what should I eat?",
         "chosen": f"Eat an apple {i}.", "rejected": f"Eat a stone {i}."}
        for i in range(n)
    ]


def _data(path, model_dir):
    return ComparisonDataModule(
        train=DataSource(str(path)), val_fraction=0.2, split_seed=3, tokenizer=str(model_dir),
        max_length=48, max_prompt_length=32, batch_size=8,
    )


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_model_dir):
    """A reward model fitted on the synthetic preference, saved; (module, data, out, path)."""
    root = tmp_path_factory.mktemp("rm")
    path = _write_jsonl(root / "prefs.jsonl", _synthetic_rows())
    data = _data(path, tiny_model_dir)
    out = root / "rm_out"
    torch.manual_seed(0)
    module = RewardModule(ModelSettings(str(tiny_model_dir), dtype="float32"), lr=3e-3,
                          output_dir=str(out), stats_max_rows=50)
    kwargs = dict(accelerator="cpu", logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    # Validate first, as validate_before_fit does (metric states made under inference mode).
    before = L.Trainer(**kwargs).validate(module, datamodule=data, verbose=False)[0]
    module.metrics_before_fit = dict(before)
    trainer = L.Trainer(max_steps=30, num_sanity_val_steps=0, val_check_interval=30,
                        check_val_every_n_epoch=None, **kwargs)
    trainer.fit(module, datamodule=data)
    return module, data, trainer, out, path


def test_reward_module_learns_separable_preference(trained_rm):
    module, data, trainer, out, _ = trained_rm
    metrics = trainer.callback_metrics
    assert float(metrics["val/accuracy"]) == 1.0, dict(metrics)
    assert float(metrics["train/accuracy"]) == 1.0
    assert float(metrics["val/margin"]) > 0 and float(metrics["val/reward_std"]) > 0
    for key in ("val/loss", "val/reward_mean", "train/loss", "train/margin"):
        assert key in metrics
    marker = read_stage_marker(out)
    assert marker["stage"] == "rm" and marker["val_accuracy"] == 1.0
    assert "val/accuracy" in marker["metrics_before_fit"]
    assert marker["metrics_before_fit"]["val/loss"] > float(metrics["val/loss"])
    assert marker["model_dir"] == "model" and marker["adapter_dir"] is None  # full fine-tune
    info = read_reward_model_info(out)
    assert info["score_std"] > 0 and info["data"]["max_length"] == 48


def test_reward_module_training_only_the_top_block(tmp_path, tiny_model_dir):
    path = _write_jsonl(tmp_path / "prefs.jsonl", _synthetic_rows())
    data = _data(path, tiny_model_dir)
    torch.manual_seed(0)
    module = RewardModule(ModelSettings(str(tiny_model_dir), dtype="float32", train_top_layers=1), lr=3e-3)
    module.configure_model()
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert "score_head.weight" in trained and "backbone.model.norm.weight" in trained
    assert all(n.startswith(("score_head.", "backbone.model.layers.1.", "backbone.model.norm.")) for n in trained)
    frozen = {n: p.detach().clone() for n, p in module.model.named_parameters() if not p.requires_grad}
    trainer = L.Trainer(max_steps=30, num_sanity_val_steps=0, val_check_interval=30, check_val_every_n_epoch=None,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["val/accuracy"]) == 1.0
    for name, p in module.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_saved_reward_model_gives_identical_scores(trained_rm):
    module, data, _, out, _ = trained_rm
    batch = next(iter(data.val_dataloader()))
    loaded = load_reward_model(out)
    module.model.eval()
    with torch.no_grad():
        expected = module(batch["input_ids"], batch["attention_mask"])
        got = loaded(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The saved statistics are those of the final model on the training data.
    info = read_reward_model_info(out)
    stats = module.score_statistics(data.train_dataloader(), max_rows=None)
    assert stats["rows"] == 2 * len(data.train_dataset)
    assert abs(info["score_mean"] - stats["score_mean"]) < 2 * stats["score_std"]


def test_score_cli_reproduces_validation_split(trained_rm, tmp_path):
    from rlhf.score import main

    _, data, _, out, path = trained_rm
    scores = tmp_path / "scores.jsonl"
    summary = main(["--model", str(out), "--data", str(path), "--schema", "fields",
                    "--out", str(scores), "--batch-size", "4", "--val-fraction", "0.2",
                    "--split-seed", "3", "--split", "val", "--no-progress"])
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    val_prompts = {u.prompt[0].content for u in data.val_units}
    assert len(rows) == summary["n"] == len(val_prompts) == 8
    assert {_synthetic_rows()[r["index"]]["prompt"] for r in rows} == val_prompts
    assert all(set(r) >= {"index", "chosen_score", "rejected_score", "correct"} for r in rows)
    assert summary["accuracy"] == 1.0 and all(r["correct"] for r in rows)
    assert math.isclose(summary["mean_margin"],
                        sum(r["chosen_score"] - r["rejected_score"] for r in rows) / len(rows),
                        rel_tol=1e-5)
    # Beside the accuracy: "the longer reply wins" on the same pairs, here "apple" vs "stone".
    rows_by_index = {r["index"]: _synthetic_rows()[r["index"]] for r in rows}
    fmt = data.formatter
    longer = [
        (lambda c, r: 1.0 if c > r else 0.5 if c == r else 0.0)(
            len(fmt.response_ids(as_conversation(x["prompt"]), x["chosen"])),
            len(fmt.response_ids(as_conversation(x["prompt"]), x["rejected"])))
        for x in rows_by_index.values()
    ]
    assert summary["length_rule_accuracy"] == pytest.approx(sum(longer) / len(longer))
    assert summary["scored_length_rule_accuracy"] == pytest.approx(summary["length_rule_accuracy"])  # nothing cut
    # Whole file, limited.
    summary = main(["--model", str(out), "--data", str(path), "--schema", "fields", "--limit", "5",
                    "--no-progress"])
    assert summary["n"] == 5
    # --long-prompts drop keeps the comparisons whose formatted prompt fits, as a data module
    # with long_prompts="drop" would.
    lengths = sorted(len(data.formatter.prompt_ids(u.prompt)) for u in data.val_units)
    cut = lengths[0]  # the shortest prompts (29 tokens; the rest are 30)
    kept = sum(n <= cut for n in lengths)
    assert 0 < kept < len(lengths)
    summary = main(["--model", str(out), "--data", str(path), "--schema", "fields", "--val-fraction",
                    "0.2", "--split-seed", "3", "--split", "val", "--long-prompts", "drop",
                    "--max-prompt-length", str(cut), "--no-progress"])
    assert summary["n"] == kept


def test_response_lengths_as_written_and_as_scored(tiny_model_dir):
    from rlhf.data.tokenization import PromptFormatter
    from rlhf.score import response_lengths

    fmt = PromptFormatter(load_tokenizer(str(tiny_model_dir)))
    prompts, responses = ["Hi?", "Hello there?"], ["A short one.", "A much longer reply " * 6]
    written, scored = response_lengths(fmt, prompts, responses, max_length=24, max_prompt_length=16)
    assert written == [len(fmt.response_ids(as_conversation(p), r)) for p, r in zip(prompts, responses)]
    prompt_len = len(fmt.prompt_ids(as_conversation(prompts[1])))
    assert scored[0] == written[0] and written[1] > 24 - prompt_len == scored[1]


def test_score_length_correlation():
    from rlhf.score import score_length_correlation

    assert score_length_correlation(torch.tensor([1.0, 2.0, 3.0]), [10, 20, 30]) == pytest.approx(1.0)
    assert score_length_correlation(torch.tensor([3.0, 2.0, 1.0]), [10, 20, 30]) == pytest.approx(-1.0)
    assert math.isnan(score_length_correlation(torch.tensor([1.0, 1.0, 1.0]), [10, 20, 30]))
