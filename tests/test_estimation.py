"""RegressionEstimator against independent references (scikit-learn, scipy) on a model that is
linear in its parameters, plus the sampler and the bad inputs.

The reference model: logits = X θ, so per-example gradients are the rows of X. With an
orthogonal d × d projector Q the store holds z = X Q (float32) and s = X θ0, and a fit w
corresponds to θ = Q w in parameter space: z·w = x·(Q w), ‖w‖ = ‖Q w‖.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score, log_loss

from hf_tae.errors import TaeError
from hf_tae.estimation import (
    AffinityMatrix,
    RegressionEstimator,
    all_pairs,
    apply_delta,
    sample_subsets,
)
from hf_tae.gradients.store import GradientStore

D = 6
NUM_TASKS = 6
TASKS = [f"t{i}" for i in range(NUM_TASKS)]


def _rows(rng, task, n, split, Q, theta0):
    x = rng.normal(size=(n, D))
    theta = rng.normal(size=D) + task * 0.3
    y = (rng.random(n) < 1 / (1 + np.exp(-x @ theta))).astype(np.float32)
    return {
        "task": np.full(n, task),
        "example_id": np.arange(n) + (0 if split == "train" else 10_000),
        "split": split,
        "label": y,
        "score": (x @ theta0).astype(np.float32),
        "grad": (x @ Q).astype(np.float32),
    }


def make_store(path, metadata=None, train=60, validation=30, offsets=True, skip_train=()):
    """A store of the linear model; returns (store, Q)."""
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.normal(size=(D, D)))[0]
    theta0 = rng.normal(size=D) * 0.5 if offsets else np.zeros(D)
    store = GradientStore.create(path, {"task_names": TASKS, **(metadata or {})}, dim=D)
    for t in range(NUM_TASKS):
        if t not in skip_train:
            store.write_shard(_rows(rng, t, train + 7 * t, "train", Q, theta0))
        if validation:
            store.write_shard(_rows(rng, t, validation, "validation", Q, theta0))
    return store.finalize(), Q


def reference_rows(store, Q, tasks, split="train"):
    """Parameter-space rows X = z Qᵀ (exact for the stored float32 z), ±1 labels, offsets."""
    rows = store.tensors(split, tasks)
    x = rows["grad"].double().numpy() @ Q.T
    y = np.where(rows["label"].numpy() > 0, 1.0, -1.0)
    return x, y, rows["score"].double().numpy()


@pytest.fixture(scope="module")
def linear_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("linear") / "store")


# ------------------------------------------------------------------ (a) independent references
def test_paper_mode_equals_sklearn_logistic_regression(linear_store):
    store, Q = linear_store
    subset, C = [0, 2, 3], 0.05
    x, y, _ = reference_rows(store, Q, subset)
    clf = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x, y > 0)
    est = RegressionEstimator(store, mode="paper", C=C, device="cpu")
    w, b = est.fit([subset], return_intercept=True)
    assert est.convergence["max_relative_gradient"] <= 1e-6
    np.testing.assert_allclose(Q @ w[0].numpy(), clf.coef_[0], atol=1e-4)
    np.testing.assert_allclose(b[0].item(), clf.intercept_[0], atol=1e-4)
    xv, _, _ = reference_rows(store, Q, subset, "validation")
    ours = xv @ (Q @ w[0].numpy()) + b[0].item()
    np.testing.assert_allclose(ours, clf.decision_function(xv), atol=1e-4)


def test_principled_mode_equals_sklearn_without_offsets(tmp_path):
    store, Q = make_store(tmp_path / "store", offsets=False)
    subset, l2 = ["t1", "t4"], 3.0
    x, y, s = reference_rows(store, Q, subset)
    assert not s.any()
    clf = LogisticRegression(C=1 / l2, fit_intercept=False, tol=1e-12, max_iter=10_000)
    clf.fit(x, y > 0)
    w = RegressionEstimator(store, l2=l2, device="cpu").fit([subset])
    np.testing.assert_allclose(Q @ w[0].numpy(), clf.coef_[0], atol=1e-4)


def test_principled_mode_with_offsets_equals_direct_minimization(linear_store):
    """Offsets s = X θ0 have no sklearn counterpart: minimize Σ softplus(−y(s + Xθ)) + λ‖θ‖²/2
    over θ in parameter space with scipy's BFGS and map our w back (θ = Q w)."""
    store, Q = linear_store
    subset, l2 = [1, 2, 5], 0.7
    x, y, s = reference_rows(store, Q, subset)

    def objective(theta):
        m = y * (s + x @ theta)
        p = 1 / (1 + np.exp(m))
        return np.logaddexp(0, -m).sum() + l2 * theta @ theta / 2, -x.T @ (y * p) + l2 * theta

    ref = minimize(objective, np.zeros(D), jac=True, method="BFGS", options={"gtol": 1e-10}).x
    w = RegressionEstimator(store, l2=l2, device="cpu").fit([subset])
    np.testing.assert_allclose(Q @ w[0].numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(x @ Q @ w[0].numpy(), x @ ref, atol=1e-4)


def test_first_iteration_is_the_exact_newton_step_from_zero(linear_store, caplog):
    """With max_iter=1 the fit is one Newton step from w = 0 (the full step is accepted on this
    well-conditioned problem): w = −H⁻¹g with H and g of the subset's objective by autograd,
    independent of the per-task statistics the estimator solves it from. It warns that it
    stopped short of tol."""
    store, Q = linear_store
    subset, l2 = [0, 3, 4], 2.0
    x, y, s = reference_rows(store, Q, subset)
    xt, yt, st = (torch.as_tensor(a) for a in (x @ Q, y, s))  # z-space rows

    def objective(w):
        return torch.nn.functional.softplus(-yt * (st + xt @ w)).sum() + l2 * w @ w / 2

    zero = torch.zeros(D, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(objective, zero)
    grad = torch.autograd.functional.jacobian(objective, zero)
    newton = -torch.linalg.solve(hess, grad)
    est = RegressionEstimator(store, l2=l2, device="cpu", max_iter=1)
    with caplog.at_level("WARNING", logger="hf_tae.estimation.regression"):
        w = est.fit([subset])
    np.testing.assert_allclose(w[0].numpy(), newton.numpy(), rtol=1e-9, atol=1e-12)
    assert "max_iter=1" in caplog.text and "(0, 3, 4)" in caplog.text
    assert est.convergence["max_relative_gradient"] > 1e-6
    full = RegressionEstimator(store, l2=l2, device="cpu").fit([subset])
    assert not torch.allclose(w, full, atol=1e-6)  # the later iterations still move w


@pytest.mark.parametrize("mode", ["principled", "paper"])
def test_squared_loss_closed_form_equals_sklearn_ridge(linear_store, mode):
    store, Q = linear_store
    subset, l2 = [0, 3, 4], 2.5
    x, y, s = reference_rows(store, Q, subset)
    w, b = RegressionEstimator(store, loss="squared", l2=l2, mode=mode, device="cpu").fit(
        [subset], return_intercept=True
    )
    if mode == "principled":
        ridge = Ridge(alpha=l2, fit_intercept=False).fit(x, y - s)
        intercept = 0.0
    else:  # no offsets, unpenalized intercept: Ridge centers the data
        ridge = Ridge(alpha=l2, fit_intercept=True).fit(x, y)
        intercept = ridge.intercept_
    np.testing.assert_allclose(Q @ w[0].numpy(), ridge.coef_, atol=1e-6)
    np.testing.assert_allclose(b[0].item(), intercept, atol=1e-6)


# ------------------------------------------------------------------ (b) batching
@pytest.mark.parametrize("loss", ["logistic", "squared"])
def test_batched_fit_equals_one_at_a_time(linear_store, loss):
    store, _ = linear_store
    subsets = sample_subsets(NUM_TASKS, 50, size=(2, 4), seed=1)
    assert len(subsets) == 50
    est = RegressionEstimator(store, loss=loss, l2=0.5, device="cpu", batch_size=16)
    batched = est.fit(subsets)
    single = torch.cat([est.fit([s]) for s in subsets])
    torch.testing.assert_close(batched, single, atol=1e-9, rtol=0)


# ------------------------------------------------------------------ scoring
def test_evaluate_scores_linearized_outputs(linear_store):
    store, Q = linear_store
    subsets = [[0, 1], ["t2", "t5", "t0"]]
    est = RegressionEstimator(store, l2=1.0, device="cpu")
    w = est.fit(subsets)
    table = est.evaluate(subsets, w)
    assert list(table["subset_id"]) == [0, 0, 1, 1, 1]
    assert list(table["task"]) == [0, 1, 0, 2, 5]
    assert table["subset"][2] == [0, 2, 5]
    row = table.iloc[3]
    x, y, s = reference_rows(store, Q, [2], "validation")
    logits = s + x @ Q @ w[1].numpy()
    assert row["task_name"] == "t2" and row["num_rows"] == len(y)
    assert row["f1"] == pytest.approx(f1_score(y > 0, logits > 0))
    assert row["accuracy"] == pytest.approx(accuracy_score(y > 0, logits > 0))
    assert row["log_loss"] == pytest.approx(log_loss(y > 0, 1 / (1 + np.exp(-logits))), rel=1e-6)
    every = est.evaluate(subsets, w, targets="all")
    assert len(every) == 2 * NUM_TASKS
    affinity = AffinityMatrix.from_results(table, TASKS, metric="log_loss")
    assert affinity.counts[0, 2] == 1 and affinity.counts[0, 0] == 2


def test_one_class_paper_mode_is_seeded(linear_store):
    store, _ = linear_store
    fit = RegressionEstimator(store, mode="paper", one_class=True, seed=3, device="cpu").fit
    torch.testing.assert_close(fit([[0, 1]]), fit([[0, 1]]))


# ------------------------------------------------------------------ lifting
def test_lift_rescale_and_apply_delta(tmp_path):
    from hf_tae.gradients.capture import ProjectedGradientCapture

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    capture = ProjectedGradientCapture(model, dim=D, kind="dense", seed=5)
    store, _ = make_store(tmp_path / "store", {"projector": capture.metadata()})
    est = RegressionEstimator(store, mode="paper", rescale_norm=2.0, device="cpu")
    w = est.fit([[0, 1]])
    delta = est.lift(w[0])
    expected = capture.lift(w[0].float())
    assert delta.keys() == expected.keys()
    for name in delta:
        torch.testing.assert_close(delta[name], expected[name])
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))
    assert norm.item() == pytest.approx(2.0, rel=1e-5)
    by_w = RegressionEstimator(store, mode="paper", rescale_norm=2.0, norm="w", device="cpu")
    assert by_w.fit([[0, 1]])[0].norm().item() == pytest.approx(2.0)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with apply_delta(model, delta, scale=0.5):
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name] + 0.5 * delta[name])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])
    with pytest.raises(TaeError, match="does not have"):
        with apply_delta(model, {"nope": torch.zeros(1)}):
            pass


