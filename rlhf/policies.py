"""Saved policies as plain models: resolving stage outputs, sampling and scoring responses.

What evaluation and export share: a policy is a stage output directory (``outputs/.../sft``,
``outputs/.../ppo``, found through its ``rlhf_stage.json``) or any Hugging Face model directory
or Hub id. Batches are the left-padded prompt batches of
:class:`~rlhf.data.PromptDataModule` (``input_ids``/``attention_mask`` ``[batch, prompt]``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlhf.data.datamodules import PromptDataModule
from rlhf.data.records import Conversation
from rlhf.data.sources import DataSource
from rlhf.generation import SamplingSettings, assemble_sequences, sample_responses
from rlhf.masks import masked_sum
from rlhf.models.loading import ModelSettings, load_causal_lm, resolve_dtype
from rlhf.models.logprobs import sequence_logprobs
from rlhf.outputs import read_stage_marker

if TYPE_CHECKING:
    from tqdm import tqdm
    from transformers import PreTrainedTokenizerBase


def resolve_model_dir(path: str | os.PathLike) -> str:
    """The loadable model behind ``path``: a stage output's merged ``model/`` directory, or
    ``path`` itself (a model directory or Hub id).

    Raises:
        ValueError: ``path`` is a stage output that saved no merged model (quantized base).
    """
    marker = read_stage_marker(path) if Path(path).is_dir() else None
    if marker is None:
        return os.fspath(path)
    model_dir = marker.get("model_dir")
    if not model_dir:
        raise ValueError(
            f"{path} ({marker.get('stage')} output) has no merged model/ (quantized base?); "
            f"pass its base model and adapter instead"
        )
    return os.fspath(Path(path) / model_dir)


def same_model(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two model references resolve to the same directory (or the same Hub id)."""
    a, b = resolve_model_dir(a), resolve_model_dir(b)
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_policy(
    path: str | os.PathLike, device: torch.device, dtype: str = "auto", precision: str | None = None
) -> nn.Module:
    """Load the model behind ``path`` (see :func:`resolve_model_dir`) in eval mode on ``device``.

    ``precision`` is the autocast it will run under: ``dtype="auto"`` is then bf16 for
    ``bf16-mixed`` (see :func:`rlhf.models.loading.resolve_dtype`; nothing here trains).
    """
    dtype = str(resolve_dtype(dtype, precision)).removeprefix("torch.")
    model = load_causal_lm(ModelSettings(resolve_model_dir(path), dtype=dtype))
    return model.to(device).eval()


@dataclass
class Generation:
    """Sampled responses joined to their prompts.

    Attributes:
        input_ids, attention_mask: ``[B, P + R]`` (mask 0 on padding and after EOS).
        response_start: ``P``.
        response_mask: ``[B, R]`` 1 on response tokens up to and including the first EOS.
        has_eos: ``[B]`` whether the response ended with EOS.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    has_eos: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Response lengths in tokens ``[B]``."""
        return self.response_mask.sum(dim=1)

    def response_ids(self, row: int) -> list[int]:
        """The response tokens of ``row`` (EOS included when present)."""
        ids = self.input_ids[row, self.response_start :][self.response_mask[row].bool()]
        return ids.tolist()


    def response_text(self, row: int, tokenizer: PreTrainedTokenizerBase) -> str:
        """The response of ``row`` decoded, special tokens dropped."""
        return tokenizer.decode(self.response_ids(row), skip_special_tokens=True)


def sample_batches(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batches: Iterable[dict[str, torch.Tensor]],
    sampling: SamplingSettings,
    device: torch.device,
    precision: str = "32",
    repeats: int = 1,
    bar: tqdm | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], Generation]]:
    """Sample one response per row of each left-padded prompt batch ``[B, P]``, each row
    repeated ``repeats`` times (adjacent), on ``device`` under ``precision``'s autocast.

    Yields each batch with its :class:`Generation` (``[B * repeats, P + R]``); ``bar`` advances
    by the responses sampled.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    for batch in batches:
        ids = batch["input_ids"].to(device).repeat_interleave(repeats, dim=0)
        mask = batch["attention_mask"].to(device).repeat_interleave(repeats, dim=0)
        with autocast_for(device, precision):
            responses = sample_responses(model, ids, mask, sampling, eos, pad)
        joined, joined_mask, response_mask, has_eos = assemble_sequences(ids, mask, responses, eos, pad)
        yield batch, Generation(joined, joined_mask, ids.shape[1], response_mask, has_eos)
        if bar is not None:
            bar.update(len(ids))


@contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True) -> Iterator[tqdm | None]:
    """A tqdm bar on stderr counting sampled responses (``None`` when not ``enabled``)."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="resp", file=sys.stderr) as bar:
        yield bar


