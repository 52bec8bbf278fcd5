"""The memory benchmarks measure what they say: one base vs four, quantized vs full weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.assets import SIZES, build_assets
from benchmarks.harness import weight_bytes
from benchmarks.ppo_memory import MemorySpec, run_layout, summarize
from benchmarks.quantized_base import parse_args as quantized_args


def test_weight_bytes_counts_shared_storage_once():
    a = nn.Linear(4, 4, bias=False)
    b = nn.Linear(4, 4, bias=False)
    b.weight = a.weight  # tied, like input/output embeddings
    assert weight_bytes(a) == 16 * 4
    assert weight_bytes(a, b) == 16 * 4
    assert weight_bytes(a, nn.Linear(4, 4, bias=False)) == 2 * 16 * 4


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tiny_model_dir):
    assets = build_assets(tmp_path_factory.mktemp("memory-assets"), SIZES["tiny"], tiny_model_dir,
                          prompt_count=4, prompt_length=8)
    results = {}
    for layout in ("separate", "shared"):
        spec = MemorySpec(layout, base=assets["base"], rm=assets["rm"], prompts=assets["prompts"], batch_size=2,
                          response_length=4, ppo_epochs=1, iterations=2, threads=1)
        results[layout] = run_layout(spec)
    return results


def test_separate_layout_holds_four_bases_shared_holds_one(layouts, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = weight_bytes(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    separate, shared = layouts["separate"], layouts["shared"]
    # Same trainable parameters (policy + value LoRA and the value head) in both layouts.
    assert separate["trainable_params"] == shared["trainable_params"] > 0
    adapters = shared["weight_bytes"] - base
    assert 0 < adapters < base
    # separate: policy, reference, critic and reward bases (+ the same adapters, + the RM head)
    assert separate["weight_bytes"] >= 4 * base
    assert shared["weight_bytes"] < 1.5 * base + adapters
    assert len(separate["iteration_seconds"]) == len(shared["iteration_seconds"]) == 2


def test_summary_ratio_is_shared_over_separate(layouts):
    summary = summarize(layouts)
    ratio = summary["shared_over_separate"]["weights_mib"]
    assert ratio == pytest.approx(layouts["shared"]["weight_bytes"] / layouts["separate"]["weight_bytes"])
    assert ratio < 0.5
    assert torch.isfinite(torch.tensor(summary["layouts"]["shared"]["peak_rss_mib"]))


def test_quantized_base_compares_against_the_full_precision_base():
    assert quantized_args(["--precisions", "none,4bit"]).precisions == "none,4bit"
    for bad in ("4bit,8bit", "none,2bit"):
        with pytest.raises(SystemExit):
            quantized_args(["--precisions", bad])
