"""GradEx data selection for one image domain, end to end: meta-initialization → gradients →
estimated target metric for subsets of sources → every selection method → real training of
each choice → report (the same job as ``hf-tae select images``).

    python recipes/select_images.py --output_dir runs/select_images
    python recipes/select_images.py --dataset runs/images/data --head per_task --target upright-clean
    python recipes/select_images.py --help

Without ``--dataset`` it runs on the embedded selection benchmark
(:func:`hf_tae.selection.planted.make_selection_domains`: a target domain with 30 training
digits, helpful, mislabelled and off-view sources; written to ``<output_dir>/planted_data``),
with one shared classification head and 300 steps per run. Stages and outputs:
:mod:`hf_tae.selection.run`.
"""

import os

from hf_tae.errors import TaeError
from hf_tae.families.image.family import ImageArguments, ImageFamily
from hf_tae.pipeline.arguments import GradientArguments, PipelineArguments
from hf_tae.selection.arguments import SelectionArguments
from hf_tae.selection.cli import build_parser
from hf_tae.selection.run import run_selection
from hf_tae.trainers import MultitaskTrainingArguments


def main(
    image_args: ImageArguments,
    pipeline_args: PipelineArguments,
    gradient_args: GradientArguments,
    selection_args: SelectionArguments,
    training_args: MultitaskTrainingArguments,
) -> dict:
    """Run the selection job on the image family; returns the results (also results.json)."""
    if not (image_args.dataset or image_args.domainnet_root):
        from pathlib import Path

        from hf_tae.selection.planted import make_selection_domains

        data = Path(training_args.output_dir) / "planted_data"
        if not data.exists():
            make_selection_domains().save(data)
        image_args.dataset = str(data)
    return run_selection(ImageFamily(), image_args, pipeline_args, gradient_args, selection_args,
                         training_args, command="python recipes/select_images.py")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser("images", prog="recipes/select_images.py")
        parser.set_defaults(output_dir="runs/select_images", head="shared", target="target",
                            max_steps=300, per_device_train_batch_size=32)  # fmt: skip
        main(*parser.parse_args_and_config())
    except TaeError as err:
        raise SystemExit(f"error: {err}") from err
