"""Fairness check of the embedded default data: do planted task groups show up as real affinity?

What it measures
    With *real* fine-tuning (``MultitaskTrainer``, a SIGN model trained from scratch on a task
    subset, exactly as the ground truth of Grad-TAE is built, notes A.4 "pairwise" mode), the
    planted groups of :func:`hf_tae.generate_community_graph` must be visible:

    * within-group pairs ``{i, j}`` (same planted group) must give task ``i`` clearly higher
      validation scores than cross-group pairs, and
    * cross-group pairs should *interfere*: training ``i`` next to a task of another group
      should cost ``i`` accuracy compared with training ``i`` alone.

    For every target task ``i`` (all tasks, or ``--num_targets`` of them, balanced across
    groups) it trains ``{i}`` alone, ``{i, j}`` for within-group partners ``j`` and ``{i, j}``
    for as many cross-group partners (seeded choice). Each subset is trained once per seed (a
    pair run scores both of its tasks) and task ``i`` is scored by its validation F1 and
    validation BCE loss (``eval_<task>_f1``, ``eval_<task>_loss``), averaged over seeds.

    Reported per pair kind (within / cross), mean ± standard error over (target, partner)
    pairs of

    * ``ΔF1 = F1_i({i, j}) − F1_i({i})`` and ``Δloss = loss_i({i, j}) − loss_i({i})``;
    * the Grad-TAE pairwise affinity ``T[i, j] = f_i({i, j})`` z-normalised within target ``i``
      (``(m − mean) / (std + 1e-3)`` over the partners of ``i``), for f = F1 and f = −loss;

    plus one-sided Welch t-tests (within > cross) on ΔF1, −Δloss and the z-scored affinities,
    one-sample t-tests of cross-pair interference (ΔF1 < 0, Δloss > 0) and the per-target
    AUC of within-group partners against cross-group partners.

How to run
    ``python benchmarks/generator_fairness.py --output_dir runs/fairness``

    writes ``results.json`` (every training run, every pair, the summary) and
    ``fairness.png`` (distributions of ΔF1, Δloss and the z-scored affinity by pair kind)
    into ``--output_dir``. With the defaults (16 targets, 2 seeds, 128 trainings) it takes
    about 8 minutes on one CPU thread. ``--help`` lists every option; generator and model
    settings (``--hidden_size``, ``--community_strength``, ...) can be changed to compare
    settings.

Defaults
    Model and training defaults follow ``recipes/graph_communities.py`` (hidden_size 8,
    dropout 0.1, input dropout 0.1, learning rate 1e-2, 60 epochs, batch 256), except the
    learning-rate schedule: ``--lr_scheduler_type constant`` by default, because with the
    Trainer's default linear decay and a fixed number of epochs a task trained alone gets half
    the optimizer steps of a pair, so ΔF1 would mix transfer with "more training".
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

KINDS = ("within", "cross")


# --------------------------------------------------------------------------- arguments
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep the module docstring's layout and show every default."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output_dir", default="runs/fairness", help="Folder for results.json and fairness.png."
    )

    proto = parser.add_argument_group("protocol")
    proto.add_argument(
        "--num_targets",
        type=int,
        default=None,
        help="Number of target tasks (taken round-robin over the groups: g0_c0, g1_c0, ...); all tasks by default.",
    )
    proto.add_argument(
        "--num_within",
        type=int,
        default=None,
        help="Within-group partners per target (seeded choice); all other tasks of its group by default.",
    )
    proto.add_argument(
        "--num_cross",
        type=int,
        default=None,
        help="Cross-group partners per target (seeded choice); equal to the number of within-group "
        "partners by default.",
    )
    proto.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="Training seeds; scores are averaged."
    )
    proto.add_argument(
        "--partner_seed",
        type=int,
        default=0,
        help="Seed of the rng that picks cross-group partners.",
    )

    gen = parser.add_argument_group("generator (hf_tae.generate_community_graph)")
    gen.add_argument("--graph_seed", type=int, default=0, help="Seed of the generated graph.")
    gen.add_argument(
        "--num_groups",
        type=int,
        default=None,
        help="Planted groups (generator default when omitted).",
    )
    gen.add_argument(
        "--tasks_per_group", type=int, default=None, help="Tasks per group (generator default)."
    )
    gen.add_argument(
        "--community_strength",
        type=float,
        default=None,
        help="Per-community feature offset (generator default).",
    )
    gen.add_argument(
        "--signature_strength",
        type=float,
        default=None,
        help="Group feature signature (generator default).",
    )
    gen.add_argument(
        "--core_keep",
        type=float,
        default=None,
        help="Share of the group core in each community (generator default).",
    )

    model = parser.add_argument_group("model (SignConfig)")
    model.add_argument("--hidden_size", type=int, default=8, help="Width of the shared SIGN trunk.")
    model.add_argument("--num_hops", type=int, default=3, help="Propagated hops K.")
    model.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="Hidden dropout (as the recipe).",
    )
    model.add_argument(
        "--input_dropout",
        type=float,
        default=0.1,
        help="Input dropout (as the recipe).",
    )

    train = parser.add_argument_group("training (MultitaskTrainingArguments)")
    train.add_argument("--learning_rate", type=float, default=1e-2, help="Learning rate.")
    train.add_argument(
        "--num_train_epochs", type=float, default=60, help="Epochs per training run."
    )
    train.add_argument(
        "--lr_scheduler_type",
        default="constant",
        help="Learning-rate schedule. Not the Trainer's linear decay: with a fixed number of epochs "
        "a task trained alone would get half the optimizer steps of a pair, so ΔF1 would mix "
        'transfer with "more training".',
    )
    train.add_argument(
        "--per_device_train_batch_size", type=int, default=256, help="Training batch size."
    )
    train.add_argument(
        "--per_device_eval_batch_size", type=int, default=2048, help="Evaluation batch size."
    )
    train.add_argument(
        "--num_threads", type=int, default=1, help="torch CPU threads (keep 1 on shared machines)."
    )
    return parser.parse_args(argv)


def graph_kwargs(args: argparse.Namespace) -> dict:
    names = (
        "num_groups",
        "tasks_per_group",
        "community_strength",
        "signature_strength",
        "core_keep",
    )
    kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {**kwargs, "seed": args.graph_seed}


# --------------------------------------------------------------------------- design
def pick_targets(groups: list[int], num_targets: int | None) -> list[int]:
    """Task ids taken round-robin over the groups, so any prefix is balanced across groups."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for task, group in enumerate(groups):
        by_group[group].append(task)
    order = [
        t
        for k in range(max(map(len, by_group.values())))
        for g in sorted(by_group)
        for t in by_group[g][k : k + 1]
    ]
    return order if num_targets is None else order[: max(1, min(num_targets, len(order)))]


