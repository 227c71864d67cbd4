"""Choosing the number of groups k by the objective's gain over a structureless null.

The raw objective Σ_c v_cᵀ T v_c / |C_c| (Grad-TAE's) cannot pick k by itself: it equals
Σ_ij T_ij / n at k = 1 and tr T at k = n, and in between it rises as groups fit noise, so
larger k always looks at least as good on a matrix with a positive diagonal. :func:`sweep_k`
therefore compares it with the same method on *null* matrices: T with its off-diagonal
pairs (T_ij, T_ji), i < j, shuffled among positions (:func:`shuffled_null`). The shuffle
keeps the diagonal, the entries' distribution and symmetry but destroys group structure, so
the null objective shows how much any k gains from noise alone. (A symmetric permutation
P T Pᵀ would not do: it is the same matrix up to relabeling, with the same objective.)

Rule (:func:`recommend_k`): among the k whose gain = objective − mean null objective lies
outside the null's spread (gain > ``min_z`` × the null objective's standard deviation, 2 by
default), pick the one with the largest gain, smallest k on ties; when no k clears the spread,
T shows no group structure beyond chance and the rule returns 1 (one group). The gain is
exactly 0 at k = 1 and at k = n (both objectives are then Σ T / n and tr T), so an interior k
is picked only when T has more group structure than chance; for a planted k-block matrix the
objective stops growing at the planted k while the null keeps growing, so the gain peaks there.

Second rule (``recommend_k(sweep, by="silhouette")``): the k whose grouping has the largest
mean silhouette (Rousseeuw, 1987) on the affinity (:func:`affinity_silhouette`). A task's
silhouette compares its mean distance to its own group with that to the nearest other group,
so it rewards groups that are both tight and apart, and it does not grow with k the way the
objective does. Distances: D_ij = c − W_ij, W = (T + Tᵀ)/2, with c the affinity of a task with an
identical copy of itself where the kind has one (1 for cosine-type affinities: the NTK and
Fisher overlaps and the gradient cosine, where D is the cosine distance) and otherwise the largest
off-diagonal W (the most similar pair at distance 0; unchanged by shifting or positively
scaling T). Measured on the scenario suite (README: Scenarios), it recovers the planted k
where the density rule and the payoff over-split.

The silhouette scores a task alone in its group 0, so a grouping that puts unrelated tasks
together can score above the one that leaves them alone. :func:`split_incoherent_groups`
checks each group of the chosen grouping on every meta-initialization's own matrix and splits
the groups that are not cohesive there (mean silhouette ≤ 0) into single tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from hf_tae.clustering.baselines import exhaustive_cluster, kmeans_cluster, spectral_cluster
from hf_tae.clustering.rounding import Grouping, check_affinity
from hf_tae.clustering.sdp import sdp_cluster
from hf_tae.errors import TaeError

#: Largest k tried by default (k = 1 … min(n, MAX_DEFAULT_K)).
MAX_DEFAULT_K = 10
_METHODS: dict[str, Callable[..., Grouping]] = {
    "sdp": sdp_cluster,
    "spectral": spectral_cluster,
    "kmeans": kmeans_cluster,
    "exhaustive": exhaustive_cluster,
}


def shuffled_null(T: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T with its off-diagonal pairs (T_ij, T_ji), i < j, moved to random positions.

    Keeps the diagonal, the multiset of entries and symmetry (if T is symmetric); destroys
    any group structure.
    """
    T = check_affinity(T)
    iu, ju = np.triu_indices(len(T), k=1)
    order = rng.permutation(len(iu))
    null = T.copy()
    null[iu, ju] = T[iu[order], ju[order]]
    null[ju, iu] = T[ju[order], iu[order]]
    return null


