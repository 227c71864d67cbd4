"""GradEx data selection for one instruction template, end to end: LoRA meta-initializations →
gradients of the gold-token log-odds on the adapters → estimated target metric for subsets of
the other templates → every selection method → real training of each choice → report (the
same job as ``hf-tae select instructions``).

    python recipes/select_instructions.py --output_dir runs/select_instructions
    python recipes/select_instructions.py --target min_1 --truth_subsets 0
    python recipes/select_instructions.py --dataset_name super_glue --dataset_config rte \\
        --templates rte_templates.yaml --target rte_imply
    python recipes/select_instructions.py --help

Without other data it runs on the embedded digit skills (four skills, three templates each;
:mod:`hf_tae.families.text.embedded`), with ``even_0`` as the target: the one skill that no
template saturates alone (exact match ~0.5), so there is something for its sources to add; its
siblings ``even_1`` and ``even_2`` are the planted helpful sources. Stages and outputs:
:mod:`hf_tae.selection.run`.
"""

import os

from hf_tae.errors import TaeError
from hf_tae.families.text.family import InstructionArguments, InstructionFamily
from hf_tae.pipeline.arguments import GradientArguments, PipelineArguments
from hf_tae.selection.arguments import SelectionArguments
from hf_tae.selection.cli import build_parser
from hf_tae.selection.run import run_selection
from hf_tae.trainers import MultitaskTrainingArguments


def main(
    text_args: InstructionArguments,
    pipeline_args: PipelineArguments,
    gradient_args: GradientArguments,
    selection_args: SelectionArguments,
    training_args: MultitaskTrainingArguments,
) -> dict:
    """Run the selection job on the instruction family; returns the results (also results.json)."""
    return run_selection(InstructionFamily(), text_args, pipeline_args, gradient_args,
                         selection_args, training_args,
                         command="python recipes/select_instructions.py")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser("instructions", prog="recipes/select_instructions.py")
        parser.set_defaults(output_dir="runs/select_instructions", target="even_0", truth_subsets=10)
        main(*parser.parse_args_and_config())
    except TaeError as err:
        raise SystemExit(f"error: {err}") from err
