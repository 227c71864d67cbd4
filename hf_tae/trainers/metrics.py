"""Per-task evaluation metrics computed with scikit-learn, for both task-set layouts.

Every family reports the same three per-task metrics (:data:`hf_tae.estimation.schema.METRICS`),
so that training, estimation, ground truth, group training and the report share one schema:

* ``f1``: binary F1 of multi-label tasks; macro-F1 over the task's classes for single-label
  classification;
* ``accuracy``: the fraction of correct decisions (logit > threshold, or argmax);
* ``log_loss``: the negative log-likelihood of the gold label (binary cross-entropy, or
  cross-entropy over the classes).

``evaluate.load("f1")`` fetches its metric script from the Hub, which many training machines
cannot reach; scikit-learn computes the same numbers offline.

Text tasks can add generation metrics (:class:`GenerationTaskMetrics`): ROUGE-L and exact match
of greedily generated targets, ROUGE-L from the ``rouge-score`` package (offline; optional, the
``text`` extra), as ``evaluate.load("rouge")`` would also need the Hub.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, log_loss
from transformers import EvalPrediction

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS

#: Per-task keys of :class:`GenerationTaskMetrics`.
GENERATION_METRICS = ("rougeL", "generated_exact_match")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _TaskMetrics:
    """Shared part: which tasks to report and the flat ``<task>_<metric>`` / ``avg_<metric>`` keys."""

    def __init__(self, task_names: Sequence[str], task_ids: Sequence[int] | None = None):
        self.task_names = list(task_names)
        self.task_ids = None if task_ids is None else [int(t) for t in task_ids]

    def _flatten(self, scores: dict[str, dict[str, float]],
                 keys: Sequence[str] = METRICS) -> dict[str, float]:  # fmt: skip
        metrics: dict[str, float] = {}
        for name, values in scores.items():
            for key in keys:
                metrics[f"{name}_{key}"] = values[key]
        for key in keys:
            metrics[f"avg_{key}"] = (
                float(np.mean([v[key] for v in scores.values()])) if scores else float("nan")
            )
        return metrics

    def _task_means(self, task: np.ndarray,
                    per_row: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:  # fmt: skip
        """``{task_name: {metric: mean over the task's rows, "support": rows}}`` for the reported
        tasks present in ``task`` (one task id per row), from per-row values ``per_row``."""
        tasks = self.task_ids if self.task_ids is not None else np.unique(task).tolist()
        out: dict[str, dict[str, float]] = {}
        for t in tasks:
            rows = task == t
            if rows.any():
                out[self.task_names[t]] = {
                    **{k: float(v[rows].mean()) for k, v in per_row.items()},
                    "support": float(rows.sum()),
                }
        return out

    @staticmethod
    def _unpack(eval_pred: EvalPrediction, second: str) -> tuple[np.ndarray, ...]:
        logits = eval_pred.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        label_ids = eval_pred.label_ids
        if not isinstance(label_ids, (tuple, list)) or len(label_ids) != 2:
            raise ValueError(
                f"per-task metrics need label_ids = (labels, {second}); set "
                f"TrainingArguments.label_names=['labels', '{second}']."
            )
        return logits, *label_ids


class MultiLabelTaskMetrics(_TaskMetrics):
    """``compute_metrics`` for multi-label models: per-task F1, accuracy and BCE, and averages.

    Expects ``predictions`` = logits ``[rows, num_all_tasks]`` and ``label_ids`` =
    ``(labels, label_mask)``; task ``t`` is scored on the rows where ``label_mask[:, t]`` holds.
    Keys are ``<task>_f1``, ``<task>_accuracy``, ``<task>_log_loss`` and ``avg_f1``,
    ``avg_accuracy``, ``avg_log_loss`` (the Trainer adds the ``eval_`` prefix).

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
        super().__init__(task_names, task_ids)
        self.threshold = threshold

    def per_task(
        self, logits: np.ndarray, labels: np.ndarray, mask: np.ndarray
    ) -> dict[str, dict[str, float]]:
        """``{task_name: {"f1", "accuracy", "log_loss", "support"}}`` for the reported tasks."""
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
                "log_loss": float(
                    log_loss(y, np.clip(_sigmoid(z), 1e-12, 1 - 1e-12), labels=[False, True])
                ),
                "support": float(rows.sum()),
            }
        return out

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        return self._flatten(self.per_task(*self._unpack(eval_pred, "label_mask")))


class SingleLabelTaskMetrics(_TaskMetrics):
    """``compute_metrics`` for single-label classifiers whose rows belong to one task each
    (image domains, templated classification): per-task accuracy, macro-F1 and cross-entropy.

    Expects ``predictions`` = class logits ``[rows, num_classes]`` and ``label_ids`` =
    ``(labels, task)``. Macro-F1 averages over the classes present in the task's gold labels;
    the cross-entropy is over all classes of the logits. Keys as in
    :class:`MultiLabelTaskMetrics` (``f1`` is the macro-F1).

    Args:
        task_names: names of all tasks (``task`` ids index it).
        task_ids: the tasks to report (default: every task present in the rows).
    """

    def per_task(
        self, logits: np.ndarray, labels: np.ndarray, task: np.ndarray
    ) -> dict[str, dict[str, float]]:
        """``{task_name: {"f1", "accuracy", "log_loss", "support"}}`` for the reported tasks."""
        logits = np.asarray(logits, dtype=np.float64)
        labels, task = np.asarray(labels).astype(np.int64), np.asarray(task).astype(np.int64)
        classes = np.arange(logits.shape[1])
        tasks = self.task_ids if self.task_ids is not None else np.unique(task).tolist()
        out: dict[str, dict[str, float]] = {}
        for t in tasks:
            rows = task == t
            if not rows.any():
                continue
            y, z = labels[rows], logits[rows]
            pred = z.argmax(1)
            out[self.task_names[t]] = {
                "f1": float(f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0.0)),
                "accuracy": float(accuracy_score(y, pred)),
                "log_loss": float(log_loss(y, np.clip(_softmax(z), 1e-12, 1.0), labels=classes)),
                "support": float(rows.sum()),
            }
        return out

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        return self._flatten(self.per_task(*self._unpack(eval_pred, "task")))


