"""``--ground_truth_exhaustive K`` in the job: every subset of K tasks fine-tuned for real
(notes B.1, ``--preload_combos``), and the estimate's grouping compared with an exhaustive
search over partitions on that truth, as approximate clustering for multi-instruction tuning
judges its SDP grouping.

:func:`check_exhaustive` refuses, before any training, a C(n, K) above
``--max_exhaustive_subsets``; :func:`run_exhaustive_truth` trains (resumably, under
``<output_dir>/exhaustive_truth``) and compares.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError

if TYPE_CHECKING:
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.pipeline.arguments import EstimationArguments, GroupingArguments
    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

OUTPUT = "exhaustive_truth"
#: Best partitions by fine-tuned subsets kept in ``results.json``.
TOP_PARTITIONS = 5
#: Partitions into fine-tuned subsets ranked at most (their count is known in closed form).
MAX_SCORED_PARTITIONS = 1_000_000


def check_exhaustive(grouping_args: GroupingArguments, num_tasks: int) -> int:
    """The number of subsets ``--ground_truth_exhaustive`` fine-tunes (0 when off); raises
    naming C(n, K), the runs it means and the flag that allows it when it is too many."""
    k = grouping_args.ground_truth_exhaustive
    if not k:
        return 0
    if not 2 <= k <= num_tasks:
        raise TaeError(f"--ground_truth_exhaustive {k}: use 2 to the {num_tasks} tasks (subsets "
                       "of one task observe no pair).")  # fmt: skip
    count = math.comb(num_tasks, k)
    if count > grouping_args.max_exhaustive_subsets:
        runs = count * len(grouping_args.ground_truth_seeds)
        raise TaeError(
            f"--ground_truth_exhaustive {k} fine-tunes all C({num_tasks}, {k}) = {count} subsets "
            f"({runs} runs with {len(grouping_args.ground_truth_seeds)} seed(s)), more than "
            f"--max_exhaustive_subsets {grouping_args.max_exhaustive_subsets}; raise "
            f"--max_exhaustive_subsets to {count} if you mean it, or use --ground_truth N to "
            "fine-tune a sample."
        )
    return count


def run_exhaustive_truth(
    model_init,
    tasks: TaskSet,
    affinity: AffinityMatrix,
    grouping: dict[str, Any],
    est_args: EstimationArguments,
    grouping_args: GroupingArguments,
    training_args: MultitaskTrainingArguments,
    output_dir: Path,
    trainer_class: type | None = None,
) -> dict[str, Any]:
    """Fine-tune all C(n, K) subsets (each with ``--ground_truth_seeds``), build the true
    affinity as the estimate is built (z-scored ``--affinity_metric``, symmetrized, zero
    diagonal) and compare: the entries; per k, the exhaustive optimum of the true affinity
    against the SDP on the truth and on the estimate (n ≤ 10); the job's chosen grouping on the
    truth; and the partitions whose groups are all fine-tuned subsets, ranked by their real
    metric."""
    from sklearn.metrics import adjusted_rand_score

    from hf_tae.clustering import exhaustive_cluster, partition_objective
    from hf_tae.clustering.baselines import MAX_EXHAUSTIVE_N
    from hf_tae.estimation.affinity import AffinityMatrix
    from hf_tae.estimation.compare import compare_affinities
    from hf_tae.evaluation.exhaustive import (
        compare_with_exhaustive,
        count_equal_partitions,
        exhaustive_subsets,
        score_partitions,
    )
    from hf_tae.evaluation.ground_truth import SubsetFineTuner, average_seeds
    from hf_tae.pipeline.stages import run_arguments

    n, k_size = tasks.num_tasks, grouping_args.ground_truth_exhaustive
    check_exhaustive(grouping_args, n)
    subsets = exhaustive_subsets(n, k_size)
    metric, names = est_args.affinity_metric, tasks.task_names
    start = time.perf_counter()
    truth = SubsetFineTuner(
        model_init, tasks, run_arguments(training_args, grouping_args.run_steps),
        output_dir / OUTPUT, seeds=grouping_args.ground_truth_seeds, trainer_class=trainer_class,
    ).run(subsets, split=est_args.scoring_split, show_progress=not training_args.disable_tqdm)  # fmt: skip
    seconds = time.perf_counter() - start
    truth = average_seeds(truth)
    true = AffinityMatrix.from_results(truth, names, metric=metric, symmetrize=True,
                                       zero_diagonal=True, kind="fine-tuned")  # fmt: skip
    true.save(output_dir / OUTPUT / "affinity", overwrite=True)
    T, E = true.to_numpy(), np.nan_to_num(affinity.to_numpy(), nan=0.0)
    chosen = np.asarray(grouping["labels"])
    k = len(set(chosen.tolist()))
    info: dict[str, Any] = {
        "subset_size": k_size,
        "num_subsets": len(subsets),
        "seeds": len(grouping_args.ground_truth_seeds),
        "seconds": seconds,
        "metric": metric,
        "affinity": compare_affinities(affinity, true),
        "chosen": {"k": k, "true_objective": partition_objective(T, chosen)},
        "by_k": None,
        "note": None,
    }
    if n <= MAX_EXHAUSTIVE_N:
        ks = range(2, min(grouping_args.max_task_groups, n - 1) + 1)
        table = compare_with_exhaustive(T, E, ks)
        info["by_k"] = table.to_dict(orient="records")
        if 1 < k < n:  # where the chosen grouping stands against the truth's optimum at its k
            best = exhaustive_cluster(T, k)
            info["chosen"] |= {"exhaustive_objective": best.objective,
                               "ari_vs_exhaustive": float(adjusted_rand_score(best.labels, chosen))}  # fmt: skip
    else:
        info["note"] = f"n = {n} > {MAX_EXHAUSTIVE_N}: no brute force over partitions"
    count = count_equal_partitions(n, k_size)
    if count > MAX_SCORED_PARTITIONS:  # e.g. 2 million pairings of 16 tasks: skip, say so
        info["partitions"] = {"scorable": count, "top": [], "note": (
            f"{count} partitions of the {n} tasks into fine-tuned subsets of {k_size}: more "
            f"than {MAX_SCORED_PARTITIONS} to rank, so none are ranked")}  # fmt: skip
        return info
    ranked = score_partitions(truth, n, metric, max_partitions=MAX_SCORED_PARTITIONS)
    info["partitions"] = {
        "scorable": len(ranked),
        "top": [
            {"groups": [[names[t] for t in g] for g in row.groups], "score": row.score}
            for row in ranked.head(TOP_PARTITIONS).itertuples()
        ],
    }
    mine = sorted(tuple(sorted(int(t) for t in np.flatnonzero(chosen == g))) for g in set(chosen))
    hits = [i for i, groups in enumerate(ranked["groups"]) if sorted(groups) == mine]
    if hits:  # the chosen grouping was itself made of fine-tuned subsets
        info["chosen"] |= {"rank": hits[0] + 1, "score": float(ranked["score"].iloc[hits[0]])}
    return info
