"""The end-to-end Grad-TAE job on graph community detection (``hf-tae run``).

Stages, each timed and reported (gradtae_methods.md A.8):

1. **meta-initializations**: ``--num_meta_inits`` :class:`~hf_tae.MultitaskTrainer` runs on all
   tasks with seeds seed, seed+1, … (A.1, A.6 ensembles), or ``--meta_init`` to start from a
   saved or published one;
2. **gradients**: projected per-example gradients at each θ0 in a
   :class:`~hf_tae.GradientStore` (A.2), without the task-private last head layer;
3. **estimation**: :class:`~hf_tae.RegressionEstimator` fits for ``--num_subsets`` sampled task
   subsets on every store, no training (A.3);
4. **affinity**: one :class:`~hf_tae.AffinityMatrix` per θ0 from the estimated per-task scores
   (A.4), averaged;
5. **grouping**: :func:`~hf_tae.sdp_cluster` with k from ``--num_task_groups`` or chosen by
   :func:`~hf_tae.sweep_k` (A.5);
6. **group training**: one model per group against one model on all tasks, one per task and
   the planted groups when the data has them (:func:`~hf_tae.compare_group_training`);
7. optional **ground truth**: ``--ground_truth N`` fine-tunes N of the sampled subsets for real
   (each with every ``--ground_truth_seeds``) and compares them with their estimates, against
   the ceiling set by the noise of both sides (:func:`~hf_tae.self_agreement`).

Data: the embedded planted-community graph (default), SNAP files (``--snap_dir``) or a saved
graph (``--dataset``). Outputs in ``--output_dir``: ``report.md``, ``results.json``, PNGs,
``meta_init/``, ``data/``, ``gradients/``, ``ensemble/member_*/``, ``affinity/`` (the matrix
and the estimated per-(subset, task) scores), ``groups.json`` and the resumable
``group_training/`` and ``ground_truth/`` runs. A rerun reuses every meta-initialization whose
fingerprint (graph and weight-changing arguments) still matches. Runs under ``accelerate
launch`` too: training and fine-tuning are shared across processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.trainers.arguments import MultitaskTrainingArguments
from hf_tae.utils.io import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class GraphDataArguments:
    """Where the tasks come from (first match wins: dataset, snap_dir, embedded generator)."""

    dataset: str | None = field(
        default=None, metadata={"help": "Path or Hub repo id of a saved CommunityGraph."}
    )
    snap_dir: str | None = field(
        default=None,
        metadata={"help": "Folder with com-<name>.ungraph.txt and com-<name>.top5000.cmty.txt."},
    )
    snap_name: str = field(
        default="youtube", metadata={"help": "SNAP graph name, e.g. youtube, dblp, amazon, lj."}
    )
    num_communities: int = field(
        default=100, metadata={"help": "SNAP: the N largest communities become N tasks."}
    )
    num_groups: int = field(
        default=4, metadata={"help": "Embedded generator: number of planted task groups."}
    )
    tasks_per_group: int = field(
        default=4, metadata={"help": "Embedded generator: tasks in each group."}
    )
    data_seed_graph: int = field(
        default=0, metadata={"help": "Embedded generator / SNAP split seed."}
    )
    num_hops: int = field(default=3, metadata={"help": "SIGN hops of propagated node features."})


@dataclass
class ModelArguments:
    """The SIGN model (Grad-TAE notes A.1: hidden 256, dropout 0.5/0.3 in the paper; narrower here, see the README)."""

    meta_init: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub repo id of a meta-initialization to start from instead of training one."
        },
    )
    meta_init_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or sha) of --meta_init."}
    )

    hidden_size: int = field(
        default=8, metadata={"help": "Width of the per-hop MLPs and the head."}
    )
    num_mlp_layers: int = field(default=2, metadata={"help": "Linear layers per MLP."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout between hidden layers."})
    input_dropout: float = field(default=0.1, metadata={"help": "Dropout on input features."})
    reuse_meta_init: bool = field(
        default=True,
        metadata={
            "help": "Reuse a meta-initialization already in the output folder when it was trained "
            "on the same graph with the same model and training arguments (resumed runs)."
        },
    )


@dataclass
class GradientArguments:
    """Step 2: projected per-example gradients at the meta-initialization (Grad-TAE notes A.2)."""

    collect_gradients: bool = field(
        default=True, metadata={"help": "Collect gradients into <output_dir>/gradients."}
    )
    projection_dim: int = field(
        default=200, metadata={"help": "Dimension d of the projected gradients."}
    )
    projection_kind: str = field(
        default="factored", metadata={"help": "'factored' (per-layer hooks) or 'dense' (exact JL)."}
    )
    projection_seed: int = field(default=0, metadata={"help": "Seed of the projection matrices."})
    gradient_batch_size: int = field(default=512, metadata={"help": "Examples per gradient batch."})
    exclude_task_heads: bool = field(
        default=True,
        metadata={
            "help": "Leave the task-private last head layer out of the gradients: it carries no "
            "transfer between tasks, and projection would mix it into shared coordinates."
        },
    )
    gradient_exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "More parameter-name patterns (regular expressions) to leave out."},
    )


@dataclass
class EstimationArguments:
    """Steps 3–4: estimated fine-tuning of sampled subsets and the affinity matrix (A.3, A.4)."""

    estimate: bool = field(
        default=True, metadata={"help": "Run estimation, grouping and group training."}
    )
    num_subsets: int = field(
        default=1000,
        metadata={"help": "Sampled task subsets (capped at the number of distinct subsets)."},
    )
    subset_size: int = field(default=4, metadata={"help": "Tasks per sampled subset."})
    num_meta_inits: int = field(
        default=6,
        metadata={
            "help": "Meta-initializations (training seeds seed, seed+1, …) whose estimated "
            "affinities are averaged (A.6 ensembles); 1 with --meta_init."
        },
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed of the subset sampler."})
    estimator_l2: float = field(
        default=1000.0,
        metadata={"help": "λ of the estimator's ridge penalty (README: choosing λ)."},
    )
    estimator_mode: str = field(
        default="principled", metadata={"help": "'principled' (offsets) or 'paper' (A.3 code)."}
    )
    scoring_split: str = field(
        default="validation", metadata={"help": "Rows that score each estimated model."}
    )
    affinity_metric: str = field(
        default="log_loss",
        metadata={"help": "Per-task score of the affinity: log_loss, f1, accuracy."},
    )


@dataclass
class GroupingArguments:
    """Steps 5–6: SDP task groups and one model per group; optional ground truth."""

    num_task_groups: int = field(
        default=0, metadata={"help": "k, the number of task groups; 0 chooses k by a sweep."}
    )
    max_task_groups: int = field(default=8, metadata={"help": "Largest k the sweep tries."})
    clustering: str = field(default="sdp", metadata={"help": "'sdp' (A.5) or 'spectral'."})
    train_groups: bool = field(
        default=True, metadata={"help": "Train one model per group and compare (step 6)."}
    )
    compare_single_tasks: bool = field(
        default=True, metadata={"help": "Also train one model per task for the comparison."}
    )
    group_init: str = field(
        default="scratch",
        metadata={"help": "Group models start from 'scratch' or from the 'meta' initialization."},
    )
    group_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Seeds of each group training run."}
    )
    ground_truth: int = field(
        default=0,
        metadata={
            "help": "Fine-tune this many sampled subsets for real (from --group_init) and "
            "compare them with their estimates (0: skip)."
        },
    )
    ground_truth_seeds: list[int] = field(
        default_factory=lambda: [0, 1],
        metadata={
            "help": "Seeds of each ground-truth fine-tuning. With two or more, the report gives "
            "the truth's own seed-to-seed agreement, the ceiling any estimate is judged against."
        },
    )


RECIPE_DEFAULTS = {
    "output_dir": "runs/graph_communities",
    "learning_rate": 1e-2,
    "num_train_epochs": 60,
    "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 2048,
    "disable_tqdm": False,
}
ARGUMENT_CLASSES = (
    GraphDataArguments,
    ModelArguments,
    GradientArguments,
    EstimationArguments,
    GroupingArguments,
    MultitaskTrainingArguments,
)


def build_parser(prog: str | None = None):
    """The job's ``HfArgumentParser`` (every dataclass above plus the training arguments)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARGUMENT_CLASSES, prog=prog, description=__doc__.split("\n\n")[0])
    parser.set_defaults(**RECIPE_DEFAULTS)
    return parser


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    logger.info("stage %s", name)
    start = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)


