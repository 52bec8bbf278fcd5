"""One LightningDataModule layer for the three stages.

:class:`RLHFDataModule` owns everything the stages share: reading sources, the deterministic
train/validation split, tokenization through :class:`PromptFormatter`, truncation and the
dataloaders. A stage's data module only says which record kind it reads, how one unit of data is
encoded and which collator pads a batch.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from rlhf.data.collate import DemonstrationCollator, PreferenceCollator, PromptCollator
from rlhf.data.datasource import DataSource
from rlhf.data.errors import DataError
from rlhf.data.preferences import PreferenceGroup, drop_identical_pairs, group_preferences
from rlhf.data.records import (
    Comparison,
    Conversation,
    Demonstration,
    PromptRecord,
    Ranking,
    conversation_text,
)
from rlhf.data.sampling import ResumableRandomSampler, ResumedDataLoader, even_distributed_sampler
from rlhf.data.sources import load_records
from rlhf.data.tokenization import PromptFormatter, truncate_pair

log = logging.getLogger("rlhf.data")


class ListDataset:
    """A map-style dataset over a list of encoded items."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def deterministic_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and validation parts of ``n`` units; the same for the same seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n > 1:
        n_val = max(1, n_val)
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_preference_prompts(
    records: list[Comparison | Ranking], split: str, val_fraction: float, seed: int
) -> list[Conversation]:
    """The prompts of the ``split`` (``train`` or ``val``) prompt groups that a
    :class:`ComparisonDataModule` over ``records`` (in file order) with ``val_fraction`` and
    split ``seed`` trains or validates on."""
    groups = group_preferences(records)
    train, val = deterministic_split(len(groups), val_fraction, seed)
    return [groups[i].prompt for i in (val if split == "val" else train)]


