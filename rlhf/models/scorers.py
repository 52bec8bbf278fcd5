"""Reward-model scorers for the stages that score samples (PPO, rejection sampling, best-of-n):
a separate model, or an adapter on the policy's own base."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rlhf.generation import Scorer
from rlhf.models.ensemble import EnsembleObjective, EnsembleScorer, check_ensemble
from rlhf.models.forward import trunk_hidden
from rlhf.models.loading import ModelSettings
from rlhf.models.reward import last_token_index, load_reward_model, read_reward_model_info

log = logging.getLogger("rlhf.models")

REWARD = "reward"


class SeparateModelScorer(nn.Module):
    """Scores with a stand-alone :class:`rlhf.models.reward.RewardModel` (its own weights)."""

    def __init__(self, reward_model: nn.Module) -> None:
        super().__init__()
        self.reward_model = reward_model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.reward_model(input_ids, attention_mask)


class SharedBaseScorer(nn.Module):
    """Scores with the RM's LoRA adapter loaded as adapter ``reward`` on the policy's model:
    one copy of the base weights serves policy, reference and reward."""

    def __init__(self, policy_model: nn.Module, score_head: nn.Linear, active_adapter: str,
                 adapter_name: str = REWARD) -> None:
        super().__init__()
        self.policy_model = [policy_model]  # not a submodule: the stage module owns it
        self.score_head = score_head.requires_grad_(False)
        self.active_adapter = active_adapter
        self.adapter_name = adapter_name

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        model = self.policy_model[0]
        model.set_adapter(self.adapter_name)
        try:
            hidden = trunk_hidden(model, input_ids, attention_mask)
        finally:
            model.set_adapter(self.active_adapter)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return self.score_head(last.float()).squeeze(-1)


def check_reward_model(path: str | os.PathLike, config_key: str = "model.init_args.reward.model") -> dict:
    """The ``reward_model.json`` of ``path``, or a clear error naming ``config_key`` when
    ``path`` does not exist or is not a saved reward model."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{config_key}: {path} does not exist (train the reward model first: its stage's output_dir)"
        )
    try:
        return read_reward_model_info(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{config_key}: {err}") from None


def _same_model(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def load_scorer(
    reward_dir: str | os.PathLike | Sequence[str | os.PathLike],
    share_base: bool,
    policy_model: nn.Module,
    base: ModelSettings,
    tokenizer,  # noqa: ANN001 (a transformers tokenizer)
    objective: EnsembleObjective = "mean",
    penalty: float = 1.0,
) -> tuple[Scorer, float, float]:
    """The scorer for the reward model(s) in ``reward_dir`` and the mean and std to standardise
    its scores with.

    One directory: that RM and its recorded training mean and std. A list of several: an
    :class:`rlhf.models.ensemble.EnsembleScorer` that standardises each member itself and
    combines them with ``objective`` / ``penalty``; its mean and std are then 0 and 1.
    Each RM shares the policy's base (``policy_model``, a peft model on ``base``, quantized or
    not) when it was saved as a LoRA adapter on that same base and ``share_base`` is on;
    otherwise it loads as its own model. Raises ``ValueError`` when an RM's tokenizer differs from ``tokenizer``.
    """
    dirs = [reward_dir] if isinstance(reward_dir, (str, os.PathLike)) else list(reward_dir)
    check_ensemble([str(d) for d in dirs], objective, penalty)
    if len(dirs) == 1:
        return _load_member(Path(dirs[0]), share_base, policy_model, base, tokenizer, REWARD)
    members, stats = [], []
    for i, path in enumerate(dirs):
        scorer, mean, std = _load_member(Path(path), share_base, policy_model, base, tokenizer, f"{REWARD}_{i}")
        members.append(scorer)
        stats.append((mean, std))
    log.info("reward ensemble of %d models, objective %s%s", len(dirs), objective,
             f" (penalty {penalty})" if objective == "uncertainty" else "")
    return EnsembleScorer(members, stats, objective, penalty), 0.0, 1.0


def _load_member(
    path: Path,
    share_base: bool,
    policy_model: nn.Module,
    base: ModelSettings,
    tokenizer,  # noqa: ANN001 (a transformers tokenizer)
    adapter_name: str,
) -> tuple[nn.Module, float, float]:
    """One reward model as a scorer (adapter ``adapter_name`` on the policy's base when it can
    share it), with its recorded score mean and std."""
    info = read_reward_model_info(path)  # clear error when the path is not a saved RM
    tokenizer_dir = info.get("tokenizer_dir")
    if tokenizer_dir:
        from transformers import AutoTokenizer

        rm_vocab = AutoTokenizer.from_pretrained(str(path / tokenizer_dir)).get_vocab()
        if rm_vocab != tokenizer.get_vocab():
            raise ValueError(
                f"the reward model at {path} uses a different tokenizer than the policy "
                f"({base.name_or_path}); samples are scored as token ids, so they must match"
            )
    mean, std = float(info.get("score_mean", 0.0)), float(info.get("score_std", 1.0))
    share = (
        share_base
        and info.get("adapter_dir")
        and info.get("base_model")
        and _same_model(info["base_model"], base.name_or_path)
    )
    device = next(policy_model.parameters()).device
    if share:
        from safetensors.torch import load_file

        active = policy_model.active_adapter
        policy_model.load_adapter(str(path / info["adapter_dir"]), adapter_name=adapter_name, is_trainable=False)
        policy_model.set_adapter(active)
        head_state = load_file(str(path / info["score_head"]))
        head = nn.Linear(head_state["weight"].shape[1], 1)
        head.load_state_dict(head_state)
        log.info("reward model %s shares the policy base (adapter %r)", path, adapter_name)
        if base.quantization:  # one base instead of a second, unquantized and unsharded, model
            log.info("the reward adapter runs on the %s base: its scores carry the base's quantization "
                     "error (reward.share_base: false loads the RM as trained, as a separate model)",
                     base.quantization)
        return SharedBaseScorer(policy_model, head.to(device), active, adapter_name), mean, std
    dtype = next(policy_model.parameters()).dtype
    model = load_reward_model(path, device=device, dtype=dtype)
    log.info("reward model %s loaded as a separate model", path)
    return SeparateModelScorer(model), mean, std
