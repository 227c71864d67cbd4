"""The process state of a launch, shared by everything that splits work across processes."""

from __future__ import annotations

import os


def process_state():
    """accelerate's ``PartialState`` of the launch (CPU when ``ACCELERATE_USE_CPU`` asks for it
    or when there is no CUDA device): rank, world size and barriers for the callers that share
    work out by hand (gradient collection, subset fine-tuning)."""
    import torch
    from accelerate import PartialState

    use_cpu = (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or not torch.cuda.is_available()
    )
    return PartialState(cpu=use_cpu)
