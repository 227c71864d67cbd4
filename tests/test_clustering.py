"""Tests for hf_tae.clustering: SDP task grouping, roundings, baselines and the k sweep."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from hf_tae.clustering import (
    Grouping,
    affinity_silhouette,
    affinity_silhouette_samples,
    exhaustive_cluster,
    kmeans_cluster,
    kmeans_rounding,
    partition_objective,
    recommend_k,
    sdp_cluster,
    sdp_relaxation,
    shuffled_null,
    silhouettes_by_member,
    spectral_cluster,
    split_incoherent_groups,
    sweep_k,
    threshold_rounding,
)
from hf_tae.clustering.baselines import restricted_growth_strings
from hf_tae.clustering.rounding import canonical_labels
from hf_tae.errors import TaeError


def planted(sizes, seed, within=1.0, sd=0.3):
    """Symmetrized block matrix: N(within, sd) inside blocks, N(0, sd) across; shuffled order."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    n = len(labels)
    same = labels[:, None] == labels[None, :]
    T = np.where(same, rng.normal(within, sd, (n, n)), rng.normal(0.0, sd, (n, n)))
    return (T + T.T) / 2, labels


def random_symmetric(n, seed):
    T = np.random.default_rng(seed).normal(size=(n, n))
    return (T + T.T) / 2


def brute_force_optimum(T, k):
    """Independent enumeration: every assignment in range(k)^n that uses all k labels."""
    n = len(T)
    best = -np.inf
    for assignment in itertools.product(range(k), repeat=n):
        if len(set(assignment)) != k:
            continue
        score = 0.0
        for c in range(k):
            members = [i for i in range(n) if assignment[i] == c]
            score += sum(T[i][j] for i in members for j in members) / len(members)
        best = max(best, score)
    return best


# ---------------------------------------------------------------- objective and labels


def test_partition_objective_by_hand():
    T = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    # group {0, 1}: (1 + 2 + 4 + 5) / 2 = 6; group {2}: 9 / 1 = 9
    assert partition_objective(T, np.array([0, 0, 1])) == pytest.approx(15.0)
    assert partition_objective(T, np.array([5, 5, 2])) == pytest.approx(15.0)
    assert partition_objective(T, np.zeros(3, int)) == pytest.approx(45.0 / 3)
    assert partition_objective(T, np.arange(3)) == pytest.approx(15.0)  # the trace
    with pytest.raises(TaeError, match="labels has shape"):
        partition_objective(T, np.array([0, 1]))


def test_canonical_labels_first_appearance():
    assert canonical_labels(np.array([7, 7, 3, 9, 3])).tolist() == [0, 0, 1, 2, 1]


def test_grouping_named():
    T, _ = planted([3, 3], seed=0)
    grouping = sdp_cluster(T, 2)
    names = [f"task{i}" for i in range(6)]
    named = grouping.named(names)
    assert sorted(sum(named, [])) == sorted(names)
    assert named == [[names[i] for i in g] for g in grouping.groups]
    with pytest.raises(TaeError, match="one name per row"):
        grouping.named(names[:2])


# ---------------------------------------------------------------- planted recovery


@pytest.mark.parametrize(
    ("sizes", "seed"),
    [([3, 3, 3], 0), ([4, 6, 8], 1), ([5, 7, 9, 9], 2), ([6, 6, 6, 6], 3), ([8, 10, 12], 4)],
)
@pytest.mark.parametrize("rounding", ["kmeans", "threshold"])
def test_sdp_recovers_planted_blocks(sizes, seed, rounding):
    T, labels = planted(sizes, seed)
    grouping = sdp_cluster(T, len(sizes), rounding=rounding)
    assert isinstance(grouping, Grouping)
    assert adjusted_rand_score(labels, grouping.labels) == 1.0
    assert grouping.n_groups == len(sizes)
    assert grouping.sdp is not None and grouping.sdp.converged
    assert grouping.labels[0] == 0  # canonical
    assert grouping.objective == pytest.approx(partition_objective(T, labels))
    assert grouping.method == f"sdp-{rounding}"


