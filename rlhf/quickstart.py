"""``rlhf-quickstart``: the whole quickstart recipe, from the repository root, in one command.

Prepares the quickstart model if it is missing (``python -m rlhf.models.prepare``), then runs
``python -m rlhf.pipeline --config configs/quickstart.yaml``: SFT -> reward model -> PPO ->
evaluation, skipping the stages that are complete. The model and data are local, so the run is
offline: ``HF_HUB_OFFLINE=1`` and ``WANDB_MODE=offline`` unless the environment sets them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

CONFIG = Path("configs/quickstart.yaml")
MODEL_DIR = Path("models/SmolLM2-135M-Instruct")
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
DESCRIPTION = (
    f"Prepare the quickstart model if it is missing ({MODEL_DIR}), then run {CONFIG}: SFT, reward "
    f"model, PPO and evaluation, skipping complete stages. Run it from the repository root. "
    f"Offline (HF_HUB_OFFLINE=1, WANDB_MODE=offline) unless the environment sets those."
)


def set_offline_defaults() -> None:
    """Set :data:`OFFLINE_DEFAULTS` where the environment has no value of its own (before
    huggingface_hub and wandb are imported: they read it once)."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare the model, run the quickstart pipeline with ``argv`` (``--force``, ``--from
    NAME``, ``--until NAME``) and return its exit code."""
    set_offline_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    from rlhf import pipeline  # after the defaults: it imports huggingface_hub

    # Parsed here too, so that --help or a typo stops before the model is fetched.
    pipeline.build_parser(prog="rlhf-quickstart", description=DESCRIPTION, config=False).parse_args(argv)
    if not CONFIG.is_file():
        print(
            f"error: {CONFIG} not found in {Path.cwd()}: run rlhf-quickstart from the repository "
            f"root (the quickstart configs use paths relative to it)",
            file=sys.stderr,
        )
        return 2
    from rlhf.models.prepare import prepare

    prepare(MODEL_DIR)
    return pipeline.main(["--config", str(CONFIG), *argv])


if __name__ == "__main__":
    sys.exit(main())
