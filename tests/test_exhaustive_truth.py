"""Exhaustive truth for few tasks (notes B.1, ``--preload_combos``): all C(n, k) subsets, the
guard on their count, partitions searched by brute force on the true affinity and on the
fine-tuned subsets, and ``--ground_truth_exhaustive`` in the job. References are independent:
itertools, and a recursive set-partition enumerator written here."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_tae import TaeError
from hf_tae.evaluation.exhaustive import (
    compare_with_exhaustive,
    count_equal_partitions,
    exhaustive_subsets,
    score_partitions,
)
from hf_tae.pipeline.arguments import GroupingArguments
from hf_tae.pipeline.exhaustive import check_exhaustive

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "instructions.py"


def set_partitions(items):
    """Every set partition of ``items`` (Bell(n) of them): the first item joins a block of a
    partition of the rest, or opens its own."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for p in set_partitions(rest):
        yield [[first], *p]
        for i in range(len(p)):
            yield [*p[:i], [first, *p[i]], *p[i + 1 :]]


def density(T, groups):
    return sum(T[np.ix_(g, g)].sum() / len(g) for g in groups)


def as_partition(labels):
    return frozenset(frozenset(np.flatnonzero(np.asarray(labels) == g)) for g in set(labels))


def test_set_partition_reference_counts_bell_numbers():
    assert [sum(1 for _ in set_partitions(list(range(n)))) for n in range(1, 7)] == [
        1, 2, 5, 15, 52, 203,
    ]  # fmt: skip


@pytest.mark.parametrize("n", [1, 2, 4, 6, 7, 8])
def test_count_equal_partitions_matches_brute_force(n):
    for size in range(1, n + 1):
        brute = sum(all(len(b) == size for b in p) for p in set_partitions(list(range(n))))
        assert count_equal_partitions(n, size) == brute, (n, size)
    assert count_equal_partitions(16, 2) == math.prod(range(1, 16, 2))  # 15!! pairings


@pytest.mark.parametrize(("n", "k"), [(1, 1), (5, 2), (6, 3), (8, 4), (7, 7)])
def test_exhaustive_subsets_are_every_combination_once(n, k):
    subsets = exhaustive_subsets(n, k)
    assert subsets == list(itertools.combinations(range(n), k))
    assert len(subsets) == len(set(subsets)) == math.comb(n, k)


def test_the_guard_names_the_count_and_the_flag():
    with pytest.raises(TaeError, match=r"C\(12, 3\) = 220 .*--max_exhaustive_subsets 100"):
        exhaustive_subsets(12, 3, max_subsets=100, option="--max_exhaustive_subsets")
    args = GroupingArguments(ground_truth_exhaustive=3, max_exhaustive_subsets=100)
    with pytest.raises(TaeError) as err:
        check_exhaustive(args, 12)
    message = str(err.value)
    assert "C(12, 3) = 220 subsets" in message and "440 runs with 2 seed(s)" in message
    assert "--max_exhaustive_subsets 100" in message and "to 220" in message
    assert check_exhaustive(GroupingArguments(ground_truth_exhaustive=3,
                                              max_exhaustive_subsets=220), 12) == 220  # fmt: skip
    assert check_exhaustive(GroupingArguments(), 12) == 0
    for k in (1, 5):
        with pytest.raises(TaeError, match=f"--ground_truth_exhaustive {k}: use 2 to the 4 tasks"):
            check_exhaustive(GroupingArguments(ground_truth_exhaustive=k), 4)


def hand_affinity():
    """Six tasks: {0, 1, 2} and {3, 4} help each other, 5 helps 3 a little and hurts the rest;
    asymmetric noise-free values written by hand, then symmetrized."""
    T = np.full((6, 6), -0.5)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        T[a, b] = T[b, a] = 1.0
    T[3, 4] = T[4, 3] = 1.2
    T[3, 5] = T[5, 3] = 0.3
    T[1, 2] = T[2, 1] = 0.4
    T[4, 5] = T[5, 4] = -0.2
    np.fill_diagonal(T, 0.0)
    return T


def test_compare_with_exhaustive_finds_the_brute_force_optimum_for_every_k():
    T = hand_affinity()
    rng = np.random.default_rng(0)
    estimate = T + 0.8 * rng.standard_normal(T.shape)
    estimate = (estimate + estimate.T) / 2
    table = compare_with_exhaustive(T, estimate, ks=[2, 3, 4])
    every = list(set_partitions(list(range(6))))
    for row in table.itertuples():
        candidates = [p for p in every if len(p) == row.k]
        best = max(density(T, p) for p in candidates)
        assert row.exhaustive_objective == pytest.approx(best)
        argbest = [frozenset(map(frozenset, p)) for p in candidates
                   if density(T, p) == pytest.approx(best)]  # fmt: skip
        assert as_partition(row.exhaustive_labels) in argbest
        for name in ("sdp_true", "sdp_estimate"):
            labels = getattr(row, f"{name}_labels")
            assert getattr(row, f"{name}_objective") == pytest.approx(
                density(T, [list(g) for g in as_partition(labels)])
            )
            assert getattr(row, f"{name}_objective") <= best + 1e-9
    # the planted optimum at k = 2 and k = 3, and the SDP finds it on the truth
    k3 = table.set_index("k").loc[3]
    assert as_partition(k3.exhaustive_labels) == frozenset(map(frozenset, [[0, 1, 2], [3, 4], [5]]))
    assert k3.sdp_true_ari == pytest.approx(1.0)


