"""Score the estimated models ``θ_S = θ0 + P w_S`` with a real forward pass (Grad-TAE).

:meth:`RegressionEstimator.evaluate <hf_tae.RegressionEstimator.evaluate>` scores the
*linearized* model ``s_e(θ0) + z_e·w_S`` from the gradient store alone. The Grad-TAE
reference code (Li et al., KDD 2024) instead lifts ``w_S`` to parameter space and evaluates the
network there (``Δθ = P w``, ``θ_S = θ0 + Δθ``, evaluated directly, with no training). The two
agree when the model is linear in its parameters along ``Δθ``; how far they differ otherwise
is Grad-TAE's first-order error (see :mod:`hf_tae.evaluation.first_order`).

:func:`evaluate_lifted` does this lift-and-evaluate for many subsets: for each S it applies
``Δθ = estimator.lift(w_S)`` with :func:`~hf_tae.estimation.regression.apply_delta` (θ0 is put
back bit for bit afterwards), runs the model in eval mode without gradients on the
``split`` examples of the tasks in S, and returns the table of ``evaluate`` with the same
columns and metric definitions (F1 and accuracy with "logit > 0", log-loss
``mean softplus(−y·logit)`` with ``y = ±1``). ``exclude`` leaves matching parameters at θ0,
as Grad-TAE's graph code does with its head (``project.*``; ``"head"`` for SIGN), although
its features include the head's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import RESULT_COLUMNS
from hf_tae.evaluation.first_order import Collate, _batches, default_score
from hf_tae.utils.progress import tqdm

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from hf_tae.estimation.regression import RegressionEstimator
    from hf_tae.models.scores import ScoreFunction
    from hf_tae.tasks.taskset import TaskSet

COLUMNS = RESULT_COLUMNS


def _excluded(names: Sequence[str], exclude: str | Sequence[str] | None) -> set[str]:
    """Names matching any ``exclude`` pattern (substring or regex, as parameter selection)."""
    from hf_tae.utils.patterns import compile_patterns, matches_any

    patterns = compile_patterns("exclude", exclude)
    return {n for n in names if patterns and matches_any(n, patterns)}


def _metrics(logits: np.ndarray, labels: np.ndarray, gold: bool = False) -> dict[str, float]:
    """F1 (positive when logit > 0; 0 without true positives), accuracy and mean
    ``softplus(−y·logit)``: the definitions of ``RegressionEstimator.evaluate``. ``gold``: the
    logit is a gold answer's log-odds, every target is positive and F1 is NaN."""
    pos = np.ones(len(labels), dtype=bool) if gold else labels > 0
    pred = logits > 0
    tp = float(np.sum(pos & pred))
    fp = float(np.sum(~pos & pred))
    fn = float(np.sum(pos & ~pred))
    y = np.where(pos, 1.0, -1.0)
    margin = torch.as_tensor(-y * logits, dtype=torch.float64)
    return {
        "f1": float("nan") if gold else 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0,
        "accuracy": float(np.mean(pos == pred)),
        "log_loss": float(F.softplus(margin).mean()),
    }


