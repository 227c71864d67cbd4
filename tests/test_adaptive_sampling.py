"""Adaptive sampling (notes B.1): subsets from one current cluster plus the new tasks, the
sample–estimate–re-cluster loop, pair coverage, the clusters file, and ``--sampling adaptive``
in the job. References are computed independently (brute-force pair counts, itertools)."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hf_tae import TaeError
from hf_tae.estimation.adaptive import (
    adaptive_sampling,
    density_recluster,
    pair_coverage,
    read_clusters,
    sample_round,
)

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "instructions.py"


def brute_force_coverage(subsets, n):
    """Pairs i < j counted one by one: does any subset hold both?"""
    hit = sum(
        1 for i in range(n) for j in range(i + 1, n) if any(i in s and j in s for s in subsets)
    )
    return hit / (n * (n - 1) / 2)


def from_one_pool(subset, clusters, new):
    """Whether ``subset`` lies within one cluster ∪ the new tasks."""
    pools = [set(c) | set(new) for c in clusters] or [set(new)]
    return any(set(subset) <= p for p in pools)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_subset_comes_from_one_cluster_plus_the_new_tasks(seed):
    clusters, new = [[0, 1, 2], [3, 4], [5, 6, 7]], [8, 9]
    subsets = sample_round(clusters, new, 20, 3, random.Random(seed))
    assert len(subsets) == 20 and len(set(subsets)) == 20
    for s in subsets:
        assert len(s) == 3 and list(s) == sorted(s)
        assert from_one_pool(s, clusters, new), s
        # never two tasks of different clusters together
        owners = {k for k, c in enumerate(clusters) for t in s if t in c}
        assert len(owners) <= 1, s
    # every cluster gets drawn
    for c in clusters:
        assert any(set(s) & set(c) for s in subsets)
    # asked for more than exist: every distinct subset of a pool, once (itertools reference)
    every = {x for c in clusters for x in itertools.combinations(sorted(c + new), 3)}
    assert len(every) == 24
    assert sorted(sample_round(clusters, new, 40, 3, random.Random(seed))) == sorted(every)


def test_exhausted_pools_give_every_distinct_subset_once():
    clusters, new = [[0], [1, 2]], [3]
    # pools {0, 3} (one pair: size capped at 2) and {1, 2, 3} (C(3, 3) = 1 subset)
    reference = {(0, 3), (1, 2, 3)}
    subsets = sample_round(clusters, new, 10, 3, random.Random(0))
    assert sorted(subsets) == sorted(reference)
    again = sample_round(clusters, new, 10, 3, random.Random(0), exclude=[(0, 3)])
    assert again == [(1, 2, 3)]


def test_without_clusters_the_new_tasks_are_sampled_alone():
    subsets = sample_round([], [2, 4, 6, 8], 100, 2, random.Random(0))
    assert sorted(subsets) == list(itertools.combinations([2, 4, 6, 8], 2))


def test_sample_round_rejects_a_new_task_that_is_in_a_cluster():
    with pytest.raises(TaeError, match=r"new tasks \[1\] are already in a cluster"):
        sample_round([[0, 1]], [1, 2], 3, 2, random.Random(0))


def test_pair_coverage_matches_a_brute_force_pair_count():
    rng = random.Random(3)
    for n in (2, 5, 9):
        for _ in range(5):
            subsets = [
                tuple(rng.sample(range(n), rng.randint(1, min(4, n))))
                for _ in range(rng.randint(0, 6))
            ]
            assert pair_coverage(subsets, n) == pytest.approx(brute_force_coverage(subsets, n))


BLOCKS = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


def planted_estimate(calls):
    """A synthetic results table: task i in S scores +1 per same-block partner, −1 per other
    partner (higher is better), plus noise; two 'members' as the pipeline's stores give."""
    rng = np.random.default_rng(0)

    def estimate(subsets):
        calls.append(list(subsets))
        rows = []
        for member in (0, 1):
            for sid, s in enumerate(subsets):
                for i in s:
                    v = sum(1.0 if BLOCKS[i] == BLOCKS[j] else -1.0 for j in s if j != i)
                    rows.append({"subset_id": sid, "subset": list(s), "task": i, "member": member,
                                 "accuracy": v + 0.05 * rng.standard_normal()})  # fmt: skip
        return pd.DataFrame(rows)

    return estimate


