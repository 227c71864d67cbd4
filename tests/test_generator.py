"""The embedded planted-community generator: seeded, deterministic, and planted as documented."""

import numpy as np
import pytest

from hf_tae import TaeError, generate_community_graph


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_same_seed_same_graph_other_seed_other_graph():
    a, b = generate_community_graph(seed=5), generate_community_graph(seed=5)
    for field in ("x", "edge_index", "labels", "split"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = generate_community_graph(seed=6)
    assert not np.array_equal(a.labels, c.labels)


def test_planted_groups_overlap_within_and_never_across(default_graph):
    g = default_graph
    labels = g.labels.astype(bool)
    groups = np.asarray(g.task_groups)
    within, across = [], []
    for i in range(g.num_tasks):
        for j in range(i + 1, g.num_tasks):
            (within if groups[i] == groups[j] else across).append(
                _jaccard(labels[:, i], labels[:, j])
            )
    assert min(within) > 0.3
    assert max(across) == 0.0


def test_communities_are_denser_than_the_background(default_graph):
    g = default_graph
    n = g.num_nodes
    adj = np.zeros((n, n), dtype=bool)
    adj[g.edge_index[0], g.edge_index[1]] = True
    adj |= adj.T
    overall = adj.sum() / (n * (n - 1))
    for t in range(g.num_tasks):
        members = np.flatnonzero(g.labels[:, t])
        inside = adj[np.ix_(members, members)].sum() / (len(members) * (len(members) - 1))
        assert inside > 10 * overall


def test_group_signatures_are_planted_in_features(default_graph):
    """Members of a group are closer in raw feature space to their group mean than non-members."""
    g = default_graph
    groups = np.asarray(g.task_groups)
    for group in np.unique(groups):
        members = g.labels[:, groups == group].any(axis=1)
        direction = g.x[members].mean(0) - g.x[~members].mean(0)
        proj = g.x @ direction
        assert proj[members].mean() > proj[~members].mean() + 2 * proj[~members].std() / np.sqrt(
            members.sum()
        )


def test_generator_rejects_bad_parameters():
    with pytest.raises(TaeError, match="nodes_per_group"):
        generate_community_graph(nodes_per_group=10)
    with pytest.raises(TaeError, match="core_keep"):
        generate_community_graph(core_keep=0.0)
    with pytest.raises(TaeError, match="node_features"):
        generate_community_graph(node_features="magic")
    with pytest.raises(TaeError, match="split fractions"):
        generate_community_graph(split_fractions=(0.5, 0.5, 0.5))
