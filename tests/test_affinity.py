"""AffinityMatrix: the A.4 formula on hand-built tables, pairwise mode, counts, storage."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from hf_tae.errors import TaeError
from hf_tae.estimation import AffinityMatrix, all_pairs

NAMES = ["a", "b", "c"]


def table(rows):
    """rows: (subset_id, subset, task, value) -> results table."""
    return pd.DataFrame(
        [{"subset_id": i, "subset": list(s), "task": t, "f1": v} for i, s, t, v in rows]
    )


# S0 = {0,1}, S1 = {0,2}, S2 = {0,1,2}, S3 = {1,2}
HAND = table(
    [
        (0, (0, 1), 0, 0.2), (0, (0, 1), 1, 0.9),
        (1, (0, 2), 0, 0.5), (1, (0, 2), 2, 0.4),
        (2, (0, 1, 2), 0, 0.8), (2, (0, 1, 2), 1, 0.7), (2, (0, 1, 2), 2, 0.6),
        (3, (1, 2), 1, 0.5), (3, (1, 2), 2, 0.8),
    ]
)  # fmt: skip


def test_higher_order_formula_by_hand():
    T = AffinityMatrix.from_results(HAND, NAMES, metric="f1")
    # task 0: m = 0.2, 0.5, 0.8 -> mean 0.5, population std sqrt(0.06)
    z0 = np.array([-0.3, 0.0, 0.3]) / (math.sqrt(0.06) + 1e-3)
    # task 1: m = 0.9 (S0), 0.7 (S2), 0.5 (S3) -> mean 0.7, std sqrt(0.08/3)
    z1 = np.array([0.2, 0.0, -0.2]) / (math.sqrt(0.08 / 3) + 1e-3)
    # task 2: m = 0.4 (S1), 0.6 (S2), 0.8 (S3) -> mean 0.6, std sqrt(0.08/3)
    z2 = np.array([-0.2, 0.0, 0.2]) / (math.sqrt(0.08 / 3) + 1e-3)
    expected = np.array(
        [
            [z0.mean(), (z0[0] + z0[2]) / 2, (z0[1] + z0[2]) / 2],
            [(z1[0] + z1[1]) / 2, z1.mean(), (z1[1] + z1[2]) / 2],
            [(z2[0] + z2[1]) / 2, (z2[1] + z2[2]) / 2, z2.mean()],
        ]
    )
    np.testing.assert_allclose(T.to_numpy(), expected, atol=1e-12)
    np.testing.assert_array_equal(T.counts, [[3, 2, 2], [2, 3, 2], [2, 2, 3]])
    assert T.kind == "estimated" and T.task_names == NAMES
    assert T.provenance["metric"] == "f1" and T.provenance["num_subsets"] == 4

    sym = AffinityMatrix.from_results(HAND, NAMES, symmetrize=True, zero_diagonal=True)
    want = (expected + expected.T) / 2
    np.fill_diagonal(want, 0)
    np.testing.assert_allclose(sym.to_numpy(), want, atol=1e-12)


def test_raw_metric_without_normalization_by_hand():
    """normalize=False: T[i, j] = mean of the raw m_i(S) over S ∋ {i, j} (the poster's formula)."""
    T = AffinityMatrix.from_results(HAND, NAMES, metric="f1", normalize=False)
    expected = [
        [(0.2 + 0.5 + 0.8) / 3, (0.2 + 0.8) / 2, (0.5 + 0.8) / 2],  # task 0: S0, S1, S2
        [(0.9 + 0.7) / 2, (0.9 + 0.7 + 0.5) / 3, (0.7 + 0.5) / 2],  # task 1: S0, S2, S3
        [(0.4 + 0.6) / 2, (0.6 + 0.8) / 2, (0.4 + 0.6 + 0.8) / 3],  # task 2: S1, S2, S3
    ]
    np.testing.assert_allclose(T.to_numpy(), expected, atol=1e-12)
    np.testing.assert_array_equal(T.counts, [[3, 2, 2], [2, 3, 2], [2, 2, 3]])
    assert T.provenance["normalized"] is False
    assert AffinityMatrix.from_results(HAND, NAMES).provenance["normalized"] is True

    # a loss is still negated, and two seeds of one (subset, task) both count as samples
    two_seeds = pd.concat([HAND.assign(seed=0), HAND.assign(seed=1, f1=HAND["f1"] + 0.1)])
    L = AffinityMatrix.from_results(
        two_seeds.rename(columns={"f1": "log_loss"}), NAMES, metric="log_loss",
        normalize=False, symmetrize=True,
    )  # fmt: skip
    want = -(np.array(expected) + 0.05)
    np.testing.assert_allclose(L.to_numpy(), (want + want.T) / 2, atol=1e-12)
    np.testing.assert_array_equal(L.counts, [[6, 4, 4], [4, 6, 4], [4, 4, 6]])


def test_losses_are_negated():
    losses = HAND.rename(columns={"f1": "log_loss"})
    T = AffinityMatrix.from_results(losses, NAMES, metric="log_loss")
    F = AffinityMatrix.from_results(HAND, NAMES, metric="f1")
    np.testing.assert_allclose(T.to_numpy(), -F.to_numpy(), atol=1e-12)


def test_pairwise_mode_and_missing_entries():
    values = {(0, 1): 0.1, (1, 0): 0.2, (0, 2): 0.3, (2, 0): 0.4}
    rows = [
        (k, pair, t, values[(t, pair[1] if pair[0] == t else pair[0])])
        for k, pair in enumerate(all_pairs(3)[:2])
        for t in pair
    ]
    T = AffinityMatrix.from_results(table(rows), NAMES, pairwise=True)
    assert T.kind == "pairwise"
    got = T.to_numpy()
    for (i, j), v in values.items():
        assert got[i, j] == v and T.counts[i, j] == 1
    assert np.isnan(got[1, 2]) and T.counts[1, 2] == 0 and np.isnan(got[0, 0])
    with pytest.raises(TaeError, match="subsets of two tasks"):
        AffinityMatrix.from_results(HAND, NAMES, pairwise=True)


def test_bad_tables():
    with pytest.raises(TaeError, match="lacks columns"):
        AffinityMatrix.from_results(HAND, NAMES, metric="accuracy")
    with pytest.raises(TaeError, match="outside its subset"):
        AffinityMatrix.from_results(table([(0, (0, 1), 2, 0.5)]), NAMES)


def _assert_same(a: AffinityMatrix, b: AffinityMatrix) -> None:
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())  # NaN == NaN here
    np.testing.assert_array_equal(a.counts, b.counts)
    assert (a.task_names, a.kind, a.provenance) == (b.task_names, b.kind, b.provenance)
    pd.testing.assert_frame_equal(a.results, b.results, check_dtype=False)


