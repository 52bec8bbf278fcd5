"""Small helpers every stage's forward passes share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from rlhf.distributed import root_forward


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


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside a peft wrapper (LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def trunk_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``[batch, seq, hidden]`` of the decoder, skipping the LM head
    (run as a forward of the causal LM, which FSDP2 needs: see :func:`rlhf.distributed.root_forward`)."""
    lm = causal_lm_of(model)
    return root_forward(
        lm,
        lm.get_decoder(),
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state


@contextmanager
def adapter_inputs_left_to_autocast(model: nn.Module, device_type: str) -> Iterator[None]:
    """Under autocast on ``device_type``, stop peft casting each adapter layer's input to the
    adapter's dtype while the block runs; without autocast, do nothing.

    With a bf16 base and float32 LoRA weights, peft copies every adapter layer's bf16 input to
    float32, and autocast then copies it back to bf16 for the adapter's matmul: a lossless round
    trip that costs two copies of ``[tokens, features]`` per adapter layer (and their backward).
    Autocast alone casts the matmul's operands the same way. Without autocast the cast is
    needed (a bf16 input cannot meet a float32 weight), so it is left on.
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield
