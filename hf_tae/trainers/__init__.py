"""Trainer subclasses, TrainingArguments subclasses and callbacks.

The TRL-based :mod:`hf_tae.trainers.sft` names load on first access, so that importing this
package does not import TRL.
"""

import importlib
from typing import Any

from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.trainers.metrics import MultiLabelTaskMetrics, SingleLabelTaskMetrics
from hf_tae.trainers.multitask import MultitaskTrainer

_LAZY = {"SFTMultitaskTrainer", "SFTMultitaskConfig", "CompletionCollator"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("hf_tae.trainers.sft"), name)
    raise AttributeError(f"module 'hf_tae.trainers' has no attribute {name!r}")


__all__ = [
    "CompletionCollator",
    "MultiLabelTaskMetrics",
    "MultitaskTrainer",
    "MultitaskTrainingArguments",
    "SFTMultitaskConfig",
    "SFTMultitaskTrainer",
    "SingleLabelTaskMetrics",
]
