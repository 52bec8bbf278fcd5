"""Ranking export for the next labelling round, the ``ranks`` column, and the gold labeller."""

from __future__ import annotations

import json

import pytest

from rlhf.data.datamodules import group_preferences
from rlhf.data.errors import DataError
from rlhf.data.records import Ranking, Turn
from rlhf.data.sources import DataSource, load_records
from rlhf.export import ranking_row, write_rankings
from rlhf.gold import (
    competition_ranks,
    gold_function,
    gold_proxy_curve,
    vader_positivity,
)

PROMPT = (Turn("user", "How was the film?"),)


def test_competition_ranks_share_ties():
    assert competition_ranks([0.5, 0.9, 0.5, 0.1]) == [2, 1, 2, 4]


def test_ranks_give_only_pairs_of_different_rank():
    ranking = Ranking(PROMPT, ("a", "b", "c"), ranks=(2, 1, 2))
    assert ranking.pairs() == [(1, 0), (1, 2)]
    assert [(c.chosen, c.rejected) for c in ranking.to_comparisons()] == [("b", "a"), ("b", "c")]


def test_export_rows_round_trip_through_the_loader(tmp_path):
    samples = [["It was great, I loved it!", "It was bad.", "It was bad.", ""], ["ok", "ok"]]
    rows, reasons = [], []
    for texts in samples:
        row, reason = ranking_row(PROMPT, texts, "policy-dir", gold="vader")
        rows.append(row) if row else reasons.append(reason)
    assert reasons == ["too_few_distinct"]
    path = write_rankings(rows, tmp_path / "rankings.jsonl")
    [record] = load_records(DataSource(path=str(path)), "preference").records
    assert record.prompt == PROMPT
    assert record.completions == ("It was great, I loved it!", "It was bad.")  # duplicate, empty dropped
    assert record.ranks == (1, 2)
    [group] = group_preferences([record])
    assert group.pairs == [(0, 1)]
    assert json.loads(path.read_text())["gold_scores"][0] > 0 > json.loads(path.read_text())["gold_scores"][1]


def test_unfilled_ranks_are_a_clear_error(tmp_path):
    row, _ = ranking_row(PROMPT, ["one answer", "another answer"], "policy-dir")
    assert row["ranks"] is None
    path = write_rankings([row], tmp_path / "todo.jsonl")
    with pytest.raises(DataError, match=r"todo.jsonl: line 1: field 'ranks': ranks not filled in"):
        load_records(DataSource(path=str(path)), "preference")


@pytest.mark.parametrize(
    ("ranks", "problem"),
    [([1], "1 ranks for 2 completions"), ([1, "2"], "expected a list of integers"), ([1, 1], "same rank")],
)
def test_bad_ranks_name_the_problem(tmp_path, ranks, problem):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completions": ["a", "b"], "ranks": ranks}) + "\n")
    with pytest.raises(DataError, match=problem):
        load_records(DataSource(path=str(path)), "preference")


def test_all_tied_gold_scores_skip_the_prompt():
    assert ranking_row(PROMPT, ["The film.", "A film."], "p", gold="vader") == (None, "all_tied")


def test_vader_gold_is_not_raised_by_length():
    [short, padded, positive] = vader_positivity([
        "The film was good.",
        "The film was good. " + "It was shown in a room with chairs and a screen. " * 5,
        "The film was good, wonderful and fun.",
    ])
    assert positive > short > padded > 0
    assert gold_function("vader") is vader_positivity
    with pytest.raises(ValueError, match="unknown gold"):
        gold_function("oracle")


def test_gold_proxy_curve_keeps_rows_with_all_three_metrics():
    nan = float("nan")
    columns = {"step": [0.0, 1.0], "kl/mean": [4.0, 1.0], "reward/mean": [0.1, nan], "gold/mean": [0.2, nan]}
    assert gold_proxy_curve(columns) == {"step": [0.0], "sqrt_kl": [2.0], "proxy": [0.1], "gold": [0.2]}
    assert gold_proxy_curve(columns, "val/") == {"step": [], "sqrt_kl": [], "proxy": [], "gold": []}


def test_gold_figure_from_a_csv_log(tmp_path):
    from rlhf.gold import plot_gold_vs_proxy

    log = tmp_path / "run" / "csv" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    lines = ["step,kl/mean,reward/mean,gold/mean,val/kl/mean,val/reward/mean,val/gold/mean"]
    lines += [f"{i},{i * 0.5},{0.1 * i},{0.05 * i},,," for i in range(6)]
    lines += ["5,,,,2.0,0.4,0.2"]
    log.write_text("\n".join(lines) + "\n")
    out = plot_gold_vs_proxy(tmp_path / "run", tmp_path / "fig.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="gold/mean"):
        log.write_text("step,kl/mean\n0,1.0\n")
        plot_gold_vs_proxy(tmp_path / "run", tmp_path / "fig2.png")


def test_substantive_gold_discounts_replies_under_twelve_words():
    from rlhf.gold import substantive_positivity

    reply = "Yes, that is a good idea and I think it would work well for you."  # 15 words
    [yes, full] = substantive_positivity(["Yes.", reply])
    [yes_vader, full_vader] = vader_positivity(["Yes.", reply])
    assert yes_vader == 1.0 and yes == pytest.approx(1.0 / 12)
    assert full == pytest.approx(full_vader) and full > yes
    assert gold_function("vader_substantive") is substantive_positivity
    with pytest.raises(ValueError, match="min_words"):
        substantive_positivity(["x"], min_words=0)


def test_relabel_reranks_under_another_gold_and_drops_ties(tmp_path, capsys):
    from rlhf.gold import main as gold_main
    from rlhf.gold import relabel_rankings

    long_plain = "It depends on the recipe, but most people bake it for about forty minutes at medium heat."
    rows = [
        {"prompt": [{"role": "user", "content": "q"}], "completions": ["Yes.", long_plain + " Great!"],
         "ranks": [1, 2], "gold_scores": [1.0, 0.2], "gold": "vader", "policy": "p"},
        {"prompt": "q2", "completions": ["The oven.", "A pan."], "ranks": [1, 2], "policy": "p"},
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    relabelled, tied = relabel_rankings(path, "vader_substantive")
    assert tied == 1 and len(relabelled) == 1
    assert relabelled[0]["ranks"] == [2, 1] and relabelled[0]["gold"] == "vader_substantive"
    assert relabelled[0]["prompt"] == rows[0]["prompt"] and relabelled[0]["policy"] == "p"

    out = tmp_path / "out" / "relabelled.jsonl"
    assert gold_main(["relabel", str(path), "--gold", "vader_substantive", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == relabelled
    assert "dropped 1 all tied" in capsys.readouterr().out

    path.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"labels\.jsonl: line 2: field 'completions': expected a list of strings"):
        relabel_rankings(path, "vader_substantive")
