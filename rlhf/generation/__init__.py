"""Sampling from a policy: settings, the inverse-CDF sampler, responses joined to prompts."""

from rlhf.generation.responses import (
    GenerationRecord,
    Scorer,
    assemble_sequences,
    sample_and_record,
    sample_responses,
)
from rlhf.generation.settings import SamplingSettings

__all__ = [
    "GenerationRecord",
    "SamplingSettings",
    "Scorer",
    "assemble_sequences",
    "sample_and_record",
    "sample_responses",
]