def test_sdp_temperature_and_symmetrize():
    T, labels = planted([4, 5, 6], seed=5)
    rng = np.random.default_rng(0)
    skew = rng.normal(0, 0.05, T.shape)
    grouping = sdp_cluster(T + skew - skew.T, 3, symmetrize=True, temperature=1.0)
    assert adjusted_rand_score(labels, grouping.labels) == 1.0
    # the objective is scored on (T + Tᵀ)/2, not on exp(T / temperature)
    assert grouping.objective == pytest.approx(partition_objective(T, grouping.labels))


def test_sdp_solution_is_feasible():
    T, _ = planted([4, 5, 6], seed=6)
    solution = sdp_relaxation(T, 3, eps=1e-6)
    X = solution.X
    assert solution.converged and solution.status == "optimal"
    assert np.allclose(X.sum(axis=1), 1.0, atol=1e-4)
    assert np.trace(X) == pytest.approx(3.0, abs=1e-4)
    assert X.min() > -1e-4 and np.linalg.eigvalsh(X).min() > -1e-4
    assert solution.objective == pytest.approx(np.sum(T * X))


# ---------------------------------------------------------------- exact optimum


@pytest.mark.parametrize(("n", "k"), [(4, 2), (5, 3), (6, 2), (6, 3), (7, 4)])
def test_exhaustive_matches_independent_brute_force(n, k):
    T = random_symmetric(n, seed=10 * n + k)
    assert exhaustive_cluster(T, k).objective == pytest.approx(brute_force_optimum(T, k))


@pytest.mark.parametrize(("n", "k", "stirling"), [(5, 2, 15), (6, 3, 90), (10, 5, 42525)])
def test_restricted_growth_strings_count(n, k, stirling):
    strings = restricted_growth_strings(n, k)
    assert strings.shape == (stirling, n)
    assert len({tuple(s) for s in strings}) == stirling
    assert (strings.max(axis=1) == k - 1).all() and (strings[:, 0] == 0).all()


#: On pure-noise matrices the rounded SDP may miss the optimum; measured worst case over
#: these instances is 19% of (optimum − single-group objective), mean under 5%.
RELATIVE_MARGIN = 0.25


def test_sdp_close_to_exhaustive_on_random_matrices():
    gaps = []
    for seed, n, k in itertools.product(range(3), (7, 8, 9), (2, 3, 4)):
        T = random_symmetric(n, seed)
        best = exhaustive_cluster(T, k)
        grouping = sdp_cluster(T, k, seed=seed)
        # the relaxation is an upper bound on every partition (up to solver tolerance)
        assert grouping.sdp.objective >= best.objective - 1e-2
        for other in (grouping, spectral_cluster(T, k), kmeans_cluster(T, k)):
            assert other.objective <= best.objective + 1e-9
            assert other.n_groups == k
        spread = best.objective - partition_objective(T, np.zeros(n, int))
        gap = (best.objective - grouping.objective) / spread
        assert gap <= RELATIVE_MARGIN
        gaps.append(gap)
    assert np.mean(gaps) < 0.05


def test_exhaustive_rejects_large_n():
    with pytest.raises(TaeError, match="n=11 tasks is more than 10.*sdp_cluster"):
        exhaustive_cluster(random_symmetric(11, 0), 3)


# ---------------------------------------------------------------- roundings


def test_threshold_rounding_reproduces_reference_scan():
    # B = X > 1/5: row 0 takes {0, 2}; row 1 is not above threshold on its diagonal but is
    # unassigned, so it joins {3}; row 2 is already assigned, its unassigned neighbour 4
    # splits away as a new group (F.21); rows 3, 4 add nothing.
    X = np.full((5, 5), 0.1)
    for i, j in [(0, 0), (0, 2), (1, 3), (2, 4)]:
        X[i, j] = X[j, i] = 0.5
    assert threshold_rounding(X).tolist() == [0, 1, 0, 1, 2]
    assert threshold_rounding(X, c=3.0).tolist() == [0, 1, 2, 3, 4]  # threshold 0.6
    assert threshold_rounding(np.full((4, 4), 0.25)).tolist() == [0, 1, 2, 3]  # X > 1/n fails


@pytest.mark.parametrize(
    "X",
    [np.eye(6), np.full((6, 6), 1 / 6), np.zeros((6, 6)), np.diag([1.0, 1, 1, 0, 0, 0])],
    ids=["identity", "all-equal", "zeros", "rank-deficient"],
)
def test_kmeans_rounding_always_k_groups(X):
    for k in range(1, 7):
        labels = kmeans_rounding(X, k)
        assert sorted(set(labels.tolist())) == list(range(k))
        assert labels.tolist() == canonical_labels(labels).tolist()
        assert kmeans_rounding(X, k).tolist() == labels.tolist()  # deterministic


