"""Task affinities read directly off the stored projected gradients at the meta-initialization,
without estimating subsets. Three, all normalized so that no task's scale dominates:

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

* **NTK overlap** (:func:`ntk_affinity`, the job's default): the same normalized inner
  product of the tasks' Gauss–Newton matrices ``G_t = (1/n_t) Σ_{e ∈ t} z_e z_eᵀ``, every row
  weighted alike. ``⟨G_i, G_j⟩ = Σ_{a ∈ i, b ∈ j} (z_a · z_b)² / (n_i n_j)``: the mean squared
  empirical neural tangent kernel between the two tasks' examples, i.e. how strongly a gradient
  step on one task's examples moves the other task's scores, in either direction. It reads
  neither labels nor how well θ0 fits a row; the Fisher's weights ``σ(−y s)²`` put a
  converged θ0's overlap on its few badly fitted rows, so its members disagree more (README:
  "Scenarios", session 14: agreement 0.54 → 0.71–0.90 on the text default, 0.16–0.31 →
  0.50–0.67 on the image default, and the planted skills recovered on 4 of 5 text draws
  instead of 2).

All cost one pass over the store (no subsets, no solves). ``benchmarks/scenarios.py`` and
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
    store: GradientStore, split: str = "train", label_kind: str | None = None,
    weighting: str = "empirical",
) -> tuple[np.ndarray, list[int]]:
    """Per task, the empirical Fisher ``(1/n_t) Σ σ(−y s)² z zᵀ`` of its ``split`` rows in the
    store's projected space (``[num_tasks, d, d]``; zeros for a task without rows) and the row
    count per task. ``weighting="uniform"`` drops the weights ``σ(−y s)²``: the Gauss–Newton
    matrix ``(1/n_t) Σ z zᵀ`` of the scores, which reads neither labels nor fit."""
    if weighting not in ("empirical", "uniform"):
        raise TaeError(f"weighting={weighting!r}; choose 'empirical' or 'uniform'.")
    blocks = _task_blocks(store, split, label_kind)
    fishers = np.zeros((len(blocks.blocks), store.dim, store.dim))
    for t, (z, y, s) in enumerate(blocks.blocks):
        if len(y):
            if weighting == "empirical":
                z_weighted = z * (torch.sigmoid(-y * s) ** 2)[:, None]  # (∂ loss / ∂ score)²
            else:
                z_weighted = z
            fishers[t] = (z_weighted.T @ z / len(y)).numpy()
    return fishers, blocks.counts


def _overlap(store: GradientStore, split: str, label_kind: str | None, weighting: str,
             zero_diagonal: bool, kind: str, what: str,
             provenance: Mapping[str, Any] | None) -> AffinityMatrix:  # fmt: skip
    """The normalized Frobenius inner products of the tasks' (weighted) second moments."""
    fishers, counts = task_fishers(store, split, label_kind, weighting)
    names = store.task_names or [str(t) for t in range(len(fishers))]
    unit = _unit_rows(fishers.reshape(len(fishers), -1), counts, names, split, what, store)
    values = unit @ unit.T
    if zero_diagonal:
        np.fill_diagonal(values, 0.0)
    info = {"metric": f"{what} overlap", "split": split, **(provenance or {})}
    counts_matrix = np.ones((len(names), len(names)), dtype=np.int64)
    return AffinityMatrix(values, names, kind, counts_matrix, provenance=info)


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
    return _overlap(store, split, label_kind, "empirical", zero_diagonal, "fisher", "Fisher",
                    provenance)


def ntk_affinity(
    store: GradientStore,
    split: str = "train",
    *,
    zero_diagonal: bool = True,
    provenance: Mapping[str, Any] | None = None,
) -> AffinityMatrix:
    """``T[i, j] = ⟨G_i, G_j⟩_F / (‖G_i‖_F ‖G_j‖_F)`` with ``G_t = (1/n_t) Σ z zᵀ`` over task
    t's ``split`` rows (symmetric, entries in [0, 1]).

    Equivalently ``‖K_ij‖²_F / (‖K_ii‖_F ‖K_jj‖_F)`` for the empirical NTK ``K_ab = z_a · z_b``
    between the tasks' examples (in the projected space, which preserves inner products): how
    much the tasks' examples move each other's scores under gradient descent from θ0. Labels
    and scores are not read. ``zero_diagonal`` sets ``T[i, i] = 0`` before clustering. A task
    without rows, or whose gradients are all zero, is an error naming it.
    """
    return _overlap(store, split, None, "uniform", zero_diagonal, "ntk", "NTK", provenance)


#: Affinity kinds read off the stored gradients (no subsets).
GRADIENT_KINDS = ("ntk", "fisher", "gradient-cosine")


def gradient_affinity(
    store: GradientStore,
    kind: str,
    scoring_split: str = "validation",
    provenance: Mapping[str, Any] | None = None,
) -> AffinityMatrix:
    """One store's affinity of ``kind`` as the job clusters it (symmetric, zero diagonal):
    ``ntk`` / ``fisher`` on the training rows, ``gradient-cosine`` between ``scoring_split``
    and training rows."""
    if kind == "ntk":
        return ntk_affinity(store, provenance=provenance)
    if kind == "fisher":
        return fisher_affinity(store, provenance=provenance)
    if kind == "gradient-cosine":
        return gradient_cosine_affinity(store, target_split=scoring_split, provenance=provenance)
    raise TaeError(f"affinity kind {kind!r} is not read off gradients; choose one of "
                   f"{list(GRADIENT_KINDS)}.")  # fmt: skip

