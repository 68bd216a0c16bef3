"""Process-level helpers shared by the trainers: the accelerator and per-micro-batch seeds."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator


def micro_batch_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """Independent, reproducible seed per (run seed, rank, optimizer step, micro-batch)."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def make_accelerator(mixed_precision: str) -> Accelerator:
    """Accelerator with cpu=True without CUDA (only then does accelerate set up gloo under torchrun).

    accelerate keeps one process-wide state; a single-process caller (notebook, tests) that trains again
    with another precision gets that state reset instead of an error.
    """
    from accelerate.state import AcceleratorState

    kwargs = {"mixed_precision": mixed_precision, "cpu": not torch.cuda.is_available()}
    try:
        return Accelerator(**kwargs)
    except ValueError as err:
        if "already been initialized" not in str(err) or AcceleratorState().num_processes != 1:
            raise
        AcceleratorState._reset_state()
        return Accelerator(**kwargs)
