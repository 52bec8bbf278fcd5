"""Rollouts: sampling responses, the no-grad passes over them, and the buffer they fill.

A rollout batch is ``[batch, prompt + response]`` token ids: prompts left-padded to a common
length ``P`` (so every response starts at column ``P``), responses right-padded to ``R``.
Response tokens after the first EOS are masked out of everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Protocol

import torch
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList

from rlhf.distributed import root_forward, synced_generation
from rlhf.models.forward import causal_lm_of, trunk_hidden
from rlhf.ppo.losses import (
    check_temperature,
    half_precision_matmul,
    head_logprobs,
    logprobs_and_entropy,
    logprobs_from_logits,
)
from rlhf.ppo.masks import response_mask_from_eos
from rlhf.ppo.sampler import InverseCDFSampler
from rlhf.ppo.settings import SamplingSettings
from rlhf.ppo.timing import timed

# Response positions per LM-head call in :func:`response_logprobs`. On the CPU the head's matmul
# is largely bound by reading its ``[vocab, hidden]`` weight: 128 positions cost 1.3-1.4x what 64
# do (49k x 576, two threads: float32 24-31 vs 17-24 ms, bf16 7.0-8.9 vs 4.4-5.1 ms; ``python -m
# benchmarks.sampling --head-rows``, three runs), 256 more than twice 128; the ``[positions,
# vocab]`` logits a call makes grow with it (128 x 49k float32: 24 MiB).
HEAD_CHUNK_POSITIONS = 128
# The same when the head's matmul runs in float16 / bfloat16: the softmax is still float32, so a
# call's float32 buffer is twice the logits the matmul makes, and two calls of 64 cost ~1.15x one
# of 128 (the bf16 timings above). Ours, bf16, small model, 32 tokens (``python -m
# benchmarks.ppo_vs_trl --precision bf16 --trainers ours --sizes small``, two runs each): peak
# RSS 724-725 MiB at 128 positions, 698-701 at 64, seconds per iteration unchanged.
HEAD_CHUNK_POSITIONS_HALF = 64


def response_logprobs(
    model: nn.Module,
    hidden: torch.Tensor,
    response_start: int,
    tokens: torch.Tensor,
    temperature: float,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``[B, R]`` of the response ``tokens`` ``[B, R]`` (and, with ``entropy``, the
    entropies ``[B, R]``) under ``softmax(lm_head(hidden) / temperature)``.

    The hidden state at column ``t`` predicts token ``t + 1``, so response token ``i`` (column
    ``response_start + i``) is predicted from column ``response_start + i - 1``. The LM head runs
    on a few rows of the batch at a time (about :data:`HEAD_CHUNK_POSITIONS` positions, or
    :data:`HEAD_CHUNK_POSITIONS_HALF` when its matmul runs in half precision; at least one row):
    the ``[B, R, vocab]`` logits never exist at once (on a 49k vocabulary they are the update's
    largest tensors). A frozen ``nn.Linear`` head without ``entropy_grad`` goes through
    :func:`rlhf.ppo.losses.head_logprobs`, which keeps ``[rows * R, hidden]`` per chunk for
    backward instead of the chunk's logits; otherwise the logits are kept, and in backward each
    chunk's logit gradient is freed before the next. Each chunk's ``[rows * R, hidden]`` input is
    made contiguous, so ``nn.Linear`` takes its plain matmul path. A head without a bias is
    linear, so the temperature divides its ``[rows * R, hidden]`` input instead of the
    ``vocab``-times larger logits (and their gradient). ``entropy_grad`` keeps the entropy in the
    autograd graph.
    """
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    predicting = hidden[:, response_start - 1 : -1]
    batch, length = tokens.shape
    weight = getattr(head, "weight", None)
    half = isinstance(weight, torch.Tensor) and half_precision_matmul(hidden, weight)
    rows_per_call = max(1, (HEAD_CHUNK_POSITIONS_HALF if half else HEAD_CHUNK_POSITIONS) // max(1, length))
    fold = temperature != 1.0 and isinstance(head, nn.Linear) and head.bias is None
    if fold:
        check_temperature(temperature)
    logits_temperature = 1.0 if fold else temperature
    # A frozen plain nn.Linear head (the usual LoRA setup) goes through head_logprobs, which
    # keeps [positions, hidden] for backward instead of the [positions, vocab] logits. A
    # trained, quantised or adapter-wrapped head, or an entropy bonus, takes the head + softmax path.
    frozen_linear = (
        type(head) is nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
        and not entropy_grad
    )

    def chunked() -> tuple[torch.Tensor, torch.Tensor | None]:
        logps, entropies = [], []
        for lo in range(0, batch, rows_per_call):
            rows = predicting[lo : lo + rows_per_call]
            flat = rows.reshape(-1, rows.shape[-1])  # [rows * R, hidden], contiguous
            if fold:
                flat = flat / temperature
            row_tokens = tokens[lo : lo + rows_per_call]
            if frozen_linear:
                logp, ent = head_logprobs(flat, head.weight, head.bias, row_tokens.reshape(-1), logits_temperature, entropy)
                logps.append(logp.view(row_tokens.shape))
                if entropy:
                    entropies.append(ent.view(row_tokens.shape))
                continue
            logits = head(flat).view(rows.shape[0], length, -1)
            if entropy:
                logp, ent = logprobs_and_entropy(logits, row_tokens, logits_temperature, entropy_grad)
                entropies.append(ent)
            else:
                logp = logprobs_from_logits(logits, row_tokens, logits_temperature)
            logps.append(logp)
        if not logps:
            empty = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)
            return empty, (empty.clone() if entropy else None)
        return torch.cat(logps), (torch.cat(entropies) if entropy else None)

    return root_forward(lm, chunked)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


