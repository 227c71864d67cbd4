"""Choosing the estimator's ridge λ from the data: the λ whose affinity is most reproducible.

The linearized estimate ``θ0 + P w_S`` is a ridge-penalized regression on the subset's
training gradients, and λ sets how far it moves from θ0. Which λ is right depends on the
model, the number of rows and the projection, so a default tuned on one family misses on
another (README "Choosing λ": the graph default needs λ ≥ 100, the image default λ ≤ 100).

Grad-TAE averages the estimates of several meta-initializations (θ0 trained with different
seeds). Their affinities agree only in what the data determines; what one θ0's seed
determines is noise. :func:`select_l2` picks, from a grid, the λ at which the members'
affinity matrices agree best (mean pairwise Spearman, :func:`~hf_tae.self_agreement`), i.e.
the most reliable ensemble mean. Measured on the graph and image defaults, that λ recovers the
planted groups on both, where any one fixed λ fails on one of them.

The held-out fit of the estimated models (their mean validation metric) is reported too but
not used: the estimated models of every subset barely improve on θ0's held-out loss, so it
favours the largest λ, where the affinity is flat and members disagree (image default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import check_metric

if TYPE_CHECKING:
    from hf_tae.estimation.affinity import AffinityMatrix

#: λ grid of ``select_l2`` (decades; the penalty multiplies a loss summed over rows).
DEFAULT_L2_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)


@dataclass
class L2Selection:
    """What :func:`select_l2` found.

    Attributes:
        l2: the chosen λ.
        table: one row per λ: ``l2``, ``agreement`` (mean pairwise Spearman of the members'
            affinities), ``min_agreement``, ``held_out`` (mean over members and (subset, task)
            rows of the held-out metric, for information), ``chosen``.
        results: per member, the estimated results table at the chosen λ
            (:meth:`~hf_tae.RegressionEstimator.evaluate`) of the subsets it was chosen on.
        affinities: per member, its affinity matrix at the chosen λ.
    """

    l2: float
    table: pd.DataFrame
    results: list[pd.DataFrame]
    affinities: list[AffinityMatrix]


def select_l2(
    stores: Sequence[Any],
    subsets: Sequence[Sequence[int | str]],
    grid: Sequence[float] = DEFAULT_L2_GRID,
    metric: str = "log_loss",
    split: str = "validation",
    mode: str = "principled",
    max_subsets: int | None = None,
) -> L2Selection:
    """The λ of ``grid`` at which the meta-initializations' estimated affinities agree best.

    Args:
        stores: one finished :class:`~hf_tae.gradients.store.GradientStore` per
            meta-initialization (at least 2), with ``train`` and ``split`` rows.
        subsets: the task subsets (ids or names) whose estimates build the affinity.
        grid: candidate λ values (> 0).
        metric: per-task metric of the affinity (``log_loss``, ``accuracy``, ``f1``).
        split: rows that score the estimated models.
        mode: the estimator's mode (``"principled"`` or ``"paper"``).
        max_subsets: choose on the first ``max_subsets`` subsets only (default: all). The
            estimates of every (store, λ) pair cost one estimation each, so a few hundred
            subsets make the choice cheaper; the returned results then cover those only.
    """
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import self_agreement
    from hf_tae.estimation.regression import RegressionEstimator

    check_metric(metric)
    grid = [float(x) for x in grid]
    if not grid or not all(np.isfinite(x) and x > 0 for x in grid):
        raise TaeError(f"the λ grid is {grid}; give one or more finite numbers > 0.")
    if len(stores) < 2:
        raise TaeError(
            f"choosing λ by agreement needs at least 2 meta-initializations, got {len(stores)}; "
            "estimate with --num_meta_inits 2 or more, or give λ as a number."
        )
    if not subsets:
        raise TaeError("no subsets to fit; pass the sampled task subsets.")
    if max_subsets is not None:
        if max_subsets < 1:
            raise TaeError(f"max_subsets={max_subsets}; pass at least 1 (or None for all).")
        subsets = list(subsets)[:max_subsets]
    rows, estimates = [], []
    for l2 in grid:
        tables, matrices = [], []
        for store in stores:
            estimator = RegressionEstimator(store, l2=l2, mode=mode)
            table = estimator.evaluate(subsets, estimator.fit(subsets), split=split)
            if not np.all(np.isfinite(table[metric].to_numpy(dtype=float))):
                raise TaeError(
                    f"the estimated {metric} is not finite at λ = {l2:g} (with gold log-odds "
                    "scores F1 is undefined); choose λ by log_loss or accuracy."
                )
            tables.append(table)
            matrices.append(AffinityMatrix.from_results(
                table, estimator.task_names, metric=metric, symmetrize=True, zero_diagonal=True))  # fmt: skip
        agreement = self_agreement(matrices)
        rows.append({
            "l2": l2,
            "agreement": agreement["mean_spearman"],
            "min_agreement": agreement["min_spearman"],
            "held_out": float(np.mean([t[metric].mean() for t in tables])),
        })  # fmt: skip
        estimates.append((tables, matrices))
    table = pd.DataFrame(rows)
    best = int(np.nanargmax(table["agreement"])) if table["agreement"].notna().any() else 0
    table["chosen"] = np.arange(len(grid)) == best
    return L2Selection(l2=grid[best], table=table, results=estimates[best][0],
                       affinities=estimates[best][1])  # fmt: skip
