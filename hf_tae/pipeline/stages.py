"""The pipeline's stages as functions of a family, its tasks and the parsed arguments.

Each stage is usable on its own (the job in :mod:`hf_tae.pipeline.run` chains them) and takes
everything family-specific from the :class:`~hf_tae.families.TaskFamily`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.trainers.arguments import weight_settings
from hf_tae.utils.io import atomic_write_text

if TYPE_CHECKING:
    from hf_tae.families.base import TaskFamily
    from hf_tae.pipeline.arguments import (
        EstimationArguments,
        GradientArguments,
        GroupingArguments,
        PipelineArguments,
    )
    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "meta_init.fingerprint.json"
WIDENING_FILE = "meta_init.widening.json"
#: Where a member's early meta-initialization and its gradients live
#: (``--early_meta_init_fraction``).
EARLY_FOLDER = "early"


def meta_init_fingerprint(family: TaskFamily, family_args: Any, tasks: TaskSet,
                          training_args: MultitaskTrainingArguments) -> str:  # fmt: skip
    """sha256 of what determines a trained meta-initialization: the family's data fingerprint
    (data and family arguments) and the training arguments that affect the weights."""
    digest = hashlib.sha256(family.fingerprint(family_args, tasks).encode())
    training = weight_settings(training_args)
    digest.update(json.dumps([family.name, training], sort_keys=True).encode())
    return digest.hexdigest()


def train_meta_init(
    family: TaskFamily,
    family_args: Any,
    tasks: TaskSet,
    pipeline_args: PipelineArguments,
    training_args: MultitaskTrainingArguments,
    output_dir: Path,
    save_data: bool = True,
    name: str = "meta-initialization",
    below_baseline_advice: str | None = None,
):
    """Stage 1: the multitask model on all tasks, its per-task metrics and the baseline.

    Reuses ``output_dir/meta_init`` when its fingerprint matches (resumed runs) or starts from
    ``--meta_init``. ``below_baseline_advice`` ends the warning when it scores no better than
    the label-frequency baseline (default: give it more capacity or training). Returns
    ``(trainer, info)``.
    """
    from transformers import set_seed

    from hf_tae.hub import load_meta_init

    set_seed(training_args.seed)  # the model is built before the Trainer seeds anything
    fingerprint = meta_init_fingerprint(family, family_args, tasks, training_args)
    stamp = output_dir / FINGERPRINT_FILE
    reuse = (
        pipeline_args.reuse_meta_init
        and not pipeline_args.meta_init
        and stamp.is_file()
        and json.loads(stamp.read_text()).get("fingerprint") == fingerprint
    )
    if pipeline_args.meta_init or reuse:
        source = pipeline_args.meta_init or output_dir / "meta_init"
        model = load_meta_init(source, revision=pipeline_args.meta_init_revision)
        logger.info("starting from the meta-initialization %s (no training)", source)
    else:
        model = family.model_init(family_args, tasks)
    training_args.output_dir = str(output_dir / "checkpoints")
    trainer = family.trainer_class(model=model, args=training_args, task_set=tasks)
    if not (pipeline_args.meta_init or reuse):
        trainer.train()
    validation = trainer.evaluate_tasks("validation")
    test = trainer.evaluate_tasks("test")
    baseline = family.baseline(tasks, "test")
    if trainer.is_world_process_zero():
        if not reuse:
            stamp.unlink(missing_ok=True)  # the stamp vouches for a complete meta_init/ only
            trainer.save_model(str(output_dir / "meta_init"))
            if not pipeline_args.meta_init:
                atomic_write_text(stamp, json.dumps({"fingerprint": fingerprint}))
        if save_data:
            family.save_data(tasks, output_dir / "data")
    selection = family.metrics.selection
    test_avg = test[f"test_avg_{selection}"]
    baseline_avg = None if not baseline else float(np.mean(list(baseline.values())))
    below = None
    if baseline_avg is not None and test_avg <= baseline_avg:
        advice = below_baseline_advice or (
            "Give it more capacity ("
            f"{' or '.join(family.capacity_options) or 'the family model options'}) or "
            "training (--num_train_epochs, --learning_rate).")  # fmt: skip
        below = (f"the {name} (seed {training_args.seed}) scores test {selection} "
                 f"{test_avg:.3f}, no better than the label-frequency baseline's "
                 f"{baseline_avg:.3f}: it learned no task, so its gradients carry no task "
                 f"structure and the estimated affinity is noise. {advice}")  # fmt: skip
        logger.warning(below)
    return trainer, {
        "reused": bool(reuse),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "validation": validation,
        "test": test,
        "test_per_task": {t: test[f"test_{t}_{selection}"] for t in tasks.task_names},
        "test_avg": test_avg,
        "baseline_per_task": baseline,
        "baseline_avg": baseline_avg,
        "below_baseline": below,
    }


def _capacity(family: TaskFamily, family_args: Any) -> dict[str, Any]:
    """The values of the family's capacity flags in ``family_args`` (for results.json)."""
    return {flag: getattr(family_args, flag.lstrip("-"), None) for flag in family.capacity_options}


