"""A hyperparameter sweep (λ, α, CG iterations, …) that loads the statistics once.

MaTS picks λ/α on the validation split (A.2, A.5, A.10); each point of the grid is a full
in-memory merge, scored by the caller's ``evaluate`` (e.g. the mean validation metric of the
merged model), and the statistics are read from disk once for the whole grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hf_tae.errors import TaeError
from hf_tae.merging.engine import ModelLike, merge
from hf_tae.merging.statistics import MergeStatistics


@dataclass
class SweepResult:
    """Every grid point's parameters and score, and the best one (highest score)."""

    scores: list[tuple[dict[str, Any], float]]
    best_params: dict[str, Any]
    best_score: float


def merge_sweep(
    base: ModelLike | None,
    models: Sequence[ModelLike],
    method: str,
    grid: Sequence[Mapping[str, Any]],
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    *,
    statistics: Sequence[MergeStatistics | str] | None = None,
    **fixed: Any,
) -> SweepResult:
    """Merge with ``fixed`` plus each ``grid`` point and score the merged state dict with
    ``evaluate``; returns all scores and the best point."""
    if not grid:
        raise TaeError("grid is empty; pass e.g. [{'lam': 0.3}, {'lam': 0.5}].")
    stats = None
    if statistics is not None:
        stats = [
            (s if isinstance(s, MergeStatistics) else MergeStatistics.load(s)).in_memory()
            for s in statistics
        ]
    scores = []
    for point in grid:
        params = {**fixed, **point}
        merged = merge(base, models, method, statistics=stats, **params).state_dict
        scores.append((dict(point), float(evaluate(merged))))
    best_params, best_score = max(scores, key=lambda item: item[1])
    return SweepResult(scores, best_params, best_score)
