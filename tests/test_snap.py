"""SNAP community loader, on small files in SNAP's format written by the test."""

import itertools

import numpy as np
import pytest

from hf_tae import TaeError, load_snap_communities


def _write_snap(tmp_path, name="toy", seed=0, n_nodes=200, n_comms=8):
    rng = np.random.default_rng(seed)
    ids = rng.choice(10_000, size=n_nodes, replace=False)  # sparse, unsorted original ids
    comms = []
    for c in range(n_comms):
        size = 20 + 5 * c + int(rng.integers(0, 3))
        comms.append(rng.choice(ids, size=size, replace=False))
    edges = set()
    for members in comms:
        for u, v in itertools.combinations(members, 2):
            if rng.random() < 0.3:
                edges.add((int(u), int(v)))
    for _ in range(300):
        u, v = rng.choice(ids, 2, replace=False)
        edges.add((int(u), int(v)))
    with open(tmp_path / f"com-{name}.ungraph.txt", "w") as f:
        f.write("# Undirected graph: toy\n# FromNodeId\tToNodeId\n")
        for u, v in sorted(edges):
            f.write(f"{u}\t{v}\n")
    with open(tmp_path / f"com-{name}.top5000.cmty.txt", "w") as f:
        for members in comms:
            f.write("\t".join(map(str, members)) + "\n")
    return comms, edges


def test_loader_keeps_largest_communities_and_induced_subgraph(tmp_path):
    comms, edges = _write_snap(tmp_path)
    graph = load_snap_communities(
        tmp_path, "toy", num_communities=4, node_features="random", feature_dim=6
    )
    largest = sorted(range(len(comms)), key=lambda i: -len(comms[i]))[:4]
    kept_nodes = sorted(set().union(*(set(map(int, comms[i])) for i in largest)))
    assert graph.node_ids.tolist() == kept_nodes
    # labels: node v is in task t iff its original id is in the t-th largest community
    for t, ci in enumerate(largest):
        members = set(map(int, comms[ci]))
        assert {int(v) for v in graph.node_ids[graph.labels[:, t] == 1]} == members
    # edges: exactly the input edges with both ends kept, mapped to original ids, once each
    kept = set(kept_nodes)
    expected = {tuple(sorted(e)) for e in edges if e[0] in kept and e[1] in kept}
    got = {
        tuple(sorted((int(graph.node_ids[u]), int(graph.node_ids[v]))))
        for u, v in graph.edge_index.T
    }
    assert got == expected and graph.num_edges == len(expected)
    assert graph.x.shape == (len(kept_nodes), 6)


def test_per_task_splits_are_seeded_and_stratified(tmp_path):
    _write_snap(tmp_path)
    a = load_snap_communities(tmp_path, "toy", num_communities=4, node_features="random", seed=7)
    b = load_snap_communities(tmp_path, "toy", num_communities=4, node_features="random", seed=7)
    c = load_snap_communities(tmp_path, "toy", num_communities=4, node_features="random", seed=8)
    assert np.array_equal(a.split, b.split) and not np.array_equal(a.split, c.split)
    for t in range(a.num_tasks):
        for positive in (1, 0):
            rows = a.labels[:, t] == positive
            counts = np.bincount(a.split[rows, t], minlength=3)
            expected = np.array([0.2, 0.2, 0.6]) * rows.sum()
            assert np.all(np.abs(counts - expected) <= 1.0)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(TaeError, match=r"com-nope\.ungraph\.txt not found.*snap\.stanford\.edu"):
        load_snap_communities(tmp_path, "nope")
    _write_snap(tmp_path)
    with open(tmp_path / "com-toy.ungraph.txt", "a") as f:
        f.write("12\tbanana\n")
    with pytest.raises(TaeError, match=r"ungraph\.txt:\d+: expected two integer node ids"):
        load_snap_communities(tmp_path, "toy", num_communities=2)


def test_too_few_communities_and_empty_splits_are_clear_errors(tmp_path):
    _write_snap(tmp_path)
    with pytest.raises(TaeError, match="lists 8 communities but num_communities=9"):
        load_snap_communities(tmp_path, "toy", num_communities=9)
    with open(tmp_path / "com-toy.top5000.cmty.txt", "w") as f:
        f.write("1\t2\n")  # one community of two nodes: a 20% train split gets no positive
    with open(tmp_path / "com-toy.ungraph.txt", "w") as f:
        f.write("1\t2\n")
    with pytest.raises(TaeError, match="no positive example in the 'train' split"):
        load_snap_communities(tmp_path, "toy", num_communities=1, node_features="random")


