"""Steps 3–4: estimate fine-tuned models of task subsets from a gradient store, and turn their
scores into a task-affinity matrix (arrays and stores only: nothing here runs a model)."""

from hf_tae.estimation.adaptive import (
    adaptive_sampling,
    pair_coverage,
    read_clusters,
    sample_round,
)
from hf_tae.estimation.affinity import AffinityMatrix
from hf_tae.estimation.gradient_affinity import (
    fisher_affinity,
    gradient_cosine_affinity,
    ntk_affinity,
)
from hf_tae.estimation.partition import best_nontrivial, choose_partition, partition_payoffs
from hf_tae.estimation.regression import RegressionEstimator, apply_delta
from hf_tae.estimation.regularization import select_l2
from hf_tae.estimation.subsets import all_pairs, sample_subsets

__all__ = [
    "AffinityMatrix",
    "RegressionEstimator",
    "adaptive_sampling",
    "all_pairs",
    "apply_delta",
    "best_nontrivial",
    "choose_partition",
    "fisher_affinity",
    "ntk_affinity",
    "gradient_cosine_affinity",
    "pair_coverage",
    "partition_payoffs",
    "read_clusters",
    "sample_round",
    "sample_subsets",
    "select_l2",
]
