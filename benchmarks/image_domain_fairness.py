"""Fairness check of the embedded image default: do the planted domain groups pay off in real
training?

What it measures
    With real fine-tuning (:class:`~hf_tae.SubsetFineTuner`: the image family's model trained
    from scratch on a subset of domains with :class:`~hf_tae.MultitaskTrainer`, resumable),
    every domain ``i`` is trained alone and with each other domain ``j``; ``i`` is scored by its
    test accuracy and cross-entropy, averaged over seeds. Reported per pair kind (within the
    planted group / across groups), mean ± standard error over (target, partner) pairs of
    ``Δacc = acc_i({i, j}) − acc_i({i})`` and ``ΔCE``, a one-sided Welch t-test (within > cross),
    the per-target AUC of within-group partners against cross-group partners, and the payoff
    that matters to a user: one model per planted group against one model on all domains and
    one model per domain (per domain and averaged).

How to run
    ``python benchmarks/image_domain_fairness.py --output_dir runs/image_fairness``

    writes ``results.json`` and ``image_fairness.png`` into ``--output_dir``. Any flag of
    ``hf-tae run images --help`` for the data and model (``--train_per_domain``, ``--conflict``,
    ``--backbone``, ...) and of the training arguments can be passed, so harder variants are one
    flag away. Runs are resumable (rerun the same command).

Defaults
    The image family's model and training defaults, except ``--lr_scheduler_type constant``: with
    linear decay and a fixed number of epochs a domain trained alone would get half the
    optimizer steps of a pair, mixing transfer with "more training".
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from itertools import combinations  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402


def mean_se(values) -> dict:
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))), "n": len(v)}


def auc(pos, neg) -> float:
    """P(a within-group partner beats a cross-group partner), ties count half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def main(argv: list[str] | None = None) -> dict:
    import torch
    from transformers import HfArgumentParser

    from hf_tae.evaluation.ground_truth import SubsetFineTuner
    from hf_tae.evaluation.group_training import compare_group_training, summarize_group_training
    from hf_tae.families.image.family import ImageArguments, ImageFamily
    from hf_tae.trainers.arguments import MultitaskTrainingArguments
    from hf_tae.utils.plots import pyplot, save_figure

    torch.set_num_threads(1)
    family = ImageFamily()
    parser = HfArgumentParser((ImageArguments, MultitaskTrainingArguments))
    parser.set_defaults(output_dir="runs/image_fairness", disable_tqdm=True, report_to="none",
                        lr_scheduler_type="constant", **family.training_defaults)  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    image_args, training_args, extra = parser.parse_args_into_dataclasses(
        args=sys.argv[1:] if argv is None else argv
    )
    training_args.use_cpu = not torch.cuda.is_available()
    out = Path(training_args.output_dir)
    tasks = family.load_tasks(image_args)
    groups = family.planted_groups(tasks)
    names, n = tasks.task_names, tasks.num_tasks

    def model_init():
        return family.model_init(image_args, tasks)

    run_args = dataclasses.replace(training_args, output_dir=str(out / "tmp"))
    subsets = [(i,) for i in range(n)] + list(combinations(range(n), 2))
    table = SubsetFineTuner(model_init, tasks, run_args, out / "pairs", seeds=extra.seeds).run(
        subsets, split="test"
    )
    grouped = table.groupby([table["subset"].map(tuple), "task"])[["accuracy", "log_loss"]].mean()
    means = {key: row for key, row in grouped.iterrows()}  # (subset tuple, task) -> scores
    pairs = []
    for i in range(n):
        alone = means[((i,), i)]
        for j in range(n):
            if j == i:
                continue
            pair = means[(tuple(sorted((i, j))), i)]
            pairs.append({
                "target": names[i], "partner": names[j],
                "kind": "within" if groups[i] == groups[j] else "cross",
                "delta_accuracy": float(pair["accuracy"] - alone["accuracy"]),
                "delta_log_loss": float(pair["log_loss"] - alone["log_loss"]),
            })  # fmt: skip
    summary: dict = {}
    for key in ("delta_accuracy", "delta_log_loss"):
        within = [p[key] for p in pairs if p["kind"] == "within"]
        cross = [p[key] for p in pairs if p["kind"] == "cross"]
        sign = 1.0 if key == "delta_accuracy" else -1.0
        test = stats.ttest_ind(sign * np.asarray(within), sign * np.asarray(cross),
                               equal_var=False, alternative="greater")  # fmt: skip
        summary[key] = {"within": mean_se(within), "cross": mean_se(cross),
                        "p_within_better": float(test.pvalue)}  # fmt: skip
    summary["per_target_auc_accuracy"] = mean_se([
        auc([p["delta_accuracy"] for p in pairs if p["target"] == t and p["kind"] == "within"],
            [p["delta_accuracy"] for p in pairs if p["target"] == t and p["kind"] == "cross"])
        for t in names
    ])  # fmt: skip
    planted: dict[int, list[str]] = {}
    for name, g in zip(names, groups, strict=True):
        planted.setdefault(int(g), []).append(name)
    strategies = {"planted groups": list(planted.values()), "all domains": [names],
                  "single domain": [[t] for t in names]}  # fmt: skip
    comparison = compare_group_training(model_init, tasks, strategies, run_args,
                                        out / "pairs", seeds=extra.seeds, split="test",
                                        show_progress=False)  # fmt: skip
    strategy_summary = summarize_group_training(comparison, reference="all domains",
                                                metric="accuracy")  # fmt: skip
    wide = comparison.pivot(index="task_name", columns="strategy", values="accuracy").loc[names]
    results = {
        "data": family.describe(tasks),
        "seeds": extra.seeds,
        "training": {k: getattr(training_args, k) for k in
                     ("learning_rate", "num_train_epochs", "per_device_train_batch_size",
                      "lr_scheduler_type")},
        "pairs": pairs,
        "summary": summary,
        "strategies": json.loads(strategy_summary.to_json(orient="index")),
        "per_domain_accuracy": json.loads(wide.to_json(orient="index")),
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in zip(axes, ("delta_accuracy", "delta_log_loss"),
                              ("Δ test accuracy", "Δ test cross-entropy"), strict=True):  # fmt: skip
        data = [[p[key] for p in pairs if p["kind"] == k] for k in ("within", "cross")]
        ax.boxplot(data, tick_labels=["within group", "across groups"])
        ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_ylabel(f"{label} (pair − alone)")
    fig.suptitle("image default: a partner domain's effect on the target", fontsize=10)
    save_figure(fig, out / "image_fairness.png")
    print(f"{results['data']}; seeds {results['seeds']}")
    for key, s in summary.items():
        if key.startswith("delta"):
            w, c = s["within"], s["cross"]
            print(f"{key:>15}: within {w['mean']:+.4f} ± {w['se']:.4f}  cross "
                  f"{c['mean']:+.4f} ± {c['se']:.4f}  (p within better = {s['p_within_better']:.2g})")  # fmt: skip
    print(f"per-target AUC (accuracy): {summary['per_target_auc_accuracy']['mean']:.3f}")
    for name, s in results["strategies"].items():
        print(f"{name:>15}: test accuracy {s['accuracy']:.4f}, cross-entropy {s['log_loss']:.4f}, "
              f"wins vs all domains {s['wins']}/{n}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
