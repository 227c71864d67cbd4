"""Step 6: train one model per task group and compare with other ways of splitting the tasks.

After clustering, Grad-TAE (Li et al., KDD 2024) trains one multitask model per group; the
question a user asks is whether the groups pay off: is every task better served by its
group's model than by one model on all tasks, or by a model of its own? This module
answers it with real training. Every strategy is a partition of the tasks (the groups, all
tasks in one group, every task alone, the planted groups when known); each distinct subset is
trained once per seed by :class:`~hf_tae.SubsetFineTuner`, so the runs are resumable and shared
between strategies (a singleton group is the same run as that task trained alone), and run in
parallel under ``accelerate launch``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS, higher_is_better

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel

    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments



def _partition(task_set: TaskSet, name: str, groups: Sequence[Sequence[int | str]]):
    """Groups as sorted tuples of global ids; each task of the task set exactly once."""
    if isinstance(groups, str) or not all(
        isinstance(g, Sequence) and not isinstance(g, str) for g in groups
    ):
        raise TaeError(f"strategy {name!r} must be a list of task lists, got {groups!r}.")
    canon = [tuple(sorted(int(t) for t in task_set.resolve(list(g)))) for g in groups if len(g)]
    seen = [t for g in canon for t in g]
    expected = sorted(int(t) for t in task_set.task_ids)
    if sorted(seen) != expected:
        names = task_set.all_task_names
        repeated = sorted({names[t] for t in seen if seen.count(t) > 1})
        missing = sorted(names[t] for t in set(expected) - set(seen))
        extra = sorted(names[t] for t in set(seen) - set(expected))
        raise TaeError(
            f"strategy {name!r} is not a partition of the task set's tasks (repeated {repeated}, "
            f"missing {missing}, not selected {extra}); give every task exactly one group."
        )
    return canon


def compare_group_training(
    model_init: Callable[[], PreTrainedModel],
    task_set: TaskSet,
    strategies: Mapping[str, Sequence[Sequence[int | str]]],
    args: MultitaskTrainingArguments,
    output_dir: str | os.PathLike,
    seeds: Sequence[int] = (0,),
    split: str = "test",
    show_progress: bool = True,
    extra_splits: Sequence[str] = (),
    trainer_class: type | None = None,
    fingerprint: str | None = None,
    keep_models: Sequence[Sequence[int | str]] = (),
    generate_splits: Sequence[str] = (),
    by_seed: bool = False,
) -> pd.DataFrame:
    """Train every group of every strategy and score each task with its own group's model.

    Args:
        model_init: the fresh model of each run (from scratch or a meta-initialization).
        task_set: the tasks.
        strategies: ``{name: partition}``, e.g. ``{"grouped": groups, "all tasks":
            [all_tasks], "single task": [[t] for t in all_tasks]}``; each partition lists
            every task exactly once (names or global ids).
        args: training arguments of every run (see :class:`~hf_tae.SubsetFineTuner`).
        output_dir: the shared, resumable ``SubsetFineTuner`` folder.
        seeds: runs per subset; scores are averaged over seeds.
        split: where each task is scored (``"test"`` for the final comparison).
        extra_splits: also score every new run on these (recorded, not returned), so that a
            second call with ``split`` set to one of them trains nothing.
        trainer_class: the Trainer of every run (default :class:`~hf_tae.MultitaskTrainer`;
            a family's ``trainer_class``).
        fingerprint: what ``model_init`` starts from, recorded with the runs (see
            :class:`~hf_tae.SubsetFineTuner`: a rerun with other settings raises).
        keep_models: groups whose model (first seed) is kept under ``output_dir/models/``
            (:meth:`~hf_tae.SubsetFineTuner.model_path`), e.g. to merge them afterwards.
        generate_splits: splits also scored by greedy generation (text trainers): the rows
            of ``split`` then carry ``rougeL`` and ``generated_exact_match`` too.
        by_seed: one row per seed instead of the mean over seeds (with a ``seed`` column).

    Returns:
        One row per (strategy, task) (per seed too with ``by_seed``): ``strategy``, ``task``,
        ``task_name``, ``group`` (the task names trained together), ``group_size`` and the mean
        ``f1``, ``accuracy`` and ``log_loss`` (and the generation metrics) over seeds.
    """
    import pandas as pd

    from hf_tae.evaluation.ground_truth import SubsetFineTuner

    if not strategies:
        raise TaeError("strategies is empty; give at least one partition of the tasks.")
    partitions = {name: _partition(task_set, name, groups) for name, groups in strategies.items()}
    subsets = sorted(
        {g for groups in partitions.values() for g in groups}, key=lambda g: (len(g), g)
    )
    tuner = SubsetFineTuner(
        model_init, task_set, args, output_dir, seeds=seeds, trainer_class=trainer_class,
        fingerprint=fingerprint, generate_splits=generate_splits,
    )
    table = tuner.run(subsets, split=split, show_progress=show_progress, extra_splits=extra_splits,
                      keep_models=keep_models)  # fmt: skip
    scored = _scored_metrics(table)
    means = (
        table.assign(subset=[tuple(s) for s in table["subset"]])
        .groupby(["subset", "task", "task_name", *(["seed"] if by_seed else [])])[scored]
        .mean()
    )  # sorted: a partial key (the seeds of one run) is then a fast lookup
    names = task_set.all_task_names
    rows = []
    for strategy, groups in partitions.items():
        for group in groups:
            for task in group:
                found = means.loc[(group, task, names[task])]
                for seed, scores in (found.iterrows() if by_seed else [(None, found)]):
                    rows.append(
                        {
                            "strategy": strategy,
                            "task": task,
                            "task_name": names[task],
                            "group": [names[t] for t in group],
                            "group_size": len(group),
                            **({"seed": int(seed)} if by_seed else {}),
                            **{m: float(scores[m]) for m in scored},
                        }
                    )
    order = ["strategy", "task", *(["seed"] if by_seed else [])]
    return pd.DataFrame(rows).sort_values(order, ignore_index=True)


def summarize_group_training(
    table: pd.DataFrame, reference: str | None = None, metric: str = "f1"
) -> pd.DataFrame:
    """Mean scores per strategy (rows) and, with ``reference``, the per-task wins against it.

    ``wins`` counts tasks whose ``metric`` beats ``reference``'s for the same task (ties are
    not wins; lower is better for losses), ``gain`` is the strategy's mean ``metric`` minus the
    reference's, e.g. ``reference="all tasks"`` for "do the groups beat one model on everything?".
    """
    from hf_tae.estimation.schema import check_metric

    check_metric(metric)
    summary = table.groupby("strategy", sort=False)[_scored_metrics(table)].mean()
    summary["num_models"] = table.groupby("strategy", sort=False)["group"].apply(
        lambda g: len({tuple(x) for x in g})
    )
    if reference is not None:
        if reference not in summary.index:
            raise TaeError(
                f"reference {reference!r} is not a strategy of the table; use one of "
                f"{list(summary.index)}."
            )
        wide = table.pivot(index="task", columns="strategy", values=metric)
        sign = 1.0 if higher_is_better(metric) else -1.0
        summary["gain"] = summary[metric] - summary.loc[reference, metric]
        summary["wins"] = [
            int((sign * (wide[s] - wide[reference]) > 0).sum()) for s in summary.index
        ]
    return summary


def validated_groups(
    validation_table: pd.DataFrame, groups: Sequence[Sequence[str]], metric: str
) -> list[list[str]] | None:
    """The estimate's groups with every group whose tasks score better alone than together on
    validation rows, with every seed, split into single tasks; None when every group holds.

    ``validation_table`` is :func:`~hf_tae.compare_group_training`'s table on the validation
    split with the strategies ``"grouped"`` and ``"single task"``, per seed (``by_seed=True``;
    without a ``seed`` column it counts as one seed). A group is split when, for every seed,
    the mean of ``metric`` over its tasks under the single-task models beats the mean under
    the group's model (strictly: a tie keeps it). Every seed, not the mean over seeds: a
    task's validation score is noisy (a few positives), and the mean split more true groups
    on the scenario suite. Both kinds of model are trained for the
    comparison anyway, so this costs no training: the estimate proposes the groups and
    validation keeps those that pay (README: Scenarios, ``unequal`` at data seed 2).
    """
    sign = 1.0 if higher_is_better(metric) else -1.0
    table = validation_table if "seed" in validation_table else validation_table.assign(seed=0)
    scores = table.pivot_table(index=["task_name", "seed"], columns="strategy", values=metric)
    out: list[list[str]] = []
    for group in groups:
        rows = scores.loc[list(group)]
        by_seed = rows.groupby(level="seed")[["single task", "grouped"]].mean()
        alone_wins = (sign * (by_seed["single task"] - by_seed["grouped"]) > 0).all()
        if len(group) > 1 and alone_wins:
            out += [[t] for t in group]
        else:
            out.append(list(group))
    return None if len(out) == len(groups) else out


def _scored_metrics(table: pd.DataFrame) -> list[str]:
    """The per-task metrics of a run table: :data:`METRICS` and any generation metrics."""
    from hf_tae.trainers.metrics import GENERATION_METRICS

    return [*METRICS, *(m for m in GENERATION_METRICS if m in table.columns)]
