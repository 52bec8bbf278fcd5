"""DPO stage on the tiny Llama: response masks, identical-pair skips, the reference as the
disabled adapter, a short fit that learns and saves policy outputs."""

import json

import lightning as L
import pytest
import torch

from rlhf.data.datamodules import ComparisonDataModule
from rlhf.data.sources import DataSource
from rlhf.dpo import DPODataModule, DPOModule, group_prefix_lengths, identical_pairs, response_mask
from rlhf.models.loading import LoraSettings, ModelSettings, load_causal_lm
from rlhf.outputs import read_stage_marker
from rlhf.policies import resolve_model_dir

LORA = LoraSettings(r=4, alpha=8)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=16, identical_after_truncation=True):
    # The preferred reply always says "apple", the other "stone": trivially separable.
    rows = [{"prompt": f"Question {i}: what should I eat?", "chosen": f"Eat an apple {i}.",
             "rejected": f"Eat a stone {i}."} for i in range(n)]
    if identical_after_truncation:  # the replies differ only past max_length
        same = "Well, " * 30
        rows.append({"prompt": "Tell me more.", "chosen": same + "yes", "rejected": same + "no"})
    return rows


def _data(path, model_dir, cls=DPODataModule, **kwargs):
    args = dict(train=DataSource(str(path)), val_fraction=0.25, split_seed=1, tokenizer=str(model_dir),
                max_length=40, max_prompt_length=24, batch_size=4, on_bad_row="skip")
    return cls(**{**args, **kwargs})


def _module(model_dir, **kwargs):
    base = ModelSettings(str(model_dir), dtype="float32", lora=LORA)
    module = DPOModule(base, **kwargs)
    module.configure_model()
    return module


def _perturb_adapter(module, std=0.2):
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


def _batch(tmp_path, model_dir, cls=DPODataModule):
    data = _data(_write_jsonl(tmp_path / "prefs.jsonl", _rows(4)), model_dir, cls, val_fraction=0.0)
    data.setup("fit")
    return data.collator()(list(data.train_dataset.items)), data


# ----------------------------------------------------------------------------- batches


def test_response_mask_starts_after_each_prompt(tmp_path, tiny_model_dir):
    batch, data = _batch(tmp_path, tiny_model_dir)
    mask = response_mask(batch)
    for g, item in enumerate(data.train_dataset.items):
        for k, completion in enumerate(item["completion_ids"]):
            row = 2 * g + k
            assert batch["prompt_length"][row] == len(item["prompt_ids"])
            assert batch["input_ids"][row][mask[row]].tolist() == completion


def test_prefix_fallback_gives_the_same_pair_differences(tmp_path, tiny_model_dir):
    """A batch without prompt_length (a custom collator's): the group's shared prefix stands
    in, which changes per-response sums but not chosen-minus-rejected differences."""
    batch, _ = _batch(tmp_path, tiny_model_dir)
    plain, _ = _batch(tmp_path, tiny_model_dir, ComparisonDataModule)
    assert torch.equal(plain.pop("prompt_length"), batch["prompt_length"])
    prefix = group_prefix_lengths(plain["input_ids"], plain["attention_mask"], plain["group"])
    assert (prefix >= batch["prompt_length"]).all()
    assert (prefix < plain["attention_mask"].sum(1)).all()  # every row keeps a token
    module = _module(tiny_model_dir)
    _perturb_adapter(module)
    module.model.eval()
    with torch.no_grad():
        exact = module(batch["input_ids"], batch["attention_mask"], response_mask(batch))
        fallback = module(plain["input_ids"], plain["attention_mask"], response_mask(plain))
    c, r = batch["chosen_index"], batch["rejected_index"]
    torch.testing.assert_close(fallback[c] - fallback[r], exact[c] - exact[r], atol=1e-4, rtol=0)


def test_identical_pairs_are_found():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 8, 9], [5, 6, 7, 1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask,
             "chosen_index": torch.tensor([0, 0, 2, 3]), "rejected_index": torch.tensor([1, 2, 2, 0])}
    # rows 0 and 1 differ only in padding; a pair of one row with itself; a longer row.
    assert identical_pairs(batch).tolist() == [True, False, True, False]


# ----------------------------------------------------------------------------- the module


def test_config_without_lora_is_refused_naming_the_key(tiny_model_dir):
    with pytest.raises(ValueError, match="model.init_args.base.lora"):
        DPOModule(ModelSettings(str(tiny_model_dir), dtype="float32"))
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOModule(ModelSettings(str(tiny_model_dir), lora=LORA), loss_type="ipo", label_smoothing=0.1)


def test_reference_is_the_base_with_the_adapter_off(tmp_path, tiny_model_dir):
    module = _module(tiny_model_dir)
    base = load_causal_lm(ModelSettings(str(tiny_model_dir), dtype="float32")).eval()
    n_base = sum(p.numel() for p in base.parameters())
    n_adapter = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert n_adapter > 0
    assert sum(p.numel() for p in module.parameters()) == n_base + n_adapter  # one copy of the base
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.named_parameters())

    _perturb_adapter(module)
    batch, _ = _batch(tmp_path, tiny_model_dir)
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], response_mask(batch)
    reference = module.reference_logprobs(ids, attention, mask)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=attention).logits[:, :-1]
        token_logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        expected = (token_logp * mask[:, 1:]).sum(1)
        policy = module(ids, attention, mask)
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=0)
    assert (policy - reference).abs().max() > 1e-3  # the adapter is on for the policy


