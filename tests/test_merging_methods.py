"""Per-tensor merge methods against closed forms and independent references (numpy, peft)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.utils import merge_utils

from hf_tae.errors import TaeError
from hf_tae.merging.heuristics import global_trim_threshold
from hf_tae.merging.registry import Block, TensorStats, get_method, method_names


def run(method: str, block: Block, **params) -> torch.Tensor:
    m = get_method(method)
    return m.fn(block, **m.check_params(params))[0]


def spd(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    x = rng.standard_normal((n or 3 * d, d))
    return x.T @ x / x.shape[0]


def test_registry_lists_methods_and_rejects_unknown_params():
    assert {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "fisher",
            "regmean", "mats"} <= set(method_names())  # fmt: skip
    with pytest.raises(TaeError, match="lambda"):
        get_method("ties").check_params({"lambda": 1.0})
    with pytest.raises(TaeError, match="unknown merge method 'slerp'"):
        get_method("slerp")


def test_regmean_of_least_squares_models_is_joint_least_squares():
    """Per-task least squares W_i; RegMean (α=1, weights = sample counts) = lstsq on all data."""
    rng = np.random.default_rng(0)
    d_in, d_out, sizes = 6, 4, [40, 25, 60]
    xs = [rng.standard_normal((n, d_in)) * rng.uniform(0.5, 2, d_in) for n in sizes]
    ys = [x @ rng.standard_normal((d_in, d_out)) + 0.3 * rng.standard_normal((len(x), d_out))
          for x in xs]  # fmt: skip
    ws = [np.linalg.lstsq(x, y, rcond=None)[0].T for x, y in zip(xs, ys, strict=True)]  # [out, in]
    joint = np.linalg.lstsq(np.vstack(xs), np.vstack(ys), rcond=None)[0].T
    block = Block(
        "layer.weight", None, [torch.tensor(w) for w in ws], [float(n) for n in sizes],
        [TensorStats(input_gram=torch.tensor(x.T @ x / len(x))) for x in xs], layout="linear",
    )  # fmt: skip
    merged = run("regmean", block, alpha=1.0)
    np.testing.assert_allclose(merged.numpy(), joint, rtol=1e-9, atol=1e-10)
    # GPT-2 Conv1D stores Wᵀ: the same merge, transposed
    block.models, block.layout = [torch.tensor(w.T) for w in ws], "conv1d"
    np.testing.assert_allclose(run("regmean", block, alpha=1.0).numpy(), joint.T, atol=1e-10)


def test_regmean_alpha_shrinks_off_diagonal():
    rng = np.random.default_rng(1)
    grams = [spd(rng, 5) for _ in range(2)]
    ws = [rng.standard_normal((3, 5)) for _ in range(2)]
    alpha = 0.4
    off = [alpha * a + (1 - alpha) * np.diag(np.diag(a)) for a in grams]
    expected = np.linalg.solve(sum(off), sum(a @ w.T for a, w in zip(off, ws, strict=True))).T
    block = Block("l.weight", None, [torch.tensor(w) for w in ws], [1.0, 1.0],
                  [TensorStats(input_gram=torch.tensor(a)) for a in grams], layout="linear")  # fmt: skip
    np.testing.assert_allclose(run("regmean", block, alpha=alpha).numpy(), expected, atol=1e-10)


def test_regmean_averages_tensors_without_gram_and_names_singular_layer():
    a = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))  # feature 1 never active
    models = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    stats = [TensorStats(input_gram=a), TensorStats(input_gram=a)]
    block = Block("encoder.block.0.q.weight", None, models, [1.0, 1.0], stats, layout="linear")
    with pytest.raises(TaeError, match=r"encoder\.block\.0\.q\.weight.*ridge"):
        run("regmean", block)
    assert torch.isfinite(run("regmean", block, ridge=1e-6)).all()
    bias = Block("encoder.block.0.q.bias", None, [torch.ones(2), 3 * torch.ones(2)], [1.0, 1.0],
                 [TensorStats(), TensorStats()])  # fmt: skip
    assert torch.equal(run("regmean", bias), 2 * torch.ones(2))


def test_fisher_merge_of_diagonal_gaussians_is_product_of_gaussians_mean():
    """Model i is N(μ_i, diag(σ_i²)) with Fisher 1/σ_i²; the product density's mode is the merge."""
    rng = np.random.default_rng(2)
    mus, sig2 = rng.standard_normal((3, 7)), rng.uniform(0.1, 3.0, (3, 7))
    # product of Gaussians: precision adds, mean = precision-weighted mean (independent of the code)
    prec = (1 / sig2).sum(0)
    mean = (mus / sig2).sum(0) / prec
    block = Block("p", None, [torch.tensor(m) for m in mus], [1.0] * 3,
                  [TensorStats(fisher=torch.tensor(1 / s)) for s in sig2])  # fmt: skip
    np.testing.assert_allclose(run("fisher", block).numpy(), mean, atol=1e-12)
    # a coordinate no model has Fisher for gets the plain average (floor 1e-8, A.4)
    block.stats = [TensorStats(fisher=torch.zeros(7, dtype=torch.float64)) for _ in range(3)]
    np.testing.assert_allclose(run("fisher", block).numpy(), mus.mean(0), atol=1e-12)


