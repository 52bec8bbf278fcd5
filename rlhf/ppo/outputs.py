"""What a finished PPO run saves: the policy adapter, the merged policy, the critic's trained
weights (value head, hydra value branch), the marker."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from rlhf.models.loading import save_merged_model
from rlhf.outputs import atomic_directory, write_stage_marker
from rlhf.ppo.settings import POLICY

if TYPE_CHECKING:
    from rlhf.ppo.module import PPOModule

log = logging.getLogger("rlhf.ppo")


def save_ppo_outputs(module: PPOModule, output_dir: str) -> None:
    """Write ``adapter/`` (the policy LoRA), ``model/`` (the merged policy; not for a quantised
    base), ``value_head.pt`` (with a critic), ``value_branch.pt`` (a ``hydra`` critic's trained
    copy of the top layers: the state dict of :class:`rlhf.models.value_branch.ValueBranch`,
    its layer count in the marker's ``critic_layers``) and the stage marker, atomically, to
    ``output_dir``."""
    info: dict[str, Any] = {
        "stage": "ppo",
        "base": module.base.name_or_path,
        "iterations": module.iteration,
        "kl_controller": module.kl_controller.state_dict(),
        "metrics": module.logged_metrics(),
        "metrics_before_fit": module.metrics_before_fit,
    }
    with atomic_directory(output_dir) as tmp:
        module.model.save_pretrained(tmp / "adapter", selected_adapters=[POLICY])
        module.tokenizer.save_pretrained(tmp / "adapter")
        if module.value_head is not None:
            torch.save(module.value_head.state_dict(), tmp / "value_head.pt")
        if module.value_branch is not None:
            torch.save(module.value_branch.state_dict(), tmp / "value_branch.pt")
            info["critic_layers"] = module.critic_layers
        if not module.base.quantization:
            save_merged_model(module.base, tmp / "adapter" / POLICY, module.tokenizer, tmp / "model")
            info["model_dir"] = "model"
        module.check_saved_finite(tmp)
        write_stage_marker(tmp, info)
    log.info("saved PPO outputs to %s", output_dir)
