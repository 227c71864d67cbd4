"""``SFTMultitaskTrainer``: TRL's ``SFTTrainer`` over a task set of prompt–completion rows.

The causal-LM counterpart of :class:`~hf_tae.trainers.seq2seq.Seq2SeqMultitaskTrainer`
(GradEx's causal-LM setting, gradtae_methods.md B.2): TRL trains with the loss on the
completion only, through its fused LM head, and this subclass adds what the task-affinity
pipeline needs:

* a :class:`~hf_tae.TaskSet` as the data (``args.tasks`` narrows it), rows either tokenized
  (``input_ids`` and ``labels`` with -100 on the prompt, as
  :func:`~hf_tae.families.text.tokenization.tokenize_prompt_completion` builds them; TRL's
  preparation is skipped) or text ``prompt``/``completion`` columns (TRL tokenizes them and
  masks the prompt itself);
* per-task metrics, the same as the seq2seq trainer's (:class:`Seq2SeqTaskMetrics`): exact
  match (``accuracy``), token accuracy (``f1``) and completion loss (``log_loss``), all under
  teacher forcing on the completion tokens, computed from the fused head's per-token outputs
  (no ``[batch, T, vocab]`` logits, no second forward pass);
* the :class:`~hf_tae.MultitaskTrainer` interface the pipeline calls: ``evaluate_tasks``
  (``generate=True`` adds per-task ROUGE-L and exact match of greedy completions, as the
  seq2seq trainer does), ``collect_gradients``, task-balanced sampling and the hf_tae model card.

The pipeline hands every family's Trainer a :class:`~hf_tae.MultitaskTrainingArguments`; TRL
needs an ``SFTConfig``. :class:`SFTMultitaskConfig` is both, and :func:`as_sft_config`
converts the pipeline's arguments into it (the SFT-only fields take their CPU-safe defaults:
``bf16=False``, ``gradient_checkpointing=False``, ``packing=False``; TRL's own defaults are
19.4 s vs 2.5 s for 30 tiny steps on CPU, and padding-free packing attends across sequence
boundaries unless flash attention runs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_tae.errors import TaeError
from hf_tae.tasks.taskset import TaskSet
from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.trainers.multitask import MultitaskTrainer
from hf_tae.trainers.seq2seq import (
    IGNORE_INDEX,
    NON_MODEL_KEYS,
    Seq2SeqTaskMetrics,
    _pad,
    generation_metrics,
)


@dataclass
class SFTMultitaskConfig(MultitaskTrainingArguments, SFTConfig):
    """:class:`~hf_tae.MultitaskTrainingArguments` and TRL's ``SFTConfig`` in one dataclass.

    Defaults that differ from ``SFTConfig``: the multitask ones (evaluation every epoch, best
    checkpoint kept, ``remove_unused_columns=False`` so the ``task`` column reaches the
    metrics), the best checkpoint by average exact match, and CPU-safe training (no bf16, no
    gradient checkpointing, no packing).
    """

    metric_for_best_model: str | None = field(
        default="avg_accuracy",
        metadata={"help": "Metric that picks the best checkpoint (average per-task exact match)."},
    )
    bf16: bool | None = field(
        default=False, metadata={"help": "bf16 mixed precision (off: slow and lossy on CPU)."}
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={
            "help": "Recompute activations in the backward (off: tiny models need no memory)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack sequences (off: without flash attention they attend across rows)."},
    )


def as_sft_config(
    args: TrainingArguments | None, output_dir: str = "tae-sft"
) -> SFTMultitaskConfig:
    """``args`` as an :class:`SFTMultitaskConfig`: the values of every field it has (hub token
    included), the config's defaults for the rest. An ``SFTMultitaskConfig`` passes through."""
    if isinstance(args, SFTMultitaskConfig):
        return args
    if args is None:
        return SFTMultitaskConfig(output_dir=output_dir)
    names = {f.name for f in dataclasses.fields(SFTMultitaskConfig) if f.init}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)
              if f.init and f.name in names}  # fmt: skip
    return SFTMultitaskConfig(**values)


class CompletionCollator:
    """Right-pads unpadded prompt–completion rows: ``input_ids`` (``pad_token_id``),
    ``attention_mask`` (ones over each row's tokens, zeros on padding), ``labels`` (-100);
    stacks ``task`` when the rows have it.

    Serves as the trainer's ``data_collator`` (``collator(features)``) and as the family's
    ``collate_fn`` for gradient collection (``collator(task_set, rows)``: model inputs only).
    """

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]] | TaskSet,
                 rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        pad = self.pad_token_id
        if isinstance(features, TaskSet):
            pad = features.source.pad_token_id if pad is None else pad
            view = features.dataset.select_columns(["input_ids", "labels"])
            features = view.select(np.asarray(rows).tolist()).to_list()
        if pad is None:
            raise TaeError(
                "CompletionCollator needs pad_token_id (or a task set whose source has one)."
            )
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        batch = {
            "input_ids": _pad(ids, pad),
            "attention_mask": _pad([torch.ones_like(i) for i in ids], 0),
            "labels": _pad([f["labels"] for f in features], IGNORE_INDEX),
        }
        if "task" in features[0]:
            batch["task"] = torch.as_tensor([int(f["task"]) for f in features])
        return batch