def test_baselines_on_planted_blocks():
    T, labels = planted([5, 6, 7], seed=7)
    for method in (spectral_cluster, kmeans_cluster):
        grouping = method(T, 3)
        assert adjusted_rand_score(labels, grouping.labels) == 1.0
    shifted = spectral_cluster(T - 5.0, 3)  # negatives handled by the shift
    assert adjusted_rand_score(labels, shifted.labels) == 1.0
    assert spectral_cluster(np.ones((5, 5)), 3).n_groups == 3


# ---------------------------------------------------------------- solver behaviour


@pytest.mark.parametrize("max_iters", [2, 10])
def test_non_convergence_warns_and_still_groups(max_iters):
    T = random_symmetric(15, seed=3)
    with pytest.warns(RuntimeWarning, match="SCS did not converge.*max_iters"):
        grouping = sdp_cluster(T, 3, max_iters=max_iters)
    assert not grouping.sdp.converged
    assert grouping.n_groups == 3
    assert np.isfinite(grouping.objective)


def test_large_n_falls_back_to_spectral():
    T, labels = planted([3, 3, 3], seed=8)
    with pytest.warns(UserWarning, match="exceeds max_sdp_size=5.*spectral"):
        grouping = sdp_cluster(T, 3, max_sdp_size=5)
    assert grouping.method == "spectral" and grouping.sdp is None
    assert adjusted_rand_score(labels, grouping.labels) == 1.0


# ---------------------------------------------------------------- choosing k