def test_save_load_round_trip(tmp_path):
    rows = [(k, p, t, 0.1 * k + 0.01 * t) for k, p in enumerate(all_pairs(3)[:2]) for t in p]
    T = AffinityMatrix.from_results(table(rows), NAMES, pairwise=True, provenance={"store": "x"})
    folder = T.save(tmp_path / "aff", group_order=[2, 0, 1])
    assert (folder / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    card = (folder / "README.md").read_text()
    assert "config_name: affinity" in card and "config_name: subsets" in card
    _assert_same(T, AffinityMatrix.load(folder))
    with pytest.raises(TaeError, match="already exists"):
        T.save(folder)
    with pytest.raises(TaeError, match="neither an existing folder"):
        AffinityMatrix.load(tmp_path / "missing")


def test_hub_round_trip(loopback_hub, hub_repo_id):
    T = AffinityMatrix.from_results(HAND, NAMES, kind="fine-tuned")
    T.push_to_hub(hub_repo_id)
    _assert_same(T, AffinityMatrix.load(hub_repo_id))


def test_average_is_the_entrywise_mean_ignoring_uncovered_pairs():
    names = ["a", "b", "c"]
    first = np.array([[0.0, 1.0, np.nan], [1.0, 0.0, 2.0], [np.nan, 2.0, 0.0]])
    second = np.array([[0.0, 3.0, 4.0], [3.0, 0.0, np.nan], [4.0, np.nan, 0.0]])
    counts = np.ones((3, 3), dtype=int)
    matrices = [AffinityMatrix(v, names, kind="estimated", counts=counts) for v in (first, second)]
    mean = AffinityMatrix.average(matrices)
    expected = np.array([[0.0, 2.0, 4.0], [2.0, 0.0, 2.0], [4.0, 2.0, 0.0]])  # by hand
    np.testing.assert_allclose(mean.values, expected)
    assert (mean.counts == 2).all() and mean.provenance["members"] == 2
    both_nan = AffinityMatrix.average([matrices[0], matrices[0]])
    assert np.isnan(both_nan.values[0, 2])
    with pytest.raises(TaeError, match="same task list"):
        AffinityMatrix.average(
            [matrices[0], AffinityMatrix(first, ["a", "b", "d"], kind="estimated")]
        )
    with pytest.raises(TaeError, match="at least one"):
        AffinityMatrix.average([])
