"""The PPO critic choices, their config checks, and the hidden states a hydra critic records
from the policy's passes (the critics' forward passes are :class:`rlhf.ppo.module.PPOModule`'s
and :mod:`rlhf.models.value_branch`'s).

- ``shared``: a linear value head on the policy trunk's final hidden states, detached (one
  trunk pass serves both; a linear probe of the policy's features).
- ``adapter``: the same head on a value LoRA adapter's own trunk pass (a full critic; one more
  trunk pass in every forward and backward).
- ``hydra`` (trlx): the head on a trained copy of the top ``critic_layers`` decoder layers,
  fed the policy trunk's detached hidden states at layer ``L - critic_layers``
  (:class:`rlhf.models.value_branch.ValueBranch`): ``critic_layers`` layers of compute and
  ``critic_layers / L`` of the base's layer weights in memory.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from torch import nn

from rlhf.models.loading import ModelSettings, resolve_model_path
from rlhf.models.value_branch import (
    ValueBranch,
    check_branch_layers,
    recorded_layer_outputs,
)

Critic = Literal["shared", "adapter", "hydra"]
CRITICS: tuple[str, ...] = ("shared", "adapter", "hydra")


def decoder_depth(settings: ModelSettings) -> int | None:
    """The number of decoder layers of ``settings``' model (``num_hidden_layers`` of its text
    config), read from its ``config.json`` without loading weights; ``None`` when not stated."""
    from transformers import AutoConfig

    path = resolve_model_path(settings.name_or_path, settings.revision)
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=settings.trust_remote_code)
    value = getattr(config.get_text_config(), "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def check_critic(critic: str, critic_layers: int, base: ModelSettings) -> None:
    """Raise ``ValueError`` for an unknown ``critic``, and for ``hydra`` with ``critic_layers``
    outside ``1..L-1`` (``L`` from the base's config) or a quantised base (its layers hold no
    weights to copy and train)."""
    if critic not in CRITICS:
        raise ValueError(f"model.init_args.critic must be one of {', '.join(CRITICS)} (got {critic!r})")
    if critic != "hydra":
        return
    if critic_layers < 1:
        raise ValueError(f"model.init_args.critic_layers must be >= 1 (got {critic_layers})")
    if base.quantization is not None:
        raise ValueError(
            f"critic: hydra trains a full-precision copy of the top layers, which a {base.quantization} "
            "base (model.init_args.base.quantization) cannot provide: use critic: shared or adapter"
        )
    depth = decoder_depth(base)
    if depth is not None:
        check_branch_layers(critic_layers, depth, base.name_or_path)


def branch_inputs(model: nn.Module, branch: ValueBranch | None) -> AbstractContextManager[list[torch.Tensor]]:
    """A block during which the policy ``model``'s trunk passes (a forward, or ``generate``)
    record the hidden states a hydra ``branch`` reads (:func:`recorded_layer_outputs` on layer
    ``source_layer - 1``); without a branch it records nothing (an empty list)."""
    if branch is None:
        return nullcontext([])
    return recorded_layer_outputs(model, branch.source_layer - 1)
