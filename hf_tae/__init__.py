"""hf_tae: Hugging Face Trainer extensions for gradient-based task affinity estimation.

The public API is imported lazily (as transformers does) so that ``import hf_tae`` is cheap
and so that test utilities in :mod:`hf_tae.testing` can configure ``HF_ENDPOINT`` before any
Hugging Face library is imported. hf_tae's models join transformers' Auto classes as soon as
transformers is imported (see :mod:`hf_tae._auto_registration`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hf_tae import _auto_registration

__version__ = "0.1.0.dev0"

# public name -> submodule that defines it
_LAZY_ATTRS: dict[str, str] = {
    "TaeError": "hf_tae.errors",
    # tasks
    "TaskSet": "hf_tae.tasks.taskset",
    "TaskBalancedSampler": "hf_tae.tasks.sampling",
    "CommunityGraph": "hf_tae.families.graph.data",
    "load_snap_communities": "hf_tae.families.graph.snap",
    "generate_community_graph": "hf_tae.families.graph.generator",
    "sign_features": "hf_tae.families.graph.features",
    # families
    "TaskFamily": "hf_tae.families.base",
    "TaskMetrics": "hf_tae.families.base",
    "register_family": "hf_tae.families",
    "get_family": "hf_tae.families",
    "family_names": "hf_tae.families",
    "GraphFamily": "hf_tae.families.graph.family",
    "GraphArguments": "hf_tae.families.graph.family",
    "ImageFamily": "hf_tae.families.image.family",
    "ImageArguments": "hf_tae.families.image.family",
    "ImageDomains": "hf_tae.families.image.domains",
    "load_domainnet": "hf_tae.families.image.domainnet",
    "make_digit_domains": "hf_tae.families.image.digits",
    "add_pixel_values": "hf_tae.families.image.preprocessing",
    "InstructionFamily": "hf_tae.families.text.family",
    "InstructionArguments": "hf_tae.families.text.family",
    "TextTasks": "hf_tae.families.text.data",
    "TokenizedTextTasks": "hf_tae.families.text.tokenization",
    "tasks_from_templates": "hf_tae.families.text.data",
    "tasks_from_column": "hf_tae.families.text.data",
    "tasks_from_datasets": "hf_tae.families.text.data",
    "Template": "hf_tae.families.text.templates",
    "load_templates": "hf_tae.families.text.templates",
    "read_bigbench": "hf_tae.families.text.bigbench",
    "bigbench_tasks": "hf_tae.families.text.bigbench",
    "make_digit_skills": "hf_tae.families.text.embedded",
    "train_bpe_tokenizer": "hf_tae.families.text.tokenization",
    "tokenize_text_tasks": "hf_tae.families.text.tokenization",
    # models
    "VisionMultiTaskConfig": "hf_tae.models.vision.configuration_vision",
    "VisionForMultiTaskImageClassification": "hf_tae.models.vision.modeling_vision",
    "SignConfig": "hf_tae.models.sign.configuration_sign",
    "SignForMultiTaskNodeClassification": "hf_tae.models.sign.modeling_sign",
    "MultiTaskOutput": "hf_tae.models.sign.modeling_sign",
    "TaskLogitScore": "hf_tae.models.scores",
    "GoldLogOddsScore": "hf_tae.models.scores",
    "TokenLogOddsScore": "hf_tae.models.scores",
    # gradients
    "ProjectedGradientCapture": "hf_tae.gradients.capture",
    "GradientStore": "hf_tae.gradients.store",
    "GradientCollector": "hf_tae.gradients.collector",
    # estimation
    "RegressionEstimator": "hf_tae.estimation.regression",
    "apply_delta": "hf_tae.estimation.regression",
    "AffinityMatrix": "hf_tae.estimation.affinity",
    "sample_subsets": "hf_tae.estimation.subsets",
    "all_pairs": "hf_tae.estimation.subsets",
    "partition_payoffs": "hf_tae.estimation.partition",
    "choose_partition": "hf_tae.estimation.partition",
    "best_nontrivial": "hf_tae.estimation.partition",
    "select_l2": "hf_tae.estimation.regularization",
    "gradient_cosine_affinity": "hf_tae.estimation.gradient_affinity",
    "fisher_affinity": "hf_tae.estimation.gradient_affinity",
    "ntk_affinity": "hf_tae.estimation.gradient_affinity",
    "SubsetFineTuner": "hf_tae.evaluation.ground_truth",
    "average_seeds": "hf_tae.evaluation.ground_truth",
    "read_runs": "hf_tae.evaluation.ground_truth",
    "compare_affinities": "hf_tae.estimation.compare",
    "compare_results": "hf_tae.estimation.compare",
    "self_agreement": "hf_tae.estimation.compare",
    "corrected_spearman": "hf_tae.estimation.compare",
    "first_order_check": "hf_tae.evaluation.first_order",
    "evaluate_lifted": "hf_tae.evaluation.lifted",
    # clustering
    "Grouping": "hf_tae.clustering",
    "SdpSolution": "hf_tae.clustering",
    "partition_objective": "hf_tae.clustering",
    "sdp_relaxation": "hf_tae.clustering",
    "sdp_cluster": "hf_tae.clustering",
    "threshold_rounding": "hf_tae.clustering",
    "kmeans_rounding": "hf_tae.clustering",
    "spectral_cluster": "hf_tae.clustering",
    "kmeans_cluster": "hf_tae.clustering",
    "exhaustive_cluster": "hf_tae.clustering",
    "sweep_k": "hf_tae.clustering",
    "recommend_k": "hf_tae.clustering",
    "affinity_silhouette": "hf_tae.clustering",
    "affinity_silhouette_samples": "hf_tae.clustering",
    "silhouettes_by_member": "hf_tae.clustering",
    "split_incoherent_groups": "hf_tae.clustering",
    # pipeline
    "run_pipeline": "hf_tae.pipeline.run",
    "PipelineArguments": "hf_tae.pipeline.arguments",
    "GradientArguments": "hf_tae.pipeline.arguments",
    "EstimationArguments": "hf_tae.pipeline.arguments",
    "GroupingArguments": "hf_tae.pipeline.arguments",
    # evaluation
    "compare_group_training": "hf_tae.evaluation.group_training",
    "summarize_group_training": "hf_tae.evaluation.group_training",
    "validated_groups": "hf_tae.evaluation.group_training",
    # data selection
    "Sources": "hf_tae.selection.sources",
    "sources_from_tasks": "hf_tae.selection.sources",
    "sources_from_column": "hf_tae.selection.sources",
    "cluster_gradients": "hf_tae.selection.sources",
    "SourceEstimator": "hf_tae.selection.estimate",
    "SourceEstimatorEnsemble": "hf_tae.selection.estimate",
    "SourceView": "hf_tae.selection.estimate",
    "ensemble_scores": "hf_tae.selection.select",
    "choose_top": "hf_tae.selection.select",
    "best_prefix": "hf_tae.selection.select",
    "forward_pass": "hf_tae.selection.select",
    "forward_stepwise": "hf_tae.selection.select",
    "gradient_similarity": "hf_tae.selection.select",
    "random_subsets": "hf_tae.selection.select",
    "make_selection_domains": "hf_tae.selection.planted",
    "run_selection": "hf_tae.selection.run",
    "SelectionArguments": "hf_tae.selection.arguments",
    # merging
    "merge": "hf_tae.merging.engine",
    "MergeResult": "hf_tae.merging.engine",
    "compute_statistics": "hf_tae.merging.trackers",
    "MergeStatistics": "hf_tae.merging.statistics",
    "merge_sweep": "hf_tae.merging.sweep",
    "SweepResult": "hf_tae.merging.sweep",
    "register_method": "hf_tae.merging.registry",
    "method_names": "hf_tae.merging.registry",
    # hub
    "load_meta_init": "hf_tae.hub",
    "publish": "hf_tae.hub",
    # trainers
    "GradientCollectorCallback": "hf_tae.trainers.callbacks",
    "MultitaskTrainingArguments": "hf_tae.trainers.arguments",
    "MultitaskTrainer": "hf_tae.trainers.multitask",
    "Seq2SeqMultitaskTrainer": "hf_tae.trainers.seq2seq",
    "Seq2SeqTaskMetrics": "hf_tae.trainers.seq2seq",
    "Seq2SeqCollator": "hf_tae.trainers.seq2seq",
    "MultiLabelTaskMetrics": "hf_tae.trainers.metrics",
    "SingleLabelTaskMetrics": "hf_tae.trainers.metrics",
    # adaptive sampling and exhaustive truth (notes B.1)
    "adaptive_sampling": "hf_tae.estimation.adaptive",
    "sample_round": "hf_tae.estimation.adaptive",
    "pair_coverage": "hf_tae.estimation.adaptive",
    "read_clusters": "hf_tae.estimation.adaptive",
    "exhaustive_subsets": "hf_tae.evaluation.exhaustive",
    "compare_with_exhaustive": "hf_tae.evaluation.exhaustive",
    "score_partitions": "hf_tae.evaluation.exhaustive",
    # causal LMs through TRL (issue 12)
    "SFTMultitaskTrainer": "hf_tae.trainers.sft",
    "SFTMultitaskConfig": "hf_tae.trainers.sft",
    "CompletionCollator": "hf_tae.trainers.sft",
    "CausalInstructionFamily": "hf_tae.families.text.causal",
    "CausalInstructionArguments": "hf_tae.families.text.causal",
    "tokenize_prompt_completion": "hf_tae.families.text.tokenization",
}

__all__ = ["__version__", *_LAZY_ATTRS]

if TYPE_CHECKING:  # pragma: no cover - static analysers see the real imports
    from hf_tae.clustering import (
        Grouping,
        SdpSolution,
        affinity_silhouette,
        affinity_silhouette_samples,
        exhaustive_cluster,
        kmeans_cluster,
        kmeans_rounding,
        partition_objective,
        recommend_k,
        sdp_cluster,
        sdp_relaxation,
        silhouettes_by_member,
        spectral_cluster,
        split_incoherent_groups,
        sweep_k,
        threshold_rounding,
    )
    from hf_tae.errors import TaeError
    from hf_tae.estimation.adaptive import (
        adaptive_sampling,
        pair_coverage,
        read_clusters,
        sample_round,
    )
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import (
        compare_affinities,
        compare_results,
        corrected_spearman,
        self_agreement,
    )
    from hf_tae.estimation.gradient_affinity import (
        fisher_affinity,
        gradient_cosine_affinity,
        ntk_affinity,
    )
    from hf_tae.estimation.partition import best_nontrivial, choose_partition, partition_payoffs
    from hf_tae.estimation.regression import RegressionEstimator, apply_delta
    from hf_tae.estimation.regularization import select_l2
    from hf_tae.estimation.subsets import all_pairs, sample_subsets
    from hf_tae.evaluation.exhaustive import (
        compare_with_exhaustive,
        exhaustive_subsets,
        score_partitions,
    )
    from hf_tae.evaluation.first_order import first_order_check
    from hf_tae.evaluation.ground_truth import SubsetFineTuner, average_seeds, read_runs
    from hf_tae.evaluation.group_training import (
        compare_group_training,
        summarize_group_training,
        validated_groups,
    )
    from hf_tae.evaluation.lifted import evaluate_lifted
    from hf_tae.families import family_names, get_family, register_family
    from hf_tae.families.base import TaskFamily, TaskMetrics
    from hf_tae.families.graph.data import CommunityGraph
    from hf_tae.families.graph.family import GraphArguments, GraphFamily
    from hf_tae.families.graph.features import sign_features
    from hf_tae.families.graph.generator import generate_community_graph
    from hf_tae.families.graph.snap import load_snap_communities
    from hf_tae.families.image.digits import make_digit_domains
    from hf_tae.families.image.domainnet import load_domainnet
    from hf_tae.families.image.domains import ImageDomains
    from hf_tae.families.image.family import ImageArguments, ImageFamily
    from hf_tae.families.image.preprocessing import add_pixel_values
    from hf_tae.families.text.bigbench import bigbench_tasks, read_bigbench
    from hf_tae.families.text.causal import CausalInstructionArguments, CausalInstructionFamily
    from hf_tae.families.text.data import (
        TextTasks,
        tasks_from_column,
        tasks_from_datasets,
        tasks_from_templates,
    )
    from hf_tae.families.text.embedded import make_digit_skills
    from hf_tae.families.text.family import InstructionArguments, InstructionFamily
    from hf_tae.families.text.templates import Template, load_templates
    from hf_tae.families.text.tokenization import (
        TokenizedTextTasks,
        tokenize_prompt_completion,
        tokenize_text_tasks,
        train_bpe_tokenizer,
    )
    from hf_tae.gradients.capture import ProjectedGradientCapture
    from hf_tae.gradients.collector import GradientCollector
    from hf_tae.gradients.store import GradientStore
    from hf_tae.hub import load_meta_init, publish
    from hf_tae.merging.engine import MergeResult, merge
    from hf_tae.merging.registry import method_names, register_method
    from hf_tae.merging.statistics import MergeStatistics
    from hf_tae.merging.sweep import SweepResult, merge_sweep
    from hf_tae.merging.trackers import compute_statistics
    from hf_tae.models.scores import GoldLogOddsScore, TaskLogitScore, TokenLogOddsScore
    from hf_tae.models.sign.configuration_sign import SignConfig
    from hf_tae.models.sign.modeling_sign import MultiTaskOutput, SignForMultiTaskNodeClassification
    from hf_tae.models.vision.configuration_vision import VisionMultiTaskConfig
    from hf_tae.models.vision.modeling_vision import VisionForMultiTaskImageClassification
    from hf_tae.pipeline.arguments import (
        EstimationArguments,
        GradientArguments,
        GroupingArguments,
        PipelineArguments,
    )
    from hf_tae.pipeline.run import run_pipeline
    from hf_tae.selection.arguments import SelectionArguments
    from hf_tae.selection.estimate import SourceEstimator, SourceEstimatorEnsemble, SourceView
    from hf_tae.selection.planted import make_selection_domains
    from hf_tae.selection.run import run_selection
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
    )
    from hf_tae.tasks.sampling import TaskBalancedSampler
    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments
    from hf_tae.trainers.callbacks import GradientCollectorCallback
    from hf_tae.trainers.metrics import MultiLabelTaskMetrics, SingleLabelTaskMetrics
    from hf_tae.trainers.multitask import MultitaskTrainer
    from hf_tae.trainers.seq2seq import Seq2SeqCollator, Seq2SeqMultitaskTrainer, Seq2SeqTaskMetrics
    from hf_tae.trainers.sft import CompletionCollator, SFTMultitaskConfig, SFTMultitaskTrainer


_auto_registration.install()


def __getattr__(name: str) -> Any:
    module = _LAZY_ATTRS.get(name)
    if module is None:
        raise AttributeError(f"module 'hf_tae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
