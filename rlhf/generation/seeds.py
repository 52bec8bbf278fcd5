"""Each process's own sampling seed.

``seed_everything`` gives every process of a multi-process run the same torch RNG state, so
sampling straight from the global RNG would draw the same random numbers on every process:
two processes holding the same prompt would sample the same response, and different prompts
would get correlated draws. Instead each rollout draws one shared seed from the global RNG
(the same number on every process: they are seeded alike and consume the stream alike) and
samples with a generator seeded from (shared seed, rank) (:func:`process_seed`). So:

- the ranks draw different, unrelated numbers;
- a re-run with the same ``seed_everything`` draws the same numbers on each rank;
- the global stream advances by one draw per rollout on every process, whatever each process
  samples (responses end at EOS after different numbers of steps on different processes), so
  it stays identical across processes, and a resumed run, which restores rank 0's RNG state on
  every process (:mod:`rlhf.resume`), continues every rank's stream exactly.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["process_generator", "process_seed"]


def process_seed(shared_seed: int, rank: int) -> int:
    """The sampling seed (``[0, 2**63)``) of process ``rank`` for a seed all processes share:
    ``numpy.random.SeedSequence`` mixing of the pair, so neighbouring ranks and neighbouring
    shared seeds give unrelated seeds."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0 (got {rank})")
    state = np.random.SeedSequence(shared_seed, spawn_key=(rank,)).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def process_generator(device: torch.device, rank: int) -> torch.Generator:
    """A generator on ``device`` for one rollout of process ``rank``: seeded with
    :func:`process_seed` of a shared seed drawn from the global torch RNG (one draw; read it
    back with ``generator.initial_seed()``)."""
    shared = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    generator = torch.Generator(device=device)
    generator.manual_seed(process_seed(shared, rank))
    return generator
