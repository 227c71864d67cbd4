"""Model merging in task subspaces (MaTS): average, task arithmetic, TIES, DARE, diagonal
Fisher, RegMean and conjugate-gradient merging on the RegMean / K-FAC / Fisher objectives,
of full Hugging Face models and peft adapters, streamed tensor by tensor."""

from hf_tae.merging.engine import MergeResult, merge
from hf_tae.merging.registry import (
    METHODS,
    Block,
    TensorStats,
    get_method,
    method_names,
    register_method,
)
from hf_tae.merging.statistics import MergeStatistics
from hf_tae.merging.sweep import SweepResult, merge_sweep
from hf_tae.merging.trackers import compute_statistics

__all__ = [
    "METHODS",
    "Block",
    "MergeResult",
    "MergeStatistics",
    "SweepResult",
    "TensorStats",
    "compute_statistics",
    "get_method",
    "merge",
    "method_names",
    "register_method",
    "merge_sweep",
]
