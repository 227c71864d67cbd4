"""Seeded per-task splits of positives and negatives (as in the Grad-TAE code)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hf_tae.errors import TaeError

SPLIT_NAMES = ("train", "validation", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLIT_NAMES)}


def split_code(split: str) -> int:
    """Code of a split name in the ``split`` label matrix (0 train, 1 validation, 2 test)."""
    if split not in SPLIT_CODES:
        raise TaeError(f"unknown split {split!r}; use one of {list(SPLIT_NAMES)}.")
    return SPLIT_CODES[split]


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise TaeError(
            f"split fractions must be three positive numbers (train, validation, test) summing to 1, "
            f"got {tuple(fractions)}; the paper uses (0.2, 0.2, 0.6)."
        )
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


def per_task_splits(
    labels: np.ndarray, fractions: Sequence[float] = (0.2, 0.2, 0.6), seed: int = 1024
) -> np.ndarray:
    """Split every task's positives and negatives separately into train/validation/test.

    Returns an int8 matrix ``[num_nodes, num_tasks]`` of split codes. As in the reference code,
    positives and negatives of each task are permuted and cut at the same fractions, so every
    split keeps the task's label rate; one generator seeded once serves all tasks in order.
    """
    train_f, val_f, _ = check_fractions(fractions)
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(bool)
    codes = np.empty(labels.shape, dtype=np.int8)
    for task in range(labels.shape[1]):
        for members in (np.flatnonzero(labels[:, task]), np.flatnonzero(~labels[:, task])):
            perm = rng.permutation(members)
            n_train = int(round(train_f * len(perm)))
            n_val = int(round(val_f * len(perm)))
            codes[perm[:n_train], task] = 0
            codes[perm[n_train : n_train + n_val], task] = 1
            codes[perm[n_train + n_val :], task] = 2
    return codes


def check_positives_per_split(
    labels: np.ndarray, split: np.ndarray, task_names: Sequence[str]
) -> None:
    """Raise if a task has no positive example in some split (its F1 would be undefined)."""
    labels = np.asarray(labels).astype(bool)
    for code, name in enumerate(SPLIT_NAMES):
        counts = (labels & (split == code)).sum(axis=0)
        empty = [task_names[t] for t in np.flatnonzero(counts == 0)]
        if empty:
            raise TaeError(
                f"task(s) {empty[:5]}{' …' if len(empty) > 5 else ''} have no positive example in the "
                f"{name!r} split; use larger communities (or fewer, larger ones), or raise the "
                f"{name} fraction of the split."
            )
