"""The end-to-end Grad-TAE job for any task family (``hf-tae run <family>``).

Stages, each timed and reported:

1. **meta-initializations**: ``--num_meta_inits`` :class:`~hf_tae.MultitaskTrainer` runs on all
   tasks with seeds seed, seed+1, … (an ensemble whose estimates are averaged), or
   ``--meta_init`` to start from a saved or published one;
2. **gradients**: projected per-example gradients of the family's score at each θ0 in a
   :class:`~hf_tae.GradientStore`, without the family's task-private parameters;
3. **estimation**: :class:`~hf_tae.RegressionEstimator` fits for ``--num_subsets`` sampled task
   subsets on every store, no training;
4. **affinity**: one :class:`~hf_tae.AffinityMatrix` per θ0 from the estimated per-task
   scores, averaged;
5. **grouping**: :func:`~hf_tae.sdp_cluster` with k from ``--num_task_groups`` or chosen by
   :func:`~hf_tae.sweep_k`;
6. **group training**: one model per group against one model on all tasks, one per task and
   the planted groups when the data has them (:func:`~hf_tae.compare_group_training`); with
   ``--merge_methods``, the group models merged into one model per method join the comparison
   (:func:`~hf_tae.pipeline.stages.merge_groups`, outputs in ``merged/``);
7. optional **ground truth**: ``--ground_truth N`` fine-tunes N of the sampled subsets for real
   (each with every ``--ground_truth_seeds``) and compares them with their estimates, against
   the ceiling set by the noise of both sides (:func:`~hf_tae.self_agreement`);
8. optional **exhaustive truth**: ``--ground_truth_exhaustive K`` fine-tunes all C(n, K) subsets
   and compares the chosen grouping with an exhaustive search over partitions on the true
   affinities (:mod:`hf_tae.pipeline.exhaustive`).

``--sampling adaptive`` draws stage 3's subsets from one current cluster plus new tasks, round
by round (:mod:`hf_tae.pipeline.adaptive`, notes B.1).

Everything family-specific (data, model, score, private parameters, metrics, planted groups,
fingerprint) comes from the :class:`~hf_tae.families.TaskFamily`. Outputs in ``--output_dir``:
``report.md``, ``results.json``, PNGs, ``meta_init/``, ``data/``, ``gradients/``,
``ensemble/member_*/``, ``affinity/``, ``groups.json`` and the resumable ``group_training/`` and
``ground_truth/`` runs. A rerun reuses every meta-initialization whose fingerprint (data and
weight-changing arguments) still matches. Runs under ``accelerate launch`` too: training is
data-parallel, gradient collection and the comparison runs are shared across processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS
from hf_tae.evaluation.ground_truth import trainer_generates
from hf_tae.families import TaskFamily, family_names, get_family
from hf_tae.pipeline import stages
from hf_tae.pipeline.arguments import (
    EstimationArguments,
    GradientArguments,
    GroupingArguments,
    PipelineArguments,
    check_arguments,
)
from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.utils.distributed import check_cpu_launch
from hf_tae.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

PIPELINE_ARGUMENTS = (
    PipelineArguments,
    GradientArguments,
    EstimationArguments,
    GroupingArguments,
    MultitaskTrainingArguments,
)


def build_parser(family: str | TaskFamily, prog: str | None = None):
    """The job's parser for ``family``: its arguments dataclass, the pipeline's and the training
    arguments, with the family's training defaults; ``--config x.yaml`` sets defaults too.
    Refuses a multi-process CPU launch without ``ACCELERATE_USE_CPU`` (parsing would reset it
    to one process per rank: :func:`~hf_tae.utils.distributed.check_cpu_launch`)."""
    from trl import TrlParser

    check_cpu_launch()

    family = get_family(family)
    description = (
        f"hf_tae end-to-end job on the {family.name!r} family ({family.description}). "
        f"Families: {', '.join(family_names())} (hf-tae run <family> --help for each). "
        "--config FILE.yaml sets any option; flags override it."
    )
    parser = TrlParser((family.arguments_class, *PIPELINE_ARGUMENTS), prog=prog,
                       description=description)  # fmt: skip
    parser.set_defaults(
        output_dir=f"runs/{family.name}",
        disable_tqdm=False,
        **family.training_defaults,
        **family.pipeline_defaults,
    )
    return parser


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    logger.info("stage %s", name)
    start = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)


def run_pipeline(
    family: str | TaskFamily,
    family_args: Any,
    pipeline_args: PipelineArguments,
    grad_args: GradientArguments,
    est_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
    command: str = "",
) -> dict[str, Any]:
    """Run every stage for ``family`` and return ``results`` (also in ``results.json``).

    With ``--disable_tqdm true`` no stage shows a progress bar (tqdm, ``datasets``,
    ``huggingface_hub``, ``transformers``); the libraries' switches are restored afterwards."""
    from hf_tae.utils.progress import progress_bars_disabled

    with progress_bars_disabled(bool(training_args.disable_tqdm)):
        return _run_pipeline(family, family_args, pipeline_args, grad_args, est_args,
                             grouping_args, training_args, command)  # fmt: skip


