"""CommunityGraph as datasets: save/load round trips (folder and loopback Hub) and atomic saves."""

import numpy as np
import pytest

from hf_tae import CommunityGraph, TaeError


def _assert_same_graph(a: CommunityGraph, b: CommunityGraph) -> None:
    for field in ("x", "edge_index", "labels", "split", "node_ids"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.task_names == b.task_names and a.task_groups == b.task_groups
    assert a.info == b.info


def test_folder_round_trip_and_per_config_loading(small_graph, tmp_path):
    from datasets import load_dataset

    path = small_graph.save(tmp_path / "graph")
    _assert_same_graph(small_graph, CommunityGraph.load(path))
    nodes = load_dataset(str(path), "nodes", split="train")
    edges = load_dataset(str(path), "edges", split="train")
    assert len(nodes) == small_graph.num_nodes and len(edges) == small_graph.num_edges
    assert nodes.features["labels"].length == small_graph.num_tasks


def test_save_refuses_to_overwrite_and_leaves_no_partial_folder(small_graph, tmp_path, monkeypatch):
    path = small_graph.save(tmp_path / "graph")
    with pytest.raises(TaeError, match="already exists"):
        small_graph.save(path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(CommunityGraph, "_card", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        small_graph.save(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph"]  # no temp folder, no half graph
    with pytest.raises(RuntimeError, match="disk full"):
        small_graph.save(path, overwrite=True)
    _assert_same_graph(small_graph, CommunityGraph.load(path))  # the old copy survives


def test_hub_round_trip_by_repo_id(small_graph, loopback_hub, hub_repo_id):
    small_graph.push_to_hub(hub_repo_id)
    _assert_same_graph(small_graph, CommunityGraph.load(hub_repo_id))


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(TaeError, match="neither an existing folder nor a Hub repo id"):
        CommunityGraph.load(tmp_path / "missing" / "graph")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaeError, match="could not load a community graph"):
        CommunityGraph.load(tmp_path / "empty")


def test_inconsistent_arrays_are_rejected(small_graph):
    with pytest.raises(TaeError, match="x has shape"):
        CommunityGraph(np.zeros((3, 2)), small_graph.edge_index, small_graph.labels, small_graph.split,
                       small_graph.task_names)  # fmt: skip
    with pytest.raises(TaeError, match="distinct task names"):
        CommunityGraph(small_graph.x, small_graph.edge_index, small_graph.labels, small_graph.split,
                       ["a"] * small_graph.num_tasks)  # fmt: skip


def test_folders_with_the_same_name_never_read_each_others_data(tmp_path):
    """datasets caches load_dataset(folder, config) by folder name and mtimes; we must not."""
    from hf_tae import generate_community_graph

    a = generate_community_graph(num_groups=2, tasks_per_group=2, num_features=6, seed=1)
    b = generate_community_graph(num_groups=2, tasks_per_group=3, num_features=9, seed=2)
    a.save(tmp_path / "one" / "data")
    b.save(tmp_path / "two" / "data")  # same folder name, same second
    _assert_same_graph(a, CommunityGraph.load(tmp_path / "one" / "data"))
    _assert_same_graph(b, CommunityGraph.load(tmp_path / "two" / "data"))


def _without_groups(graph: CommunityGraph) -> CommunityGraph:
    return CommunityGraph(graph.x, graph.edge_index, graph.labels, graph.split, graph.task_names,
                          task_groups=None, node_ids=graph.node_ids, info=graph.info)  # fmt: skip


def test_no_planted_groups_stay_absent_through_a_round_trip(small_graph, tmp_path):
    from datasets import load_dataset

    graph = _without_groups(small_graph)
    assert graph.task_groups is None
    loaded = CommunityGraph.load(graph.save(tmp_path / "graph"))
    _assert_same_graph(graph, loaded)
    assert loaded.task_groups is None
    tasks = load_dataset(str(tmp_path / "graph"), "tasks", split="train")
    assert tasks["group"] == [None] * graph.num_tasks  # null cells, not a fake group id
    # planted groups are kept as before
    assert (
        CommunityGraph.load(small_graph.save(tmp_path / "planted")).task_groups == [0] * 3 + [1] * 3
    )


def test_graphs_saved_with_unknown_groups_as_minus_one_load_without_groups(small_graph):
    """Graphs saved before "no planted groups" was None wrote -1 for every task."""
    tables = small_graph.to_datasets()
    legacy = tables["tasks"].map(lambda row: {"group": -1})
    loaded = CommunityGraph.from_datasets({**tables, "tasks": legacy})
    assert loaded.task_groups is None
    assert CommunityGraph.from_datasets(tables).task_groups == small_graph.task_groups


def test_partly_unknown_planted_groups_are_refused(small_graph):
    groups = list(small_graph.task_groups)
    assert _without_groups(small_graph).task_groups is None
    for unknown in (-1, None):
        with pytest.raises(TaeError, match="no \\(or a negative\\) group for 1 of 6 tasks"):
            CommunityGraph(small_graph.x, small_graph.edge_index, small_graph.labels,
                           small_graph.split, small_graph.task_names,
                           task_groups=[unknown, *groups[1:]])  # fmt: skip
    with pytest.raises(TaeError, match="task_groups has 5 entries for 6 tasks"):
        CommunityGraph(small_graph.x, small_graph.edge_index, small_graph.labels,
                       small_graph.split, small_graph.task_names, task_groups=groups[1:])  # fmt: skip
