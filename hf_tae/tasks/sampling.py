"""Batches balanced across tasks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from hf_tae.errors import TaeError


class TaskBalancedSampler(Sampler[int]):
    """Yield row indices so that every task is drawn equally often.

    Each draw picks a task uniformly (in rounds: every task once per round, in a shuffled
    order), then one of that task's rows, cycling through a fresh permutation of the task's
    rows. Small tasks are therefore up-sampled and large ones down-sampled; the epoch length
    defaults to the number of rows so one "epoch" costs what it did before.

    Args:
        task_rows: for each task, the indices (into the dataset) of its rows; a row may
            belong to several tasks (multi-label data).
        num_samples: draws per epoch (default: number of distinct rows).
        seed: base seed; epoch ``e`` uses ``seed + e`` (call :meth:`set_epoch`).
    """

    def __init__(
        self, task_rows: Sequence[np.ndarray], num_samples: int | None = None, seed: int = 0
    ):
        self.task_rows = [np.asarray(rows, dtype=np.int64) for rows in task_rows]
        if not self.task_rows:
            raise TaeError("TaskBalancedSampler needs at least one task.")
        empty = [i for i, rows in enumerate(self.task_rows) if len(rows) == 0]
        if empty:
            raise TaeError(
                f"tasks at positions {empty} have no rows to sample; drop them from the task selection."
            )
        distinct = len(np.unique(np.concatenate(self.task_rows)))
        self.num_samples = int(num_samples) if num_samples is not None else distinct
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed + self.epoch)
        n_tasks = len(self.task_rows)
        n_rounds = -(-self.num_samples // n_tasks)
        order = np.concatenate([rng.permutation(n_tasks) for _ in range(n_rounds)])[
            : self.num_samples
        ]
        counts = np.bincount(order, minlength=n_tasks)
        picks: list[np.ndarray] = []
        for rows, count in zip(self.task_rows, counts, strict=True):
            reps = -(-count // len(rows))
            picks.append(
                np.concatenate([rng.permutation(rows) for _ in range(max(reps, 1))])[:count]
            )
        cursor = np.zeros(n_tasks, dtype=np.int64)
        out = np.empty(self.num_samples, dtype=np.int64)
        for i, task in enumerate(order):
            out[i] = picks[task][cursor[task]]
            cursor[task] += 1
        return iter(torch.from_numpy(out).tolist())