def build_graph(data: GraphDataArguments):
    from hf_tae.tasks.graph import CommunityGraph
    from hf_tae.tasks.snap import load_snap_communities
    from hf_tae.tasks.synthetic import generate_community_graph

    if data.dataset:
        return CommunityGraph.load(data.dataset)
    if data.snap_dir:
        return load_snap_communities(
            data.snap_dir, data.snap_name, data.num_communities, seed=data.data_seed_graph
        )
    return generate_community_graph(
        data.num_groups, data.tasks_per_group, seed=data.data_seed_graph
    )


def check_arguments(est: EstimationArguments, grouping: GroupingArguments) -> None:
    """Bad option values fail before any training, naming the option and the fix."""
    choices = {
        "--estimator_mode": (est.estimator_mode, ("principled", "paper")),
        "--scoring_split": (est.scoring_split, ("train", "validation")),
        "--affinity_metric": (est.affinity_metric, ("log_loss", "f1", "accuracy")),
        "--clustering": (grouping.clustering, ("sdp", "spectral")),
        "--group_init": (grouping.group_init, ("scratch", "meta")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise TaeError(f"{flag} {value!r} is not one of {list(allowed)}.")
    for flag, value, low in (
        ("--num_subsets", est.num_subsets, 1),
        ("--subset_size", est.subset_size, 2),
        ("--num_task_groups", grouping.num_task_groups, 0),
        ("--max_task_groups", grouping.max_task_groups, 2),
        ("--ground_truth", grouping.ground_truth, 0),
        ("--num_meta_inits", est.num_meta_inits, 1),
    ):
        if value < low:
            raise TaeError(f"{flag} must be >= {low}, got {value}.")
    if not grouping.group_seeds:
        raise TaeError("--group_seeds is empty; give at least one seed.")
    if grouping.ground_truth and not grouping.ground_truth_seeds:
        raise TaeError("--ground_truth_seeds is empty; give at least one seed.")


FINGERPRINT_FILE = "meta_init.fingerprint.json"
#: TrainingArguments that do not change the trained weights.
_VOLATILE = {
    "output_dir", "logging_dir", "run_name", "disable_tqdm", "report_to", "push_to_hub",
    "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo", "dataloader_pin_memory",
    "logging_steps", "logging_strategy", "save_total_limit", "local_rank",
}  # fmt: skip


def meta_init_fingerprint(graph, data_args, model_args, training_args) -> str:
    """sha256 of what determines a trained meta-initialization: the graph's arrays, the data
    and model arguments, and the training arguments that affect the weights."""
    import hashlib

    digest = hashlib.sha256()
    for array in (graph.x, graph.labels, graph.split, graph.edge_index):
        digest.update(np.ascontiguousarray(array).tobytes())
    training = {k: v for k, v in training_args.to_dict().items() if k not in _VOLATILE}
    settings = [dataclasses.asdict(data_args), dataclasses.asdict(model_args), training]
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def train_meta_init(graph, task_set, data_args, model_args, training_args, output_dir: Path,
                    save_graph: bool = True):  # fmt: skip
    """Stage 1: the multitask model on all tasks (A.1), its test metrics and the baseline."""
    from transformers import set_seed

    from hf_tae.hub import load_meta_init
    from hf_tae.models.sign import SignConfig, SignForMultiTaskNodeClassification
    from hf_tae.trainers.baselines import label_frequency_baseline
    from hf_tae.trainers.multitask import MultitaskTrainer

    set_seed(training_args.seed)  # the model is built before the Trainer seeds anything
    fingerprint = meta_init_fingerprint(graph, data_args, model_args, training_args)
    stamp = output_dir / FINGERPRINT_FILE
    reuse = (
        model_args.reuse_meta_init
        and not model_args.meta_init
        and stamp.is_file()
        and json.loads(stamp.read_text()).get("fingerprint") == fingerprint
    )
    if model_args.meta_init or reuse:
        source = model_args.meta_init or output_dir / "meta_init"
        model = load_meta_init(source, revision=model_args.meta_init_revision)
        logger.info("starting from the meta-initialization %s (no training)", source)
    else:
        config = SignConfig(
            in_features=graph.x.shape[1],
            num_hops=data_args.num_hops,
            hidden_size=model_args.hidden_size,
            num_mlp_layers=model_args.num_mlp_layers,
            task_names=graph.task_names,
            dropout=model_args.dropout,
            input_dropout=model_args.input_dropout,
        )
        model = SignForMultiTaskNodeClassification(config)
    training_args.output_dir = str(output_dir / "checkpoints")
    trainer = MultitaskTrainer(model=model, args=training_args, task_set=task_set)
    if not (model_args.meta_init or reuse):
        trainer.train()
    validation = trainer.evaluate_tasks("validation")
    test = trainer.evaluate_tasks("test")
    baseline = label_frequency_baseline(task_set, "test")
    if trainer.is_world_process_zero():
        if not reuse:
            stamp.unlink(missing_ok=True)  # the stamp vouches for a complete meta_init/ only
            trainer.save_model(str(output_dir / "meta_init"))
            if not model_args.meta_init:
                atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint}))
        if save_graph:
            graph.save(output_dir / "data", overwrite=True)
    return trainer, {
        "reused": bool(reuse),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "validation": validation,
        "test": test,
        "label_frequency_baseline_test": baseline,
        "test_avg_f1": test["test_avg_f1"],
        "baseline_avg_f1": float(np.mean(list(baseline.values()))),
    }


