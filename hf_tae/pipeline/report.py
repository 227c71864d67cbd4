"""The run report of the end-to-end pipeline: ``report.md`` and the PNGs it links.

Everything here reads the ``results`` dict that :mod:`hf_tae.pipeline.run` writes to
``results.json`` (metric names and labels included), so a report can be rebuilt from a finished
run of any family without rerunning it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_tae.estimation.schema import METRICS
from hf_tae.utils.io import atomic_write_text
from hf_tae.utils.plots import pyplot, save_figure

#: How ``--ground_truth_init`` started the truth's runs, as the report says it.
TRUTH_STARTS = {"group": ", started as the group models are (--group_init)",
                "members": ", repeat r fine-tuned from meta-initialization r (what the estimate linearizes)"}  # fmt: skip


def plot_grouping_gains(
    gains: Mapping[str, float],
    groups: Sequence[Sequence[str]],
    path: str | os.PathLike,
    title: str,
    ylabel: str = "F1 gain",
) -> Path:
    """Per-task gain of the group models over a reference, tasks ordered and coloured by group."""
    plt = pyplot()
    order = [t for g in groups for t in g]
    colors = [f"C{k % 10}" for k, g in enumerate(groups) for _ in g]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(order) + 2), 3.6))
    ax.bar(range(len(order)), [gains[t] for t in order], color=colors)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_estimated_vs_true(
    estimated: Sequence[float], true: Sequence[float], path: str | os.PathLike, metric: str
) -> Path:
    """Scatter of estimated against fine-tuned per-(subset, task) scores, with the diagonal."""
    plt = pyplot()
    est, tru = np.asarray(estimated, float), np.asarray(true, float)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(tru, est, s=12, alpha=0.7)
    lo, hi = float(min(est.min(), tru.min())), float(max(est.max(), tru.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"fine-tuned {metric}")
    ax.set_ylabel(f"estimated {metric}")
    ax.set_title("per (subset, task) score", fontsize=10)
    return save_figure(fig, path)


def _finite(value: Any) -> bool:
    """A number the report can print (not None, NaN or infinite)."""
    try:
        return value is not None and bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def format_number(value: Any, spec: str = ".3f", missing: str = "n/a") -> str:
    """``value`` formatted with ``spec``, or ``missing`` where it is None, NaN or infinite: the
    report never prints "nan"."""
    return format(float(value), spec) if _finite(value) else missing


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None or isinstance(value, (float, np.floating)):
            return format_number(value, missing="—")
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


#: Column names of the generation metrics (``--generation_metrics``) in the report.
GENERATED_LABELS = {"rougeL": "ROUGE-L (generated)", "generated_exact_match": "exact match (generated)"}

#: How the report names an affinity read off the gradients (``{split}``: the scoring split).
_GRADIENT_AFFINITIES = {
    "ntk": "NTK-overlap affinity (normalized Frobenius inner product of the tasks' Gauss–Newton "
    "matrices of the projected gradients: the mean squared empirical NTK between their examples)",
    "fisher": "Fisher-overlap affinity (normalized Frobenius inner product of the tasks' "
    "empirical Fisher matrices of the projected gradients)",
    "gradient-cosine": "gradient-cosine affinity (cosine between one task's training-loss "
    "gradient and another's {split}-loss gradient)",
}


def render_report(results: Mapping[str, Any]) -> str:
    """``report.md`` text: what ran, timings per stage, groups, and the per-task comparison."""
    metrics = results["metrics"]
    selection, labels = metrics["selection"], metrics["labels"]
    sel = labels[selection]
    out = ["# hf_tae run report", ""]
    out += [
        f"- family: {results['family']}",
        f"- data: {results['data']}",
        f"- command: `{results['command']}`",
        f"- processes: {results['world_size']}",
        "",
        "## Timings",
        "",
        _table(["stage", "seconds"], [(k, v) for k, v in results["timings"].items()]),
        "",
    ]
    meta = results["meta_init"]
    line = f"Test average {sel} {format_number(meta['test_avg'])}"
    if _finite(meta.get("baseline_avg")):
        line += (
            f" against {format_number(meta['baseline_avg'])} for the label-frequency baseline "
            "(sklearn `DummyClassifier`)"
        )
    out += ["## Meta-initialization (all tasks)", "", line + ".", ""]
    if meta.get("below_baseline"):
        out += [f"**Warning:** {meta['below_baseline']}", ""]
    if meta.get("widening"):  # --meta_init_widenings: the user's model learned no task

        def flags(capacity: Mapping[str, Any]) -> str:
            return " ".join(f"{flag} {value}" for flag, value in capacity.items())

        tried = "; ".join(f"{flags(t['capacity'])}: {format_number(t['test_avg'])}"
                          for t in meta["widening"]["tried"])  # fmt: skip
        kept = meta["widening"]["kept"]
        out += [f"The meta-initialization scored no better than the baseline with {tried}, so it "
                f"was retrained twice as wide (`--meta_init_widenings`); the one above "
                f"({flags(kept['capacity'])}) is used for the gradients and every "
                "meta-initialization of the ensemble. Groups trained from scratch use your "
                "model.", ""]  # fmt: skip
    if meta.get("early"):  # --early_meta_init_fraction
        early = meta["early"]
        use = ("the subsets' regression (predicted payoffs, the comparison with real training) "
               "fits on the early meta-initializations' gradients; the clustered overlap stays "
               "at the trained ones" if early["used"] else "it learned no task (no better than "
               "the baseline), so the subsets are estimated at the trained meta-initializations")  # fmt: skip
        out += [f"Early meta-initialization (trained for {early['fraction']:g} of the epochs or "
                f"steps, `--early_meta_init_fraction`): test average {sel} "
                f"{format_number(early['test_avg'])}; {use}.", ""]  # fmt: skip
    if results.get("ensemble"):
        scores = ", ".join(f"{format_number(m['test_avg'])} (seed {m['seed']})" for m in results["ensemble"])
        out += [f"Other meta-initializations of the ensemble: test average {sel} {scores}.", ""]
    if "gradients" in results:
        g = results["gradients"]
        out += [
            f"Gradient store: {g['rows']} examples × {g['dim']} dimensions"
            + (f", without {g['excluded']}." if g.get("excluded") else "."),
            "",
        ]
    est = results.get("estimation")
    if est:
        out += [
            "## Estimated affinity",
            "",
            f"{est['num_subsets']} subsets of {est['subset_size']} tasks on each of "
            f"{est['num_meta_inits']} meta-initialization(s) (matrices averaged), estimator "
            f"`{est['estimator']}`, scored on {est['scoring_split']} rows by "
            f"{labels.get(est['metric'], est['metric'])}; "
            f"{format_number(est['subsets_per_second'], '.0f')} subset fits/s.",
            "",
            "![affinity](affinity_by_group.png)",
            "",
        ]
        kind = est.get("affinity_kind", "higher-order")
        if kind in _GRADIENT_AFFINITIES:
            out += [
                f"Clustered: the {_GRADIENT_AFFINITIES[kind].format(split=est['scoring_split'])} "
                f"(`--affinity_kind {kind}`, at each meta-initialization, averaged); the subsets' "
                "estimates score the candidate partitions.",
                "",
            ]
        out += _sampling_lines(est)
        if est.get("l2_selection"):  # --estimator_l2 auto
            out += [
                "λ chosen as the one at which the meta-initializations' affinities agree best "
                "(`--estimator_l2 auto`; mean and smallest pairwise Spearman; the estimated "
                f"models' mean held-out {est['metric']} for information):",
                "",
                _table(["λ", "agreement", "min", f"held-out {est['metric']}", "chosen"],
                       [[format_number(r["l2"], "g"), format_number(r["agreement"], "+.3f"),
                         format_number(r["min_agreement"], "+.3f"), format_number(r["held_out"], ".4f"),
                         "**yes**" if r["chosen"] else ""] for r in est["l2_selection"]]),
                "",
            ]  # fmt: skip
        if "self_agreement" in est:
            a = est["self_agreement"]
            out += [
                f"The meta-initializations' estimates agree with each other at Spearman "
                f"{format_number(a['mean_spearman'], '+.2f')} on average, so the {a['num_repeats']}-member "
                f"mean has a reliability of {format_number(a['reliability'], '.2f')} (Spearman–Brown); raise "
                "`--num_meta_inits` if it is low.",
                "",
            ]
        if "higher_order_self_agreement" in est:
            out += [
                "Their higher-order (subset) affinities agree at Spearman "
                f"{format_number(est['higher_order_self_agreement']['mean_spearman'], '+.2f')}.",
                "",
            ]
        if _finite(est.get("planted_gap")):  # only for data with planted groups
            out += [
                f"Mean within-group minus cross-group affinity of the planted groups: "
                f"{format_number(est['planted_gap'], '+.3f')}.",
                "",
            ]
    groups = results.get("grouping")
    if groups:
        out += [
            "## Task groups",
            "",
            f"{groups['method']} with k = {groups['k']} ({groups['k_choice']}); average "
            f"within-group density {format_number(groups['objective'])}.",
            "",
        ]
        out += [f"{i + 1}. {', '.join(g)}" for i, g in enumerate(groups["groups"])]
        out.append("")
        if _finite(groups.get("adjusted_rand_vs_planted")):  # only for data with planted groups
            out += [
                f"Adjusted Rand index against the planted groups: "
                f"{format_number(groups['adjusted_rand_vs_planted'])} (1 = recovered exactly).",
                "",
            ]
        if groups.get("candidates"):  # --partition_choice silhouette or payoff
            out += [
                "Candidate partitions by predicted payoff (the estimated validation metric of "
                "each task under its own group's estimated model, mean over tasks; ± over the "
                "meta-initializations). Tied: within `--payoff_tolerance` paired standard "
                "errors of the best; among those the most structure (the grouping's silhouette, "
                "or its significant gain over the null with `--partition_choice payoff`), then "
                "the fewest groups, is chosen.",
                "",
                _table(["candidate", "groups", "payoff", "vs best", "tied", "structure", "chosen"],
                       [[c["candidate"], c["num_groups"],
                         f"{format_number(c['payoff'], '.4f')} ± {format_number(c['payoff_std'], '.4f')}",
                         f"{format_number(c['vs_best'], '+.4f')} ± {format_number(c['vs_best_se'], '.4f')}",
                         "yes" if c["tied"] else "", format_number(c["structure"], ".3f"),
                         "**yes**" if c["chosen"] else ""] for c in groups["candidates"]]),
                "",
            ]  # fmt: skip
        coherence = groups.get("coherence")
        if coherence and (coherence["kept"] or coherence["split"]):
            out += [
                "Coherence of the best-silhouette grouping's groups: their tasks' mean "
                "silhouette on each meta-initialization's own affinity, averaged (± sd over "
                "them). Groups at or below 0 look alike only on the average and are split into "
                "single tasks (`--split_incoherent_groups`).",
                "",
                _table(["group", "coherence", "split"],
                       [[", ".join(g["tasks"]),
                         f"{format_number(g['coherence'], '.3f')} ± "
                         f"{format_number(g['coherence_std'], '.3f')}", "**yes**" if split else ""]
                        for split in (False, True) for g in coherence["split" if split else "kept"]]),
                "",
            ]  # fmt: skip
        if groups.get("sweep"):
            keys = ["k", "objective", "null_objective", "gain", "significant", "silhouette"]
            rows = [[format_number(row.get(k), ".4f") if k in ("objective", "null_objective",
                                                               "gain", "silhouette")
                     else row.get(k) for k in keys] for row in groups["sweep"]]  # fmt: skip
            intro = ("The k sweep: the SDP objective against the shuffled null's, and the mean "
                     "silhouette of each k's grouping on the affinity (n/a where undefined).")
            if "silhouette_members" in groups["sweep"][0]:  # two or more meta-initializations
                keys += ["silhouette per meta-initialization", "best on"]
                for cells, row in zip(rows, groups["sweep"], strict=True):
                    cells += [" / ".join(format_number(v, ".4f") for v in row["silhouette_members"]),
                              row["preferred_by_members"] or ""]  # fmt: skip
                intro += (" The same groupings are scored on each meta-initialization's own "
                          "affinity too; \"best on\" counts the members whose best k it is.")
                votes = groups.get("silhouette_k_votes")
                if votes:
                    intro += (f" The best k of the averaged affinity (k = {votes['k']}) is the "
                              f"best on {votes['best_on']} of {votes['meta_inits']}")
                    intro += ("." if votes["best_on"] == votes["meta_inits"] else
                              ": the members split this near tie" if votes["best_on"] else
                              ": no member's own affinity picks it")  # fmt: skip
                    if votes["best_on"] < votes["meta_inits"]:
                        intro += (", so the choice of k is fragile and validation in group "
                                  "training is what decides.")
            out += [intro, "", _table(keys, rows), ""]
    training = results.get("group_training")
    if training:
        strategies = list(training["summary"])
        generated = [m for m in GENERATED_LABELS  # --generation_metrics (text families)
                     if any(m in v for v in training["summary"].values())]  # fmt: skip
        out += [
            "## Group training",
            "",
            f"One model per group, trained {training['init']} with the run's training "
            f"arguments ({training['seeds']} seed(s)), scored on {training['split']}.",
            "",
            _table(
                ["strategy", "models", *(f"avg {labels[m]}" for m in METRICS),
                 *(f"avg {GENERATED_LABELS[m]}" for m in generated), f"{sel} wins vs all"],
                [
                    (
                        s,
                        v["num_models"],
                        v["f1"],
                        v["accuracy"],
                        v["log_loss"],
                        *(format_number(v.get(m), ".4f") for m in generated),
                        "—" if s == "all tasks" else f"{v.get('wins', '')}/{len(training['per_task'])}",
                    )
                    for s, v in training["summary"].items()
                ],
            ),  # fmt: skip
            "",
            f"Per-task {sel}:",
            "",
            _table(
                ["task", *strategies],
                [
                    (t, *(scores[s] for s in strategies))
                    for t, scores in training["per_task"].items()
                ],
            ),
            "",
            "![gains](grouping_gains.png)",
            "",
        ]
        if training.get("merged"):  # --merge_methods
            costs = ", ".join(
                f"{m} {'kept from an earlier run' if v['skipped'] else format_number(v['seconds'], '.2f') + ' s'}"
                f" (validation {sel} {format_number(v['validation'])})"
                for m, v in training["merged"].items()
            )  # fmt: skip
            out += [
                "Rows `merged (<method> <options>)`: the group models (first seed) merged into "
                "one model by that method (`merged/<method>[_<options>]/`); shared parameters "
                "merged, each task's private parameters (its head) taken from its own group's "
                "model, RegMean/Fisher "
                f"statistics from each group model on its group's training rows. Merges: {costs}.",
                "",
            ]
        validated = training.get("validated_groups")
        if validated:  # groups that scored better alone on validation, split
            kept = {frozenset(g) for g in validated}
            split = [g for g in results["grouping"]["groups"] if frozenset(g) not in kept]
            out += [
                "Validated groups: the estimate's groups, except that "
                + "; ".join("{" + ", ".join(g) + "}" for g in split)
                + " scored better on validation trained alone, so they are split into single "
                "tasks (no new training: those models are the single-task comparison's).",
                "",
            ]
        rec = training.get("recommended")
        if rec:  # the estimate proposes, validation decides
            val = ", ".join(f"{s} {format_number(v)}" for s, v in rec["validation"].items())
            where = f" at `{rec['path']}`" if rec.get("path") else ""
            out += [
                f"**Recommended: {rec['strategy']}** ({len(rec['groups'])} model(s){where}): "
                f"the best validation {sel} of {val}; its test {sel} is {format_number(rec['test'])}.",
                "",
            ]
    truth = results.get("ground_truth")
    if truth:
        c, r = truth["affinity"], truth["scores"]
        out += [
            "## Estimated vs fine-tuned",
            "",
            f"{truth['num_subsets']} subsets fine-tuned for real{TRUTH_STARTS.get(truth.get('init'), '')}: "
            + _truth_cost(truth),
            "",
            _table(
                ["", "relative Frobenius", "mean abs error", "Spearman", "Pearson"],
                [
                    (
                        "affinity entries",
                        c["relative_frobenius"],
                        c["mean_abs_error"],
                        c["spearman"],
                        c["pearson"],
                    ),
                    (
                        "per-(subset, task) scores",
                        "",
                        r["mean_abs_error"],
                        r["spearman"],
                        r["pearson"],
                    ),
                ],
            ),  # fmt: skip
            "",
            "![estimated vs true](estimated_vs_true.png)",
            "",
        ]
        noise = []
        repeats = ("fine-tuning runs (each from its own θ0)" if truth.get("init") == "members"
                   else "fine-tuning seeds")  # fmt: skip
        for key, label in (("truth_self_agreement", repeats),
                           ("estimate_self_agreement", "meta-initializations")):  # fmt: skip
            if key in truth:
                a = truth[key]
                noise.append(
                    f"{a['num_repeats']} {label} agree with each other at Spearman "
                    f"{format_number(a['mean_spearman'], '+.2f')} (reliability of their mean "
                    f"{format_number(a['reliability'], '.2f')})"
                )
        if noise:
            out += ["Both sides are noisy: " + "; ".join(noise) + "."]
            if _finite(truth.get("corrected_spearman")):
                corrected = truth["corrected_spearman"]
                out[-1] += (
                    f" Corrected for that noise, the Spearman of the affinity entries is "
                    f"{format_number(corrected, '+.2f')}"
                    + (
                        " (above 1: too few seeds, meta-initializations or subsets for the "
                        "correction to be precise)."
                        if corrected > 1
                        else "."
                    )
                )
            out += [""]
        for row in truth.get("truth_groups") or []:
            against = [f"ARI {format_number(row[key], '.2f')} against {label}"
                       for key, label in (("ari_vs_chosen", "the job's groups"),
                                          ("ari_vs_planted", "the planted groups"))
                       if row.get(key) is not None]  # fmt: skip
            out += [
                f"The fine-tuned affinity itself, clustered as the estimate is (SDP, k = "
                f"{row['k']}): " + "; ".join("{" + ", ".join(g) + "}" for g in row["groups"])
                + (f" ({', '.join(against)})." if against else "."),
                "",
            ]
    out += _exhaustive_lines(results.get("exhaustive_truth"))
    return "\n".join(out)


def _sampling_lines(est: Mapping[str, Any]) -> list[str]:
    """How the subsets were drawn and the share of task pairs they observe; per round under
    ``--sampling adaptive`` (notes B.1)."""
    if "pair_coverage" not in est:
        return []
    line = (f"Sampling: {est.get('sampling', 'uniform')}; the subsets observe "
            f"{format_number(est['pair_coverage'], '.1%')} of the task pairs (affinity coverage).")  # fmt: skip
    adaptive = est.get("adaptive")
    if not adaptive:
        return [line, ""]
    start = adaptive.get("initial_clusters") or []
    source = adaptive.get("initial_clusters_path") or "none"
    rows = [[r["round"], ", ".join(r["new_tasks"]), r["num_subsets"], format_number(r["coverage"], ".1%"),
             format_number(r["coverage_seen"], ".1%"), len(r["clusters"])] for r in adaptive["rounds"]]  # fmt: skip
    return [
        line,
        "",
        f"Adaptive rounds from {len(start)} initial cluster(s) ({source}): each subset drawn "
        "from one current cluster plus the round's new tasks, then the tasks re-clustered.",
        "",
        _table(["round", "new tasks", "subsets", "coverage (all pairs)",
                "coverage (tasks so far)", "clusters"], rows),  # fmt: skip
        "",
        "Clusters after the last round: "
        + "; ".join("{" + ", ".join(c) + "}" for c in adaptive["final_clusters"]) + ".",
        "",
    ]


def _truth_cost(truth: Mapping[str, Any]) -> str:
    """What the truth's runs cost, and the estimate's share of it; reused runs cost nothing
    in this call, so the share is extrapolated from the runs it trained."""
    if truth.get("runs_trained") == 0:
        return f"all {truth['runs']} runs reused from an earlier call of the job."
    trained = ("" if truth.get("runs_trained") in (None, truth.get("runs")) else
               f" for {truth['runs_trained']} of the {truth['runs']} runs, the rest reused")  # fmt: skip
    return (f"{format_number(truth['seconds'], '.0f')} s{trained}; estimation took "
            f"{format_number(truth['compute_ratio'], '.1%')} of the time all runs take.")


def _exhaustive_lines(truth: Mapping[str, Any] | None) -> list[str]:
    """The ``--ground_truth_exhaustive`` section: all C(n, K) subsets fine-tuned, the estimate
    against the truth, and the partitions an exhaustive search finds on it."""
    if not truth:
        return []
    c, chosen = truth["affinity"], truth["chosen"]
    out = [
        "## Exhaustive truth",
        "",
        f"All {truth['num_subsets']} subsets of {truth['subset_size']} tasks fine-tuned "
        f"({truth['seeds']} seed(s), {format_number(truth['seconds'], '.0f')} s). Estimated vs true "
        f"affinity: Spearman {format_number(c['spearman'], '+.2f')}, relative Frobenius "
        f"{format_number(c['relative_frobenius'])} ({c['num_entries']} entries).",
        "",
    ]
    if truth.get("by_k"):
        out += [
            "Per k, the best partition of the true affinity by exhaustive search against the SDP "
            "on the truth and on the estimate (ARI against the exhaustive partition; objectives "
            "are the average density on the true affinity):",
            "",
            _table(["k", "exhaustive objective", "SDP on truth: ARI", "objective",
                    "SDP on estimate: ARI", "objective"],
                   [[r["k"], r["exhaustive_objective"], r["sdp_true_ari"], r["sdp_true_objective"],
                     r["sdp_estimate_ari"], r["sdp_estimate_objective"]] for r in truth["by_k"]]),
            "",
        ]  # fmt: skip
    elif truth.get("note"):
        out += [f"No per-k comparison: {truth['note']}.", ""]
    line = (f"The job's grouping (k = {chosen['k']}) has true objective "
            f"{format_number(chosen['true_objective'])}")  # fmt: skip
    if _finite(chosen.get("exhaustive_objective")):
        line += (f" against {format_number(chosen['exhaustive_objective'])} for the exhaustive optimum "
                 f"at that k (ARI {format_number(chosen['ari_vs_exhaustive'], '.2f')})")  # fmt: skip
    out += [line + ".", ""]
    parts = truth.get("partitions") or {}
    if parts.get("note"):
        out += [parts["note"][0].upper() + parts["note"][1:] + ".", ""]
    elif parts.get("scorable"):
        top = parts["top"][0]
        out += [
            f"{parts['scorable']} partitions are made of fine-tuned subsets only; the best by "
            f"the real {truth['metric']} (mean over tasks, each in its own group's run): "
            + "; ".join("{" + ", ".join(g) + "}" for g in top["groups"])
            + f" ({format_number(top['score'], '.4f')})."
            + (f" The job's grouping ranks {chosen['rank']} of them ({format_number(chosen['score'], '.4f')})."
               if chosen.get("rank") else ""),  # fmt: skip
            "",
        ]
    return out


def write_report(results: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write ``report.md`` into ``output_dir`` atomically."""
    return atomic_write_text(Path(output_dir) / "report.md", render_report(results))