def pair_kind(groups: list[int], i: int, j: int) -> str:
    return "within" if groups[i] == groups[j] else "cross"


def choose_partners(
    groups: list[int], targets: list[int], num_within: int | None, num_cross: int | None, seed: int
) -> dict[int, dict[str, list[int]]]:
    """Partners of every target by kind, chosen with a seeded rng.

    Partners are filled greedily and symmetrically: a partner ``j`` that is itself a target
    with room left in the same kind gets ``i`` as its partner too, so the pair is trained once
    and scores both tasks (about half the training runs of independent choices).
    """
    rng = np.random.default_rng(seed)
    n = len(groups)
    candidates = {
        i: {k: [j for j in range(n) if j != i and pair_kind(groups, i, j) == k] for k in KINDS}
        for i in targets
    }
    want: dict[int, dict[str, int]] = {}
    for i in targets:
        c = candidates[i]
        n_within = len(c["within"]) if num_within is None else min(num_within, len(c["within"]))
        n_cross = min(n_within if num_cross is None else num_cross, len(c["cross"]))
        want[i] = {"within": n_within, "cross": n_cross}
    partners = {i: {k: [] for k in KINDS} for i in targets}
    is_target = set(targets)
    for kind in KINDS:
        for i in rng.permutation(targets).tolist():
            have = partners[i][kind]
            need = want[i][kind] - len(have)
            if need <= 0:
                continue
            free = [j for j in candidates[i][kind] if j not in have]
            open_ = [j for j in free if j in is_target and len(partners[j][kind]) < want[j][kind]]
            rest = [j for j in free if j not in open_]
            picks = rng.permutation(open_).tolist()[:need]
            picks += rng.permutation(rest).tolist()[: need - len(picks)]
            for j in picks:
                have.append(j)
                if j in open_:
                    partners[j][kind].append(i)
    return {i: {k: sorted(v) for k, v in p.items()} for i, p in partners.items()}


