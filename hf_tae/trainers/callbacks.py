"""Trainer callbacks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from hf_tae.tasks.taskset import TaskSet


class GradientCollectorCallback(TrainerCallback):
    """Collect projected per-example gradients at the end of training, inside any ``Trainer``.

    Runs after the Trainer has restored the best checkpoint (``load_best_model_at_end``), so
    the gradients are taken at the meta-initialization θ0 that was kept. Every process
    collects its share; the store is at ``output_dir`` and in :attr:`store` afterwards.

    Args:
        task_set: the tasks whose examples to collect.
        output_dir: the GradientStore folder.
        splits: which splits to collect.
        **collector_kwargs: forwarded to :class:`~hf_tae.gradients.collector.GradientCollector`
            (``score_fn``, ``dim``, ``seed``, ``kind``, ``batch_size`` …).
    """

    def __init__(
        self,
        task_set: TaskSet,
        output_dir: str | os.PathLike,
        splits: Sequence[str] = ("train", "validation"),
        **collector_kwargs: Any,
    ):
        self.task_set, self.output_dir, self.splits = task_set, output_dir, tuple(splits)
        self.collector_kwargs = collector_kwargs
        self.store = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        from hf_tae.gradients.collector import GradientCollector

        collector = GradientCollector(model, **self.collector_kwargs)
        self.store = collector.collect(
            self.task_set, self.output_dir, self.splits, show_progress=not args.disable_tqdm
        )
        return control