def truth_table(n, sizes, seed=0):
    """A synthetic fine-tuned results table: every subset of the given sizes, one loss per
    member task (repeated rows per seed, as before averaging)."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        for subset in itertools.combinations(range(n), size):
            for task in subset:
                for _ in range(2):  # two seeds
                    rows.append({"subset": list(subset), "task": task,
                                 "log_loss": float(rng.uniform(0.1, 2.0))})  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize("sizes", [(2,), (3,), (1, 2, 3), (2, 3)])
def test_score_partitions_matches_brute_force_over_all_set_partitions(sizes):
    n = 6
    table = truth_table(n, sizes)
    mean = (
        table.assign(subset=table["subset"].map(tuple))
        .groupby(["subset", "task"])["log_loss"]
        .mean()
    )
    reference = {}
    for p in set_partitions(list(range(n))):
        groups = [tuple(sorted(g)) for g in p]
        if all(len(g) in sizes for g in groups):
            reference[frozenset(groups)] = np.mean([mean[(g, t)] for g in groups for t in g])
    ranked = score_partitions(table, n, "log_loss")
    assert len(ranked) == len(reference)
    got = {frozenset(map(tuple, r.groups)): r.score for r in ranked.itertuples()}
    assert got.keys() == reference.keys()
    for key, score in reference.items():
        assert got[key] == pytest.approx(score)
    assert list(ranked["score"]) == sorted(ranked["score"])  # a loss: lowest first
    assert ranked["score"].iloc[0] == pytest.approx(min(reference.values()))
    accuracy = table.rename(columns={"log_loss": "accuracy"})
    assert score_partitions(accuracy, n, "accuracy")["score"].iloc[0] == pytest.approx(
        max(reference.values())
    )


def test_score_partitions_without_a_cover_is_empty_and_needs_its_columns():
    table = truth_table(5, (2,))  # five tasks cannot be split into pairs
    assert score_partitions(table, 5, "log_loss").empty
    with pytest.raises(TaeError, match=r"lacks columns \['accuracy'\]"):
        score_partitions(table, 5, "accuracy")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


SMALL = ["--skills", "max", "zero", "--train_per_template", "8", "--eval_per_template", "4",
         "--d_model", "32", "--d_ff", "64", "--num_heads", "2", "--lora_r", "2",
         "--max_steps", "6", "--eval_steps", "4", "--projection_dim", "16",
         "--compare_single_tasks", "false", "--disable_tqdm", "true"]  # fmt: skip


def test_cli_refuses_too_many_exhaustive_subsets_before_training(tmp_path):
    # the text default's 12 templates: C(12, 3) = 220 subsets
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(tmp_path / "run"),
           "--ground_truth_exhaustive", "3", "--disable_tqdm", "true",
           "--base_model_dir", str(tmp_path / "base")]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "C(12, 3) = 220 subsets" in proc.stderr and "--max_exhaustive_subsets" in proc.stderr
    assert not (tmp_path / "run" / "meta_init").exists()


def test_help_describes_the_new_flags():
    cli = Path(sys.executable).with_name("hf-tae")
    proc = subprocess.run([str(cli), "run", "instructions", "--help"], env=_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    for flag in ("--sampling", "--initial_clusters", "--adaptive_rounds",
                 "--ground_truth_exhaustive", "--max_exhaustive_subsets"):  # fmt: skip
        assert flag in text, flag
    assert "one current cluster plus the round's new tasks" in text
    assert "all C(n, k) of them" in text


def test_job_fine_tunes_every_pair_and_compares_with_exhaustive_search(tmp_path):
    from hf_tae import AffinityMatrix

    out = tmp_path / "run"
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(out), *SMALL,
           "--base_model_dir", str(tmp_path / "base"), "--num_meta_inits", "1",
           "--estimator_l2", "100", "--num_subsets", "20", "--max_task_groups", "3",
           "--train_groups", "false", "--ground_truth_exhaustive", "2",
           "--ground_truth_seeds", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    truth = results["exhaustive_truth"]
    names = results["tasks"]
    assert truth["num_subsets"] == math.comb(6, 2) == 15
    true = AffinityMatrix.load(out / "exhaustive_truth" / "affinity")
    fine_tuned = {tuple(s) for s in true.results["subset"]}
    assert fine_tuned == set(itertools.combinations(range(6), 2))
    # per k, the exhaustive optimum of the saved true affinity, by the brute force above
    T = np.nan_to_num(true.values)
    every = list(set_partitions(list(range(6))))
    for row in truth["by_k"]:
        best = max(density(T, p) for p in every if len(p) == row["k"])
        assert row["exhaustive_objective"] == pytest.approx(best)
    # the best partition into fine-tuned pairs, from the saved runs by hand
    loss = {}
    for line in (out / "exhaustive_truth" / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["split"] == "validation":
            for row in record["rows"]:
                loss[(tuple(record["subset"]), row["task"])] = row["log_loss"]
    scores = {}
    for p in every:
        if all(len(g) == 2 for g in p):
            groups = [tuple(sorted(g)) for g in p]
            scores[frozenset(groups)] = np.mean([loss[(g, t)] for g in groups for t in g])
    assert truth["partitions"]["scorable"] == len(scores) == 15  # matchings of 6: 5 × 3 × 1
    best = min(scores, key=scores.get)
    top = truth["partitions"]["top"][0]
    assert top["score"] == pytest.approx(scores[best])
    assert {tuple(sorted(names.index(t) for t in g)) for g in top["groups"]} == set(best)
    report = (out / "report.md").read_text()
    assert "## Exhaustive truth" in report and "All 15 subsets of 2 tasks fine-tuned" in report
    assert "exhaustive truth" in results["timings"]
