"""What a run prints: the known-harmless warnings filtered in one place, and a compact model
summary.

:func:`quiet_known_warnings` is called by every entry point (``rlhf.fit``, ``rlhf.pipeline``,
``rlhf.evaluate``, ``rlhf.export``). Each filter matches one message (a regex from its start)
and its category, so an unrelated warning of the same category still shows.
"""

from __future__ import annotations

import logging
import warnings
from typing import NamedTuple

import lightning.pytorch as pl
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from torch import nn

log = logging.getLogger("rlhf.console")


class KnownWarning(NamedTuple):
    """A warning that says nothing about this project's runs: ``message`` (a regex matched at
    the start of the text) and ``category``."""

    message: str
    category: type[Warning]


KNOWN_HARMLESS_WARNINGS: tuple[KnownWarning, ...] = (
    # PPO optimises manually and a checkpoint is taken after a whole iteration: the state after
    # its optimizer steps is the one to resume from (rlhf.resume). The message prints a code
    # sample for a pre-step snapshot that does not apply.
    KnownWarning(r"Using ModelCheckpoint with manual optimization and every_n_train_steps", UserWarning),
    # Lightning's own pytree helper (lightning.pytorch.utilities._pytree) checks
    # isinstance(spec, LeafSpec), which torch deprecates; Lightning's to update.
    KnownWarning(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # peft reads the deprecated alias model.is_gradient_checkpointing when it wraps a model; the
    # value is the same as is_activation_checkpointing's.
    KnownWarning(r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # PPO switches its policy between eval mode (rollouts, no dropout) and train mode (updates)
    # itself (rlhf.ppo); SFT and RM put their models in train mode in configure_model.
    KnownWarning(r"Found \d+ module\(s\) in eval mode at the start of training", PossibleUserWarning),
    # The data modules hold tokenized examples in memory and collate by padding: worker
    # processes would not speed loading up (``num_workers`` is a data init arg for who wants it).
    KnownWarning(r"The '\w+' does not have many workers", PossibleUserWarning),
)

# Lightning's advertisement for its hosted logger, logged at INFO on every fit.
_LIGHTNING_TIP = "💡 Tip: For seamless cloud logging"


def _not_a_lightning_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_LIGHTNING_TIP)


def quiet_known_warnings() -> None:
    """Ignore :data:`KNOWN_HARMLESS_WARNINGS` and Lightning's LitLogger tip (idempotent)."""
    for known in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_lightning_tip)


class CompactModelSummary(ModelSummary):
    """The parameter counts in one line, in place of Lightning's table (whose FLOPs, module
    modes and metric rows are zeros and noise here, and whose size estimate warns under mixed
    precision)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        parts = [
            f"{name} {type(child).__name__} {_param_count(child)}"
            for name, child in pl_module.named_children()
            if next(child.parameters(), None) is not None
        ]
        log.info(
            "%s: %s params, %s trainable (%s)", type(pl_module).__name__, _param_count(pl_module),
            _param_count(pl_module, trainable_only=True), ", ".join(parts),
        )


def _param_count(module: nn.Module, trainable_only: bool = False) -> str:
    """``module``'s parameter count, human readable (``139 K``)."""
    count = sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
    return get_human_readable_count(count).strip()


def use_compact_model_summary(trainer: pl.Trainer) -> None:
    """Replace the summary Lightning adds by default (a plain ``ModelSummary`` or
    ``RichModelSummary`` of depth 1) with :class:`CompactModelSummary`; a summary configured
    with another depth is kept, and none is added where the trainer has none."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary) and callback._max_depth == 1:
            trainer.callbacks[i] = CompactModelSummary()