def _run_pipeline(
    family: str | TaskFamily,
    family_args: Any,
    pipeline_args: PipelineArguments,
    grad_args: GradientArguments,
    est_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
    command: str = "",
) -> dict[str, Any]:
    import torch
    from accelerate import PartialState

    from hf_tae.pipeline.report import plot_estimated_vs_true, plot_grouping_gains, write_report
    from hf_tae.utils.plots import plot_task_scores

    family = get_family(family)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    check_arguments(est_args, grouping_args)
    if not pipeline_args.meta_init_widenings >= 0:
        raise TaeError(f"--meta_init_widenings must be >= 0 (0: never widen), got "
                       f"{pipeline_args.meta_init_widenings}.")  # fmt: skip
    if not 0 < pipeline_args.early_meta_init_fraction <= 1:
        raise TaeError(f"--early_meta_init_fraction must be in (0, 1] (1: no early θ0), got "
                       f"{pipeline_args.early_meta_init_fraction}.")  # fmt: skip
    if grouping_args.generation_metrics and not trainer_generates(family.trainer_class):
        raise TaeError(f"--generation_metrics needs a family whose trainer generates text (the "
                       f"text families); {family.name!r} does not. Drop the flag.")  # fmt: skip
    if grouping_args.merge_methods and training_args.world_size > 1:
        raise TaeError("--merge_methods runs in one process; run the job without a multi-process "
                       "launch (a rerun reuses the finished stages).")  # fmt: skip
    metric = est_args.affinity_metric or family.metrics.affinity
    if metric not in family.metrics.estimated:
        raise TaeError(
            f"--affinity_metric {metric!r} cannot be estimated for the {family.name!r} family; "
            f"use one of {list(family.metrics.estimated)}."
        )
    est_args = dataclasses.replace(est_args, affinity_metric=metric)
    if not torch.cuda.is_available():  # pinning needs an accelerator; avoid torch's warning
        training_args.dataloader_pin_memory = False
    output_dir = Path(training_args.output_dir)
    timings: dict[str, float] = {}
    with _stage(timings, "data"):
        tasks = family.load_tasks(family_args)
    logger.info("%s", tasks)
    for flag, value in (("--subset_size", est_args.subset_size),
                        ("--num_task_groups", grouping_args.num_task_groups)):  # fmt: skip
        if est_args.estimate and value > tasks.num_tasks:
            raise TaeError(
                f"{flag} {value} exceeds the {tasks.num_tasks} tasks; use at most {tasks.num_tasks}."
            )
    if est_args.estimate:  # --initial_clusters and --ground_truth_exhaustive, before training
        from hf_tae.pipeline.adaptive import check_sampling
        from hf_tae.pipeline.exhaustive import check_exhaustive

        check_sampling(est_args, tasks.task_names)
        check_exhaustive(grouping_args, tasks.num_tasks)
    selection = family.metrics.selection
    results: dict[str, Any] = {
        "family": family.name,
        "data": family.describe(tasks),
        "command": command,
        "tasks": tasks.task_names,
        "metrics": {
            "selection": selection,
            "affinity": metric,
            "labels": {m: family.metrics.label(m) for m in METRICS},
        },
        "world_size": training_args.world_size,
        "timings": timings,
    }
    planted = family.planted_groups(tasks)
    if planted is not None:  # one label per task, in ``tasks`` order
        results["planted_labels"] = [int(g) for g in planted]
    is_main = PartialState().is_main_process

    def save_results() -> None:
        if PartialState().is_main_process:
            atomic_write_text(
                output_dir / "results.json", json.dumps(results, indent=2, default=float)
            )

    members = 1 if pipeline_args.meta_init or not est_args.estimate else est_args.num_meta_inits
    stores = []
    # the subsets' regression fits on early θ0s (not for a given --meta_init: nothing to stop)
    early = (est_args.estimate and not pipeline_args.meta_init
             and pipeline_args.early_meta_init_fraction < 1)  # fmt: skip
    early_stores = []
    meta_args = family_args  # the model of every θ0: the user's, or wider if that learned nothing
    for member in range(members):
        # the members other than 0 only feed the averaged affinity (ensembles)
        run_dir, member_args = stages.member_run(output_dir, training_args, member)
        with _stage(timings, "meta-initialization"):
            if member == 0:
                trainer, meta, meta_args = stages.train_meta_init_that_learns(
                    family, family_args, tasks, pipeline_args, member_args, run_dir)  # fmt: skip
            else:
                trainer, meta = stages.train_meta_init(
                    family, meta_args, tasks, pipeline_args, member_args, run_dir,
                    save_data=False,
                )  # fmt: skip
        if member == 0:
            results["meta_init"] = meta
            save_results()
            if is_main:
                scores = {"meta-initialization": meta["test_per_task"]}
                if meta.get("baseline_per_task"):
                    scores["label-frequency baseline"] = meta["baseline_per_task"]
                plot_task_scores(scores, output_dir / f"test_{selection}_per_task.png",
                                 ylabel=f"test {family.metrics.label(selection)}")  # fmt: skip
        else:
            results.setdefault("ensemble", []).append(
                {"seed": member_args.seed, "test_avg": meta["test_avg"]}
            )
        if not (grad_args.collect_gradients or est_args.estimate):
            continue
        with _stage(timings, "gradients"):
            store, exclude = stages.collect_member_gradients(trainer, family, meta_args,
                                                             grad_args, run_dir, member)  # fmt: skip
            stores.append(store)
        if member == 0:
            results["gradients"] = {
                "path": str(output_dir / "gradients"),
                "rows": len(stores[0]),
                "dim": stores[0].dim,
                "excluded": exclude,
            }
            save_results()
        if early:
            with _stage(timings, "early meta-initialization"):
                store, early_meta = stages.early_meta_init_store(
                    family, meta_args, tasks, pipeline_args, grad_args, member_args, run_dir,
                    member, only_if_learned=member == 0)  # fmt: skip
            if member == 0:
                results["meta_init"]["early"] = early_meta
                early = early_meta["used"]  # one that learned nothing: the trained θ0s, all
            else:
                results["ensemble"][-1]["early_test_avg"] = early_meta["test_avg"]
            if store is not None:
                early_stores.append(store)
            save_results()
    subset_stores = early_stores if early else stores
    if est_args.estimate:
        if is_main:  # cheap: one process estimates and clusters, the others wait
            with _stage(timings, "estimation + affinity"):
                subsets, affinity, results["estimation"], member_matrices = stages.estimate_affinity(
                    stores, tasks, est_args, planted, grouping_args, subset_stores=subset_stores
                )
            results["estimation"]["subset_gradients"] = [str(s.path) for s in subset_stores]
            # --estimator_l2 auto is resolved once; the partition choice uses the same λ
            est_args = dataclasses.replace(
                est_args, estimator_l2=results["estimation"]["estimator_l2"]
            )
            estimates = affinity.results
            with _stage(timings, "grouping"):
                results["grouping"] = stages.choose_groups(
                    affinity, grouping_args, planted, stores, est_args, member_matrices,
                    subset_stores=subset_stores,
                )
            order = [tasks.task_names.index(t) for g in results["grouping"]["groups"] for t in g]
            affinity.save(output_dir / "affinity", overwrite=True, group_order=order)
            affinity.plot(output_dir / "affinity_by_group.png", order=order)
            atomic_write_text(
                output_dir / "groups.json", json.dumps(results["grouping"], indent=2, default=float)
            )
            save_results()
        PartialState().wait_for_everyone()
        results = json.loads((output_dir / "results.json").read_text()) | {"timings": timings}
        if not is_main:
            from hf_tae.estimation.affinity import AffinityMatrix
            from hf_tae.estimation.subsets import sample_subsets

            affinity = AffinityMatrix.load(output_dir / "affinity")
            estimates = affinity.results
            if est_args.sampling == "adaptive":  # the subsets drawn, in subset_id order
                first = estimates.drop_duplicates("subset_id").sort_values("subset_id")
                subsets = [tuple(s) for s in first["subset"]]
            else:
                subsets = sample_subsets(
                    tasks.num_tasks,
                    results["estimation"]["num_subsets"],
                    est_args.subset_size,
                    seed=est_args.subset_seed,
                )
        model_init = stages.fresh_model(family, family_args, tasks, output_dir,
                                        grouping_args.group_init)  # fmt: skip
        init_print = stages.init_fingerprint(family, family_args, tasks, output_dir,
                                             grouping_args.group_init)  # fmt: skip
        if grouping_args.train_groups:
            with _stage(timings, "group training"):
                results["group_training"] = stages.train_groups(
                    model_init, tasks, results["grouping"]["groups"], training_args,
                    grouping_args, output_dir, planted, selection, family.trainer_class,
                    fingerprint=init_print, private_parameters=family.private_parameters,
                )  # fmt: skip
            if is_main:
                per_task = results["group_training"]["per_task"]
                label = family.metrics.label(selection)
                plot_grouping_gains(
                    {t: s["grouped"] - s["all tasks"] for t, s in per_task.items()},
                    results["grouping"]["groups"],
                    output_dir / "grouping_gains.png",
                    f"test {label}: one model per group minus one model on all tasks",
                    ylabel=f"{label} gain",
                )
        if grouping_args.ground_truth:
            with _stage(timings, "ground truth"):
                starts = stages.truth_starts(family, family_args, tasks, grouping_args,
                                             training_args, output_dir, members)  # fmt: skip
                joined, results["ground_truth"] = stages.run_ground_truth(
                    starts, tasks, subsets, estimates, est_args, grouping_args,
                    training_args, output_dir, results["estimation"]["seconds"],
                    family.trainer_class, group_labels=results.get("grouping", {}).get("labels"),
                    planted=planted,
                )  # fmt: skip
            if is_main:
                plot_estimated_vs_true(
                    joined[f"{metric}_est"], joined[f"{metric}_true"],
                    output_dir / "estimated_vs_true.png", family.metrics.label(metric),
                )  # fmt: skip
        if grouping_args.ground_truth_exhaustive:
            from hf_tae.pipeline.exhaustive import run_exhaustive_truth

            with _stage(timings, "exhaustive truth"):
                results["exhaustive_truth"] = run_exhaustive_truth(
                    model_init, tasks, affinity, results["grouping"], est_args, grouping_args,
                    training_args, output_dir, family.trainer_class,
                )  # fmt: skip
    save_results()
    if is_main:
        write_report(results, output_dir)
        _print_summary(results, output_dir)
    PartialState().wait_for_everyone()
    return results


