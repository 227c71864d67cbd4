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


def check_cpu_launch() -> None:
    """Refuse a multi-process launch on a machine without CUDA unless ``ACCELERATE_USE_CPU``
    is set: there, building the ``TrainingArguments`` resets accelerate's state to one process
    per rank, and every rank would silently run the whole job on its own."""
    import torch

    from hf_tae.errors import TaeError

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if world > 1 and not cpu and not torch.cuda.is_available():
        raise TaeError(
            f"this is a {world}-process launch (WORLD_SIZE={world}) on a machine without CUDA, "
            "and ACCELERATE_USE_CPU is not set: every process would run the whole job alone. "
            "Set it in the launch's environment: ACCELERATE_USE_CPU=1 torchrun ... or "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ..."
        )
