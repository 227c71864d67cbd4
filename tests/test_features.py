"""SIGN hop features and structural features against dense closed forms."""

import numpy as np
import pytest

from hf_tae import TaeError, sign_features
from hf_tae.families.graph.features import structural_features


def _dense_norm_adj(edge_index: np.ndarray, n: int) -> np.ndarray:
    a = np.zeros((n, n))
    a[edge_index[0], edge_index[1]] = 1
    a[edge_index[1], edge_index[0]] = 1
    deg = a.sum(1)
    inv = np.where(deg > 0, deg, np.inf) ** -0.5
    return inv[:, None] * a * inv[None, :]


def test_sign_features_match_dense_powers_of_normalized_adjacency():
    rng = np.random.default_rng(0)
    n = 30
    edges = rng.integers(0, n, size=(2, 80))
    edges = edges[:, edges[0] != edges[1]]
    x = rng.standard_normal((n, 5)).astype(np.float32)
    hops = sign_features(x, edges, num_hops=3)
    a_hat = _dense_norm_adj(edges, n)
    expected = [x.astype(np.float64)]
    for _ in range(3):
        expected.append(a_hat @ expected[-1])
    assert hops.shape == (n, 4, 5)
    np.testing.assert_allclose(hops, np.stack(expected, axis=1), rtol=1e-5, atol=1e-5)


def test_sign_features_treat_edges_as_undirected_and_deduplicate():
    x = np.eye(3, dtype=np.float32)
    one_way = sign_features(x, np.array([[0, 1], [1, 2]]), 1)
    both_ways_twice = sign_features(x, np.array([[0, 1, 1, 2, 0], [1, 2, 0, 1, 1]]), 1)
    np.testing.assert_allclose(one_way, both_ways_twice, atol=1e-6)


def test_spectral_features_are_the_leading_eigenvectors_of_normalized_adjacency():
    rng = np.random.default_rng(1)
    n = 40
    ring = np.stack([np.arange(n), (np.arange(n) + 1) % n])  # connected, so eigenvalue 1 is simple
    edges = np.concatenate([ring, rng.integers(0, n, size=(2, 120))], axis=1)
    edges = edges[:, edges[0] != edges[1]]
    feats = structural_features(edges, n, "spectral", dim=4, seed=0)
    evals, evecs = np.linalg.eigh(_dense_norm_adj(edges, n))
    assert np.min(np.diff(evals[-5:])) > 1e-3  # the leading 4 eigenvalues are distinct
    for k in range(4):
        # features are standardized eigenvectors: perfectly correlated with the dense ones
        assert abs(np.corrcoef(evecs[:, -1 - k], feats[:, k])[0, 1]) > 0.999


def test_bad_features_are_rejected():
    with pytest.raises(TaeError, match="NaN"):
        sign_features(np.full((3, 2), np.nan), np.array([[0], [1]]), 1)
    with pytest.raises(TaeError, match="refers to node"):
        sign_features(np.zeros((3, 2)), np.array([[0], [7]]), 1)
