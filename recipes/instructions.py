"""Instruction templates as tasks, end to end: LoRA meta-initialization of a seq2seq LM →
gradients of the gold-token log-odds on the adapters → estimated affinity → SDP template
groups → one model per group → report (the same job as ``hf-tae run instructions``; the
Grad-TAE text setting: T5 + LoRA, instructions of one dataset as tasks).

    python recipes/instructions.py --output_dir runs/instructions
    python recipes/instructions.py --config recipes/instructions.yaml
    python recipes/instructions.py --dataset_name super_glue --dataset_config rte \\
        --templates rte_templates.yaml --model_name_or_path google/flan-t5-small
    python recipes/instructions.py --bigbench bigbench-1.0.0.tar.gz \\
        --bigbench_tasks word_sorting object_counting sports_understanding
    python recipes/instructions.py --help

Runs on the embedded default (digit skills phrased by several templates each, with planted
groups), on any ``datasets`` source with a template file, on BIG-bench JSON tasks or on a saved
``TextTasks`` (``--text_tasks``). Stages and outputs: :mod:`hf_tae.pipeline.run`.
"""

import os

from hf_tae.errors import TaeError
from hf_tae.families.text.family import InstructionArguments, InstructionFamily
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
    text_args: InstructionArguments,
    pipeline_args: PipelineArguments,
    gradient_args: GradientArguments,
    estimation_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
) -> dict:
    """Run every stage on the instruction family; returns the results (also in results.json)."""
    return run_pipeline(
        InstructionFamily(), text_args, pipeline_args, gradient_args, estimation_args,
        grouping_args, training_args, command="python recipes/instructions.py",
    )  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser(InstructionFamily(), prog="recipes/instructions.py")
        main(*parser.parse_args_and_config())
    except TaeError as err:
        raise SystemExit(f"error: {err}") from err