# --------------------------------------------------------------------------- training
def quiet_libraries() -> None:
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def train_subset(
    task_set, graph, tasks: list[str], seed: int, args: argparse.Namespace, workdir: str
) -> dict:
    """Train a fresh model on ``tasks`` and return the validation metrics of those tasks."""
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    from hf_tae.models.sign import SignConfig, SignForMultiTaskNodeClassification
    from hf_tae.trainers import MultitaskTrainer, MultitaskTrainingArguments

    config = SignConfig(
        hidden_size=args.hidden_size,
        num_hops=args.num_hops,
        in_features=graph.x.shape[1],
        num_tasks=graph.num_tasks,
        dropout=args.dropout,
        input_dropout=args.input_dropout,
    )
    set_seed(seed)  # same initial weights for a target alone and with each partner
    model = SignForMultiTaskNodeClassification(config)
    training_args = MultitaskTrainingArguments(
        output_dir=workdir,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        use_cpu=True,
        disable_tqdm=True,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_strategy="no",
        report_to="none",
        seed=seed,
        tasks=tasks,
    )
    trainer = MultitaskTrainer(model=model, args=training_args, task_set=task_set)
    trainer.remove_callback(PrinterCallback)  # no per-run log lines under the progress bar
    start = time.perf_counter()
    train_out = trainer.train()
    metrics = trainer.evaluate_tasks("validation")
    scores = {
        t: {m: float(metrics[f"eval_{t}_{key}"]) for m, key in
            (("f1", "f1"), ("loss", "log_loss"), ("accuracy", "accuracy"))}
        for t in tasks
    }
    return {
        "scores": scores,
        "train_loss": float(train_out.training_loss),
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- statistics
def mean_se(values) -> tuple[float, float, int]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se, int(v.size)


def welch_greater(a, b) -> tuple[float, float]:
    """Difference of means ``mean(a) − mean(b)`` and the one-sided Welch p-value (a > b)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        return float(a.mean() - b.mean()) if a.size and b.size else float("nan"), float("nan")
    res = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    return float(a.mean() - b.mean()), float(res.pvalue)


def one_sample(values, alternative: str) -> float:
    v = np.asarray(values, float)
    return (
        float(stats.ttest_1samp(v, 0.0, alternative=alternative).pvalue)
        if v.size > 1
        else float("nan")
    )


def znorm(values: np.ndarray) -> np.ndarray:
    """Grad-TAE notes A.4: z-normalise the scores of one target task."""
    return (values - values.mean()) / (values.std() + 1e-3)


def auc(pos, neg) -> float:
    """P(within score > cross score), ties count one half."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def analyse(names, groups, targets, partners, runs, seeds) -> tuple[list[dict], dict]:
    """Per-pair observations and the summary statistics."""

    def score(subset: tuple[int, ...], task: int, metric: str) -> float:
        return float(
            np.mean([runs[(seed, subset)]["scores"][names[task]][metric] for seed in seeds])
        )

    pairs: list[dict] = []
    per_target_auc = {"f1": [], "neg_loss": []}
    for i in targets:
        alone_f1, alone_loss = score((i,), i, "f1"), score((i,), i, "loss")
        rows = []
        for kind in KINDS:
            for j in partners[i][kind]:
                subset = tuple(sorted((i, j)))
                f1, loss = score(subset, i, "f1"), score(subset, i, "loss")
                rows.append({
                    "target": names[i], "partner": names[j], "kind": kind,
                    "target_group": groups[i], "partner_group": groups[j],
                    "f1_alone": alone_f1, "f1_pair": f1, "delta_f1": f1 - alone_f1,
                    "loss_alone": alone_loss, "loss_pair": loss, "delta_loss": loss - alone_loss,
                })  # fmt: skip
        if not rows:
            continue
        z_f1 = znorm(np.array([r["f1_pair"] for r in rows]))
        z_nl = znorm(-np.array([r["loss_pair"] for r in rows]))
        for r, a, b in zip(rows, z_f1, z_nl, strict=True):
            r["affinity_z_f1"], r["affinity_z_neg_loss"] = float(a), float(b)
        within = [r for r in rows if r["kind"] == "within"]
        cross = [r for r in rows if r["kind"] == "cross"]
        for key, col in (("f1", "affinity_z_f1"), ("neg_loss", "affinity_z_neg_loss")):
            per_target_auc[key].append(auc([r[col] for r in within], [r[col] for r in cross]))
        pairs.extend(rows)

    def col(kind: str, name: str) -> list[float]:
        return [p[name] for p in pairs if p["kind"] == kind]

    summary: dict = {"by_kind": {}, "tests": {}}
    for kind in KINDS:
        entry = {}
        for name in (
            "delta_f1",
            "delta_loss",
            "affinity_z_f1",
            "affinity_z_neg_loss",
            "f1_pair",
            "loss_pair",
        ):
            m, se, n = mean_se(col(kind, name))
            entry[name] = {"mean": m, "se": se}
            entry["n"] = n
        summary["by_kind"][kind] = entry
    alone = {
        names[i]: {"f1": score((i,), i, "f1"), "loss": score((i,), i, "loss")} for i in targets
    }
    summary["alone_mean_f1"] = float(np.mean([v["f1"] for v in alone.values()]))
    summary["alone_mean_loss"] = float(np.mean([v["loss"] for v in alone.values()]))
    summary["alone"] = alone
    tests = summary["tests"]
    for label, name, sign in (
        ("delta_f1", "delta_f1", 1.0),
        ("neg_delta_loss", "delta_loss", -1.0),
        ("affinity_z_f1", "affinity_z_f1", 1.0),
        ("affinity_z_neg_loss", "affinity_z_neg_loss", 1.0),
    ):
        diff, p = welch_greater(
            sign * np.asarray(col("within", name)), sign * np.asarray(col("cross", name))
        )
        tests[f"within_minus_cross_{label}"] = {"difference": diff, "p_value": p}
    tests["cross_interference_delta_f1_lt_0"] = {
        "p_value": one_sample(col("cross", "delta_f1"), "less")
    }
    tests["cross_interference_delta_loss_gt_0"] = {
        "p_value": one_sample(col("cross", "delta_loss"), "greater")
    }
    tests["within_transfer_delta_f1_gt_0"] = {
        "p_value": one_sample(col("within", "delta_f1"), "greater")
    }
    tests["within_transfer_delta_loss_lt_0"] = {
        "p_value": one_sample(col("within", "delta_loss"), "less")
    }
    for key, values in per_target_auc.items():
        v = [x for x in values if np.isfinite(x)]
        summary[f"per_target_auc_{key}"] = {
            "mean": float(np.mean(v)) if v else float("nan"),
            "values": values,
        }
    return pairs, summary


# --------------------------------------------------------------------------- report
def fmt(mean: float, se: float) -> str:
    return f"{mean:+.4f} ± {se:.4f}" if np.isfinite(se) else f"{mean:+.4f}"


def print_report(summary: dict, setting: str) -> None:
    print(f"\nGenerator fairness ({setting})")
    print(
        f"target alone: mean val F1 = {summary['alone_mean_f1']:.4f}, mean val loss = {summary['alone_mean_loss']:.4f}"
    )
    header = f"{'pair kind':<12} {'n':>3}  {'ΔF1 (mean ± se)':>18}  {'Δloss (mean ± se)':>18}  {'z-aff F1':>16}  {'z-aff −loss':>16}"
    print(header)
    print("-" * len(header))
    for kind in KINDS:
        e = summary["by_kind"][kind]
        print(
            f"{kind:<12} {e['n']:>3}  {fmt(**e['delta_f1']):>18}  {fmt(**e['delta_loss']):>18}  "
            f"{fmt(**e['affinity_z_f1']):>16}  {fmt(**e['affinity_z_neg_loss']):>16}"
        )
    t = summary["tests"]
    print("\nWithin vs cross (one-sided Welch t-test, within > cross):")
    for label, key in (
        ("ΔF1", "delta_f1"), ("−Δloss", "neg_delta_loss"),
        ("z-affinity (F1)", "affinity_z_f1"), ("z-affinity (−loss)", "affinity_z_neg_loss"),
    ):  # fmt: skip
        r = t[f"within_minus_cross_{key}"]
        print(f"  {label:<19} within − cross = {r['difference']:+.4f} (p = {r['p_value']:.2g})")
    print("Cross-group interference (one-sample t-test against 0):")
    print(
        f"  ΔF1 < 0: p = {t['cross_interference_delta_f1_lt_0']['p_value']:.2g};  "
        f"Δloss > 0: p = {t['cross_interference_delta_loss_gt_0']['p_value']:.2g}"
    )
    print("Within-group transfer (one-sample t-test against 0):")
    print(
        f"  ΔF1 > 0: p = {t['within_transfer_delta_f1_gt_0']['p_value']:.2g};  "
        f"Δloss < 0: p = {t['within_transfer_delta_loss_lt_0']['p_value']:.2g}"
    )
    print(
        f"Per-target AUC (within partners ranked above cross partners by T[i,j]): "
        f"F1 {summary['per_target_auc_f1']['mean']:.3f}, −loss {summary['per_target_auc_neg_loss']['mean']:.3f}"
    )


def plot(pairs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("delta_f1", "ΔF1 = F1(i | {i,j}) − F1(i | {i})"),
        ("delta_loss", "Δloss = loss(i | {i,j}) − loss(i | {i})"),
        ("affinity_z_f1", "T[i,j] = F1_i({i,j}), z-scored per target"),
    )
    kinds = [k for k in KINDS if any(p["kind"] == k for p in pairs)]
    colors = {"within": "tab:green", "cross": "tab:red"}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    rng = np.random.default_rng(0)
    for ax, (key, label) in zip(axes, panels, strict=True):
        data = [[p[key] for p in pairs if p["kind"] == k] for k in kinds]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(kinds) + 1), kinds)
        for x, (k, values) in enumerate(zip(kinds, data, strict=True), start=1):
            ax.scatter(
                x + rng.uniform(-0.15, 0.15, len(values)), values, s=12, alpha=0.7, color=colors[k]
            )
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def provenance(graph) -> dict:
    """What produced the data: library commit, generator source hash and a data fingerprint.

    The generator may change between commits (e.g. how signatures are planted) without any
    change of its parameters, so results are only comparable with equal fingerprints.
    """
    import hashlib
    import inspect
    import subprocess

    from hf_tae.families.graph import generator as synthetic

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    try:
        root = Path(synthetic.__file__).resolve().parents[3]
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "hf_tae"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {
        "git_commit": commit or None,
        "library_dirty": bool(dirty),
        "generator_source_sha": sha(inspect.getsource(synthetic).encode()),
        "graph_fingerprint": sha(
            graph.x.tobytes() + graph.labels.tobytes() + graph.edge_index.tobytes()
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    quiet_libraries()
    from hf_tae.families.graph.generator import generate_community_graph

    graph = generate_community_graph(**graph_kwargs(args))
    task_set = graph.task_set(args.num_hops)
    names, groups = graph.task_names, list(graph.task_groups)
    targets = pick_targets(groups, args.num_targets)
    partners = choose_partners(groups, targets, args.num_within, args.num_cross, args.partner_seed)
    subsets = sorted({(i,) for i in targets} | {
        tuple(sorted((i, j))) for i in targets for kind in KINDS for j in partners[i][kind]
    })  # fmt: skip
    jobs = [(seed, subset) for seed in args.seeds for subset in subsets]
    setting = (
        f"graph {graph_kwargs(args)}, hidden_size={args.hidden_size}, lr={args.learning_rate} "
        f"({args.lr_scheduler_type}), "
        f"epochs={args.num_train_epochs:g}, seeds={args.seeds}, {len(targets)} targets"
    )
    print(f"data: {provenance(graph)}")
    print(
        f"{graph!r}; {len(targets)} targets, {len(subsets)} subsets × {len(args.seeds)} seeds = {len(jobs)} trainings"
    )

    runs: dict[tuple[int, tuple[int, ...]], dict] = {}
    with tempfile.TemporaryDirectory(prefix="tae-fairness-") as workdir:
        for seed, subset in tqdm(jobs, desc="trainings", unit="run"):
            runs[(seed, subset)] = train_subset(
                task_set, graph, [names[t] for t in subset], seed, args, workdir
            )

    pairs, summary = analyse(names, groups, targets, partners, runs, args.seeds)
    runtime = time.perf_counter() - start
    print_report(summary, setting)
    print(
        f"\nTotal runtime: {runtime:.1f} s ({len(jobs)} trainings, {runtime / max(len(jobs), 1):.2f} s each)"
    )

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args),
        "graph": graph.info,
        "provenance": provenance(graph),
        "task_groups": dict(zip(names, groups, strict=True)),
        "targets": [names[i] for i in targets],
        "partners": {
            names[i]: {k: [names[j] for j in v] for k, v in p.items()} for i, p in partners.items()
        },
        "runs": [
            {"seed": seed, "tasks": [names[t] for t in subset], **run}
            for (seed, subset), run in runs.items()
        ],
        "pairs": pairs,
        "summary": summary,
        "runtime_s": runtime,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    plot(pairs, out_dir / "fairness.png", setting)
    print(f"Wrote {out_dir / 'results.json'} and {out_dir / 'fairness.png'}")
    return result


if __name__ == "__main__":
    main()
