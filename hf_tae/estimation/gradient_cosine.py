"""A first-order task affinity: the cosine between task j's training-loss gradient and task i's
validation-loss gradient at the meta-initialization, from the stored projected gradients.

The estimator fits ``w_S`` by a logistic regression started at ``w = 0``, where its descent
direction is the summed negative loss gradient of the subset's rows,
``g_t = Σ_{e ∈ t} y_e σ(−y_e s_e) z_e`` per task t (``s_e`` the score at θ0, ``z_e`` its projected
gradient, ``y_e = ±1``). Under strong ridge (λ → ∞) the estimate moves along ``Σ_{j ∈ S} g_j / λ``
and task i's validation loss changes by ``−g_iᵛ · g_j / λ`` per member j: the higher-order
affinity then reduces to inner products whose scale is each source task's gradient norm, so a
task with many positive rows or a large residual looks helpful to every other task. This
affinity keeps the direction and drops the scale::

    T[i, j] = cos(g_iᵛᵃˡ, g_jᵗʳᵃⁱⁿ)

the first-order "does a step on j lower i's held-out loss" test of lookahead affinity methods
(TAG, Fifty et al., NeurIPS 2021), computed without any lookahead step because the gradients are
already stored. It costs one pass over the store (no subsets, no solves). ``benchmarks/
scenarios.py`` compares it with the higher-order estimate on task structures the defaults were
not tuned on (README: "Scenarios").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hf_tae.errors import TaeError
from hf_tae.estimation.affinity import AffinityMatrix
from hf_tae.estimation.regression import _TaskRows, store_label_kind

if TYPE_CHECKING:
    from hf_tae.gradients.store import GradientStore


def task_loss_gradients(
    store: GradientStore, split: str, label_kind: str | None = None
) -> tuple[np.ndarray, list[int]]:
    """Per task, the summed negative logistic-loss gradient ``Σ y σ(−y s) z`` of its ``split``
    rows in the store's projected space (``[num_tasks, d]``), and the row count per task."""
    if split not in store.splits:
        raise TaeError(
            f"the gradient store at {store.path} has no {split!r} rows (it holds {store.splits}); "
            "collect gradients for that split or pass another one."
        )
    names = store.task_names
    rows = store.tensors(split)
    num_tasks = len(names) if names is not None else int(rows["task"].max()) + 1
    blocks = _TaskRows(rows, num_tasks, torch.device("cpu"), torch.float64,
                       store_label_kind(store, label_kind))  # fmt: skip
    gradients = np.zeros((num_tasks, store.dim))
    for t, (z, y, s) in enumerate(blocks.blocks):
        if len(y):
            gradients[t] = ((y * torch.sigmoid(-y * s))[:, None] * z).sum(0).numpy()
    return gradients, blocks.counts


def gradient_cosine_affinity(
    store: GradientStore,
    source_split: str = "train",
    target_split: str = "validation",
    *,
    symmetrize: bool = True,
    zero_diagonal: bool = True,
    label_kind: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> AffinityMatrix:
    """``T[i, j] = cos(g_i on target_split, g_j on source_split)`` over the store's tasks.

    ``symmetrize`` averages ``(T + Tᵀ)/2`` and ``zero_diagonal`` sets ``T[i, i] = 0``, as the
    higher-order affinity does before clustering. A task without rows in either split, or
    whose gradient is exactly zero (a score that does not depend on the tracked parameters),
    has no direction: that is an error naming it.
    """
    source, source_counts = task_loss_gradients(store, source_split, label_kind)
    target, target_counts = task_loss_gradients(store, target_split, label_kind)
    names = store.task_names or [str(t) for t in range(len(source))]
    for split, grads, counts in ((source_split, source, source_counts),
                                 (target_split, target, target_counts)):  # fmt: skip
        norms = np.linalg.norm(grads, axis=1)
        bad = [names[t] for t in range(len(names)) if counts[t] == 0 or norms[t] == 0]
        if bad:
            raise TaeError(
                f"tasks {bad[:5]} have no {split} rows or a zero loss gradient in the store at "
                f"{store.path}; collect their {split} rows, or drop them from the task set."
            )
    unit = lambda g: g / np.linalg.norm(g, axis=1, keepdims=True)  # noqa: E731
    values = unit(target) @ unit(source).T
    if symmetrize:
        values = (values + values.T) / 2
    if zero_diagonal:
        np.fill_diagonal(values, 0.0)
    info = {"metric": "gradient cosine", "source_split": source_split,
            "target_split": target_split, **(provenance or {})}  # fmt: skip
    counts = np.ones((len(names), len(names)), dtype=np.int64)
    return AffinityMatrix(values, names, "gradient-cosine", counts, provenance=info)
