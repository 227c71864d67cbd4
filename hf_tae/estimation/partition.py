"""Choosing a partition of the tasks by its predicted payoff.

The estimator predicts the fine-tuned model of any subset (Grad-TAE's step 3), so it can
predict what a whole partition is worth before anything is trained: every group is fitted
once, each task is scored on its held-out rows under its own group's model, and the
partition's *payoff* is the mean of those per-task scores (:func:`partition_payoffs`). With
several meta-initializations (an ensemble of stores) every candidate gets one payoff per
member, and differences between candidates are judged paired across members.

:func:`choose_partition` picks among candidates, which typically are one group (k = 1, all
tasks together), the SDP roundings of the affinity for k = 2 … and single tasks (k = n):

1. the candidates whose payoff is within ``tolerance`` paired standard errors of the best
   one are *tied* with it: the data cannot tell them apart;
2. among the tied candidates, the one with the most group structure wins: the largest
   ``structure`` score (the job passes the grouping's mean silhouette on the affinity, or,
   with ``--partition_choice payoff``, the SDP objective's gain over a shuffled null, 0 unless
   significant; both from :func:`~hf_tae.clustering.sweep_k`); with no structure among them,
   the one with the fewest groups (fewer models, and the one-standard-error rule's choice of
   the simplest model among equals).

Why not the best payoff alone: the linearized estimate of a small group fits that group's own
rows in few directions, which favours small groups by an amount that does not come from
transfer, and payoffs of neighbouring k differ by less than their noise (measured on the
default graph and image jobs, README "Choosing the partition"). The job therefore takes k from
the affinity's silhouette and asks the payoff only whether that grouping beats the trivial
answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import check_metric, higher_is_better

if TYPE_CHECKING:
    from hf_tae.estimation.regression import RegressionEstimator

Partition = Sequence[Sequence[int | str]]


def labels_to_groups(labels: Sequence[int]) -> list[list[int]]:
    """Group ids per task → groups of task ids, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for task, label in enumerate(labels):
        groups.setdefault(int(label), []).append(task)
    return list(groups.values())


def _check_partition(name: str, partition: Partition, estimator: RegressionEstimator):
    """Canonical groups (sorted tuples of task ids) of a partition that covers every task once."""
    if isinstance(partition, str) or not len(partition):
        raise TaeError(f"candidate {name!r} is {partition!r}; give a list of task groups.")
    groups = estimator.canonical(partition)
    seen = [t for g in groups for t in g]
    n = estimator.num_tasks
    if len(seen) != n or set(seen) != set(range(n)):
        repeated = sorted({t for t in seen if seen.count(t) > 1})
        missing = sorted(set(range(n)) - set(seen))
        names = estimator.task_names
        raise TaeError(
            f"candidate {name!r} is not a partition of the {n} tasks: "
            + (f"{[names[t] for t in repeated]} appear in several groups; " if repeated else "")
            + (f"{[names[t] for t in missing]} are in no group; " if missing else "")
            + "put every task in exactly one group."
        )
    return groups


def partition_payoffs(
    estimators: Sequence[RegressionEstimator],
    candidates: Mapping[str, Partition],
    metric: str = "log_loss",
    split: str = "validation",
) -> pd.DataFrame:
    """Predicted payoff of every candidate partition on every estimator (ensemble member).

    Each group of each candidate is fitted once per estimator (groups shared by several
    candidates are fitted once), every task is scored on ``split`` under its group's model,
    and the payoff is the unweighted mean of the per-task ``metric`` (so every task counts
    the same, as in the group-training comparison). Returns one row per ``(candidate,
    member)`` with ``candidate``, ``member``, ``num_groups`` and ``payoff``.
    """
    check_metric(metric)
    if not estimators:
        raise TaeError("no estimators; pass one RegressionEstimator per meta-initialization.")
    if not candidates:
        raise TaeError("no candidates; pass {name: list of task groups}.")
    names = estimators[0].task_names
    for e in estimators[1:]:
        if e.task_names != names:
            raise TaeError(
                f"the estimators disagree on the tasks ({names} vs {e.task_names}); build them "
                "on stores of the same task set."
            )
    partitions = {
        name: _check_partition(name, groups, estimators[0]) for name, groups in candidates.items()
    }
    distinct = sorted({g for groups in partitions.values() for g in groups})
    rows = []
    for member, estimator in enumerate(estimators):
        table = estimator.evaluate(distinct, estimator.fit(distinct), split=split)
        columns = zip(table["subset"], table["task"], table[metric], strict=True)
        score = {(tuple(s), t): v for s, t, v in columns}
        for name, groups in partitions.items():
            values = [score[g, t] for g in groups for t in g]
            if not np.all(np.isfinite(values)):
                raise TaeError(
                    f"the estimated {metric} is not finite for candidate {name!r} (with gold "
                    "log-odds scores F1 is undefined); use log_loss or accuracy."
                )
            rows.append(
                {"candidate": name, "member": member, "num_groups": len(groups),
                 "payoff": float(np.mean(values))}
            )  # fmt: skip
    return pd.DataFrame(rows)