def greedy_completions(model, rows: list[dict[str, Any]], max_new_tokens: int,
                       tokenizer) -> list[list[int]]:  # fmt: skip
    """Greedy completions of a causal LM after each row's prompt (the ``input_ids`` before the
    first label, one batch): prompts left-padded so generation continues every row at once,
    the returned ids the new tokens only."""
    prompts = [r["input_ids"][: _prompt_length(r["labels"])] for r in rows]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, num_beams=1, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return out[:, width:].tolist()


def _prompt_length(labels: Sequence[int]) -> int:
    """Tokens before the first completion label (-100 marks the prompt)."""
    return next((i for i, t in enumerate(labels) if t != IGNORE_INDEX), len(labels))


class SFTMultitaskTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` on a :class:`~hf_tae.TaskSet` of prompt–completion rows, with
    per-task metrics; a family's ``trainer_class`` for causal LMs.

    Args:
        model: a causal LM, usually a ``PeftModel`` (the family attaches the adapters), or a
            plain one with ``peft_config=`` (e.g. ``trl.get_peft_config(ModelConfig(...))``).
        args: any ``TrainingArguments``; converted by :func:`as_sft_config`.
        task_set: the tasks. Tokenized rows (``input_ids``, ``labels``) are used as they are;
            text rows (``prompt``, ``completion``) are tokenized by TRL with
            ``processing_class``, the prompt masked out of the loss.
        processing_class: the tokenizer (default: the task set source's ``tokenizer``).
        **kwargs: anything ``SFTTrainer`` accepts (``peft_config``, ``callbacks`` …).

    Why not also a :class:`~hf_tae.MultitaskTrainer` subclass: both ``__init__`` methods end in
    ``Trainer.__init__`` and each builds the datasets its own way, so a diamond would run one of
    them half-configured. Its task-set methods are reused as they are instead
    (``evaluate_tasks``, ``collect_gradients``, ``create_model_card``), and task-balanced
    sampling is repeated in ``_get_train_sampler`` (it calls ``super()``).
    """

    _tag_names = ["hf-tae", "multitask", "task-affinity", "trl", "sft"]

    def __init__(self, model=None, args: TrainingArguments | None = None,
                 task_set: TaskSet | None = None, processing_class=None, **kwargs: Any):  # fmt: skip
        args = as_sft_config(args)
        if task_set is not None and args.tasks:
            task_set = task_set.select(args.tasks)
        self.task_set = task_set
        if task_set is not None:
            tokenizer = getattr(task_set.source, "tokenizer", None)
            processing_class = processing_class or tokenizer
            columns = task_set.dataset.column_names
            if "input_ids" in columns and "labels" in columns:
                # rows already carry the completion-only labels; TRL would only re-truncate them
                args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
            elif not {"prompt", "completion"} <= set(columns):
                raise TaeError(
                    f"SFTMultitaskTrainer needs rows with input_ids and labels, or prompt and "
                    f"completion text; the task set has the columns {columns}."
                )
            if processing_class is None or processing_class.pad_token_id is None:
                raise TaeError(
                    f"the tokenizer {type(processing_class).__name__} has no pad token; set one "
                    "first, e.g. tokenizer.pad_token = tokenizer.eos_token."
                )
            args.remove_unused_columns = False  # the task column feeds the metrics
            kwargs.setdefault("train_dataset", task_set.trainer_dataset("train"))
            if args.eval_strategy != "no":
                kwargs.setdefault("eval_dataset", task_set.trainer_dataset("validation"))
            kwargs.setdefault("data_collator", CompletionCollator(processing_class.pad_token_id))
            kwargs.setdefault("compute_metrics",
                              Seq2SeqTaskMetrics(task_set.all_task_names, task_set.task_ids))  # fmt: skip
            if args.label_names is None:
                args.label_names = ["labels", task_set.task_column]
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)

    collect_gradients = MultitaskTrainer.collect_gradients
    create_model_card = MultitaskTrainer.create_model_card

    def evaluate_tasks(self, split: str = "test", generate: bool = False) -> dict[str, float]:
        """The teacher-forced per-task metrics of :meth:`MultitaskTrainer.evaluate_tasks`; with
        ``generate=True`` also ``<prefix>_<task>_rougeL`` and ``<prefix>_<task>_generated_exact_match``
        of greedy completions (:func:`greedy_completions`, stopped at ``</s>``; tokenized rows
        only; needs ``pip install hf-tae[text]``)."""
        metrics = MultitaskTrainer.evaluate_tasks(self, split)
        if generate:
            metrics.update(generation_metrics(self, split, greedy_completions))
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        if self.args.task_balanced_sampling and self.task_set is not None:
            return self.task_set.balanced_sampler("train", seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        """TRL's completion-only loss on the model inputs (the task id stays out of ``forward``)."""
        inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):  # fmt: skip
        """One fused forward: the loss, and per next-token position ``[B, T-1, 2]`` = (the
        gold token where it is the argmax, else -1; the gold token's log-probability), with
        labels ``(shifted labels, task)``, the layout :class:`Seq2SeqTaskMetrics` reads (the
        fused head reports whether the gold token is the argmax, not which token is)."""
        inputs = self._prepare_inputs(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**model_inputs, use_cache=False, fused_lm_head=True)
        loss = outputs.loss.detach()
        if prediction_loss_only:
            return loss, None, None
        gold = model_inputs["labels"][:, 1:]
        top = torch.where(outputs.is_top1.bool(), gold, torch.full_like(gold, -1))
        predictions = torch.stack([top.float(), outputs.log_probs.float()], dim=-1)
        return loss, predictions, (gold, inputs["task"])
