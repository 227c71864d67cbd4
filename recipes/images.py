"""Image domains as tasks, end to end: meta-initialization → gradients of the gold-class
log-odds → estimated affinity → SDP domain groups → one model per group → report (the same job
as ``hf-tae run images``; the Grad-TAE DomainNet setting).

    python recipes/images.py --output_dir runs/images
    python recipes/images.py --config recipes/images.yaml
    python recipes/images.py --domainnet_root data/domainnet --domains clipart real sketch \\
        --image_size 64 --model_name_or_path microsoft/resnet-18
    accelerate launch recipes/images.py --output_dir runs/images
    python recipes/images.py --help

Runs on the embedded default (scikit-learn's real 8×8 digits under transforms that plant
groups of helpful and interfering domains), on a DomainNet-layout folder or on a saved
``ImageDomains`` (``--dataset``). Stages and outputs: :mod:`hf_tae.pipeline.run`.
"""

import os

from hf_tae.errors import TaeError
from hf_tae.families.image.family import ImageArguments, ImageFamily
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
    image_args: ImageArguments,
    pipeline_args: PipelineArguments,
    gradient_args: GradientArguments,
    estimation_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
) -> dict:
    """Run every stage on the image family; returns the results (also in results.json)."""
    return run_pipeline(
        ImageFamily(), image_args, pipeline_args, gradient_args, estimation_args,
        grouping_args, training_args, command="python recipes/images.py",
    )  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser(ImageFamily(), prog="recipes/images.py")
        main(*parser.parse_args_and_config())
    except TaeError as err:
        raise SystemExit(f"error: {err}") from err