def test_identical_pairs_are_skipped_and_counted(tmp_path, tiny_model_dir):
    _, data = _batch(tmp_path, tiny_model_dir)
    assert data.stats["train_identical_pairs_skipped"] == 1  # the data module skips it first
    items = list(data.train_dataset.items)
    same = items[0]["completion_ids"][0]
    items.append({"prompt_ids": items[0]["prompt_ids"], "completion_ids": [same, list(same)],
                  "pairs": [(0, 1)], "margins": [0.0]})
    batch = data.collator()(items)
    skipped = identical_pairs(batch)
    assert skipped.tolist() == [False] * 4 + [True]  # the last group's replies match after truncation
    module = _module(tiny_model_dir)
    loss, stats, pairs, n_skipped = module.pair_loss(batch)
    assert (pairs, n_skipped) == (4, 1)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)  # policy == reference
    only = {k: (v[4:] if k in ("chosen_index", "rejected_index") else v) for k, v in batch.items()}
    assert module.pair_loss(only)[0] is None  # nothing left: the step is skipped


# ----------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_policy_dir):
    root = tmp_path_factory.mktemp("dpo")
    data = _data(_write_jsonl(root / "prefs.jsonl", _rows(16)), tiny_policy_dir)
    out = root / "dpo_out"
    torch.manual_seed(0)
    module = DPOModule(ModelSettings(str(tiny_policy_dir), dtype="float32", lora=LORA),
                       lr=1e-2, beta=0.5, output_dir=str(out))
    trainer = L.Trainer(accelerator="cpu", max_steps=12, num_sanity_val_steps=0, val_check_interval=3,
                        check_val_every_n_epoch=None, log_every_n_steps=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        logger=L.pytorch.loggers.CSVLogger(root, name="csv"))
    trainer.fit(module, datamodule=data)
    return module, data, trainer, out, root


def _csv_rows(root):
    import csv

    (path,) = (root / "csv").glob("*/metrics.csv")
    return list(csv.DictReader(path.open()))


def test_fit_learns_the_preference_and_logs(fitted):
    module, data, trainer, _, root = fitted
    rows = _csv_rows(root)
    train_loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    val_acc = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert train_loss[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    assert sum(train_loss[-3:]) / 3 < 0.6, train_loss
    assert val_acc[-1] == 1.0 and len(val_acc) == 4
    metrics = trainer.callback_metrics
    for key in ("val/loss", "val/reward_chosen", "val/reward_rejected", "val/margin", "val/logp_chosen",
                "val/logp_rejected", "val/length_rule_accuracy", "val/skipped_pairs", "train/accuracy",
                "train/reward_chosen", "train/reward_rejected", "train/margin", "train/skipped_pairs"):
        assert key in metrics, key
    assert float(metrics["val/margin"]) > 0 and float(metrics["val/reward_chosen"]) > float(metrics["val/reward_rejected"])
    # The pair identical after truncation (training split here) is skipped by the data module.
    assert data.stats["train_identical_pairs_skipped"] == 1 and module.skipped_pairs == 0


def test_fit_saves_adapter_merged_model_and_marker(fitted):
    module, data, _, out, _ = fitted
    marker = read_stage_marker(out)
    assert marker["stage"] == "dpo" and marker["skipped_pairs"] == 0 and marker["val_accuracy"] == 1.0
    assert marker["adapter_dir"] == "adapter" and marker["model_dir"] == "model"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert resolve_model_dir(out) == str(out / "model")  # rlhf.evaluate --policy dpo=<out>
    merged = load_causal_lm(ModelSettings(str(out / "model"), dtype="float32")).eval()
    batch = next(iter(data.val_dataloader()))
    ids, attention, mask = batch["input_ids"], batch["attention_mask"], response_mask(batch)
    module.model.eval()
    with torch.no_grad():
        policy = module(ids, attention, mask)
        logits = merged(input_ids=ids, attention_mask=attention).logits[:, :-1]
        token_logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close((token_logp * mask[:, 1:]).sum(1), policy, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- the CLI


def test_fit_through_the_cli_and_the_held_out_prompts(tmp_path, tiny_model_dir):
    """``rlhf.fit`` reads the module's typed arguments (IPO here, with validation before fit);
    ``rlhf.dpo.heldout`` writes exactly the prompts the data module held out."""
    import yaml
    from stage_configs import stage_config, tiny_data_files

    from rlhf.dpo.heldout import main as heldout_main
    from rlhf.fit import main as fit_main

    files = tiny_data_files(tmp_path)
    config = stage_config(tmp_path, "dpo", 2, "rlhf.dpo.DPOModule", str(tiny_model_dir), "rlhf.dpo.DPODataModule",
                          files["prefs"], validate_before_fit=True, init_args={"loss_type": "ipo", "beta": 0.2})
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = fit_main(["--config", str(path)])
    marker = read_stage_marker(tmp_path / "out/dpo")
    assert marker["stage"] == "dpo" and marker["loss_type"] == "ipo" and marker["global_step"] == 2
    # Before fitting the policy is the reference: IPO's loss is the squared target, (1 / 0.4)^2.
    assert marker["metrics_before_fit"]["val/loss"] == pytest.approx(6.25, abs=1e-4)
    assert "val/accuracy" in marker["metrics"]

    assert heldout_main(["--data", files["prefs"], "--val-fraction", "0.25", "--out", str(tmp_path / "heldout")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "heldout/prompts.jsonl").read_text().splitlines()]
    expected = [[{"role": t.role, "content": t.content} for t in u.prompt] for u in cli.datamodule.val_units]
    assert [r["prompt"] for r in rows] == expected and len(rows) == 3
