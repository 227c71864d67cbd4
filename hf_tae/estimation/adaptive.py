"""Adaptive subset sampling: one current cluster plus the new tasks per subset (notes B.1).

Approximate clustering for multi-instruction tuning does not sample subsets of all n tasks
uniformly. It keeps the current clusters (``clusters/{name}.txt``, one cluster per line) and
treats the tasks in no cluster as *new*; each subset picks one current cluster uniformly and is
drawn from that cluster ∪ the new tasks, so only affinities between a cluster and the new tasks
(and within them) are observed. Then the tasks are re-clustered and the next batch of new tasks
comes in. Subsets therefore cover far fewer task pairs than uniform ones, which is the point
when every subset costs a real fine-tuning run.

* :func:`read_clusters`: a clusters file (one cluster per line) or a run's ``groups.json``;
* :func:`sample_round`: the pure sampler of one round (clusters, new tasks, size, an rng);
* :func:`adaptive_sampling`: the loop (sample, ``estimate``, re-cluster, repeat), with the
  pair coverage reached after each round (:func:`pair_coverage`). ``estimate`` is any callable
  from subsets to a results table, so the loop runs on estimated models, real fine-tuning or a
  synthetic table alike.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.utils.progress import tqdm

if TYPE_CHECKING:
    import pandas as pd

Subset = tuple[int, ...]
#: Pools with at most this many subsets are enumerated (exact exhaustion); larger pools are
#: sampled by rejection, which then practically never repeats.
ENUMERATE_LIMIT = 20_000
#: Rejection draws per subset in a large pool before it counts as exhausted.
MAX_ATTEMPTS = 1000


def read_clusters(path: str | os.PathLike, task_names: Sequence[str]) -> list[list[str]]:
    """The clusters in ``path``: a text file with one cluster per line (task names separated by
    spaces or commas; blank lines and ``#`` comments skipped), or a ``groups.json`` written by
    ``hf-tae run`` (``{"groups": [[names…], …]}``) or a bare JSON list of lists.

    Unknown task names, a task in two clusters and an empty file raise :class:`TaeError`
    naming them."""
    path = Path(path)
    if not path.is_file():
        raise TaeError(f"clusters file {path} does not exist; give one cluster per line.")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        clusters = data.get("groups") if isinstance(data, dict) else data
        if not isinstance(clusters, list) or not all(isinstance(c, list) for c in clusters):
            raise TaeError(
                f"{path} holds no list of clusters; write a groups.json of hf-tae run "
                '({"groups": [["task_a", "task_b"], …]}) or a JSON list of lists.'
            )
        clusters = [[str(t) for t in c] for c in clusters if c]
    else:
        lines = (line.split("#", 1)[0].replace(",", " ").split() for line in text.splitlines())
        clusters = [c for c in lines if c]
    if not clusters:
        raise TaeError(f"{path} names no clusters; write one cluster of task names per line.")
    known = set(task_names)
    unknown = [t for c in clusters for t in c if t not in known]
    if unknown:
        raise TaeError(f"{path} names unknown tasks {unknown}; the tasks are {list(task_names)}.")
    members = [t for c in clusters for t in c]
    repeated = sorted({t for t in members if members.count(t) > 1})
    if repeated:
        raise TaeError(f"{path} puts tasks {repeated} in more than one cluster (or line).")
    return clusters


def pair_coverage(subsets: Iterable[Iterable[int]], num_tasks: int) -> float:
    """Fraction of the C(n, 2) task pairs that appear together in at least one subset: the
    share of affinity entries T[i, j] the subsets observe (1.0 for n < 2)."""
    total = math.comb(num_tasks, 2)
    pairs = {p for s in subsets for p in itertools.combinations(sorted(set(s)), 2)}
    return 1.0 if total == 0 else len(pairs) / total


class _Pool:
    """Fresh subsets of one pool (a cluster ∪ the new tasks), drawn uniformly without
    repeats: enumerated and shuffled when small, by rejection when large."""

    def __init__(self, tasks: Sequence[int], size: int, rng: random.Random) -> None:
        self.tasks, self.size, self.rng = sorted(tasks), min(size, len(tasks)), rng
        self.small = math.comb(len(self.tasks), self.size) <= ENUMERATE_LIMIT
        self.queue: list[Subset] | None = None
        self.exhausted = len(self.tasks) < 2  # a subset of one task observes no pair

    def draw(self, seen: set[Subset]) -> Subset | None:
        if self.small:
            if self.queue is None:
                self.queue = list(itertools.combinations(self.tasks, self.size))
                self.rng.shuffle(self.queue)
            while self.queue:
                subset = self.queue.pop()
                if subset not in seen:
                    return subset
        else:
            for _ in range(MAX_ATTEMPTS):
                subset = tuple(sorted(self.rng.sample(self.tasks, self.size)))
                if subset not in seen:
                    return subset
        self.exhausted = True
        return None


def sample_round(
    clusters: Sequence[Sequence[int]],
    new_tasks: Sequence[int],
    num_subsets: int,
    size: int,
    rng: random.Random,
    exclude: Iterable[Iterable[int]] = (),
) -> list[Subset]:
    """One round of adaptive sampling (notes B.1): up to ``num_subsets`` distinct subsets, each
    drawn from one uniformly chosen cluster ∪ ``new_tasks``.

    ``size`` tasks per subset, capped by the pool drawn from; with no clusters the pool is the
    new tasks, with no new tasks each cluster alone. Subsets in ``exclude`` (earlier rounds) are
    never returned; pools that run out of fresh subsets are dropped from the draw, so fewer
    subsets come back only when every pool is exhausted. Subsets are sorted tuples of task ids.
    """
    if num_subsets < 0 or size < 2:
        raise TaeError(f"num_subsets={num_subsets}, size={size}: need num_subsets >= 0, size >= 2.")
    new = sorted(set(new_tasks))
    clustered = [t for c in clusters for t in c]
    overlap = sorted(set(new) & set(clustered))
    if overlap:
        raise TaeError(f"new tasks {overlap} are already in a cluster; a new task is in none.")
    if not clustered and not new:
        raise TaeError("no clusters and no new tasks: nothing to sample from.")
    groups = [list(c) for c in clusters if c] or [[]]
    pools = [_Pool(sorted(set(c) | set(new)), size, rng) for c in groups]
    seen = {tuple(sorted(s)) for s in exclude}
    out: list[Subset] = []
    while len(out) < num_subsets:
        live = [p for p in pools if not p.exhausted]
        if not live:
            break
        subset = rng.choice(live).draw(seen)
        if subset is not None:
            seen.add(subset)
            out.append(subset)
    return out


@dataclass
class AdaptiveRound:
    """One round: the ``new_tasks`` it brought in, its ``num_subsets``, the cumulative
    ``coverage`` of all task pairs (and of the pairs among the tasks seen so far,
    ``coverage_seen``) and the ``clusters`` after re-clustering (task ids)."""

    round: int
    new_tasks: list[int]
    num_subsets: int
    coverage: float
    coverage_seen: float
    clusters: list[list[int]]


@dataclass
class AdaptiveSampling:
    """What :func:`adaptive_sampling` returns: every ``subsets`` in the order drawn, the
    ``results`` table over them (``subset_id`` indexes ``subsets``), ``num_tasks``, the
    ``rounds`` and the final ``clusters``."""

    subsets: list[Subset]
    results: pd.DataFrame
    num_tasks: int
    rounds: list[AdaptiveRound] = field(default_factory=list)
    clusters: list[list[int]] = field(default_factory=list)

    def summary(self, task_names: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready record of the rounds (task names instead of ids when given)."""

        def name(t: int) -> Any:
            return task_names[t] if task_names is not None else t

        return {
            "rounds": [
                {
                    "round": r.round,
                    "new_tasks": [name(t) for t in r.new_tasks],
                    "num_subsets": r.num_subsets,
                    "coverage": r.coverage,
                    "coverage_seen": r.coverage_seen,
                    "clusters": [[name(t) for t in c] for c in r.clusters],
                }
                for r in self.rounds
            ],
            "num_subsets": len(self.subsets),
            "coverage": pair_coverage(self.subsets, self.num_tasks),
        }


def affinity_values(
    results: pd.DataFrame, num_tasks: int, metric: str, higher_is_better: bool | None = None
) -> np.ndarray:
    """The symmetrized, zero-diagonal affinity (z-scored per target task, notes A.4) of a
    results table, averaged over its ``member`` column when it has one; NaN where no subset
    observed the pair."""
    from hf_tae.estimation.affinity import AffinityMatrix

    names = [str(t) for t in range(num_tasks)]
    groups = [results] if "member" not in results else [g for _, g in results.groupby("member")]
    members = [
        AffinityMatrix.from_results(g.reset_index(drop=True), names, metric=metric,
                                    higher_is_better=higher_is_better, symmetrize=True,
                                    zero_diagonal=True)
        for g in groups
    ]  # fmt: skip
    return AffinityMatrix.average(members).to_numpy()


def density_recluster(
    num_groups: int = 0, max_groups: int = 8, method: str = "sdp", min_z: float = 2.0
) -> Callable[[np.ndarray], np.ndarray]:
    """The default re-clustering of a round: ``method`` ('sdp' or 'spectral') with
    ``num_groups`` groups (capped at the tasks seen), or with 0 the k of
    :func:`~hf_tae.recommend_k` over k = 1 … ``max_groups`` against a shuffled null."""
    from hf_tae.clustering import recommend_k, sdp_cluster, spectral_cluster, sweep_k

    def recluster(T: np.ndarray) -> np.ndarray:
        m = len(T)
        if m < 3:
            return np.zeros(m, dtype=np.int64)
        if num_groups:
            cluster = sdp_cluster if method == "sdp" else spectral_cluster
            return cluster(T, min(num_groups, m)).labels
        sweep = sweep_k(T, range(1, min(max_groups, m) + 1), method=method, null_draws=10,
                        min_z=min_z)  # fmt: skip
        return np.asarray(sweep.set_index("k").loc[recommend_k(sweep), "labels"])

    return recluster


def _batches(new: list[int], rounds: int, rng: random.Random) -> list[list[int]]:
    """The new tasks shuffled and split into ``rounds`` batches of near-equal size."""
    order = list(new)
    rng.shuffle(order)
    return [sorted(int(t) for t in b) for b in np.array_split(np.asarray(order, int), rounds)]


def adaptive_sampling(
    num_tasks: int,
    estimate: Callable[[list[Subset]], pd.DataFrame],
    *,
    rounds: int,
    num_subsets: int,
    size: int,
    metric: str,
    initial_clusters: Sequence[Sequence[int]] = (),
    recluster: Callable[[np.ndarray], Sequence[int]] | None = None,
    higher_is_better: bool | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> AdaptiveSampling:
    """Adaptive sampling end to end (notes B.1): the new tasks (those in no initial cluster)
    come in over ``rounds`` batches; each round samples its share of ``num_subsets`` from one
    current cluster ∪ the batch (:func:`sample_round`), calls ``estimate(subsets)`` for their
    results table (columns ``subset_id`` indexing the given list, ``subset``, ``task``,
    ``metric``; optional ``member``), rebuilds the affinity from every round's results and
    re-clusters the tasks seen so far with ``recluster(T_seen)`` (default
    :func:`density_recluster`; unobserved pairs count as 0, no evidence).

    Without initial clusters the first batch is sampled on its own (uniformly among its
    tasks). Raises :class:`TaeError` when every task is already clustered, when there are
    fewer new tasks than rounds, or when the clusters name unknown or repeated ids.
    """
    import pandas as pd

    clusters = [sorted(int(t) for t in c) for c in initial_clusters if len(c)]
    clustered = [t for c in clusters for t in c]
    bad = sorted({t for t in clustered if not 0 <= t < num_tasks or clustered.count(t) > 1})
    if bad:
        raise TaeError(f"initial clusters name task ids {bad} out of range 0..{num_tasks - 1} "
                       "or in more than one cluster.")  # fmt: skip
    new = sorted(set(range(num_tasks)) - set(clustered))
    if not new:
        raise TaeError("every task is already in an initial cluster: adaptive sampling "
                       "estimates new tasks against the clusters; leave the new tasks out of "
                       "the clusters, or sample uniformly.")  # fmt: skip
    most = len(new) if clusters else len(new) // 2
    if not 1 <= rounds <= most:
        raise TaeError(f"rounds={rounds} for {len(new)} new tasks: every round brings in at "
                       f"least one new task (two in the first round without initial clusters); "
                       f"use 1 to {most} rounds.")  # fmt: skip
    rng = random.Random(seed)
    recluster = recluster or density_recluster()
    budgets = [len(b) for b in np.array_split(np.arange(num_subsets), rounds)]
    subsets: list[Subset] = []
    tables: list[pd.DataFrame] = []
    history: list[AdaptiveRound] = []
    seen_tasks = set(clustered)
    bar = tqdm(_batches(new, rounds, rng), desc="adaptive rounds", disable=not show_progress)
    for r, batch in enumerate(bar):
        drawn = sample_round(clusters, batch, budgets[r], size, rng, exclude=subsets)
        if drawn:
            table = estimate(drawn).copy()
            table["subset_id"] = table["subset_id"].to_numpy() + len(subsets)
            tables.append(table)
            subsets += drawn
        seen_tasks |= set(batch)
        order = sorted(seen_tasks)
        if tables:
            T = affinity_values(pd.concat(tables, ignore_index=True), num_tasks, metric,
                                higher_is_better)  # fmt: skip
        else:
            T = np.full((num_tasks, num_tasks), np.nan)
        labels = np.asarray(recluster(np.nan_to_num(T[np.ix_(order, order)], nan=0.0)))
        clusters = [[order[i] for i in np.flatnonzero(labels == g)]
                    for g in dict.fromkeys(labels.tolist())]  # fmt: skip
        history.append(AdaptiveRound(
            round=r + 1, new_tasks=list(batch), num_subsets=len(drawn),
            coverage=pair_coverage(subsets, num_tasks),
            coverage_seen=_coverage_among(subsets, order), clusters=clusters,
        ))  # fmt: skip
    results = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return AdaptiveSampling(subsets, results, num_tasks, history, clusters)


def _coverage_among(subsets: Sequence[Subset], tasks: Sequence[int]) -> float:
    """:func:`pair_coverage` restricted to the pairs among ``tasks``."""
    index = {t: i for i, t in enumerate(tasks)}
    inside = [[index[t] for t in s if t in index] for s in subsets]
    return pair_coverage(inside, len(tasks))
