"""What both trainers of a benchmark read: one tokenizer, a random Llama-style base, a reward
model on that base, and fixed-length prompt token ids.

Layout of an asset directory (one per model size)::

    base/        # LlamaForCausalLM (random init, fp32) + tokenizer: the SFT model / policy base
    rm/          # our reward-model format: adapter/ (LoRA on base/), model/ (merged), head
    prompts.json # {"prompt_length": P, "rows": [[ids...], ...]}, every row exactly P tokens

The tokenizer's pad token is set apart from EOS (``<|endoftext|>``, or a new ``<|pad|>``):
TRL finds padding by ``input_ids != pad_token_id``, which with pad == EOS would also mask
the ``<|im_end|>`` tokens inside prompts and responses.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO_ROOT

DEFAULT_TOKENIZER = REPO_ROOT / "models" / "SmolLM2-135M-Instruct"
HH_PROMPTS = REPO_ROOT / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's shape (SmolLM2's proportions: GQA, SwiGLU, tied embeddings)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "small": ModelShape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768),
    "medium": ModelShape(hidden=576, layers=8, heads=9, kv_heads=3, intermediate=1536),
    "smollm2-135m": ModelShape(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536),
}


def peft_lora(r: int, alpha: int, task_type: str) -> Any:
    """PEFT's ``LoraConfig`` for TRL's side: rank ``r`` on :data:`LORA_TARGETS`, no dropout or bias."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type=task_type)


def load_benchmark_tokenizer(source: str | Path) -> Any:
    """The tokenizer at ``source`` with left padding and a pad token distinct from EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if "<|endoftext|>" in tokenizer.get_vocab() and tokenizer.eos_token != "<|endoftext|>":
            tokenizer.pad_token = "<|endoftext|>"
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "left"
    return tokenizer


def prompt_texts(limit: int = 2000) -> list[str]:
    """HH-RLHF prompts (the dialogue up to the last ``Assistant:``); a fixed text when the data
    is not in the checkout."""
    if not HH_PROMPTS.is_file():
        return [f"Human: Tell me a long story about the number {i}.\n\nAssistant:" for i in range(limit)]
    texts = []
    with gzip.open(HH_PROMPTS, "rt", encoding="utf-8") as fh:
        for line in fh:
            chosen = json.loads(line)["chosen"]
            cut = chosen.rfind("\n\nAssistant:")
            if cut > 0:
                texts.append(chosen[: cut + len("\n\nAssistant:")].lstrip())
            if len(texts) >= limit:
                break
    return texts


def prompt_rows(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens (the last ``length`` tokens of prompts at
    least that long, cycled if there are fewer): no prompt padding, the same shapes every step."""
    rows = []
    for text in prompt_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[-length:])
    if not rows:
        raise ValueError(f"no prompt has {length} tokens; lower the prompt length")
    return [rows[i % len(rows)] for i in range(count)]


def load_prompts(path: str | Path) -> list[list[int]]:
    """The fixed-length prompt token ids of an asset directory's ``prompts.json``."""
    return json.loads(Path(path).read_text())["rows"]


def build_assets(
    out_dir: str | Path,
    shape: ModelShape,
    tokenizer_source: str | Path,
    prompt_count: int,
    prompt_length: int,
    lora_r: int = 8,
    lora_alpha: int = 16,
    seed: int = 0,
) -> dict[str, str]:
    """Write ``base/``, ``rm/`` and ``prompts.json`` under ``out_dir`` (skipped when a previous
    build with the same arguments is there); returns their paths.

    The reward model is a LoRA adapter (random, non-zero) on ``base/`` plus a random linear
    head with zero bias, saved in our format with the merged backbone beside it, so TRL's
    ``AutoModelForSequenceClassification`` (a bias-free ``score``) can load the same weights.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.reward import RewardModel

    out = Path(out_dir).resolve()
    paths = {"base": str(out / "base"), "rm": str(out / "rm"), "prompts": str(out / "prompts.json")}
    recipe = {"shape": asdict(shape), "tokenizer": str(Path(tokenizer_source).resolve()), "prompts": prompt_count,
              "prompt_length": prompt_length, "lora_r": lora_r, "lora_alpha": lora_alpha, "seed": seed}
    stamp = out / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_benchmark_tokenizer(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).to(torch.float32).eval()
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])

    base = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)  # name_or_path = base/
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", init_lora_weights=False)  # random A and B: the RM differs from the base
    head = torch.nn.Linear(shape.hidden, 1)
    torch.nn.init.normal_(head.weight, std=shape.hidden ** -0.5)
    torch.nn.init.zeros_(head.bias)
    RewardModel(get_peft_model(base, lora), head).save_pretrained(paths["rm"], tokenizer=tokenizer, merge=True)

    rows = prompt_rows(tokenizer, prompt_count, prompt_length)
    Path(paths["prompts"]).write_text(json.dumps({"prompt_length": prompt_length, "rows": rows}))
    stamp.write_text(json.dumps(recipe))
    return paths
