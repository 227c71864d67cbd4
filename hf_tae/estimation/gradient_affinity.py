"""Task affinities read directly off the stored projected gradients at the meta-initialization,
without estimating subsets. Two, both normalized so that no task's scale dominates:

* **gradient cosine** (:func:`gradient_cosine_affinity`): the cosine between task j's
  training-loss gradient and task i's validation-loss gradient. The estimator fits ``w_S`` by a
  logistic regression started at ``w = 0``, where its descent direction is the summed negative
  loss gradient of the subset's rows, ``g_t = Σ_{e ∈ t} y_e σ(−y_e s_e) z_e`` per task t
  (``s_e`` the score at θ0, ``z_e`` its projected gradient, ``y_e = ±1``). Under strong ridge
  (λ → ∞) task i's validation loss changes by ``−g_iᵛ · g_j / λ`` per member j: inner products
  whose scale is each source's gradient norm. ``T[i, j] = cos(g_iᵛᵃˡ, g_jᵗʳᵃⁱⁿ)`` keeps the
  direction, the first-order test of lookahead affinity methods (TAG, Fifty et al., NeurIPS
  2021). At a converged θ0 the summed gradients are small residuals, so it is noisy.
* **Fisher overlap** (:func:`fisher_affinity`): the normalized Frobenius inner product of the
  tasks' empirical Fisher matrices in the projected space,
  ``F_t = (1/n_t) Σ_{e ∈ t} σ(−y_e s_e)² z_e z_eᵀ`` and ``T[i, j] = ⟨F_i, F_j⟩ / (‖F_i‖ ‖F_j‖)``:
  how much the directions of parameter space that each task's loss is sensitive to overlap.
  It uses every example's gradient, not their sum, so it does not cancel at convergence;
  the idea of comparing tasks by their Fisher is Task2Vec's (Achille et al., ICCV 2019) and
  the task subspaces of merging (MaTS, Tam et al., TMLR 2024).

Both cost one pass over the store (no subsets, no solves). ``benchmarks/scenarios.py`` and
``benchmarks/estimator_settings.py`` compare them with the higher-order estimate (README:
"Scenarios").
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


def _task_blocks(store: GradientStore, split: str, label_kind: str | None) -> _TaskRows:
    """The store's ``split`` rows per task as float64 ``(Z_t, y_t ∈ ±1, s_t)`` on the CPU."""
    if split not in store.splits:
        raise TaeError(
            f"the gradient store at {store.path} has no {split!r} rows (it holds {store.splits}); "
            "collect gradients for that split or pass another one."
        )
    names = store.task_names
    rows = store.tensors(split)
    num_tasks = len(names) if names is not None else int(rows["task"].max()) + 1
    return _TaskRows(rows, num_tasks, torch.device("cpu"), torch.float64,
                     store_label_kind(store, label_kind))  # fmt: skip


def _unit_rows(vectors: np.ndarray, counts: list[int], names: list[str], split: str,
               what: str, store: GradientStore) -> np.ndarray:  # fmt: skip
    """``vectors`` (one per task) scaled to unit norm; a task without ``split`` rows or with a
    zero vector has no direction, and that is an error naming it."""
    norms = np.linalg.norm(vectors, axis=1)
    bad = [names[t] for t in range(len(names)) if counts[t] == 0 or norms[t] == 0]
    if bad:
        raise TaeError(
            f"tasks {bad[:5]} have no {split} rows or a zero {what} in the store at "
            f"{store.path}; collect their {split} rows, or drop them from the task set."
        )
    return vectors / norms[:, None]


def task_loss_gradients(
    store: GradientStore, split: str, label_kind: str | None = None
) -> tuple[np.ndarray, list[int]]:
    """Per task, the summed negative logistic-loss gradient ``Σ y σ(−y s) z`` of its ``split``
    rows in the store's projected space (``[num_tasks, d]``), and the row count per task."""
    blocks = _task_blocks(store, split, label_kind)
    gradients = np.zeros((len(blocks.blocks), store.dim))
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
    source = _unit_rows(source, source_counts, names, source_split, "loss gradient", store)
    target = _unit_rows(target, target_counts, names, target_split, "loss gradient", store)
    values = target @ source.T
    if symmetrize:
        values = (values + values.T) / 2
    if zero_diagonal:
        np.fill_diagonal(values, 0.0)
    info = {"metric": "gradient cosine", "source_split": source_split,
            "target_split": target_split, **(provenance or {})}  # fmt: skip
    counts = np.ones((len(names), len(names)), dtype=np.int64)
    return AffinityMatrix(values, names, "gradient-cosine", counts, provenance=info)


def task_fishers(
    store: GradientStore, split: str = "train", label_kind: str | None = None
) -> tuple[np.ndarray, list[int]]:
    """Per task, the empirical Fisher ``(1/n_t) Σ σ(−y s)² z zᵀ`` of its ``split`` rows in the
    store's projected space (``[num_tasks, d, d]``; zeros for a task without rows) and the row
    count per task."""
    blocks = _task_blocks(store, split, label_kind)
    fishers = np.zeros((len(blocks.blocks), store.dim, store.dim))
    for t, (z, y, s) in enumerate(blocks.blocks):
        if len(y):
            weight = torch.sigmoid(-y * s) ** 2  # (∂ loss / ∂ score)²
            fishers[t] = ((z * weight[:, None]).T @ z / len(y)).numpy()
    return fishers, blocks.counts


def fisher_affinity(
    store: GradientStore,
    split: str = "train",
    *,
    zero_diagonal: bool = True,
    label_kind: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> AffinityMatrix:
    """``T[i, j] = ⟨F_i, F_j⟩_F / (‖F_i‖_F ‖F_j‖_F)`` over the store's tasks (symmetric).

    ``F_t`` is task t's empirical Fisher on ``split`` rows (:func:`task_fishers`); entries lie
    in [0, 1] because Fisher matrices are positive semi-definite. ``zero_diagonal`` sets
    ``T[i, i] = 0`` before clustering. A task without rows, or whose Fisher is zero, is an
    error naming it.
    """
    fishers, counts = task_fishers(store, split, label_kind)
    names = store.task_names or [str(t) for t in range(len(fishers))]
    unit = _unit_rows(fishers.reshape(len(fishers), -1), counts, names, split, "Fisher", store)
    values = unit @ unit.T
    if zero_diagonal:
        np.fill_diagonal(values, 0.0)
    info = {"metric": "Fisher overlap", "split": split, **(provenance or {})}
    counts_matrix = np.ones((len(names), len(names)), dtype=np.int64)
    return AffinityMatrix(values, names, "fisher", counts_matrix, provenance=info)
