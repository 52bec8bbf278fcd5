"""What a finished rejection-sampling run saves: the policy adapter, the merged policy, the marker."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any


from rlhf.models.loading import save_merged_model
from rlhf.outputs import atomic_directory, write_stage_marker

if TYPE_CHECKING:
    from rlhf.rejection.module import RejectionSamplingModule

log = logging.getLogger("rlhf.rejection")

# The policy's LoRA adapter name: peft's default, so ``adapter/`` holds it directly (as SFT's).
ADAPTER = "default"


def save_rejection_outputs(module: RejectionSamplingModule, output_dir: str) -> None:
    """Write ``adapter/`` (the policy LoRA and tokenizer), ``model/`` (the merged policy; not
    for a quantised base) and the stage marker, atomically, to ``output_dir``."""
    info: dict[str, Any] = {
        "stage": "rejection",
        "mode": module.mode,
        "base": module.base.name_or_path,
        "rounds": module.round,
        "skipped_rounds": module.skipped_rounds,
        "threshold": module.threshold,
        "metrics": module.logged_metrics(),
        "metrics_before_fit": module.metrics_before_fit,
        "adapter_dir": "adapter",
    }
    with atomic_directory(output_dir) as tmp:
        module.model.save_pretrained(tmp / "adapter", selected_adapters=[ADAPTER])
        module.tokenizer.save_pretrained(tmp / "adapter")
        if not module.base.quantization:
            save_merged_model(module.base, tmp / "adapter", module.tokenizer, tmp / "model")
            info["model_dir"] = "model"
        module.check_saved_finite(tmp)
        write_stage_marker(tmp, info)
    log.info("saved %s outputs to %s", module.mode.upper(), output_dir)
