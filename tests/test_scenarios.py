"""benchmarks/scenarios.py: every scenario builder plants what its docstring says (fast, no
training), the SNAP files it writes parse with hf_tae's own reader, and the table's per-seed
numbers and verdicts come out right on a hand-made run folder."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scenarios.py"


@pytest.fixture(scope="module")
def scen():
    spec = importlib.util.spec_from_file_location("benchmark_scenarios", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


def _jaccard(a, b) -> float:
    a, b = set(map(int, a)), set(map(int, b))
    return len(a & b) / len(a | b)


def _within_cross(cons):
    groups = cons.groups
    within, cross = [], []
    for i, j in itertools.combinations(range(len(cons.communities)), 2):
        jac = _jaccard(cons.communities[i], cons.communities[j])
        (within if groups[i] == groups[j] else cross).append(jac)
    return np.array(within), np.array(cross)


def _check_common(cons):
    n = len(cons.communities)
    assert len(cons.task_names) == len(set(cons.task_names)) == n
    assert cons.groups is None or len(cons.groups) == n
    for members in cons.communities:
        assert len(members) >= 20 and members.min() >= 0 and members.max() < cons.num_nodes
    assert cons.edges.shape[0] == 2 and (cons.edges[0] < cons.edges[1]).all()  # sorted, no loops
    if cons.x is not None:
        assert cons.x.shape[0] == cons.num_nodes and np.isfinite(cons.x).all()


def test_registry_and_docstrings(scen):
    assert list(scen.SCENARIOS) == [
        "default", "harder", "unequal", "interfere", "weak", "none", "heavy", "many",
    ]  # fmt: skip
    for name, build in scen.SCENARIOS.items():
        doc = build.__doc__ or ""
        assert "lanted" in doc and "answer" in doc, name  # what is planted, what is right


@pytest.mark.parametrize("name", ["unequal", "interfere", "weak", "none", "heavy", "many"])
def test_constructions_are_seeded(scen, name):
    make = getattr(scen, f"make_{name}")
    a, b, c = make(0), make(0), make(1)
    _check_common(a)
    assert all(np.array_equal(x, y) for x, y in zip(a.communities, b.communities, strict=True))
    assert np.array_equal(a.edges, b.edges)
    assert not all(np.array_equal(x, y) for x, y in zip(a.communities, c.communities, strict=True))


def test_unequal_families_and_lone_tasks(scen):
    cons = scen.make_unequal(0)
    sizes = np.bincount(cons.groups)
    assert sorted(sizes[:4].tolist(), reverse=True) == [6, 4, 3, 2] and (sizes[4:] == 1).all()
    assert len(sizes) == 9  # 4 families + 5 lone tasks
    within, cross = _within_cross(cons)
    assert within.min() > 0.4 and cross.max() < 0.1 and within.mean() > 10 * cross.mean()
    lone = [i for i, g in enumerate(cons.groups) if sizes[g] == 1]
    for i in lone:  # a lone task shares no member with any other community
        others = np.concatenate([c for j, c in enumerate(cons.communities) if j != i])
        assert not np.isin(cons.communities[i], others).any()
    # one signature per family (lone tasks: their own)
    for i, j in itertools.combinations(range(len(cons.groups)), 2):
        same = np.allclose(cons.signatures[i], cons.signatures[j])
        assert same == (cons.groups[i] == cons.groups[j])
    assert "--max_task_groups" in cons.job_args  # planted k = 9 > the sweep's default 8


def test_interfere_labels_conflict(scen):
    cons = scen.make_interfere(0)
    assert cons.groups is None and cons.expected == "single"
    comms = cons.communities
    for i, j in itertools.combinations(range(len(comms)), 2):  # no shared positive anywhere
        assert not np.intersect1d(comms[i], comms[j]).size
    edges = {tuple(e) for e in cons.edges.T.tolist()}
    for a, b in zip(comms[::2], comms[1::2], strict=True):
        block = np.union1d(a, b)
        # on the pair's block the two labels are exact opposites
        label_a, label_b = np.isin(block, a), np.isin(block, b)
        assert (label_a ^ label_b).all() and np.corrcoef(label_a, label_b)[0, 1] == pytest.approx(
            -1
        )
        # ... while the graph wires the block as one: about half its edges cross the halves
        inside = [(u, v) for u, v in itertools.combinations(block.tolist(), 2) if (u, v) in edges]
        crossing = np.mean([np.isin(u, a) != np.isin(v, a) for u, v in inside])
        assert 0.35 < crossing < 0.65
    sig = cons.signatures
    for k in range(0, len(comms), 2):  # opposite signatures within a pair
        assert np.allclose(sig[k + 1], -sig[k])
        # each task's members carry its signature; its partner's members carry the opposite
        own = cons.x[comms[k]] @ sig[k]
        partner = cons.x[comms[k + 1]] @ sig[k]
        assert own.mean() > 0 > partner.mean()
    unit = sig[::2] / np.linalg.norm(sig[::2], axis=1, keepdims=True)  # pairs: unrelated
    off = unit @ unit.T - np.eye(len(unit))
    assert np.abs(off).max() < 0.7


def test_weak_overlap_is_weaker(scen):
    weak, unequal = scen.make_weak(0), scen.make_unequal(0)
    within, cross = _within_cross(weak)
    assert 0.15 < within.mean() < 0.35 and cross.max() == 0
    assert within.mean() < _within_cross(unequal)[0].mean() - 0.25
    assert np.bincount(weak.groups).tolist() == [4, 4, 4, 4]


def test_no_structure_overlaps_at_chance(scen):
    cons = scen.make_none(0)
    assert cons.groups is None
    n_nodes, sizes = cons.num_nodes, [len(c) for c in cons.communities]
    shared = np.array(
        [np.intersect1d(a, b).size for a, b in itertools.combinations(cons.communities, 2)]
    )
    expected = np.mean([a * b / n_nodes for a, b in itertools.combinations(sizes, 2)])
    assert abs(shared.mean() - expected) < 0.25 * expected
    assert shared.max() < 4 * expected  # no pair stands out
    # the communities are independent draws: no block structure in the overlap matrix
    assert np.std(shared) < 2 * np.sqrt(expected)


def test_heavy_tailed_mix(scen):
    cons = scen.make_heavy(0)
    assert cons.x is None  # the job sees the SNAP loader's spectral features
    assert sorted(np.bincount(cons.groups).tolist(), reverse=True) == list(scen.HEAVY_FAMILIES)
    sizes = np.array([len(c) for c in cons.communities])
    assert sizes.max() >= 4 * sizes.min()  # community sizes spread widely
    union = np.unique(np.concatenate(cons.communities))
    degree = np.bincount(cons.edges.ravel(), minlength=cons.num_nodes)[union]
    assert degree.max() >= 5 * degree.mean()  # hubs: heavy-tailed degrees
    within, cross = _within_cross(cons)
    assert within.mean() > 10 * cross.mean()
    assert (cross > 0).any()  # hub nodes shared across families


def test_many_tasks(scen):
    cons = scen.make_many(0)
    assert len(cons.communities) == 50 and np.bincount(cons.groups).tolist() == [5] * 10
    within, cross = _within_cross(cons)
    assert within.mean() > 0.3 and cross.max() == 0
    assert cons.num_nodes <= 500  # small graph: 50 single-task runs × 2 seeds stay cheap


def test_snap_files_parse_with_hf_tae(scen, tmp_path):
    from hf_tae.families.graph.snap import (
        load_snap_communities,
        read_snap_communities,
        read_snap_edges,
    )

    cons = scen.make_unequal(0)
    scen.write_snap(tmp_path, cons.name, cons.edges, cons.communities)
    read = read_snap_communities(tmp_path / f"com-{cons.name}.top5000.cmty.txt")
    assert len(read) == len(cons.communities)
    assert all(np.array_equal(a, np.sort(b)) for a, b in zip(read, cons.communities, strict=True))
    assert np.array_equal(read_snap_edges(tmp_path / f"com-{cons.name}.ungraph.txt"), cons.edges)
    union = np.unique(np.concatenate(cons.communities))
    graph = load_snap_communities(
        tmp_path, cons.name, num_communities=len(read), node_features=cons.x[union]
    )
    line = graph.info["community_line"]
    for t, i in enumerate(line):
        assert set(graph.node_ids[graph.labels[:, t] == 1].tolist()) == set(
            cons.communities[i].tolist()
        )


def test_materialize_keeps_names_groups_and_features(scen, tmp_path):
    from hf_tae.families.graph.data import CommunityGraph

    cons = scen.make_weak(0)
    built = scen.materialize(cons, tmp_path)
    assert (built.snap_dir / "com-weak.ungraph.txt").is_file()
    graph = CommunityGraph.load(built.dataset)
    assert graph.task_names == cons.task_names  # construction order, not the loader's size order
    assert list(graph.task_groups) == cons.groups == built.planted
    for t, members in enumerate(cons.communities):
        assert set(graph.node_ids[graph.labels[:, t] == 1].tolist()) == set(members.tolist())
    np.testing.assert_allclose(graph.x, cons.x[graph.node_ids], rtol=1e-6)
    graph.check()


def _fake_run(tmp_path, per_seed):
    """A run folder with group-training records: ``per_seed[(subset, seed)] = {task: f1}``."""
    folder = tmp_path / "group_training"
    folder.mkdir(parents=True)
    lines = []
    for (subset, seed), scores in per_seed.items():
        rows = [{"task": i, "task_name": t, "f1": scores[t], "accuracy": 0.0, "log_loss": 0.0}
                for i, t in enumerate(subset)]  # fmt: skip
        lines.append(json.dumps({"subset": list(range(len(subset))), "seed": seed,
                                 "split": "test", "rank": 0, "rows": rows}))  # fmt: skip
    (folder / "results.jsonl").write_text("\n".join(lines) + "\n")


def test_per_seed_scores_and_verdict(scen, tmp_path):
    names = ["a", "b", "c", "d"]
    runs = {}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        runs[(tuple(names), seed)] = {t: 0.5 + shift for t in names}
        for t in names:
            runs[((t,), seed)] = {t: 0.6 + shift}
        runs[(("a", "b"), seed)] = {"a": 0.8 + shift, "b": 0.7 + shift}
        runs[(("c", "d"), seed)] = {"c": 0.7 + shift, "d": 0.6 + shift}
    _fake_run(tmp_path, runs)
    groups = [["a", "b"], ["c", "d"]]
    summary = {"grouped": {"f1": 0.71, "num_models": 2}, "all tasks": {"f1": 0.51},
               "single task": {"f1": 0.61}, "planted groups": {"f1": 0.71}}  # fmt: skip
    results = {
        "tasks": names,
        "metrics": {"selection": "f1"},
        "grouping": {"k": 2, "k_choice": "sweep", "groups": groups,
                     "adjusted_rand_vs_planted": 1.0},
        "group_training": {"summary": summary, "recommended": {"strategy": "single task"}},
        "meta_init": {"reused": False},
        "estimation": {"self_agreement": {"mean_spearman": 0.5}, "estimator_l2": 100.0},
        "ground_truth": {"corrected_spearman": 0.9, "affinity": {"spearman": 0.4},
                         "truth_self_agreement": {"mean_spearman": 0.3}},
    }  # fmt: skip
    built = scen.Built(name="toy", dataset=tmp_path, planted=[0, 0, 1, 1], expected="planted",
                       num_tasks=4)  # fmt: skip
    row = scen.summarize(built, results, tmp_path, seconds=12.0)
    assert row["grouped per seed"] == pytest.approx([0.7, 0.72])
    assert row["all tasks per seed"] == pytest.approx([0.5, 0.52])
    assert row["single task per seed"] == pytest.approx([0.6, 0.62])
    assert row["planted groups per seed"] == pytest.approx([0.7, 0.72])
    assert row["grouped sd"] == pytest.approx(0.02 / np.sqrt(2))
    assert row["best_trivial"] == "single task" and row["gap"] == pytest.approx(0.1)
    assert row["verdict"] == "better" and row["planted_k"] == 2
    # the job recommended single tasks (by validation): it is the best trivial answer itself
    assert row["recommended"] == "single task" and row["recommended_gap"] == pytest.approx(0.0)
    assert row["recommended_verdict"] == "ok"
    table = scen.markdown_table([row, {"scenario": "broken", "error": "ValueError: x"}])
    assert "| toy | 4 | planted | 2 | 100 | 2 |" in table and "better" in table
    assert "error: ValueError: x" in table

    # the job's validated groups ({c, d} split): per seed from the pair (a, b) and the singles
    training = results["group_training"]
    training["validated_groups"] = [["a", "b"], ["c"], ["d"]]
    summary["validated groups"] = {"f1": 0.685}
    training["recommended"] = {"strategy": "validated groups"}
    row = scen.summarize(built, results, tmp_path, seconds=12.0)
    assert row["validated groups per seed"] == pytest.approx([0.675, 0.695])
    assert row["recommended"] == "validated groups" and row["recommended_score"] == 0.685
    assert "| 1.00 | 0.710 | 0.685 | 0.510 | 0.610 | 0.710 |" in scen.markdown_table([row])
    training.pop("validated_groups"), summary.pop("validated groups")
    training["recommended"] = {"strategy": "single task"}

    # a chosen grouping below the best trivial answer by more than the noise is "worse"
    results["grouping"]["groups"] = [["a", "c"], ["b", "d"]]
    runs = {k: v for k, v in runs.items() if len(k[0]) != 2}
    for seed, shift in ((0, 0.0), (1, 0.02)):
        runs[(("a", "c"), seed)] = {"a": 0.4 + shift, "c": 0.4 + shift}
        runs[(("b", "d"), seed)] = {"b": 0.4 + shift, "d": 0.4 + shift}
    runs[(("a", "b"), 0)] = {"a": 0.8, "b": 0.7}  # the planted groups, seed 0 only
    summary["grouped"]["f1"] = 0.41
    (tmp_path / "group_training" / "results.jsonl").unlink()
    (tmp_path / "group_training").rmdir()
    _fake_run(tmp_path, runs)
    row = scen.summarize(built, results, tmp_path, seconds=1.0)
    assert row["verdict"] == "worse" and row["gap"] == pytest.approx(-0.2, abs=0.02)
    assert row["planted groups per seed"] is None  # not trained on every seed: left out


def test_job_argv_passes_extra_last(scen, tmp_path):
    built = scen.Built(name="x", dataset=tmp_path / "graph", planted=None, expected="single",
                       num_tasks=3, job_args=["--max_task_groups", "12"])  # fmt: skip
    argv = scen.job_argv(built, tmp_path / "run", [0, 1], 24, ["--max_task_groups", "5"])
    assert argv[:2] == ["--dataset", str(tmp_path / "graph")]
    assert argv[argv.index("--group_seeds") + 1 : argv.index("--group_seeds") + 3] == ["0", "1"]
    assert argv[argv.index("--ground_truth") + 1] == "24"
    assert argv[-2:] == ["--max_task_groups", "5"]  # the engineer's flag wins (argparse: last)
    assert "--ground_truth" not in scen.job_argv(built, tmp_path, [0], 0, [])
    args = scen.parse_args(["--scenarios", "none", "--extra", "--estimator_l2", "100"])
    assert args.scenarios == ["none"] and args.extra == ["--estimator_l2", "100"]
