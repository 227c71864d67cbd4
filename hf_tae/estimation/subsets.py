"""Which task subsets to estimate: uniform samples, all pairs, adaptive cluster-plus-new samples.

Subsets are canonical sorted tuples: tasks given as ints sort numerically (the Grad-TAE
reference code sorted ids as strings, so "10" < "2"), tasks given as names
keep the order of the ``tasks`` list. Sampling is seeded and never repeats a subset.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Hashable, Iterable, Sequence

from hf_tae.errors import TaeError

Task = Hashable
#: Draws per requested subset before giving up on finding new distinct subsets.
MAX_ATTEMPTS_PER_SUBSET = 1000


def _universe(tasks: int | Sequence[Task]) -> list[Task]:
    """Tasks in canonical order: ``range(n)`` for an int, ints sorted numerically, else as given."""
    if isinstance(tasks, int) and not isinstance(tasks, bool):
        if tasks < 1:
            raise TaeError(f"tasks={tasks}: give a positive number of tasks or a list of tasks.")
        return list(range(tasks))
    items = list(tasks)
    if len(set(items)) != len(items):
        raise TaeError(f"tasks has duplicates: {items}; list every task once.")
    if not items:
        raise TaeError("tasks is empty; give the tasks to sample from.")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        items.sort()
    return items


def _check_known(name: str, given: Iterable[Task], universe: Sequence[Task]) -> list[Task]:
    given = list(dict.fromkeys(given))
    unknown = [t for t in given if t not in universe]
    if unknown:
        raise TaeError(f"{name} names unknown tasks {unknown}; the tasks are {list(universe)}.")
    return given


def _sizes(size: int | tuple[int, int], available: int, fixed: int) -> tuple[int, int]:
    lo, hi = (size, size) if isinstance(size, int) else tuple(size)
    if not (isinstance(lo, int) and isinstance(hi, int)) or lo < 1 or lo > hi:
        raise TaeError(f"size={size!r}: give k >= 1 or (min, max) with 1 <= min <= max.")
    if hi > available + fixed:
        raise TaeError(
            f"size={size!r} exceeds the {available + fixed} tasks available to a subset; "
            f"use size <= {available + fixed}."
        )
    if lo < fixed:
        raise TaeError(
            f"size={size!r} is smaller than the {fixed} tasks every subset must include; "
            f"use size >= {fixed}."
        )
    return lo, hi


def _draw(
    pool: list[Task],
    fixed: list[Task],
    universe: list[Task],
    num_subsets: int,
    size: int | tuple[int, int],
    rng: random.Random,
    seen: set[tuple[Task, ...]],
) -> list[tuple[Task, ...]]:
    """Up to ``num_subsets`` new subsets: ``fixed`` plus a uniform draw from ``pool``
    (rejection of repeats; callers check that enough distinct subsets exist)."""
    lo, hi = _sizes(size, len(pool), len(fixed))
    position = {t: i for i, t in enumerate(universe)}
    out: list[tuple[Task, ...]] = []
    for _ in range(MAX_ATTEMPTS_PER_SUBSET * num_subsets):
        if len(out) >= num_subsets:
            break
        k = rng.randint(lo, hi)
        subset = tuple(
            sorted([*fixed, *rng.sample(pool, k - len(fixed))], key=position.__getitem__)
        )
        if subset not in seen:
            seen.add(subset)
            out.append(subset)
    return out


def sample_subsets(
    tasks: int | Sequence[Task],
    num_subsets: int,
    size: int | tuple[int, int],
    seed: int = 0,
    include: Iterable[Task] | None = None,
    exclude_existing: Iterable[Iterable[Task]] | None = None,
) -> list[tuple[Task, ...]]:
    """``num_subsets`` distinct uniformly drawn task subsets (as in Grad-TAE).

    Each subset has a size drawn uniformly from ``size`` (``k`` or ``(min, max)``) and its
    tasks drawn uniformly without replacement; ``include`` tasks are in every subset (and
    count toward the size); subsets in ``exclude_existing`` (e.g. already estimated ones) and
    earlier draws are never returned again. Raises :class:`TaeError` when fewer distinct
    subsets exist than requested.
    """
    universe = _universe(tasks)
    fixed = _check_known("include", include or [], universe)
    pool = [t for t in universe if t not in fixed]
    seen = _canonical_set(exclude_existing, universe)
    if num_subsets < 0:
        raise TaeError(f"num_subsets={num_subsets} must be >= 0.")
    lo, hi = _sizes(size, len(pool), len(fixed))
    possible = sum(math.comb(len(pool), k - len(fixed)) for k in range(lo, hi + 1))
    fresh = possible - sum(1 for s in seen if set(fixed) <= set(s) and lo <= len(s) <= hi)
    if num_subsets > fresh:
        raise TaeError(
            f"num_subsets={num_subsets} but only {fresh} distinct new subsets of size {size} "
            f"exist among {len(universe)} tasks (include={fixed}); ask for at most {fresh}."
        )
    if fresh and num_subsets > fresh // 2:  # dense request: enumerate and shuffle instead
        rng = random.Random(seed)
        every = [
            tuple(sorted([*fixed, *c], key=universe.index))
            for k in range(lo, hi + 1)
            for c in itertools.combinations(pool, k - len(fixed))
        ]
        every = [s for s in every if s not in seen]
        rng.shuffle(every)
        return every[:num_subsets]
    return _draw(pool, fixed, universe, num_subsets, size, random.Random(seed), seen)


def all_pairs(tasks: int | Sequence[Task]) -> list[tuple[Task, Task]]:
    """Every pair of tasks once, in canonical order (Grad-TAE's pairwise affinity)."""
    return list(itertools.combinations(_universe(tasks), 2))


def _canonical_set(
    subsets: Iterable[Iterable[Task]] | None, universe: list[Task]
) -> set[tuple[Task, ...]]:
    position = {t: i for i, t in enumerate(universe)}
    out = set()
    for subset in subsets or []:
        known = _check_known("exclude_existing", subset, universe)
        out.add(tuple(sorted(known, key=position.__getitem__)))
    return out