def planted_gap(matrix: np.ndarray, groups: Sequence[int]) -> float:
    """Mean within-group off-diagonal affinity minus mean cross-group affinity."""
    groups = np.asarray(groups)
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    return float(np.nanmean(matrix[same & off]) - np.nanmean(matrix[~same]))


def estimate_affinity(stores, graph, est_args: EstimationArguments):
    """Stages 3–4: estimated per-(subset, task) scores on every store (one per meta-initialization)
    and their averaged affinity matrix."""
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import self_agreement
    from hf_tae.estimation.regression import RegressionEstimator
    from hf_tae.estimation.subsets import sample_subsets

    n = graph.num_tasks
    if est_args.subset_size > n:
        raise TaeError(
            f"--subset_size {est_args.subset_size} exceeds the {n} tasks; use at most {n}."
        )
    available = math.comb(n, est_args.subset_size)
    num_subsets = min(est_args.num_subsets, available)
    if num_subsets < est_args.num_subsets:
        logger.info("only %d subsets of size %d exist; using all", available, est_args.subset_size)
    subsets = sample_subsets(n, num_subsets, est_args.subset_size, seed=est_args.subset_seed)
    provenance = {
        "estimator_l2": est_args.estimator_l2,
        "estimator_mode": est_args.estimator_mode,
        "scoring_split": est_args.scoring_split,
        "num_subsets": num_subsets,
        "subset_size": est_args.subset_size,
    }
    start = time.perf_counter()
    members = []
    for store in stores:
        estimator = RegressionEstimator(
            store, l2=est_args.estimator_l2, mode=est_args.estimator_mode
        )
        table = estimator.evaluate(subsets, estimator.fit(subsets), split=est_args.scoring_split)
        members.append(
            AffinityMatrix.from_results(table, graph.task_names, metric=est_args.affinity_metric,
                                        symmetrize=True, zero_diagonal=True, provenance=provenance)
        )  # fmt: skip
    affinity = AffinityMatrix.average(members)
    seconds = time.perf_counter() - start
    info = {
        "num_subsets": num_subsets,
        "subset_size": est_args.subset_size,
        "num_meta_inits": len(stores),
        "estimator": f"{est_args.estimator_mode}, logistic, l2={est_args.estimator_l2:g}",
        "scoring_split": est_args.scoring_split,
        "metric": est_args.affinity_metric,
        "seconds": round(seconds, 3),
        "subsets_per_second": num_subsets * len(stores) / max(seconds, 1e-9),
    }
    if len(members) > 1:  # how much one meta-initialization's estimate says about another's
        info["self_agreement"] = self_agreement(members)
    if graph.task_groups is not None:
        info["planted_gap"] = planted_gap(affinity.to_numpy(), graph.task_groups)
        info["planted_gap_per_meta_init"] = [
            planted_gap(m.to_numpy(), graph.task_groups) for m in members
        ]
    return subsets, affinity, info


