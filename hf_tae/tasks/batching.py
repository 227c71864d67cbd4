"""Batches of (row, task) examples for a model and a score function: built once, used by
gradient collection, lifted scoring and the first-order check."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from hf_tae.tasks.taskset import TaskSet

Collate = Callable[[TaskSet, np.ndarray], dict[str, torch.Tensor]]


def default_collate(task_set: TaskSet, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Model inputs of dataset ``rows``: the task set's input columns, stacked as tensors, plus
    the row's ``task`` for single-label task sets (a model with per-task heads needs it)."""
    columns = list(task_set.input_columns)
    if not task_set.is_multilabel:
        columns.append(task_set.task_column)
    view = task_set.dataset.with_format("torch", columns=columns)
    return dict(view[rows.tolist()])


def example_batches(
    task_set: TaskSet,
    examples: Mapping[str, np.ndarray],
    batch_size: int,
    collate_fn: Collate | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[slice, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(slice, inputs, meta)`` per batch of ``examples`` (``example_id``, ``task``, ``label``
    arrays, as :meth:`TaskSet.examples` gives them): the model inputs of the rows, and
    ``task`` / ``example_id`` / ``example_label`` for the score function."""
    collate = collate_fn or default_collate
    for start in range(0, len(examples["task"]), batch_size):
        sl = slice(start, start + batch_size)
        inputs = collate(task_set, np.asarray(examples["example_id"][sl]))
        inputs = {k: v.to(device) for k, v in inputs.items()}
        meta = {
            "task": torch.as_tensor(examples["task"][sl], device=device),
            "example_id": torch.as_tensor(examples["example_id"][sl], device=device),
            "example_label": torch.as_tensor(examples["label"][sl], device=device),
        }
        yield sl, inputs, meta
