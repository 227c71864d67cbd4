"""Step 3–4: estimate fine-tuned models of task subsets from a gradient store, and turn their
scores into a task-affinity matrix (works on arrays and stores only; no model imports)."""

from hf_tae.estimation.affinity import AffinityMatrix
from hf_tae.estimation.first_order import first_order_check, parameter_delta, score_jvp
from hf_tae.estimation.lifted import evaluate_lifted
from hf_tae.estimation.regression import RegressionEstimator, apply_delta
from hf_tae.estimation.subsets import all_pairs, sample_adaptive, sample_subsets

__all__ = [
    "AffinityMatrix",
    "RegressionEstimator",
    "all_pairs",
    "apply_delta",
    "evaluate_lifted",
    "first_order_check",
    "parameter_delta",
    "sample_adaptive",
    "sample_subsets",
    "score_jvp",
]
