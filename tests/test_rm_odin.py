"""ODIN (a reward model with a length head): the losses on given numbers, saving and loading the
second head, and on data where the preferred reply is usually longer, a quality head that
ranks by content while correlating with length far less than a plain RM does."""

from __future__ import annotations

import json
import random

import lightning as L
import numpy as np
import pytest
import torch

from rlhf.data.datamodules import ComparisonDataModule
from rlhf.data.sources import DataSource
from rlhf.models.loading import ModelSettings
from rlhf.models.reward import load_reward_model, read_reward_model_info
from rlhf.rm import RewardModule
from rlhf.rm.odin import length_decorrelation_loss, orthogonality_loss, pearson


def test_pearson_matches_numpy_and_is_zero_for_a_constant():
    x, y = torch.tensor([1.0, 2.0, 4.0, 7.0]), torch.tensor([3.0, 1.0, 4.0, 1.5])
    assert float(pearson(x, y)) == pytest.approx(np.corrcoef(x.numpy(), y.numpy())[0, 1], abs=1e-6)
    assert float(pearson(torch.ones(4), y)) == 0.0
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        pearson(x, y[:3])


def test_the_length_loss_rewards_a_length_head_and_punishes_a_length_quality_head():
    lengths = torch.tensor([3, 5, 8, 13])
    quality = torch.tensor([0.2, -0.1, 0.4, 0.0])
    loss, stats = length_decorrelation_loss(quality, lengths.float() * 2, lengths)
    corr_q = float(pearson(quality, lengths.float()))
    assert float(loss) == pytest.approx(abs(corr_q) - 1.0, abs=1e-6)
    assert float(stats["length_head_corr"]) == pytest.approx(1.0, abs=1e-6)
    worst, _ = length_decorrelation_loss(lengths.float(), -lengths.float(), lengths)
    assert float(worst) == pytest.approx(2.0, abs=1e-6)  # |1| - (-1)


def test_orthogonality_loss_is_the_absolute_dot_product():
    assert float(orthogonality_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[-3.0, 1.0, 5.0]]))) == 1.0
    assert float(orthogonality_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 4.0]))) == 0.0


def biased_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """The preferred reply says "apple", the other "stone"; the preferred one is also longer in
    ~80% of pairs, so length alone ranks most pairs right."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        long_, short = rng.randint(6, 12), rng.randint(0, 5)
        chosen_pad, rejected_pad = (long_, short) if rng.random() < 0.8 else (short, long_)
        rows.append({"prompt": f"Question {i}: what should I eat?",
                     "chosen": "Eat an apple" + " really" * chosen_pad + ".",
                     "rejected": "Eat a stone" + " really" * rejected_pad + "."})
    return rows


def fit_rm(root, model_dir, rows, **kwargs):
    path = root / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ComparisonDataModule(train=DataSource(str(path)), val_fraction=0.25, split_seed=1,
                                tokenizer=str(model_dir), max_length=48, max_prompt_length=24, batch_size=8)
    torch.manual_seed(0)
    module = RewardModule(ModelSettings(str(model_dir), dtype="float32"), lr=3e-3, output_dir=str(root / "rm"),
                          stats_max_rows=50, **kwargs)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root, max_steps=40, num_sanity_val_steps=0,
                        val_check_interval=40, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=data)
    return module, data, {k: float(v) for k, v in trainer.callback_metrics.items()}


def val_length_correlation(module, data) -> float:
    """corr(RM score, response length) over the validation sequences."""
    scores, lengths = [], []
    module.model.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            scores.append(module(batch["input_ids"], batch["attention_mask"]))
            lengths.append(batch["attention_mask"].sum(1) - batch["prompt_length"])
    return float(pearson(torch.cat(scores), torch.cat(lengths).float()))


@pytest.fixture(scope="module")
def odin_and_plain(tmp_path_factory, tiny_model_dir):
    rows = biased_rows()
    odin = fit_rm(tmp_path_factory.mktemp("odin"), tiny_model_dir, rows, length_head=True)
    plain = fit_rm(tmp_path_factory.mktemp("plain"), tiny_model_dir, rows)
    return odin, plain


def test_odin_ranks_by_content_with_less_length_in_its_score(odin_and_plain):
    (odin, odin_data, odin_metrics), (plain, plain_data, _) = odin_and_plain
    assert odin_metrics["val/accuracy_total"] == 1.0  # the two heads' sum ranks every held-out pair
    assert odin_metrics["val/accuracy"] >= 0.75  # the quality head alone, from content
    assert odin_metrics["val/length_head_corr"] > 0.5
    for key in ("train/accuracy_total", "val/accuracy_total", "val/quality_length_corr", "val/orthogonal_loss"):
        assert key in odin_metrics
    odin_corr, plain_corr = val_length_correlation(odin, odin_data), val_length_correlation(plain, plain_data)
    assert abs(odin_corr) < 0.5 * abs(plain_corr), (odin_corr, plain_corr)


def test_an_odin_rm_saves_its_length_head_and_scores_with_the_quality_head(odin_and_plain):
    (odin, data, _), _ = odin_and_plain
    out = odin.output_dir
    info = read_reward_model_info(out)
    assert info["length_head"] == "length_head.safetensors"
    loaded = load_reward_model(out, dtype="float32")
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        quality, length = loaded.head_scores(batch["input_ids"], batch["attention_mask"])
        expected_q, expected_l = odin.model.head_scores(batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(loaded(batch["input_ids"], batch["attention_mask"]), quality)
    assert torch.allclose(quality, expected_q, atol=1e-4) and torch.allclose(length, expected_l, atol=1e-4)


@pytest.mark.parametrize("bad", [{"length_coef": -1.0}, {"orthogonal_coef": float("nan")}])
def test_bad_odin_weights_are_refused(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        RewardModule(ModelSettings(str(tiny_model_dir)), length_head=True, **bad)


def test_head_init_std_draws_both_heads_small_with_zero_bias(tiny_model_dir):
    torch.manual_seed(0)
    module = RewardModule(ModelSettings(str(tiny_model_dir)), length_head=True, head_init_std=1e-3)
    module.configure_model()
    default = RewardModule(ModelSettings(str(tiny_model_dir)), length_head=True)
    default.configure_model()
    for head in (module.model.score_head, module.model.length_head):
        assert float(head.weight.std()) == pytest.approx(1e-3, rel=0.5)
        assert float(head.bias.abs().max()) == 0.0
    hidden = module.model.score_head.in_features
    # nn.Linear's default: uniform in +-1/sqrt(hidden), std 1/sqrt(3 * hidden)
    assert float(default.model.score_head.weight.std()) == pytest.approx((3 * hidden) ** -0.5, rel=0.5)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("inf")])
def test_bad_head_init_std_is_refused(tiny_model_dir, bad):
    with pytest.raises(ValueError, match="head_init_std must be a finite number > 0"):
        RewardModule(ModelSettings(str(tiny_model_dir)), length_head=True, head_init_std=bad)


def test_head_init_std_without_a_length_head_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="applies to ODIN's two heads only"):
        RewardModule(ModelSettings(str(tiny_model_dir)), head_init_std=1e-3)
