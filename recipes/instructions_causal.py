"""Instruction templates as tasks with a causal LM, end to end: LoRA meta-initialization of a
causal LM by TRL's SFTTrainer (loss on the completion only) → gradients of the completion's
gold-token log-odds on the adapters → estimated affinity → SDP template groups → one model per
group → report (the same job as ``hf-tae run instructions_causal``; GradEx's causal-LM setting,
gradtae_methods.md B.2, on Grad-TAE's instructions-as-tasks).

    python recipes/instructions_causal.py --output_dir runs/instructions_causal
    python recipes/instructions_causal.py --config recipes/instructions_causal.yaml
    python recipes/instructions_causal.py --dataset_name super_glue --dataset_config rte \\
        --templates rte_templates.yaml --model_name_or_path HuggingFaceTB/SmolLM2-135M \\
        --lora_target_modules q_proj k_proj v_proj o_proj
    python recipes/instructions_causal.py --adapter ia3
    python recipes/instructions_causal.py --help

Runs on the embedded default (digit skills phrased by several templates each, with planted
groups; a tiny GPT-2 built from config), on any ``datasets`` source with a template file, on
BIG-bench JSON tasks or on a saved ``TextTasks`` (``--text_tasks``). Stages and outputs:
:mod:`hf_tae.pipeline.run`.
"""

import os

from hf_tae.errors import TaeError
from hf_tae.families.text.causal import CausalInstructionArguments, CausalInstructionFamily
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
    text_args: CausalInstructionArguments,
    pipeline_args: PipelineArguments,
    gradient_args: GradientArguments,
    estimation_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
) -> dict:
    """Run every stage on the causal instruction family; returns the results (also in
    results.json)."""
    return run_pipeline(
        CausalInstructionFamily(), text_args, pipeline_args, gradient_args, estimation_args,
        grouping_args, training_args, command="python recipes/instructions_causal.py",
    )  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        parser = build_parser(CausalInstructionFamily(), prog="recipes/instructions_causal.py")
        main(*parser.parse_args_and_config())
    except TaeError as err:
        raise SystemExit(f"error: {err}") from err