# ------------------------------------------------------------------ (d) samplers
def test_sample_subsets_properties():
    subsets = sample_subsets(12, 200, size=(2, 5), seed=7)
    assert len(subsets) == len(set(subsets)) == 200
    assert all(2 <= len(s) <= 5 and list(s) == sorted(set(s)) for s in subsets)
    assert sample_subsets(12, 200, size=(2, 5), seed=7) == subsets
    assert sample_subsets(12, 200, size=(2, 5), seed=8) != subsets
    # numeric, not string, order (F.8); names keep the given order
    assert all(list(s) == sorted(s) for s in sample_subsets([10, 2, 1, 30], 4, size=3))
    named = sample_subsets(["b", "a", "c"], 3, size=2, seed=0)
    assert set(named) == {("b", "a"), ("b", "c"), ("a", "c")}
    with_3 = sample_subsets(12, 30, size=4, seed=0, include=[3])
    assert all(3 in s and len(s) == 4 for s in with_3)
    rest = sample_subsets(6, 10, size=3, seed=0, exclude_existing=[(0, 1, 2), [5, 4, 3]])
    assert (0, 1, 2) not in rest and (3, 4, 5) not in rest
    assert len(sample_subsets(6, 18, size=3, exclude_existing=[(0, 1, 2), (3, 4, 5)])) == 18
    assert all_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_sampler_errors():
    with pytest.raises(TaeError, match="exceeds the 4 tasks"):
        sample_subsets(4, 1, size=5)
    with pytest.raises(TaeError, match="only 4 distinct"):
        sample_subsets(4, 5, size=3)
    with pytest.raises(TaeError, match="unknown tasks"):
        sample_subsets(4, 1, size=2, include=[9])
    with pytest.raises(TaeError, match="smaller than the 2 tasks"):
        sample_subsets(4, 1, size=1, include=[0, 1])