def sweep_k(
    T: np.ndarray,
    ks: Iterable[int] | None = None,
    *,
    method: str = "sdp",
    null_draws: int = 5,
    seed: int = 0,
    min_z: float = 2.0,
    silhouette_ceiling: float | None = None,
    **kw: Any,
) -> pd.DataFrame:
    """Cluster T for every k in ``ks`` and score each k against the shuffled null.

    ``method`` is ``"sdp"`` (default), ``"spectral"``, ``"kmeans"`` or ``"exhaustive"``;
    ``kw`` goes to that function (e.g. ``rounding=``, ``symmetrize=``, ``eps=``), and
    ``seed`` seeds both the method and the ``null_draws`` shuffles. ``ks`` defaults to
    1 … min(n, 10). Returns one row per k with ``k``, ``objective``, ``null_objective``
    (mean over draws), ``null_std``, ``gain`` (objective − null_objective), ``significant``
    (gain > ``min_z`` · null_std), ``n_groups``, ``solve_time``, ``labels`` (the grouping: one
    group id per task), ``silhouette`` (:func:`affinity_silhouette` of the grouping, with
    ``silhouette_ceiling`` as its ``ceiling``) and
    ``recommended`` (True on the :func:`recommend_k` row, by gain).
    """
    if method not in _METHODS:
        raise TaeError(f"method={method!r}; use one of {list(_METHODS)}.")
    if null_draws < 2:
        raise TaeError(
            f"null_draws={null_draws}; pass at least 2 shuffled nulls per k (the rule needs "
            "the null's spread)."
        )
    if not min_z >= 0:
        raise TaeError(f"min_z={min_z}; pass a number of null standard deviations >= 0.")
    T = check_affinity(T)
    n = T.shape[0]
    ks = list(range(1, min(n, MAX_DEFAULT_K) + 1)) if ks is None else [int(k) for k in ks]
    if not ks:
        raise TaeError("ks is empty; pass at least one number of groups, e.g. ks=range(1, 6).")
    for k in ks:
        check_affinity(T, k)
    cluster = _METHODS[method]
    if method != "exhaustive":
        kw = {"seed": seed, **kw}
    tiny = 1e-9  # k = 1 and k = n have gain 0 up to rounding: never significant
    rng = np.random.default_rng(seed)
    nulls = [shuffled_null(T, rng) for _ in range(null_draws)]
    rows = []
    for k in ks:
        grouping = cluster(T, k, **kw)
        null_scores = np.array([cluster(null, k, **kw).objective for null in nulls])
        gain = grouping.objective - float(null_scores.mean())
        null_std = float(null_scores.std(ddof=1))
        rows.append(
            {
                "k": k,
                "objective": grouping.objective,
                "null_objective": float(null_scores.mean()),
                "null_std": null_std,
                "gain": gain,
                "significant": bool(gain > max(min_z * null_std, tiny * abs(grouping.objective))),
                "n_groups": grouping.n_groups,
                "solve_time": grouping.solve_time,
                "labels": grouping.labels.tolist(),
                "silhouette": affinity_silhouette(T, grouping.labels, silhouette_ceiling),
            }
        )
    sweep = pd.DataFrame(rows)
    sweep["recommended"] = sweep["k"] == recommend_k(sweep)
    return sweep


