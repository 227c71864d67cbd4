"""``hf-tae select <family> --target TASK``: GradEx data selection on a task family.

Parses the family's arguments, :class:`~hf_tae.pipeline.arguments.PipelineArguments`,
:class:`~hf_tae.pipeline.arguments.GradientArguments`,
:class:`~hf_tae.selection.arguments.SelectionArguments` and the training arguments (with the
family's defaults; ``--config x.yaml`` too), then runs :func:`~hf_tae.selection.run.run_selection`.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from typing import Any

from hf_tae.errors import TaeError
from hf_tae.utils.distributed import check_cpu_launch


def build_parser(family: str, prog: str | None = None):
    """The ``hf-tae select`` parser of ``family`` (refuses a multi-process CPU launch without
    ``ACCELERATE_USE_CPU``: :func:`~hf_tae.utils.distributed.check_cpu_launch`)."""
    from trl import TrlParser

    check_cpu_launch()

    from hf_tae.families import family_names, get_family
    from hf_tae.pipeline.arguments import GradientArguments, PipelineArguments
    from hf_tae.selection.arguments import SelectionArguments
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

    fam = get_family(family)
    parser = TrlParser(
        (fam.arguments_class, PipelineArguments, GradientArguments, SelectionArguments,
         MultitaskTrainingArguments),
        prog=prog or f"hf-tae select {fam.name}",
        description=f"GradEx data selection for one target task of the {fam.name!r} family "
        f"({fam.description}). Families: {', '.join(family_names())}.",
    )  # fmt: skip
    parser.set_defaults(output_dir=f"runs/select_{fam.name}", disable_tqdm=False,
                        **fam.training_defaults)  # fmt: skip
    return parser


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``[<family>] options…`` and run the selection job; returns its results."""
    from hf_tae.pipeline.run import split_family
    from hf_tae.selection.run import run_selection

    argv = list(sys.argv[1:] if argv is None else argv)
    family, argv = split_family(argv)
    parsed = build_parser(family).parse_args_and_config(argv)
    command = "hf-tae select " + shlex.join([family, *argv])
    return run_selection(family, *parsed, command=command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: bad inputs print the error and return status 2."""
    try:
        run(argv)
    except TaeError as err:
        print(f"hf-tae select: error: {err}", file=sys.stderr)
        return 2
    return 0
