"""Small helpers every stage's forward passes share."""

from __future__ import annotations

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, t]`` mask -> ``[b, t]`` positions: 0 at the first real token, counting real tokens.

    Left padding then gives each real token the position it has with right padding.
    """
    return (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)


def disable_dropout(module: nn.Module) -> int:
    """Set every dropout in ``module`` to 0: ``nn.Dropout`` modules (LoRA dropout included) and
    float attributes such as Llama's ``attention_dropout``. Returns how many were changed."""
    changed = 0
    for sub in module.modules():
        if isinstance(sub, nn.modules.dropout._DropoutNd):
            if sub.p:
                changed += 1
            sub.p = 0.0
            continue
        for name, value in list(vars(sub).items()):
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool):
                if value:
                    changed += 1
                setattr(sub, name, 0.0)
    return changed
