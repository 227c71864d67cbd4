"""Partitions of tasks: input checks, the objective, the result type and the SDP roundings.

Every clustering method in :mod:`hf_tae.clustering` returns a :class:`Grouping` scored with
:func:`partition_objective`, the average-density objective of Grad-TAE's SDP clustering (Li
et al., KDD 2024). The two roundings turn a relaxed SDP solution X into labels:

* :func:`threshold_rounding`: the threshold-and-scan of the Grad-TAE reference code, kept
  faithful, so it may produce a number of groups other than k;
* :func:`kmeans_rounding`: k-means on the top-k eigenvectors of X, always exactly k non-empty
  groups (a robust rounding in place of the reference's).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from hf_tae.errors import TaeError

if TYPE_CHECKING:
    from hf_tae.clustering.sdp import SdpSolution

#: Relative tolerance of the symmetry check on T.
SYMMETRY_RTOL = 1e-8


def check_affinity(
    T: np.ndarray,
    k: int | None = None,
    *,
    require_symmetric: bool = False,
    symmetrize: bool = False,
    name: str = "T",
) -> np.ndarray:
    """Return T as a float64 n × n array, or raise :class:`TaeError` naming the problem and fix.

    Checks: 2-D, square, finite, ``1 <= k <= n`` (the reference code asks for k = 20 groups of
    10 tasks, which is infeasible because tr X = k cannot exceed n), and, when
    ``require_symmetric``, symmetry. ``symmetrize=True`` returns ``(T + Tᵀ)/2`` instead.
    """
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2:
        raise TaeError(
            f"{name} has {T.ndim} dimension(s) (shape {T.shape}); pass a 2-D n × n matrix."
        )
    if T.shape[0] != T.shape[1]:
        raise TaeError(f"{name} has shape {T.shape}; pass a square n × n task-affinity matrix.")
    if T.shape[0] == 0:
        raise TaeError(f"{name} is empty; pass at least one task.")
    if not np.isfinite(T).all():
        bad = np.argwhere(~np.isfinite(T))[0]
        raise TaeError(
            f"{name} has non-finite entries (first at {tuple(int(i) for i in bad)}); fill or "
            "drop tasks whose affinities are NaN/inf (e.g. subsets that never covered a pair)."
        )
    n = T.shape[0]
    if k is not None and not 1 <= int(k) <= n:
        raise TaeError(
            f"k={k} groups is impossible for n={n} tasks; pick 1 <= k <= {n} (the SDP needs "
            "tr X = k <= n)."
        )
    if symmetrize:
        return (T + T.T) / 2
    if require_symmetric and not np.allclose(T, T.T, rtol=SYMMETRY_RTOL, atol=1e-12):
        i, j = np.unravel_index(np.argmax(np.abs(T - T.T)), T.shape)
        raise TaeError(
            f"{name} is not symmetric ({name}[{i}, {j}]={T[i, j]:.6g} but {name}[{j}, {i}]="
            f"{T[j, i]:.6g}); pass symmetrize=True to cluster (T + Tᵀ)/2."
        )
    return T


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber group ids 0, 1, 2, … in order of first appearance, so equal partitions compare
    equal as arrays."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def groups_from_labels(labels: np.ndarray) -> list[list[int]]:
    """Task indices of each group, for canonical labels 0 … g−1."""
    return [np.flatnonzero(labels == g).tolist() for g in range(int(labels.max()) + 1)]


def partition_objective(T: np.ndarray, labels: np.ndarray) -> float:
    """Average within-group density Σ_c v_cᵀ T v_c / |C_c| (Grad-TAE's objective).

    ``v_c`` is the 0/1 indicator of group c and ``labels[i]`` the group id of task i (any ints).
    """
    T = check_affinity(T)
    labels = np.asarray(labels)
    if labels.shape != (T.shape[0],):
        raise TaeError(f"labels has shape {labels.shape}; T needs one label per task, ({len(T)},).")
    canon = canonical_labels(labels)
    V = np.eye(canon.max() + 1)[canon]  # n × g one-hot
    return float((np.einsum("ig,ij,jg->g", V, T, V) / V.sum(axis=0)).sum())


def fill_empty_groups(labels: np.ndarray, k: int, points: np.ndarray) -> np.ndarray:
    """Make ``labels`` have exactly k non-empty groups, deterministically.

    While fewer than k groups are used, the member of the largest group (lowest id on ties)
    farthest from that group's mean point (lowest index on ties) moves to a new group. Needed
    when k-means on duplicate points (e.g. X = 11ᵀ/n) returns empty clusters.
    """
    labels = canonical_labels(labels)
    while labels.max() + 1 < k:
        sizes = np.bincount(labels)
        largest = int(np.argmax(sizes))
        members = np.flatnonzero(labels == largest)
        dist = np.linalg.norm(points[members] - points[members].mean(axis=0), axis=1)
        labels[members[int(np.argmax(dist))]] = labels.max() + 1
    return canonical_labels(labels)


def kmeans_labels(points: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Lloyd's k-means (10 restarts, ``random_state=seed``) with exactly k non-empty groups."""
    with warnings.catch_warnings():  # duplicate points: fewer clusters, fixed just below
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed, algorithm="lloyd").fit_predict(
            points
        )
    return fill_empty_groups(raw, k, points)


