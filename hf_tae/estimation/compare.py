"""How close estimated affinities and subset scores are to the fine-tuned ground truth.

The Grad-TAE abstract (Li et al., KDD 2024) reports a "distance to true affinities", most
likely a relative Frobenius distance ‖T̂ − T‖_F / ‖T‖_F (the abstract does not define it); rank
agreement (Spearman) matters as much, since Grad-TAE's SDP clustering only needs the ordering
to be right. :func:`compare_affinities` reports both on matrices, :func:`compare_results` on the
per-(subset, task) scores they are built from.

Which matrix the distance is taken on matters: on the z-normalized matrices of Grad-TAE (the
default of :meth:`AffinityMatrix.from_results`) relF is scale-free, while on raw-metric
matrices (``normalize=False``, the poster's formula) it is dominated by each task's metric
level, and a metric near its ceiling (accuracy ≈ 0.98) gives a small relF to any matrix with
the right levels, even a constant one (``benchmarks/affinity_accuracy.py`` prints those
baselines).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from hf_tae.errors import TaeError

if TYPE_CHECKING:
    import pandas as pd

    from hf_tae.estimation.affinity import AffinityMatrix


def correlations(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson of two vectors; NaN when either is constant (undefined)."""
    from scipy import stats

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"spearman": float("nan"), "pearson": float("nan")}
    return {
        "spearman": float(stats.spearmanr(a, b).statistic),
        "pearson": float(stats.pearsonr(a, b).statistic),
    }


def compare_affinities(
    estimated: AffinityMatrix, true: AffinityMatrix, include_diagonal: bool = False
) -> dict[str, float | int]:
    """Distance and rank agreement of ``estimated`` to ``true`` over the entries finite in both.

    Off-diagonal entries only unless ``include_diagonal`` (Grad-TAE zeroes the diagonal
    before clustering). Returns ``relative_frobenius`` ‖T̂ − T‖_F / ‖T‖_F, ``mean_abs_error``,
    ``spearman``, ``pearson`` and ``num_entries``. Task names must match in order.
    """
    if list(estimated.task_names) != list(true.task_names):
        only_est = sorted(set(estimated.task_names) - set(true.task_names))
        only_true = sorted(set(true.task_names) - set(estimated.task_names))
        detail = (
            f"only in estimated: {only_est}; only in true: {only_true}"
            if only_est or only_true
            else "same tasks in a different order"
        )
        raise TaeError(
            f"the matrices have different task names ({detail}); build both over the same "
            "task list."
        )
    t_hat, t = estimated.values, true.values
    keep = np.isfinite(t_hat) & np.isfinite(t)
    if not include_diagonal:
        np.fill_diagonal(keep, False)
    if keep.sum() < 2:
        raise TaeError(
            f"only {int(keep.sum())} entries are finite in both matrices; compare matrices "
            "built from subsets that cover the same task pairs."
        )
    a, b = t_hat[keep], t[keep]
    norm = np.linalg.norm(b)
    return {
        "relative_frobenius": float(np.linalg.norm(a - b) / norm) if norm > 0 else float("inf"),
        "mean_abs_error": float(np.abs(a - b).mean()),
        **correlations(a, b),
        "num_entries": int(keep.sum()),
    }


def compare_results(
    estimated_table: pd.DataFrame, true_table: pd.DataFrame, metric: str = "f1"
) -> dict[str, float | int]:
    """Agreement of per-(subset, task) scores, e.g. ``RegressionEstimator.evaluate`` against
    :meth:`SubsetFineTuner.run`, joined on (subset as a sorted task-id tuple, task).

    Rows repeated for a key (one per seed) are averaged first. Returns ``spearman``,
    ``pearson``, ``mean_abs_error`` and ``num_pairs`` over the keys present in both.
    """

    def scores(table: pd.DataFrame, name: str) -> pd.Series:
        missing = [c for c in ("subset", "task", metric) if c not in table]
        if missing:
            raise TaeError(f"{name} lacks columns {missing}; it needs subset, task and {metric!r}.")
        keys = [tuple(sorted(int(t) for t in s)) for s in table["subset"]]
        frame = table.assign(_key=keys)[["_key", "task", metric]]
        return frame.groupby(["_key", "task"])[metric].mean()

    joined = (
        scores(estimated_table, "estimated_table")
        .to_frame("estimated")
        .join(scores(true_table, "true_table").to_frame("true"), how="inner")
    )
    if len(joined) < 2:
        raise TaeError(
            f"only {len(joined)} (subset, task) pairs appear in both tables; score the same "
            "subsets in both."
        )
    a, b = joined["estimated"].to_numpy(float), joined["true"].to_numpy(float)
    return {
        **correlations(a, b),
        "mean_abs_error": float(np.abs(a - b).mean()),
        "num_pairs": len(joined),
    }


def self_agreement(matrices: Sequence[AffinityMatrix]) -> dict[str, float | int]:
    """How well repeats of one affinity agree with each other (seeds of the fine-tuned truth,
    meta-initializations of the estimate).

    Returns ``num_repeats`` m, ``mean_spearman`` r (over every pair, entries as in
    :func:`compare_affinities`), ``min_spearman``, ``mean_relative_frobenius`` and
    ``reliability`` of the m-repeat mean by Spearman–Brown, ``m r / (1 + (m − 1) r)``
    (assumes the repeats' noise is independent and equal; clipped at 0).
    """
    if len(matrices) < 2:
        raise TaeError(
            f"self_agreement needs at least 2 repeats of the affinity, got {len(matrices)}; "
            "fine-tune with several seeds or estimate at several meta-initializations."
        )
    pairs = [compare_affinities(a, b) for n, a in enumerate(matrices) for b in matrices[n + 1 :]]
    rho = np.array([p["spearman"] for p in pairs], dtype=float)
    m, r = len(matrices), float(np.nanmean(rho))
    return {
        "num_repeats": m,
        "mean_spearman": r,
        "min_spearman": float(np.nanmin(rho)),
        "mean_relative_frobenius": float(np.mean([p["relative_frobenius"] for p in pairs])),
        "reliability": _spearman_brown(m, r),
    }


def _spearman_brown(m: int, r: float) -> float:
    """Reliability of an m-repeat mean, clipped at 0 (also for r ≤ −1/(m − 1), e.g. two members
    ranked exactly opposite, where the formula divides by zero); NaN stays NaN."""
    if not np.isfinite(r):
        return float("nan")
    return m * r / (1 + (m - 1) * r) if r > 0 else 0.0


def corrected_spearman(observed: float, *reliabilities: float) -> float:
    """``observed / √(Π reliabilities)``: the Spearman the two matrices would reach without the
    noise whose reliabilities are given (Spearman's correction for attenuation). NaN when a
    reliability is not positive. An estimate under :func:`self_agreement`'s assumptions, not a
    measurement; it can exceed 1 when they fail."""
    if not reliabilities:
        raise TaeError("give the reliability of at least one side (see self_agreement).")
    if min(reliabilities) <= 0:
        return float("nan")
    return float(observed / np.sqrt(np.prod(reliabilities)))
