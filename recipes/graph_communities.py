"""Graph community detection, end to end: meta-initialization → gradients → estimated affinity
→ SDP task groups → one model per group → report (the same job as ``hf-tae run graph``).

    python recipes/graph_communities.py --output_dir runs/graph_communities
    python recipes/graph_communities.py --config recipes/graph_communities.yaml
    accelerate launch recipes/graph_communities.py --output_dir runs/graph_communities
    python recipes/graph_communities.py --help

Runs on the embedded default (a planted-community graph, generated in seconds), on SNAP files
(``--snap_dir DIR --snap_name youtube``) or on a saved graph (``--dataset PATH_OR_REPO``).
``--meta_init REPO_OR_PATH`` starts from a published meta-initialization; ``--push_to_hub
--hub_model_id you/name`` publishes the trained one with its model card; ``--ground_truth N``
also fine-tunes N sampled subsets for real and reports estimated against true. Stages and
outputs: :mod:`hf_tae.pipeline.run`.
"""

import os

from hf_tae.errors import TaeError
from hf_tae.families.graph.family import GraphArguments, GraphFamily
from hf_tae.pipeline import (
    EstimationArguments,
    GradientArguments,
    GroupingArguments,
    PipelineArguments,
    build_parser,
    run_pipeline,
)
from hf_tae.trainers import MultitaskTrainingArguments


def main(
    graph_args: GraphArguments,
    pipeline_args: PipelineArguments,
    gradient_args: GradientArguments,
    estimation_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
) -> dict:
    """Run every stage on the graph family; returns the results (also in results.json)."""
    return run_pipeline(
        GraphFamily(), graph_args, pipeline_args, gradient_args, estimation_args,
        grouping_args, training_args, command="python recipes/graph_communities.py",
    )  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser(GraphFamily(), prog="recipes/graph_communities.py")
        parser.set_defaults(output_dir="runs/graph_communities")
        main(*parser.parse_args_and_config())
    except TaeError as err:
        raise SystemExit(f"error: {err}") from err