def rouge_l_scorer():
    """A ``rouge_score`` ROUGE-L scorer without stemming (the package's default tokenizer:
    lower-cased alphanumeric runs); a :class:`~hf_tae.errors.TaeError` naming the extra to
    install when ``rouge-score`` is missing, since it is an optional dependency."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise TaeError(
            "ROUGE-L needs the rouge-score package: pip install hf-tae[text] "
            "(or pip install rouge-score)."
        ) from err
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


class GenerationTaskMetrics(_TaskMetrics):
    """Per-task metrics of generated text against the targets: ``rougeL`` (the mean ROUGE-L
    F-measure of :func:`rouge_l_scorer`) and ``generated_exact_match`` (the fraction of
    generations equal to the target after stripping surrounding whitespace).

    Keys are ``<task>_rougeL``, ``<task>_generated_exact_match`` and their ``avg_`` averages,
    the layout of the other per-task metrics.

    Args:
        task_names: names of all tasks (``task`` ids index it).
        task_ids: the tasks to report (default: every task present in the rows).
    """

    def __init__(self, task_names: Sequence[str], task_ids: Sequence[int] | None = None):
        super().__init__(task_names, task_ids)
        self.scorer = rouge_l_scorer()  # fails before any text is generated

    def per_task(self, predictions: Sequence[str], targets: Sequence[str],
                 task: np.ndarray) -> dict[str, dict[str, float]]:  # fmt: skip
        """``{task_name: {"rougeL", "generated_exact_match", "support"}}``."""
        task = np.asarray(task).astype(np.int64).reshape(-1)
        pairs = list(zip(predictions, targets, strict=True))
        rouge = np.array([self.scorer.score(t, p)["rougeL"].fmeasure for p, t in pairs])
        exact = np.array([p.strip() == t.strip() for p, t in pairs])
        return self._task_means(task, {"rougeL": rouge, "generated_exact_match": exact})

    def __call__(self, predictions: Sequence[str], targets: Sequence[str],
                 task: np.ndarray) -> dict[str, float]:  # fmt: skip
        """The flat ``<task>_<metric>`` and ``avg_<metric>`` keys of :meth:`per_task`."""
        return self._flatten(self.per_task(predictions, targets, task), GENERATION_METRICS)
