"""Tiny, randomly initialised models for fast tests, built offline in about a second.

The tokenizer mirrors SmolLM2's conventions: byte-level BPE, ChatML special tokens,
``<|im_end|>`` as eos and pad.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parents[1]
HH_TEXT = REPO_ROOT / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FALLBACK_TEXT = [
    "Human: What is the capital of France?\n\nAssistant: The capital of France is Paris.",
    "Human: Can you help me write a poem?\n\nAssistant: Sure, what should the poem be about?",
] * 50


def _training_text(rows: int = 500) -> list[str]:
    if not HH_TEXT.is_file():
        return _FALLBACK_TEXT
    texts = []
    with gzip.open(HH_TEXT, "rt", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= rows:
                break
            record = json.loads(line)
            texts += [record["chosen"], record["rejected"]]
    return texts


def build_tiny_tokenizer(out_dir: str | Path, chat_template: bool, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on hh-rlhf text, save it to ``out_dir`` and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_training_text(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_llama(
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_pos: int = 512,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> LlamaForCausalLM:
    """Save a random fp32 ``LlamaForCausalLM`` sized for ``tokenizer`` (plus the tokenizer) to ``out_dir``."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_pos,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
