"""The per-token draw of generation: ``torch.multinomial`` vs our inverse-CDF sampler.

    python -m benchmarks.sampling            # seconds; prints milliseconds per draw
    python -m benchmarks.sampling --generate # + 64 tokens x 8 prompts on the medium model
    python -m benchmarks.sampling --head     # + the LM head on generate's strided prefill slice
    python -m benchmarks.sampling --head-rows  # + the LM head on 64-512 positions a call

Both draw one token per row from ``softmax(logits / 0.7)`` over a SmolLM2-sized vocabulary
(49,152), temperature and softmax included (what ``generate``'s sampling step does per token).
``--generate`` also times whole generations with the benchmark's random ``medium`` Llama
(LoRA on): ``generate``'s own sampling (``do_sample=True``, ``torch.multinomial``) against
:func:`rlhf.generation.sample_responses`. ``--head`` times a bias-free ``F.linear`` over a
SmolLM2-sized head (576 x 49,152) on ``hidden[:, -1:, :]`` of ``[8, 48, 576]``, as
``generate``'s prefill calls it, against the same slice made contiguous
(:func:`rlhf.generation.responses.contiguous_head_input`). Nothing is written: the numbers explain
lines of ``docs/performance-notes.md``, they are not a target.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from rlhf.generation.sampler import sample_from_logits

GENERATION_SHAPE = "medium"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 64, 64


def milliseconds_per_call(draw: Callable[[], torch.Tensor], repeats: int) -> float:
    """Mean wall-clock milliseconds of ``draw()`` over ``repeats`` calls after one warm-up."""
    draw()
    start = time.perf_counter()
    for _ in range(repeats):
        draw()
    return (time.perf_counter() - start) / repeats * 1e3


def generation_seconds(repeats: int = 3) -> dict[str, list[float]]:
    """Seconds per generation (``PROMPTS`` x up to ``NEW_TOKENS`` tokens; on a random 49k
    vocabulary EOS is drawn about once in 49k tokens, so all run to the end) with ``generate``'s
    multinomial sampling and with ``sample_responses``."""
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from benchmarks.assets import LORA_TARGETS, SIZES
    from rlhf.generation import SamplingSettings, sample_responses

    shape = SIZES[GENERATION_SHAPE]
    config = LlamaConfig(vocab_size=49152, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         intermediate_size=shape.intermediate, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = get_peft_model(LlamaForCausalLM(config).eval(), LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    ids = torch.randint(10, 49000, (PROMPTS, PROMPT_TOKENS))
    mask = torch.ones_like(ids)
    multinomial = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                                   max_new_tokens=NEW_TOKENS, eos_token_id=2, pad_token_id=3)
    ours = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.7)
    runs = {
        "generate (torch.multinomial)": lambda: model.generate(input_ids=ids, attention_mask=mask,
                                                                generation_config=multinomial),
        "sample_responses (inverse CDF)": lambda: sample_responses(model, ids, mask, ours, 2, 3),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    return {name: values[1:] for name, values in seconds.items()}


def head_milliseconds(dtype: torch.dtype, repeats: int = 5) -> tuple[float, float]:
    """Milliseconds of the LM head on the strided prefill slice, and on it made contiguous."""
    weight = torch.randn(49152, 576, dtype=dtype)
    hidden = torch.randn(PROMPTS, 48, 576, dtype=dtype)
    strided = hidden[:, -1:, :]
    with torch.no_grad():
        return (milliseconds_per_call(lambda: torch.nn.functional.linear(strided, weight), repeats),
                milliseconds_per_call(lambda: torch.nn.functional.linear(strided.contiguous(), weight), repeats))


def head_rows_milliseconds(rows: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Milliseconds of a bias-free LM head (SmolLM2-sized, 576 x 49,152) on ``rows`` contiguous
    ``[rows, 576]`` positions: one call of :func:`rlhf.models.logprobs.response_logprobs`'s chunks."""
    weight = torch.randn(49152, 576, dtype=dtype)
    hidden = torch.randn(rows, 576, dtype=dtype)
    with torch.no_grad():
        return milliseconds_per_call(lambda: torch.nn.functional.linear(hidden, weight), repeats)


def main(argv: list[str] | None = None) -> None:
    """Time the draws (and, as asked, the LM head and whole generations); print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--generate", action="store_true", help="also time whole generations")
    parser.add_argument("--head", action="store_true", help="also time the LM head on a strided slice")
    parser.add_argument("--head-rows", action="store_true",
                        help="also time the LM head on 64-512 positions a call (response_logprobs' chunks)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocabulary {args.vocab}")
    print("| rows | torch.multinomial (ms) | inverse CDF (ms) |\n| --- | --- | --- |")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab) * 3
        multinomial = milliseconds_per_call(
            lambda: torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1), args.repeats
        )
        inverse_cdf = milliseconds_per_call(lambda: sample_from_logits(logits, 0.7), args.repeats)
        print(f"| {rows} | {multinomial:.2f} | {inverse_cdf:.2f} |")
    if args.head:
        print(f"\nLM head on generate's prefill slice, {PROMPTS} rows (ms): strided vs contiguous")
        for dtype in (torch.float32, torch.bfloat16):
            strided, contiguous = head_milliseconds(dtype)
            print(f"  {dtype}: {strided:.1f} vs {contiguous:.1f}")
    if args.head_rows:
        print("\nLM head on contiguous positions (ms a call)\n| positions | float32 | bf16 |\n| --- | --- | --- |")
        for rows in (64, 128, 256, 512):
            print(f"| {rows} | {head_rows_milliseconds(rows, torch.float32):.1f} | "
                  f"{head_rows_milliseconds(rows, torch.bfloat16):.1f} |")
    if args.generate:
        print(f"\n{PROMPTS} prompts x {NEW_TOKENS} new tokens, {GENERATION_SHAPE} model, LoRA on (s):")
        for name, values in generation_seconds().items():
            print(f"  {name}: " + ", ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
