"""The memory planner's arithmetic: model shapes (:mod:`rlhf.planning.shapes`) and the memory
per GPU of each stage (:mod:`rlhf.planning.memory`); ``python -m rlhf.plan`` is its command."""

from rlhf.planning.memory import STAGES, PlanSettings, StagePlan, plan_all, plan_stage
from rlhf.planning.shapes import (
    PRESETS,
    ModelShape,
    ModelShapeError,
    load_shape,
    lora_params,
    total_params,
)

__all__ = [
    "PRESETS",
    "STAGES",
    "ModelShape",
    "ModelShapeError",
    "PlanSettings",
    "StagePlan",
    "load_shape",
    "lora_params",
    "plan_all",
    "plan_stage",
    "total_params",
]
