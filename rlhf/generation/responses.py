"""Sampling responses from a causal LM and joining them to their prompts.

Prompts are left-padded to a common length ``P`` (so every response starts at column ``P``);
responses are right-padded to ``R``. Response tokens after the first EOS are masked out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from rlhf.distributed import synced_generation
from rlhf.generation.sampler import InverseCDFSampler
from rlhf.generation.settings import SamplingSettings
from rlhf.masks import response_mask_from_eos
from rlhf.models.forward import causal_lm_of
from rlhf.timing import timed

__all__ = [
    "GenerationRecord",
    "Scorer",
    "assemble_sequences",
    "contiguous_head_input",
    "sample_and_record",
    "sample_responses",
]


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


@contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Make the LM head's input contiguous while the block runs.

    ``generate``'s prefill feeds the head the slice ``hidden[:, -1:, :]`` of ``[B, P, H]``, a
    strided view; a bias-free ``F.linear`` then takes ``matmul``'s batched path, which copies
    the ``[H, vocab]`` weight once per row (``python -m benchmarks.sampling --head`` measures
    it)."""
    head = causal_lm_of(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@timed("generation")
@torch.no_grad()
def sample_responses(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingSettings,
    eos_id: int,
    pad_id: int,
    sampler: InverseCDFSampler | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample responses ``[batch, R]`` to left-padded prompts ``[batch, P]`` (KV cache on, stop
    at EOS; finished rows padded).

    ``generate`` runs a greedy search whose only logits processor is ``sampler`` (default: an
    :class:`rlhf.generation.sampler.InverseCDFSampler` for ``sampling``): it applies the temperature,
    top-k and top-p of ``sampling`` and draws the token (faster than ``generate``'s
    ``torch.multinomial``). Every built-in processor is switched off explicitly: ``generate`` fills unset (``None``)
    fields from the model's generation config and global defaults, which would make the
    sampling distribution differ from the one log-probs are computed under. A sharded model
    (FSDP) steps in lockstep on every rank until all ranks are done (``synced_gpus``). The
    head's input is made contiguous (:func:`contiguous_head_input`). The default sampler draws
    from ``generator`` (``None``: the global RNG; see :mod:`rlhf.generation.seeds`).
    """
    if sampler is None:
        sampler = InverseCDFSampler(sampling.temperature, sampling.top_k, sampling.top_p, generator)
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    with contiguous_head_input(model):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            logits_processor=LogitsProcessorList([sampler]), synced_gpus=synced_generation(model),
        )
    return out[:, input_ids.shape[1] :]


@dataclass
class GenerationRecord:
    """What generation computed at each sampled token, ``steps`` of them (column ``i`` is
    response token ``i``), under the policy that sampled it.

    Attributes:
        logprobs: ``[B, steps]`` log-probs of the drawn tokens under ``softmax(logits / T)``
            (no top-k / top-p, like the update's log-probs).
        entropy: ``[B, steps]`` entropies of that distribution.
        hidden: ``[B, steps, H]`` the LM head's inputs (the trunk's final hidden states at the
            positions that predicted the tokens: what a shared value head reads).
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor
    hidden: torch.Tensor

    def trimmed(self, length: int) -> GenerationRecord:
        """The first ``length`` columns (the responses' length after :func:`assemble_sequences`)."""
        return GenerationRecord(self.logprobs[:, :length], self.entropy[:, :length], self.hidden[:, :length])


@torch.no_grad()
def sample_and_record(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingSettings,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, GenerationRecord]:
    """:func:`sample_responses`, also keeping each step's log-prob, entropy and head input
    (:class:`GenerationRecord`): a rollout can take its old log-probs and shared-critic values
    from generation instead of a second policy pass over the sequences. With the KV cache the
    numbers are those of the full forward pass up to float rounding. Draws from ``generator``
    (``None``: the global RNG)."""
    sampler = InverseCDFSampler(sampling.temperature, sampling.top_k, sampling.top_p, generator, record=True)
    hidden: list[torch.Tensor] = []

    def keep_head_input(module: nn.Module, args: tuple) -> None:
        hidden.append(args[0][:, -1].clone())  # [B, H]: the position predicting the next token

    head = causal_lm_of(model).get_output_embeddings()
    handle = head.register_forward_pre_hook(keep_head_input)
    try:
        responses = sample_responses(model, input_ids, attention_mask, sampling, eos_id, pad_id, sampler)
    finally:
        handle.remove()
    logprobs, entropy = sampler.recorded()
    return responses, GenerationRecord(logprobs, entropy, torch.stack(hidden, dim=1))


class Scorer(Protocol):
    """Scores whole sequences: ``(input_ids, attention_mask) -> [batch]`` (read at the last
    real token of each row)."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


def assemble_sequences(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    responses: torch.Tensor,
    eos_id: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Join prompts and sampled responses, masking everything after the first EOS.

    Returns ``(input_ids [B, P+R], attention_mask [B, P+R], response_mask [B, R], has_eos [B])``
    with ``R`` trimmed to the longest valid response.
    """
    response_mask = response_mask_from_eos(responses, eos_id).to(prompt_mask.dtype)
    has_eos = ((responses == eos_id) & response_mask.bool()).any(dim=1)
    length = max(1, int(response_mask.sum(dim=1).max()))
    responses, response_mask = responses[:, :length], response_mask[:, :length]
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, pad_id))
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    return input_ids, attention_mask, response_mask, has_eos
