"""Loader for SNAP community graphs (``com-<name>.ungraph.txt`` + ``com-<name>.top5000.cmty.txt``).

As in the Grad-TAE code (Li et al., KDD 2024): the N largest communities become N binary tasks, the
graph is the subgraph induced by the union of their members, and every task gets its own
seeded split of positives and negatives. Files are the ones distributed at
https://snap.stanford.edu/data/#communities (e.g. ``com-youtube.ungraph.txt.gz``, gunzipped).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.graph.data import CommunityGraph
from hf_tae.families.graph.features import StructuralFeatures, structural_features
from hf_tae.tasks.splits import check_fractions, per_task_splits


def _snap_paths(snap_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    snap_dir = Path(snap_dir)
    edges = snap_dir / f"com-{name}.ungraph.txt"
    cmty = snap_dir / f"com-{name}.top5000.cmty.txt"
    for path in (edges, cmty):
        if not path.is_file():
            raise TaeError(
                f"SNAP file {path} not found. Download com-{name} from https://snap.stanford.edu/data/#communities "
                f"and gunzip it into {snap_dir}, or pass the right snap_dir/name."
            )
    return edges, cmty


def read_snap_edges(path: str | os.PathLike) -> np.ndarray:
    """Edges ``[2, E]`` (original ids) from a SNAP edge list; ``#`` lines are comments."""
    rows: list[tuple[int, int]] = []
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
                raise TaeError(
                    f"{path}:{lineno}: expected two integer node ids per edge line, got {line[:80]!r}."
                )
            rows.append((int(parts[0]), int(parts[1])))
    if not rows:
        raise TaeError(f"{path} holds no edges; is it the right file?")
    return np.asarray(rows, dtype=np.int64).T


def read_snap_communities(path: str | os.PathLike) -> list[np.ndarray]:
    """Communities (arrays of original node ids), one per line, in file order."""
    communities: list[np.ndarray] = []
    with open(path) as handle:
        for lineno, line in enumerate(handle, 1):
            parts = line.split()
            if not parts or line.startswith("#"):
                continue
            if not all(p.isdigit() for p in parts):
                raise TaeError(
                    f"{path}:{lineno}: expected tab-separated integer node ids, got {line[:80]!r}."
                )
            communities.append(np.unique(np.asarray(parts, dtype=np.int64)))
    return communities


def load_snap_communities(
    snap_dir: str | os.PathLike,
    name: str,
    num_communities: int = 100,
    split_fractions: Sequence[float] = (0.2, 0.2, 0.6),
    seed: int = 1024,
    node_features: StructuralFeatures | np.ndarray = "spectral",
    feature_dim: int = 128,
) -> CommunityGraph:
    """Build a :class:`CommunityGraph` from SNAP files.

    Args:
        snap_dir: folder holding ``com-<name>.ungraph.txt`` and ``com-<name>.top5000.cmty.txt``.
        name: the SNAP graph, e.g. ``"youtube"``, ``"dblp"``, ``"amazon"``, ``"lj"``, ``"orkut"``.
        num_communities: the N largest communities to keep as tasks (ties: file order).
        split_fractions: per-task train/validation/test fractions (paper: 0.2/0.2/0.6).
        seed: split seed (the reference code uses 1024).
        node_features: ``"spectral"``, ``"random"`` or ``"degree"`` structural features, or an
            array ``[num_nodes_of_induced_subgraph, F]`` ordered by ascending original node id.
        feature_dim: width of structural features.
    """
    check_fractions(split_fractions)
    if num_communities < 1:
        raise TaeError(f"num_communities must be >= 1, got {num_communities}.")
    edges_path, cmty_path = _snap_paths(snap_dir, name)
    communities = read_snap_communities(cmty_path)
    if len(communities) < num_communities:
        raise TaeError(
            f"{cmty_path} lists {len(communities)} communities but num_communities={num_communities} were asked; "
            f"lower num_communities to at most {len(communities)}."
        )
    order = sorted(range(len(communities)), key=lambda i: (-len(communities[i]), i))[
        :num_communities
    ]
    chosen = [communities[i] for i in order]
    node_ids = np.unique(np.concatenate(chosen))
    index = {int(v): i for i, v in enumerate(node_ids)}

    edges = read_snap_edges(edges_path)
    inside = np.isin(edges[0], node_ids) & np.isin(edges[1], node_ids) & (edges[0] != edges[1])
    sub = (
        np.vectorize(index.__getitem__, otypes=[np.int64])(edges[:, inside])
        if inside.any()
        else np.zeros((2, 0), np.int64)
    )
    sub = np.unique(np.sort(sub, axis=0), axis=1)
    if sub.shape[1] == 0:
        raise TaeError(
            f"the {num_communities} largest communities of {edges_path} induce a subgraph with no edges."
        )

    labels = np.zeros((len(node_ids), num_communities), dtype=np.int8)
    for t, members in enumerate(chosen):
        labels[np.searchsorted(node_ids, members), t] = 1
    if isinstance(node_features, str):
        x = structural_features(sub, len(node_ids), node_features, feature_dim, seed)
    else:
        x = np.asarray(node_features, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] != len(node_ids):
            raise TaeError(
                f"node_features has shape {x.shape}; the induced subgraph has {len(node_ids)} nodes, so pass "
                f"[{len(node_ids)}, F] rows ordered by ascending SNAP node id."
            )
    graph = CommunityGraph(
        x=x,
        edge_index=sub,
        labels=labels,
        split=per_task_splits(labels, split_fractions, seed),
        task_names=[f"community_{i:03d}" for i in range(num_communities)],
        node_ids=node_ids,
        info={
            "name": f"snap-com-{name}-top{num_communities}",
            "source": {"edges": edges_path.name, "communities": cmty_path.name},
            "community_line": [int(i) for i in order],
            "split_fractions": list(split_fractions),
            "seed": seed,
            "node_features": node_features if isinstance(node_features, str) else "given",
        },
    )
    graph.check()
    return graph