def train_meta_init_that_learns(
    family: TaskFamily,
    family_args: Any,
    tasks: TaskSet,
    pipeline_args: PipelineArguments,
    training_args: MultitaskTrainingArguments,
    output_dir: Path,
    save_data: bool = True,
) -> tuple[Any, dict[str, Any], Any]:
    """Stage 1 with a fallback: a meta-initialization that scores no better than the
    label-frequency baseline learned no task, and its gradients carry no task structure (the
    suite's ``many``: 50 tasks in a width-8 model). Then the family's model is widened
    (:meth:`~hf_tae.families.TaskFamily.widen`) and θ0 retrained, at most
    ``--meta_init_widenings`` times, until one learns.

    Returns ``(trainer, info, family_args)``: the arguments of the θ0 kept, which the other
    meta-initializations and the gradients use. ``info["widening"]`` lists every θ0 tried.
    The decision is saved in ``output_dir/meta_init.widening.json``, so a resumed job goes
    straight to the width it settled on.
    """
    record = output_dir / WIDENING_FILE
    base = meta_init_fingerprint(family, family_args, tasks, training_args)
    args, tried = family_args, []
    if pipeline_args.reuse_meta_init and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("base_fingerprint") == base:  # within today's --meta_init_widenings
            tried = saved["tried"][: pipeline_args.meta_init_widenings]
            for _ in tried:
                args = family.widen(args)
    while True:  # a copy each time: the Trainer fills in fields the fingerprint reads
        trainer, meta = train_meta_init(family, args, tasks, pipeline_args,
                                        copy.deepcopy(training_args), output_dir, save_data)  # fmt: skip
        wider = family.widen(args) if meta["below_baseline"] else None
        if (wider is None or pipeline_args.meta_init
                or len(tried) >= pipeline_args.meta_init_widenings):  # fmt: skip
            break
        tried.append({"capacity": _capacity(family, args), "test_avg": meta["test_avg"]})
        logger.warning("retraining the meta-initialization twice as wide: %s",
                       _capacity(family, wider))  # fmt: skip
        args = wider
        if trainer.is_world_process_zero():
            atomic_write_text(record, json.dumps({"base_fingerprint": base, "tried": tried}))
    if not tried:
        record.unlink(missing_ok=True)
    meta["widening"] = None if not tried else {
        "tried": tried, "kept": {"capacity": _capacity(family, args),
                                 "test_avg": meta["test_avg"]}}  # fmt: skip
    return trainer, meta, args


def member_run(output_dir: Path, training_args: MultitaskTrainingArguments,
               member: int) -> tuple[Path, MultitaskTrainingArguments]:  # fmt: skip
    """Where meta-initialization ``member`` of an ensemble lives and what it trains with:
    member 0 is "the" meta-initialization (``output_dir``: ``meta_init/``, ``gradients/``),
    member i lives under ``ensemble/member_<i>/`` with training seed ``seed + i`` and is never
    pushed to the Hub."""
    if member == 0:
        return output_dir, training_args
    args = dataclasses.replace(training_args, seed=training_args.seed + member, push_to_hub=False)
    return output_dir / "ensemble" / f"member_{member}", args


def collect_member_gradients(trainer, family: TaskFamily, family_args: Any,
                             grad_args: GradientArguments, run_dir: Path, member: int):  # fmt: skip
    """Stage 2 for one meta-initialization: its projected gradients in ``run_dir/gradients``
    (projection seed ``projection_seed + member``, so members differ in projection too),
    without the excluded parameters. Returns ``(store, excluded parameter names)``."""
    exclude = list(grad_args.gradient_exclude)
    if grad_args.exclude_task_heads:
        exclude += family.private_parameters(trainer.model)
    store = trainer.collect_gradients(
        run_dir / "gradients", score_fn=family.score_function(family_args),
        collate_fn=family.collate_fn(family_args), dim=grad_args.projection_dim,
        kind=grad_args.projection_kind, seed=grad_args.projection_seed + member,
        batch_size=grad_args.gradient_batch_size, exclude=exclude or None, overwrite=True,
    )  # fmt: skip
    return store, exclude


def early_training_args(training_args: MultitaskTrainingArguments,
                        fraction: float) -> MultitaskTrainingArguments:  # fmt: skip
    """The training arguments of an early meta-initialization: ``fraction`` of
    ``num_train_epochs``, or of ``max_steps`` when that is set (at least one step)."""
    args = copy.deepcopy(training_args)
    if args.max_steps > 0:
        args.max_steps = max(1, round(fraction * args.max_steps))
    else:
        args.num_train_epochs = fraction * args.num_train_epochs
    return args