def task_head_pattern(model) -> str:
    """Regular expression of the SIGN head's last (task-private) Linear layer's parameters."""
    name = next(n for n, m in model.named_modules() if m is model.head[-1])
    return rf"^{re.escape(name)}\."


def choose_groups(affinity, graph, grouping_args: GroupingArguments) -> dict[str, Any]:
    """Stage 5: k (given or swept) and the task groups."""
    from hf_tae.clustering import recommend_k, sdp_cluster, spectral_cluster, sweep_k

    T = np.nan_to_num(affinity.to_numpy(), nan=0.0)  # pairs no subset covered: no evidence
    n = len(T)
    sweep = None
    k = grouping_args.num_task_groups
    if k > n:
        raise TaeError(f"--num_task_groups {k} exceeds the {n} tasks; use at most {n}.")
    if k == 0:
        ks = range(1, min(grouping_args.max_task_groups, n) + 1)  # gain 0 at k = 1 and k = n
        sweep = sweep_k(T, ks, method=grouping_args.clustering)
        k = recommend_k(sweep)
    cluster = sdp_cluster if grouping_args.clustering == "sdp" else spectral_cluster
    grouping = cluster(T, k)
    info: dict[str, Any] = {
        "method": grouping.method,
        "k": k,
        "k_choice": "given" if grouping_args.num_task_groups else "recommended by the k sweep",
        "objective": grouping.objective,
        "groups": grouping.named(graph.task_names),
        "labels": grouping.labels.tolist(),
        "sweep": None if sweep is None else json.loads(sweep.to_json(orient="records")),
    }
    if graph.task_groups is not None:
        from sklearn.metrics import adjusted_rand_score

        info["adjusted_rand_vs_planted"] = float(
            adjusted_rand_score(graph.task_groups, grouping.labels)
        )
    return info


