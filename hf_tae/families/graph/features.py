"""Node features for decoupled graph models: SIGN hop propagation and structural features.

SIGN (Frasca et al., 2020) precomputes X, ÂX, Â²X, … with Â = D^-1/2 A D^-1/2, so a model
can be trained on node mini-batches with no message passing (as Grad-TAE does).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

from hf_tae.errors import TaeError

StructuralFeatures = Literal["spectral", "random", "degree"]


def _undirected_edge_index(edge_index: np.ndarray, num_nodes: int) -> torch.Tensor:
    from torch_geometric.utils import coalesce, to_undirected

    ei = torch.as_tensor(np.asarray(edge_index), dtype=torch.long)
    if ei.numel() and (ei.min() < 0 or ei.max() >= num_nodes):
        raise TaeError(
            f"edge_index refers to node {int(ei.max())} but the graph has {num_nodes} nodes; "
            "relabel nodes to 0..num_nodes-1 before computing features."
        )
    return coalesce(to_undirected(ei, num_nodes=num_nodes), num_nodes=num_nodes)


def sign_features(x: np.ndarray, edge_index: np.ndarray, num_hops: int = 3) -> np.ndarray:
    """Return hop features ``[num_nodes, num_hops + 1, num_features]`` (float32).

    Hop ``k`` is ``(D^-1/2 A D^-1/2)^k x`` on the undirected graph, computed with
    :class:`torch_geometric.transforms.SIGN`; isolated nodes get zeros beyond hop 0.
    """
    from torch_geometric.data import Data
    from torch_geometric.transforms import SIGN

    if num_hops < 0:
        raise TaeError(f"num_hops must be >= 0, got {num_hops}.")
    x_t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if x_t.ndim != 2:
        raise TaeError(
            f"node features must be 2-D [num_nodes, num_features], got shape {tuple(x_t.shape)}."
        )
    if not torch.isfinite(x_t).all():
        raise TaeError("node features contain NaN or inf; clean or re-generate them.")
    num_nodes = x_t.shape[0]
    data = Data(
        x=x_t, edge_index=_undirected_edge_index(edge_index, num_nodes), num_nodes=num_nodes
    )
    if num_hops > 0:
        with warnings.catch_warnings():  # PyG's CSC matmul warns that sparse CSC is "beta"
            warnings.filterwarnings("ignore", message=r".*[Ss]parse.*", category=UserWarning)
            data = SIGN(num_hops)(data)
    hops = [data.x] + [data[f"x{k}"] for k in range(1, num_hops + 1)]
    return torch.stack(hops, dim=1).numpy().astype(np.float32, copy=False)


def structural_features(
    edge_index: np.ndarray,
    num_nodes: int,
    kind: StructuralFeatures = "spectral",
    dim: int = 32,
    seed: int = 0,
) -> np.ndarray:
    """Node features from the graph alone, for graphs that come without any.

    ``spectral``: the ``dim`` leading eigenvectors of Â (deterministic up to sign; signs fixed
    so each vector's largest entry is positive), scaled to unit variance. ``random``: N(0, 1),
    as the reference code does when its embedding file is missing. ``degree``: log-degree
    repeated with seeded noise, a weak baseline.
    """
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((num_nodes, dim)).astype(np.float32)
    ei = _undirected_edge_index(edge_index, num_nodes).numpy()
    deg = np.bincount(ei[0], minlength=num_nodes).astype(np.float64)
    if kind == "degree":
        base = np.log1p(deg)[:, None]
        return (base + 0.1 * rng.standard_normal((num_nodes, dim))).astype(np.float32)
    if kind != "spectral":
        raise TaeError(
            f"unknown structural feature kind {kind!r}; use 'spectral', 'random' or 'degree'."
        )
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    inv_sqrt = np.zeros_like(deg)
    inv_sqrt[deg > 0] = deg[deg > 0] ** -0.5
    adj = sp.coo_matrix(
        (inv_sqrt[ei[0]] * inv_sqrt[ei[1]], (ei[0], ei[1])), shape=(num_nodes, num_nodes)
    )
    k = min(dim, num_nodes - 2)
    v0 = rng.standard_normal(num_nodes)
    _, vecs = eigsh(adj.tocsr(), k=k, which="LA", v0=v0)
    vecs = vecs[:, ::-1]
    signs = np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(k)])
    vecs = vecs * signs
    vecs = (vecs - vecs.mean(0)) / (vecs.std(0) + 1e-8)
    if k < dim:
        vecs = np.concatenate([vecs, np.zeros((num_nodes, dim - k))], axis=1)
    return vecs.astype(np.float32)
