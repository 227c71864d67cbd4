"""Estimated vs fine-tuned task affinity on the embedded default (issue 4's accuracy benchmark).

What it measures
    On one recipe run (meta-initialization θ0 + its GradientStore), for the same sampled task
    subsets:

    * the **true** affinity, from real fine-tuning of every subset with
      :class:`~hf_tae.SubsetFineTuner` (from scratch, as the reference re-initializes,
      gradtae_methods.md A.4; from θ0 with ``--truth_init meta``; or from θ0 with its last,
      task-private head layer re-initialized, as the reference's ``--load_model_dir`` does,
      with ``--truth_init meta_reset_head``), once per ``--seeds`` seed; the truth is built
      from the per-(subset, task) metric averaged over the seeds (:func:`~hf_tae.average_seeds`);
    * the **estimated** affinity, from :class:`~hf_tae.RegressionEstimator` fits on the
      projected gradients at θ0 (one batched fit per regularization strength), averaged over
      the run's meta-initializations when it made an ensemble (``ensemble/member_*``);

    and prints, per estimator setting λ:

    * on the z-normalized matrices (A.4, the reference notebook): the within-group minus
      cross-group mean (``gap``, the planted structure) and :func:`~hf_tae.compare_affinities`
      (``relF`` = ‖T̂ − T‖_F / ‖T‖_F, ``MAE``, ``spear``, ``pears`` over off-diagonal entries);
    * on the raw-metric matrices (``normalize=False``, the poster's formula
      ``T_ij = mean_{S ∋ i,j} f_i(S)``, losses negated): ``rawF`` and ``rawSp``;
    * per (subset, task), :func:`~hf_tae.compare_results` of the estimated against the true
      metric (``cellSp``, ``cellMAE``), the numbers both matrices are averaged from;
    * the compute ratio (estimation seconds / fine-tuning seconds).

    Before that table it prints the baselines of the raw distance (a matrix that knows each
    task's metric level but no affinity: ``(μ_i + μ_j)/2`` and a constant), and with two or
    more seeds the truth's **self-agreement** (seed a vs seed b: relF and Spearman of the
    normalized and raw matrices and per (subset, task)), with the Spearman–Brown reliability
    of the seed mean, ``k r / (1 + (k − 1) r)``, and the rough noise floor of relF against the
    k-seed mean, ``relF(a, b) / √(2k)`` (both assume independent, equal seed noise). After the
    table it prints each estimate's normalized Spearman against every single-seed truth, and
    their mean next to the mean of one fine-tuning run against another; with an ensemble run,
    the estimate's own self-agreement (one meta-initialization against another), its
    Spearman–Brown reliability and the Spearman corrected for the noise of both sides,
    ``ρ / √(rel_est · rel_true)`` (an estimate under the same assumptions, not a measurement).
    Heatmaps of the (seed-mean, normalized) true and best estimated matrices go to
    ``--output_dir``.

How to run
    python recipes/graph_communities.py --output_dir runs/graph_communities
    python benchmarks/affinity_accuracy.py --run_dir runs/graph_communities \\
        --output_dir runs/affinity_accuracy --seeds 0 1 --l2 100 1000 10000

The fine-tuning results are resumable (``<output_dir>/truth``): a rerun only trains what is
missing (e.g. only seed 1 after a ``--seeds 0`` run). 80 subsets × 1 seed take about 4 minutes
on one CPU thread.
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
    average_seeds,
    compare_affinities,
    compare_results,
    corrected_spearman,
    load_meta_init,
    sample_subsets,
    self_agreement,
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
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="Fine-tuning seeds; the truth averages them, 2+ also print its "
        "seed-vs-seed agreement.",
    )
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


def level_baselines(truth_raw: AffinityMatrix) -> dict[str, float]:
    """Raw-metric relF of matrices that carry no affinity: ``(μ_i + μ_j)/2`` from each task's
    mean sign-adjusted metric over its subsets (read off the truth's diagonal, which averages
    every subset containing i), and one constant (the mean off-diagonal truth entry)."""
    t = truth_raw.to_numpy()
    level = np.diag(t).copy()
    names = truth_raw.task_names
    both = AffinityMatrix((level[:, None] + level[None, :]) / 2, names, "estimated")
    off = ~np.eye(len(names), dtype=bool) & np.isfinite(t)
    const = AffinityMatrix(np.full_like(t, t[off].mean()), names, "estimated")
    return {
        "levels": compare_affinities(both, truth_raw)["relative_frobenius"],
        "constant": compare_affinities(const, truth_raw)["relative_frobenius"],
    }


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

    def build(table, normalize: bool, kind: str) -> AffinityMatrix:
        return AffinityMatrix.from_results(
            table, graph.task_names, metric=args.metric, symmetrize=True, kind=kind,
            normalize=normalize,
        )  # fmt: skip

    # the truth: the per-(subset, task) metric averaged over the seeds, then A.4 (or raw)
    mean_table = average_seeds(truth_table)
    truth = build(mean_table, True, "fine-tuned")
    truth_raw = build(mean_table, False, "fine-tuned")
    truth.save(out / "true_affinity", overwrite=True)
    seeds = list(dict.fromkeys(args.seeds))
    print(f"true ({args.truth_init}, {len(subsets)} subsets, seeds {seeds}, mean over seeds): "
          f"planted gap {planted_gap(truth.to_numpy(), groups):+.3f}, "
          f"fine-tuning {truth_seconds:.0f} s")  # fmt: skip
    base = level_baselines(truth_raw)
    print(f"raw-metric baselines (no affinity): relF of (μ_i + μ_j)/2 {base['levels']:.3f}, "
          f"of a constant {base['constant']:.3f}")  # fmt: skip
    per_seed = {
        seed: truth_table[truth_table["seed"] == seed].drop(columns="seed") for seed in seeds
    }
    per_seed_truth = {seed: build(t, True, "fine-tuned") for seed, t in per_seed.items()}
    if len(seeds) >= 2:
        k = len(seeds)
        print("truth self-agreement (seed a vs seed b):")
        print(f"{'a':>4} {'b':>4} {'relF':>6} {'spear':>6} {'rawF':>7} {'rawSp':>6} {'cellSp':>6} "
              f"{'cellMAE':>7}")  # fmt: skip
        pairs = [(a, b) for n, a in enumerate(seeds) for b in seeds[n + 1 :]]
        agree = []
        for a, b in pairs:
            z = compare_affinities(per_seed_truth[a], per_seed_truth[b])
            r = compare_affinities(
                build(per_seed[a], False, "fine-tuned"), build(per_seed[b], False, "fine-tuned")
            )
            c = compare_results(per_seed[a], per_seed[b], args.metric)
            agree.append((z, r, c))
            print(f"{a:4d} {b:4d} {z['relative_frobenius']:6.3f} {z['spearman']:+6.2f} "
                  f"{r['relative_frobenius']:7.4f} {r['spearman']:+6.2f} {c['spearman']:+6.2f} "
                  f"{c['mean_abs_error']:7.4f}")  # fmt: skip
        reliability = {}
        for label, idx in (("normalized", 0), ("raw", 1), ("per (subset, task)", 2)):
            rho = float(np.mean([g[idx]["spearman"] for g in agree]))
            reliability[label] = k * rho / (1 + (k - 1) * rho)
            line = (
                f"  {label}: seed-vs-seed spearman r1 {rho:+.2f}; Spearman–Brown reliability of "
                f"the {k}-seed mean r{k} = {reliability[label]:+.2f}, "
                f"ceiling sqrt(r{k}) = {np.sqrt(max(reliability[label], 0)):.2f}"
            )
            if idx < 2:
                rel = float(np.mean([g[idx]["relative_frobenius"] for g in agree]))
                line += f"; relF noise floor vs the mean ≈ relF(a, b)/√(2k) = {rel / np.sqrt(2 * k):.4f}"
            print(line)
        seed_rho = float(np.mean([g[0]["spearman"] for g in agree]))

    best = None
    print(f"estimates vs the {len(seeds)}-seed mean truth:")
    print(
        f"{'λ':>8} {'gap':>7} {'relF':>6} {'MAE':>6} {'spear':>6} {'pears':>6} {'rawF':>7} "
        f"{'rawSp':>6} {'cellSp':>6} {'cellMAE':>7} {'est s':>7} {'ratio':>7}"
    )
    vs_seed, member_rho = {}, {}
    for l2 in args.l2:
        start = time.perf_counter()
        members, raw_members = [], []
        for store in stores:
            estimator = RegressionEstimator(store, l2=l2)
            table = estimator.evaluate(subsets, estimator.fit(subsets), split="validation")
            members.append(build(table, True, "estimated"))
            raw_members.append(build(table, False, "estimated"))
        estimated = AffinityMatrix.average(members)
        seconds = time.perf_counter() - start
        estimated_raw = AffinityMatrix.average(raw_members)
        c = compare_affinities(estimated, truth)
        r = compare_affinities(estimated_raw, truth_raw)
        # per (subset, task): the ensemble mean of the members' predicted metric (rows repeated
        # per member are averaged by compare_results) against the seed-mean true metric
        cell = compare_results(estimated.results, mean_table, args.metric)
        vs_seed[l2] = [compare_affinities(estimated, per_seed_truth[s])["spearman"] for s in seeds]
        if len(members) >= 2:  # the estimate's own noise: one meta-initialization vs another
            member_rho[l2] = (self_agreement(members), c["spearman"])
        print(f"{l2:8g} {planted_gap(estimated.to_numpy(), groups):+7.3f} {c['relative_frobenius']:6.2f} "
              f"{c['mean_abs_error']:6.3f} {c['spearman']:+6.2f} {c['pearson']:+6.2f} "
              f"{r['relative_frobenius']:7.4f} {r['spearman']:+6.2f} {cell['spearman']:+6.2f} "
              f"{cell['mean_abs_error']:7.4f} {seconds:7.1f} {seconds / truth_seconds:7.3f}")  # fmt: skip
        if best is None or c["relative_frobenius"] < best[0]:
            best = (c["relative_frobenius"], estimated)
    if len(seeds) >= 2:
        print("normalized spearman of each estimate vs single-seed truths (one fine-tuning run "
              f"vs another: {seed_rho:+.2f} on average):")  # fmt: skip
        for l2, rhos in vs_seed.items():
            print(
                f"{l2:8g} "
                + " ".join(f"seed {s}: {x:+.2f}" for s, x in zip(seeds, rhos, strict=True))
                + f" | mean {np.mean(rhos):+.2f}"
            )
    if member_rho:
        print("estimate self-agreement (one meta-initialization vs another) and the Spearman "
              "corrected for both sides' noise, ρ / √(rel_est · rel_true):")  # fmt: skip
        for l2, (agreement, observed) in member_rho.items():
            line = (
                f"{l2:8g} r1 {agreement['mean_spearman']:+.2f}, reliability of the "
                f"{agreement['num_repeats']}-member mean {agreement['reliability']:+.2f}"
            )
            if len(seeds) >= 2:
                corrected = corrected_spearman(
                    observed, agreement["reliability"], reliability["normalized"]
                )
                line += f"; corrected Spearman {corrected:+.2f}"
            print(line)
    best[1].save(out / "estimated_affinity", overwrite=True)
    print(
        f"heatmaps: {out / 'true_affinity' / 'heatmap.png'}, {out / 'estimated_affinity' / 'heatmap.png'}"
    )


if __name__ == "__main__":
    main()