@pytest.mark.parametrize(("sizes", "seed"), [([4, 5, 6], 0), ([3, 4, 5, 6], 1)])
def test_sweep_recommends_planted_k(sizes, seed):
    T, _ = planted(sizes, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every SDP in the sweep converges
        sweep = sweep_k(T, ks=range(1, 7), null_draws=2)
    assert isinstance(sweep, pd.DataFrame)
    assert list(sweep["k"]) == list(range(1, 7))
    assert recommend_k(sweep) == len(sizes)
    assert sweep.loc[sweep["recommended"], "k"].tolist() == [len(sizes)]
    assert sweep.loc[0, "gain"] == pytest.approx(0.0, abs=1e-9)  # k = 1: Σ T / n both


def test_sweep_other_methods_and_null():
    T, _ = planted([3, 3, 3], seed=2)
    assert recommend_k(sweep_k(T, ks=[1, 2, 3, 4], method="exhaustive")) == 3
    assert recommend_k(sweep_k(T, ks=[1, 2, 3, 4], method="spectral")) == 3
    null = shuffled_null(T, np.random.default_rng(0))
    assert np.allclose(null, null.T) and np.allclose(np.diag(null), np.diag(T))
    assert np.allclose(np.sort(null.ravel()), np.sort(T.ravel()))
    with pytest.raises(TaeError, match="method='louvain'"):
        sweep_k(T, method="louvain")
    with pytest.raises(TaeError, match="pass the DataFrame sweep_k returns"):
        recommend_k(pd.DataFrame())


def test_affinity_silhouette_matches_sklearn_on_its_distance():
    """Mean silhouette equals scikit-learn's on D = max W − W (W symmetrized, off-diagonal max),
    for asymmetric matrices, shuffled labels and lone tasks (which score 0)."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    for n, groups in [(6, 2), (9, 3), (12, 5), (7, 6)]:
        T = rng.normal(size=(n, n))  # asymmetric, as the estimated affinities are
        labels = rng.permutation(np.arange(n) % groups)
        W = (T + T.T) / 2
        off = ~np.eye(n, dtype=bool)
        D = np.where(off, W[off].max() - W, 0.0)
        expected = silhouette_score(D, labels, metric="precomputed")
        assert affinity_silhouette(T, labels) == pytest.approx(expected, abs=1e-12)
        # cosine-type affinities: the ceiling 1 gives the cosine distance 1 − W
        C = np.tanh(T) * 0.9
        cosine = silhouette_score(np.where(off, 1 - (C + C.T) / 2, 0.0), labels,
                                  metric="precomputed")  # fmt: skip
        assert affinity_silhouette(C, labels, ceiling=1.0) == pytest.approx(cosine, abs=1e-12)


def test_affinity_silhouette_samples_match_sklearn_per_task():
    """Per-task silhouettes equal scikit-learn's ``silhouette_samples`` on the same distance
    (lone tasks 0); one group has none (NaN)."""
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(1)
    for n, groups in [(6, 2), (10, 4), (8, 7)]:
        T = np.tanh(rng.normal(size=(n, n))) * 0.9
        labels = rng.permutation(np.arange(n) % groups)
        off = ~np.eye(n, dtype=bool)
        D = np.where(off, 1 - (T + T.T) / 2, 0.0)
        expected = silhouette_samples(D, labels, metric="precomputed")
        np.testing.assert_allclose(affinity_silhouette_samples(T, labels, 1.0), expected,
                                   atol=1e-12)  # fmt: skip
    assert np.isnan(affinity_silhouette_samples(T, np.zeros(n))).all()


def test_split_incoherent_groups_against_sklearn_member_silhouettes():
    """A group is split into single tasks exactly when its tasks' silhouette, computed by
    scikit-learn on each member's cosine distance and averaged over tasks and members, is
    <= 0; the other groups keep their tasks together."""
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(7)
    n = 12
    # two families (0-3, 4-7) and four unrelated tasks (8-11) that the grouping puts together;
    # each of those leans a little to one family (0.25), so it sits nearer that family than
    # the others of its group (silhouette about (0.75 - 0.9) / 0.9 < 0)
    family = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5])
    base = np.where(family[:, None] == family[None, :], 0.7, 0.1)
    for task, near in [(8, 0), (9, 0), (10, 1), (11, 1)]:
        base[task, family == near] = base[family == near, task] = 0.25
    members = []
    for _ in range(4):
        e = rng.normal(scale=0.15, size=(n, n))
        members.append(np.clip(base + (e + e.T) / 2, -0.99, 0.99))
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    new, table = split_incoherent_groups(labels, members, ceiling=1.0)
    off = ~np.eye(n, dtype=bool)
    samples = np.array([silhouette_samples(np.where(off, 1 - (M + M.T) / 2, 0.0), labels,
                                           metric="precomputed") for M in members])  # fmt: skip
    for row in table.itertuples():
        per_member = samples[:, labels == row.group].mean(1)
        assert row.tasks == np.flatnonzero(labels == row.group).tolist()
        assert row.coherence == pytest.approx(per_member.mean(), abs=1e-12)
        assert row.coherence_std == pytest.approx(per_member.std(ddof=1), abs=1e-12)
        assert row.split == (per_member.mean() <= 0)
    assert table["split"].tolist() == [False, False, True]  # the unrelated tasks are split
    assert new.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 5]
    # a threshold above every group's coherence splits everything into single tasks
    everything, _ = split_incoherent_groups(labels, members, ceiling=1.0, min_coherence=1.0)
    assert everything.tolist() == list(range(n))
    with pytest.raises(TaeError, match="members is empty"):
        split_incoherent_groups(labels, [])


def test_silhouettes_by_member_scores_fixed_groupings_on_each_member():
    """Each member scores the sweep's (fixed) groupings by scikit-learn's silhouette on its own
    cosine distance 1 − W; ``preferred_by`` counts the members whose best k (smallest on ties)
    is that row's, found by brute force over the rows."""
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    n = 9
    planted = np.arange(n) // 3
    base = np.where(planted[:, None] == planted[None, :], 0.6, 0.1)
    noise = [rng.normal(scale=s, size=(n, n)) for s in (0.05, 0.4)]
    members = [np.clip(base + (e + e.T) / 2, -0.99, 0.99) for e in noise]
    sweep = sweep_k(np.mean(members, axis=0), range(1, 6), null_draws=2, silhouette_ceiling=1.0)
    table = silhouettes_by_member(sweep, members, ceiling=1.0)
    assert list(table["k"]) == list(sweep["k"])
    off = ~np.eye(n, dtype=bool)
    best = []
    for m, T in enumerate(members):
        D = np.where(off, 1 - (T + T.T) / 2, 0.0)
        expected = [silhouette_score(D, lab, metric="precomputed") if 1 < len(set(lab)) < n
                    else np.nan for lab in sweep["labels"]]  # fmt: skip
        np.testing.assert_allclose(table[f"member_{m}"], expected, atol=1e-12)
        finite = [(v, -k) for v, k in zip(expected, sweep["k"], strict=True) if np.isfinite(v)]
        best.append(-max(finite)[1])
    assert table.set_index("k")["preferred_by"].to_dict() == {
        k: best.count(k) for k in sweep["k"]
    }
    assert best[0] == 3  # the nearly noiseless member finds the planted k
    with pytest.raises(TaeError, match="members is empty"):
        silhouettes_by_member(sweep, [])


def test_affinity_silhouette_closed_forms():
    """Blocks of constant within-affinity a above a constant between b: every task's own group
    sits at distance 0 and the others at a − b, so the silhouette is 1, whatever the shift and
    positive scale of T; undefined (NaN) for one group or one task per group."""
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    same = labels[:, None] == labels[None, :]
    T = np.where(same, 0.9, 0.2)
    assert affinity_silhouette(T, labels) == pytest.approx(1.0)
    assert affinity_silhouette(5.0 * T - 3.0, labels) == pytest.approx(1.0)
    # two lone tasks (5, 6) score 0 and the others keep 1: mean 5/7
    lone = np.array([0, 0, 1, 1, 1, 2, 3])
    assert affinity_silhouette(T, lone) == pytest.approx(5 / 7)
    assert np.isnan(affinity_silhouette(T, np.zeros(7)))
    assert np.isnan(affinity_silhouette(T, np.arange(7)))
    with pytest.raises(TaeError, match="one group id per task"):
        affinity_silhouette(T, [0, 1])
    with pytest.raises(TaeError, match=r"ceiling=0.5 is below the largest affinity 0.9"):
        affinity_silhouette(T, labels, ceiling=0.5)


@pytest.mark.parametrize(("sizes", "seed"), [([4, 5, 6], 0), ([3, 4, 5, 6], 1), ([2, 2, 6], 3)])
def test_sweep_silhouette_recommends_planted_k(sizes, seed):
    T, truth = planted(sizes, seed)
    sweep = sweep_k(T, ks=range(1, 8), null_draws=2)
    k = recommend_k(sweep, by="silhouette")
    assert k == len(sizes)
    labels = sweep.set_index("k").loc[k, "labels"]
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert np.isnan(sweep.loc[0, "silhouette"])  # k = 1: undefined
    ceiling = sweep_k(T, ks=[k], null_draws=2, silhouette_ceiling=2.0)
    assert ceiling.loc[0, "silhouette"] == pytest.approx(affinity_silhouette(T, labels, 2.0))
    with pytest.raises(TaeError, match="by='median'"):
        recommend_k(sweep, by="median")
    with pytest.raises(TaeError, match="silhouette"):
        recommend_k(sweep.drop(columns="silhouette"), by="silhouette")
    # no k with a defined silhouette (only k = 1 tried): one group
    assert recommend_k(sweep_k(T, ks=[1], null_draws=2), by="silhouette") == 1


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("T", "k", "match"),
    [
        (np.eye(4), 5, r"k=5 groups is impossible for n=4.*tr X = k <= n"),
        (np.eye(4), 0, r"k=0 groups is impossible.*1 <= k <= 4"),
        (np.ones((3, 4)), 2, r"shape \(3, 4\); pass a square"),
        (np.ones(4), 2, "1 dimension.*pass a 2-D"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), 1, r"non-finite entries \(first at \(0, 1\)\)"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), 1, r"not symmetric.*symmetrize=True"),
    ],
)
def test_bad_inputs_raise(T, k, match):
    with pytest.raises(TaeError, match=match):
        sdp_cluster(T, k)


def test_bad_options_raise():
    T = np.eye(4)
    with pytest.raises(TaeError, match="rounding='spectral'"):
        sdp_cluster(T, 2, rounding="spectral")
    with pytest.raises(TaeError, match="temperature=0"):
        sdp_relaxation(T, 2, temperature=0)
    with pytest.raises(TaeError, match="k=7 groups"):
        spectral_cluster(T, 7)
    with pytest.raises(ValueError):  # TaeError is a ValueError
        kmeans_cluster(T, 0)
