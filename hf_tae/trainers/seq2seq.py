"""``Seq2SeqMultitaskTrainer``: the multitask trainer for text tasks (instruction templates).

Adds to :class:`~hf_tae.MultitaskTrainer` what sequence targets need: batches padded on the fly
(:class:`Seq2SeqCollator`), the task id kept for the metrics but not passed to the model, and
per-task metrics from teacher-forced decoder logits (:class:`Seq2SeqTaskMetrics`):

* ``accuracy``: **exact match**. With targets ending in ``</s>``, every target token being the
  argmax under teacher forcing is the same event as greedy decoding producing exactly the
  target and stopping, so no generation loop is needed;
* ``f1``: **token accuracy**, the fraction of target tokens that are the argmax;
* ``log_loss``: the **teacher-forced loss**, the mean over a task's examples of each example's
  mean token cross-entropy.

Logits are reduced to (argmax, gold log-probability) per position before they are gathered,
so evaluation memory does not grow with the vocabulary.

``evaluate_tasks(split, generate=True)`` adds generation metrics (:func:`generation_metrics`):
per-task ROUGE-L and exact match of greedily generated targets, which free-form targets need
(a near miss scores 0 under exact match); optional because ROUGE-L needs ``rouge-score``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from hf_tae.errors import TaeError
from hf_tae.tasks.taskset import TaskSet
from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.trainers.metrics import GenerationTaskMetrics, _TaskMetrics
from hf_tae.trainers.multitask import MultitaskTrainer

IGNORE_INDEX = -100
#: Batch keys the model never sees (the metrics read ``task`` from the labels).
NON_MODEL_KEYS = ("task", "target_class")


def _pad(seqs: Sequence[Any], value: int) -> torch.Tensor:
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in seqs]
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


class Seq2SeqCollator:
    """Pads ``input_ids`` (with ``pad_token_id``), ``attention_mask`` (0) and ``labels``
    (-100) of a list of features to the longest in the batch; stacks ``task``.

    Serves both as a Trainer ``data_collator`` (``collator(features)``) and as a family's
    ``collate_fn`` for gradient collection (``collator(task_set, rows)``).
    """

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]] | TaskSet,
                 rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        pad = self.pad_token_id
        if isinstance(features, TaskSet):
            task_set = features
            pad = task_set.source.pad_token_id if pad is None else pad
            view = task_set.dataset.select_columns(["input_ids", "attention_mask", "labels"])
            features = view.select(np.asarray(rows).tolist()).to_list()
        if pad is None:
            raise ValueError(
                "Seq2SeqCollator needs pad_token_id (or a task set whose source has one)."
            )
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], pad),
            "attention_mask": _pad([f["attention_mask"] for f in features], 0),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX),
        }
        if "task" in features[0]:
            batch["task"] = torch.as_tensor([int(f["task"]) for f in features])
        return batch


def reduce_logits(logits: torch.Tensor | tuple, labels: Any) -> torch.Tensor:
    """``[batch, T, 2]``: the argmax token and the gold token's log-probability at each target
    position (``preprocess_logits_for_metrics``)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    gold = labels[0] if isinstance(labels, (tuple, list)) else labels
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    gold_lp = log_probs.gather(-1, gold.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.stack([logits.argmax(-1).to(log_probs.dtype), gold_lp], dim=-1)


def until_eos(ids: Sequence[int], eos_token_id: int | None) -> list[int]:
    """``ids`` up to (without) the first end-of-sequence token: what a generation or a target
    says, before the padding that batching adds after it."""
    ids = list(ids)
    return ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids


#: ``generate_fn(model, rows, max_new_tokens, tokenizer)``: the generated ids of each row.
GenerateFn = Callable[[Any, list[dict[str, Any]], int, Any], list[list[int]]]


def greedy_targets(model, rows: list[dict[str, Any]], max_new_tokens: int,
                   tokenizer) -> list[list[int]]:  # fmt: skip
    """Greedy decoding of a seq2seq LM on the rows' ``input_ids`` (one batch): the generated
    ids without the decoder start token."""
    batch = Seq2SeqCollator(tokenizer.pad_token_id)(rows)
    device = model.device
    out = model.generate(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return out[:, 1:].tolist()


def generation_metrics(trainer, split: str, generate_fn: GenerateFn) -> dict[str, float]:
    """Per-task ``rougeL`` and ``generated_exact_match`` (:class:`GenerationTaskMetrics`) of
    the trainer's model on the task set's ``split``, keys ``<prefix>_<task>_<metric>`` with the
    prefix of ``evaluate_tasks``.

    Rows are generated in batches of ``per_device_eval_batch_size`` with ``generate_fn``, at
    most as many new tokens as the longest target of the split (``</s>`` included); the
    generations and the targets (the ``labels`` tokens) are cut at ``</s>`` and decoded with the
    task set's tokenizer, so both sides go through the same decoder.
    """
    task_set = trainer.task_set
    if task_set is None:
        raise TaeError("evaluate_tasks needs the trainer to be built with task_set=...")
    scorer = GenerationTaskMetrics(task_set.all_task_names, task_set.task_ids)
    rows = task_set.trainer_dataset(split).with_format(None).to_list()
    if not {"input_ids", "labels"} <= set(rows[0]):
        raise TaeError(
            "generate=True needs tokenized rows (input_ids and labels, e.g. from "
            f"tokenize_text_tasks or tokenize_prompt_completion); the rows have {sorted(rows[0])}."
        )
    tokenizer = getattr(task_set.source, "tokenizer", None) or trainer.processing_class
    eos = tokenizer.eos_token_id
    targets = [[t for t in r["labels"] if t != IGNORE_INDEX] for r in rows]
    max_new_tokens = max(len(t) for t in targets)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    size = trainer.args.per_device_eval_batch_size
    generated: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(rows), size):
            generated += generate_fn(model, rows[start : start + size], max_new_tokens, tokenizer)
    predictions = tokenizer.batch_decode([until_eos(g, eos) for g in generated],
                                         skip_special_tokens=True)  # fmt: skip
    references = tokenizer.batch_decode([until_eos(t, eos) for t in targets],
                                        skip_special_tokens=True)  # fmt: skip
    scores = scorer(predictions, references, [r[task_set.task_column] for r in rows])
    prefix = "eval" if split == "validation" else split
    return {f"{prefix}_{key}": value for key, value in scores.items()}


class Seq2SeqTaskMetrics(_TaskMetrics):
    """``compute_metrics`` for sequence targets: per-task exact match (``accuracy``), token
    accuracy (``f1``) and teacher-forced loss (``log_loss``), and their averages.

    Expects ``predictions`` = :func:`reduce_logits` output ``[rows, T, 2]`` (or raw logits
    ``[rows, T, V]``) and ``label_ids`` = ``(labels, task)`` with ``labels`` -100 off target.
    """

    def per_task(self, predictions: np.ndarray, labels: np.ndarray,
                 task: np.ndarray) -> dict[str, dict[str, float]]:  # fmt: skip
        """``{task_name: {"f1", "accuracy", "log_loss", "support"}}`` for the reported tasks."""
        predictions, labels = np.asarray(predictions, dtype=np.float64), np.asarray(labels)
        task = np.asarray(task).astype(np.int64).reshape(-1)
        if predictions.shape[-1] != 2 or predictions.ndim != 3:
            predictions = reduce_logits(torch.as_tensor(predictions),
                                        torch.as_tensor(labels).long()).numpy()  # fmt: skip
        width = min(predictions.shape[1], labels.shape[1])
        predictions, labels = predictions[:, :width], labels[:, :width]
        valid = labels != IGNORE_INDEX
        correct = (predictions[..., 0].round().astype(np.int64) == labels) & valid
        counts = np.maximum(valid.sum(1), 1)
        exact = (correct | ~valid).all(1) & valid.any(1)
        token_acc = correct.sum(1) / counts
        loss = -np.where(valid, predictions[..., 1], 0.0).sum(1) / counts
        return self._task_means(task, {"f1": token_acc, "accuracy": exact, "log_loss": loss})

    def __call__(self, eval_pred: EvalPrediction) -> dict[str, float]:
        return self._flatten(self.per_task(*self._unpack(eval_pred, "task")))


class Seq2SeqMultitaskTrainer(MultitaskTrainer):
    """:class:`~hf_tae.MultitaskTrainer` for text task sets (rows of ``input_ids``,
    ``attention_mask`` and ``labels`` token lists, e.g. from
    :func:`~hf_tae.families.text.tokenization.tokenize_text_tasks`) and a seq2seq LM.

    Defaults: :class:`Seq2SeqCollator` with the task set's pad id, :class:`Seq2SeqTaskMetrics`,
    :func:`reduce_logits`, ``label_names = ["labels", "task"]``. Everything else, including
    task selection, balanced sampling, gradient collection and the model card, is inherited.
    """

    _tag_names = ["hf-tae", "multitask", "task-affinity", "text2text-generation"]

    def __init__(self, model=None, args=None, task_set: TaskSet | None = None, **kwargs: Any):
        if args is None:
            args = MultitaskTrainingArguments(output_dir="tae-seq2seq")
        if task_set is not None:
            selected = task_set.select(args.tasks) if getattr(args, "tasks", None) else task_set
            kwargs.setdefault("data_collator", Seq2SeqCollator(task_set.source.pad_token_id))
            kwargs.setdefault("compute_metrics",
                              Seq2SeqTaskMetrics(task_set.all_task_names, selected.task_ids))  # fmt: skip
            kwargs.setdefault("preprocess_logits_for_metrics", reduce_logits)
            if args.label_names is None:
                args.label_names = ["labels", task_set.task_column]
        super().__init__(model=model, args=args, task_set=task_set, **kwargs)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        """The model's own loss on the model inputs (the task id stays out of ``forward``)."""
        inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate_tasks(self, split: str = "test", generate: bool = False) -> dict[str, float]:
        """The teacher-forced per-task metrics of :meth:`MultitaskTrainer.evaluate_tasks`; with
        ``generate=True`` also ``<prefix>_<task>_rougeL`` and ``<prefix>_<task>_generated_exact_match``
        of greedy decoding (:func:`generation_metrics`; needs ``pip install hf-tae[text]``)."""
        metrics = super().evaluate_tasks(split)
        if generate:
            metrics.update(generation_metrics(self, split, greedy_targets))
        return metrics
