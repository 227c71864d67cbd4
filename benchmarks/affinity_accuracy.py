"""Estimated vs fine-tuned task affinity on the embedded default (issue 4's accuracy benchmark).

What it measures
    On one recipe run (meta-initialization θ0 + its GradientStore), for the same sampled task
    subsets:

    * the **true** affinity, from real fine-tuning of every subset with
      :class:`~hf_tae.SubsetFineTuner` (from scratch, as the reference re-initializes,
      gradtae_methods.md A.4; from θ0 with ``--truth_init meta``; or from θ0 with its last,
      task-private head layer re-initialized, as the reference's ``--load_model_dir`` does,
      with ``--truth_init meta_reset_head``);
    * the **estimated** affinity, from :class:`~hf_tae.RegressionEstimator` fits on the
      projected gradients at θ0 (one batched fit per regularization strength), averaged over
      the run's meta-initializations when it made an ensemble (``ensemble/member_*``);

    and prints, per estimator setting, :func:`~hf_tae.compare_affinities` (relative Frobenius
    distance, mean absolute error, Spearman, Pearson over entries), the within-group minus
    cross-group mean of each matrix (the planted structure), and the compute ratio
    (estimation seconds / fine-tuning seconds). Heatmaps of the true and best estimated
    matrices go to ``--output_dir``.

How to run
    python recipes/graph_communities.py --output_dir runs/graph_communities
    python benchmarks/affinity_accuracy.py --run_dir runs/graph_communities --output_dir runs/affinity_accuracy

The fine-tuning results are resumable (``<output_dir>/truth``): a rerun only trains what is
missing. 80 subsets × 1 seed take about 4 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hf_tae import (
    AffinityMatrix,
    CommunityGraph,
    GradientStore,
    MultitaskTrainingArguments,
    RegressionEstimator,
    SubsetFineTuner,
    compare_affinities,
    load_meta_init,
    sample_subsets,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run_dir", default="runs/graph_communities", help="A recipe output folder."
    )
    parser.add_argument(
        "--output_dir", default="runs/affinity_accuracy", help="Results and heatmaps."
    )
    parser.add_argument("--num_subsets", type=int, default=80, help="Sampled task subsets.")
    parser.add_argument("--subset_size", type=int, default=4, help="Tasks per subset.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Fine-tuning seeds.")
    parser.add_argument("--epochs", type=float, default=30, help="Fine-tuning epochs per subset.")
    parser.add_argument(
        "--truth_init", choices=("scratch", "meta", "meta_reset_head"), default="scratch",
        help="Fine-tune each subset from a fresh model, from θ0, or from θ0 with a fresh last "
        "head layer (A.4).",
    )  # fmt: skip
    parser.add_argument(
        "--l2", type=float, nargs="+", default=[1e-2, 1.0, 100.0], help="Estimator strengths λ."
    )
    parser.add_argument("--metric", default="log_loss", choices=("f1", "log_loss", "accuracy"))
    parser.add_argument("--num_threads", type=int, default=1, help="torch threads.")
    return parser.parse_args(argv)


def planted_gap(matrix: np.ndarray, groups: np.ndarray) -> float:
    """Mean within-group off-diagonal entry minus mean cross-group entry."""
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    return float(np.nanmean(matrix[same & off]) - np.nanmean(matrix[~same]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    run, out = Path(args.run_dir), Path(args.output_dir)
    graph = CommunityGraph.load(run / "data")
    # the run's meta-initialization and, when the run made an ensemble, its other members (A.6)
    stores = [
        GradientStore.load(p)
        for p in [run / "gradients", *sorted(run.glob("ensemble/member_*/gradients"))]
    ]
    meta = load_meta_init(run / "meta_init")
    task_set = graph.task_set(meta.config.num_hops)
    groups = np.asarray(graph.task_groups)
    subsets = sample_subsets(graph.num_tasks, args.num_subsets, args.subset_size, seed=0)

    def model_init():
        if args.truth_init != "scratch":
            model = load_meta_init(run / "meta_init")
            if args.truth_init == "meta_reset_head":
                model.head[-1].reset_parameters()
            return model.train()
        return type(meta)(meta.config)  # same architecture, fresh weights

    training = MultitaskTrainingArguments(
        output_dir=str(out / "truth" / "runs"), learning_rate=1e-2, num_train_epochs=args.epochs,
        lr_scheduler_type="constant", per_device_train_batch_size=256,
        per_device_eval_batch_size=4096, use_cpu=True,
    )  # fmt: skip
    start = time.perf_counter()
    truth_table = SubsetFineTuner(
        model_init, task_set, training, out / "truth", seeds=args.seeds
    ).run(subsets)
    # a resumed run trained only what was missing: keep the total fine-tuning time on disk
    timing = out / "truth" / "seconds.json"
    truth_seconds = time.perf_counter() - start
    if timing.exists():
        truth_seconds += json.loads(timing.read_text())["seconds"]
    timing.write_text(json.dumps({"seconds": truth_seconds}))
    truth = AffinityMatrix.from_results(
        truth_table, graph.task_names, metric=args.metric, symmetrize=True, kind="fine-tuned"
    )
    truth.save(out / "true_affinity", overwrite=True)
    print(f"true ({args.truth_init}, {len(subsets)} subsets): planted gap {planted_gap(truth.to_numpy(), groups):+.3f}, "
          f"fine-tuning {truth_seconds:.0f} s")  # fmt: skip

    best = None
    print(
        f"{'λ':>8} {'gap':>7} {'relF':>6} {'MAE':>6} {'spear':>6} {'pears':>6} {'est s':>7} {'ratio':>7}"
    )
    for l2 in args.l2:
        start = time.perf_counter()
        members = []
        for store in stores:
            estimator = RegressionEstimator(store, l2=l2)
            table = estimator.evaluate(subsets, estimator.fit(subsets), split="validation")
            members.append(AffinityMatrix.from_results(
                table, graph.task_names, metric=args.metric, symmetrize=True, kind="estimated"
            ))  # fmt: skip
        estimated = AffinityMatrix.average(members)
        seconds = time.perf_counter() - start
        c = compare_affinities(estimated, truth)
        print(f"{l2:8g} {planted_gap(estimated.to_numpy(), groups):+7.3f} {c['relative_frobenius']:6.2f} "
              f"{c['mean_abs_error']:6.3f} {c['spearman']:+6.2f} {c['pearson']:+6.2f} {seconds:7.1f} "
              f"{seconds / truth_seconds:7.3f}")  # fmt: skip
        if best is None or c["relative_frobenius"] < best[0]:
            best = (c["relative_frobenius"], estimated)
    best[1].save(out / "estimated_affinity", overwrite=True)
    print(
        f"heatmaps: {out / 'true_affinity' / 'heatmap.png'}, {out / 'estimated_affinity' / 'heatmap.png'}"
    )


if __name__ == "__main__":
    main()