def threshold_rounding(X: np.ndarray, c: float = 1.0) -> np.ndarray:
    """The threshold-and-scan rounding of the Grad-TAE reference code, faithfully.

    1. B = X > c/n (the code uses c = 1; the poster suggests c > 1);
    2. scan rows i in order: every still-unassigned j ≥ i with B[i, j] joins a new group, and
       i joins it too if i is still unassigned;
    3. the number of groups is not forced to k: singletons, and groups split away from
       an already-assigned i, are possible. Use :func:`kmeans_rounding` for exactly k groups.
    """
    X = check_affinity(X, name="X")
    n = X.shape[0]
    B = X > c / n
    labels = np.full(n, -1, dtype=np.int64)
    next_group = 0
    for i in range(n):
        members = [j for j in range(i, n) if B[i, j] and labels[j] < 0]
        if labels[i] < 0 and i not in members:
            members.insert(0, i)
        if members:
            labels[members] = next_group
            next_group += 1
    return canonical_labels(labels)


def kmeans_rounding(X: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Exactly k non-empty groups from X: k-means on the rows of its top-k eigenvectors.

    For an exact solution X = Σ_c v_c v_cᵀ/|C_c| the top-k eigenvectors are constant on
    each group, so k-means recovers the groups; near-optimal X perturbs them only slightly.
    Rows are scaled by √λ (clipped at 0) so the embedding's Gram matrix is the best rank-k
    approximation of X. Degenerate X (identity, all-equal) can leave k-means with empty
    clusters; :func:`fill_empty_groups` then splits groups deterministically.
    """
    X = check_affinity(X, k, symmetrize=True, name="X")
    eigvals, eigvecs = np.linalg.eigh(X)  # ascending
    top = slice(len(eigvals) - k, None)
    points = eigvecs[:, top] * np.sqrt(np.clip(eigvals[top], 0.0, None))
    return kmeans_labels(points, k, seed)


@dataclass
class Grouping:
    """A partition of n tasks into groups, as every clustering method returns it.

    ``labels[i]`` is the group of task i (canonical: numbered by first appearance) and
    ``groups`` the task indices per group; ``objective`` is :func:`partition_objective` on the
    (possibly symmetrized, never exp-transformed) input T; ``k`` is the requested number of
    groups, :attr:`n_groups` the number found (they differ only for threshold rounding);
    ``method`` names the method, ``solve_time`` its seconds and ``sdp`` the relaxed solution
    when an SDP was solved.
    """

    labels: np.ndarray
    groups: list[list[int]]
    objective: float
    k: int
    method: str
    solve_time: float
    sdp: SdpSolution | None = None

    @property
    def n_groups(self) -> int:
        """Number of non-empty groups found."""
        return len(self.groups)

    def named(self, task_names: Sequence[str]) -> list[list[str]]:
        """The groups as lists of task names, e.g. ``grouping.named(affinity.task_names)``."""
        if len(task_names) != len(self.labels):
            raise TaeError(
                f"got {len(task_names)} task names for a grouping of {len(self.labels)} tasks; "
                "pass one name per row of T, in order."
            )
        return [[str(task_names[i]) for i in group] for group in self.groups]


def make_grouping(
    T: np.ndarray,
    labels: np.ndarray,
    k: int,
    method: str,
    solve_time: float,
    sdp: SdpSolution | None = None,
) -> Grouping:
    """Wrap labels into a scored :class:`Grouping` (labels canonicalized)."""
    labels = canonical_labels(labels)
    return Grouping(
        labels=labels,
        groups=groups_from_labels(labels),
        objective=partition_objective(T, labels),
        k=int(k),
        method=method,
        solve_time=float(solve_time),
        sdp=sdp,
    )
