"""The end-to-end job for any task family (``hf-tae run <family>``): arguments, stages, the
runner and the report."""

from hf_tae.pipeline.arguments import (
    EstimationArguments,
    GradientArguments,
    GroupingArguments,
    PipelineArguments,
)
from hf_tae.pipeline.run import build_parser, run, run_pipeline

__all__ = [
    "EstimationArguments",
    "GradientArguments",
    "GroupingArguments",
    "PipelineArguments",
    "build_parser",
    "run",
    "run_pipeline",
]