def test_cg_reaches_regmean_closed_form_from_any_start():
    rng = np.random.default_rng(3)
    grams = [spd(rng, 8) for _ in range(3)]
    ws = [rng.standard_normal((5, 8)) for _ in range(3)]
    base = rng.standard_normal((5, 8))
    expected = np.linalg.solve(sum(grams), sum(a @ w.T for a, w in zip(grams, ws, strict=True))).T
    block = Block("l.weight", torch.tensor(base), [torch.tensor(w) for w in ws], [1.0] * 3,
                  [TensorStats(input_gram=torch.tensor(a)) for a in grams], layout="linear")  # fmt: skip
    for init in ("average", "task_arithmetic", "ties", "base"):
        m = get_method("mats")
        out, info = m.fn(block, **m.check_params(
            {"objective": "regmean", "init": init, "max_iter": 200, "rtol": 1e-12}))  # fmt: skip
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-8)
        assert info["final_residual"] <= 1e-10 * info["rhs_norm"] + 1e-12
        assert info["initial_residual"] > info["final_residual"]


def test_cg_reaches_diagonal_fisher_and_dense_kfac_solutions():
    rng = np.random.default_rng(4)
    d_in, d_out = 4, 3
    ws = [rng.standard_normal((d_out, d_in)) for _ in range(2)]
    fishers = [rng.uniform(0.1, 2, (d_out, d_in)) for _ in range(2)]
    block = Block("l.weight", torch.zeros(d_out, d_in, dtype=torch.float64),
                  [torch.tensor(w) for w in ws], [1.0, 1.0],
                  [TensorStats(fisher=torch.tensor(f)) for f in fishers], layout="linear")  # fmt: skip
    expected = sum(f * w for f, w in zip(fishers, ws, strict=True)) / sum(fishers)
    out = run("mats", block, objective="fisher", init="average", max_iter=50, rtol=1e-14)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-10)

    # K-FAC: Σ_i (A_i ⊗ G_i) vec(V) = Σ_i (A_i ⊗ G_i) vec(V_i), solved densely (row-major vec of V = Wᵀ)
    a_s, g_s = [spd(rng, d_in) for _ in range(2)], [spd(rng, d_out) for _ in range(2)]
    dense = sum(np.kron(a, g) for a, g in zip(a_s, g_s, strict=True))
    rhs = sum(np.kron(a, g) @ w.T.reshape(-1) for a, g, w in zip(a_s, g_s, ws, strict=True))
    expected = np.linalg.solve(dense, rhs).reshape(d_in, d_out).T
    block.stats = [TensorStats(input_gram=torch.tensor(a), outgrad_gram=torch.tensor(g))
                   for a, g in zip(a_s, g_s, strict=True)]  # fmt: skip
    out = run("mats", block, objective="kfac", init="base", max_iter=500, rtol=1e-13)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-8)