def test_the_loop_recovers_planted_blocks_and_draws_each_round_from_its_clusters():
    calls = []
    initial = [[0, 1], [4, 5], [8, 9]]
    result = adaptive_sampling(
        12, planted_estimate(calls), rounds=3, num_subsets=90, size=3, metric="accuracy",
        initial_clusters=initial, recluster=density_recluster(num_groups=3), seed=0,
        show_progress=False,
    )  # fmt: skip
    truth = {frozenset(t for t in range(12) if BLOCKS[t] == b) for b in range(3)}
    assert {frozenset(c) for c in result.clusters} == truth
    assert len(result.rounds) == 3 == len(calls)
    # the new tasks: those in no initial cluster, each brought in exactly once
    brought = [t for r in result.rounds for t in r.new_tasks]
    assert sorted(brought) == [2, 3, 6, 7, 10, 11]
    before, start = initial, 0
    for r, drawn in zip(result.rounds, calls, strict=True):
        assert drawn == result.subsets[start : start + r.num_subsets]
        for s in drawn:
            assert from_one_pool(s, before, r.new_tasks), (r.round, s)
        start += r.num_subsets
        assert r.coverage == pytest.approx(brute_force_coverage(result.subsets[:start], 12))
        before = r.clusters
    assert len(set(result.subsets)) == len(result.subsets)  # never the same subset twice
    # results rows point at their subset in the global list
    for sid, subset in zip(result.results["subset_id"], result.results["subset"], strict=True):
        assert tuple(subset) == result.subsets[sid]
    # pairs of two initial clusters are never observed together
    assert not any({0, 4} <= set(s) or {1, 9} <= set(s) for s in result.subsets)
    assert result.rounds[-1].coverage < 1.0


def test_the_loop_without_initial_clusters_starts_from_its_first_batch():
    calls = []
    result = adaptive_sampling(
        12, planted_estimate(calls), rounds=2, num_subsets=80, size=3, metric="accuracy",
        recluster=density_recluster(num_groups=3), seed=1, show_progress=False,
    )  # fmt: skip
    first = result.rounds[0]
    assert all(set(s) <= set(first.new_tasks) for s in calls[0])
    truth = {frozenset(t for t in range(12) if BLOCKS[t] == b) for b in range(3)}
    assert {frozenset(c) for c in result.clusters} == truth


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_clusters": [list(range(6))]}, "every task is already in an initial cluster"),
        ({"initial_clusters": [[0, 1, 2, 3]], "rounds": 3}, r"rounds=3 for 2 new tasks.*1 to 2"),
        ({"initial_clusters": [[0, 9]]}, r"task ids \[9\] out of range"),
        ({"rounds": 4}, r"rounds=4 for 6 new tasks.*1 to 3 rounds"),
    ],
)
def test_the_loop_rejects_bad_inputs(kwargs, message):
    args = {"rounds": 1, "num_subsets": 4, "size": 2, "metric": "accuracy", **kwargs}
    with pytest.raises(TaeError, match=message):
        adaptive_sampling(6, lambda s: pd.DataFrame(), **args)


def test_read_clusters_from_a_text_file_and_a_groups_json(tmp_path):
    names = ["a", "b", "c", "d", "e"]
    text = tmp_path / "clusters.txt"
    text.write_text("# current clusters\na b\n\nc, d  # second\n")
    assert read_clusters(text, names) == [["a", "b"], ["c", "d"]]
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"k": 2, "groups": [["e"], ["a", "c"]], "labels": [1, 0]}))
    assert read_clusters(groups, names) == [["e"], ["a", "c"]]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps([["b", "d"]]))
    assert read_clusters(bare, names) == [["b", "d"]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a b\nc zebra\n", r"unknown tasks \['zebra'\]; the tasks are \['a', 'b', 'c'\]"),
        ("a b\nb c\n", r"puts tasks \['b'\] in more than one cluster"),
        ("# nothing\n\n", "names no clusters"),
    ],
)
def test_read_clusters_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "clusters.txt"
    path.write_text(content)
    with pytest.raises(TaeError, match=message):
        read_clusters(path, ["a", "b", "c"])
    with pytest.raises(TaeError, match="does not exist"):
        read_clusters(tmp_path / "missing.txt", ["a"])


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


SMALL = ["--skills", "max", "zero", "--train_per_template", "8", "--eval_per_template", "4",
         "--d_model", "32", "--d_ff", "64", "--num_heads", "2", "--lora_r", "2",
         "--max_steps", "6", "--eval_steps", "4", "--projection_dim", "16",
         "--compare_single_tasks", "false", "--disable_tqdm", "true"]  # fmt: skip