def _model_init(run_dir: Path, init: str):
    """A fresh model per run: same architecture from scratch, or a copy of the saved
    meta-initialization (read from disk once)."""
    saved = {}

    def model_init():
        import copy

        from hf_tae.hub import load_meta_init

        if "meta" not in saved:
            saved["meta"] = load_meta_init(run_dir / "meta_init")
        meta = saved["meta"]
        return (copy.deepcopy(meta) if init == "meta" else type(meta)(meta.config)).train()

    return model_init


def _run_args(training_args: MultitaskTrainingArguments) -> MultitaskTrainingArguments:
    import dataclasses

    return dataclasses.replace(training_args, push_to_hub=False, report_to=[])


def train_groups(graph, task_set, groups, training_args, grouping_args, output_dir: Path):
    """Stage 6: the group models against one model on all tasks (and one per task)."""
    from hf_tae.pipeline.group_training import compare_group_training, summarize_group_training

    names = graph.task_names
    strategies = {"grouped": groups, "all tasks": [list(names)]}
    if grouping_args.compare_single_tasks:
        strategies["single task"] = [[t] for t in names]
    if graph.task_groups is not None:
        planted: dict[int, list[str]] = {}
        for name, g in zip(names, graph.task_groups, strict=True):
            planted.setdefault(int(g), []).append(name)
        strategies["planted groups"] = list(planted.values())
    table = compare_group_training(
        _model_init(output_dir, grouping_args.group_init),
        task_set,
        strategies,
        _run_args(training_args),
        output_dir / "group_training",
        seeds=grouping_args.group_seeds,
        split="test",
        show_progress=not training_args.disable_tqdm,
    )
    summary = summarize_group_training(table, reference="all tasks")
    wide = table.pivot(index="task_name", columns="strategy", values="f1").loc[names]
    return table, {
        "init": "from scratch" if grouping_args.group_init == "scratch" else "from θ0",
        "seeds": len(grouping_args.group_seeds),
        "split": "test",
        "summary": json.loads(summary.to_json(orient="index")),
        "per_task": {t: {s: float(wide.loc[t, s]) for s in strategies} for t in names},
    }


