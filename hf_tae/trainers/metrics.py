"""Per-task evaluation metrics computed with scikit-learn.

``evaluate.load("f1")`` fetches its metric script from the Hub, which many training
machines cannot reach; scikit-learn computes the same numbers offline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss
from transformers import EvalPrediction

METRICS = ("f1", "accuracy", "loss")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


class MultiLabelTaskMetrics:
    """``compute_metrics`` for multi-label models: per-task F1, accuracy and BCE, and averages.

    Expects ``predictions`` = logits ``[rows, num_all_tasks]`` and ``label_ids`` =
    ``(labels, label_mask)``; task ``t`` is scored on the rows where ``label_mask[:, t]`` holds.
    Keys are ``<task>_f1``, ``<task>_accuracy``, ``<task>_loss`` and ``avg_f1``,
    ``avg_accuracy``, ``avg_loss`` (the Trainer adds the ``eval_`` prefix).

    Args:
        task_names: names of all tasks, in logit order.
        task_ids: the tasks to report (default: every task that has masked rows).
        threshold: logit threshold for a positive prediction (0.0 = probability 0.5).
    """

    def __init__(
        self,
        task_names: Sequence[str],
        task_ids: Sequence[int] | None = None,
        threshold: float = 0.0,
    ):
        self.task_names = list(task_names)
        self.task_ids = None if task_ids is None else [int(t) for t in task_ids]
        self.threshold = threshold

    def per_task(
        self, logits: np.ndarray, labels: np.ndarray, mask: np.ndarray
    ) -> dict[str, dict[str, float]]:
        """``{task_name: {"f1", "accuracy", "loss", "support"}}`` for the reported tasks."""
        logits, labels, mask = (np.asarray(a) for a in (logits, labels, mask))
        mask = mask.astype(bool)
        tasks = self.task_ids if self.task_ids is not None else np.flatnonzero(mask.any(0)).tolist()
        out: dict[str, dict[str, float]] = {}
        for t in tasks:
            rows = mask[:, t]
            if not rows.any():
                continue
            y = labels[rows, t] > 0.5
            z = logits[rows, t].astype(np.float64)
            pred = z > self.threshold
            out[self.task_names[t]] = {
                "f1": float(f1_score(y, pred, zero_division=0.0)),
                "accuracy": float(accuracy_score(y, pred)),
                "loss": float(
                    log_loss(y, np.clip(_sigmoid(z), 1e-12, 1 - 1e-12), labels=[False, True])
                ),
                "support": float(rows.sum()),
            }
        return out

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        logits = eval_pred.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        label_ids = eval_pred.label_ids
        if not isinstance(label_ids, (tuple, list)) or len(label_ids) != 2:
            raise ValueError(
                "MultiLabelTaskMetrics needs label_ids = (labels, label_mask); set "
                "TrainingArguments.label_names=['labels', 'label_mask']."
            )
        scores = self.per_task(logits, *label_ids)
        metrics: dict[str, float] = {}
        for name, values in scores.items():
            for key in METRICS:
                metrics[f"{name}_{key}"] = values[key]
        for key in METRICS:
            metrics[f"avg_{key}"] = (
                float(np.mean([v[key] for v in scores.values()])) if scores else float("nan")
            )
        return metrics
