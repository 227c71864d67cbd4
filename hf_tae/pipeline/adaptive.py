"""``--sampling adaptive`` in the job: the estimates stage's subsets drawn by adaptive sampling
(notes B.1) instead of uniformly, estimated on every meta-initialization's gradient store.

:func:`check_sampling` reads ``--initial_clusters`` before any training (unknown tasks and too
many rounds fail there); :func:`adaptive_estimates` runs
:func:`~hf_tae.estimation.adaptive.adaptive_sampling` with the stores' estimates as its
``estimate`` callable and the job's clustering settings as its re-clustering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hf_tae.errors import TaeError

if TYPE_CHECKING:
    import pandas as pd

    from hf_tae.estimation.regularization import L2Selection
    from hf_tae.pipeline.arguments import EstimationArguments, GroupingArguments
    from hf_tae.tasks.taskset import TaskSet

SAMPLINGS = ("uniform", "adaptive")


def check_sampling(est_args: EstimationArguments, task_names: Sequence[str]) -> list[list[int]]:
    """The initial clusters as task ids (empty without ``--initial_clusters``), after checking
    the file and that the new tasks can fill ``--adaptive_rounds`` rounds."""
    from hf_tae.estimation.adaptive import read_clusters

    if est_args.sampling != "adaptive":
        return []
    names = list(task_names)
    clusters = []
    if est_args.initial_clusters:
        clusters = [[names.index(t) for t in c]
                    for c in read_clusters(est_args.initial_clusters, names)]  # fmt: skip
    new = len(names) - sum(len(c) for c in clusters)
    most = new if clusters else new // 2
    if new == 0:
        raise TaeError(f"--initial_clusters {est_args.initial_clusters} puts every task in a "
                       "cluster: adaptive sampling estimates new tasks against the clusters. "
                       "Leave the new tasks out of the file, or use --sampling uniform.")  # fmt: skip
    if not 1 <= est_args.adaptive_rounds <= most:
        raise TaeError(f"--adaptive_rounds {est_args.adaptive_rounds}: {new} new tasks fill 1 to "
                       f"{most} rounds (each round brings in at least one new task, the first "
                       "two without --initial_clusters).")  # fmt: skip
    return clusters


@dataclass
class AdaptiveEstimates:
    """The estimates stage's inputs under adaptive sampling: the ``subsets`` drawn, one results
    ``tables`` per store, the ``l2`` used (and its ``selection`` when chosen by
    ``--estimator_l2 auto``) and the rounds' ``info`` for ``results.json``."""

    subsets: list[tuple[int, ...]]
    tables: list[pd.DataFrame]
    l2: float
    selection: L2Selection | None
    info: dict[str, Any]


def adaptive_estimates(
    stores: Sequence[Any],
    tasks: TaskSet,
    est_args: EstimationArguments,
    grouping_args: GroupingArguments | None,
    l2: float | None,
    selection_subsets: int,
    show_progress: bool = True,
) -> AdaptiveEstimates:
    """Adaptive sampling of ``--num_subsets`` subsets over ``--adaptive_rounds`` rounds, each
    round's subsets estimated on every store and re-clustered by the job's ``--clustering``
    with ``--num_task_groups`` (or the density sweep's k).

    ``l2`` None (``--estimator_l2 auto``): λ is chosen first by :func:`~hf_tae.select_l2` on
    ``selection_subsets`` uniform subsets, as under uniform sampling. The estimates are cheap,
    and the first round's few subsets cannot choose it (on the text default, 4 subsets of 4
    tasks picked λ = 1, whose estimates the meta-initializations then barely shared)."""
    import math

    import pandas as pd

    from hf_tae.estimation.adaptive import adaptive_sampling, density_recluster
    from hf_tae.estimation.regression import RegressionEstimator
    from hf_tae.estimation.regularization import select_l2
    from hf_tae.estimation.subsets import sample_subsets
    from hf_tae.pipeline.arguments import GroupingArguments

    grouping_args = grouping_args or GroupingArguments()
    initial = check_sampling(est_args, tasks.task_names)
    n, size, selection = tasks.num_tasks, est_args.subset_size, None
    if l2 is None:  # --estimator_l2 auto
        uniform = sample_subsets(n, min(selection_subsets, math.comb(n, size)), size,
                                 seed=est_args.subset_seed)  # fmt: skip
        selection = select_l2(stores, uniform, grid=est_args.estimator_l2_grid,
                              metric=est_args.affinity_metric, split=est_args.scoring_split,
                              mode=est_args.estimator_mode)  # fmt: skip
        l2 = selection.l2

    def estimate(subsets: list[tuple[int, ...]]) -> pd.DataFrame:
        tables = []
        for member, store in enumerate(stores):
            estimator = RegressionEstimator(store, l2=l2, mode=est_args.estimator_mode)
            table = estimator.evaluate(
                subsets, estimator.fit(subsets), split=est_args.scoring_split
            )
            tables.append(table.assign(member=member))
        return pd.concat(tables, ignore_index=True)

    result = adaptive_sampling(
        n, estimate, rounds=est_args.adaptive_rounds,
        num_subsets=est_args.num_subsets, size=est_args.subset_size,
        metric=est_args.affinity_metric, initial_clusters=initial,
        recluster=density_recluster(grouping_args.num_task_groups, grouping_args.max_task_groups,
                                    grouping_args.clustering, grouping_args.null_min_z),
        seed=est_args.subset_seed, show_progress=show_progress,
    )  # fmt: skip
    names = tasks.task_names
    tables = [g.drop(columns="member").reset_index(drop=True)
              for _, g in result.results.groupby("member", sort=True)]  # fmt: skip
    info = {
        "initial_clusters": [[names[t] for t in c] for c in initial],
        "initial_clusters_path": est_args.initial_clusters,
        **result.summary(names),
        "final_clusters": [[names[t] for t in c] for c in result.clusters],
    }
    return AdaptiveEstimates(result.subsets, tables, l2, selection, info)
