"""Merge the group models of a pipeline run into one model per method, and score it per task.

After group training a run holds one model per task group, all of one architecture and all
started from one model (the meta-initialization θ0, or the same seeded fresh model), so they
can be merged. Shared parameters are merged by the method; **task-private parameters** (the
family's ``private_parameters``, e.g. per-task heads) are not: each task keeps the head its
own group trained, since merging it with heads that never saw the task only dilutes it:

- a per-task module (a name component that runs over every task id, e.g. ``heads.<t>.weight``)
  is taken whole from the model of task t's group;
- a tensor with one row per task (the graph family's last head layer) gets row t from the
  model of task t's group;
- anything else matched as private raises, naming the tensor. Tasks outside every group (a
  task set that is a view of fewer tasks) keep model 0's value.

Data-aware methods read statistics computed by hooks (:func:`~hf_tae.merging.compute_statistics`)
on each group model over its own group's training rows; the Fisher is the empirical one of the
model's own training loss (``-outputs.loss`` per example), so it works for any family.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS
from hf_tae.merging.engine import MergeResult, merge
from hf_tae.merging.registry import get_method, parse_method_choices
from hf_tae.merging.resume import fingerprint, finished_fingerprint
from hf_tae.merging.sources import TensorSource, open_source

if TYPE_CHECKING:
    from hf_tae.merging.statistics import MergeStatistics
    from hf_tae.tasks.taskset import TaskSet

#: statistics the stage computes (fisher_block needs parameter patterns: not here)
_KINDS = frozenset({"gram", "kfac", "fisher"})


def per_task_modules(names: Sequence[str], num_tasks: int) -> dict[str, int]:
    """``{name: task id}`` for tensors of per-task modules: names that differ only in one
    integer component which takes every value ``0 … num_tasks − 1`` (``heads.<t>.weight``)."""
    families: dict[tuple[str, int], dict[str, int]] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                template = ".".join(parts[:i] + ["{}"] + parts[i + 1 :])
                families.setdefault((template, i), {})[name] = int(part)
    owners: dict[str, int] = {}
    for members in families.values():
        if num_tasks > 1 and set(members.values()) == set(range(num_tasks)):
            owners.update(members)
    return owners


def private_tensors(
    sources: Sequence[TensorSource],
    groups: Sequence[Sequence[int]],
    patterns: Sequence[str],
    num_tasks: int,
) -> dict[str, torch.Tensor]:
    """The task-private tensors of the merged model: each task's part from its group's model
    (``sources[g]`` trained ``groups[g]``, global task ids); see the module docstring."""
    names = [n for n in sources[0].names() if any(re.search(p, n) for p in patterns)]
    owner = {int(t): g for g, group in enumerate(groups) for t in group}
    whole = per_task_modules(names, num_tasks)
    out = {}
    for name in names:
        if name in whole:
            out[name] = sources[owner.get(whole[name], 0)].get(name).clone()
            continue
        first = sources[0].get(name)
        if first.ndim == 0 or first.shape[0] != num_tasks:
            raise TaeError(
                f"task-private tensor {name!r} (shape {tuple(first.shape)}) is neither a per-task "
                f"module nor one row per task ({num_tasks} tasks), so its task's part cannot be "
                "taken from the task's group model; leave it out of the family's "
                "private_parameters or merge it as a shared tensor."
            )
        tensor = first.clone()
        for task, g in owner.items():
            tensor[task] = sources[g].get(name)[task]
        out[name] = tensor
    return out


def merge_group_models(
    models: Sequence[str | os.PathLike],
    groups: Sequence[Sequence[int]],
    method: str,
    output_dir: str | os.PathLike,
    *,
    num_tasks: int,
    private: Sequence[str] = (),
    base: str | os.PathLike | None = None,
    statistics: Sequence[MergeStatistics] | None = None,
    params: Mapping[str, Any] | None = None,
    merge_fingerprint: str | None = None,
) -> MergeResult:
    """Merge the group models (``models[g]`` trained on ``groups[g]``) into ``output_dir``:
    shared tensors by ``method``, task-private ones (regexes ``private``) per task from the
    task's group model. The models were trained from ``base`` by construction, so the
    distance-to-base check is off; an existing output is replaced unless it holds the finished
    merge of ``merge_fingerprint``."""
    if len(models) != len(groups):
        raise TaeError(f"{len(models)} models for {len(groups)} groups; pass one per group.")
    sources = [open_source(m, f"group model {g}") for g, m in enumerate(models)]
    fixed = private_tensors(sources, groups, private, num_tasks) if private else {}
    return merge(base, list(models), method, statistics=statistics, output_dir=output_dir,
                 overwrite=True, fixed=fixed, fingerprint=merge_fingerprint,
                 skip_if_finished=merge_fingerprint is not None, max_task_vector_ratio=None,
                 **dict(params or {}))  # fmt: skip


def _negative_loss(_model: Any, _batch: Any, outputs: Any) -> torch.Tensor:
    """The example's log-likelihood as the model's own training loss sees it (empirical Fisher)."""
    if getattr(outputs, "loss", None) is None:
        raise TaeError("the model returned no loss; Fisher statistics need batches with labels.")
    return -outputs.loss


def _run_args(args: Any, output_dir: Path) -> Any:
    """Training arguments for statistics and scoring only: no training, saving or reporting."""
    return dataclasses.replace(args, output_dir=str(output_dir), tasks=None, eval_strategy="no",
                               save_strategy="no", load_best_model_at_end=False,
                               report_to="none", disable_tqdm=True)  # fmt: skip


def group_statistics(model: torch.nn.Module, tasks: TaskSet, trainer_class: type, args: Any,
                     kinds: Sequence[str], max_examples: int,
                     exclude: Sequence[str] = ()) -> MergeStatistics:  # fmt: skip
    """Statistics ``kinds`` of one group model on the training rows of its tasks ``tasks``
    (batched by the family's trainer, in order), leaving out the ``exclude`` parameters."""
    from hf_tae.merging.trackers import compute_statistics

    trainer = trainer_class(model=model, args=args, task_set=tasks)
    loader = trainer.get_eval_dataloader(tasks.trainer_dataset("train"))
    return compute_statistics(model, loader, list(kinds), max_examples=max_examples,
                              exclude=list(exclude) or None,
                              log_likelihood_fn=_negative_loss)  # fmt: skip


def score_model(model: torch.nn.Module, tasks: TaskSet, trainer_class: type, args: Any,
                splits: Sequence[str]) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Per-task scores of ``model`` on each split, with the family's trainer
    (``evaluate_tasks``): ``{split: [{task, task_name, f1, accuracy, log_loss}, …]}``."""
    from transformers.trainer_callback import PrinterCallback

    trainer = trainer_class(model=model, args=args, task_set=tasks)
    trainer.remove_callback(PrinterCallback)  # no metric dicts printed
    out = {}
    for split in splits:
        metrics = trainer.evaluate_tasks(split)
        prefix = "eval" if split == "validation" else split
        out[split] = [
            {"task": int(t), "task_name": name,
             **{m: float(metrics[f"{prefix}_{name}_{m}"]) for m in METRICS}}
            for t, name in zip(tasks.task_ids, tasks.task_names, strict=True)
        ]  # fmt: skip
    return out


def merge_and_score(
    models: Sequence[str | os.PathLike],
    groups: Sequence[Sequence[int]],
    methods: Sequence[str],
    output_dir: str | os.PathLike,
    *,
    tasks: TaskSet,
    trainer_class: type,
    args: Any,
    load_model: Callable[[Path], torch.nn.Module],
    private: Sequence[str] = (),
    base: str | os.PathLike | None = None,
    max_examples: int = 1000,
    splits: Sequence[str] = ("test", "validation"),
) -> dict[str, dict[str, Any]]:
    """Merge the group models by every method into ``output_dir/<folder>/`` and score each
    merged model per task on ``splits``. A method is a name or ``name:key=value,...``
    (``--merge_methods``, :func:`~hf_tae.merging.registry.parse_method_choice`): its label
    (``ties density=0.2 lambda=0.8``) keys the result, its folder is the label with ``_`` for
    spaces (``average`` stays ``average/``).

    ``load_model(folder)`` loads a saved model (a group model for its statistics, a merged
    one for scoring). A merge whose output already records the same fingerprint (group models,
    base, method, options, statistics recipe) is kept, and its statistics are not recomputed.
    Returns ``{label: {"method", "parameters", "path", "seconds", "skipped", "private",
    "scores": {split: rows}}}``.
    """
    output_dir = Path(output_dir)
    run_args = _run_args(args, output_dir / ".scoring")
    stats_cache: dict[tuple[str, ...], list[MergeStatistics]] = {}
    out = {}
    for choice in parse_method_choices(methods):
        method, spec = choice.label, get_method(choice.method)
        params = spec.check_params(choice.params)
        needed = spec.statistics(params)
        unsupported = sorted(set(needed) - _KINDS)
        if unsupported:
            raise TaeError(
                f"merge method {method!r} needs statistics {unsupported}, which the pipeline "
                "stage does not compute; merge with hf_tae.merge(...) instead."
            )
        kinds = tuple(sorted(needed))
        if spec.needs_base(params) and base is None:
            raise TaeError(f"merge method {method!r} needs the group models' starting model.")
        target = output_dir / choice.folder
        recipe = {"kinds": kinds, "max_examples": max_examples, "fisher": "empirical, -loss",
                  "rows": "each group's training rows"}  # fmt: skip
        merge_base = base if spec.needs_base(params) else None
        stamp = fingerprint(choice.method, params, recipe, [list(map(int, g)) for g in groups],
                            list(private), tasks.num_all_tasks, [Path(m) for m in models],
                            None if merge_base is None else Path(merge_base))  # fmt: skip
        start = time.perf_counter()
        statistics = None
        if kinds and finished_fingerprint(target) != stamp:
            if kinds not in stats_cache:
                stats_cache[kinds] = [
                    group_statistics(load_model(Path(m)), tasks.select(list(g)), trainer_class,
                                     run_args, kinds, max_examples, private)
                    for m, g in zip(models, groups, strict=True)
                ]  # fmt: skip
            statistics = stats_cache[kinds]
        result = merge_group_models(
            models, groups, choice.method, target, num_tasks=tasks.num_all_tasks,
            private=private, base=merge_base, statistics=statistics, params=choice.params,
            merge_fingerprint=stamp,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        scores = score_model(load_model(target), tasks, trainer_class, run_args, splits)
        out[method] = {
            "method": choice.method,
            "parameters": params,
            "path": str(target),
            "seconds": round(seconds, 2),
            "skipped": result.skipped,
            "private": sum(1 for info in result.log.values() if info.get("fixed")),
            "scores": scores,
        }
    return out


def comparison_rows(merged: Mapping[str, Mapping[str, Any]], tasks: TaskSet,
                    split: str) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of :func:`~hf_tae.compare_group_training`'s table for the merged models of
    :func:`merge_and_score` on ``split``: strategy ``"merged (<label>)"``, one model for all
    tasks."""
    names = list(tasks.task_names)
    return [
        {"strategy": f"merged ({method})", "task": row["task"], "task_name": row["task_name"],
         "group": names, "group_size": len(names), **{m: row[m] for m in METRICS}}
        for method, info in merged.items()
        for row in info["scores"][split]
    ]  # fmt: skip


def save_start_model(model_init: Callable[[], torch.nn.Module], seed: int,
                     path: str | os.PathLike) -> Path:  # fmt: skip
    """Save the model every run of ``seed`` starts from (``set_seed(seed); model_init()``, as
    :class:`~hf_tae.SubsetFineTuner` builds it) once, atomically: the base of merges of runs
    trained from scratch."""
    from transformers import set_seed

    from hf_tae.utils.io import atomic_folder

    path = Path(path)
    if not path.is_dir():
        set_seed(seed)
        with atomic_folder(path) as folder:
            model_init().save_pretrained(str(folder))
    return path


def check_mergeable(model: torch.nn.Module) -> None:
    """Refuse group models the stage cannot merge, before any of them is trained: peft
    adapters (the instructions family's LoRA) need the adapters' own base model as θ0 and
    statistics hooked on the adapted layers, which the stage does not provide."""
    if hasattr(model, "peft_config"):
        raise TaeError(
            "--merge_methods merges full group models, but this family trains peft adapters "
            f"({type(model).__name__}); the merge stage does not merge adapters. Drop "
            "--merge_methods, or merge saved adapters with hf_tae.merge(base=<the adapters' "
            "base model>, models=[<adapter folders>], method) or `hf-tae merge` (README: "
            "Merging fine-tuned models, peft adapters)."
        )
