"""``report.md`` and PNGs of the selection job: source scores, forward-selection trajectories,
estimated against real target metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_tae.estimation.schema import higher_is_better
from hf_tae.pipeline.report import format_number
from hf_tae.utils.io import atomic_write_text
from hf_tae.utils.plots import pyplot, save_figure


def plot_selection(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """``source_scores.png``, ``forward_selection.png`` and (after real training)
    ``estimated_vs_real.png``."""
    plt = pyplot()
    metric = results["metric"]
    out = []
    ensemble = results["ensemble"]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(ensemble) + 2), 3.6))
    x = range(len(ensemble))
    scores = [r["score"] for r in ensemble]
    err = [
        [r["score"] - r["ci_low"] for r in ensemble],
        [r["ci_high"] - r["score"] for r in ensemble],
    ]
    chosen = set(results["methods"]["ensemble (ours)"])
    colors = ["tab:green" if r["name"] in chosen else "tab:gray" for r in ensemble]
    # points, not bars: the scores are often negative (−loss), where bars hang from the top
    for i, (score, color) in enumerate(zip(scores, colors, strict=True)):
        ax.errorbar([i], [score], yerr=[[err[0][i]], [err[1][i]]], fmt="o", color=color,
                    capsize=3, markersize=6)  # fmt: skip
    ax.set_xticks(list(x), [r["name"] for r in ensemble], rotation=60, ha="right", fontsize=8)
    sign = "" if higher_is_better(metric) else "−"
    ax.set_ylabel(f"ensemble score ({sign}{metric})")
    lo, hi = min(r["ci_low"] for r in ensemble), max(r["ci_high"] for r in ensemble)
    pad = 0.1 * (hi - lo) if hi > lo else 1e-3
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title("source scores (green: chosen; whiskers: 95% CI)")
    out.append(save_figure(fig, output_dir / "source_scores.png"))

    fig, ax = plt.subplots(figsize=(6, 3.6))
    step = results["forward_stepwise"]
    ax.plot([r["step"] for r in step], [r["score"] for r in step], "o-", label="stepwise")
    fwd = results["forward_pass"]
    ax.plot([r["step"] + 1 for r in fwd], [r["best"] for r in fwd], "s--", label="one pass (best)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"estimated {sign}{metric}")
    ax.legend(fontsize=8)
    ax.set_title("forward selection")
    out.append(save_figure(fig, output_dir / "forward_selection.png"))

    training = results.get("training", {})
    if "pairs" in training:
        fig, ax = plt.subplots(figsize=(4.2, 4))
        est = [p["estimated"] for p in training["pairs"]]
        real = [p["real"] for p in training["pairs"]]
        ax.scatter(est, real, s=14)
        ax.set_xlabel(f"estimated {metric}")
        ax.set_ylabel(f"fine-tuned {metric}")
        agreement = training["estimated_vs_real"]
        ax.set_title(f"target, {agreement['num_subsets']} subsets: "
                     f"Spearman {agreement['spearman']:.2f}", fontsize=9)  # fmt: skip
        out.append(save_figure(fig, output_dir / "estimated_vs_real.png"))
    return out


def write_selection_report(results: dict[str, Any], output_dir: Path) -> Path:
    """The job's ``report.md``."""
    metric = results["metric"]
    lines = [
        f"# Data selection for target `{results['target']}` ({results['family']})", "",
        f"Command: `{results['command']}`" if results.get("command") else "", "",
        f"Sources: {results['sources']['method']} ({len(results['sources']['names'])}); "
        f"base in every subset: {results['sources']['base'] or 'none'}. Estimates rank by the "
        f"target's validation {metric}.", "",
        "## Choices", "",
        "| method | sources |", "|---|---|",
    ]  # fmt: skip
    lines += [f"| {m} | {', '.join(s) or '(none)'} |" for m, s in results["methods"].items()]
    by_l2 = results["estimation"].get("by_l2", {})
    if len(by_l2) > 1:
        lines += ["", "## Choices by λ", "", "Each λ of the grid chooses; a source is kept when "
                  "more than half of them keep it (`--estimator_l2 vote`). Source scores and "
                  f"trajectories below are at λ = {results['estimation']['l2']:g}.", "",
                  "| λ | ensemble (ours) | forward stepwise |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {float(l2):g} | {', '.join(c['ensemble (ours)']) or '(none)'} | "
                  f"{', '.join(c['forward stepwise']) or '(none)'} |"
                  for l2, c in by_l2.items()]  # fmt: skip
        lines.append(f"| **vote** | {', '.join(results['methods']['ensemble (ours)']) or '(none)'}"
                     f" | {', '.join(results['methods']['forward stepwise']) or '(none)'} |")  # fmt: skip
    members = results.get("by_meta_init", [])
    if members:
        real = results.get("training", {}).get("by_meta_init", [])
        lines += ["", "## Choices by meta-initialization", "", f"Estimates are averaged over "
                  f"{len(members)} meta-initializations; each one's own choice (voted across "
                  "λ) shows how much a single θ0 would have decided by chance.", "",
                  "| θ0 seed | ensemble (ours) | forward pass (GradEx code) | real test |",
                  "|---|---|---|---|"]  # fmt: skip
        for i, m in enumerate(members):
            test = f"{real[i]['test']:.4f}" if i < len(real) else "–"
            lines.append(f"| {m['seed']} | {', '.join(m['ensemble (ours)']) or '(none)'} | "
                         f"{', '.join(m['forward pass (GradEx code)']) or '(none)'} | {test} |")  # fmt: skip
    lines += ["", "## Source scores", "", "| source | score | 95% CI | subsets | gradient cosine "
              "| representation cosine |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['name']} | {r['score']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | "
              f"{r['count']} | {format_number(r['gradient_similarity'], missing='–')} | "
              f"{format_number(r.get('representation_similarity'), missing='–')} |"
              for r in results["ensemble"]]  # fmt: skip
    fo = results.get("first_order", {})
    if "first_order_error" in fo:
        lines += ["", f"First-order (A.7) error of the chosen subset's estimate at its step "
                      f"‖Δθ‖ = {fo['norm']:.3g} ({fo['fraction']:.3g} of ‖θ0‖): "
                      f"{fo['first_order_error']:.3g} (without the gradient term: "
                      f"{fo['zeroth_order_error']:.3g})."]  # fmt: skip
    training = results.get("training", {})
    if "skipped" in training:
        lines += ["", f"Real training skipped: {training['skipped']}."]
    if "by_method" in training:
        m = training["metric"]
        lines += ["", f"## Real training (target test {m})", "", f"| method | test {m} | "
                  f"validation {m} | sources |", "|---|---|---|---|"]  # fmt: skip
        for name, r in training["by_method"].items():
            lines.append(f"| {name} | {r['test']:.4f} | {r['validation']:.4f} | "
                         f"{', '.join(r['sources']) or '(none)'} |")  # fmt: skip
        rec = training.get("recommended")
        if rec:
            lines += ["", f"**Recommended: {', '.join(rec['sources']) or '(the base alone)'}** "
                          f"(`{rec['method']}`): the best validation {m} "
                          f"({rec['validation']:.4f}) among {', '.join(rec['candidates'])}; "
                          f"its test {m} is {rec['test']:.4f}. The estimate proposes, "
                          "validation decides."]  # fmt: skip
        if training["source_effects"]:
            lines += ["", f"Each source alone with the base (test {m} minus the base alone):", ""]
        lines += [f"- {s}: {v:+.4f}" for s, v in training["source_effects"].items()]
        a = training["estimated_vs_real"]
        c = training["compute"]
        lines += ["", f"Estimated vs real validation {a['metric']} over {a['num_subsets']} "
                      f"trained subsets: mean absolute error {a['mean_abs_error']:.4f} "
                      f"(relative {a['mean_rel_error']:.3f}), Spearman {a['spearman']:.3f}, "
                      f"Pearson {a['pearson']:.3f}.", "",
                  f"Compute: the selection evaluated {c['subsets_evaluated']} subsets in "
                  f"{c['estimation_seconds']:.1f} s (gradients + estimation); training them "
                  f"would take ≈ {c['training_seconds_for_them']:.0f} s "
                  f"({training['seconds_per_run']:.1f} s per run): {c['ratio']:.0f}× "
                  f"({c['ratio_with_meta_init']:.0f}× counting the meta-initialization)."]  # fmt: skip
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                              results["timings"].items()), ""]  # fmt: skip
    return atomic_write_text(output_dir / "report.md", "\n".join(lines))