def early_meta_init_store(family: TaskFamily, family_args: Any, tasks: TaskSet,
                          pipeline_args: PipelineArguments, grad_args: GradientArguments,
                          training_args: MultitaskTrainingArguments, run_dir: Path, member: int,
                          only_if_learned: bool = True) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The early meta-initialization of one member and its projected gradients, which the
    subsets' regression fits on (``--early_meta_init_fraction``).

    It lives in ``run_dir/early`` (resumable like θ0) and trains like θ0 for the given
    fraction of its length. Why: at a θ0 trained to convergence every task is fit, the tasks'
    gradients are small residuals, and the regression's estimates track real training of the
    subsets less well than at a θ0 stopped earlier (README: Scenarios, "An early θ0 for the
    subsets"). With ``only_if_learned``, an early θ0 that scores no better than the
    label-frequency baseline learned no task and is not used: no gradients, store ``None``.
    Returns ``(store, info)``, ``info`` with ``fraction``, ``test_avg``, ``baseline_avg`` and
    ``used``.
    """
    fraction = pipeline_args.early_meta_init_fraction
    folder = run_dir / EARLY_FOLDER
    advice = ("The subsets are estimated at the fully trained meta-initializations instead; a "
              "larger --early_meta_init_fraction (1 turns it off) gives an early one that learns."
              if only_if_learned else "The guard decided on member 0, whose early one learned.")  # fmt: skip
    trainer, meta = train_meta_init(family, family_args, tasks, pipeline_args,
                                    early_training_args(training_args, fraction), folder,
                                    save_data=False, name="early meta-initialization",
                                    below_baseline_advice=advice)  # fmt: skip
    used = not (only_if_learned and meta["below_baseline"])
    info = {"fraction": fraction, "test_avg": meta["test_avg"],
            "baseline_avg": meta["baseline_avg"], "used": used}  # fmt: skip
    if not used:
        return None, info
    store, _ = collect_member_gradients(trainer, family, family_args, grad_args, folder, member)
    return store, info


def planted_gap(matrix: np.ndarray, groups: Sequence[int]) -> float:
    """Mean within-group off-diagonal affinity minus mean cross-group affinity."""
    groups = np.asarray(groups)
    same = groups[:, None] == groups[None, :]
    off = ~np.eye(len(groups), dtype=bool)
    return float(np.nanmean(matrix[same & off]) - np.nanmean(matrix[~same]))


#: ``--estimator_l2 auto`` chooses λ on this many of the sampled subsets (each pair of tasks of
#: the 16-task default is then covered ~15 times by subsets of 4), then estimates all of them
L2_SELECTION_SUBSETS = 300
#: λ of ``--estimator_l2 auto`` when there is one meta-initialization to compare: the value that
#: recovers the planted groups of both built-in defaults (README: choosing λ)
AUTO_FALLBACK_L2 = 100.0


def estimate_affinity(stores, tasks: TaskSet, est_args: EstimationArguments,
                      planted: np.ndarray | None = None,
                      grouping_args: GroupingArguments | None = None,
                      subset_stores: Sequence[Any] | None = None):  # fmt: skip
    """Stages 3–4: estimated per-(subset, task) scores on every store (one per
    meta-initialization) and their averaged affinity matrix. Returns ``(subsets, affinity,
    info, members)``, ``members`` the per-meta-initialization matrices that were averaged.
    ``--sampling adaptive`` draws the subsets round by round, re-clustering with
    ``grouping_args`` (:mod:`hf_tae.pipeline.adaptive`). The subsets' regression fits on
    ``subset_stores`` (the early meta-initializations' stores) when given; the overlap
    affinities (``ntk``, ``fisher``) are read off ``stores``."""
    from hf_tae.estimation.adaptive import pair_coverage
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import self_agreement
    from hf_tae.estimation.regression import RegressionEstimator
    from hf_tae.estimation.regularization import select_l2
    from hf_tae.estimation.subsets import sample_subsets
    from hf_tae.pipeline.arguments import fixed_l2

    overlap_stores, stores = stores, list(subset_stores or stores)
    n = tasks.num_tasks
    if est_args.subset_size > n:
        raise TaeError(
            f"--subset_size {est_args.subset_size} exceeds the {n} tasks; use at most {n}."
        )
    available = math.comb(n, est_args.subset_size)
    num_subsets = min(est_args.num_subsets, available)
    adaptive = None
    if est_args.sampling == "uniform":
        if num_subsets < est_args.num_subsets:
            logger.info("only %d subsets of size %d exist; using all", available,
                        est_args.subset_size)  # fmt: skip
        subsets = sample_subsets(n, num_subsets, est_args.subset_size, seed=est_args.subset_seed)
    metric = est_args.affinity_metric
    start = time.perf_counter()
    l2, selection = fixed_l2(est_args), None
    if l2 is None and len(stores) < 2:
        l2 = AUTO_FALLBACK_L2
        logger.warning("--estimator_l2 auto compares meta-initializations and this run has one; "
                       "using λ = %g. Pass --num_meta_inits 2 or more, or λ as a number.", l2)  # fmt: skip
    if est_args.sampling == "adaptive":  # notes B.1: one cluster plus the new tasks per subset
        from hf_tae.pipeline.adaptive import adaptive_estimates

        adaptive = adaptive_estimates(stores, tasks, est_args, grouping_args, l2,
                                      L2_SELECTION_SUBSETS)  # fmt: skip
        subsets, l2, selection = adaptive.subsets, adaptive.l2, adaptive.selection
        num_subsets = len(subsets)
    if l2 is None:  # --estimator_l2 auto: the λ whose meta-initializations agree best
        selection = select_l2(stores, subsets, grid=est_args.estimator_l2_grid, metric=metric,
                              split=est_args.scoring_split, mode=est_args.estimator_mode,
                              max_subsets=L2_SELECTION_SUBSETS)  # fmt: skip
        l2 = selection.l2
        logger.info("--estimator_l2 auto: λ = %g (meta-initialization agreement by λ: %s)", l2,
                    ", ".join(f"{r.l2:g}: {r.agreement:+.3f}" for r in selection.table.itertuples()))  # fmt: skip
    provenance = {
        "estimator_l2": l2,
        "estimator_mode": est_args.estimator_mode,
        "scoring_split": est_args.scoring_split,
        "num_subsets": num_subsets,
        "subset_size": est_args.subset_size,
    }
    members = []
    for member, store in enumerate(stores):
        estimator = RegressionEstimator(store, l2=l2, mode=est_args.estimator_mode)
        if adaptive is not None:
            table = adaptive.tables[member]
        elif selection is not None and len(subsets) <= L2_SELECTION_SUBSETS:  # already estimated
            table = selection.results[member]
        else:
            table = estimator.evaluate(subsets, estimator.fit(subsets),
                                       split=est_args.scoring_split)  # fmt: skip
        members.append(
            AffinityMatrix.from_results(table, tasks.task_names, metric=metric, symmetrize=True,
                                        zero_diagonal=True, provenance=provenance)
        )  # fmt: skip
    affinity = AffinityMatrix.average(members)
    higher_order = members
    if est_args.affinity_kind != "higher-order":  # clustered; the subsets still score payoffs
        from hf_tae.estimation.gradient_affinity import gradient_affinity

        members = [gradient_affinity(store, est_args.affinity_kind, est_args.scoring_split,
                                     provenance) for store in overlap_stores]  # fmt: skip
        subset_results = affinity.results
        affinity = AffinityMatrix.average(members)
        affinity.results = subset_results
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {
        "num_subsets": num_subsets,
        "subset_size": est_args.subset_size,
        "num_meta_inits": len(stores),
        "estimator": f"{est_args.estimator_mode}, logistic, l2={l2:g}",
        "estimator_l2": l2,
        "l2_selection": None if selection is None else json.loads(
            selection.table.to_json(orient="records")),
        "targets": estimator.label_kind,
        "scoring_split": est_args.scoring_split,
        "metric": metric,
        "seconds": round(seconds, 3),
        "subsets_per_second": len(stores) * (num_subsets + (0 if selection is None else len(
            selection.table) * min(num_subsets, L2_SELECTION_SUBSETS))) / max(seconds, 1e-9),
    }
    info["affinity_kind"] = est_args.affinity_kind
    info["sampling"] = est_args.sampling
    info["pair_coverage"] = pair_coverage(subsets, n)  # share of T's entries observed
    if adaptive is not None:
        info["adaptive"] = adaptive.info
    if len(members) > 1:  # how much one meta-initialization's estimate says about another's
        info["self_agreement"] = self_agreement(members)
        if higher_order is not members:
            info["higher_order_self_agreement"] = self_agreement(higher_order)
    if planted is not None:
        info["planted_gap"] = planted_gap(affinity.to_numpy(), planted)
        info["planted_gap_per_meta_init"] = [planted_gap(m.to_numpy(), planted) for m in members]
    return subsets, affinity, info, members


def choose_groups(affinity, grouping_args: GroupingArguments, planted: np.ndarray | None = None,
                  stores: Sequence[Any] = (), est_args: EstimationArguments | None = None,
                  members: Sequence[Any] | None = None,
                  subset_stores: Sequence[Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Stage 5: the task groups, with k given or chosen.

    ``--partition_choice silhouette`` (default) takes the SDP grouping of the k with the best
    :func:`~hf_tae.affinity_silhouette` on the affinity, and ``payoff`` considers the SDP
    grouping of every k of the sweep; either way, all tasks (k = 1), those groupings and single
    tasks (k = n) are scored by their predicted payoff on every meta-initialization's store
    (needs ``stores`` and ``est_args``) and picked by :func:`~hf_tae.choose_partition`, with
    the grouping's silhouette (``silhouette``) or its SDP objective's significant gain over the
    null (``payoff``) as the structure score. When that is a trivial answer,
    ``--propose_groups`` (default) returns the best non-trivial candidate instead
    (:func:`~hf_tae.estimation.partition.best_nontrivial`). ``density`` takes the k sweep's
    :func:`~hf_tae.recommend_k` by gain, without the payoff. With two or more
    meta-initializations the sweep's groupings are also scored on each one's own matrix
    (``members``, as :func:`estimate_affinity` returns them; rebuilt by
    :func:`member_affinities` when not given). Payoffs are predicted on ``subset_stores``
    (the early meta-initializations', ``--early_meta_init_fraction``) when given.
    """
    from hf_tae.clustering import (
        affinity_silhouette,
        partition_objective,
        recommend_k,
        sdp_cluster,
        silhouettes_by_member,
        spectral_cluster,
        split_incoherent_groups,
        sweep_k,
    )
    from hf_tae.estimation.affinity import COSINE_KINDS
    from hf_tae.estimation.partition import (
        best_nontrivial,
        choose_partition,
        labels_to_groups,
        partition_payoffs,
    )
    from hf_tae.estimation.regression import RegressionEstimator
    from hf_tae.pipeline.arguments import fixed_l2

    T = np.nan_to_num(affinity.to_numpy(), nan=0.0)  # pairs no subset covered: no evidence
    names = affinity.task_names
    n = len(T)
    sweep = candidates = k_votes = split_info = None
    k = grouping_args.num_task_groups
    if k > n:
        raise TaeError(f"--num_task_groups {k} exceeds the {n} tasks; use at most {n}.")
    if k:
        cluster = sdp_cluster if grouping_args.clustering == "sdp" else spectral_cluster
        grouping = cluster(T, k)
        labels, method, k_choice = grouping.labels.tolist(), grouping.method, "given"
        objective = grouping.objective
    else:
        ks = range(1, min(grouping_args.max_task_groups, n) + 1)  # gain 0 at k = 1 and k = n
        ceiling = 1.0 if affinity.kind in COSINE_KINDS else None  # cosine distance 1 − T
        sweep = sweep_k(T, ks, method=grouping_args.clustering, null_draws=10,
                        min_z=grouping_args.null_min_z, silhouette_ceiling=ceiling)  # fmt: skip
        if members is None:
            members = member_affinities(affinity, stores, est_args) if len(stores) > 1 else []
        matrices = [np.nan_to_num(m.to_numpy(), nan=0.0) for m in members]
        if len(matrices) > 1:  # is the k choice a near tie that the meta-initializations split?
            by_member = silhouettes_by_member(sweep, matrices, ceiling)
            columns = [c for c in by_member if c.startswith("member_")]
            sweep["silhouette_members"] = by_member[columns].to_numpy().tolist()
            sweep["preferred_by_members"] = by_member["preferred_by"].to_numpy()
        method = grouping_args.clustering
        if grouping_args.partition_choice == "density":
            k = recommend_k(sweep)
            row = sweep.set_index("k").loc[k]
            labels = list(row["labels"])
            k_choice = "largest significant gain of the k sweep over the null"
        else:
            if not stores or est_args is None:
                raise TaeError(f"--partition_choice {grouping_args.partition_choice} needs the "
                               "gradient stores; use --partition_choice density without "
                               "them.")  # fmt: skip
            by_silhouette = grouping_args.partition_choice == "silhouette"
            best_k = recommend_k(sweep, by="silhouette") if by_silhouette else None
            rows = sweep[sweep["k"] == best_k] if by_silhouette else sweep
            options = {"all tasks (k=1)": [0] * n}
            structure = {}
            for row in rows.itertuples():
                name = f"SDP k={row.k}" if method == "sdp" else f"{method} k={row.k}"
                row_labels, score = list(row.labels), row.silhouette
                if by_silhouette and grouping_args.split_incoherent_groups and row.n_groups > 1:
                    split_labels, coherence = split_incoherent_groups(
                        row_labels, matrices if len(matrices) > 1 else [T], ceiling)  # fmt: skip
                    split_info = _split_summary(coherence, names)
                    if split_info["split"]:
                        row_labels = split_labels.tolist()
                        name += f", split to k={len(set(row_labels))}"
                        score = affinity_silhouette(T, row_labels, ceiling)
                if 1 < len(set(row_labels)) < n and row_labels not in options.values():
                    options[name] = row_labels
                    if not by_silhouette:
                        score = row.gain if row.significant else 0.0
                    structure[name] = float(score)
            options["single tasks (k=n)"] = list(range(n))
            l2 = fixed_l2(est_args)
            if l2 is None:
                raise TaeError("choose_groups needs the λ that estimation used; pass est_args "
                               "with estimator_l2 set to it (results['estimation']"
                               "['estimator_l2']).")  # fmt: skip
            estimators = [RegressionEstimator(store, l2=l2, mode=est_args.estimator_mode)
                          for store in subset_stores or stores]  # fmt: skip
            payoffs = partition_payoffs(
                estimators,
                {c: labels_to_groups(lab) for c, lab in options.items()},
                metric=est_args.affinity_metric,
                split=est_args.scoring_split,
            )
            candidates = choose_partition(payoffs, est_args.affinity_metric, structure,
                                          tolerance=grouping_args.payoff_tolerance)  # fmt: skip
            chosen = candidates.loc[candidates["chosen"], "candidate"].iloc[0]
            k_choice = f"predicted payoff: {chosen}"
            trivial = ("all tasks (k=1)", "single tasks (k=n)")
            proposal = best_nontrivial(payoffs, trivial, est_args.affinity_metric, structure,
                                       grouping_args.payoff_tolerance)  # fmt: skip
            if chosen in trivial and grouping_args.propose_groups and proposal is not None:
                k_choice += (f"; trained instead: {proposal}, the best non-trivial candidate "
                             "(validation decides)")  # fmt: skip
                candidates["chosen"] = candidates["candidate"] == proposal
                chosen = proposal
            if by_silhouette:
                best_row = sweep.set_index("k").loc[best_k]
                best, votes = float(best_row["silhouette"]), ""
                if "preferred_by_members" in sweep:
                    agree = int(best_row["preferred_by_members"])
                    votes = f", the best on {agree} of {len(stores)} meta-initializations"
                    k_votes = {"k": int(best_k), "best_on": agree, "meta_inits": len(stores)}
                split = ""
                if split_info and split_info["split"]:
                    shown = split_info["split"][:3]
                    split = "; split into single tasks (not cohesive on the meta-initializations): "
                    split += ", ".join(f"{{{', '.join(g['tasks'])}}} ({g['coherence']:.2f})"
                                       for g in shown)  # fmt: skip
                    if len(split_info["split"]) > len(shown):
                        split += f" and {len(split_info['split']) - len(shown)} more groups"
                k_choice = (f"best silhouette k={best_k} ({best:.2f}{votes}){split}; {k_choice}"
                            if np.isfinite(best)
                            else f"no grouping of 1 < k < n to score; {k_choice}")  # fmt: skip
            labels = options[chosen]
            k = len(set(labels))
        objective = partition_objective(T, np.asarray(labels))
    groups = [[names[t] for t in g] for g in labels_to_groups(labels)]
    info: dict[str, Any] = {
        "method": method,
        "k": k,
        "k_choice": k_choice,
        "objective": objective,
        "groups": groups,
        "labels": [int(x) for x in labels],
        "sweep": None if sweep is None else json.loads(sweep.to_json(orient="records")),
        "candidates": None if candidates is None else json.loads(
            candidates.to_json(orient="records")),
        "silhouette_k_votes": k_votes,
        "coherence": split_info,
    }
    if planted is not None:
        from sklearn.metrics import adjusted_rand_score

        info["adjusted_rand_vs_planted"] = float(adjusted_rand_score(planted, labels))
    return info


def _split_summary(coherence: Any, names: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The groups :func:`~hf_tae.split_incoherent_groups` kept and split, by task name, for
    results.json."""
    out: dict[str, list[dict[str, Any]]] = {"kept": [], "split": []}
    for row in coherence.itertuples():
        std = None if np.isnan(row.coherence_std) else float(row.coherence_std)
        out["split" if row.split else "kept"].append(
            {"tasks": [names[t] for t in row.tasks], "coherence": float(row.coherence),
             "coherence_std": std})  # fmt: skip
    return out


def member_affinities(affinity, stores: Sequence[Any],
                      est_args: EstimationArguments | None) -> list[Any]:  # fmt: skip
    """Each meta-initialization's own matrix of ``affinity``'s kind, rebuilt from a saved run:
    the matrices stage 4 averaged (the NTK or Fisher overlap or gradient cosine of each store, or
    each member's subset estimates, read back from ``affinity.results``). Empty when they
    cannot be rebuilt."""
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.gradient_affinity import GRADIENT_KINDS, gradient_affinity

    if affinity.kind in GRADIENT_KINDS:
        split = est_args.scoring_split if est_args is not None else "validation"
        matrices = [gradient_affinity(store, affinity.kind, split) for store in stores]
    else:
        table = affinity.results
        if est_args is None or table is None or "member" not in table:
            return []
        matrices = [AffinityMatrix.from_results(part.drop(columns="member"), affinity.task_names,
                                                metric=est_args.affinity_metric, symmetrize=True,
                                                zero_diagonal=True)
                    for _, part in table.groupby("member", sort=True)]  # fmt: skip
    return matrices


def fresh_model(family: TaskFamily, family_args: Any, tasks: TaskSet, run_dir: Path,
                init: str) -> Callable[[], Any]:  # fmt: skip
    """A fresh model per run: the family's model from scratch (``init="scratch"``), or a copy
    of the run's saved meta-initialization (``"meta"``, read from disk once)."""
    saved: dict[str, Any] = {}

    def model_init():
        if init == "scratch":
            return family.model_init(family_args, tasks).train()
        if "meta" not in saved:
            from hf_tae.hub import load_meta_init

            saved["meta"] = load_meta_init(run_dir / "meta_init")
        return copy.deepcopy(saved["meta"]).train()

    return model_init


def init_fingerprint(family: TaskFamily, family_args: Any, tasks: TaskSet, run_dir: Path,
                     init: str) -> str:  # fmt: skip
    """What :func:`fresh_model` starts each run from, as a sha256: the family's data and model
    arguments (``init="scratch"``), or the saved meta-initialization's files (``"meta"``). The
    group-training and ground-truth folders record it, so a resumed job never mixes runs that
    started from two different models."""
    digest = hashlib.sha256(init.encode())
    if init == "scratch":
        digest.update(family.fingerprint(family_args, tasks).encode())
        return digest.hexdigest()
    for path in sorted((run_dir / "meta_init").glob("*")):
        if path.suffix in {".safetensors", ".json"}:  # not training_args.bin (paths)
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def run_arguments(training_args: MultitaskTrainingArguments,
              run_steps: int | None = None) -> MultitaskTrainingArguments:  # fmt: skip
    """The arguments of one group-training or ground-truth run: no Hub, no reporting, and
    ``run_steps`` (``--run_steps``) optimizer steps for every subset when it is set."""
    steps = {} if run_steps is None else {"max_steps": int(run_steps)}
    return dataclasses.replace(training_args, push_to_hub=False, report_to=[], **steps)


def train_groups(model_init, tasks: TaskSet, groups, training_args, grouping_args,
                 output_dir: Path, planted: np.ndarray | None, metric: str,
                 trainer_class: type | None = None,
                 fingerprint: str | None = None,
                 private_parameters: Callable[[Any], list[str]] | None = None,
                 ) -> dict[str, Any]:  # fmt: skip
    """Stage 6: the group models against one model on all tasks, one per task and the planted
    groups; scored per task on the test split by every metric, compared by ``metric``. Groups
    that validate worse than their tasks alone are split (:func:`validated_groups`, strategy
    ``"validated groups"`` when any is). The recommendation is whichever of the groups, the
    validated groups, all tasks and single tasks scores best on the validation split (the same
    runs, scored twice): the estimate proposes, validation decides.
    ``fingerprint``: :func:`init_fingerprint` of ``model_init``, recorded with the runs.
    With ``--merge_methods``, the group models are also merged (:func:`merge_groups`) and each
    merged model joins the comparison as strategy ``"merged (<label>)"`` (one model for all
    tasks, a deployment option of its own: the recommendation weighs it by the same validation
    score unless ``--recommend_merged false``); ``private_parameters(model)`` names the
    task-private parameters (the family's)."""
    from hf_tae.estimation.schema import higher_is_better
    from hf_tae.evaluation.group_training import (
        compare_group_training,
        summarize_group_training,
        validated_groups,
    )

    names = tasks.task_names
    strategies = {"grouped": groups, "all tasks": [list(names)]}
    if grouping_args.compare_single_tasks:
        strategies["single task"] = [[t] for t in names]
    if planted is not None:
        by_group: dict[int, list[str]] = {}
        for name, g in zip(names, planted, strict=True):
            by_group.setdefault(int(g), []).append(name)
        strategies["planted groups"] = list(by_group.values())
    run_args = run_arguments(training_args, grouping_args.run_steps)
    if grouping_args.merge_methods:  # before any group model is trained
        from hf_tae.merging.groups import check_mergeable

        check_mergeable(model_init())

    keep = groups if grouping_args.merge_methods else ()  # the merge stage reads them

    def compare(split: str, extra: tuple[str, ...] = (), by_seed: bool = False):
        return compare_group_training(
            model_init, tasks, strategies, run_args, output_dir / "group_training",
            seeds=grouping_args.group_seeds, split=split, extra_splits=extra,
            show_progress=not training_args.disable_tqdm, trainer_class=trainer_class,
            fingerprint=fingerprint, keep_models=keep,
            generate_splits=("test",) if grouping_args.generation_metrics else (),
            by_seed=by_seed,
        )  # fmt: skip

    table = compare("test", ("validation",))  # each run is scored on both splits once
    validated = (validated_groups(compare("validation", by_seed=True), groups, metric)
                 if grouping_args.validate_groups and "single task" in strategies
                 else None)  # fmt: skip
    if validated is not None and len(validated) < len(names):  # not every group split
        strategies["validated groups"] = validated  # its runs exist: nothing is trained
        table = compare("test")
    validation_table = compare("validation")
    merged = None
    if grouping_args.merge_methods:
        import pandas as pd

        from hf_tae.merging.groups import comparison_rows

        merged = merge_groups(model_init, tasks, groups, run_args, grouping_args, output_dir,
                              trainer_class, private_parameters)  # fmt: skip
        table = pd.concat([table, pd.DataFrame(comparison_rows(merged, tasks, "test"))],
                          ignore_index=True)  # fmt: skip
    summary = summarize_group_training(table, reference="all tasks", metric=metric)
    wide = table.pivot(index="task_name", columns="strategy", values=metric).loc[names]
    # the recommendation: the estimate's groups, all tasks, single tasks or a merged model,
    # whichever scores best on validation rows (ties: the earlier one, the estimate's groups first)
    validation = summarize_group_training(validation_table, reference="all tasks",
                                          metric=metric)  # fmt: skip
    options = [s for s in ("grouped", "validated groups", "all tasks", "single task")
               if s in strategies]  # fmt: skip
    scores = {s: float(validation.loc[s, metric]) for s in options}
    merged_scores = merged_validation(merged or {}, metric)
    if grouping_args.recommend_merged:
        scores |= {f"merged ({m})": v for m, v in merged_scores.items()}
    best = best_strategy(scores, higher_is_better(metric))
    merged_labels = {f"merged ({m})": m for m in merged or {}}
    columns = [*strategies, *merged_labels]
    info = {
        "init": "from scratch" if grouping_args.group_init == "scratch" else "from θ0",
        "seeds": len(grouping_args.group_seeds),
        "split": "test",
        "metric": metric,
        "summary": json.loads(summary.to_json(orient="index")),
        "per_task": {t: {s: float(wide.loc[t, s]) for s in columns} for t in names},
        "validated_groups": strategies.get("validated groups"),
        "recommended": {
            "strategy": best,
            "groups": [list(g) for g in strategies.get(best, [list(names)])],
            "validation": scores,
            "test": float(summary.loc[best, metric]),
        },
    }
    if best in merged_labels:  # a merged model: where it is
        info["recommended"]["path"] = merged[merged_labels[best]]["path"]
    if merged is not None:  # where each merged model is, its options, cost and validation score
        info["merged"] = {
            m: {k: v[k] for k in ("method", "parameters", "path", "seconds", "skipped", "private")}
            | {"validation": merged_scores[m]}
            for m, v in merged.items()
        }
    return info


def merged_validation(merged: dict[str, Any], metric: str) -> dict[str, float]:
    """Each merged model's ``metric`` on validation rows, averaged over the tasks as
    ``summarize_group_training`` averages every other strategy's: ``{label: score}``."""
    return {
        m: float(np.mean([r[metric] for r in v["scores"]["validation"]]))
        for m, v in merged.items()
    }


def best_strategy(scores: dict[str, float], higher_is_better: bool) -> str:
    """The strategy of best validation score; on a tie the one listed first (the estimate's
    groups before all tasks, single tasks and merged models)."""
    sign = 1.0 if higher_is_better else -1.0
    return max(scores, key=lambda s: sign * scores[s])


def merge_groups(model_init, tasks: TaskSet, groups, run_args, grouping_args, output_dir: Path,
                 trainer_class: type | None = None,
                 private_parameters: Callable[[Any], list[str]] | None = None,
                 ) -> dict[str, Any]:  # fmt: skip
    """Stage 6b (``--merge_methods``): merge the group models (first group seed, kept by group
    training under ``group_training/models/``) into ``merged/<folder>/`` and score each merged
    model per task on test and validation (:func:`hf_tae.merging.groups.merge_and_score`).
    Task-private parameters come from each task's own group model; data-aware methods use
    statistics of each group model on its group's training rows. Merges are atomic and a
    rerun keeps finished ones (fingerprint of inputs, method and options)."""
    from hf_tae.evaluation.ground_truth import SubsetFineTuner
    from hf_tae.hub import load_meta_init
    from hf_tae.merging.groups import merge_and_score, save_start_model
    from hf_tae.trainers import MultitaskTrainer

    seed = grouping_args.group_seeds[0]
    tuner = SubsetFineTuner(model_init, tasks, run_args, output_dir / "group_training")
    canon = tuner.canonical(groups)
    trainer_class = trainer_class or MultitaskTrainer
    private = private_parameters(model_init()) if private_parameters is not None else []
    base = (output_dir / "meta_init" if grouping_args.group_init == "meta" else
            save_start_model(model_init, seed, output_dir / "merged" / f"init_seed{seed}"))  # fmt: skip
    return merge_and_score(
        [tuner.model_path(g, seed) for g in canon], canon, grouping_args.merge_methods,
        output_dir / "merged", tasks=tasks, trainer_class=trainer_class, args=run_args,
        load_model=load_meta_init, private=private, base=base,
        max_examples=grouping_args.merge_examples,
    )  # fmt: skip


def truth_starts(family: TaskFamily, family_args: Any, tasks: TaskSet, grouping_args,
                 training_args: MultitaskTrainingArguments, output_dir: Path,
                 num_members: int) -> list[tuple[Callable[[], Any], str, Path, list[int]]]:  # fmt: skip
    """Where the ``--ground_truth`` runs start: ``(model_init, fingerprint, folder, seeds)`` per
    starting model. ``--ground_truth_init group``: one start, ``--group_init``, in
    ``ground_truth/``. ``members``: seed r of ``--ground_truth_seeds`` fine-tunes from
    meta-initialization r mod ``num_members`` (``ground_truth_members/member_<m>/``), the
    model whose fine-tuning that member's estimate linearizes (notes A.3)."""
    seeds, folder = list(grouping_args.ground_truth_seeds), output_dir / truth_folder(grouping_args)
    if grouping_args.ground_truth_init == "group":
        init = grouping_args.group_init
        return [(fresh_model(family, family_args, tasks, output_dir, init),
                 init_fingerprint(family, family_args, tasks, output_dir, init), folder, seeds)]  # fmt: skip
    starts = []
    for member in range(min(num_members, len(seeds))):
        run_dir, _ = member_run(output_dir, training_args, member)
        starts.append((fresh_model(family, family_args, tasks, run_dir, "meta"),
                       init_fingerprint(family, family_args, tasks, run_dir, "meta"),
                       folder / f"member_{member}", seeds[member::num_members]))  # fmt: skip
    return starts


def truth_folder(grouping_args) -> str:
    """The ``--ground_truth`` runs' folder in the job's output: one per ``--ground_truth_init``,
    so a rerun with the other start adds runs instead of refusing the folder's settings."""
    return "ground_truth" if grouping_args.ground_truth_init == "group" else "ground_truth_members"


def truth_groups(truth, names: Sequence[str], metric: str, chosen: Sequence[int] | None,
                 planted: Sequence[int] | None,
                 ks: Sequence[int] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The fine-tuned affinity clustered as the job clusters an estimate (z-scored,
    symmetrized, zero diagonal, unobserved pairs 0; SDP) at each k of ``ks`` (default: the
    job's k and the planted k): whether the truth itself holds the job's groups and the
    planted ones (ARI), and each grouping's mean silhouette on the truth."""
    from sklearn.metrics import adjusted_rand_score

    from hf_tae.clustering import affinity_silhouette, sdp_cluster
    from hf_tae.estimation.affinity import AffinityMatrix

    T = AffinityMatrix.from_results(truth, list(names), metric=metric, symmetrize=True,
                                    zero_diagonal=True).to_numpy()  # fmt: skip
    T = np.nan_to_num(T, nan=0.0)
    if ks is None:
        ks = {len(set(labels)) for labels in (chosen, planted) if labels is not None}
    out = []
    for k in sorted(k for k in set(ks) if 1 < k < len(names)):
        labels = sdp_cluster(T, k).labels
        row = {"k": k, "groups": [[names[i] for i in np.flatnonzero(labels == g)]
                                  for g in np.unique(labels)],
               "silhouette": float(affinity_silhouette(T, labels))}  # fmt: skip
        for key, reference in (("ari_vs_chosen", chosen), ("ari_vs_planted", planted)):
            if reference is not None:  # data without planted groups never mention them
                row[key] = float(adjusted_rand_score(reference, labels))
        out.append(row)
    return out


def run_ground_truth(starts, tasks: TaskSet, subsets, estimates, est_args, grouping_args,
                     training_args, output_dir: Path, estimation_seconds: float,
                     trainer_class: type | None = None,
                     group_labels: Sequence[int] | None = None,
                     planted: np.ndarray | None = None):  # fmt: skip
    """Stage 7: fine-tune ``--ground_truth`` sampled subsets from each of ``starts``
    (:func:`truth_starts`) and compare them with their estimates; with the job's group labels
    (``group_labels``) and the ``planted`` ones, also cluster the truth itself
    (:func:`truth_groups`)."""
    import pandas as pd

    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import (
        compare_affinities,
        compare_results,
        corrected_spearman,
        self_agreement,
    )
    from hf_tae.evaluation.ground_truth import SubsetFineTuner, average_seeds

    chosen = [tuple(s) for s in subsets[: grouping_args.ground_truth]]
    split = est_args.scoring_split
    tuners = [
        SubsetFineTuner(model_init, tasks, run_arguments(training_args, grouping_args.run_steps),
                        folder, seeds=seeds, trainer_class=trainer_class, fingerprint=fingerprint)
        for model_init, fingerprint, folder, seeds in starts
    ]  # fmt: skip
    # runs finished by an earlier call are reused: time only what this call trains
    runs = sum(len(set(t.canonical(chosen))) * len(t.seeds) for t in tuners)
    trained = sum(len(t.pending(chosen, split)) for t in tuners)
    start = time.perf_counter()
    truth = pd.concat([t.run(chosen, split=split, show_progress=not training_args.disable_tqdm)
                       for t in tuners], ignore_index=True)  # fmt: skip
    seconds = time.perf_counter() - start
    per_seed = [rows.drop(columns="seed") for _, rows in truth.groupby("seed")]
    truth = average_seeds(truth)
    keep = {tuple(sorted(s)) for s in chosen}
    est = estimates[[tuple(sorted(s)) in keep for s in estimates["subset"]]]
    est = est.assign(subset_id=[chosen.index(tuple(s)) for s in est["subset"]])
    metric = est_args.affinity_metric
    names = tasks.task_names

    def build(table, kind):
        return AffinityMatrix.from_results(table, names, metric=metric, symmetrize=True, kind=kind)

    true_matrix = build(truth, "fine-tuned")
    est_members = [build(rows, "estimated") for _, rows in est.groupby("member")]
    est_matrix = AffinityMatrix.average(est_members)
    true_matrix.save(output_dir / truth_folder(grouping_args) / "affinity", overwrite=True)
    est_mean = est.groupby(["subset_id", "task"], as_index=False)[metric].mean()
    joined = est_mean.merge(truth, on=["subset_id", "task"], suffixes=("_est", "_true"))
    info: dict[str, Any] = {
        "init": grouping_args.ground_truth_init,
        "num_subsets": len(chosen),
        "runs": runs,
        "runs_trained": trained,
        "seconds": seconds,
        # estimation time of these subsets against fine-tuning all their runs (extrapolated
        # from the runs this call trained; None when every run was reused)
        "compute_ratio": None if not trained else (
            estimation_seconds * len(chosen) / len(subsets) / max(seconds * runs / trained, 1e-9)),
        "affinity": compare_affinities(est_matrix, true_matrix),
        "scores": compare_results(est, truth, metric=metric),
        "metric": metric,
    }
    if group_labels is not None or planted is not None:
        info["truth_groups"] = truth_groups(truth, names, metric, group_labels, planted)
    # both sides are noisy: with repeats on both, judge the estimate against the ceiling
    if len(per_seed) > 1:
        info["truth_self_agreement"] = self_agreement([build(t, "fine-tuned") for t in per_seed])
    if len(est_members) > 1:
        info["estimate_self_agreement"] = self_agreement(est_members)
    if len(per_seed) > 1 and len(est_members) > 1:
        info["corrected_spearman"] = corrected_spearman(
            info["affinity"]["spearman"],
            info["truth_self_agreement"]["reliability"],
            info["estimate_self_agreement"]["reliability"],
        )
    return joined, info
