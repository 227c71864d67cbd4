"""The embedded default benchmark: overlapping communities organized in latent groups.

What the generator plants, and why (see also the README and ``benchmarks/generator_fairness.py``):

* **Groups of related tasks.** Tasks come in ``num_groups`` groups of ``tasks_per_group``.
  Each group owns a region of the graph. Every community of a group contains a random
  ``core_keep`` share of the group's *core* plus its own private members from the region, so
  communities of one group overlap heavily (shared positives, shared edges): a model trained
  on one of them learns most of what the others need. That is positive transfer. By default
  the whole core is kept and each community adds 5 private members (Jaccard ≈ 0.86 within a
  group), like the nested near-duplicate communities of the SNAP data; with more private
  members (``private_size=25, core_keep=0.8``) the communities of a group conflict on their
  private members, and training one model per group no longer clearly beats one model on all
  tasks.
* **Interference across groups.** Communities of different groups share no member and
  live in different regions; each group has its own node-feature signature, so tasks of
  different groups need different features from the shared layers. With the narrow shared
  trunk of the recipe's default model (``hidden_size=8``: the capacity the tasks compete
  for), a cross-group partner spends that capacity on its own signature and costs the target.
* **Realistic nuisance.** Background nodes that belong to no community, sparse random edges
  everywhere, Gaussian feature noise, and per-community feature offsets that are weaker than
  the group signature.

Splits are per task, as in the Grad-TAE code: a node may be a validation example
of task i and a training example of task j. Within a group, where communities share most of
their members, part of the transfer therefore comes through shared labels, which is how
overlapping communities help each other in the SNAP data too.

Everything is drawn from one seeded ``numpy`` generator, so a seed gives the same graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.graph.data import CommunityGraph
from hf_tae.families.graph.features import structural_features
from hf_tae.tasks.splits import check_fractions, per_task_splits


def _er_edges(rng: np.random.Generator, nodes: np.ndarray, p: float) -> np.ndarray:
    """Edges of an Erdős–Rényi graph with edge probability ``p`` on ``nodes``."""
    m = len(nodes)
    if m < 2 or p <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    n_pairs = m * (m - 1) // 2
    k = rng.binomial(n_pairs, min(p, 1.0))
    flat = rng.choice(n_pairs, size=k, replace=False)
    # invert the row-major index of the strict upper triangle
    i = (m - 2 - np.floor(np.sqrt(-8 * flat + 4 * m * (m - 1) - 7) / 2.0 - 0.5)).astype(np.int64)
    j = flat + i + 1 - m * (m - 1) // 2 + (m - i) * ((m - i) - 1) // 2
    return np.stack([nodes[i], nodes[j]])


def generate_community_graph(
    num_groups: int = 4,
    tasks_per_group: int = 4,
    nodes_per_group: int = 240,
    background_nodes: int = 240,
    core_size: int = 60,
    core_keep: float = 1.0,
    private_size: int = 5,
    p_community: float = 0.12,
    p_region: float = 0.01,
    background_degree: float = 2.0,
    num_features: int = 32,
    signature_strength: float = 0.6,
    community_strength: float = 0.1,
    node_features: Literal["planted", "spectral", "random"] = "planted",
    split_fractions: Sequence[float] = (0.2, 0.2, 0.6),
    seed: int = 0,
) -> CommunityGraph:
    """Generate a :class:`CommunityGraph` with planted task groups (see the module docstring).

    The default (4 groups × 4 tasks, 1,200 nodes) trains in seconds on a CPU. Task names are
    ``g{group}_c{k}`` and ``CommunityGraph.task_groups`` holds the planted group of each task.
    """
    check_fractions(split_fractions)
    if num_groups < 1 or tasks_per_group < 1:
        raise TaeError(
            f"num_groups and tasks_per_group must be >= 1, got {num_groups} and {tasks_per_group}."
        )
    if core_size + private_size > nodes_per_group:
        raise TaeError(
            f"core_size + private_size = {core_size + private_size} exceeds nodes_per_group={nodes_per_group}; "
            "raise nodes_per_group or shrink the communities."
        )
    if not 0 < core_keep <= 1:
        raise TaeError(f"core_keep must be in (0, 1], got {core_keep}.")
    rng = np.random.default_rng(seed)
    num_nodes = num_groups * nodes_per_group + background_nodes
    num_tasks = num_groups * tasks_per_group
    labels = np.zeros((num_nodes, num_tasks), dtype=np.int8)
    edges = []

    order = rng.permutation(num_nodes)  # node ids carry no information about groups
    regions = [order[g * nodes_per_group : (g + 1) * nodes_per_group] for g in range(num_groups)]
    for g, region in enumerate(regions):
        core, rest = region[:core_size], region[core_size:]
        edges.append(_er_edges(rng, region, p_region))
        for k in range(tasks_per_group):
            kept = core[rng.random(core_size) < core_keep]
            private = rng.choice(rest, size=private_size, replace=False)
            members = np.union1d(kept, private)
            labels[members, g * tasks_per_group + k] = 1
            edges.append(_er_edges(rng, members, p_community))
    n_bg = rng.poisson(background_degree * num_nodes / 2)
    edges.append(rng.integers(0, num_nodes, size=(2, n_bg)))
    edge_index = np.concatenate(edges, axis=1)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    edge_index = np.unique(np.sort(edge_index, axis=0), axis=1)

    if node_features == "planted":
        x = rng.standard_normal((num_nodes, num_features)).astype(np.float32)
        signatures = rng.standard_normal((num_groups, num_features))
        signatures *= (
            signature_strength
            / np.linalg.norm(signatures, axis=1, keepdims=True)
            * np.sqrt(num_features)
            / 4
        )
        offsets = rng.standard_normal((num_tasks, num_features))
        offsets *= (
            community_strength
            / np.linalg.norm(offsets, axis=1, keepdims=True)
            * np.sqrt(num_features)
            / 4
        )
        for g in range(num_groups):
            in_group = labels[:, g * tasks_per_group : (g + 1) * tasks_per_group].any(axis=1)
            x[in_group] += signatures[g]
        x += (labels @ offsets).astype(np.float32)
    elif node_features in ("spectral", "random"):
        x = structural_features(edge_index, num_nodes, node_features, num_features, seed)
    else:
        raise TaeError(
            f"unknown node_features {node_features!r}; use 'planted', 'spectral' or 'random'."
        )

    params = {
        "num_groups": num_groups, "tasks_per_group": tasks_per_group, "nodes_per_group": nodes_per_group,
        "background_nodes": background_nodes, "core_size": core_size, "core_keep": core_keep,
        "private_size": private_size, "p_community": p_community, "p_region": p_region,
        "background_degree": background_degree, "num_features": num_features,
        "signature_strength": signature_strength, "community_strength": community_strength,
        "node_features": node_features, "split_fractions": list(split_fractions), "seed": seed,
    }  # fmt: skip
    graph = CommunityGraph(
        x=x,
        edge_index=edge_index,
        labels=labels,
        split=per_task_splits(labels, split_fractions, seed),
        task_names=[f"g{g}_c{k}" for g in range(num_groups) for k in range(tasks_per_group)],
        task_groups=[g for g in range(num_groups) for _ in range(tasks_per_group)],
        info={
            "name": "hf-tae-planted-communities",
            "generator": "hf_tae.generate_community_graph",
            "params": params,
        },
    )
    graph.check()
    return graph
