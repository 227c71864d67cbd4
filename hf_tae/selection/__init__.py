"""GradEx data selection (Li et al., EMNLP Findings 2024): group training rows into sources,
estimate fine-tuning on any subset of sources from gradients at θ0, score it on one target
task, choose sources (random ensemble, forward selection, similarity baselines) and check the
choice by real training (``hf-tae select <family> --target TASK``)."""

from hf_tae.selection.estimate import SourceEstimator, SourceEstimatorEnsemble, SourceView
from hf_tae.selection.planted import make_selection_domains
from hf_tae.selection.select import (
    best_prefix,
    choose_top,
    ensemble_scores,
    forward_pass,
    forward_stepwise,
    gradient_similarity,
    random_subsets,
)
from hf_tae.selection.sources import (
    Sources,
    cluster_gradients,
    sources_from_column,
    sources_from_tasks,
    with_target_rows,
)

__all__ = [
    "SourceEstimator",
    "SourceEstimatorEnsemble",
    "SourceView",
    "Sources",
    "best_prefix",
    "choose_top",
    "cluster_gradients",
    "ensemble_scores",
    "forward_pass",
    "forward_stepwise",
    "gradient_similarity",
    "make_selection_domains",
    "random_subsets",
    "sources_from_column",
    "sources_from_tasks",
    "with_target_rows",
]
