"""Baseline task groupings to compare the SDP against (as the Grad-TAE reference code does).

* :func:`spectral_cluster`: spectral clustering on (T + Tᵀ)/2, as the reference baseline;
* :func:`kmeans_cluster`: Lloyd's k-means on the rows of T (tasks with similar affinity
  profiles group together);
* :func:`exhaustive_cluster`: the true optimum of Grad-TAE's objective over all partitions
  into exactly k non-empty groups, for n ≤ 10 (the yardstick for the relaxation's quality).

All return exactly k non-empty groups as a :class:`~hf_tae.clustering.rounding.Grouping`
scored on T with :func:`~hf_tae.clustering.rounding.partition_objective`.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
from sklearn.cluster import SpectralClustering

from hf_tae.clustering.rounding import (
    Grouping,
    check_affinity,
    fill_empty_groups,
    kmeans_labels,
    make_grouping,
)
from hf_tae.errors import TaeError

#: Largest n :func:`exhaustive_cluster` accepts (Bell(10) = 115,975 partitions in all).
MAX_EXHAUSTIVE_N = 10
#: Partitions scored per vectorized batch in :func:`exhaustive_cluster`.
_BATCH = 8192


def spectral_cluster(T: np.ndarray, k: int, seed: int = 0) -> Grouping:
    """Spectral clustering on S = (T + Tᵀ)/2 with ``affinity="precomputed"``.

    Spectral clustering needs nonnegative affinities, while task affinities are often negative
    (z-normalized scores, as Grad-TAE builds them). Negatives are handled by shifting:
    A = S − min(S) when min(S) < 0, so the most negative entry becomes 0 and the order of all
    entries is kept (clipping at 0 would instead erase the differences among negative
    entries). A constant S carries no structure and becomes all-ones. Labels are assigned by
    k-means (``random_state=seed``); empty clusters are split deterministically.
    """
    S = check_affinity(T, k, symmetrize=True)
    start = time.perf_counter()
    A = S - min(S.min(), 0.0)
    if not A.any():
        A = np.ones_like(A)
    if k == 1:
        labels = np.zeros(len(S), dtype=np.int64)
    else:
        with warnings.catch_warnings():  # "graph is not fully connected": harmless here
            warnings.simplefilter("ignore", UserWarning)
            raw = SpectralClustering(
                n_clusters=k, affinity="precomputed", random_state=seed, n_init=10
            ).fit_predict(A)
        labels = fill_empty_groups(raw, k, A)
    return make_grouping(T, labels, k, "spectral", time.perf_counter() - start)


def kmeans_cluster(T: np.ndarray, k: int, seed: int = 0) -> Grouping:
    """Lloyd's k-means (10 restarts, ``random_state=seed``) on the rows of T.

    Row i is task i's affinity profile; T need not be symmetric. Always k non-empty groups.
    """
    T = check_affinity(T, k)
    start = time.perf_counter()
    labels = kmeans_labels(T, k, seed)
    return make_grouping(T, labels, k, "kmeans", time.perf_counter() - start)


def restricted_growth_strings(n: int, k: int) -> np.ndarray:
    """All partitions of n items into exactly k non-empty groups, one row of labels each.

    Restricted growth strings: a[0] = 0 and a[i] ≤ 1 + max(a[:i]), which lists each set
    partition exactly once. Built breadth-first in numpy; prefixes that can no longer reach
    k groups are pruned. Shape (S(n, k), n), S the Stirling number of the second kind.
    """
    strings = np.zeros((1, 1), dtype=np.int8)
    used = np.ones(1, dtype=np.int64)  # groups used by each prefix
    for i in range(1, n):
        new_strings, new_used = [], []
        for value in range(min(i + 1, k)):
            ok = value <= used  # value == used opens a new group
            grown = used[ok] + (value == used[ok])
            keep = grown + (n - i - 1) >= k  # enough items left to open the missing groups
            column = np.full((int(keep.sum()), 1), value, dtype=np.int8)
            new_strings.append(np.hstack([strings[ok][keep], column]))
            new_used.append(grown[keep])
        strings, used = np.vstack(new_strings), np.concatenate(new_used)
    return strings[used == k]


def exhaustive_cluster(T: np.ndarray, k: int) -> Grouping:
    """The exact optimum of Grad-TAE's objective over all partitions into exactly k groups.

    Enumerates restricted growth strings (at most Bell(10) = 115,975 for n = 10) and scores
    them in vectorized batches: with one-hot V_p (n × k) per partition p, the objective is
    Σ_c (V_pᵀ T V_p)_cc / |C_c|. Ties go to the first partition in enumeration order. Only for
    n ≤ 10; use :func:`~hf_tae.clustering.sdp.sdp_cluster` for larger n.
    """
    T = check_affinity(T, k)
    n = T.shape[0]
    if n > MAX_EXHAUSTIVE_N:
        raise TaeError(
            f"exhaustive_cluster enumerates every partition; n={n} tasks is more than "
            f"{MAX_EXHAUSTIVE_N}. Use sdp_cluster (or spectral_cluster) instead."
        )
    start = time.perf_counter()
    strings = restricted_growth_strings(n, k)
    eye = np.eye(k)
    best, best_score = 0, -np.inf
    for lo in range(0, len(strings), _BATCH):
        Vt = eye[strings[lo : lo + _BATCH]].transpose(0, 2, 1)  # batch × k × n
        within = ((Vt @ T) * Vt).sum(axis=2)  # (V_pᵀ T V_p)_cc
        scores = (within / Vt.sum(axis=2)).sum(axis=1)
        top = int(np.argmax(scores))
        if scores[top] > best_score:
            best, best_score = lo + top, float(scores[top])
    return make_grouping(T, strings[best], k, "exhaustive", time.perf_counter() - start)