def split_family(argv: Sequence[str], default: str = "graph") -> tuple[str, list[str]]:
    """``(family, rest)`` from ``[<family>] [--family NAME] options…``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    if "--family" in argv:
        i = argv.index("--family")
        if i + 1 >= len(argv):
            raise TaeError(f"--family needs a name; known families: {family_names()}.")
        return argv[i + 1], argv[:i] + argv[i + 2 :]
    return default, argv


def run(
    argv: Sequence[str] | None = None, prog: str | None = None, family: str | None = None
) -> dict[str, Any]:
    """Parse ``argv`` (``sys.argv[1:]`` by default; ``[<family>] options…`` unless ``family``
    is given) and run every stage; returns ``results``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if family is None:
        family, argv = split_family(argv)
    family = get_family(family)
    parser = build_parser(family, prog or f"hf-tae run {family.name}")
    parsed = parser.parse_args_and_config(argv)
    command = "hf-tae run " + shlex.join([family.name, *argv])
    return run_pipeline(family, *parsed, command=command)


def _print_summary(results: dict[str, Any], output_dir: Path) -> None:
    meta, metrics = results["meta_init"], results["metrics"]
    label = metrics["labels"][metrics["selection"]]
    baseline = meta.get("baseline_avg")
    print(
        f"\nmeta-initialization: test avg {label} {meta['test_avg']:.3f}"
        + (f" (label-frequency baseline {baseline:.3f})" if baseline is not None else "")
        + f"; world size {results['world_size']}"
    )
    if "grouping" in results:
        g = results["grouping"]
        ari = g.get("adjusted_rand_vs_planted")
        print(
            f"groups (k={g['k']}): {g['groups']}"
            + (f"; ARI vs planted {ari:.2f}" if ari is not None else "")
        )
    if "group_training" in results:
        for name, s in results["group_training"]["summary"].items():
            print(f"  {name:>15}: test avg {label} {s[metrics['selection']]:.3f} "
                  f"({s['num_models']} models)")  # fmt: skip
    print(f"report: {output_dir / 'report.md'}")


def main(argv: Sequence[str] | None = None, family: str | None = None) -> dict[str, Any]:
    """Entry point of the recipes: bad inputs exit with the error message."""
    try:
        return run(argv, family=family)
    except TaeError as err:
        sys.exit(f"error: {err}")