def test_snap_data_has_no_planted_groups_even_after_saving(tmp_path):
    from hf_tae import CommunityGraph
    from hf_tae.families.graph.family import GraphFamily

    _write_snap(tmp_path)
    graph = load_snap_communities(tmp_path, "toy", num_communities=4, node_features="random")
    assert graph.task_groups is None
    assert GraphFamily().planted_groups(graph.task_set(2)) is None
    loaded = CommunityGraph.load(graph.save(tmp_path / "saved"))
    assert loaded.task_groups is None
    assert GraphFamily().planted_groups(loaded.task_set(2)) is None


def test_graph_family_splits_snap_data_with_snap_split_seed(tmp_path):
    """--snap_split_seed (default 1024, the reference's) seeds the SNAP splits;
    --data_seed_graph is the generator's seed and leaves SNAP data alone."""
    from hf_tae.families.graph.family import GraphArguments, GraphFamily

    _write_snap(tmp_path)
    family = GraphFamily()

    def graph(**kwargs):
        args = GraphArguments(snap_dir=str(tmp_path), snap_name="toy", num_communities=4, **kwargs)
        tasks = family.load_tasks(args)
        assert family.planted_groups(tasks) is None
        return tasks.source

    assert GraphArguments().snap_split_seed == 1024
    default = graph()
    reference = load_snap_communities(tmp_path, "toy", num_communities=4, seed=1024)
    assert np.array_equal(default.split, reference.split)
    assert np.array_equal(default.split, graph(snap_split_seed=1024).split)
    assert np.array_equal(default.split, graph(data_seed_graph=5).split)
    other = graph(snap_split_seed=7)
    assert not np.array_equal(default.split, other.split)
    assert np.array_equal(
        other.split, load_snap_communities(tmp_path, "toy", num_communities=4, seed=7).split
    )


def test_job_on_snap_data_reports_no_planted_groups_and_shows_no_progress_bar(tmp_path, capfd):
    """``hf-tae run graph --snap_dir … --disable_tqdm true``: no planted strategy, ARI or gap in
    results.json or report.md, no "nan", and no progress bar of any stage (the estimator's
    "fitting subsets" included: 300 subsets are two batches) on stdout or stderr."""
    import json

    import datasets
    import torch

    from hf_tae.pipeline.run import run
    from hf_tae.utils.progress import are_progress_bars_disabled

    torch.set_num_threads(1)
    _write_snap(tmp_path, n_comms=12)
    out = tmp_path / "run"
    results = run(
        ["graph", "--snap_dir", str(tmp_path), "--snap_name", "toy", "--num_communities", "12",
         "--output_dir", str(out), "--disable_tqdm", "true", "--num_train_epochs", "2",
         "--num_meta_inits", "1", "--projection_dim", "16", "--subset_size", "4",
         "--num_subsets", "300", "--num_task_groups", "2", "--compare_single_tasks", "false",
         "--ground_truth", "1", "--ground_truth_seeds", "0"]
    )  # fmt: skip
    captured = capfd.readouterr()
    for stream in (captured.err, captured.out):
        assert "it/s" not in stream and "s/it" not in stream and "%|" not in stream, stream[-2000:]
        assert "\r" not in stream
    # the job restores the switches it turned off
    assert not are_progress_bars_disabled()
    assert not datasets.utils.are_progress_bars_disabled()

    assert results["estimation"]["num_subsets"] == 300
    assert "planted_gap" not in results["estimation"]
    assert "adjusted_rand_vs_planted" not in results["grouping"]
    assert set(results["group_training"]["summary"]) == {"grouped", "all tasks"}
    assert "planted" not in (out / "results.json").read_text()
    # one fine-tuned subset: the affinity-entry correlations are undefined (NaN in results.json)
    assert np.isnan(
        json.loads((out / "results.json").read_text())["ground_truth"]["affinity"]["spearman"]
    )
    report = (out / "report.md").read_text()
    assert "## Group training" in report and "## Estimated vs fine-tuned" in report
    assert "planted" not in report.lower() and "nan" not in report.lower()
