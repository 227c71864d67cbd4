"""``MultitaskTrainer``: train one model on all tasks or a subset, evaluated per task.

Step 1 of the pipeline (the meta-initialization θ0 of Grad-TAE, Li et al. 2024) and the workhorse
of subset fine-tuning and group training later on. Adds to ``transformers.Trainer``, never
forks it: datasets come from a :class:`~hf_tae.TaskSet`, metrics are per task (scikit-learn),
and the best checkpoint is chosen by the average over tasks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, Trainer

from hf_tae.errors import TaeError
from hf_tae.tasks.taskset import TaskSet
from hf_tae.tasks.tensor_rows import in_memory_rows
from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.trainers.metrics import MultiLabelTaskMetrics, SingleLabelTaskMetrics

if TYPE_CHECKING:
    from hf_tae.gradients.store import GradientStore


def _model_num_tasks(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_tasks", None)


class MultitaskTrainer(Trainer):
    """A ``Trainer`` over a :class:`~hf_tae.TaskSet`.

    Args:
        model: a multitask model, e.g. :class:`~hf_tae.SignForMultiTaskNodeClassification`.
        args: :class:`~hf_tae.MultitaskTrainingArguments` (``args.tasks`` narrows the task set).
        task_set: where the tasks, splits and labels come from. ``train_dataset`` and
            ``eval_dataset`` default to its ``train`` and ``validation`` views and
            ``compute_metrics`` to per-task F1/accuracy/log-loss: binary per task for
            multi-label task sets (one logit per task), macro-F1, accuracy and cross-entropy for
            single-label ones (one class per row, the row's ``task`` given to the model).
        **kwargs: anything ``transformers.Trainer`` accepts.

    Per-task metrics are logged as ``eval_<task>_f1``, ``eval_<task>_accuracy``,
    ``eval_<task>_log_loss`` with their averages ``eval_avg_*``.
    """

    _tag_names = ["hf-tae", "multitask", "task-affinity"]

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module | None = None,
        args: MultitaskTrainingArguments | None = None,
        task_set: TaskSet | None = None,
        **kwargs: Any,
    ):
        if args is None:
            args = MultitaskTrainingArguments(output_dir="tae-multitask")
        if task_set is not None and getattr(args, "tasks", None):
            task_set = task_set.select(args.tasks)
        self.task_set = task_set
        if task_set is not None:
            width = _model_num_tasks(model) if model is not None else None
            if width is not None and width != task_set.num_all_tasks:
                raise TaeError(
                    f"the model has {width} task outputs but the task set has "
                    f"{task_set.num_all_tasks} tasks; build the model with the task set's "
                    f"task_names ({task_set.num_all_tasks} tasks)."
                )
            kwargs.setdefault("train_dataset", in_memory_rows(task_set.trainer_dataset("train")))
            if args.eval_strategy != "no":
                kwargs.setdefault(
                    "eval_dataset", in_memory_rows(task_set.trainer_dataset("validation"))
                )
            if task_set.is_multilabel:
                metrics = MultiLabelTaskMetrics(
                    task_set.all_task_names,
                    task_set.task_ids,
                    getattr(args, "decision_threshold", 0.0),
                )
                label_names = ["labels", "label_mask"]
            else:
                metrics = SingleLabelTaskMetrics(task_set.all_task_names, task_set.task_ids)
                label_names = [task_set.label_column, task_set.task_column]
            kwargs.setdefault("compute_metrics", metrics)
            if args.label_names is None:
                args.label_names = label_names
        super().__init__(model=model, args=args, **kwargs)

    def create_model_card(
        self,
        model_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        data_repo: str | None = None,
        gradient_store_repo: str | None = None,
        affinity_repo: str | None = None,
    ) -> None:
        """Write hf_tae's meta-initialization card to ``output_dir/README.md`` (TRL-style override).

        Called by ``push_to_hub``, which forwards its extra keyword arguments here. The card
        lists the tasks, the per-task metrics of the last evaluation in ``state.log_history``
        (table and ``model-index``), the key training arguments, how to load the model, and
        links to the task data, gradient store and affinity dataset repos; each link defaults
        to the trainer attribute of the same name when set (e.g. ``trainer.gradient_store_repo``).
        """
        if not self.is_world_process_zero():
            return
        from hf_tae.hub import card_metrics, card_training_arguments, meta_init_card

        model = self.accelerator.unwrap_model(self.model)
        config = getattr(model, "config", None)
        task_names = (
            self.task_set.task_names
            if self.task_set is not None
            else getattr(config, "task_names", None) or []
        )
        repo_id = self.hub_model_id or self.args.hub_model_id or model_name or "<repo_id>"
        card = meta_init_card(
            repo_id,
            task_names,
            metrics=card_metrics(self.state.log_history),
            training_arguments=card_training_arguments(self.args),
            architecture=type(model).__name__,
            model_type=getattr(config, "model_type", None),
            remote_code=getattr(model, "_auto_class", None) is not None,
            model_name=model_name,
            tags=[tags] if isinstance(tags, str) else tags or [],
            license=license,
            data_repo=data_repo or getattr(self, "data_repo", None),
            gradient_store_repo=gradient_store_repo or getattr(self, "gradient_store_repo", None),
            affinity_repo=affinity_repo or getattr(self, "affinity_repo", None),
            metric_source="trainer.state.log_history",
            secrets=[self.args.hub_token],
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def _get_train_sampler(self, train_dataset=None):
        if getattr(self.args, "task_balanced_sampling", False) and self.task_set is not None:
            return self.task_set.balanced_sampler("train", seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def collect_gradients(
        self,
        output_dir: str | os.PathLike,
        splits: Sequence[str] = ("train", "validation"),
        overwrite: bool = False,
        **collector_kwargs: Any,
    ) -> GradientStore:
        """Projected per-example gradients of the current model on the task set (step 2).

        ``collector_kwargs`` go to :class:`~hf_tae.gradients.collector.GradientCollector`
        (``score_fn``, ``dim``, ``seed``, ``kind``, ``batch_size`` …). Every process must call it.
        """
        from hf_tae.gradients.collector import GradientCollector

        if self.task_set is None:
            raise TaeError("collect_gradients needs the trainer to be built with task_set=...")
        collector = GradientCollector(self.accelerator.unwrap_model(self.model), **collector_kwargs)
        return collector.collect(
            self.task_set,
            output_dir,
            splits,
            overwrite=overwrite,
            show_progress=not self.args.disable_tqdm,
        )

    def evaluate_tasks(self, split: str = "test") -> dict[str, float]:
        """Evaluate on the task set's ``split`` (``validation`` or ``test``); keys ``<split>_<task>_f1`` …"""
        if self.task_set is None:
            raise TaeError("evaluate_tasks needs the trainer to be built with task_set=...")
        prefix = "eval" if split == "validation" else split
        rows = in_memory_rows(self.task_set.trainer_dataset(split))
        return self.evaluate(rows, metric_key_prefix=prefix)
