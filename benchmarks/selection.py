"""GradEx data selection on the planted digits benchmark: does choosing sources by estimate pay
off in real training?

What it measures
    The data are :func:`hf_tae.selection.planted.make_selection_domains` (``--variant``): a
    target domain with 30 training digits and 7 candidate sources, one model with a shared
    classification head. ``sources`` (default): 3 helpful (more upright digits), 2 mislabelled
    (uniformly wrong labels), 2 off-view (digits with their 2×2 tiles rearranged, one of them
    mislabelled). ``lookalikes``: 2 helpful, 2 near-copies of the target's own digits, target-like
    digits with wrong or class-swapped labels, 1 off-view. The selection job
    (``hf-tae select images --target target``) trains 4 meta-initializations on everything,
    collects gradients, estimates the target's validation cross-entropy for subsets of sources
    (averaged over the θ0s), and chooses with every method (ensemble best prefix, ensemble above
    the mean, GradEx's one-pass forward selection, textbook forward stepwise) and baseline (all
    sources, gradient similarity, representation similarity, random subsets of the same size,
    the target alone). Then it trains, for real, every method's choice, each θ0's own choice,
    the target with each source alone (is the planting real?) and random subsets of half the
    sources, and prints:

    * the target's test accuracy after training on each method's choice and each θ0's;
    * the real effect of each source (target + source vs the target alone), by planted role;
    * estimated vs real validation cross-entropy over every trained subset (error, Spearman);
    * the compute of the estimates against training every subset the selection evaluated.

How to run
    ``python benchmarks/selection.py [--variant lookalikes] [--data_seed N]`` (resumable: rerun
    the same command), output in ``runs/benchmark_selection[_lookalikes][_seedN]`` and the
    printed summary in ``benchmarks/results/selection[_lookalikes][_seedN].txt`` (with the job's
    PNGs next to it). ``--data_seed`` builds a fresh instance of the variant (held-out check). Extra flags go to ``hf-tae select``.
    Cost: about 70 real runs (≈ 34 subsets × 2 seeds) plus the planted answer, 12 s each on one
    thread of the 2-core machine (session 11; 27–48 s under a load of 4–8 in session 7), and
    20 s per θ0: about 17 minutes from scratch.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

OUTPUT = Path("runs/benchmark_selection")
RESULTS = Path(__file__).parent / "results" / "selection.txt"
#: The benchmark's variants (``--variant``; see :mod:`hf_tae.selection.planted`).
VARIANTS = ("sources", "lookalikes")
#: Shorter runs than the image family's 600 steps (31 subsets × 2 seeds of real training).
FLAGS = [
    "--head", "shared", "--target", "target", "--max_steps", "300",
    "--per_device_train_batch_size", "32", "--truth_subsets", "20", "--num_subsets", "200",
    "--train_seeds", "0", "1", "--num_meta_inits", "4",
    "--disable_tqdm", "true", "--logging_strategy", "no",
]  # fmt: skip


def summarize(results: dict, roles: dict[str, str]) -> str:
    tr = results["training"]
    lines = [f"target {results['target']}; estimates rank by validation {results['metric']}; "
             f"real runs: {tr['runs']} ({tr['seconds_per_run']:.1f} s each)", "",
             f"{'method':<34} {'test acc':>8}  sources"]  # fmt: skip
    for name, r in sorted(tr["by_method"].items(), key=lambda kv: -kv[1]["test"]):
        lines.append(f"{name:<34} {r['test']:>8.4f}  {', '.join(r['sources']) or '(none)'}")
    rec = tr.get("recommended")
    if rec:
        lines += ["", f"recommended (best validation accuracy among {', '.join(rec['candidates'])}):"
                      f" {rec['method']}, test acc {rec['test']:.4f} "
                      f"({', '.join(rec['sources']) or 'target alone'})"]  # fmt: skip
    members = results.get("by_meta_init", [])
    if members:
        lines += ["", f"each meta-initialization's own choice (the job averages the estimates of "
                      f"all {len(members)}):"]  # fmt: skip
        for m, r in zip(members, tr.get("by_meta_init", []), strict=False):
            lines.append(f"  θ0 seed {m['seed']}: test acc {r['test']:.4f}  "
                         f"{', '.join(r['sources']) or '(none)'}")  # fmt: skip
        tests = [r["test"] for r in tr.get("by_meta_init", [])]
        if tests:
            lines.append(f"  mean over θ0s {np.mean(tests):.4f} (min {min(tests):.4f}, max "
                         f"{max(tests):.4f}); the ensemble's choice "
                         f"{tr['by_method']['ensemble (ours)']['test']:.4f}")  # fmt: skip
    lines += ["", "real effect of each source (test accuracy, target + source − target alone):"]
    for role in ("helpful", "redundant", "off-view", "harmful"):
        effects = {s: v for s, v in tr["source_effects"].items() if roles[s] == role}
        if not effects:
            continue
        text = ", ".join(f"{s} {v:+.3f}" for s, v in effects.items())
        lines.append(f"  {role:<9} mean {np.mean(list(effects.values())):+.3f}: {text}")
    a, c = tr["estimated_vs_real"], tr["compute"]
    lines += ["", f"estimated vs real validation {a['metric']} over {a['num_subsets']} trained "
                  f"subsets: mean abs error {a['mean_abs_error']:.3f} (relative "
                  f"{a['mean_rel_error']:.3f}), Spearman {a['spearman']:.3f}, Pearson "
                  f"{a['pearson']:.3f}"]  # fmt: skip
    rnd = tr.get("estimated_vs_real_random")
    if rnd:
        lines.append(f"  random half-size subsets only ({rnd['num_subsets']}): abs error "
                     f"{rnd['mean_abs_error']:.3f}, Spearman {rnd['spearman']:.3f}")  # fmt: skip
    fo = results["first_order"]
    if "first_order_error" in fo:
        lines.append(f"first-order (A.7) error at the chosen step ‖Δθ‖ = {fo['norm']:.2f} "
                     f"({fo['fraction']:.2f} of ‖θ0‖): {fo['first_order_error']:.3f} (zeroth "
                     f"order {fo['zeroth_order_error']:.3f})")  # fmt: skip
    lines += [f"compute: {c['subsets_evaluated']} subsets estimated in "
              f"{c['estimation_seconds']:.1f} s (gradients + estimates) vs ≈ "
              f"{c['training_seconds_for_them']:.0f} s to train them: {c['ratio']:.0f}× "
              f"({c['ratio_with_meta_init']:.1f}× counting the meta-initialization, "
              f"{results['timings']['meta-initialization']:.0f} s)"]  # fmt: skip
    return "\n".join(lines)


def by_l2(results: dict, roles: dict[str, str]) -> str:
    """Each λ's own choice (ensemble best prefix and forward stepwise) and how linear the model
    is along it (A.7: first- vs zeroth-order error of the target's score at that step); the
    job keeps what most λ values keep (``--estimator_l2 vote``)."""
    helpful = sorted(s for s, role in roles.items() if role == "helpful")
    lines = ["choice by λ (same gradients; the job keeps a source when most λ keep it):"]
    for l2, choice in results["estimation"]["by_l2"].items():
        fo = results.get("first_order_by_l2", {}).get(l2, {})
        ours, step = choice["ensemble (ours)"], choice["forward stepwise"]
        mark = "planted answer" if sorted(ours) == helpful else "not the planted answer"
        lines.append(f"  λ = {float(l2):g}: ensemble {', '.join(ours) or '(none)'}; stepwise "
                     f"{'same' if sorted(step) == sorted(ours) else ', '.join(step)} ({mark}); "
                     f"A.7 at ‖Δθ‖ = {fo.get('fraction', float('nan')):.3f} of ‖θ0‖: first order "
                     f"{fo.get('first_order_error', float('nan')):.3f}, zeroth "
                     f"{fo.get('zeroth_order_error', float('nan')):.3f}")  # fmt: skip
    lines.append(f"  vote: {', '.join(results['methods']['ensemble (ours)']) or '(none)'}")
    return "\n".join(lines)


def planted_answer(argv: list[str], roles: dict[str, str], output: Path) -> dict:
    """Real training of the planted answer (the target with every helpful source and nothing
    else), with the job's model and seeds: the reference a selection is judged against."""
    from hf_tae.families import get_family
    from hf_tae.pipeline.stages import fresh_model, init_fingerprint, run_arguments
    from hf_tae.selection.check import train_subsets
    from hf_tae.selection.cli import build_parser

    family = get_family("images")
    family_args, _, _, sel, training_args = build_parser("images").parse_args_and_config(argv)
    tasks = family.load_tasks(family_args)
    answer = ["target", *(s for s, role in roles.items() if role == "helpful")]
    real, _ = train_subsets(fresh_model(family, family_args, tasks, output, sel.train_init),
                            tasks, "target", [answer], run_arguments(training_args),
                            output / "training", seeds=sel.train_seeds, show_progress=False,
                            trainer_class=family.trainer_class,
                            fingerprint=init_fingerprint(family, family_args, tasks, output,
                                                         sel.train_init))  # fmt: skip
    test = real[real["split"] == "test"]
    return {"sources": answer[1:], "test": float(test["accuracy"].iloc[0])}


def main(argv: list[str] | None = None) -> dict:
    from hf_tae.selection.cli import run
    from hf_tae.selection.planted import VARIANT_ROLES, make_selection_domains

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags go to `hf-tae select images`.")  # fmt: skip
    parser.add_argument("--variant", choices=VARIANTS, default="sources",
                        help="sources: helpful, mislabelled and off-view sources (default); "
                             "lookalikes: near-copies of the target and mislabelled data that "
                             "similarity measures rank high")  # fmt: skip
    parser.add_argument("--data_seed", type=int, default=0,
                        help="seed of the benchmark's data (digit splits, handwriting per source, "
                             "wrong labels); another seed is a fresh instance, a held-out check")  # fmt: skip
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    suffix = "" if known.variant == "sources" else f"_{known.variant}"
    suffix += f"_seed{known.data_seed}" if known.data_seed else ""
    output = Path(f"{OUTPUT}{suffix}")
    data = output / "data_planted"
    if not data.exists():
        make_selection_domains(variant=known.variant, seed=known.data_seed).save(data)
    roles = VARIANT_ROLES[known.variant]
    args = ["--dataset", str(data), "--output_dir", str(output), *FLAGS, *rest]
    results = run(["images", *args])
    reference = planted_answer(args, roles, output)
    text = (summarize(results, roles) + f"\nplanted answer (reference, trained the same way): "
            f"test acc {reference['test']:.4f} ({', '.join(reference['sources'])})\n"
            + by_l2(results, roles))  # fmt: skip
    print(text)
    RESULTS.with_name(f"selection{suffix}.txt").write_text(text + "\n")
    for plot in ("source_scores", "forward_selection", "estimated_vs_real"):
        shutil.copyfile(output / f"{plot}.png", RESULTS.with_name(f"selection{suffix}_{plot}.png"))
    (output / "summary.json").write_text(json.dumps(results["training"], indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
