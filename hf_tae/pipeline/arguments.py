"""The pipeline's arguments: dataclasses whose fields become ``hf-tae run`` flags (TRL style).

A run parses ``(family arguments, PipelineArguments, GradientArguments, EstimationArguments,
GroupingArguments, MultitaskTrainingArguments)``; the family's own dataclass comes first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hf_tae.errors import TaeError
from hf_tae.estimation.regularization import DEFAULT_L2_GRID
from hf_tae.estimation.schema import check_metric


@dataclass
class PipelineArguments:
    """Where the meta-initialization comes from."""

    meta_init: str | None = field(
        default=None,
        metadata={
            "help": "Path or Hub repo id of a meta-initialization to start from instead of training one."
        },
    )
    meta_init_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or sha) of --meta_init."}
    )
    reuse_meta_init: bool = field(
        default=True,
        metadata={
            "help": "Reuse a meta-initialization already in the output folder when it was trained "
            "on the same data with the same model and training arguments (resumed runs)."
        },
    )
    meta_init_widenings: int = field(
        default=2,
        metadata={
            "help": "When the meta-initialization scores no better than the label-frequency "
            "baseline (it learned no task, so its gradients carry no task structure), retrain it "
            "with the family's model twice as wide, at most this many times, and estimate with "
            "the first that learns. Groups trained from scratch keep your model. 0: never "
            "(README: Scenarios, `many`)."
        },
    )
    early_meta_init_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Estimate subsets (the Grad-TAE regression: predicted payoffs, --affinity_kind "
            "higher-order, the ground-truth comparison) at an early meta-initialization, trained "
            "like θ0 for this fraction of --num_train_epochs (or --max_steps); the overlap "
            "affinity that is clustered stays at the fully trained θ0. At a converged θ0 the "
            "tasks' gradients are small residuals and the estimates track real training less "
            "well (README: Scenarios). 1: one θ0 for both (default; the graph and image "
            "families: 0.75). An early θ0 that scores no better than the label-frequency "
            "baseline is not used."
        },
    )


@dataclass
class GradientArguments:
    """Step 2: projected per-example gradients at the meta-initialization (Grad-TAE)."""

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
            "help": "Leave the family's task-private parameters (per-task heads) out of the "
            "gradients: they carry no transfer between tasks, and projection would mix them "
            "into shared coordinates."
        },
    )
    gradient_exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "More parameter-name patterns (regular expressions) to leave out."},
    )


@dataclass
class EstimationArguments:
    """Steps 3–4: estimated fine-tuning of sampled subsets and the affinity matrix (Grad-TAE)."""

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
            "affinities are averaged (an ensemble, as in Grad-TAE); 1 with --meta_init."
        },
    )
    subset_seed: int = field(default=0, metadata={"help": "Seed of the subset sampler."})
    sampling: str = field(
        default="uniform",
        metadata={
            "help": "How subsets are drawn: 'uniform' (every subset of --subset_size tasks "
            "equally likely, Grad-TAE) or 'adaptive' (approximate clustering for "
            "multi-instruction tuning: the tasks not in --initial_clusters come in over "
            "--adaptive_rounds rounds; each subset is drawn from one current cluster plus the "
            "round's new tasks, then the tasks are re-clustered; --num_subsets is split over "
            "the rounds; the pair coverage per round is reported)."
        },
    )
    initial_clusters: str | None = field(
        default=None,
        metadata={
            "help": "--sampling adaptive: the current clusters, a text file with one cluster "
            "of task names per line or a previous run's groups.json; tasks in no cluster are "
            "the new tasks. Default: none (the first round samples its new tasks alone)."
        },
    )
    adaptive_rounds: int = field(
        default=3,
        metadata={"help": "--sampling adaptive: rounds of sample, estimate, re-cluster."},
    )
    estimator_l2: str = field(
        default="auto",
        metadata={
            "help": "λ of the estimator's ridge penalty, or 'auto': the λ of "
            "--estimator_l2_grid at which the meta-initializations' affinities agree best "
            "(with one meta-initialization: 100; README: choosing λ)."
        },
    )
    estimator_l2_grid: list[float] = field(
        default_factory=lambda: list(DEFAULT_L2_GRID),
        metadata={"help": "λ values that --estimator_l2 auto chooses from."},
    )
    estimator_mode: str = field(
        default="principled",
        metadata={"help": "'principled' (offsets) or 'paper' (Grad-TAE code)."},
    )
    scoring_split: str = field(
        default="validation", metadata={"help": "Rows that score each estimated model."}
    )
    affinity_metric: str | None = field(
        default=None,
        metadata={
            "help": "Per-task score of the affinity: log_loss, f1 or accuracy (default: the "
            "family's, log_loss for the built-in families)."
        },
    )
    affinity_kind: str = field(
        default="ntk",
        metadata={
            "help": "The affinity that is clustered: 'ntk' (overlap of the tasks' Gauss-Newton "
            "matrices of the projected gradients at θ0: the mean squared empirical NTK between "
            "their examples; label-free), 'fisher' (the same with the empirical Fisher's "
            "per-row weights σ(-y s)²), 'higher-order' (Grad-TAE: each "
            "task's estimated --affinity_metric over the sampled subsets) or "
            "'gradient-cosine' (cosine between one task's training-loss gradient and another's "
            "validation-loss gradient at θ0). Subsets are estimated either way: they score the "
            "candidate partitions (README: Scenarios)."
        },
    )


@dataclass
class GroupingArguments:
    """Steps 5–6: SDP task groups and one model per group; optional ground truth."""

    num_task_groups: int = field(
        default=0, metadata={"help": "k, the number of task groups; 0 chooses k by a sweep."}
    )
    max_task_groups: int = field(default=8, metadata={"help": "Largest k the sweep tries."})
    partition_choice: str = field(
        default="silhouette",
        metadata={
            "help": "How k and the groups are chosen when --num_task_groups is 0: "
            "'silhouette' takes the SDP grouping with the best mean silhouette on the affinity "
            "and scores it against all tasks and single tasks by their estimated validation "
            "metric; 'payoff' scores the grouping of every k that way and keeps, among those "
            "tied with the best, the one with the most significant group structure (README: "
            "choosing the partition); 'density' takes the k whose SDP objective gains most over "
            "a shuffled null."
        },
    )
    split_incoherent_groups: bool = field(
        default=True,
        metadata={
            "help": "With --partition_choice silhouette, split into single tasks every group "
            "of the chosen grouping whose mean silhouette on the meta-initializations' own "
            "affinities is <= 0 (tasks that only look alike on the average, e.g. unrelated "
            "lone tasks put together; README: Scenarios)."
        },
    )
    propose_groups: bool = field(
        default=True,
        metadata={
            "help": "When the payoff rule picks all tasks or single tasks, train its best "
            "non-trivial candidate as the groups instead: both trivial answers are trained as "
            "baselines anyway, and validation picks the recommendation among the three."
        },
    )
    payoff_tolerance: float = field(
        default=1.0,
        metadata={
            "help": "Candidates within this many paired standard errors (over the "
            "meta-initializations) of the best predicted payoff count as tied with it."
        },
    )
    null_min_z: float = field(
        default=2.0,
        metadata={
            "help": "A k's objective gain counts as group structure only above this many "
            "standard deviations of the shuffled null."
        },
    )
    clustering: str = field(
        default="sdp", metadata={"help": "'sdp' (Grad-TAE's SDP) or 'spectral'."}
    )
    train_groups: bool = field(
        default=True, metadata={"help": "Train one model per group and compare (step 6)."}
    )
    compare_single_tasks: bool = field(
        default=True, metadata={"help": "Also train one model per task for the comparison."}
    )
    validate_groups: bool = field(
        default=True,
        metadata={
            "help": "After group training, also offer the groups with every group whose tasks "
            "validate better alone (with every seed) split into single tasks ('validated "
            "groups', no new training; needs --compare_single_tasks) to the recommendation."
        },
    )
    generation_metrics: bool = field(
        default=False,
        metadata={
            "help": "Also score the group-training comparison's test split by greedily generated "
            "targets: per-task ROUGE-L and generated exact match (text families only; needs "
            "pip install hf-tae[text])."
        },
    )
    group_init: str = field(
        default="scratch",
        metadata={"help": "Group models start from 'scratch' or from the 'meta' initialization."},
    )
    group_seeds: list[int] = field(
        default_factory=lambda: [0], metadata={"help": "Seeds of each group training run."}
    )
    run_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of every group-training and ground-truth run, the same for "
            "every subset. By epochs a run's steps grow with its rows, so a group of two tasks "
            "gets a tenth of the all-tasks run's steps and often stops before it learns (see "
            "README: scenarios). Default: the training arguments' epochs (or max_steps)."
        },
    )
    merge_methods: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Also merge the group models (first --group_seeds seed) into one model per "
            "method, e.g. 'average regmean:alpha=0.9 ties:density=0.2,lambda=0.8' (any of "
            "hf_tae.merging.method_names(), except those needing fisher_block statistics; "
            "options as name:key=value,... typed by the method's parameters, the rest at their "
            "defaults), and add each merged model to the group-training comparison and the "
            "recommendation as 'merged (<method> <key=value> ...)'. Each task keeps its own "
            "group model's head (task-private parameters); RegMean/Fisher statistics come from "
            "each group model on its group's training rows. Full models only (not the "
            "instructions family's LoRA adapters). Outputs in <output_dir>/merged/<method>[_"
            "<key=value>...]/; a rerun keeps finished merges (README: Merging)."
        },
    )
    recommend_merged: bool = field(
        default=True,
        metadata={
            "help": "Let the recommendation choose a merged model (one model for all tasks) "
            "when its validation score beats the groups, all tasks and single tasks; false: "
            "report the merged models but recommend among the trained models only."
        },
    )
    merge_examples: int = field(
        default=1000,
        metadata={"help": "Training rows per group model for the merge statistics."},
    )
    ground_truth: int = field(
        default=0,
        metadata={
            "help": "Fine-tune this many sampled subsets for real (started as "
            "--ground_truth_init says) and compare them with their estimates (0: skip)."
        },
    )
    ground_truth_exhaustive: int = field(
        default=0,
        metadata={
            "help": "Fine-tune every subset of this many tasks for real, all C(n, k) of them "
            "(approximate clustering's --preload_combos), and compare the estimate's grouping "
            "with an exhaustive search over partitions on the true affinities (0: skip)."
        },
    )
    max_exhaustive_subsets: int = field(
        default=100,
        metadata={
            "help": "--ground_truth_exhaustive refuses to start when C(n, k) exceeds this "
            "(each subset is one fine-tuning run per --ground_truth_seeds)."
        },
    )
    ground_truth_init: str = field(
        default="group",
        metadata={
            "help": "What each ground-truth run fine-tunes: 'group' starts from --group_init "
            "(the truth of what training a subset gives); 'members' starts repeat r (seed r of "
            "--ground_truth_seeds) from meta-initialization r mod --num_meta_inits, the "
            "fine-tuning each member's estimate linearizes (Grad-TAE A.3), so the comparison "
            "measures the estimator itself."
        },
    )
    ground_truth_seeds: list[int] = field(
        default_factory=lambda: [0, 1],
        metadata={
            "help": "Seeds of each ground-truth fine-tuning. With two or more, the report gives "
            "the truth's own seed-to-seed agreement, the ceiling any estimate is judged against."
        },
    )


def fixed_l2(est: EstimationArguments) -> float | None:
    """``--estimator_l2`` as a number, or None for ``auto`` (chosen per run by ``select_l2``)."""
    value = est.estimator_l2
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TaeError(
            f"--estimator_l2 {value!r} is neither a number nor 'auto'; pass e.g. 1000 or auto."
        ) from None


def check_arguments(est: EstimationArguments, grouping: GroupingArguments) -> None:
    """Bad option values fail before any training, naming the option and the fix."""
    choices = {
        "--estimator_mode": (est.estimator_mode, ("principled", "paper")),
        "--scoring_split": (est.scoring_split, ("train", "validation")),
        "--clustering": (grouping.clustering, ("sdp", "spectral")),
        "--group_init": (grouping.group_init, ("scratch", "meta")),
        "--ground_truth_init": (grouping.ground_truth_init, ("group", "members")),
        "--partition_choice": (grouping.partition_choice, ("silhouette", "payoff", "density")),
        "--sampling": (est.sampling, ("uniform", "adaptive")),
        "--affinity_kind": (est.affinity_kind, ("higher-order", "ntk", "fisher",
                                                        "gradient-cosine")),  # fmt: skip
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise TaeError(f"{flag} {value!r} is not one of {list(allowed)}.")
    if est.affinity_metric is not None:
        check_metric(est.affinity_metric, option="--affinity_metric")
    l2 = fixed_l2(est)
    if l2 is not None and not (math.isfinite(l2) and l2 > 0):
        raise TaeError(f"--estimator_l2 must be a number > 0 or 'auto', got {est.estimator_l2!r}.")
    if l2 is None and not (
        est.estimator_l2_grid and all(math.isfinite(x) and x > 0 for x in est.estimator_l2_grid)
    ):
        raise TaeError(
            f"--estimator_l2_grid {est.estimator_l2_grid} needs one or more numbers > 0 for "
            "--estimator_l2 auto."
        )
    for flag, value, low in (
        ("--num_subsets", est.num_subsets, 1),
        ("--subset_size", est.subset_size, 2),
        ("--num_task_groups", grouping.num_task_groups, 0),
        ("--max_task_groups", grouping.max_task_groups, 2),
        ("--ground_truth", grouping.ground_truth, 0),
        ("--num_meta_inits", est.num_meta_inits, 1),
        ("--adaptive_rounds", est.adaptive_rounds, 1),
        ("--ground_truth_exhaustive", grouping.ground_truth_exhaustive, 0),
    ):
        if value < low:
            raise TaeError(f"{flag} must be >= {low}, got {value}.")
    for flag, value in (("--payoff_tolerance", grouping.payoff_tolerance),
                        ("--null_min_z", grouping.null_min_z)):  # fmt: skip
        if not value >= 0:
            raise TaeError(f"{flag} must be a number >= 0, got {value}.")
    if grouping.run_steps is not None and not grouping.run_steps >= 1:
        raise TaeError(f"--run_steps must be >= 1 (or unset), got {grouping.run_steps}.")
    if not grouping.group_seeds:
        raise TaeError("--group_seeds is empty; give at least one seed.")
    if grouping.merge_methods:
        from hf_tae.merging.registry import get_method, parse_method_choices

        try:  # unknown methods or options raise, naming the valid ones
            choices = parse_method_choices(grouping.merge_methods)
        except TaeError as err:
            raise TaeError(f"--merge_methods: {err}") from None
        for choice in choices:
            spec = get_method(choice.method)
            if "fisher_block" in spec.statistics(spec.check_params(choice.params)):
                raise TaeError(f"--merge_methods {choice.label}: the pipeline computes no (IA)³ "
                               "block-Fisher statistics; merge with hf_tae.merge(...).")  # fmt: skip
        if not grouping.train_groups:
            raise TaeError("--merge_methods merges the group models: keep --train_groups true.")
        if grouping.merge_examples < 1:
            raise TaeError(f"--merge_examples must be >= 1, got {grouping.merge_examples}.")
    if est.initial_clusters and est.sampling != "adaptive":
        raise TaeError("--initial_clusters is read by --sampling adaptive only; add it.")
    truth = grouping.ground_truth or grouping.ground_truth_exhaustive
    if truth and not grouping.ground_truth_seeds:
        raise TaeError("--ground_truth_seeds is empty; give at least one seed.")
