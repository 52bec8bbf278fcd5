"""The reward model: a causal-LM backbone and a linear score head on the last real token (the
RM stage trains it; PPO, scoring and evaluation load it).

The backbone is run without its LM head (the ``[batch, seq, vocab]`` logits would be the
largest tensor of the step and are not needed): the transformer body is found through
``PeftModel.get_base_model()`` (LoRA layers are injected in place, so the body still runs them)
and ``PreTrainedModel.base_model`` (``model.model`` for Llama, ``model.transformer`` for GPT-2).
Models whose body cannot be found fall back to ``output_hidden_states=True``.

Saved layout (:meth:`RewardModel.save_pretrained`)::

    reward_model.json        # what to load: model_dir / adapter_dir + base_model, head, stats
    score_head.safetensors   # fp32 weight [1, hidden] and bias [1]
    model/                   # full (merged) backbone + tokenizer
    adapter/                 # LoRA backbones only: the adapter + tokenizer, for a shared base
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.models.forward import disable_dropout, position_ids_from_mask  # noqa: F401 (re-exported)

log = logging.getLogger("rlhf.rm")

REWARD_MODEL_JSON = "reward_model.json"
SCORE_HEAD_FILE = "score_head.safetensors"
LENGTH_HEAD_FILE = "length_head.safetensors"  # ODIN's length head, when the RM has one
FORMAT_VERSION = 1


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, t]`` mask -> ``[b]`` index of the last 1 in each row.

    Works for right and left padding and never looks at token ids (the pad id may equal EOS,
    which is the real last token of every sequence). A row without any 1 gives ``t - 1``.
    """
    t = attention_mask.shape[-1]
    flipped = attention_mask.flip(-1).ne(0).to(torch.int64)
    return (t - 1) - flipped.argmax(dim=-1)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def text_hidden_size(config: Any) -> int:
    """The hidden size of a causal LM's config (its text config for a multimodal one): the
    width a score head reads."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


class RewardModel(nn.Module):
    """Scalar reward ``r(prompt, response)`` from a causal LM.

    Args:
        backbone: a ``PreTrainedModel`` (causal LM) or a ``PeftModel`` wrapping one.
        score_head: ``nn.Linear(hidden, 1)``; ``None`` creates one (fp32, weight
            initialised to zero: every score starts at 0 (loss ln 2), with no random
            preference between completions to unlearn first).
        score_mean, score_std: statistics of the scores on the training data, saved with the
            model; :meth:`normalize` uses them.
        no_dropout: set every dropout of the backbone to 0 (see :func:`disable_dropout`); the
            backbone stays in train mode when training, so gradient checkpointing still works.
        length_head: a second ``nn.Linear(hidden, 1)`` on the same last hidden state, trained
            to carry the length signal (ODIN, :mod:`rlhf.rm.odin`); the model's score
            (:meth:`forward`) is then the other head's, the length-free one.
    """

    def __init__(
        self,
        backbone: nn.Module,
        score_head: nn.Linear | None = None,
        score_mean: float = 0.0,
        score_std: float = 1.0,
        no_dropout: bool = True,
        length_head: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        hidden = self.hidden_size
        if score_head is None:
            score_head = nn.Linear(hidden, 1)
            nn.init.zeros_(score_head.weight)
            nn.init.zeros_(score_head.bias)
        if score_head.in_features != hidden or score_head.out_features != 1:
            raise ValueError(
                f"score_head must be Linear({hidden}, 1), got Linear({score_head.in_features}, "
                f"{score_head.out_features})"
            )
        device = next(backbone.parameters()).device
        self.score_head = score_head.to(device=device, dtype=torch.float32)
        if length_head is not None and (length_head.in_features != hidden or length_head.out_features != 1):
            raise ValueError(f"length_head must be Linear({hidden}, 1), got Linear({length_head.in_features}, "
                             f"{length_head.out_features})")
        self.length_head = None if length_head is None else length_head.to(device=device, dtype=torch.float32)
        self.score_mean = float(score_mean)
        self.score_std = float(score_std)
        if no_dropout:
            disable_dropout(self.backbone)
        self._freeze_unused_lm_head()

    def _freeze_unused_lm_head(self) -> None:
        # The LM head is never run; training it would only cost optimizer state (and make DDP
        # complain about parameters without gradients). A head tied to the input embeddings
        # is the embedding matrix itself and stays as it is.
        lm = self.language_model
        out, inp = lm.get_output_embeddings(), lm.get_input_embeddings()
        if out is not None and inp is not None and out.weight is not inp.weight:
            out.weight.requires_grad_(False)

    # -- parts of the backbone -------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The causal LM (``PreTrainedModel``), inside the ``PeftModel`` if there is one."""
        return self.backbone.get_base_model() if _is_peft(self.backbone) else self.backbone

    @property
    def body(self) -> nn.Module | None:
        """The transformer without the LM head, or ``None`` when it cannot be found."""
        lm = self.language_model
        body = getattr(lm, "base_model", None)  # PreTrainedModel.base_model: model.model etc.
        return body if isinstance(body, nn.Module) and body is not lm else None

    @property
    def config(self) -> Any:
        return self.language_model.config

    @property
    def hidden_size(self) -> int:
        return text_hidden_size(self.config)

    # -- scoring ---------------------------------------------------------------------------
    def last_hidden_state(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[b, t, hidden]`` final hidden states (after the last norm), any padding side."""
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask),
            "use_cache": False,
        }
        body = self.body
        if body is not None:
            return body(**kwargs).last_hidden_state
        out = self.language_model(**kwargs, output_hidden_states=True)
        return out.hidden_states[-1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``/``attention_mask`` ``[b, t]`` (right or left padded) -> fp32 scores ``[b]``
        (with a length head: the length-free head's)."""
        return self.head_scores(input_ids, attention_mask)[0]

    def head_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(score [b], length-head score [b] or None)`` from one pass, both fp32."""
        hidden = self.last_hidden_state(input_ids, attention_mask)
        index = last_token_index(attention_mask).to(hidden.device)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index].float()  # [b, hidden]
        # The heads run in fp32 even under bf16 autocast: scores feed a loss and PPO rewards.
        with torch.autocast(device_type=last.device.type, enabled=False):
            score = self.score_head(last).squeeze(-1)
            length = None if self.length_head is None else self.length_head(last).squeeze(-1)
        return score, length

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``(scores - score_mean) / score_std``, the training-data statistics saved with the model."""
        return (scores - self.score_mean) / max(self.score_std, 1e-8)

    # -- saving ----------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        tokenizer: Any = None,
        merge: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Save head, backbone and ``reward_model.json`` into ``directory``; returns the JSON.

        A LoRA backbone is saved as ``adapter/`` and, with ``merge`` (and not quantized), also
        merged as ``model/``; merging replaces ``self.backbone`` by the merged model (same
        scores, no LoRA layers any more). ``extra`` keys are added to the JSON.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "score_head": SCORE_HEAD_FILE,
            "score_mean": self.score_mean,
            "score_std": self.score_std,
            "model_dir": None,
            "adapter_dir": None,
            "base_model": None,
        }
        save_file(
            {
                "weight": self.score_head.weight.detach().float().cpu().contiguous(),
                "bias": self.score_head.bias.detach().float().cpu().contiguous(),
            },
            directory / SCORE_HEAD_FILE,
        )
        if self.length_head is not None:
            save_file(
                {
                    "weight": self.length_head.weight.detach().float().cpu().contiguous(),
                    "bias": self.length_head.bias.detach().float().cpu().contiguous(),
                },
                directory / LENGTH_HEAD_FILE,
            )
            info["length_head"] = LENGTH_HEAD_FILE
        backbone = self.backbone
        if _is_peft(backbone):
            backbone.save_pretrained(directory / "adapter")
            if tokenizer is not None:
                tokenizer.save_pretrained(directory / "adapter")
            info["adapter_dir"] = "adapter"
            info["base_model"] = backbone.peft_config[backbone.active_adapter].base_model_name_or_path
            quantized = getattr(self.language_model, "is_quantized", False)
            if merge and quantized:
                log.warning("not merging the adapter into a quantized base; saved adapter only")
            if merge and not quantized:
                self.backbone = backbone = backbone.merge_and_unload()
            else:
                backbone = None
        if backbone is not None:
            backbone.save_pretrained(directory / "model")
            if tokenizer is not None:
                tokenizer.save_pretrained(directory / "model")
            info["model_dir"] = "model"
        info["tokenizer_dir"] = (info["model_dir"] or info["adapter_dir"]) if tokenizer is not None else None
        info.update(extra or {})
        (directory / REWARD_MODEL_JSON).write_text(json.dumps(info, indent=2, sort_keys=True))
        return info


