"""gradient_cosine_affinity, fisher_affinity and ntk_affinity against autograd, scikit-learn and
the kernel identity on the linear-model store of test_estimation, the cosine's λ → ∞ link to the
regression estimator, the overlaps' closed forms, the job's --affinity_kind, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity
from test_estimation import NUM_TASKS, TASKS, make_store

from hf_tae.errors import TaeError
from hf_tae.estimation import RegressionEstimator
from hf_tae.estimation.gradient_affinity import (
    fisher_affinity,
    gradient_affinity,
    gradient_cosine_affinity,
    ntk_affinity,
    task_loss_gradients,
)
from hf_tae.gradients.store import GradientStore
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


def test_fisher_overlap_matches_per_example_autograd_and_sklearn(linear_store):
    """F_t = mean over task t's rows of ∇ℓ_e ∇ℓ_eᵀ (one autograd backward per example), then the
    cosine of the flattened matrices (sklearn)."""
    rows = linear_store.tensors("train")
    fishers = []
    for t in range(NUM_TASKS):
        sel = (rows["task"] == t).nonzero()[:, 0]
        outer = []
        for e in sel.tolist():
            z, s = rows["grad"][e].double(), rows["score"][e].double()
            y = 1.0 if rows["label"][e] > 0 else -1.0
            w = torch.zeros(len(z), dtype=torch.float64, requires_grad=True)
            torch.nn.functional.softplus(-y * (s + z @ w)).backward()
            outer.append(torch.outer(w.grad, w.grad).numpy())
        fishers.append(np.mean(outer, axis=0).ravel())
    reference = cosine_similarity(np.stack(fishers))
    affinity = fisher_affinity(linear_store, zero_diagonal=False)
    np.testing.assert_allclose(affinity.values, reference, atol=1e-9)
    assert affinity.kind == "fisher" and affinity.task_names == TASKS
    zeroed = fisher_affinity(linear_store)
    np.fill_diagonal(reference, 0.0)
    np.testing.assert_allclose(zeroed.values, reference, atol=1e-9)


def test_ntk_overlap_is_the_normalized_squared_kernel_between_the_tasks(linear_store):
    """⟨G_i, G_j⟩ = Σ_{a∈i, b∈j} (z_a·z_b)² / (n_i n_j), computed here from the rows' Gram
    matrix (n × n, never the d × d second moments), normalized by the diagonal."""
    rows = linear_store.tensors("train")
    z, task = rows["grad"].double().numpy(), rows["task"].numpy()
    kernel = (z @ z.T) ** 2
    inner = np.array([[kernel[np.ix_(task == i, task == j)].mean() for j in range(NUM_TASKS)]
                      for i in range(NUM_TASKS)])  # fmt: skip
    reference = inner / np.sqrt(np.outer(np.diag(inner), np.diag(inner)))
    affinity = ntk_affinity(linear_store, zero_diagonal=False)
    np.testing.assert_allclose(affinity.values, reference, atol=1e-9)
    assert affinity.kind == "ntk" and affinity.task_names == TASKS
    np.fill_diagonal(reference, 0.0)
    np.testing.assert_allclose(ntk_affinity(linear_store).values, reference, atol=1e-9)
    np.testing.assert_allclose(gradient_affinity(linear_store, "ntk").values, reference,
                               atol=1e-9)  # fmt: skip


def test_ntk_overlap_reads_neither_labels_nor_fit_where_the_fisher_does(tmp_path):
    """Flipping every label and replacing the scores leaves the NTK overlap unchanged and moves
    the Fisher overlap (its weights σ(−y s)² are the residuals of θ0's fit)."""
    rng = np.random.default_rng(1)
    blocks = [(rng.normal(size=(30, 5)) + mean, (rng.random(30) > 0.5).astype(float),
               rng.normal(size=30) * 3) for mean in (0.0, 0.5, -0.5)]  # fmt: skip
    flipped = [(z, 1.0 - label, rng.normal(size=30) * 3) for z, label, _ in blocks]
    first, second = _store(tmp_path / "a", blocks), _store(tmp_path / "b", flipped)
    np.testing.assert_allclose(ntk_affinity(first).values, ntk_affinity(second).values,
                               atol=1e-12)  # fmt: skip
    assert not np.allclose(fisher_affinity(first).values, fisher_affinity(second).values,
                           atol=1e-3)  # fmt: skip


def test_a_kind_not_read_off_gradients_is_refused_by_name(linear_store):
    with pytest.raises(TaeError, match="'higher-order' is not read off gradients"):
        gradient_affinity(linear_store, "higher-order")


def _store(path, blocks):
    """A store whose task t has train rows ``blocks[t] = (z, label, score)``."""
    store = GradientStore.create(path, {"task_names": [f"t{t}" for t in range(len(blocks))]},
                                 dim=blocks[0][0].shape[1])  # fmt: skip
    for t, (z, label, score) in enumerate(blocks):
        store.write_shard({"task": np.full(len(z), t), "example_id": np.arange(len(z)) + 1000 * t,
                           "split": "train", "label": label.astype(np.float32),
                           "score": score.astype(np.float32), "grad": z.astype(np.float32)})  # fmt: skip
    return store.finalize()


@pytest.mark.parametrize("overlap", [fisher_affinity, ntk_affinity])
def test_overlap_closed_forms(tmp_path, overlap):
    """Tasks sensitive to disjoint coordinates overlap 0; a task and a rescaled copy of it
    (gradients ×3, the same residuals) overlap 1: the affinity reads directions, not scale."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 6))
    left, right = z.copy(), z.copy()
    left[:, 3:], right[:, :3] = 0.0, 0.0
    label, score = (rng.random(40) > 0.5).astype(float), rng.normal(size=40)
    store = _store(tmp_path / "s", [(left, label, score), (right, label, score),
                                    (3 * left, label, score)])  # fmt: skip
    values = overlap(store, zero_diagonal=False).values
    assert values[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert values[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(np.diag(values), 1.0)


def test_fisher_overlap_names_a_task_without_rows(tmp_path):
    store = make_store(tmp_path / "no_train_t4", skip_train=(4,))[0]
    with pytest.raises(TaeError, match=r"\['t4'\].*train"):
        fisher_affinity(store)


def _reference_affinity(store, kind):
    """The job's affinity of one member recomputed with numpy/sklearn from the store."""
    per_split = {}
    for split in ("validation", "train"):
        rows = store.tensors(split)
        y = np.where(rows["label"].numpy() > 0, 1.0, -1.0)
        s, z = rows["score"].double().numpy(), rows["grad"].double().numpy()
        residual = 1 / (1 + np.exp(y * s))  # σ(−y s)
        task = rows["task"].numpy()
        tasks = range(len(store.task_names))
        if kind in ("fisher", "ntk"):
            weight = residual**2 if kind == "fisher" else np.ones_like(residual)
            per_split[split] = np.stack([
                ((weight[task == t, None] * z[task == t]).T @ z[task == t]).ravel()
                / (task == t).sum() for t in tasks])  # fmt: skip
        else:
            per_split[split] = np.stack([(y * residual)[task == t] @ z[task == t] for t in tasks])
    if kind in ("fisher", "ntk"):
        values = cosine_similarity(per_split["train"])
    else:
        values = cosine_similarity(per_split["validation"], per_split["train"])
        values = (values + values.T) / 2
    np.fill_diagonal(values, 0.0)
    return values


@pytest.mark.parametrize("kind", ["ntk", "fisher", "gradient-cosine"])
def test_graph_job_clusters_the_chosen_affinity(tmp_path, kind):
    """``hf-tae run --affinity_kind KIND``: the saved affinity is the members' mean (recomputed
    here with numpy/sklearn from the stores), the subsets are still estimated (they score the
    candidate partitions), and the report says which affinity was clustered."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from test_recipe_graph import SMALL, _env

    from hf_tae import AffinityMatrix

    out = tmp_path / "run"
    cli = Path(sys.executable).with_name("hf-tae")
    cmd = [str(cli), "run", "--output_dir", str(out), *SMALL, "--affinity_kind", kind,
           "--train_groups", "false", "--num_task_groups", "0"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    affinity = AffinityMatrix.load(out / "affinity")
    assert affinity.kind == kind
    stores = [out / "gradients", out / "ensemble" / "member_1" / "gradients"]
    expected = np.mean([_reference_affinity(GradientStore.load(p), kind) for p in stores], axis=0)
    np.testing.assert_allclose(affinity.to_numpy(), expected, atol=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["estimation"]["affinity_kind"] == kind
    assert len(affinity.results) == 2 * results["estimation"]["num_subsets"] * 2  # 2 members
    assert "higher_order_self_agreement" in results["estimation"]
    assert f"--affinity_kind {kind}" in (out / "report.md").read_text()
    # k by silhouette on the cosine distance 1 − W (these kinds are cosines), as scikit-learn
    # computes it
    from sklearn.metrics import silhouette_score

    W = affinity.to_numpy()
    D = 1 - (W + W.T) / 2
    np.fill_diagonal(D, 0.0)
    for row in results["grouping"]["sweep"]:
        if 1 < len(set(row["labels"])) < len(W):
            expected = silhouette_score(D, row["labels"], metric="precomputed")
            assert row["silhouette"] == pytest.approx(expected, abs=1e-9)
    assert results["grouping"]["k_choice"].startswith("best silhouette k=")
