"""Checking a selection with real models: fine-tuning on chosen sources, and the first-order
(A.7) error of the estimate at its step size.

Real training reuses :class:`~hf_tae.evaluation.ground_truth.SubsetFineTuner` (resumable
``results.jsonl``, runs shared across processes under ``accelerate launch``). With task sources
a subset of sources is a subset of tasks (:func:`train_subsets`). Sources that group training
rows (a column, clusters) are trained on a view of the task set that keeps only their training
examples and every held-out one (:func:`source_task_set`), one fine-tuner folder per set of
training examples (:func:`train_source_subsets`); the target is scored from the same run.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from hf_tae.selection.estimate import SourceEstimator
    from hf_tae.selection.sources import Sources
    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments


def train_subsets(model_init: Callable[[], Any], task_set: TaskSet, target: str,
                  subsets: Sequence[Sequence[str]], args: MultitaskTrainingArguments,
                  output_dir: str | Path, seeds: Sequence[int] = (0,),
                  splits: Sequence[str] = ("validation", "test"),
                  show_progress: bool = True, trainer_class: type | None = None,
                  fingerprint: str | None = None) -> tuple[pd.DataFrame, float]:  # fmt: skip
    """Fine-tune on every subset of tasks (each must contain ``target``) and score the target.

    ``trainer_class``: the Trainer of every run (the family's; default MultitaskTrainer);
    ``fingerprint``: what ``model_init`` starts from (see :class:`~hf_tae.SubsetFineTuner`).

    Returns one row per (subset, split), the metrics averaged over ``seeds`` (columns
    ``subset`` (sorted task names), ``split``, ``f1``, ``accuracy``, ``log_loss``), and the
    mean seconds of one training run. Finished runs in ``output_dir`` are reused, not
    retrained (resumable); the time of every run trained so far is kept in
    ``output_dir/timing.json``, so a resumed call still reports the cost of a run.
    """
    import json

    import pandas as pd

    from hf_tae.evaluation.ground_truth import SubsetFineTuner, average_seeds
    from hf_tae.utils.io import atomic_write_text

    names = task_set.task_names
    canon = [sorted(set(s), key=names.index) for s in subsets]
    missing = [s for s in canon if target not in s]
    if missing:
        raise TaeError(f"subsets {missing[:3]} leave out the target {target!r}; add it.")
    tuner = SubsetFineTuner(
        model_init, task_set, args, output_dir, seeds=seeds, trainer_class=trainer_class,
        fingerprint=fingerprint,
    )
    before = len(tuner.load_records())
    start = time.perf_counter()
    parts = []
    for i, split in enumerate(splits):
        table = tuner.run(canon, split=split, show_progress=show_progress,
                          extra_splits=list(splits[i + 1 :]))  # fmt: skip
        table = average_seeds(table)
        table = table[table["task_name"] == target]
        parts.append(pd.DataFrame({
            "subset": [[names[t] for t in s] for s in table["subset"]],
            "split": split, **{m: table[m].to_numpy() for m in METRICS},
        }))  # fmt: skip
    seconds = time.perf_counter() - start
    runs = (len(tuner.load_records()) - before) // len(splits)
    timing_path = Path(output_dir) / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {"seconds": 0.0,
                                                                                "runs": 0}  # fmt: skip
    if runs:
        timing = {"seconds": timing["seconds"] + seconds, "runs": timing["runs"] + runs}
        atomic_write_text(timing_path, json.dumps(timing))
    per_run = timing["seconds"] / timing["runs"] if timing["runs"] else math.nan
    return pd.concat(parts, ignore_index=True), per_run


def source_task_set(task_set: TaskSet, sources: Sources, train_rows: Mapping[str, np.ndarray],
                    subset: Sequence[int | str], target: str) -> TaskSet:  # fmt: skip
    """The task set of one real run on row sources: the training examples of the sources in
    ``subset`` and every validation and test example, restricted to the target and the tasks
    with kept training examples.

    ``train_rows`` holds ``example_id`` and ``task`` of the gradient store's training rows, in
    the order of ``sources.ids``; training examples outside the store have no source and are
    not trained on.
    """
    keep = np.isin(sources.ids, sources.resolve(list(subset)))
    rows = np.asarray(train_rows["example_id"])[keep]
    tasks = np.asarray(train_rows["task"])[keep]
    view = task_set.keep_train_examples(rows, tasks)
    return view.select(sorted({*tasks.tolist(), int(task_set.resolve([target])[0])}))


def train_source_subsets(model_init: Callable[[], Any], task_set: TaskSet, sources: Sources,
                         train_rows: Mapping[str, np.ndarray], target: str,
                         subsets: Sequence[Sequence[int | str]], args: MultitaskTrainingArguments,
                         output_dir: str | Path, seeds: Sequence[int] = (0,),
                         splits: Sequence[str] = ("validation", "test"),
                         show_progress: bool = True, trainer_class: type | None = None,
                         fingerprint: str | None = None) -> tuple[pd.DataFrame, float]:  # fmt: skip
    """:func:`train_subsets` for sources that group training rows: fine-tune on the training
    examples of each subset of sources (:func:`source_task_set`) and score the target.

    Each subset trains in ``output_dir/<key>``, the key a hash of the (row, task) training
    examples, so a rerun reuses its finished runs and another grouping of the rows (a new
    clustering) never does. Returns the table of :func:`train_subsets` with ``subset`` the
    source names sorted by id, and the mean seconds of one run.
    """
    import pandas as pd

    parts, seconds = [], []
    for subset in subsets:
        ids = sorted(set(sources.resolve(list(subset))))
        view = source_task_set(task_set, sources, train_rows, ids, target)
        table, per_run = train_subsets(model_init, view, target, [view.task_names], args,
                                       Path(output_dir) / _examples_key(view), seeds, splits,
                                       show_progress, trainer_class, fingerprint)  # fmt: skip
        table["subset"] = [[sources.names[s] for s in ids]] * len(table)
        parts.append(table)
        seconds.append(per_run)
    finite = [s for s in seconds if math.isfinite(s)]
    return pd.concat(parts, ignore_index=True), (float(np.mean(finite)) if finite else math.nan)


def _examples_key(task_set: TaskSet) -> str:
    """A folder name for the training examples of ``task_set`` (a hash of their rows, tasks)."""
    ex = task_set.examples("train")
    pairs = np.stack([ex["example_id"], ex["task"]]).astype(np.int64)
    return "rows-" + hashlib.sha1(pairs.tobytes()).hexdigest()[:16]


def first_order_error(model: nn.Module, estimator: SourceEstimator, w: torch.Tensor,
                      task_set: TaskSet, score_fn=None, exclude: Sequence[str] | None = None,
                      collate_fn=None, max_examples: int | None = 512) -> dict[str, float]:  # fmt: skip
    """The A.7 error of the linearization along one estimate ``Δθ = P w`` at its own norm.

    ``model`` is θ0 (the model the gradients were collected at; restored exactly), ``w`` one
    row of :meth:`SourceEstimator.fit`, ``task_set`` the tasks (the target's validation
    examples are used), ``exclude`` the parameter patterns left out of the gradients. Returns
    ``norm``, ``fraction`` (of ‖θ0‖), ``first_order_error`` and ``zeroth_order_error``
    (:func:`~hf_tae.evaluation.first_order.first_order_check`).
    """
    import torch

    from hf_tae.evaluation.first_order import first_order_check

    delta = estimator.estimator.lift(torch.as_tensor(w).reshape(-1))
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    if norm == 0:
        raise TaeError("the estimate's Δθ is 0; there is no step to check.")
    params = dict(model.named_parameters())
    theta = {n: p.detach() + delta[n].to(p) if n in delta else p.detach()
             for n, p in params.items()}  # fmt: skip
    table = first_order_check(model, theta, task_set.select([estimator.target_name]),
                              score_fn=score_fn, norms=[norm], exclude=exclude or None,
                              collate_fn=collate_fn, max_examples=max_examples)  # fmt: skip
    row = table.iloc[0]
    return {k: float(row[k]) for k in ("norm", "fraction", "first_order_error",
                                        "zeroth_order_error")}  # fmt: skip


def representation_similarity(model: nn.Module, task_set: TaskSet, module: str,
                              example_ids: np.ndarray, source_ids: np.ndarray, num_sources: int,
                              target_ids: np.ndarray, collate_fn=None,
                              batch_size: int = 512) -> np.ndarray:  # fmt: skip
    """Cosine of each source's mean hidden representation with the target's ``[num_sources]``.

    The representation of a dataset row is the input of ``module`` (e.g. the output head:
    the features every task reads), captured by a forward hook in eval mode. ``example_ids`` /
    ``source_ids`` are the store's training rows and their sources, ``target_ids`` the target
    rows (e.g. its validation rows). Representations say nothing about labels, which is why
    the baseline cannot tell a mislabelled copy of the target's data from the real thing.
    """
    import torch

    from hf_tae.tasks.batching import default_collate

    modules = dict(model.named_modules())
    if module not in modules:
        raise TaeError(f"the model has no module {module!r}; pick one of {list(modules)[:12]}…")
    rows = np.unique(np.concatenate([example_ids, target_ids]))
    captured: list[torch.Tensor] = []
    hook = modules[module].register_forward_hook(
        lambda _m, args, _out: captured.append(args[0].detach().flatten(1).double().cpu())
    )
    collate = collate_fn or default_collate
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                inputs = collate(task_set, rows[start : start + batch_size])
                model(**{k: v.to(device) for k, v in inputs.items()})
    finally:
        hook.remove()
        model.train(was_training)
    features = torch.cat(captured).numpy()
    position = {int(r): i for i, r in enumerate(rows)}
    target = features[[position[int(r)] for r in target_ids]].mean(0)
    out = np.full(num_sources, np.nan)
    for s in range(num_sources):
        members = example_ids[source_ids == s]
        if len(members):
            mean = features[[position[int(r)] for r in members]].mean(0)
            out[s] = float(mean @ target / (np.linalg.norm(mean) * np.linalg.norm(target)))
    return out


def estimated_vs_real(estimated: pd.DataFrame, real: pd.DataFrame, metric: str) -> dict[str, Any]:
    """Agreement of estimated and real target metrics on the same subsets (same split):
    mean absolute error, mean relative error, Spearman and Pearson correlations (NaN when
    either side is constant)."""
    from hf_tae.estimation.compare import correlations

    key = [tuple(s) for s in estimated["subset"]]
    truth = {tuple(s): v for s, v in zip(real["subset"], real[metric], strict=True)}
    pairs = np.asarray([(e, truth[k]) for k, e in zip(key, estimated[metric], strict=True)
                        if k in truth], dtype=np.float64)  # fmt: skip
    if len(pairs) < 3:
        raise TaeError(f"only {len(pairs)} subsets have both an estimate and a real run; need 3.")
    est, true = pairs[:, 0], pairs[:, 1]
    return {
        "num_subsets": len(pairs),
        "metric": metric,
        "mean_abs_error": float(np.mean(np.abs(est - true))),
        "mean_rel_error": float(np.mean(np.abs(est - true) / np.maximum(np.abs(true), 1e-12))),
        **correlations(est, true),
    }
