"""What a task is: names, subsets and per-task rows of a multitask ``datasets.Dataset``.

Two layouts (the README's Design section):

* **single-label**: every row is one example of one task, named by an integer ``task``
  column (a ``ClassLabel`` carries the names), with a per-row ``split`` column;
* **multi-label**: every row (e.g. a graph node) carries a label vector over all tasks and a
  split-code vector over all tasks; an *example* is a (row, task) pair, expanded by index and
  never by copying features.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.tasks.sampling import TaskBalancedSampler
from hf_tae.tasks.splits import SPLIT_NAMES, split_code

if TYPE_CHECKING:
    from datasets import Dataset

TaskRef = str | int


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars for internal bookkeeping steps users did not ask for."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


class TaskSet:
    """Names the tasks of a multitask dataset and gives per-task rows, views and samplers.

    Args:
        dataset: the multitask dataset (either layout above).
        task_names: names of all tasks; read from the ``task`` ``ClassLabel`` when omitted.
        tasks: the selected subset (names or ids); all tasks by default.
        input_columns: the model inputs kept by :meth:`trainer_dataset` (default: every column
            that is not a label, split, task or id column).
        label_column, split_column, task_column: column names.
        source: the object the tasks were built from (a ``CommunityGraph``, ``ImageDomains``…),
            kept for saving, planted groups and reports; views share it.
    """

    def __init__(
        self,
        dataset: Dataset,
        task_names: Sequence[str] | None = None,
        *,
        tasks: Sequence[TaskRef] | None = None,
        input_columns: Sequence[str] | None = None,
        label_column: str = "labels",
        split_column: str = "split",
        task_column: str = "task",
        source: object | None = None,
    ):
        self.dataset = dataset
        self.source = source
        self.label_column, self.split_column, self.task_column = (
            label_column,
            split_column,
            task_column,
        )
        for column in (label_column, split_column):
            if column not in dataset.column_names:
                raise TaeError(
                    f"the dataset has no {column!r} column (columns: {dataset.column_names}); pass "
                    f"{'label' if column == label_column else 'split'}_column= to name it."
                )
        self.is_multilabel = task_column not in dataset.column_names
        numpy_view = dataset.with_format("numpy")
        if self.is_multilabel:
            self._labels = np.asarray(numpy_view[label_column])
            self._split = np.asarray(numpy_view[split_column]).astype(np.int8)
            if self._labels.ndim != 2 or self._split.shape != self._labels.shape:
                raise TaeError(
                    f"multi-label data needs {label_column!r} and {split_column!r} as [rows, num_tasks] matrices, "
                    f"got {self._labels.shape} and {self._split.shape}; single-label data needs a "
                    f"{task_column!r} column."
                )
            n_all = self._labels.shape[1]
        else:
            feature = dataset.features[task_column]
            if task_names is None and hasattr(feature, "names"):
                task_names = feature.names
            self._task = np.asarray(numpy_view[task_column]).astype(np.int64)
            self._split = self._row_split_codes(dataset, split_column)
            n_all = len(task_names) if task_names is not None else int(self._task.max()) + 1
        self.all_task_names = (
            [str(n) for n in task_names]
            if task_names is not None
            else [f"task_{i}" for i in range(n_all)]
        )
        if len(self.all_task_names) != n_all or len(set(self.all_task_names)) != n_all:
            raise TaeError(
                f"need {n_all} distinct task names for this dataset, got {len(self.all_task_names)}."
            )
        reserved = {label_column, split_column, task_column, "node_id", "example_id"}
        self.input_columns = (
            list(input_columns)
            if input_columns is not None
            else [c for c in dataset.column_names if c not in reserved]
        )
        self.task_ids = self.resolve(tasks) if tasks is not None else np.arange(n_all)

    @staticmethod
    def _row_split_codes(dataset: Dataset, column: str) -> np.ndarray:
        values = dataset.select_columns([column]).to_dict()[column]
        feature = dataset.features[column]
        if hasattr(feature, "names"):  # ClassLabel: map its names onto our codes
            values = [feature.names[v] for v in values]
        if values and isinstance(values[0], str):
            return np.asarray(
                [split_code("validation" if v in ("val", "valid", "dev") else v) for v in values],
                np.int8,
            )
        codes = np.asarray(values, dtype=np.int8)
        if codes.size and not set(np.unique(codes)) <= {0, 1, 2}:
            raise TaeError(
                f"split column {column!r} must hold names {list(SPLIT_NAMES)} or codes 0/1/2."
            )
        return codes

    # ------------------------------------------------------------------ naming
    @property
    def task_names(self) -> list[str]:
        """Names of the selected tasks, in selection order."""
        return [self.all_task_names[i] for i in self.task_ids]

    @property
    def num_tasks(self) -> int:
        return len(self.task_ids)

    @property
    def num_all_tasks(self) -> int:
        return len(self.all_task_names)

    def __repr__(self) -> str:
        kind = "multi-label" if self.is_multilabel else "single-label"
        shown = ", ".join(self.task_names[:4]) + (", …" if self.num_tasks > 4 else "")
        return f"TaskSet({kind}, rows={len(self.dataset)}, tasks={self.num_tasks}/{self.num_all_tasks}: [{shown}])"

    def resolve(self, tasks: Sequence[TaskRef]) -> np.ndarray:
        """Global task ids of names or ids; raises on unknown, duplicate or empty selections."""
        if isinstance(tasks, (str, int)):
            tasks = [tasks]
        ids: list[int] = []
        for task in tasks:
            if isinstance(task, (int, np.integer)) and not isinstance(task, bool):
                if not 0 <= task < self.num_all_tasks:
                    raise TaeError(
                        f"task id {task} is out of range; this task set has ids 0..{self.num_all_tasks - 1}."
                    )
                ids.append(int(task))
            elif str(task) in self.all_task_names:
                ids.append(self.all_task_names.index(str(task)))
            elif str(task).isdigit() and int(task) < self.num_all_tasks:
                ids.append(int(task))
            else:
                near = ", ".join(self.all_task_names[:6])
                raise TaeError(
                    f"unknown task {task!r}; known tasks are [{near}{', …' if self.num_all_tasks > 6 else ''}]."
                )
        if not ids:
            raise TaeError("the task selection is empty; name at least one task.")
        if len(set(ids)) != len(ids):
            raise TaeError(f"the task selection {list(tasks)} names a task twice.")
        return np.asarray(ids, dtype=np.int64)

    def select(self, tasks: Sequence[TaskRef]) -> TaskSet:
        """A view of the same data restricted to ``tasks`` (names or global ids)."""
        view = object.__new__(TaskSet)
        view.__dict__.update(self.__dict__)
        view.task_ids = self.resolve(tasks)
        return view

    def keep_train_examples(
        self, example_ids: Sequence[int], tasks: Sequence[int] | None = None
    ) -> TaskSet:
        """A view whose ``train`` examples are only the given ones; validation and test unchanged.

        ``example_ids`` are dataset rows; multi-label data also needs ``tasks`` (the global task
        of each, an example being a (row, task) pair). Training examples not listed belong to
        no split in the view, so a model can be trained on chosen rows of its tasks (e.g. data
        sources that group rows) and still be scored on all of their held-out rows.
        """
        rows = np.asarray(example_ids, dtype=np.int64)
        train = self._split == split_code("train")
        keep = np.zeros_like(train)
        if self.is_multilabel:
            if tasks is None or len(tasks) != len(rows):
                raise TaeError("multi-label data needs the task of every kept example (tasks=).")
            keep[rows, np.asarray(tasks, dtype=np.int64)] = True
        else:
            keep[rows] = True
        view = object.__new__(TaskSet)
        view.__dict__.update(self.__dict__)
        view._split = np.where(train & ~keep, np.int8(-1), self._split)  # -1: in no split
        return view

    # ------------------------------------------------------------------ rows
    def _membership(self, split: str) -> np.ndarray:
        """Boolean ``[rows, num_selected_tasks]``: row r is an example of task t in ``split``."""
        code = split_code(split)
        if self.is_multilabel:
            return self._split[:, self.task_ids] == code
        return (self._task[:, None] == self.task_ids[None, :]) & (self._split == code)[:, None]

    def rows(self, task: TaskRef, split: str = "train") -> np.ndarray:
        """Dataset row indices of ``task``'s examples in ``split``."""
        gid = int(self.resolve([task])[0])
        if gid not in self.task_ids:
            raise TaeError(f"task {task!r} is not in this selection {self.task_names}.")
        col = int(np.flatnonzero(self.task_ids == gid)[0])
        return np.flatnonzero(self._membership(split)[:, col])

    def examples(self, split: str = "train") -> dict[str, np.ndarray]:
        """The task view: one entry per (row, task) example of the selected tasks in ``split``.

        Returns ``example_id`` (dataset row), ``task`` (global task id) and ``label`` arrays,
        ordered by task then row.
        """
        member = self._membership(split)
        cols, rows = np.nonzero(member.T)
        tasks = self.task_ids[cols]
        if self.is_multilabel:
            labels = self._labels[rows, tasks].astype(np.float32)
        else:
            labels = self._class_labels()[rows].astype(np.float32)
        return {"example_id": rows.astype(np.int64), "task": tasks, "label": labels}

    def labels(self, task: TaskRef, split: str = "train") -> np.ndarray:
        """Gold labels of ``task``'s examples in ``split``: booleans for multi-label data, class
        ids otherwise (in the order of :meth:`rows`)."""
        rows = self.rows(task, split)
        if self.is_multilabel:
            return self._labels[rows, int(self.resolve([task])[0])] > 0.5
        return self._class_labels()[rows]

    def _class_labels(self) -> np.ndarray:
        if "_class_label_cache" not in self.__dict__:
            column = self.dataset.select_columns([self.label_column]).with_format("numpy")
            self.__dict__["_class_label_cache"] = np.asarray(column[self.label_column]).astype(
                np.int64
            )
        return self.__dict__["_class_label_cache"]

    def task_counts(self, split: str = "train") -> dict[str, int]:
        """Number of examples of each selected task in ``split``."""
        return dict(zip(self.task_names, self._membership(split).sum(0).tolist(), strict=True))

    def positive_rates(self, split: str = "train") -> np.ndarray:
        """Per selected task, the fraction of positive labels in ``split`` (multi-label data)."""
        if not self.is_multilabel:
            raise TaeError("positive_rates is defined for multi-label (binary) tasks only.")
        member = self._membership(split)
        pos = (self._labels[:, self.task_ids] > 0) & member
        return pos.sum(0) / np.maximum(member.sum(0), 1)

    # ------------------------------------------------------------------ trainer views
    def trainer_dataset(self, split: str = "train") -> Dataset:
        """Rows of ``split`` for the selected tasks, with only model inputs and labels, torch-formatted.

        Multi-label: rows with at least one selected task in ``split``, plus a boolean
        ``label_mask`` (task in selection and (row, task) in ``split``) so the loss and metrics
        see exactly the examples of this split. Single-label: the rows themselves with ``task``.
        """
        from datasets import List, Value

        member = self._membership(split)
        keep = np.flatnonzero(member.any(axis=1))
        if keep.size == 0:
            raise TaeError(
                f"the selected tasks {self.task_names} have no rows in the {split!r} split."
            )
        columns = [*self.input_columns, self.label_column] + (
            [] if self.is_multilabel else [self.task_column]
        )
        ds = self.dataset.select_columns(columns).select(keep)
        if self.is_multilabel:
            mask = np.zeros((keep.size, self.num_all_tasks), dtype=bool)
            mask[:, self.task_ids] = member[keep]
            with _quiet_datasets():
                ds = ds.add_column(
                    "label_mask", list(mask), feature=List(Value("bool"), length=self.num_all_tasks)
                )
        return ds.with_format("torch")

    def trainer_task_rows(self, split: str = "train") -> list[np.ndarray]:
        """For each selected task, its row positions within :meth:`trainer_dataset` of ``split``."""
        member = self._membership(split)
        member = member[member.any(axis=1)]
        return [np.flatnonzero(member[:, t]) for t in range(self.num_tasks)]

    def balanced_sampler(
        self, split: str = "train", seed: int = 0, num_samples: int | None = None
    ) -> TaskBalancedSampler:
        """A :class:`TaskBalancedSampler` over :meth:`trainer_dataset` of ``split``."""
        return TaskBalancedSampler(
            self.trainer_task_rows(split), num_samples=num_samples, seed=seed
        )
