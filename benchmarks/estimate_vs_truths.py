"""What does the estimate estimate? Estimated affinity against two fine-tuned truths, per λ.

What it measures
    On finished runs of the job (``hf-tae run ... --ground_truth N``), the estimated affinity of
    the truth's subsets at each ``--l2`` against every truth the run holds:

    - ``scratch`` (``ground_truth/``, ``--ground_truth_init group`` with ``--group_init
      scratch``): each subset trained from a fresh model, as the job's group models are;
    - ``members`` (``ground_truth_members/``, ``--ground_truth_init members``): repeat r
      fine-tuned from meta-initialization r, the fine-tuning the estimate linearizes (notes A.3);
    - ``all pairs`` (``exhaustive_truth/``, ``--ground_truth_exhaustive 2``): every pair of
      tasks trained from scratch, each affinity entry observed directly.

    Per (run, truth): the truth's own SDP groups at each k (as the job groups an estimate:
    z-scored, symmetrized, zero diagonal), their silhouette and, where ``results.json`` has
    ``planted_labels``, their ARI against the planted groups: whether the fine-tuned
    affinity itself holds the planted structure, and which k the silhouette rule would take
    on it.

    Per (run, truth, λ: on the stores the run estimated its subsets on, the early
    meta-initializations' under ``--early_meta_init_fraction`` < 1; and the NTK and Fisher
    overlaps the job can cluster instead of the subsets, read off the trained θ0s,
    ``--affinity_kind ntk`` (default) / ``fisher``): the observed Spearman of the estimate
    averaged over the run's meta-initializations against the truth averaged over its repeats,
    the members' agreement and the truth's (mean Spearman, and the reliability of their means), and the Spearman
    corrected for both sides' noise (``corrected_spearman``; it is unstable, even above 1,
    where a reliability is near 0). The λ the job chose (``--estimator_l2 auto``) is marked.

How to run
    Run a scenario with a truth (``python benchmarks/scenarios.py --ground_truth 60``), rerun
    its job with ``--ground_truth_init members`` and the same options (it reuses everything
    else and adds the second truth), then
    ``python benchmarks/estimate_vs_truths.py --runs <dir>/default/run <dir>/weak/run ...``.
    Prints the table, writes it with the command to ``--results`` and a plot next to it.

Cost
    Seconds per run (the estimates only; the truths are read from disk).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hf_tae.utils.io import atomic_write_text


def member_stores(run: Path, overlap: bool = False) -> list:
    """The meta-initializations' gradient stores: those the run's subsets were estimated on
    (the early θ0s' with ``--early_meta_init_fraction`` < 1), or with ``overlap`` the trained
    θ0s' (what the NTK and Fisher overlaps are read off)."""
    from hf_tae import GradientStore

    results = json.loads((run / "results.json").read_text())
    trained = [run / "gradients" if m == 0 else run / "ensemble" / f"member_{m}" / "gradients"
               for m in range(results["estimation"]["num_meta_inits"])]  # fmt: skip
    paths = trained if overlap else results["estimation"].get("subset_gradients", trained)
    return [GradientStore.load(p) for p in paths]


#: The affinities read off the gradients (no subsets, no λ), as the rows name them.
OVERLAPS = {"ntk": "NTK overlap", "fisher": "Fisher overlap"}


def estimate_members(stores, subsets, l2: float | str, metric: str, names):
    """Each member's affinity of ``subsets`` at ridge ``l2``; ``"ntk"`` / ``"fisher"``: that
    overlap of the gradients (what the job clusters by default; it needs no subsets)."""
    from hf_tae import AffinityMatrix, RegressionEstimator
    from hf_tae.estimation.gradient_affinity import gradient_affinity

    if isinstance(l2, str):
        return [gradient_affinity(store, l2) for store in stores]
    members = []
    for store in stores:
        estimator = RegressionEstimator(store, l2=l2)
        table = estimator.evaluate(subsets, estimator.fit(subsets), split="validation")
        members.append(AffinityMatrix.from_results(table, names, metric=metric, symmetrize=True))
    return members


def truths(run: Path) -> dict[str, list[Path]]:
    """The finished truths of ``run``: ``scratch`` (``--ground_truth``), ``members``
    (``--ground_truth_init members``) and ``all pairs`` (``--ground_truth_exhaustive 2``,
    from scratch: every pair observed directly)."""
    found = {"scratch": [run / "ground_truth"],
             "members": sorted((run / "ground_truth_members").glob("member_*"))}  # fmt: skip
    exhaustive = run / "exhaustive_truth"
    if (exhaustive / "results.jsonl").exists():
        first = json.loads((exhaustive / "results.jsonl").read_text().splitlines()[0])
        size = len(first["subset"])
        found["all pairs" if size == 2 else f"all subsets of {size}"] = [exhaustive]
    return {k: v for k, v in found.items() if v and all((f / "results.jsonl").exists() for f in v)}


def compare_run(run: Path, grid: list[float]) -> list[dict]:
    from hf_tae import (
        AffinityMatrix,
        average_seeds,
        compare_affinities,
        corrected_spearman,
        read_runs,
        self_agreement,
    )

    results = json.loads((run / "results.json").read_text())
    metric, names = results["estimation"]["metric"], results["tasks"]
    rows = []
    for label, folders in truths(run).items():
        table = read_runs(folders)

        def build(t):
            return AffinityMatrix.from_results(t, names, metric=metric, symmetrize=True)

        truth_agree = self_agreement([build(t.drop(columns="seed")) for _, t in table.groupby("seed")])
        mean = average_seeds(table)
        truth = build(mean)
        subsets = [tuple(s) for s in mean.drop_duplicates("subset_id")["subset"]]
        stores, overlap_stores = member_stores(run), member_stores(run, overlap=True)
        for l2 in [*grid, *OVERLAPS]:
            members = estimate_members(overlap_stores if l2 in OVERLAPS else stores, subsets, l2,
                                       metric, names)  # fmt: skip
            agree = self_agreement(members)
            observed = compare_affinities(AffinityMatrix.average(members), truth)["spearman"]
            rows.append({
                "run": run.parent.name if run.name == "run" else run.name, "truth": label,
                "subsets": len(subsets), "l2": l2,
                "job_l2": l2 == results["estimation"]["estimator_l2"],
                "observed": observed, "members_agree": agree["mean_spearman"],
                "truth_agree": truth_agree["mean_spearman"],
                "corrected": corrected_spearman(observed, truth_agree["reliability"],
                                                agree["reliability"]),
            })  # fmt: skip
    return rows


def truth_groups(run: Path, max_k: int = 8) -> list[dict]:
    """The SDP groups of each truth's affinity per k, with silhouette and ARI vs planted
    (the job's own :func:`~hf_tae.pipeline.stages.truth_groups`, at every k up to ``max_k``)."""
    from hf_tae import average_seeds, read_runs
    from hf_tae.pipeline.stages import truth_groups as cluster_truth

    results = json.loads((run / "results.json").read_text())
    metric, names = results["estimation"]["metric"], results["tasks"]
    planted = results.get("planted_labels")
    rows = []
    for label, folders in truths(run).items():
        for row in cluster_truth(average_seeds(read_runs(folders)), names, metric, None, planted,
                                 ks=range(2, max_k + 1)):  # fmt: skip
            rows.append({"run": run.parent.name if run.name == "run" else run.name,
                         "truth": label, "ari": row.get("ari_vs_planted"), **row})  # fmt: skip
    return rows


def render_groups(rows: list[dict]) -> str:
    lines = ["| run | truth | k | silhouette | ARI vs planted | SDP groups of the truth |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ari = "–" if r["ari"] is None else f"{r['ari']:.2f}"
        groups = "; ".join("{" + ", ".join(g) + "}" for g in r["groups"])
        lines.append(f"| {r['run']} | {r['truth']} | {r['k']} | {r['silhouette']:.3f} | {ari} | {groups} |")
    return "\n".join(lines)


def render(rows: list[dict]) -> str:
    head = ("| run | truth | subsets | λ | observed Spearman | members agree | truth repeats "
            "agree | corrected Spearman |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lam = OVERLAPS[r["l2"]] if isinstance(r["l2"], str) else (
            f"{r['l2']:g}" + (" (job)" if r["job_l2"] else ""))
        lines.append(f"| {r['run']} | {r['truth']} | {r['subsets']} | {lam} | {r['observed']:+.2f} "
                     f"| {r['members_agree']:.2f} | {r['truth_agree']:.2f} | {r['corrected']:+.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.2), sharey=True,
                             squeeze=False)  # fmt: skip
    for ax, name in zip(axes[0], runs, strict=True):
        labels = dict.fromkeys(r["truth"] for r in rows)
        for label, style in zip(labels, ("o-", "s--", "^:", "d-."), strict=False):
            mine = [r for r in rows if r["run"] == name and r["truth"] == label
                    and not isinstance(r["l2"], str)]  # fmt: skip
            if mine:
                ax.plot([r["l2"] for r in mine], [r["observed"] for r in mine], style, label=label)
        ax.set_xscale("log")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(name)
        ax.set_xlabel("λ")
    axes[0][0].set_ylabel("Spearman, estimate vs truth")
    axes[0][0].legend(title="truth", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--runs", nargs="+", type=Path, required=True,
                        help="finished job output folders with ground_truth/ and/or "
                             "ground_truth_members/")  # fmt: skip
    parser.add_argument("--l2", nargs="+", type=float, default=[1, 10, 100, 1000, 10000],
                        help="ridge strengths to estimate with")  # fmt: skip
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).parent / "results" / "estimate_vs_truths.txt",
                        help="where the table (and a .png beside it) go")  # fmt: skip
    args = parser.parse_args(argv)
    rows, groups = [], []
    for run in args.runs:
        if not truths(run):
            raise SystemExit(f"{run} holds no finished ground truth; run the job with "
                             "--ground_truth N (and --ground_truth_init members) first.")  # fmt: skip
        rows += compare_run(run, args.l2)
        groups += truth_groups(run)
    text = render(rows) + "\n\nThe truths' own groups:\n\n" + render_groups(groups)
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/estimate_vs_truths.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(args.results, f"{command}\n\n{text}\n")
    plot(rows, args.results.with_suffix(".png"))
    print(f"wrote {args.results} and {args.results.with_suffix('.png')}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
