"""Non-finite guards: find what went NaN/inf, in PPO skip that minibatch (count it, stop the
run after too many bad minibatches in a row), in every stage stop on a non-finite loss or weight
(:class:`rlhf.stage.StageModule`) and never save non-finite tensors as a complete output.

A PPO minibatch update is skipped (no optimizer step) when any of its inputs or results is not
finite: the rewards, advantages or returns of its rollout rows, the loss, or the gradient. One
bad batch of prompts (a reward model that overflowed on a strange response) then costs one
iteration's updates, not the run; a policy that has diverged stops the run with a message that
says what went non-finite and where, instead of training on NaN.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The order things are named in messages: causes before what they spoil.
CHECKED = ("reward", "kl", "advantage", "return", "value", "loss", "gradient")


class NonFiniteError(RuntimeError):
    """Training met non-finite values it cannot go on from (a NaN loss or weight, logits
    that cannot be sampled, too many consecutive skipped PPO minibatch updates)."""


def join_names(names: Iterable[str]) -> str:
    """``reward``, ``reward and loss``, ``reward, advantage and loss`` (in :data:`CHECKED` order)."""
    rank = {name: i for i, name in enumerate(CHECKED)}
    ordered = sorted(set(names), key=lambda n: (rank.get(n, len(CHECKED)), n))
    if len(ordered) < 2:
        return ordered[0] if ordered else "values"
    return ", ".join(ordered[:-1]) + " and " + ordered[-1]


def nonfinite_names(tensors: Mapping[str, torch.Tensor | None]) -> list[str]:
    """Names of the tensors in ``tensors`` (any shapes; ``None`` skipped) holding a NaN or inf."""
    return [name for name, t in tensors.items() if t is not None and not bool(torch.isfinite(t).all())]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (the local shard of a DTensor, else ``t``)."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensors_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every tensor of ``tensors`` holds only finite values (one device sync).
    Sharded (DTensor) tensors are checked shard by shard on this process only."""
    local = [local_tensor(t.detach()) for t in tensors]
    local = [t for t in local if t.numel()]  # a process may hold an empty shard (FSDP2)
    if not local:
        return True
    # The max-abs norm: NaN and inf pass through it, and unlike the 2-norm it cannot
    # overflow for a huge but finite tensor.
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(local, norm_type=float("inf"))))


def gradients_finite(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether every gradient of ``parameters`` is finite (parameters without one are skipped).
    Sharded (DTensor) gradients are checked shard by shard on this process only."""
    return tensors_finite(p.grad for p in parameters if p.grad is not None)


def nonfinite_parameters(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], int]:
    """Names of the tensors of ``named`` (this process's shards) holding a NaN or inf, and how
    many tensors were checked."""
    tensors = {name: local_tensor(t.detach()) for name, t in named}
    return nonfinite_names(tensors), len(tensors)


def nonfinite_saved_tensors(directory: str | Path) -> tuple[list[str], int]:
    """Tensors holding a NaN or inf in the ``*.safetensors`` and ``*.pt`` files under
    ``directory`` (as ``file: tensor``, files relative to ``directory``), and how many
    tensors were checked. Tensors are read one at a time."""
    from safetensors import safe_open

    root = Path(directory)
    bad: list[str] = []
    checked = 0
    for path in sorted(root.rglob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                checked += 1
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{path.relative_to(root)}: {key}")
    for path in sorted(root.rglob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        tensors = state if isinstance(state, Mapping) else {"": state}
        for key, t in tensors.items():
            if torch.is_tensor(t):
                checked += 1
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"{path.relative_to(root)}: {key}")
    return bad, checked


@dataclass
class NonFiniteGuard:
    """Counts skipped minibatch updates and raises once ``max_consecutive`` in a row were bad.

    Attributes:
        max_consecutive: bad updates in a row that stop the run (``0`` never stops it).
        consecutive: bad updates since the last good one.
        skipped: all bad updates so far.
        names: what was non-finite during the current run of bad updates.
    """

    max_consecutive: int = 16
    consecutive: int = 0
    skipped: int = 0
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_consecutive < 0:
            raise ValueError(f"max_nonfinite_steps must be >= 0, got {self.max_consecutive}")

    def good(self) -> None:
        """Record an update that went through."""
        self.consecutive = 0
        self.names = []

    def bad(self, names: list[str], **where: Any) -> None:
        """Record a skipped update; ``names`` say what was non-finite, ``where`` locates it
        (iteration, epoch, minibatch). Raises :class:`NonFiniteError` at the limit."""
        self.consecutive += 1
        self.skipped += 1
        self.names += [name for name in names if name not in self.names]
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            place = ", ".join(f"{k} {v}" for k, v in where.items())
            raise NonFiniteError(
                f"non-finite {join_names(self.names)} in PPO (last at {place}): "
                f"{self.consecutive} minibatch updates in a row were skipped "
                f"(update.max_nonfinite_steps = {self.max_consecutive}); stopping. "
                f"{self.skipped} skipped in all. Check the reward model's scores, lower the "
                "learning rate, or clip rewards (reward.clip)."
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped = int(state.get("skipped", 0))
