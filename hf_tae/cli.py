"""The ``hf-tae`` command line: ``hf-tae run [<family>] [options]`` (the end-to-end job on a
task family, ``graph`` by default), ``hf-tae select <family> --target TASK`` (GradEx data
selection), ``hf-tae merge config.yaml`` (merge fine-tuned models of one base) and
``hf-tae publish <artifact dir> <repo_id>``.

Heavy libraries (torch, transformers) are imported only when a subcommand runs, so ``--help``
answers instantly. The Hub token comes from the usual places (``HF_TOKEN``, ``hf auth login``)
and is never printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hf_tae.errors import TaeError


def _publish(args: argparse.Namespace) -> int:
    from hf_tae.hub import publish

    urls = publish(
        args.artifact_dir,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        commit_message=args.commit_message,
    )
    for kind, url in urls.items():
        print(f"{kind}: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-tae`` parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="hf-tae",
        description="hf_tae: gradient-based task affinity estimation with Hugging Face Trainer.",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    commands.add_parser(
        "run",
        help="the end-to-end job on a task family (graph, images, …): meta-init, gradients, "
        "affinity, groups, group training, report (hf-tae run <family> --help lists its options)",
        add_help=False,
    )
    commands.add_parser(
        "select",
        help="GradEx data selection: which training sources help one target task "
        "(hf-tae select <family> --target TASK; --help lists its options)",
        add_help=False,
    )
    commands.add_parser(
        "merge",
        help="merge fine-tuned models or peft adapters of one base (YAML close to mergekit's: "
        "hf-tae merge config.yaml [output_dir]; hf-tae merge --help for the format)",
        add_help=False,
    )
    publish = commands.add_parser(
        "publish",
        help="publish a model, gradient store, task data or run folder to the Hub",
        description=(
            "Publish an hf_tae artifact folder to the Hugging Face Hub: a saved model "
            "(config.json / adapter_config.json) to a model repo, a GradientStore or a "
            "saved task data folder (CommunityGraph, ImageDomains) to a dataset repo, or a run "
            "folder of hf-tae run / recipes/*.py to REPO_ID (model), REPO_ID-data and "
            "REPO_ID-gradients, with a model card linking them. Prints the commit URLs."
        ),
    )
    publish.add_argument("artifact_dir", help="folder of the artifact to publish")
    publish.add_argument("repo_id", help="target repo, e.g. user/my-meta-init")
    publish.add_argument("--revision", help="branch to push to (created if missing)")
    publish.add_argument(
        "--private",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create the repos private (default: the Hub's default; no effect on existing repos)",
    )
    publish.add_argument("--commit-message", help="commit message of every push")
    publish.set_defaults(handler=_publish)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-tae``; bad inputs print the :class:`TaeError` message and exit with status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # options belong to the job's HfArgumentParser, help included
        from hf_tae.pipeline.run import run

        try:
            run(argv[1:])
        except TaeError as err:
            print(f"hf-tae run: error: {err}", file=sys.stderr)
            return 2
        return 0
    if argv[:1] == ["select"]:
        from hf_tae.selection.cli import main as select_main

        return select_main(argv[1:])
    if argv[:1] == ["merge"]:
        from hf_tae.merging.cli import main as merge_main

        return merge_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TaeError as err:
        parser.exit(2, f"hf-tae {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