@torch.no_grad()
def response_logprob_sums(model: nn.Module, generation: Generation, temperature: float) -> torch.Tensor:
    """Summed log-probs ``[B]`` of each response under ``model`` (temperature-scaled logits,
    as PPO computes them)."""
    logp, _ = sequence_logprobs(
        model, generation.input_ids, generation.attention_mask, generation.response_start, temperature
    )
    return masked_sum(logp.float(), generation.response_mask.float(), dim=1)


def prompt_batches(
    data: PromptDataModule, split: str = "val", limit: int | None = None
) -> tuple[list[dict[str, torch.Tensor]], list[Conversation]]:
    """Left-padded prompt batches of ``split`` (``val``, ``train`` or ``all``) of a prompt data
    module, and the prompts; a batch's ``index`` ``[batch]`` indexes that prompt list.

    ``val`` is exactly what the data module holds out (same files, ``val_fraction``,
    ``split_seed``); ``limit`` keeps the first ``limit`` prompts.
    """
    if split not in ("val", "train", "all"):
        raise ValueError(f"split must be val, train or all, got {split!r}")
    data.setup()
    parts = {
        "val": [(data.val_dataset, data.val_units)],
        "train": [(data.train_dataset, data.train_units)],
        "all": [(data.train_dataset, data.train_units), (data.val_dataset, data.val_units)],
    }[split]
    items: list[dict] = []
    prompts: list[Conversation] = []
    for dataset, units in parts:
        for item in dataset.items:
            items.append({**item, "index": len(prompts)})
            prompts.append(units[item["index"]].prompt)
    if limit is not None:
        items, prompts = items[:limit], prompts[:limit]
    if not items:
        raise ValueError(f"no prompts in split {split!r}")
    collate = data.collator()
    size = data.eval_batch_size
    return [collate(items[i : i + size]) for i in range(0, len(items), size)], prompts


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is ``bf16-mixed``, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


# ------------------------------------------------------------------ the CLIs' shared arguments
def add_prompt_sampling_arguments(
    p: argparse.ArgumentParser, split: str, batch_size: int, temperature: float
) -> None:
    """Prompt source/split, truncation, sampling and device arguments (``rlhf.evaluate``,
    ``rlhf.export``); the defaults that differ between them are parameters."""
    p.add_argument("--data", nargs="+", required=True, help="prompt files")
    p.add_argument("--schema", default="fields", choices=["fields", "hh_rlhf", "alpaca"])
    p.add_argument("--split", default=split, choices=["val", "train", "all"])
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use at most this many prompts")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--long-prompts", default="truncate", choices=["truncate", "drop"],
                   help="prompts over --max-prompt-length: keep their last tokens, or skip them")
    p.add_argument("--batch-size", type=int, default=batch_size, help="prompts per batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed"])
    p.add_argument("--no-progress", action="store_true")


def prompt_data_from_args(args: argparse.Namespace, policy: str | os.PathLike) -> PromptDataModule:
    """The prompt data module those arguments describe, with the tokenizer of ``policy`` (see
    :func:`resolve_model_dir`); bad rows skipped and counted."""
    return PromptDataModule(
        train=[DataSource(path=path, schema=args.schema) for path in args.data],
        val_fraction=args.val_fraction if args.split != "all" else 0.0,
        split_seed=args.split_seed,
        tokenizer=resolve_model_dir(policy),
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        long_prompts=args.long_prompts,
        batch_size=args.batch_size,
        on_bad_row="skip",
    )


def sampling_from_args(args: argparse.Namespace) -> SamplingSettings:
    return SamplingSettings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
