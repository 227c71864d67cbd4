"""gradient_cosine_affinity against autograd and scikit-learn on the linear-model store of
test_estimation, its λ → ∞ link to the regression estimator, and its bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity
from test_estimation import NUM_TASKS, TASKS, make_store

from hf_tae.errors import TaeError
from hf_tae.estimation import RegressionEstimator
from hf_tae.estimation.gradient_cosine import gradient_cosine_affinity, task_loss_gradients
from hf_tae.pipeline.arguments import EstimationArguments, GroupingArguments, check_arguments


@pytest.fixture(scope="module")
def linear_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cosine") / "store")[0]


def autograd_descent(store, split, gold=False):
    """Per task, −∇_w Σ softplus(−y (s + z·w)) at w = 0, by autograd on float64 rows."""
    rows = store.tensors(split)
    out = []
    for t in range(NUM_TASKS):
        sel = rows["task"] == t
        z, s = rows["grad"][sel].double(), rows["score"][sel].double()
        y = torch.ones(len(s), dtype=torch.float64) if gold else (rows["label"][sel] > 0) * 2.0 - 1
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        torch.nn.functional.softplus(-y * (s + z @ w)).sum().backward()
        out.append(-w.grad.numpy())
    return np.stack(out)


def test_cosine_matches_autograd_and_sklearn(linear_store):
    raw = gradient_cosine_affinity(linear_store, symmetrize=False, zero_diagonal=False)
    train = autograd_descent(linear_store, "train")
    validation = autograd_descent(linear_store, "validation")
    reference = cosine_similarity(validation, train)  # [i, j]: target i, source j
    np.testing.assert_allclose(raw.values, reference, atol=1e-6)
    assert raw.kind == "gradient-cosine" and raw.task_names == TASKS
    clustered = gradient_cosine_affinity(linear_store)
    expected = (reference + reference.T) / 2
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(clustered.values, expected, atol=1e-6)


def test_gold_scores_use_positive_targets(linear_store):
    gradients, counts = task_loss_gradients(linear_store, "train", label_kind="gold")
    np.testing.assert_allclose(gradients, autograd_descent(linear_store, "train", gold=True),
                               rtol=1e-6, atol=1e-8)  # fmt: skip
    assert counts == [int((linear_store.tensors("train")["task"] == t).sum())
                      for t in range(NUM_TASKS)]  # fmt: skip


def test_is_the_direction_of_the_strongly_regularized_estimate(linear_store):
    """As λ → ∞, λ·w_{j} → the summed descent direction g_j: the affinity's source side."""
    estimator = RegressionEstimator(linear_store, l2=1e9)
    w = estimator.fit([[t] for t in range(NUM_TASKS)]).numpy() * 1e9
    np.testing.assert_allclose(w, autograd_descent(linear_store, "train"), rtol=1e-5, atol=1e-6)


def test_missing_rows_and_split_are_named(tmp_path):
    store = make_store(tmp_path / "no_train_t2", skip_train=(2,))[0]
    with pytest.raises(TaeError, match=r"\['t2'\].*train"):
        gradient_cosine_affinity(store)
    no_validation = make_store(tmp_path / "no_validation", validation=0)[0]
    with pytest.raises(TaeError, match="no 'validation' rows"):
        gradient_cosine_affinity(no_validation)


def test_affinity_kind_is_checked():
    with pytest.raises(TaeError, match="--affinity_kind 'cosine'"):
        check_arguments(EstimationArguments(affinity_kind="cosine"), GroupingArguments())


def test_graph_job_clusters_the_gradient_cosine_affinity(tmp_path):
    """``hf-tae run --affinity_kind gradient-cosine``: the saved affinity is the members' mean
    cosine (recomputed here with numpy/sklearn from the stores), the subsets are still estimated
    (they score the candidate partitions), and the report says which affinity was clustered."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_recipe_graph import SMALL, _env

    from hf_tae import AffinityMatrix, GradientStore

    out = tmp_path / "run"
    cli = Path(sys.executable).with_name("hf-tae")
    cmd = [str(cli), "run", "--output_dir", str(out), *SMALL, "--affinity_kind",
           "gradient-cosine", "--train_groups", "false"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    affinity = AffinityMatrix.load(out / "affinity")
    assert affinity.kind == "gradient-cosine"
    expected = []
    for path in (out / "gradients", out / "ensemble" / "member_1" / "gradients"):
        store = GradientStore.load(path)
        per_split = []
        for split in ("validation", "train"):
            rows = store.tensors(split)
            y = np.where(rows["label"].numpy() > 0, 1.0, -1.0)
            s, z = rows["score"].double().numpy(), rows["grad"].double().numpy()
            weight = y / (1 + np.exp(y * s))  # y σ(−y s)
            task = rows["task"].numpy()
            per_split.append(np.stack([(weight[task == t, None] * z[task == t]).sum(0)
                                       for t in range(len(store.task_names))]))  # fmt: skip
        cos = cosine_similarity(*per_split)
        cos = (cos + cos.T) / 2
        np.fill_diagonal(cos, 0.0)
        expected.append(cos)
    np.testing.assert_allclose(affinity.to_numpy(), np.mean(expected, axis=0), atol=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["estimation"]["affinity_kind"] == "gradient-cosine"
    assert len(affinity.results) == 2 * results["estimation"]["num_subsets"] * 2  # 2 members
    assert "higher_order_self_agreement" in results["estimation"]
    assert "gradient-cosine" in (out / "report.md").read_text()
