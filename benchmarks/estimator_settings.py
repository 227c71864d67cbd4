"""How the estimator's settings change what the estimate sees, on a finished run's stores.

For every λ and subset size it refits the stores of all meta-initializations of ``--run_dir``
(no training), builds the averaged affinity per estimable metric and reports, against the run's
planted groups, the within − cross gap, the meta-initializations' agreement (mean Spearman) and
the adjusted Rand index of the SDP groups at the planted k; three last rows do the same for the
affinities read off the gradients without subsets (``--affinity_kind ntk``, ``fisher`` and
``gradient-cosine``). It shows whether a default tuned on one family carries over to another
(on the image default, the graphs' λ = 1000 flattens the estimate, the cosine finds little,
ARI 0.34, and the Fisher overlap finds the views, ARI 1.00).

    hf-tae run images --output_dir runs/images
    python benchmarks/estimator_settings.py --run_dir runs/images --family images
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    import torch
    from sklearn.metrics import adjusted_rand_score

    from hf_tae import (
        AffinityMatrix,
        GradientStore,
        RegressionEstimator,
        fisher_affinity,
        get_family,
        gradient_cosine_affinity,
        ntk_affinity,
        sample_subsets,
        sdp_cluster,
        self_agreement,
    )  # fmt: skip
    from hf_tae.pipeline.stages import planted_gap

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="An hf-tae run folder.")
    parser.add_argument("--family", default="graph", help="The run's family (its metrics).")
    parser.add_argument("--l2", type=float, nargs="+", default=[1.0, 10.0, 100.0, 1000.0, 1e4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--num_subsets", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run_dir)
    family = get_family(args.family)
    paths = [run / "gradients", *sorted(run.glob("ensemble/member_*/gradients"))]
    stores = [GradientStore.load(p) for p in paths]
    names = stores[0].task_names
    import json

    groups = json.loads((run / "results.json").read_text()).get("planted_labels")
    if groups is None:
        raise SystemExit(f"{run} has no planted groups to score against.")
    planted = np.asarray(groups)
    k = len(set(planted.tolist()))
    print(f"{run}: {len(stores)} meta-initializations, {len(names)} tasks, planted k = {k}")
    print(f"{'size':>4} {'λ':>8} {'metric':>9} {'gap':>7} {'agree':>6} {'ARI@k':>6}")
    for size in args.sizes:
        count = min(args.num_subsets, math.comb(len(names), size))
        subsets = sample_subsets(len(names), count, size, seed=0)
        for l2 in args.l2:
            for metric in family.metrics.estimated:
                mats = []
                for store in stores:
                    est = RegressionEstimator(store, l2=l2)
                    table = est.evaluate(subsets, est.fit(subsets), split="validation")
                    mats.append(AffinityMatrix.from_results(table, names, metric=metric,
                                                            symmetrize=True, zero_diagonal=True))  # fmt: skip
                mean = AffinityMatrix.average(mats).to_numpy()
                ari = adjusted_rand_score(planted, sdp_cluster(np.nan_to_num(mean), k).labels)
                agree = self_agreement(mats)["mean_spearman"] if len(mats) > 1 else float("nan")
                print(f"{size:>4} {l2:>8g} {metric:>9} {planted_gap(mean, planted):>+7.3f} "
                      f"{agree:>+6.2f} {ari:>6.2f}", flush=True)  # fmt: skip
    # the affinities read off the gradients (--affinity_kind ntk / fisher / gradient-cosine): no λ
    for name, build in (("ntk", ntk_affinity), ("fisher", fisher_affinity),
                        ("cosine", gradient_cosine_affinity)):  # fmt: skip
        mats = [build(store) for store in stores]
        mean = AffinityMatrix.average(mats).to_numpy()
        ari = adjusted_rand_score(planted, sdp_cluster(mean, k).labels)
        agree = self_agreement(mats)["mean_spearman"] if len(mats) > 1 else float("nan")
        print(f"{'-':>4} {'-':>8} {name:>9} {planted_gap(mean, planted):>+7.3f} {agree:>+6.2f} "
              f"{ari:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