class RLHFDataModule(L.LightningDataModule):
    """Shared base: sources -> records -> units -> token ids -> padded batches.

    Args:
        train: one source or a list of sources for training data.
        val: sources for validation; when ``None``, ``val_fraction`` of ``train`` is held out.
        val_fraction: fraction of training units held out when ``val`` is not given.
        split_seed: seed of the train/validation split (independent of the training seed).
        tokenizer: tokenizer path or Hub id; ``None`` takes the model's (``module.tokenizer``).
        max_length: longest prompt+response in tokens.
        max_prompt_length: prompts are left-truncated to this many tokens.
        long_prompts: what happens to a prompt longer than ``max_prompt_length``:
            ``"truncate"`` keeps its last ``max_prompt_length`` tokens (the latest turns);
            ``"drop"`` drops its unit (counted as ``long_prompts_dropped`` in :attr:`stats`),
            so every kept prompt is whole: cheaper passes and no cut-off dialogue context.
        batch_size: training units per batch (demonstrations, preference groups or prompts).
        eval_batch_size: validation batch size (defaults to ``batch_size``).
        num_workers: dataloader worker processes.
        on_bad_row: ``"error"`` stops at the first bad row; ``"skip"`` skips and counts them
            (also comparison pairs whose responses are identical after truncation).
        use_chat_template: ``None`` uses the tokenizer's chat template when it has one.
        system_prompt: optional system turn for every prompt.
        pad_to_multiple_of: pad batch length to a multiple of this (8 helps tensor cores).
    """

    record_kind: ClassVar[str]
    #: Pads a list of encoded units into a batch; built as ``collator_class(pad_id, multiple_of)``.
    collator_class: ClassVar[type]
    #: Multi-process runs: disjoint equal shares of each epoch (:func:`even_distributed_sampler`)
    #: instead of Lightning's sampler, which pads an uneven epoch with repeats.
    distinct_shares: ClassVar[bool] = False

    def __init__(
        self,
        train: DataSource | list[DataSource],
        val: DataSource | list[DataSource] | None = None,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        tokenizer: str | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_bad_row: Literal["error", "skip"] = "error",
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        pad_to_multiple_of: int = 1,
        long_prompts: Literal["truncate", "drop"] = "truncate",
    ) -> None:
        super().__init__()
        if long_prompts not in ("truncate", "drop"):
            raise ValueError(f"long_prompts must be 'truncate' or 'drop', got {long_prompts!r}")
        if max_prompt_length >= max_length:
            raise ValueError(
                f"max_prompt_length ({max_prompt_length}) must be smaller than "
                f"max_length ({max_length})"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        deterministic_split(0, val_fraction, split_seed)  # validates val_fraction early
        self.train_sources = self._as_list(train)
        self.val_sources = self._as_list(val) if val is not None else []
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.on_bad_row = on_bad_row
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.pad_to_multiple_of = pad_to_multiple_of
        self.long_prompts = long_prompts
        self.tokenizer = None
        self.formatter: PromptFormatter | None = None
        self.train_units: list[Any] = []
        self.val_units: list[Any] = []
        self.train_dataset: ListDataset | None = None
        self.val_dataset: ListDataset | None = None
        self.stats: dict[str, int] = {}
        # Counts of the split being encoded, and of the unit being encoded (kept if it is).
        self._split_counts: Counter[str] = Counter()
        self._unit_counts: Counter[str] = Counter()
        self._encoding_source = ""
        # Training order (see train_dataloader), and where a resumed run starts in it.
        self.train_sampler: ResumableRandomSampler | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch seed, batches of it done)

    @staticmethod
    def _as_list(sources: DataSource | Sequence[DataSource]) -> list[DataSource]:
        return [sources] if isinstance(sources, DataSource) else list(sources)

    # -- what a stage defines ------------------------------------------------------------
    def units(self, records: list[Any]) -> list[Any]:
        """Group records into the units a batch is made of (default: one record each)."""
        return records

    def encode_unit(self, unit: Any, prompt_ids: list[int], index: int) -> dict[str, Any] | None:
        """Token ids for one unit, given its prompt's untruncated ids, or ``None`` to drop it
        (e.g. nothing left after truncation)."""
        raise NotImplementedError

    def collator(self) -> Any:
        """The callable that pads a list of encoded units into a batch."""
        return self.collator_class(self.tokenizer.pad_token_id, self.pad_to_multiple_of)

    # -- shared machinery ----------------------------------------------------------------
    def _resolve_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        if self.tokenizer_name is not None:
            from rlhf.models.loading import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name)
        else:
            module = self.trainer.lightning_module if self.trainer is not None else None
            self.tokenizer = getattr(module, "tokenizer", None)
            if self.tokenizer is None:
                raise ValueError(
                    "no tokenizer: set data.init_args.tokenizer or use a module with .tokenizer"
                )
        self.formatter = PromptFormatter(self.tokenizer, self.use_chat_template, self.system_prompt)

    def _load(self, sources: list[DataSource]) -> list[Any]:
        records: list[Any] = []
        for source in sources:
            result = load_records(source, self.record_kind, on_bad_row=self.on_bad_row)
            records.extend(result.records)
            # load_records has already logged a summary of any skipped rows.
            self.stats["skipped_rows"] = self.stats.get("skipped_rows", 0) + result.skipped.total
        return records

    def _encode_all(self, units: list[Any], split: str, sources: list[DataSource]) -> list[dict[str, Any]]:
        """Encode ``units`` of ``split`` (``train``/``val``); records its truncation counts in
        :attr:`stats` and logs them in one line."""
        self._split_counts = Counter()
        self._encoding_source = ", ".join(str(s.path) for s in sources)
        items = []
        for index, unit in enumerate(units):
            item = self.encode(unit, index)
            if item is None:
                self.stats["dropped_units"] = self.stats.get("dropped_units", 0) + 1
            else:
                items.append(item)
        counts = self._split_counts
        self.stats[f"{split}_truncated_prompts"] = counts["truncated_prompts"]
        self.stats[f"{split}_truncated_responses"] = counts["truncated_responses"]
        if counts["identical_pairs"]:
            self.stats[f"{split}_identical_pairs_skipped"] = counts["identical_pairs"]
        if units:
            log.info("%s", self.truncation_summary(split, counts))
        return items

    def truncation_summary(self, split: str, counts: Counter[str]) -> str:
        """E.g. ``train: 3 of 120 prompts truncated to max_prompt_length = 256 tokens, 5 of
        240 responses truncated to fit max_length = 512 tokens``."""
        prompts = (f"{counts['truncated_prompts']} of {counts['prompts']} prompts truncated to "
                   f"max_prompt_length = {self.max_prompt_length} tokens")
        parts = [prompts]
        if counts["responses"]:
            parts.append(f"{counts['truncated_responses']} of {counts['responses']} responses "
                         f"truncated to fit max_length = {self.max_length} tokens")
        if counts["identical_pairs"]:
            parts.append(f"{counts['identical_pairs']} pairs skipped as identical after truncation")
        return f"{split}: " + ", ".join(parts)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenize once (idempotent)."""
        if self.train_dataset is not None:
            return
        self._resolve_tokenizer()
        units = self.units(self._load(self.train_sources))
        if self.val_sources:
            self.train_units, self.val_units = units, self.units(self._load(self.val_sources))
        else:
            train_idx, val_idx = deterministic_split(len(units), self.val_fraction, self.split_seed)
            self.train_units = [units[i] for i in train_idx]
            self.val_units = [units[i] for i in val_idx]
        if not self.train_units:
            raise ValueError(f"no training data left in {[s.path for s in self.train_sources]}")
        val_sources = self.val_sources or self.train_sources
        self.train_dataset = ListDataset(self._encode_all(self.train_units, "train", self.train_sources))
        self.val_dataset = ListDataset(self._encode_all(self.val_units, "val", val_sources))
        self.stats.update(train_units=len(self.train_dataset), val_units=len(self.val_dataset))
        log.info("data: %s", self.stats)
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({f"data/{k}": v for k, v in self.stats.items()})

    def _loader(
        self,
        dataset: ListDataset,
        batch_size: int,
        shuffle: bool = False,
        loader_class: type[DataLoader] = DataLoader,
        **options: Any,
    ) -> DataLoader:
        """A ``loader_class`` over ``dataset`` with this module's collator and workers."""
        return loader_class(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled each epoch as with ``shuffle=True``, by a :class:`ResumableRandomSampler`
        whose epoch seed and position travel in checkpoints (:meth:`state_dict`), so a resumed
        run continues the epoch where it stopped. Multi-process runs keep Lightning's
        ``DistributedSampler`` (a mid-epoch resume there restarts the epoch), or with
        :attr:`distinct_shares` take :func:`even_distributed_sampler`."""
        if self.trainer is not None and self.trainer.world_size > 1:
            if self.distinct_shares:
                sampler = even_distributed_sampler(self.train_dataset, self.trainer.world_size, self.trainer.global_rank)
                return self._loader(self.train_dataset, self.batch_size, sampler=sampler)
            return self._loader(self.train_dataset, self.batch_size, shuffle=True)
        sampler = ResumableRandomSampler(len(self.train_dataset))
        loader, extra = DataLoader, {}
        if self._resume_at is not None:
            seed, batches = self._resume_at
            sampler.resume(seed, min(batches * self.batch_size, len(self.train_dataset)))
            loader, extra = ResumedDataLoader, {"generator": torch.Generator()}
            self._resume_at = None
        self.train_sampler = sampler
        return self._loader(
            self.train_dataset, self.batch_size, loader_class=loader, sampler=sampler, **extra
        )

    def state_dict(self) -> dict[str, Any]:
        """The seed of the training epoch in progress and how many of its batches are done."""
        sampler, trainer = self.train_sampler, self.trainer
        if sampler is None or sampler.epoch_seed is None or trainer is None:
            return {}
        return {
            "epoch_seed": sampler.epoch_seed,
            "batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed),
            "batches_per_epoch": trainer.num_training_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the checkpoint's epoch in the next :meth:`train_dataloader` (a finished
        epoch needs nothing: the next one is drawn as in the uninterrupted run)."""
        done, per_epoch = state.get("batches_done", 0), state.get("batches_per_epoch") or 0
        if state.get("epoch_seed") is not None and 0 < done < per_epoch:
            self._resume_at = (int(state["epoch_seed"]), int(done))
            # Lightning cannot see that the position is restored here; its warning is moot.
            warnings.filterwarnings(
                "ignore", message="You're resuming from a checkpoint that ended before the epoch"
            )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_dataset:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)

    def drops_prompt(self, prompt_ids: list[int]) -> bool:
        """True (and counted) when ``long_prompts="drop"`` and the prompt is over the limit."""
        if self.long_prompts == "drop" and len(prompt_ids) > self.max_prompt_length:
            self.stats["long_prompts_dropped"] = self.stats.get("long_prompts_dropped", 0) + 1
            return True
        return False

    def encode(self, unit: Any, index: int) -> dict[str, Any] | None:
        """Token ids for one unit (:meth:`encode_unit`), or ``None`` to drop it: also when
        :meth:`drops_prompt` drops its prompt (``unit.prompt``). A kept unit's truncated
        prompt and responses are counted."""
        prompt_ids = self.formatter.prompt_ids(unit.prompt)
        if self.drops_prompt(prompt_ids):
            return None
        self._unit_counts = Counter()
        item = self.encode_unit(unit, prompt_ids, index)
        if item is not None:
            self._unit_counts["prompts"] += 1
            self._unit_counts["truncated_prompts"] += len(prompt_ids) > self.max_prompt_length
            self._split_counts.update(self._unit_counts)
        return item

    def pair_ids(
        self, prompt: Conversation, response: str, prompt_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        """Prompt and response ids for one pair, truncated to the configured lengths (a
        response is empty when nothing of it fits); ``prompt_ids`` are the prompt's untruncated
        ids (``formatter.prompt_ids(prompt)``, tokenized once per unit)."""
        response_ids = self.formatter.response_ids(prompt, response)
        pair = truncate_pair(prompt_ids, response_ids, self.max_length, self.max_prompt_length)
        self._unit_counts["responses"] += 1
        self._unit_counts["truncated_responses"] += len(pair.response_ids) < len(response_ids)
        return pair.prompt_ids, pair.response_ids


class DemonstrationDataModule(RLHFDataModule):
    """Prompt/response demonstrations for SFT. Batch: see :class:`DemonstrationCollator`."""

    record_kind = "demonstration"
    collator_class = DemonstrationCollator

    def encode_unit(
        self, unit: Demonstration, prompt_ids: list[int], index: int
    ) -> dict[str, Any] | None:
        prompt_ids, response_ids = self.pair_ids(unit.prompt, unit.response, prompt_ids)
        return {"prompt_ids": prompt_ids, "response_ids": response_ids} if response_ids else None


class ComparisonDataModule(RLHFDataModule):
    """Comparisons and K-wise rankings for the reward model, one prompt group per unit.

    ``batch_size`` counts prompt groups; a batch holds every completion of each group once
    (see :class:`PreferenceCollator`).
    """

    record_kind = "preference"
    collator_class = PreferenceCollator

    def units(self, records: list[Comparison | Ranking]) -> list[PreferenceGroup]:
        return group_preferences(records)

    def encode_unit(
        self, unit: PreferenceGroup, prompt_ids: list[int], index: int
    ) -> dict[str, Any] | None:
        encoded = [self.pair_ids(unit.prompt, c, prompt_ids) for c in unit.completions]
        if any(not response for _, response in encoded):
            return None
        completions, pairs, margins = self.distinct_pairs(
            unit, [response for _, response in encoded]
        )
        if not pairs:
            return None
        # Truncation keeps the prompt identical for every completion of the group.
        return {
            "prompt_ids": encoded[0][0],
            "completion_ids": completions,
            "pairs": pairs,
            "margins": margins,
        }

    def distinct_pairs(
        self, unit: PreferenceGroup, completions: list[list[int]]
    ) -> tuple[list[list[int]], list[tuple[int, int]], list[float]]:
        """:func:`drop_identical_pairs` of the group's encoded ``completions``: a pair identical
        after truncation raises a :class:`DataError` (``on_bad_row="error"``) or is counted."""
        completions, pairs, margins, identical = drop_identical_pairs(completions, unit.pairs, unit.margins)
        if identical and self.on_bad_row == "error":
            raise DataError(
                self._encoding_source, None, "rejected",
                f"chosen and rejected are identical after truncation to max_length = "
                f"{self.max_length} tokens (prompt {conversation_text(unit.prompt)[:60]!r}); raise "
                "data.init_args.max_length, or set data.init_args.on_bad_row: skip to skip such pairs",
                kind="identical after truncation",
            )
        self._split_counts["identical_pairs"] += identical
        return completions, pairs, margins


class PromptDataModule(RLHFDataModule):
    """Prompts for PPO rollouts, left-padded for generation (see :class:`PromptCollator`). In a
    multi-process run the processes sample disjoint prompts: none twice in an epoch."""

    record_kind = "prompt"
    collator_class = PromptCollator
    distinct_shares = True

    def encode_unit(self, unit: PromptRecord, prompt_ids: list[int], index: int) -> dict[str, Any]:
        return {"prompt_ids": prompt_ids[-self.max_prompt_length :], "index": index}
