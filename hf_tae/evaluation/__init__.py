"""Code that runs real models: ground truth by subset fine-tuning, group training, lifted
scoring of estimates and Grad-TAE's check of its first-order approximation."""

from hf_tae.evaluation.first_order import first_order_check, parameter_delta, score_jvp
from hf_tae.evaluation.ground_truth import SubsetFineTuner, average_seeds, read_runs
from hf_tae.evaluation.group_training import (
    compare_group_training,
    summarize_group_training,
    validated_groups,
)
from hf_tae.evaluation.lifted import evaluate_lifted

__all__ = [
    "SubsetFineTuner",
    "average_seeds",
    "compare_group_training",
    "evaluate_lifted",
    "first_order_check",
    "parameter_delta",
    "read_runs",
    "score_jvp",
    "summarize_group_training",
    "validated_groups",
]
