"""Baselines that ignore the inputs, to tell whether a trained model learned anything."""

from __future__ import annotations

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.metrics import f1_score

from hf_tae.tasks.taskset import TaskSet


def label_frequency_baseline(
    task_set: TaskSet, split: str = "test", seed: int = 0
) -> dict[str, float]:
    """Per-task F1 of the best input-blind predictor fit on the task's training labels.

    For each task, scikit-learn ``DummyClassifier`` strategies ``stratified`` (random labels at
    the training positive rate), ``most_frequent`` and ``constant`` positive are fit on the
    train split and scored on ``split``; the best F1 is reported.
    """
    scores: dict[str, float] = {}
    for name, gid in zip(task_set.task_names, task_set.task_ids, strict=True):
        train_rows, eval_rows = task_set.rows(name, "train"), task_set.rows(name, split)
        y_train = task_set._labels[train_rows, gid] > 0.5
        y_eval = task_set._labels[eval_rows, gid] > 0.5
        dummy_x_train, dummy_x_eval = np.zeros((len(y_train), 1)), np.zeros((len(y_eval), 1))
        best = 0.0
        for kwargs in ({"strategy": "stratified", "random_state": seed}, {"strategy": "most_frequent"},
                       {"strategy": "constant", "constant": True}):  # fmt: skip
            clf = DummyClassifier(**kwargs).fit(dummy_x_train, y_train)
            best = max(best, float(f1_score(y_eval, clf.predict(dummy_x_eval), zero_division=0.0)))
        scores[name] = best
    return scores