def test_cli_names_an_unknown_task_of_the_clusters_file_before_training(tmp_path):
    clusters = tmp_path / "clusters.txt"
    clusters.write_text("max_0 max_1\nzero_9\n")
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(tmp_path / "run"), *SMALL,
           "--base_model_dir", str(tmp_path / "base"), "--sampling", "adaptive",
           "--initial_clusters", str(clusters)]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown tasks ['zero_9']" in proc.stderr
    assert not (tmp_path / "run" / "meta_init").exists()  # refused before any training


def test_job_with_adaptive_sampling_reports_coverage_per_round(tmp_path):
    clusters = tmp_path / "clusters.txt"
    clusters.write_text("max_0 max_1\nzero_0\n")
    out = tmp_path / "run"
    cmd = [sys.executable, str(RECIPE), "--output_dir", str(out), *SMALL,
           "--base_model_dir", str(tmp_path / "base"), "--num_meta_inits", "2",
           "--estimator_l2", "100", "--num_subsets", "12", "--max_task_groups", "3",
           "--train_groups", "false", "--sampling", "adaptive",
           "--initial_clusters", str(clusters), "--adaptive_rounds", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    names = results["tasks"]
    est = results["estimation"]
    adaptive = est["adaptive"]
    assert est["sampling"] == "adaptive" and adaptive["initial_clusters"] == [
        ["max_0", "max_1"],
        ["zero_0"],
    ]
    new = sorted(t for r in adaptive["rounds"] for t in r["new_tasks"])
    assert new == ["max_2", "zero_1", "zero_2"] and len(adaptive["rounds"]) == 2
    # the saved estimates: every subset from one cluster (as of its round) plus the round's new tasks
    from hf_tae import AffinityMatrix

    table = AffinityMatrix.load(out / "affinity").results
    first = table.drop_duplicates("subset_id").sort_values("subset_id")
    subsets = [tuple(s) for s in first["subset"]]
    assert len(subsets) == est["num_subsets"] == sum(r["num_subsets"] for r in adaptive["rounds"])
    before, start = adaptive["initial_clusters"], 0
    for r in adaptive["rounds"]:
        drawn = subsets[start : start + r["num_subsets"]]
        for s in drawn:
            assert from_one_pool({names[t] for t in s}, before, r["new_tasks"]), s
        start += r["num_subsets"]
        assert r["coverage"] == pytest.approx(brute_force_coverage(subsets[:start], len(names)))
        before = r["clusters"]
    assert est["pair_coverage"] == pytest.approx(brute_force_coverage(subsets, len(names)))
    report = (out / "report.md").read_text()
    assert "Sampling: adaptive" in report and "| round | new tasks |" in report
    assert f"{100 * est['pair_coverage']:.1f}%" in report


def test_job_options_are_checked_before_training(tmp_path):
    from hf_tae.pipeline.adaptive import check_sampling
    from hf_tae.pipeline.arguments import EstimationArguments, GroupingArguments, check_arguments

    grouping = GroupingArguments()
    for est, message in [
        (EstimationArguments(sampling="random"), r"--sampling 'random' is not one of"),
        (EstimationArguments(initial_clusters="c.txt"), "--initial_clusters is read by"),
        (EstimationArguments(sampling="adaptive", adaptive_rounds=0), "--adaptive_rounds must"),
    ]:
        with pytest.raises(TaeError, match=message):
            check_arguments(est, grouping)
    names = ["a", "b", "c", "d", "e"]
    path = tmp_path / "clusters.txt"
    path.write_text("a b\nc\n")
    est = EstimationArguments(sampling="adaptive", initial_clusters=str(path), adaptive_rounds=2)
    assert check_sampling(est, names) == [[0, 1], [2]]
    with pytest.raises(TaeError, match=r"--adaptive_rounds 3: 2 new tasks fill 1 to 2 rounds"):
        check_sampling(EstimationArguments(sampling="adaptive", initial_clusters=str(path),
                                           adaptive_rounds=3), names)  # fmt: skip
    path.write_text("a b c\nd e\n")
    with pytest.raises(TaeError, match="puts every task in a cluster"):
        check_sampling(est, names)
    assert check_sampling(EstimationArguments(), names) == []  # uniform: nothing to read