@contextmanager
def contiguous_head_input(model: nn.Module) -> Iterator[None]:
    """Make the LM head's input contiguous while the block runs.

    ``generate``'s prefill feeds the head the slice ``hidden[:, -1:, :]`` of ``[B, P, H]``, a
    strided view; a bias-free ``F.linear`` then takes ``matmul``'s batched path, which copies
    the ``[H, vocab]`` weight once per row. Measured on the CPU for 8 rows x 576 x 49k vocab:
    bf16 710-815 ms vs 3-7 ms for the same slice made contiguous; float32 23-31 vs 10-13 ms
    (``python -m benchmarks.sampling --head``)."""
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
) -> torch.Tensor:
    """Sample responses ``[batch, R]`` to left-padded prompts ``[batch, P]`` (KV cache on, stop
    at EOS; finished rows padded).

    ``generate`` runs a greedy search whose only logits processor is ``sampler`` (default: an
    :class:`rlhf.ppo.sampler.InverseCDFSampler` for ``sampling``): it applies the temperature,
    top-k and top-p of ``sampling`` and draws the token (faster than ``generate``'s
    ``torch.multinomial``). Every built-in processor is switched off explicitly: ``generate`` fills unset (``None``)
    fields from the model's generation config and global defaults, which would make the
    sampling distribution differ from the one log-probs are computed under. A sharded model
    (FSDP) steps in lockstep on every rank until all ranks are done (``synced_gpus``). The
    head's input is made contiguous (:func:`contiguous_head_input`).
    """
    if sampler is None:
        sampler = InverseCDFSampler(sampling.temperature, sampling.top_k, sampling.top_p)
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
) -> tuple[torch.Tensor, GenerationRecord]:
    """:func:`sample_responses`, also keeping each step's log-prob, entropy and head input
    (:class:`GenerationRecord`): a rollout can take its old log-probs and shared-critic values
    from generation instead of a second policy pass over the sequences. With the KV cache the
    numbers are those of the full forward pass up to float rounding."""
    sampler = InverseCDFSampler(sampling.temperature, sampling.top_k, sampling.top_p, record=True)
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


@dataclass
class Rollout:
    """The in-loop buffer of one PPO iteration. ``B`` sequences, ``R`` response columns.

    Attributes:
        input_ids, attention_mask: ``[B, P + R]``; the mask is 0 on padding and after EOS.
        response_start: ``P``, the column where responses start.
        response_mask: ``[B, R]`` 1 on response tokens up to and including the first EOS.
        logprobs, ref_logprobs: ``[B, R]`` policy (old) and reference log-probs (temperature
            scaled like sampling).
        values: ``[B, R]`` critic values at rollout time (zeros when critic-free).
        raw_scores: ``[B]`` reward-model scores; scores: ``[B]`` after shaping.
        kl: ``[B, R]`` per-token KL estimate; rewards: ``[B, R]`` per-token rewards.
        advantages, returns: ``[B, R]``.
        has_eos: ``[B]`` whether the response ended with EOS.
        entropy: ``[B, R]`` per-token entropy of the rollout policy (temperature-scaled, before
            any top-k / top-p truncation).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    has_eos: torch.Tensor
    entropy: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` of every per-sequence tensor (a minibatch)."""
        picked = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **picked)


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


def sequence_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_start: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response log-probs ``[B, R]`` and the trunk's hidden states ``[B, R, hidden]`` that
    predicted them (what a shared value head reads)."""
    hidden = trunk_hidden(model, input_ids, attention_mask)
    logp, _ = response_logprobs(model, hidden, response_start, input_ids[:, response_start:], temperature)
    return logp, hidden[:, response_start - 1 : -1]
