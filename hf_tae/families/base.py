"""The task-family contract: everything the pipeline needs to know about one kind of tasks.

A family bundles what is specific to a kind of data and model (graph communities, image
domains, instruction templates), in the spirit of kronfluence's ``Task`` and peft's per-tuner
folders: its arguments dataclass (which becomes command-line flags), training defaults, how to
load the tasks and build a fresh model, the score function whose gradients are projected, the
task-private parameters left out of the gradients, what its metrics mean, a data fingerprint
for resuming, and the planted groups when its data has them. The pipeline
(:func:`hf_tae.pipeline.run_pipeline`), the report and the Hub cards take everything
family-specific from it; estimation and clustering never see it.

Add a family by subclassing :class:`TaskFamily` and registering it::

    @register_family
    class MyFamily(TaskFamily):
        name = "mine"
        arguments_class = MyArguments          # a dataclass; its fields become flags
        ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from hf_tae.models.scores import ScoreFunction
    from hf_tae.tasks.batching import Collate
    from hf_tae.tasks.taskset import TaskSet


def planted_groups_or_none(
    groups: Sequence[Any] | None, num_tasks: int, what: str = "task_groups", noun: str = "group"
) -> list[int] | None:
    """Planted group ids as ints, or ``None`` when the data has no planted groups.

    ``None`` entries (null ``group`` cells) and negative ids both mean "unknown"; when every task
    is unknown (SNAP data, graphs saved with the old ``-1`` convention) the result is ``None``.
    A partly known planting is ambiguous for the planted comparisons and is refused.
    """
    if groups is None:
        return None
    groups = list(groups)
    if len(groups) != num_tasks:
        raise TaeError(f"{what} has {len(groups)} entries for {num_tasks} tasks.")
    unknown = [g is None or int(g) < 0 for g in groups]
    if all(unknown):
        return None
    if any(unknown):
        raise TaeError(
            f"{what} gives no (or a negative) {noun} for {sum(unknown)} of {num_tasks} "
            "tasks; give every task a group id >= 0, or none at all when the data has no "
            "planted groups."
        )
    return [int(g) for g in groups]


@dataclass(frozen=True)
class TaskMetrics:
    """What a family's per-task metrics mean and which ones drive the pipeline.

    Every family fills the columns of :data:`hf_tae.estimation.schema.METRICS`; ``labels`` says
    what each is for this family (e.g. ``f1`` is macro-F1 for single-label classes).

    Args:
        selection: picks checkpoints and headlines group training (higher is better).
        affinity: default per-task score the affinity is built from; must be one of
            ``estimated``.
        estimated: the metrics a gradient estimate can compute for this family (an estimate
            from gold-class log-odds has accuracy and cross-entropy, not F1).
        labels: human-readable names for reports and cards.
    """

    selection: str = "f1"
    affinity: str = "log_loss"
    estimated: tuple[str, ...] = METRICS
    labels: Mapping[str, str] = field(
        default_factory=lambda: {"f1": "F1", "accuracy": "accuracy", "log_loss": "log-loss"}
    )

    def __post_init__(self) -> None:
        for name in (self.selection, self.affinity, *self.estimated):
            if name not in METRICS:
                raise TaeError(f"metric {name!r} is not one of {list(METRICS)}.")
        if self.affinity not in self.estimated:
            raise TaeError(f"the affinity metric {self.affinity!r} is not in {self.estimated}.")

    def label(self, metric: str) -> str:
        return self.labels.get(metric, metric)


class TaskFamily:
    """Base class of task families; subclass it and :func:`register_family` the subclass.

    Class attributes: ``name`` (the registry key and ``hf-tae run <name>``), ``description``
    (one line for ``--help``), ``arguments_class`` (a dataclass of data and model options),
    ``training_defaults`` (``TrainingArguments`` overrides for this family),
    ``pipeline_defaults`` (overrides of the pipeline's flags, e.g. ``subset_size`` for a family
    with few tasks), ``metrics``
    (:class:`TaskMetrics`), ``pipeline_tag`` (the Hub task tag of its models, or None),
    ``capacity_options`` (the flags that widen its model).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    arguments_class: ClassVar[type] = object
    training_defaults: ClassVar[dict[str, Any]] = {}
    pipeline_defaults: ClassVar[dict[str, Any]] = {}
    metrics: ClassVar[TaskMetrics] = TaskMetrics()
    pipeline_tag: ClassVar[str | None] = None
    #: The flags that widen this family's model, named when a meta-initialization learns no
    #: task (e.g. ``("--hidden_size",)``); empty: the warning names none.
    capacity_options: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------------ required
    def load_tasks(self, args: Any) -> TaskSet:
        """The tasks, as a :class:`~hf_tae.TaskSet` (its ``source`` may hold the raw data)."""
        raise NotImplementedError

    def model_init(self, args: Any, tasks: TaskSet) -> PreTrainedModel:
        """A fresh, randomly initialized model for ``tasks`` (the caller seeds torch first)."""
        raise NotImplementedError

    def score_function(self, args: Any) -> ScoreFunction:
        """The per-example score s_e(θ) whose projected gradients are collected."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional
    def widen(self, args: Any) -> Any | None:
        """``args`` with the model built from config twice as wide (the ``capacity_options``),
        for a meta-initialization that learned no task (``--meta_init_widenings``); None when
        the model cannot be widened (the default, and pretrained models)."""
        return None

    def private_parameters(self, model: PreTrainedModel) -> list[str]:
        """Regular expressions of task-private parameters (e.g. per-task heads), left out of the
        gradients: they carry no transfer between tasks and would leak into shared
        coordinates once projected. Default: none."""
        return []

    def planted_groups(self, tasks: TaskSet) -> np.ndarray | None:
        """The planted group id (>= 0) of every task of ``tasks`` when the data was built with
        groups, else None: then the pipeline has no planted comparison, ARI or planted gap.

        Default: the source's ``task_groups``, restricted to the tasks of ``tasks`` when it is a
        view of fewer tasks. Missing (``None``) or negative ids mean "unknown"; all unknown is
        None (real data), a partly unknown planting is an error.
        """
        source = getattr(tasks, "source", None)
        groups = getattr(source, "task_groups", None)
        if groups is None:
            return None
        groups = list(groups)
        source_names = getattr(source, "task_names", None)
        names = list(getattr(tasks, "task_names", []) or [])
        if source_names is not None and names and len(groups) == len(source_names) != len(names):
            position = {str(n): i for i, n in enumerate(source_names)}
            if all(str(n) in position for n in names):
                groups = [groups[position[str(n)]] for n in names]
        groups = planted_groups_or_none(groups, len(groups), "the data", "planted group")
        return None if groups is None else np.asarray(groups, dtype=np.int64)

    def fingerprint(self, args: Any, tasks: TaskSet) -> str:
        """sha256 of what determines the data: resumed runs retrain when it changes. Default:
        the family's ``fingerprint()`` of ``tasks.source`` when it has one, plus the arguments."""
        digest = hashlib.sha256()
        source = getattr(tasks, "source", None)
        if source is not None and hasattr(source, "fingerprint"):
            digest.update(str(source.fingerprint()).encode())
        else:
            digest.update(str(tasks.dataset._fingerprint).encode())
        digest.update(json.dumps(_as_dict(args), sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def save_data(self, tasks: TaskSet, path: str | os.PathLike) -> None:
        """Save the data the run used (``<output_dir>/data``); default: the source's ``save``."""
        source = getattr(tasks, "source", None)
        if source is not None and hasattr(source, "save"):
            source.save(path, overwrite=True)

    def describe(self, tasks: TaskSet) -> str:
        """One line about the data for reports."""
        source = getattr(tasks, "source", None)
        return repr(source if source is not None else tasks)

    def baseline(self, tasks: TaskSet, split: str = "test") -> dict[str, float] | None:
        """Per-task selection metric of an input-blind predictor (the label-frequency baseline)."""
        from hf_tae.trainers.baselines import label_frequency_baseline

        if self.metrics.selection not in ("f1", "accuracy"):
            return None
        return label_frequency_baseline(tasks, split, metric=self.metrics.selection)

    @property
    def trainer_class(self) -> type:
        """The Trainer that trains and scores this family's models on a task set (meta-init,
        group training, ground truth). Default: :class:`~hf_tae.MultitaskTrainer`."""
        from hf_tae.trainers.multitask import MultitaskTrainer

        return MultitaskTrainer

    def collate_fn(self, args: Any) -> Collate | None:
        """``(task_set, rows) -> model inputs`` for gradient collection (None: input columns)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _as_dict(args: Any) -> dict[str, Any]:
    return dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