def run_ground_truth(task_set, subsets, estimates, graph, est_args, grouping_args,
                     training_args, output_dir: Path, estimation_seconds: float):  # fmt: skip
    """Stage 7: fine-tune ``--ground_truth`` sampled subsets and compare with their estimates."""
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import (
        compare_affinities,
        compare_results,
        corrected_spearman,
        self_agreement,
    )
    from hf_tae.estimation.ground_truth import SubsetFineTuner, average_seeds

    chosen = [tuple(s) for s in subsets[: grouping_args.ground_truth]]
    start = time.perf_counter()
    truth = SubsetFineTuner(
        _model_init(output_dir, grouping_args.group_init),
        task_set,
        _run_args(training_args),
        output_dir / "ground_truth",
        seeds=grouping_args.ground_truth_seeds,
    ).run(chosen, split=est_args.scoring_split, show_progress=not training_args.disable_tqdm)
    seconds = time.perf_counter() - start
    per_seed = [rows.drop(columns="seed") for _, rows in truth.groupby("seed")]
    truth = average_seeds(truth)
    keep = {tuple(sorted(s)) for s in chosen}
    est = estimates[[tuple(sorted(s)) in keep for s in estimates["subset"]]]
    est = est.assign(subset_id=[chosen.index(tuple(s)) for s in est["subset"]])
    metric = est_args.affinity_metric
    build = AffinityMatrix.from_results
    true_matrix = build(truth, graph.task_names, metric=metric, symmetrize=True, kind="fine-tuned")
    est_members = [
        build(rows, graph.task_names, metric=metric, symmetrize=True, kind="estimated")
        for _, rows in est.groupby("member")
    ]
    est_matrix = AffinityMatrix.average(est_members)
    true_matrix.save(output_dir / "ground_truth" / "affinity", overwrite=True)
    est_mean = est.groupby(["subset_id", "task"], as_index=False)[metric].mean()
    joined = est_mean.merge(truth, on=["subset_id", "task"], suffixes=("_est", "_true"))
    info = {
        "num_subsets": len(chosen),
        "seconds": seconds,
        "compute_ratio": estimation_seconds * len(chosen) / len(subsets) / max(seconds, 1e-9),
        "affinity": compare_affinities(est_matrix, true_matrix),
        "scores": compare_results(est, truth, metric=metric),
        "metric": metric,
    }
    # both sides are noisy: with repeats on both, judge the estimate against the ceiling
    if len(per_seed) > 1:
        info["truth_self_agreement"] = self_agreement(
            [
                build(t, graph.task_names, metric=metric, symmetrize=True, kind="fine-tuned")
                for t in per_seed
            ]
        )
    if len(est_members) > 1:
        info["estimate_self_agreement"] = self_agreement(est_members)
    if len(per_seed) > 1 and len(est_members) > 1:
        info["corrected_spearman"] = corrected_spearman(
            info["affinity"]["spearman"],
            info["truth_self_agreement"]["reliability"],
            info["estimate_self_agreement"]["reliability"],
        )
    return joined, info