def read_reward_model_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``reward_model.json`` of a saved reward model."""
    file = Path(path) / REWARD_MODEL_JSON
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a saved reward model (no {REWARD_MODEL_JSON})")
    return json.loads(file.read_text())


def load_reward_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    prefer_adapter: bool = False,
) -> RewardModel:
    """Load a reward model saved by :meth:`RewardModel.save_pretrained`, in eval mode.

    Args:
        path: the saved directory (e.g. ``outputs/quickstart/rm``).
        device: where to put it; ``None`` leaves it on the CPU.
        dtype: backbone dtype (name or torch dtype); ``None`` is ``"auto"`` (bf16 on a CUDA
            device with bf16, else fp32). The score head is always fp32.
        prefer_adapter: load ``base_model`` + ``adapter/`` even when ``model/`` exists.
    """
    from safetensors.torch import load_file

    from rlhf.models.loading import ModelSettings, load_causal_lm

    path = Path(path)
    info = read_reward_model_info(path)
    dtype = "auto" if dtype is None else dtype
    if info.get("model_dir") and not (prefer_adapter and info.get("adapter_dir")):
        backbone = load_causal_lm(ModelSettings(str(path / info["model_dir"]), dtype=dtype))
    elif info.get("adapter_dir"):
        from peft import PeftModel

        base = load_causal_lm(ModelSettings(info["base_model"], dtype=dtype))
        backbone = PeftModel.from_pretrained(base, str(path / info["adapter_dir"]))
    else:
        raise ValueError(f"{path / REWARD_MODEL_JSON} names neither model_dir nor adapter_dir")
    heads = []
    for file in (info.get("score_head", SCORE_HEAD_FILE), info.get("length_head")):
        if file is None:
            heads.append(None)
            continue
        state = load_file(str(path / file))
        heads.append(nn.Linear(state["weight"].shape[1], 1))
        heads[-1].load_state_dict(state)
    model = RewardModel(
        backbone, heads[0], score_mean=info.get("score_mean", 0.0), score_std=info.get("score_std", 1.0),
        length_head=heads[1],
    )
    if device is not None:
        model.to(device)
    return model.eval()
