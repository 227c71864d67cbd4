"""Shared fixtures. HF libraries are imported inside fixtures only: the loopback Hub plugin
must set HF_ENDPOINT before their first import."""

from __future__ import annotations

import pytest

pytest_plugins = ["hf_tae.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def small_graph():
    """A small planted-community graph (2 groups × 3 tasks) shared by the fast tests."""
    from hf_tae import generate_community_graph

    return generate_community_graph(
        num_groups=2, tasks_per_group=3, nodes_per_group=120, background_nodes=60,
        core_size=40, private_size=15, num_features=8, seed=3,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_graph():
    """The smallest useful graph (2 groups × 2 tasks, 200 nodes, 6 features) for slow-path tests."""
    from hf_tae import generate_community_graph

    return generate_community_graph(
        num_groups=2, tasks_per_group=2, nodes_per_group=80, background_nodes=40,
        core_size=30, private_size=10, num_features=6, seed=1,
    )  # fmt: skip


@pytest.fixture(scope="session")
def default_graph():
    """The embedded default benchmark graph."""
    from hf_tae import generate_community_graph

    return generate_community_graph()