# ------------------------------------------------------------------ (f) bad inputs
def test_bad_inputs(tmp_path, linear_store, monkeypatch):
    store, _ = linear_store
    est = RegressionEstimator(store, device="cpu")
    with pytest.raises(TaeError, match=r"unknown task 'zz'.*t0"):
        est.fit([["t0", "zz"]])
    with pytest.raises(TaeError, match="unknown task 17"):
        est.fit([[17]])
    with pytest.raises(TaeError, match="apply to mode='paper' only"):
        RegressionEstimator(store, one_class=True)
    with pytest.raises(TaeError, match="shape"):
        est.evaluate([[0]], torch.zeros(2, D))

    sparse, _ = make_store(tmp_path / "sparse", skip_train=(4,))
    with pytest.raises(TaeError, match=r"subset \[4\] has no training rows"):
        RegressionEstimator(sparse, device="cpu").fit([[4]])

    no_val, _ = make_store(tmp_path / "noval", validation=0)
    est = RegressionEstimator(no_val, device="cpu")
    with pytest.raises(TaeError, match="no 'validation' rows"):
        est.evaluate([[0]], est.fit([[0]]))

    real = GradientStore.tensors

    def poisoned(self, split=None, tasks=None):
        rows = real(self, split, tasks)
        rows["grad"][3, 1] = float("nan")
        return rows

    monkeypatch.setattr(GradientStore, "tensors", poisoned)
    with pytest.raises(TaeError, match="NaN/inf in 'grad'"):
        RegressionEstimator(store, device="cpu")
