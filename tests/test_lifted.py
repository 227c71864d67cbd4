"""evaluate_lifted (a real forward pass at θ0 + P w_S) against independent references: the
linearized scores of RegressionEstimator.evaluate on a model linear in its parameters, and
scikit-learn metrics of plain model outputs; θ0 restoration and bad inputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss
from torch import nn

from hf_tae import SignConfig, SignForMultiTaskNodeClassification, TaeError
from hf_tae.estimation.regression import RegressionEstimator
from hf_tae.evaluation.lifted import COLUMNS, evaluate_lifted
from hf_tae.gradients.collector import GradientCollector
from hf_tae.models.scores import TaskLogitScore

SUBSETS = [[0, 1], [1, 2, 3], ["g1_c0"]]


class LinearInParams(nn.Module):
    """logits = W x + b: exactly linear in its parameters, so s(θ0 + P w) = s(θ0) + z·w."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.lin = nn.Linear(18, num_tasks)

    def forward(self, hop_features, **kwargs):
        return {"logits": self.lin(hop_features.flatten(1))}


@pytest.fixture(scope="module")
def task_set(tiny_graph):
    return tiny_graph.task_set(num_hops=2)


def _store(model, task_set, path, **kw):
    collector = GradientCollector(model, kind="dense", dim=12, batch_size=64, **kw)
    return collector.collect(task_set, path, show_progress=False)


def _state(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def _same_state(model, state):
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


@pytest.fixture(scope="module")
def sign(tiny_graph, task_set, tmp_path_factory):
    torch.manual_seed(0)
    config = SignConfig(in_features=6, num_hops=2, hidden_size=4, task_names=tiny_graph.task_names)
    model = SignForMultiTaskNodeClassification(config).eval()
    store = _store(model, task_set, tmp_path_factory.mktemp("lifted") / "store")
    return model, RegressionEstimator(store, l2=1.0, device="cpu")


def test_linear_model_lifted_equals_linearized(task_set, tmp_path):
    torch.manual_seed(0)
    model = LinearInParams(task_set.num_all_tasks).eval()
    store = _store(model, task_set, tmp_path / "store", score_fn=TaskLogitScore())
    est = RegressionEstimator(store, l2=0.1, device="cpu")
    w = est.fit(SUBSETS)
    assert w.abs().max() > 0.1  # a real move away from θ0
    theta0 = _state(model)
    lifted = evaluate_lifted(est, model, task_set, SUBSETS, w, show_progress=False)
    linear = est.evaluate(SUBSETS, w)
    assert list(lifted.columns) == list(COLUMNS) == list(linear.columns)
    for column in ("subset_id", "subset", "task", "task_name", "num_rows", "f1", "accuracy"):
        assert lifted[column].tolist() == linear[column].tolist(), column
    np.testing.assert_allclose(lifted["log_loss"], linear["log_loss"], rtol=0, atol=1e-6)
    _same_state(model, theta0)


def test_sign_lifted_at_zero_equals_sklearn_on_theta0_outputs(task_set, sign):
    model, est = sign
    theta0 = _state(model)
    model.train()  # evaluate_lifted switches to eval mode and back
    w = torch.zeros(len(SUBSETS), est.store.dim)
    table = evaluate_lifted(est, model, task_set, SUBSETS, w, batch_size=37, show_progress=False)
    assert model.training
    model.eval()
    _check_against_sklearn(table, model, task_set)
    _same_state(model, theta0)


def _check_against_sklearn(table, model, task_set):
    """Every row of ``table`` against sklearn metrics of ``model``'s outputs on the split."""
    hops = task_set.dataset.with_format("torch")[:]["hop_features"]
    ex = task_set.examples("validation")
    with torch.no_grad():
        logits = model(hops).logits.double().numpy()
    expected_rows = [(i, t) for i, s in enumerate([[0, 1], [1, 2, 3], [2]]) for t in s]
    assert list(zip(table["subset_id"], table["task"], strict=True)) == expected_rows
    for row in table.itertuples():
        sel = ex["task"] == row.task
        z, y = logits[ex["example_id"][sel], row.task], ex["label"][sel] > 0
        assert row.num_rows == sel.sum() and row.task_name == task_set.all_task_names[row.task]
        assert row.f1 == pytest.approx(f1_score(y, z > 0, zero_division=0.0))
        assert row.accuracy == pytest.approx(accuracy_score(y, z > 0))
        assert row.log_loss == pytest.approx(
            log_loss(y, 1 / (1 + np.exp(-z)), labels=[False, True]), rel=1e-6
        )


def test_sign_lifted_at_w_equals_a_moved_copy(task_set, sign):
    """θ0 + P w_S applied by hand to a copy (head left at θ0 with exclude='head')."""
    model, est = sign
    theta0 = _state(model)
    w = est.fit(SUBSETS)
    lifted_norm = [
        torch.sqrt(sum((d.double() ** 2).sum() for d in est.lift(row).values())) for row in w
    ]
    w = w / torch.stack(lifted_norm)[:, None].to(w)  # ‖Δθ‖ = 1: logits move by O(1)
    table = evaluate_lifted(est, model, task_set, SUBSETS, w, exclude="head", show_progress=False)
    _same_state(model, theta0)
    for b in range(len(SUBSETS)):
        moved = copy.deepcopy(model)
        delta = est.lift(w[b])
        assert any(n.startswith("head.") for n in delta)
        with torch.no_grad():
            for name, p in moved.named_parameters():
                if not name.startswith("head."):
                    p.add_(delta[name])
        _check_against_sklearn_rows(table[table["subset_id"] == b], moved, task_set)
    plain = evaluate_lifted(est, model, task_set, SUBSETS, w, show_progress=False)
    assert not np.allclose(plain["log_loss"], table["log_loss"])  # the head Δ matters
    at_zero = evaluate_lifted(est, model, task_set, SUBSETS, 0 * w, show_progress=False)
    assert not np.allclose(at_zero["log_loss"], table["log_loss"])  # θ really moved


def _check_against_sklearn_rows(rows, model, task_set):
    hops = task_set.dataset.with_format("torch")[:]["hop_features"]
    ex = task_set.examples("validation")
    with torch.no_grad():
        logits = model(hops).logits.double().numpy()
    for row in rows.itertuples():
        sel = ex["task"] == row.task
        z, y = logits[ex["example_id"][sel], row.task], ex["label"][sel] > 0
        assert row.f1 == pytest.approx(f1_score(y, z > 0, zero_division=0.0))
        assert row.accuracy == pytest.approx(accuracy_score(y, z > 0))
        assert row.log_loss == pytest.approx(
            log_loss(y, np.clip(1 / (1 + np.exp(-z)), 1e-15, 1 - 1e-15), labels=[False, True]),
            rel=1e-5,
        )


def test_bad_inputs(task_set, sign):
    model, est = sign
    with pytest.raises(TaeError, match=r"w has shape \(3, 5\); evaluate_lifted needs \[3, 12\]"):
        evaluate_lifted(est, model, task_set, SUBSETS, torch.zeros(3, 5), show_progress=False)
    with pytest.raises(TaeError, match=r"w has shape \(12,\)"):
        evaluate_lifted(est, model, task_set, [[0]], torch.zeros(12), show_progress=False)
    with pytest.raises(TaeError, match=r"have no 'validation' examples"):
        evaluate_lifted(
            est, model, task_set.select([0, 1]), [[2]], torch.zeros(1, 12), show_progress=False
        )
    with pytest.raises(TaeError, match="unknown task 'zz'"):
        evaluate_lifted(est, model, task_set, [["zz"]], torch.zeros(1, 12), show_progress=False)
