"""Exhaustive ground truth for few tasks: every subset of k tasks fine-tuned, every partition
scored by that truth (notes B.1: ``--preload_combos`` enumerates all C(n, k) combinations).

Approximate clustering for multi-instruction tuning judges its SDP grouping against the
partition an exhaustive search finds on the *true* affinities (the poster: SDP recovers the
exhaustive-search groups in all cases). Here:

* :func:`exhaustive_subsets`: all C(n, k) subsets, refused with the count when there are more
  than a limit (each is a real fine-tuning run per seed);
* :func:`compare_with_exhaustive`: for each k, the best partition into k groups of the true
  affinity by brute force (:func:`~hf_tae.exhaustive_cluster`, Grad-TAE's average-density
  objective, notes A.5) against the SDP grouping of the true and of the estimated affinity;
* :func:`score_partitions`: every partition of the tasks whose groups are all fine-tuned
  subsets, scored by the real metric of each task in its own group's run (no affinity in
  between), best first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from hf_tae.errors import TaeError

if TYPE_CHECKING:
    import pandas as pd


def exhaustive_subsets(
    num_tasks: int, size: int, max_subsets: int | None = None, option: str = "max_subsets"
) -> list[tuple[int, ...]]:
    """All C(``num_tasks``, ``size``) subsets of task ids, in lexicographic order.

    Raises :class:`TaeError` naming the count and ``option`` (the limit's flag) when it exceeds
    ``max_subsets``, before anything is enumerated."""
    if not 1 <= size <= num_tasks:
        raise TaeError(f"size={size} must be between 1 and the {num_tasks} tasks.")
    count = math.comb(num_tasks, size)
    if max_subsets is not None and count > max_subsets:
        raise TaeError(
            f"all subsets of {size} of {num_tasks} tasks are C({num_tasks}, {size}) = {count} "
            f"fine-tuning runs (per seed), more than {option} {max_subsets}; raise {option} to "
            f"{count} if you mean it, or fine-tune a sample of subsets instead."
        )
    return list(itertools.combinations(range(num_tasks), size))


def compare_with_exhaustive(
    true: np.ndarray, estimated: np.ndarray, ks: Sequence[int], seed: int = 0
) -> pd.DataFrame:
    """Per k: the exhaustive optimum of the true affinity against the SDP groupings.

    Both matrices are n × n (NaN counts as 0, no evidence). Columns: ``k``,
    ``exhaustive_labels`` and ``exhaustive_objective`` (the brute-force best partition of
    ``true`` into k groups), ``sdp_true_labels`` / ``sdp_true_ari`` / ``sdp_true_objective``
    (the SDP on ``true``: does the relaxation find the optimum?) and ``sdp_estimate_labels`` /
    ``sdp_estimate_ari`` / ``sdp_estimate_objective`` (the SDP on the estimate, scored on the
    truth). ARI is against the exhaustive partition; objectives are on ``true``. n ≤ 10.
    """
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from hf_tae.clustering import exhaustive_cluster, partition_objective, sdp_cluster

    T = np.nan_to_num(np.asarray(true, float), nan=0.0)
    E = np.nan_to_num(np.asarray(estimated, float), nan=0.0)
    if T.shape != E.shape or T.shape[0] != T.shape[1]:
        raise TaeError(f"true {T.shape} and estimated {E.shape} must be the same n × n shape.")
    rows = []
    for k in ks:
        best = exhaustive_cluster(T, k)
        row: dict = {"k": int(k), "exhaustive_labels": best.labels.tolist(),
                     "exhaustive_objective": best.objective}  # fmt: skip
        for name, matrix in (("sdp_true", T), ("sdp_estimate", E)):
            labels = sdp_cluster(matrix, k, seed=seed).labels
            row[f"{name}_labels"] = labels.tolist()
            row[f"{name}_ari"] = float(adjusted_rand_score(best.labels, labels))
            row[f"{name}_objective"] = partition_objective(T, labels)
        rows.append(row)
    return pd.DataFrame(rows)


def _exact_covers(
    by_first: dict[int, list[tuple[int, ...]]], num_tasks: int
) -> Iterator[list[tuple[int, ...]]]:
    """Every way to split range(num_tasks) into disjoint subsets from ``by_first`` (subsets
    keyed by their smallest task): the smallest uncovered task opens the next group."""

    def extend(covered: frozenset[int], groups: list[tuple[int, ...]]):
        if len(covered) == num_tasks:
            yield list(groups)
            return
        first = min(set(range(num_tasks)) - covered)
        for subset in by_first.get(first, []):
            if covered.isdisjoint(subset):
                yield from extend(covered | set(subset), [*groups, subset])

    yield from extend(frozenset(), [])


def count_equal_partitions(num_tasks: int, size: int) -> int:
    """How many partitions of ``num_tasks`` tasks into groups of exactly ``size`` exist (0 when
    ``size`` does not divide ``num_tasks``): n! / ((size!)^m m!) with m = n / size. These are
    the partitions :func:`score_partitions` scores on an all-C(n, size) truth."""
    if size < 1 or num_tasks % size:
        return 0
    m = num_tasks // size
    return math.factorial(num_tasks) // (math.factorial(size) ** m * math.factorial(m))


def score_partitions(
    results: pd.DataFrame,
    num_tasks: int,
    metric: str,
    higher_is_better: bool | None = None,
    max_partitions: int = 1_000_000,
) -> pd.DataFrame:
    """Every partition of the ``num_tasks`` tasks into fine-tuned subsets, scored by the truth.

    ``results`` has one row per (subset, task) with ``subset`` and ``metric`` (e.g.
    :func:`~hf_tae.average_seeds` of :meth:`SubsetFineTuner.run <hf_tae.SubsetFineTuner.run>`;
    repeated rows are averaged). A partition is scorable when each of its groups was fine-tuned;
    its ``score`` is the mean over tasks of the task's metric in its own group's run. Returns
    ``groups`` (tuples of ids), ``num_groups`` and ``score``, best first (losses: lowest first,
    by ``higher_is_better`` or the metric's name), empty when no partition is scorable.
    """
    import pandas as pd

    from hf_tae.estimation.schema import higher_is_better as metric_direction

    if higher_is_better is None:
        higher_is_better = metric_direction(metric)
    missing = [c for c in ("subset", "task", metric) if c not in results]
    if missing:
        raise TaeError(f"results lacks columns {missing}; it needs subset, task and {metric!r}.")
    value: dict[tuple[tuple[int, ...], int], list[float]] = {}
    for subset, task, v in zip(results["subset"], results["task"], results[metric], strict=True):
        value.setdefault((tuple(sorted(int(t) for t in subset)), int(task)), []).append(float(v))
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for subset in sorted({s for s, _ in value}):
        if all((subset, t) in value for t in subset):  # every member scored
            by_first.setdefault(subset[0], []).append(subset)
    rows = []
    for groups in _exact_covers(by_first, num_tasks):
        scores = [np.mean(value[(g, t)]) for g in groups for t in g]
        rows.append({"groups": groups, "num_groups": len(groups), "score": float(np.mean(scores))})
        if len(rows) > max_partitions:
            raise TaeError(f"more than {max_partitions} scorable partitions; pass fewer subsets "
                           "or raise max_partitions.")  # fmt: skip
    table = pd.DataFrame(rows, columns=["groups", "num_groups", "score"])
    return table.sort_values("score", ascending=not higher_is_better, kind="stable").reset_index(
        drop=True
    )
