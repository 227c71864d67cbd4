"""Subsets per second of the batched estimator vs one scikit-learn fit per subset.

One synthetic gradient store (16 tasks, 20k rows, d = 200, 80% train) is written to a
temporary folder; the same random subsets (size 3–8) are fitted

* by :class:`~hf_tae.estimation.RegressionEstimator`, paper mode (intercept, C = 1e-2):
  batched Newton for the logistic loss and the closed form for the ridge;
* the reference way (gradtae_methods.md A.3): one ``sklearn.linear_model.LogisticRegression``
  (lbfgs, defaults but ``C``) per subset in a loop, and one ``Ridge`` per subset.

sklearn's defaults (tol 1e-4, 100 iterations) stop before convergence. Both are therefore
also measured against tightly converged sklearn fits of a few subsets (the exact answer), and
ours is timed at several tolerances (``--tols``): at 1e-6 it is far more exact than the
reference; the loosest tolerance whose error is still below sklearn's is the speedup "at the
same answer".

Prints subsets/second, the agreement (max |Δ decision values| on the subset's rows and the
coefficient correlation) and the speedup. Run: ``python benchmarks/estimation.py [--subsets N]``.
Results: ``benchmarks/results/estimation.txt``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from hf_tae.estimation import RegressionEstimator, sample_subsets
from hf_tae.gradients.store import GradientStore


def make_store(path: Path, tasks: int, rows: int, dim: int, seed: int = 0) -> GradientStore:
    """Tasks share a low-rank structure so that subsets differ in how much they help."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(4, dim)) / np.sqrt(dim)
    store = GradientStore.create(path, {"task_names": [f"task{t}" for t in range(tasks)]}, dim)
    per_task = rows // tasks
    for t in range(tasks):
        z = rng.normal(size=(per_task, dim)).astype(np.float32)
        direction = rng.normal(size=4) @ basis + 0.3 * rng.normal(size=dim) / np.sqrt(dim)
        logits = 3 * z @ direction
        score = (0.5 * logits + rng.normal(size=per_task)).astype(np.float32)
        label = (rng.random(per_task) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        split = np.where(np.arange(per_task) < 0.8 * per_task, "train", "validation")
        store.write_shard(
            {
                "task": np.full(per_task, t),
                "example_id": np.arange(per_task),
                "split": split,
                "label": label,
                "score": score,
                "grad": z,
            }
        )
    return store.finalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subsets", type=int, default=200, help="subsets fitted by ours")
    parser.add_argument("--reference-subsets", type=int, default=50, help="sklearn fits timed")
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--C", type=float, default=1e-2)
    parser.add_argument(
        "--tols", type=float, nargs="+", default=[1e-6, 1e-4, 1e-3], help="our Newton tolerances"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", args.tasks, args.rows, args.dim)
        subsets = sample_subsets(args.tasks, args.subsets, size=(3, 8), seed=0)
        ref_subsets = subsets[: args.reference_subsets]
        train = store.tensors("train")
        z, y, task = train["grad"].double().numpy(), train["label"].numpy() > 0, train["task"]
        print(f"store: {args.tasks} tasks, {len(store)} rows ({len(y)} train), d={args.dim}")
        print(f"torch threads: {torch.get_num_threads()}, device: cpu")

        tight_rows = [np.isin(task.numpy(), subset) for subset in ref_subsets[:5]]
        tight = [
            LogisticRegression(C=args.C, tol=1e-10, max_iter=10_000).fit(z[rows], y[rows])
            for rows in tight_rows
        ]

        def error_to_exact(w: torch.Tensor, b: torch.Tensor) -> float:
            """Max |Δ decision| against the tightly converged sklearn fits."""
            return max(
                np.abs(z[rows] @ w[k].numpy() + b[k].item() - ref.decision_function(z[rows])).max()
                for k, (rows, ref) in enumerate(zip(tight_rows, tight, strict=True))
            )

        for loss, ref_cls in (("logistic", LogisticRegression), ("squared", Ridge)):
            start = time.perf_counter()
            max_diff, correlations, reference = 0.0, [], []
            for subset in ref_subsets:
                rows = np.isin(task.numpy(), subset)
                if loss == "logistic":
                    ref = ref_cls(C=args.C).fit(z[rows], y[rows])
                    reference.append((ref.coef_[0], ref.intercept_[0]))
                else:  # same objective: ½‖y − Zw − b‖² + ‖w‖²/(2C), intercept unpenalized
                    ref = ref_cls(alpha=1 / args.C).fit(z[rows], np.where(y[rows], 1.0, -1.0))
                    reference.append((ref.coef_, ref.intercept_))
            ref_rate = len(ref_subsets) / (time.perf_counter() - start)
            if loss == "logistic":
                coefs = torch.tensor(np.array([c for c, _ in reference[:5]]))
                intercepts = torch.tensor([b for _, b in reference[:5]])
                print(
                    f"sklearn  LogisticRegression defaults: {ref_rate:7.1f} subsets/s | "
                    f"max |Δ decision| vs exact {error_to_exact(coefs, intercepts):.1e}"
                )
            for tol in args.tols if loss == "logistic" else [None]:
                kwargs = {"tol": tol} if tol is not None else {}
                est = RegressionEstimator(
                    store, loss=loss, mode="paper", C=args.C, device="cpu", **kwargs
                )
                start = time.perf_counter()
                w, b = est.fit(subsets, return_intercept=True)
                ours_rate = len(subsets) / (time.perf_counter() - start)
                for k, subset in enumerate(ref_subsets):
                    rows = np.isin(task.numpy(), subset)
                    coef, intercept = reference[k]
                    ours = z[rows] @ w[k].numpy() + b[k].item()
                    max_diff = max(max_diff, np.abs(ours - (z[rows] @ coef + intercept)).max())
                    correlations.append(np.corrcoef(coef, w[k].numpy())[0, 1])
                label = f"{loss} tol={tol:g}" if tol is not None else loss
                exact = f" | vs exact {error_to_exact(w, b):.1e}" if loss == "logistic" else ""
                print(
                    f"{label:16s} ours {ours_rate:8.1f} subsets/s | sklearn {ref_cls.__name__} "
                    f"{ref_rate:6.1f} subsets/s | speedup {ours_rate / ref_rate:5.1f}x | "
                    f"max |Δ decision| vs sklearn {max_diff:.1e}{exact} | "
                    f"min coef corr {min(correlations):.6f}"
                )
                if loss == "logistic":
                    print(f"                 Newton convergence: {est.convergence}")
                max_diff, correlations = 0.0, []


if __name__ == "__main__":
    main()
