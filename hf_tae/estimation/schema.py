"""The one results schema of per-(subset, task) scores.

Estimation (:meth:`RegressionEstimator.evaluate <hf_tae.RegressionEstimator.evaluate>`), lifted
scoring, ground truth (:class:`~hf_tae.SubsetFineTuner`) and group training all return tables
with :data:`KEY_COLUMNS` followed by :data:`METRICS`, so an :class:`~hf_tae.AffinityMatrix`,
a comparison or a report reads any of them the same way. Every family fills the same metric
columns; what each means for its tasks is said by its :class:`~hf_tae.families.TaskMetrics`
(binary F1 or macro-F1, binary or multi-class cross-entropy). A metric a source cannot compute
is NaN (an estimate from gold-class log-odds has no F1).
"""

from __future__ import annotations

from collections.abc import Iterable

from hf_tae.errors import TaeError

#: Columns that identify a row: the subset, its position, the target task and its row count.
KEY_COLUMNS = ("subset_id", "subset", "task", "task_name", "num_rows")
#: Per-task metrics, in column order.
METRICS = ("f1", "accuracy", "log_loss")
#: Columns of every results table.
RESULT_COLUMNS = (*KEY_COLUMNS, *METRICS)
#: Metrics where lower is better.
LOWER_IS_BETTER = frozenset({"log_loss"})


def check_metric(metric: str, allowed: Iterable[str] = METRICS, option: str = "metric") -> str:
    """``metric`` if it is one of ``allowed``; else a :class:`TaeError` naming the choices."""
    allowed = list(allowed)
    if metric not in allowed:
        raise TaeError(f"{option} {metric!r} is not one of {allowed}.")
    return metric


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (False for losses)."""
    return metric not in LOWER_IS_BETTER
