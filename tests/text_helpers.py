"""Helpers shared by the text-family tests: the digit-skills default, small enough for a test."""

from __future__ import annotations

from typing import Any


def tiny_text_family(name: str, base_model_dir, **overrides: Any):
    """``(family, args, task set)`` of text family ``name`` on two skills (``max``, ``zero``)
    with a tiny base model saved under ``base_model_dir``; ``overrides`` replace arguments."""
    from hf_tae.families import get_family

    family = get_family(name)
    settings = {"skills": ["max", "zero"], "train_per_template": 6, "eval_per_template": 3,
                "d_model": 32, "d_ff": 64, "num_heads": 2, "lora_r": 2,
                "base_model_dir": str(base_model_dir)}  # fmt: skip
    args = family.arguments_class(**{**settings, **overrides})
    return family, args, family.load_tasks(args)
