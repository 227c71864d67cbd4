"""``TrainingArguments`` for multitask training (TRL-style dataclass; fields become CLI flags)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

#: TrainingArguments that do not change the trained weights: where and how a run logs, saves,
#: reports and evaluates. Left out of the fingerprints that decide whether results are reused.
RESULT_NEUTRAL_ARGUMENTS = frozenset({
    "output_dir", "logging_dir", "run_name", "disable_tqdm", "report_to", "push_to_hub",
    "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo", "dataloader_pin_memory",
    "logging_steps", "logging_strategy", "save_total_limit", "local_rank",
})  # fmt: skip


@dataclass
class MultitaskTrainingArguments(TrainingArguments):
    r"""Arguments of :class:`~hf_tae.MultitaskTrainer`.

    Adds the task selection, task-balanced sampling and the decision threshold, and changes
    defaults so that training evaluates every epoch and keeps the checkpoint with the best
    average per-task F1 (as the Grad-TAE reference code keeps the best average validation F1).
    """

    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names (or ids) of the tasks to train on; all tasks of the task set when omitted."
        },
    )
    task_balanced_sampling: bool = field(
        default=False,
        metadata={
            "help": "Draw training rows so that every task appears equally often (TaskBalancedSampler)."
        },
    )
    decision_threshold: float = field(
        default=0.0,
        metadata={
            "help": "Logit above which a multi-label prediction counts as positive for F1 and accuracy."
        },
    )
    # Defaults that differ from TrainingArguments (redeclared, as TRL does).
    eval_strategy: str = field(
        default="epoch", metadata={"help": "When to evaluate: 'no', 'steps' or 'epoch'."}
    )
    save_strategy: str = field(
        default="best",
        metadata={
            "help": "When to save: 'no', 'steps', 'epoch' or 'best' (only on a new best metric)."
        },
    )
    load_best_model_at_end: bool = field(
        default=True,
        metadata={"help": "Restore the checkpoint with the best metric_for_best_model at the end."},
    )
    metric_for_best_model: str | None = field(
        default="avg_f1",
        metadata={"help": "Metric that picks the best checkpoint (average of per-task F1)."},
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Keep at most this many checkpoints (the best one is always kept)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep dataset columns such as label_mask that the loss needs."},
    )
    label_names: list[str] | None = field(
        default=None,
        metadata={
            "help": "Input keys that hold labels; defaults to ['labels', 'label_mask'] for multi-label tasks."
        },
    )
    logging_strategy: str = field(
        default="epoch", metadata={"help": "When to log: 'no', 'steps' or 'epoch'."}
    )

    def __getstate__(self) -> dict:
        """Pickle without ``hub_token``: Trainer writes ``training_args.bin`` with ``torch.save``
        and ``push_to_hub`` uploads it, which would publish a token passed as an argument."""
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state


def weight_settings(args: TrainingArguments, ignore: frozenset[str] | set[str] = frozenset()
                    ) -> dict[str, Any]:  # fmt: skip
    """The training arguments that determine the trained weights, as JSON values (every field
    of ``args`` except :data:`RESULT_NEUTRAL_ARGUMENTS` and ``ignore``): what a resumed job
    compares before it reuses a finished run."""
    kept = {k: v for k, v in args.to_dict().items()
            if k not in RESULT_NEUTRAL_ARGUMENTS and k not in ignore}  # fmt: skip
    return json.loads(json.dumps(kept, sort_keys=True, default=str))
