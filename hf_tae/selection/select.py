"""Choosing sources from estimated subset scores (GradEx, Li et al., EMNLP Findings 2024).

* Random ensemble (notes B.2 step 5): a source's score is the mean estimated target metric over
  the sampled subsets that contain it; keep the top k, those above a threshold, or the top k
  whose own estimate is best (:func:`best_prefix`).
* Forward selection, two ways (notes B.2 step 5): GradEx's code makes *one greedy pass* in index
  order, tentatively adding each source and keeping it if the estimate is at least the best so
  far; textbook forward stepwise selection tries *every* remaining source at each step and adds
  the best one.
* Baselines: all sources, random subsets of a given size, and gradient similarity (cosine of
  each source's mean gradient with the target's mean gradient, top k).

Every function takes scores where *higher is better*; negate losses first
(:func:`oriented`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import higher_is_better

if TYPE_CHECKING:
    import pandas as pd

#: ``subsets -> scores`` (higher is better), one score per subset, evaluated in one batch.
ScoreFn = Callable[[list[tuple[int, ...]]], np.ndarray]
#: Two-sided 95% normal quantile for the confidence interval of an ensemble score.
Z95 = 1.959963984540054


def oriented(values, metric: str) -> np.ndarray:
    """``values`` as "higher is better" for ``metric`` (losses negated)."""
    values = np.asarray(values, dtype=np.float64)
    return values if higher_is_better(metric) else -values


def ensemble_scores(subsets: Sequence[Sequence[int]], scores: Sequence[float],
                    num_sources: int, names: Sequence[str] | None = None) -> pd.DataFrame:  # fmt: skip
    """Per source: the mean score of the subsets containing it, with its count and 95% CI.

    Columns ``source``, ``name``, ``score`` (mean over subsets containing the source),
    ``count``, ``std`` (sample standard deviation), ``ci_low``/``ci_high`` (mean ± 1.96
    std/√count; NaN below 2 subsets) and ``rank`` (1 = best). Sources in no subset have NaN
    score and count 0, and rank last.
    """
    import pandas as pd

    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(subsets):
        raise TaeError(f"{len(subsets)} subsets but {len(scores)} scores; give one per subset.")
    member = np.zeros((len(subsets), num_sources), dtype=bool)
    for i, subset in enumerate(subsets):
        member[i, list(subset)] = True
    count = member.sum(0)
    total = member.T.astype(np.float64) @ scores
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        sq = member.T.astype(np.float64) @ scores**2
        var = (sq - count * mean**2) / (count - 1)
        std = np.sqrt(np.clip(var, 0, None))
        half = np.where(count > 1, Z95 * std / np.sqrt(count), np.nan)
    std = np.where(count > 1, std, np.nan)
    table = pd.DataFrame({
        "source": np.arange(num_sources),
        "name": list(names) if names is not None else [str(s) for s in range(num_sources)],
        "score": mean, "count": count, "std": std, "ci_low": mean - half, "ci_high": mean + half,
    })  # fmt: skip
    order = np.lexsort((table["source"], -np.nan_to_num(mean, nan=-np.inf)))
    table.loc[order, "rank"] = np.arange(1, num_sources + 1)
    table["rank"] = table["rank"].astype(int)
    return table


def choose_top(table: pd.DataFrame, k: int | None = None, threshold: float | None = None,
               candidates: Sequence[int] | None = None) -> list[int]:  # fmt: skip
    """Sources of an :func:`ensemble_scores` table: the ``k`` best, or all with score ≥
    ``threshold`` (give one), among ``candidates`` (default all); sorted by id."""
    if (k is None) == (threshold is None):
        raise TaeError("give k (top-k) or threshold, exactly one.")
    pool = table if candidates is None else table[table["source"].isin(list(candidates))]
    pool = pool.sort_values("rank")
    if k is not None:
        check_budget(k, len(pool))
        chosen = pool["source"].iloc[:k]
    else:
        if not math.isfinite(threshold):
            raise TaeError(f"threshold={threshold!r} must be a finite number.")
        chosen = pool["source"][pool["score"] >= threshold]
    return sorted(int(s) for s in chosen)


def best_prefix(score_fn: ScoreFn, ranking: Sequence[int], start: float,
                fixed: Sequence[int] = ()) -> tuple[list[int], np.ndarray]:  # fmt: skip
    """The top-k of ``ranking`` whose estimate is best, over k = 0..len(ranking) (one batch).

    A threshold the estimates choose: each prefix of the ranked sources is scored as a subset
    (k = 0 is ``start``, the score of ``fixed`` alone; ties go to the smaller k). Returns the
    chosen sources and the score of every prefix ``[len(ranking) + 1]``.
    """
    ranking = [int(s) for s in ranking]
    prefixes = [tuple(sorted({*fixed, *ranking[:k]})) for k in range(1, len(ranking) + 1)]
    scores = np.concatenate([[float(start)], np.asarray(score_fn(prefixes), dtype=np.float64)])
    k = int(np.argmax(scores))
    return sorted(ranking[:k]), scores


def check_budget(budget: int | None, num_candidates: int) -> int:
    """``budget`` (sources to choose) if it is an int in 1..num_candidates, else raise."""
    if budget is None:
        return num_candidates
    if not isinstance(budget, int | np.integer) or isinstance(budget, bool) or budget < 1:
        raise TaeError(f"budget={budget!r}: give a number of sources >= 1.")
    if budget > num_candidates:
        raise TaeError(
            f"budget={budget} exceeds the {num_candidates} candidate sources; choose at most "
            f"{num_candidates}."
        )
    return int(budget)


def forward_pass(score_fn: ScoreFn, candidates: Sequence[int], start: float,
                 fixed: Sequence[int] = ()) -> tuple[list[int], pd.DataFrame]:  # fmt: skip
    """GradEx's forward selection as its code runs it: one greedy pass over ``candidates`` in
    the order given; each is tentatively added and kept if the new score is ≥ the best so far.

    ``start`` is the score of ``fixed`` alone (θ0 when nothing is fixed). Returns the chosen
    sources (without ``fixed``) and the trajectory: one row per candidate with ``step``,
    ``source``, ``score`` (with it added), ``best`` (best so far after the step), ``kept``.
    """
    import pandas as pd

    chosen: list[int] = []
    best, rows = float(start), []
    for step, source in enumerate(candidates):
        trial = tuple(sorted({*fixed, *chosen, source}))
        score = float(score_fn([trial])[0])
        kept = score >= best
        if kept:
            chosen.append(int(source))
            best = score
        rows.append({"step": step, "source": int(source), "score": score, "best": best,
                     "kept": kept, "subset": sorted(chosen)})  # fmt: skip
    return sorted(chosen), pd.DataFrame(rows)


def forward_stepwise(score_fn: ScoreFn, candidates: Sequence[int], start: float,
                     fixed: Sequence[int] = (), budget: int | None = None,
                     ) -> tuple[list[int], pd.DataFrame]:  # fmt: skip
    """Textbook forward stepwise selection: at each step score every remaining candidate added
    to the current set (one batch) and add the best, up to ``budget`` sources (default all).

    The answer is the step of the trajectory with the best score (``start``, the score of
    ``fixed`` alone, counts as step 0 with nothing chosen); ties go to the smaller set. Returns
    the chosen sources and the trajectory: ``step``, ``source`` added, ``score``, ``subset``.
    """
    import pandas as pd

    budget = check_budget(budget, len(candidates))
    current: list[int] = []
    remaining = [int(c) for c in candidates]
    rows = [{"step": 0, "source": None, "score": float(start), "subset": []}]
    for step in range(1, budget + 1):
        trials = [tuple(sorted({*fixed, *current, c})) for c in remaining]
        scores = np.asarray(score_fn(trials), dtype=np.float64)
        i = int(np.argmax(scores))  # first best: lowest position among ties
        current.append(remaining.pop(i))
        rows.append({"step": step, "source": current[-1], "score": float(scores[i]),
                     "subset": sorted(current)})  # fmt: skip
    trajectory = pd.DataFrame(rows)
    best = int(np.argmax(trajectory["score"].to_numpy()))
    return list(trajectory["subset"].iloc[best]), trajectory


def random_subsets(candidates: Sequence[int], size: int, count: int,
                   seed: int = 0) -> list[list[int]]:  # fmt: skip
    """``count`` seeded uniform subsets of ``size`` candidates (the random baseline)."""
    check_budget(size, len(candidates))
    rng = random.Random(seed)
    return [sorted(rng.sample(list(candidates), size)) for _ in range(count)]


def gradient_similarity(grad: np.ndarray, source_ids: np.ndarray, num_sources: int,
                        target_grad: np.ndarray) -> np.ndarray:  # fmt: skip
    """Cosine of each source's mean gradient with the target's mean gradient ``[num_sources]``
    (NaN for a source with no rows)."""
    target = np.asarray(target_grad, dtype=np.float64).mean(0)
    out = np.full(num_sources, np.nan)
    for s in range(num_sources):
        rows = grad[source_ids == s]
        if len(rows):
            out[s] = _cosine(rows.mean(0), target)
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else math.nan


def top_k(values: np.ndarray, k: int, candidates: Sequence[int]) -> list[int]:
    """The ``k`` candidates with the largest ``values`` (NaN last; ties by id)."""
    check_budget(k, len(candidates))
    ranked = sorted(candidates, key=lambda s: (-np.nan_to_num(values[s], nan=-np.inf), s))
    return sorted(int(s) for s in ranked[:k])
