"""What a benchmark worker attaches to a trainer to record what it actually ran: optimizer
steps, the dtype of the activations in its forward passes, and tokens.

Both trainers of a side-by-side benchmark use the same probes, so a claim such as "both ran
bf16" or "both took 4 optimizer steps per iteration" is read off the run, not the settings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# The layer whose output dtype is recorded: the first decoder layer's MLP down projection, a
# matmul that autocast runs in the autocast dtype (the residual stream it adds to may not be).
WATCHED_SUFFIX = "mlp.down_proj"


class OptimizerSteps:
    """Counts ``torch.optim.Optimizer.step`` calls of every optimizer in the process (a
    global post-step hook: wrappers such as Lightning's or accelerate's count once, as their
    inner optimizer steps). :meth:`take` returns the steps since the previous call."""

    def __init__(self) -> None:
        self.count = 0
        self._taken = 0
        self._handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.count += 1

    def take(self) -> int:
        """Steps since the last :meth:`take` (or since construction)."""
        steps, self._taken = self.count - self._taken, self.count
        return steps

    def remove(self) -> None:
        """Stop counting."""
        self._handle.remove()


def _autocast_on(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


class ActivationDtypes:
    """Forward hooks recording the output dtype of one matmul layer per watched model, split by
    whether autograd was on (``grad``: the update; ``no_grad``: rollout passes), with whether
    autocast was active: e.g. ``{"policy": {"no_grad": ["torch.bfloat16 autocast"]}}``."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, set[str]]] = {}
        self._handles: list[Any] = []

    def watch(self, name: str, model: nn.Module, suffix: str = WATCHED_SUFFIX) -> str:
        """Hook the first module of ``model`` whose qualified name ends with ``suffix``; returns
        that module's name (a ``ValueError`` when there is none)."""
        for module_name, module in model.named_modules():
            if module_name.endswith(suffix):
                break
        else:
            raise ValueError(f"{name}: no module named *{suffix} to watch")
        record = self.seen.setdefault(name, {})

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(tensor, torch.Tensor):
                return
            mode = "grad" if torch.is_grad_enabled() else "no_grad"
            label = str(tensor.dtype) + (" autocast" if _autocast_on(tensor.device.type) else "")
            record.setdefault(mode, set()).add(label)

        self._handles.append(module.register_forward_hook(hook))
        return module_name

    def record(self) -> dict[str, dict[str, list[str]]]:
        """What was seen, as sorted lists (JSON-ready)."""
        return {name: {mode: sorted(labels) for mode, labels in modes.items()} for name, modes in self.seen.items()}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def response_token_counts(responses: torch.Tensor, pad_token_id: int) -> list[int]:
    """Tokens of each response ``[B, R]`` before its first ``pad_token_id`` (all ``R`` when it
    has none): the tokens TRL's PPO keeps in its losses when no stop token is set."""
    if responses.dim() != 2:
        raise ValueError(f"responses must be [batch, length], got shape {tuple(responses.shape)}")
    is_pad = responses == pad_token_id
    first_pad = torch.where(is_pad.any(dim=1), is_pad.int().argmax(dim=1), responses.shape[1])
    return [int(n) for n in first_pad]


def trained_tokens(response_tokens: float, optimizer_steps: int, minibatches_per_epoch: int = 1) -> float:
    """Response tokens that went through the policy loss in one iteration: every optimizer
    step trains one minibatch, a ``1 / minibatches_per_epoch`` share of the rollout's
    ``response_tokens``."""
    if minibatches_per_epoch < 1:
        raise ValueError(f"minibatches_per_epoch must be >= 1, got {minibatches_per_epoch}")
    return response_tokens * optimizer_steps / minibatches_per_epoch