def run(argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    """Parse ``argv`` (``sys.argv[1:]`` by default) and run every stage; returns ``results``."""
    from accelerate import PartialState

    from hf_tae.pipeline.report import plot_estimated_vs_true, plot_grouping_gains, write_report
    from hf_tae.utils.plots import plot_task_scores

    parser = build_parser(prog)
    args = parser.parse_args_into_dataclasses(args=list(sys.argv[1:] if argv is None else argv))
    data_args, model_args, grad_args, est_args, grouping_args, training_args = args
    check_arguments(est_args, grouping_args)
    import torch

    if not torch.cuda.is_available():  # pinning needs an accelerator; avoid torch's warning
        training_args.dataloader_pin_memory = False
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    output_dir = Path(training_args.output_dir)
    timings: dict[str, float] = {}
    with _stage(timings, "data"):
        graph = build_graph(data_args)
        task_set = graph.task_set(data_args.num_hops)
    logger.info("%s; %s", graph, task_set)
    results: dict[str, Any] = {
        "graph": repr(graph),
        "command": shlex.join(["hf-tae run", *(sys.argv[1:] if argv is None else argv)]),
        "tasks": task_set.task_names,
        "world_size": training_args.world_size,
        "timings": timings,
    }

    def save_results() -> None:
        if PartialState().is_main_process:
            atomic_write_text(
                output_dir / "results.json", json.dumps(results, indent=2, default=float)
            )

    members = 1 if model_args.meta_init or not est_args.estimate else est_args.num_meta_inits
    stores = []
    for member in range(members):
        # member 0 is "the" meta-initialization (meta_init/, gradients/); the others only
        # feed the averaged affinity (A.6 ensembles) and live under ensemble/
        run_dir = output_dir if member == 0 else output_dir / "ensemble" / f"member_{member}"
        member_args = training_args
        if member:
            member_args = dataclasses.replace(
                training_args, seed=training_args.seed + member, push_to_hub=False
            )
        with _stage(timings, "meta-initialization"):
            trainer, meta = train_meta_init(graph, task_set, data_args, model_args, member_args,
                                            run_dir, save_graph=member == 0)  # fmt: skip
        if member == 0:
            results["meta_init"] = meta
            save_results()
            if PartialState().is_main_process:
                plot_task_scores(
                    {
                        "meta-initialization": {
                            t: meta["test"][f"test_{t}_f1"] for t in graph.task_names
                        },
                        "label-frequency baseline": meta["label_frequency_baseline_test"],
                    },
                    output_dir / "test_f1_per_task.png",
                    ylabel="test F1",
                )
        else:
            results.setdefault("ensemble", []).append(
                {"seed": member_args.seed, "test_avg_f1": meta["test_avg_f1"]}
            )
        if not (grad_args.collect_gradients or est_args.estimate):
            continue
        exclude = list(grad_args.gradient_exclude)
        if grad_args.exclude_task_heads:
            exclude.append(task_head_pattern(trainer.model))
        with _stage(timings, "gradients"):
            stores.append(
                trainer.collect_gradients(
                    run_dir / "gradients",
                    dim=grad_args.projection_dim,
                    kind=grad_args.projection_kind,
                    seed=grad_args.projection_seed + member,
                    batch_size=grad_args.gradient_batch_size,
                    exclude=exclude or None,
                    overwrite=True,
                )
            )
        if member == 0:
            results["gradients"] = {
                "path": str(output_dir / "gradients"),
                "rows": len(stores[0]),
                "dim": stores[0].dim,
                "excluded": exclude,
            }
            save_results()
    if est_args.estimate:
        if (
            PartialState().is_main_process
        ):  # cheap: one process estimates and clusters, the others wait
            with _stage(timings, "estimation + affinity"):
                subsets, affinity, results["estimation"] = estimate_affinity(
                    stores, graph, est_args
                )
            estimates = affinity.results
            with _stage(timings, "grouping"):
                results["grouping"] = choose_groups(affinity, graph, grouping_args)
            order = [graph.task_names.index(t) for g in results["grouping"]["groups"] for t in g]
            affinity.save(output_dir / "affinity", overwrite=True, group_order=order)
            affinity.plot(output_dir / "affinity_by_group.png", order=order)
            atomic_write_text(
                output_dir / "groups.json", json.dumps(results["grouping"], indent=2, default=float)
            )
            save_results()
        PartialState().wait_for_everyone()
        results = json.loads((output_dir / "results.json").read_text()) | {"timings": timings}
        if not PartialState().is_main_process:
            from hf_tae.estimation.subsets import sample_subsets

            subsets = sample_subsets(
                graph.num_tasks,
                results["estimation"]["num_subsets"],
                est_args.subset_size,
                seed=est_args.subset_seed,
            )
            from hf_tae.estimation.affinity import AffinityMatrix

            estimates = AffinityMatrix.load(output_dir / "affinity").results
        if grouping_args.train_groups:
            with _stage(timings, "group training"):
                _, results["group_training"] = train_groups(
                    graph, task_set, results["grouping"]["groups"], training_args,
                    grouping_args, output_dir,
                )  # fmt: skip
            if PartialState().is_main_process:
                per_task = results["group_training"]["per_task"]
                plot_grouping_gains(
                    {t: s["grouped"] - s["all tasks"] for t, s in per_task.items()},
                    results["grouping"]["groups"],
                    output_dir / "grouping_gains.png",
                    "test F1: one model per group minus one model on all tasks",
                )
        if grouping_args.ground_truth:
            with _stage(timings, "ground truth"):
                joined, results["ground_truth"] = run_ground_truth(
                    task_set, subsets, estimates, graph, est_args, grouping_args, training_args,
                    output_dir, results["estimation"]["seconds"],
                )  # fmt: skip
            if PartialState().is_main_process:
                metric = est_args.affinity_metric
                plot_estimated_vs_true(
                    joined[f"{metric}_est"], joined[f"{metric}_true"],
                    output_dir / "estimated_vs_true.png", metric,
                )  # fmt: skip
    save_results()
    if PartialState().is_main_process:
        write_report(results, output_dir)
        _print_summary(results, output_dir)
    PartialState().wait_for_everyone()
    return results


def _print_summary(results: dict[str, Any], output_dir: Path) -> None:
    meta = results["meta_init"]
    print(
        f"\nmeta-initialization: test avg F1 {meta['test_avg_f1']:.3f} (label-frequency "
        f"baseline {meta['baseline_avg_f1']:.3f}); world size {results['world_size']}"
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
            print(f"  {name:>15}: test avg F1 {s['f1']:.3f} ({s['num_models']} models)")
    print(f"report: {output_dir / 'report.md'}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``recipes/graph_communities.py``: bad inputs exit with the error message."""
    try:
        return run(argv)
    except TaeError as err:
        sys.exit(f"error: {err}")
