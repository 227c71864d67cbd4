"""GradEx data selection: sources, estimates per subset of sources, ensemble scores, forward
selection, baselines and bad inputs, checked against independent references (brute force,
exhaustive search, scikit-learn, hand-traced passes)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hf_tae.errors import TaeError
from hf_tae.selection.estimate import SourceEstimator, SourceEstimatorEnsemble
from hf_tae.selection.select import (
    choose_top,
    ensemble_scores,
    forward_pass,
    forward_stepwise,
    gradient_similarity,
    oriented,
    random_subsets,
    top_k,
)
from hf_tae.selection.sources import (
    Sources,
    cluster_gradients,
    cluster_rows,
    sources_from_column,
    sources_from_tasks,
)

D = 6


def _linear_store(path, seed=0, n_per_source=40, kinds="hhnnxx", l2_noise=0.0):
    """A linear model f(x; θ) = x·θ at θ0 = 0: its gradient is x itself (identity projection),
    so the squared-loss regression on gradients *is* fine-tuning the model (exact estimate).

    Tasks 0..len(kinds)-1 are sources labelled by sign(x·θ_k): θ* for helpful ("h"), −θ* for
    harmful ("x"), a random direction for neutral ("n"); the last task is the target (θ*),
    with validation rows only.
    """
    from hf_tae.gradients.store import GradientStore

    rng = np.random.default_rng(seed)
    star = rng.normal(size=D)
    thetas = {"h": star, "x": -star}
    n_tasks = len(kinds) + 1
    names = [f"{k}{i}" for i, k in enumerate(kinds)] + ["target"]
    store = GradientStore.create(path, {"task_names": names}, dim=D)
    eid = 0
    for t, kind in enumerate([*kinds, "t"]):
        theta = thetas.get(kind, star if kind == "t" else rng.normal(size=D))
        for split, n in (("train", n_per_source if kind != "t" else 0), ("validation", 30)):
            if n == 0 or (split == "validation" and kind != "t"):
                continue
            x = rng.normal(size=(n, D)).astype(np.float32)
            store.write_shard({
                "task": np.full(n, t), "example_id": np.arange(eid, eid + n), "split": split,
                "label": (x @ theta > 0).astype(np.float32), "score": np.zeros(n, np.float32),
                "grad": x,
            })  # fmt: skip
            eid += n
    store.finalize()
    assert n_tasks == len(names)
    return store


@pytest.fixture
def linear(tmp_path):
    store = _linear_store(tmp_path / "store")
    sources = sources_from_tasks(store)
    return store, sources


def _brute_force_log_loss(store, subset, l2):
    """Ridge fit of the subset's rows and the target's validation log-loss, in numpy."""
    train = store.tensors("train")
    z, y, task = train["grad"].double().numpy(), train["label"].numpy(), train["task"].numpy()
    keep = np.isin(task, list(subset))
    zs, ys = z[keep], np.where(y[keep] > 0, 1.0, -1.0)
    w = np.linalg.solve(zs.T @ zs + l2 * np.eye(D), zs.T @ ys)
    val = store.tensors("validation")
    zv, yv = val["grad"].double().numpy(), np.where(val["label"].numpy() > 0, 1.0, -1.0)
    return float(np.mean(np.logaddexp(0, -yv * (zv @ w))))


# ---------------------------------------------------------------- ensemble scores
def test_ensemble_scores_match_a_brute_force_mean():
    subsets = [(0, 1), (1, 2), (0, 2, 3), (3,), (0, 1, 2, 3), (1,)]
    scores = [0.5, 0.2, 0.9, 0.4, 0.6, 0.1]
    table = ensemble_scores(subsets, scores, num_sources=5, names=list("abcde"))
    for s in range(4):
        mine = [v for sub, v in zip(subsets, scores, strict=True) if s in sub]
        row = table.iloc[s]
        assert row["count"] == len(mine)
        assert row["score"] == pytest.approx(np.mean(mine))
        assert row["std"] == pytest.approx(np.std(mine, ddof=1))
        half = 1.959963984540054 * np.std(mine, ddof=1) / math.sqrt(len(mine))
        assert row["ci_low"] == pytest.approx(np.mean(mine) - half)
    assert table.iloc[4]["count"] == 0 and np.isnan(table.iloc[4]["score"])
    # means: a 2/3, b 1.4/4=0.35, c 1.7/3, d 1.9/3 -> ranks a, d, c, b, then e
    assert table.sort_values("rank")["name"].tolist() == ["a", "d", "c", "b", "e"]
    assert choose_top(table, k=2) == [0, 3]
    assert choose_top(table, threshold=0.5) == [0, 2, 3]
    assert choose_top(table, k=1, candidates=[1, 2]) == [2]
    assert oriented([1.0, 2.0], "log_loss").tolist() == [-1.0, -2.0]


# ---------------------------------------------------------------- forward selection
def test_reference_forward_pass_on_a_hand_traced_example():
    table = {(): 0.50, (0,): 0.40, (1,): 0.60, (1, 2): 0.60, (1, 2, 3): 0.55, (1, 2, 4): 0.70}

    def score(subsets):
        return np.array([table[tuple(s)] for s in subsets])

    # by hand: 0 → 0.40 < 0.50 dropped; 1 → 0.60 kept; 2 → 0.60 ≥ 0.60 kept (ties keep);
    # 3 → 0.55 dropped; 4 → 0.70 kept
    chosen, trajectory = forward_pass(score, [0, 1, 2, 3, 4], start=0.50)
    assert chosen == [1, 2, 4]
    assert trajectory["kept"].tolist() == [False, True, True, False, True]
    assert trajectory["best"].tolist() == [0.50, 0.60, 0.60, 0.60, 0.70]


def test_stepwise_forward_selection_matches_exhaustive_search_on_an_exact_linear_model(linear):
    store, sources = linear
    l2 = 1.0
    est = SourceEstimator(store, sources, "target", loss="squared", l2=l2, device="cpu")
    candidates = est.candidates
    assert candidates == list(range(6))  # the target task (a 7th source) has no training rows

    every = [c for k in range(1, 7) for c in itertools.combinations(range(6), k)]
    estimated = est.estimate(every)["log_loss"].to_numpy()
    truth = np.array([_brute_force_log_loss(store, s, l2) for s in every])
    np.testing.assert_allclose(estimated, truth, rtol=1e-9)  # the estimate is exact here

    def score(subsets):
        return oriented(est.estimate(subsets)["log_loss"], "log_loss")

    start = -est.theta0_score()["log_loss"]
    chosen, trajectory = forward_stepwise(score, range(6), start, budget=6)
    exhaustive = every[int(np.argmin(truth))]
    assert tuple(chosen) == exhaustive
    assert set(chosen) & {0, 1} and not set(chosen) & {4, 5}  # helpful in, harmful out
    # each step's score is the best single addition, by brute force
    for step in range(1, 7):
        before = trajectory["subset"].iloc[step - 1]
        options = [tuple(sorted({*before, c})) for c in range(6) if c not in before]
        best = min(_brute_force_log_loss(store, o, l2) for o in options)
        assert -trajectory["score"].iloc[step] == pytest.approx(best, rel=1e-9)

    passed, _ = forward_pass(score, range(6), start)
    assert set(passed) & {0, 1} and not set(passed) & {4, 5}


def test_estimates_with_a_base_source_and_a_fixed_step(linear):
    store, sources = linear
    est = SourceEstimator(store, sources, "target", base=["h0"], loss="squared",
                          step_norm=0.5, norm="w", device="cpu")  # fmt: skip
    assert est.candidates == [1, 2, 3, 4, 5]
    table = est.estimate([["h1"], [4, 5]])
    assert table["subset"].tolist() == [[0, 1], [0, 4, 5]]
    np.testing.assert_allclose(table["step_norm"], 0.5)
    assert table["train_rows"].tolist() == [80, 120]


def test_ensemble_of_meta_inits_averages_the_brute_force_estimates(tmp_path):
    stores = [_linear_store(tmp_path / f"s{seed}", seed=seed) for seed in (0, 1, 2)]
    members = [SourceEstimator(s, sources_from_tasks(s), "target", base=["h0"], loss="squared",
                               l2=1.0, device="cpu") for s in stores]  # fmt: skip
    ens = SourceEstimatorEnsemble(members)
    assert len(ens) == 3 and ens.candidates == [1, 2, 3, 4, 5] and ens.base == [0]
    subsets = [["h1"], ["n2", "x5"], [1, 2, 3, 4, 5]]
    truth = [np.mean([_brute_force_log_loss(s, {0, *ids}, 1.0) for s in stores])
             for ids in ([1], [2, 5], [1, 2, 3, 4, 5])]  # fmt: skip
    np.testing.assert_allclose(ens.estimate(subsets)["log_loss"], truth, rtol=1e-9)
    at_zero = np.mean([m.theta0_score()["log_loss"] for m in members])
    assert ens.theta0_score()["log_loss"] == pytest.approx(math.log(2)) == pytest.approx(at_zero)
    other = _linear_store(tmp_path / "short", n_per_source=30)
    with pytest.raises(TaeError, match="member 1 .* does not serve the same"):
        SourceEstimatorEnsemble([members[0], SourceEstimator(other, sources_from_tasks(other),
                                                             "target", base=["h0"])])  # fmt: skip
    with pytest.raises(TaeError, match="at least one"):
        SourceEstimatorEnsemble([])


# ---------------------------------------------------------------- baselines
def test_gradient_similarity_and_random_baselines(linear):
    store, sources = linear
    train = store.tensors("train")
    target = store.tensors("validation")["grad"].numpy()
    sims = gradient_similarity(train["grad"].numpy(), sources.ids, len(sources), target)
    for s in range(6):
        a = train["grad"].numpy()[sources.ids == s].mean(0)
        b = target.mean(0)
        assert sims[s] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-6)
    assert np.isnan(sims[6])  # the target task holds no training rows
    assert top_k(sims, 2, range(7)) == sorted(np.argsort(-np.nan_to_num(sims, nan=-9))[:2])
    draws = random_subsets(range(6), 3, count=4, seed=1)
    assert len(draws) == 4 and all(len(d) == 3 and len(set(d)) == 3 for d in draws)
    assert draws == random_subsets(range(6), 3, count=4, seed=1)


# ---------------------------------------------------------------- sources
def test_gradient_clusters_match_scikit_learn():
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5))  # generic data: no planted clusters, no ties
    mine = cluster_rows(x, 6, "agglomerative")
    ref = AgglomerativeClustering(6, metric="cosine", linkage="average").fit_predict(x)
    assert adjusted_rand_score(mine, ref) == 1.0

    centers = rng.normal(size=(4, 5)) * 5
    blobs = np.concatenate([c + rng.normal(size=(30, 5)) for c in centers])
    unit = blobs / np.linalg.norm(blobs, axis=1, keepdims=True)
    mine = cluster_rows(blobs, 4, "kmeans", seed=3)
    ref = KMeans(4, n_init=10, random_state=11).fit_predict(unit)
    assert adjusted_rand_score(mine, ref) == 1.0
    assert mine[0] == 0 and len(set(mine.tolist())) == 4  # numbered by first row


def test_sources_from_column_tasks_and_clusters(linear, tmp_path):
    store, _ = linear
    example_id = store.tensors("train")["example_id"].numpy()
    column = np.array(["odd", "even"] * 500)[: example_id.max() + 1]
    by_column = sources_from_column(store, column, column="parity")
    assert by_column.names == ["even", "odd"]
    assert (np.array(by_column.names)[by_column.ids] == column[example_id]).all()
    by_tasks = sources_from_tasks(store)
    assert by_tasks.counts().tolist() == [40] * 6 + [0]
    clusters = cluster_gradients(store, 3, "kmeans")
    assert len(clusters.ids) == 240 and clusters.details["num_clusters"] == 3
    clusters.save(tmp_path / "sources.json")
    again = Sources.load(tmp_path / "sources.json")
    assert again.names == clusters.names and (again.ids == clusters.ids).all()


# ---------------------------------------------------------------- bad input
def test_bad_inputs_raise(linear):
    store, sources = linear
    with pytest.raises(TaeError, match="not a task"):
        SourceEstimator(store, sources, "nope", loss="squared")
    with pytest.raises(TaeError, match="cover"):
        SourceEstimator(store, Sources(sources.ids[:-5], sources.names, "tasks"), "target")
    with pytest.raises(TaeError, match="cover"):
        Sources(np.full(240, 9), ["a", "b"], "column")
    est = SourceEstimator(store, sources, "target", loss="squared", device="cpu")
    with pytest.raises(TaeError, match="no training rows"):
        est.estimate([["target"]])  # the target task has no training rows here
    with pytest.raises(TaeError, match="unknown source"):
        est.estimate([["zz"]])
    for bad in (0, 0.0, float("nan"), -1.0, float("inf")):
        with pytest.raises(TaeError, match="step size"):
            SourceEstimator(store, sources, "target", step_norm=bad)
        with pytest.raises(TaeError, match="step size"):
            SourceEstimator(store, sources, "target", step_fraction=bad, theta0_norm=1.0)
    with pytest.raises(TaeError, match="budget"):
        forward_stepwise(lambda s: np.zeros(len(s)), range(3), 0.0, budget=4)
    with pytest.raises(TaeError, match="candidate"):
        choose_top(ensemble_scores([(0,)], [1.0], 2), k=3)
    with pytest.raises(TaeError, match="num_clusters"):
        cluster_rows(np.ones((3, 2)), 5)


def test_estimated_vs_real_against_scipy_on_shared_subsets():
    """Only subsets with both an estimate and a real run count; errors and correlations as
    numpy/scipy compute them; a constant side has no correlation (NaN), not a warning."""
    import pandas as pd
    from scipy import stats

    from hf_tae.selection.check import estimated_vs_real

    estimated = pd.DataFrame({"subset": [(0,), (1,), (0, 1), (2,)], "acc": [0.5, 0.7, 0.9, 0.1]})
    real = pd.DataFrame({"subset": [(0, 1), (0,), (1,)], "acc": [0.8, 0.4, 0.8]})
    out = estimated_vs_real(estimated, real, "acc")
    est, true = np.array([0.5, 0.7, 0.9]), np.array([0.4, 0.8, 0.8])
    assert out["num_subsets"] == 3
    assert out["mean_abs_error"] == pytest.approx(np.mean(np.abs(est - true)))
    assert out["mean_rel_error"] == pytest.approx(np.mean(np.abs(est - true) / true))
    assert out["spearman"] == pytest.approx(stats.spearmanr(est, true).statistic)
    assert out["pearson"] == pytest.approx(stats.pearsonr(est, true).statistic)
    flat = estimated_vs_real(estimated.assign(acc=0.5), real, "acc")
    assert math.isnan(flat["spearman"]) and math.isnan(flat["pearson"])
    with pytest.raises(TaeError, match="only 1 subsets"):
        estimated_vs_real(estimated, real.iloc[:1], "acc")