def affinity_silhouette_samples(
    T: np.ndarray, labels: Sequence[int], ceiling: float | None = None
) -> np.ndarray:
    """Each task's silhouette in a grouping of the tasks of affinity ``T`` (one value per task).

    s_i = (b_i − a_i) / max(a_i, b_i), with a_i the task's mean distance to the rest of its
    group and b_i its mean distance to the nearest other group. Distances: D_ij = c − W_ij with
    W = (T + Tᵀ)/2 and c = ``ceiling``, the affinity of a task with an identical copy of itself
    (1 for cosine-type affinities); by default the largest off-diagonal W. The diagonal is
    ignored. A task alone in its group scores 0 (Rousseeuw's convention, as scikit-learn's
    ``silhouette_samples``). All NaN when the grouping has one group (no other group to compare
    with).
    """
    T = check_affinity(T)
    labels = np.asarray(labels)
    n = len(T)
    if labels.shape != (n,):
        raise TaeError(f"labels has shape {labels.shape}; pass one group id per task ({n}).")
    groups, index = np.unique(labels, return_inverse=True)
    if len(groups) < 2:
        return np.full(n, np.nan)
    W = (T + T.T) / 2
    off = ~np.eye(n, dtype=bool)
    top = float(W[off].max())
    if ceiling is None:
        ceiling = top
    elif not ceiling >= top - 1e-12:
        raise TaeError(
            f"ceiling={ceiling} is below the largest affinity {top:.6g}; pass the affinity of "
            "identical tasks (1 for cosines) or None for the largest one."
        )
    D = np.where(off, ceiling - W, 0.0)
    member = np.eye(len(groups))[index]  # n × groups one-hot
    sizes = member.sum(0)
    mean_to = D @ member  # sum of distances from each task to each group
    own = index
    a = mean_to[np.arange(n), own] / np.maximum(sizes[own] - 1, 1)
    others = mean_to / sizes
    others[np.arange(n), own] = np.inf
    b = others.min(1)
    denom = np.maximum(a, b)
    s = np.where(denom > 0, (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    s[sizes[own] == 1] = 0.0
    return s


def affinity_silhouette(
    T: np.ndarray, labels: Sequence[int], ceiling: float | None = None
) -> float:
    """Mean silhouette of a grouping of the tasks of affinity ``T`` (higher is better, ≤ 1).

    The mean of :func:`affinity_silhouette_samples` (same distances and ``ceiling``). NaN when
    the grouping has one group or one task per group, where the silhouette is undefined.
    """
    T = check_affinity(T)
    labels = np.asarray(labels)
    if labels.shape != (len(T),):
        raise TaeError(f"labels has shape {labels.shape}; pass one group id per task ({len(T)}).")
    if not 1 < len(np.unique(labels)) < len(T):
        return float("nan")
    return float(affinity_silhouette_samples(T, labels, ceiling).mean())


def split_incoherent_groups(
    labels: Sequence[int],
    members: Sequence[np.ndarray],
    ceiling: float | None = None,
    min_coherence: float = 0.0,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Split into single tasks every group that the meta-initializations, each on its own
    affinity, do not see as cohesive.

    A group's *coherence* is its tasks' mean silhouette (:func:`affinity_silhouette_samples`)
    on one member's matrix, averaged over ``members`` (one matrix per meta-initialization; the
    grouping stays fixed). Averaging the members removes noise that hides how unrelated tasks
    are, but also makes tasks that share no structure look alike when they share a faint
    common direction: on the scenario suite the five lone communities of ``unequal`` form a group
    with silhouette 0.05 on the averaged NTK overlap, yet −0.10 ± 0.04 on the members, while every
    planted family there, on ``heavy`` and on the text skills stays above 0.03 on the members
    (README: Scenarios). Groups with coherence ≤ ``min_coherence`` become single tasks.

    Returns the new labels (groups numbered by first appearance) and one row per group of
    ``labels`` with ≥ 2 tasks: ``group`` (its label), ``tasks`` (indices), ``coherence`` (mean
    over members), ``coherence_std`` (their standard deviation; NaN with one member) and
    ``split``.
    """
    labels = np.asarray(labels)
    if not members:
        raise TaeError("members is empty; pass at least one affinity matrix (the average works).")
    samples = np.array([affinity_silhouette_samples(T, labels, ceiling) for T in members])
    rows = []
    new = labels.astype(object).copy()
    for group in dict.fromkeys(labels.tolist()):
        tasks = np.flatnonzero(labels == group)
        if len(tasks) < 2:
            continue
        per_member = samples[:, tasks].mean(1)
        coherence = float(per_member.mean())
        split = bool(coherence <= min_coherence)  # NaN (one group: nothing to compare) keeps
        if split:
            for t in tasks:
                new[t] = ("split", int(t))
        rows.append(
            {
                "group": group,
                "tasks": tasks.tolist(),
                "coherence": coherence,
                "coherence_std": float(per_member.std(ddof=1)) if len(members) > 1 else np.nan,
                "split": split,
            }
        )
    first = {}
    relabeled = np.array([first.setdefault(x, len(first)) for x in new.tolist()])
    table = pd.DataFrame(rows, columns=["group", "tasks", "coherence", "coherence_std", "split"])
    return relabeled, table


def silhouettes_by_member(
    sweep: pd.DataFrame, members: Sequence[np.ndarray], ceiling: float | None = None
) -> pd.DataFrame:
    """The silhouette of each of the sweep's groupings on each member's own affinity.

    ``sweep`` is a :func:`sweep_k` table of the averaged affinity and ``members`` the matrices
    that were averaged (one per meta-initialization). Each row's grouping stays fixed; only the
    affinity it is scored on changes, so the table says whether every member prefers the same
    k among the same candidates, or whether the averaged choice is a near tie that the members
    split. Returns one row per k with ``k`` and one column ``member_<m>`` per member (NaN where
    the silhouette is undefined), plus ``preferred_by``: how many members score that k best
    (ties: the smallest k, as :func:`recommend_k`).
    """
    if "labels" not in sweep or "k" not in sweep:
        raise TaeError("sweep has no 'k' and 'labels' columns; pass the DataFrame sweep_k returns.")
    if not members:
        raise TaeError("members is empty; pass the affinity matrices that were averaged.")
    table = pd.DataFrame({"k": sweep["k"].to_numpy()})
    preferred = np.zeros(len(table), dtype=int)
    for m, T in enumerate(members):
        scores = [affinity_silhouette(T, labels, ceiling) for labels in sweep["labels"]]
        table[f"member_{m}"] = scores
        if np.isfinite(scores).any():
            best = recommend_k(table.assign(silhouette=scores), by="silhouette")
            preferred[table["k"].to_numpy() == best] += 1
    table["preferred_by"] = preferred
    return table


def recommend_k(sweep: pd.DataFrame, by: str = "gain") -> int:
    """The k a :func:`sweep_k` table recommends.

    ``by="gain"``: the largest ``gain`` among the ``significant`` rows (smallest k on ties);
    1 when no k's gain clears the null's spread. ``by="silhouette"``: the largest
    ``silhouette`` (smallest k on ties) among the rows where it is defined; 1 when none is.
    """
    if by not in ("gain", "silhouette"):
        raise TaeError(f"by={by!r}; use 'gain' or 'silhouette'.")
    need = {"k", "gain", "significant"} if by == "gain" else {"k", "silhouette"}
    if sweep.empty or not need <= set(sweep.columns):
        raise TaeError(f"sweep has no {sorted(need)} columns; pass the DataFrame sweep_k returns.")
    if by == "silhouette":
        eligible = sweep[np.isfinite(sweep["silhouette"].astype(float))]
        key = "silhouette"
    else:
        eligible = sweep[sweep["significant"].astype(bool)]
        key = "gain"
    if eligible.empty:
        return 1
    best = eligible.sort_values([key, "k"], ascending=[False, True], kind="stable")
    return int(best["k"].iloc[0])
