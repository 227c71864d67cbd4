"""Trainer subclasses, TrainingArguments subclasses and callbacks."""

from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.trainers.metrics import MultiLabelTaskMetrics, SingleLabelTaskMetrics
from hf_tae.trainers.multitask import MultitaskTrainer

__all__ = [
    "MultiLabelTaskMetrics",
    "MultitaskTrainer",
    "MultitaskTrainingArguments",
    "SingleLabelTaskMetrics",
]