def test_cg_block_fisher_and_null_space_keeps_init():
    rng = np.random.default_rng(5)
    vecs = [rng.standard_normal(6) for _ in range(2)]
    blocks = [spd(rng, 6) for _ in range(2)]
    expected = np.linalg.solve(sum(blocks), sum(f @ v for f, v in zip(blocks, vecs, strict=True)))
    block = Block("ia3_l", torch.ones(6, dtype=torch.float64), [torch.tensor(v) for v in vecs],
                  [1.0, 1.0], [TensorStats(fisher_block=torch.tensor(f)) for f in blocks])  # fmt: skip
    out = run("mats", block, objective="fisher_block", max_iter=100, rtol=1e-13)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-9)
    # a rank-1 Gram: CG fits only along its range; the rest of the start (the base) stays (A.7)
    u = rng.standard_normal(4)
    gram = np.outer(u, u)
    base = rng.standard_normal((2, 4))
    ws = [rng.standard_normal((2, 4)) for _ in range(2)]
    block = Block("l.weight", torch.tensor(base), [torch.tensor(w) for w in ws], [1.0, 1.0],
                  [TensorStats(input_gram=torch.tensor(gram))] * 2, layout="linear")  # fmt: skip
    out = run("mats", block, objective="regmean", init="base", max_iter=50).numpy()
    proj = np.eye(4) - np.outer(u, u) / (u @ u)  # onto the Gram's null space (input side)
    np.testing.assert_allclose(out @ proj, base @ proj, atol=1e-10)
    np.testing.assert_allclose(out @ u, np.mean([w @ u for w in ws], axis=0), atol=1e-8)


def _task_block(rng: np.random.Generator, m: int = 3, shape=(16, 12)) -> Block:
    base = torch.tensor(rng.standard_normal(shape), dtype=torch.float32)
    models = [
        base + torch.tensor(rng.standard_normal(shape), dtype=torch.float32) for _ in range(m)
    ]
    return Block("w", base, models, [0.7, 1.2, 0.4][:m])


def test_task_arithmetic_and_ties_agree_with_peft():
    block = _task_block(np.random.default_rng(6))
    taus, w = block.task_vectors(), torch.tensor(block.weights)
    expected = block.base + merge_utils.task_arithmetic(taus, w)
    torch.testing.assert_close(run("task_arithmetic", block), expected)
    for density in (0.2, 0.5, 1.0):
        for sign in ("total", "frequency"):
            expected = block.base + merge_utils.ties(taus, w, density, majority_sign_method=sign)
            torch.testing.assert_close(
                run("ties", block, density=density, sign_method=sign), expected)  # fmt: skip
    expected = block.base + 0.5 * merge_utils.ties(taus, w, 0.3)
    torch.testing.assert_close(run("ties", block, density=0.3, lam=0.5), expected)


def test_dare_agrees_with_peft_on_the_same_random_stream():
    block = _task_block(np.random.default_rng(7))
    taus, w = block.task_vectors(), torch.tensor(block.weights)
    for name, ref in (
        ("dare_linear", merge_utils.dare_linear),
        ("dare_ties", merge_utils.dare_ties),
    ):
        torch.manual_seed(11)
        expected = block.base + ref(taus, w, 0.4)
        torch.manual_seed(11)
        torch.testing.assert_close(run(name, block, density=0.4, seed=None), expected)
    # seeded per tensor: reproducible, and the drop rate is about 1 - density
    a, b = run("dare_linear", block, seed=3), run("dare_linear", block, seed=3)
    assert torch.equal(a, b)
    kept = (run("dare_linear", Block("w", block.base, block.models[:1], [1.0]), density=0.3)
            != block.base).float().mean()  # fmt: skip
    assert abs(kept.item() - 0.3) < 0.1


def test_global_trim_threshold_is_exact_kth_largest():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=gen) * 10 ** torch.randint(-3, 3, (1,), generator=gen)
               for s in [(7, 5), (100,), (3, 4, 5), (1,)]]  # fmt: skip
    tensors[1][:10] = tensors[1][0]  # ties at the threshold are kept
    flat = torch.cat([t.reshape(-1) for t in tensors]).abs()
    for density in (0.0, 0.01, 0.2, 0.5, 0.93, 1.0):
        k = int(density * flat.numel())
        expected = float("inf") if k == 0 else flat.topk(k).values[-1].item()
        assert global_trim_threshold(lambda: iter(tensors), density) == expected


def test_ties_global_trim_uses_given_thresholds():
    block = _task_block(np.random.default_rng(8))
    taus = block.task_vectors()
    th = [0.5, 1.0, 1.5]
    block.extra["thresholds"] = th
    trimmed = [t * (t.abs() >= x) for t, x in zip(taus, th, strict=True)]
    expected = block.base + merge_utils.disjoint_merge(
        torch.stack(trimmed) * torch.tensor(block.weights).reshape(-1, 1, 1),
        merge_utils.calculate_majority_sign_mask(torch.stack(trimmed)),
    )
    torch.testing.assert_close(run("ties", block, trim="global"), expected)