def evaluate_lifted(
    estimator: RegressionEstimator,
    model: nn.Module,
    task_set: TaskSet,
    subsets: Sequence[Sequence[int | str]],
    w: torch.Tensor,
    split: str = "validation",
    batch_size: int = 1024,
    exclude: str | Sequence[str] | None = None,
    score_fn: ScoreFunction | None = None,
    collate_fn: Collate | None = None,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Per-(subset, task) scores of the real model at ``θ0 + P w_S`` (as Grad-TAE evaluates).

    Args:
        estimator: the estimator that fitted ``w`` (its store's projector lifts ``w``).
        model: θ0, the model the gradients were collected at; restored exactly on return.
        task_set: where the ``split`` examples come from; its tasks must be the store's.
        subsets: as given to ``estimator.fit`` (task ids or names).
        w: ``[len(subsets), d]``, e.g. ``estimator.fit(subsets)``.
        split: the examples scored (``validation`` or ``test``, or ``train``).
        batch_size: examples per forward pass.
        exclude: parameter-name patterns whose ``Δθ`` is dropped (left at θ0); Grad-TAE's
            graph code leaves the head at θ0 (``exclude="head"`` for SIGN).
        score_fn: the logit scored (default: the store's recorded score when it is
            :class:`~hf_tae.models.scores.TaskLogitScore`, the logit of each example's own task,
            else ``TaskLogitScore()`` for models with ``config.num_tasks``).
        collate_fn: ``(task_set, rows) -> model inputs`` (default: the input columns).
        show_progress: a tqdm bar over subsets.

    Returns the columns of ``RegressionEstimator.evaluate`` (targets = the tasks of S):
    ``subset_id``, ``subset``, ``task``, ``task_name``, ``num_rows``, ``f1``, ``accuracy``,
    ``log_loss``, sorted by subset then task.
    """
    import pandas as pd

    from hf_tae.estimation.regression import apply_delta

    if batch_size < 1:
        raise TaeError(f"batch_size must be >= 1, got {batch_size}.")
    if list(task_set.all_task_names) != list(estimator.task_names):
        raise TaeError(
            f"the task set's tasks {list(task_set.all_task_names)[:5]}... differ from the "
            f"gradient store's {list(estimator.task_names)[:5]}...; pass the task set the "
            "gradients were collected on."
        )
    canon = estimator.canonical(subsets)
    w = torch.as_tensor(w)
    if w.ndim != 2 or tuple(w.shape) != (len(canon), estimator.store.dim):
        raise TaeError(
            f"w has shape {tuple(w.shape)}; evaluate_lifted needs [{len(canon)}, "
            f"{estimator.store.dim}] (one row of estimator.fit(subsets) per subset)."
        )
    if score_fn is None:  # the score the store's gradients were collected with
        recorded = estimator.store.metadata.get("score_function") or {}
        if recorded.get("name") == "task_logit":
            from hf_tae.models.scores import TaskLogitScore

            score_fn = TaskLogitScore(clamp=recorded.get("clamp"))
        elif recorded.get("name") == "gold_log_odds":
            from hf_tae.models.scores import GoldLogOddsScore

            score_fn = GoldLogOddsScore(recorded.get("label_key", "labels"), recorded.get("clamp"))
    score_fn = default_score(model, score_fn)
    ex = task_set.examples(split)
    order = np.argsort(ex["task"], kind="stable")
    ex = {k: v[order] for k, v in ex.items()}
    bounds = np.searchsorted(ex["task"], np.arange(task_set.num_all_tasks + 1))
    needed = sorted({t for s in canon for t in s})
    empty = [estimator.task_names[t] for t in needed if bounds[t + 1] == bounds[t]]
    if empty:
        raise TaeError(
            f"task(s) {empty} have no {split!r} examples in the task set to score; select them "
            "in the task set, score another split, or drop the subsets that contain them."
        )
    device = next(model.parameters()).device
    gold = estimator.label_kind == "gold"
    columns: dict[str, list] = {k: [] for k in COLUMNS}
    was_training = model.training
    model.eval()
    try:
        for b, subset in enumerate(
            tqdm(canon, desc="scoring lifted models", unit="subset", disable=not show_progress)
        ):
            delta = estimator.lift(w[b])
            dropped = _excluded(list(delta), exclude)
            delta = {n: d for n, d in delta.items() if n not in dropped}
            rows = np.concatenate([np.arange(bounds[t], bounds[t + 1]) for t in subset])
            mine = {k: v[rows] for k, v in ex.items()}
            parts = []
            with apply_delta(model, delta), torch.no_grad():
                for inputs, meta in _batches(task_set, mine, batch_size, collate_fn, device):
                    scores = score_fn(model(**inputs), {**inputs, **meta})
                    parts.append(scores.detach().double().cpu().numpy())
            logits = np.concatenate(parts)
            for t in subset:
                sel = mine["task"] == t
                columns["subset_id"].append(b)
                columns["subset"].append(list(subset))
                columns["task"].append(t)
                columns["task_name"].append(estimator.task_names[t])
                columns["num_rows"].append(int(sel.sum()))
                for key, value in _metrics(logits[sel], mine["label"][sel], gold).items():
                    columns[key].append(value)
    finally:
        model.train(was_training)
    table = pd.DataFrame(columns, columns=list(COLUMNS))
    return table.sort_values(["subset_id", "task"], ignore_index=True)