def choose_partition(
    payoffs: pd.DataFrame,
    metric: str = "log_loss",
    structure: Mapping[str, float] | None = None,
    tolerance: float = 1.0,
) -> pd.DataFrame:
    """Summarize :func:`partition_payoffs` per candidate and mark the chosen one.

    ``structure`` maps candidates to a group-structure score (missing: 0). Returns one row per
    candidate (in input order) with ``num_groups``, ``payoff`` (mean over members),
    ``payoff_std``, ``vs_best`` (mean paired difference to the best candidate, signed so that
    negative is worse), ``vs_best_se`` (its standard error over members; NaN with one
    member), ``tied`` (within ``tolerance`` standard errors of the best), ``structure`` and
    ``chosen`` (see the module docstring for the rule).
    """
    need = {"candidate", "member", "num_groups", "payoff"}
    if payoffs.empty or not need <= set(payoffs.columns):
        raise TaeError(f"payoffs needs the columns {sorted(need)}; pass partition_payoffs(...).")
    if not tolerance >= 0:
        raise TaeError(f"tolerance={tolerance}; pass a number of standard errors >= 0.")
    sign = 1.0 if higher_is_better(check_metric(metric)) else -1.0
    wide = payoffs.pivot(index="member", columns="candidate", values="payoff")
    if wide.isna().any().any():
        raise TaeError("every candidate needs a payoff on every member; some are missing.")
    order = list(dict.fromkeys(payoffs["candidate"]))
    utility = sign * wide[order]  # higher is better from here on
    best = utility.mean().idxmax()
    diff = utility.sub(utility[best], axis=0)  # paired: same member, same store
    members = len(utility)
    se = diff.std(ddof=1) / np.sqrt(members) if members > 1 else diff.mean() * np.nan
    groups = payoffs.drop_duplicates("candidate").set_index("candidate")["num_groups"]
    structure = dict(structure or {})
    unknown = set(structure) - set(order)
    if unknown:
        raise TaeError(f"structure names unknown candidates {sorted(unknown)}; use {order}.")
    summary = pd.DataFrame(
        {
            "candidate": order,
            "num_groups": [int(groups[c]) for c in order],
            "payoff": [float(wide[c].mean()) for c in order],
            "payoff_std": [float(wide[c].std(ddof=1)) if members > 1 else 0.0 for c in order],
            "vs_best": [float(diff[c].mean()) for c in order],
            "vs_best_se": [float(se[c]) for c in order],
            "structure": [float(structure.get(c, 0.0)) for c in order],
        }
    )
    gap = -summary["vs_best"]
    summary["tied"] = (gap <= 0) | (gap <= tolerance * summary["vs_best_se"].fillna(0.0))
    tied = summary[summary["tied"]].sort_values(
        ["structure", "num_groups"], ascending=[False, True], kind="stable"
    )
    summary["chosen"] = summary["candidate"] == tied["candidate"].iloc[0]
    return summary


def best_nontrivial(
    payoffs: pd.DataFrame,
    trivial: Sequence[str],
    metric: str = "log_loss",
    structure: Mapping[str, float] | None = None,
    tolerance: float = 1.0,
) -> str | None:
    """The candidate :func:`choose_partition` picks when the ``trivial`` ones (all tasks,
    single tasks) are left out, or None when no other candidate exists.

    The job trains both trivial answers anyway as baselines; when the payoff rule picks one of
    them, training this proposal as the groups instead lets validation decide between a real
    grouping and the trivial answers rather than between a trivial answer and itself.
    """
    rest = payoffs[~payoffs["candidate"].isin(list(trivial))]
    if rest.empty:
        return None
    kept = {c: v for c, v in (structure or {}).items() if c in set(rest["candidate"])}
    table = choose_partition(rest, metric, kept, tolerance)
    return str(table.loc[table["chosen"], "candidate"].iloc[0])
