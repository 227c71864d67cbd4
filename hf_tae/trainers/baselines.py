"""Baselines that ignore the inputs, to tell whether a trained model learned anything."""

from __future__ import annotations

import numpy as np
from sklearn.dummy import DummyClassifier
from sklearn.metrics import accuracy_score, f1_score

from hf_tae.errors import TaeError
from hf_tae.tasks.taskset import TaskSet

_STRATEGIES = (
    {"strategy": "stratified"},
    {"strategy": "most_frequent"},
    {"strategy": "constant", "constant": True},
)


def label_frequency_baseline(
    task_set: TaskSet, split: str = "test", seed: int = 0, metric: str = "f1"
) -> dict[str, float]:
    """Per-task ``metric`` (``"f1"`` or ``"accuracy"``) of the best input-blind predictor fit on
    the task's training labels.

    For each task, scikit-learn ``DummyClassifier`` strategies ``stratified`` (random labels at
    the training label frequencies), ``most_frequent`` and, for binary tasks, ``constant``
    positive are fit on the train split and scored on ``split``; the best score is reported.
    F1 is binary for multi-label tasks and macro-averaged over the task's classes otherwise, as
    in the trainer's metrics.
    """
    if metric not in ("f1", "accuracy"):
        raise TaeError(f"metric {metric!r} is not one of ['f1', 'accuracy'].")
    scores: dict[str, float] = {}
    for name in task_set.task_names:
        y_train, y_eval = (task_set.labels(name, s) for s in ("train", split))
        strategies = _STRATEGIES if task_set.is_multilabel else _STRATEGIES[:2]
        best = 0.0
        for kwargs in strategies:
            kwargs = {**kwargs, "random_state": seed} if kwargs["strategy"] == "stratified" else kwargs
            clf = DummyClassifier(**kwargs).fit(np.zeros((len(y_train), 1)), y_train)
            pred = clf.predict(np.zeros((len(y_eval), 1)))
            if metric == "accuracy":
                score = accuracy_score(y_eval, pred)
            elif task_set.is_multilabel:
                score = f1_score(y_eval, pred, zero_division=0.0)
            else:
                score = f1_score(y_eval, pred, labels=np.unique(y_eval), average="macro",
                                 zero_division=0.0)  # fmt: skip
            best = max(best, float(score))
        scores[name] = best
    return scores
