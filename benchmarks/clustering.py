"""SDP task grouping: solve time vs n, and recovery of planted groups vs the baselines.

1. Solve time (compile + SCS solve, same eps) of the A.5 relaxation on random symmetric T
   with k = 5, for n in ``--sizes``:

   * ours, :func:`~hf_tae.clustering.sdp_relaxation`: one vectorized ``X @ 1 == 1``;
   * the reference formulation (gradtae_methods.md A.5): minimize tr((max T − T) X) with n
     separate constraints tr(A_i X) = 1, A_i all-ones in column i. Its n dense n × n matrices
     make compilation slow and memory-hungry, so n above ``--reference-cap`` is reported as
     "skipped (> cap)".

   Ours is timed under each BLAS thread limit in ``--threads`` (threadpoolctl); the reference
   under the first. SCS's wheel bundles a single-threaded OpenBLAS, so the limit barely
   matters.
2. Recovery on ``--instances`` planted matrices: n tasks split into k groups of unequal sizes
   (random, at least 3 each), entries N(1, σ) within groups and N(0, σ) across, symmetrized,
   with σ drawn from ``--noise`` (default 0.6–1.1: from clear to barely separable). A method
   recovers an instance when its partition equals the planted one (adjusted Rand index 1).
   Compared: :func:`~hf_tae.clustering.sdp_cluster` (k-means rounding),
   :func:`~hf_tae.clustering.spectral_cluster` and :func:`~hf_tae.clustering.kmeans_cluster`.

Prints both tables and writes them to ``benchmarks/results/clustering.txt`` at the end.
Run: ``python benchmarks/clustering.py [--sizes 50 100 200 300 500] [--instances 50]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import cvxpy as cp
import numpy as np
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from hf_tae.clustering import kmeans_cluster, sdp_cluster, sdp_relaxation, spectral_cluster

RESULTS = Path(__file__).parent / "results" / "clustering.txt"
K_TIMING = 5


def random_symmetric(n: int, seed: int) -> np.ndarray:
    T = np.random.default_rng(seed).normal(size=(n, n))
    return (T + T.T) / 2


def reference_solve(T: np.ndarray, k: int, eps: float, max_iters: int) -> tuple[float, str]:
    """The A.5 reference formulation, row sums as n trace constraints; (seconds, status)."""
    n = len(T)
    start = time.perf_counter()
    X = cp.Variable((n, n), symmetric=True)
    constraints = [X >> 0, X >= 0, cp.trace(X) == k]
    for i in range(n):
        A = np.zeros((n, n))
        A[:, i] = 1.0
        constraints.append(cp.trace(A @ X) == 1)
    problem = cp.Problem(cp.Minimize(cp.trace((T.max() - T) @ X)), constraints)
    problem.solve(solver=cp.SCS, eps=eps, max_iters=max_iters)
    return time.perf_counter() - start, str(problem.status)


def timing_table(args: argparse.Namespace) -> list[str]:
    header = ["n"] + [f"ours {t} thr (s)" for t in args.threads]
    header += [f"reference {args.threads[0]} thr (s)", "reference / ours", "status"]
    rows = []
    for n in tqdm(args.sizes, desc="solve time vs n"):
        T = random_symmetric(n, seed=n)
        ours, statuses = [], set()
        for threads in args.threads:
            with threadpool_limits(limits=threads):
                solution = sdp_relaxation(T, K_TIMING, eps=args.eps, max_iters=args.max_iters)
            ours.append(solution.solve_time)
            statuses.add(solution.status)
        if n > args.reference_cap:
            ref_cell, ratio = f"skipped (> cap {args.reference_cap})", "-"
        else:
            with threadpool_limits(limits=args.threads[0]):
                ref_time, ref_status = reference_solve(T, K_TIMING, args.eps, args.max_iters)
            statuses.add(ref_status)
            ref_cell, ratio = f"{ref_time:.2f}", f"{ref_time / ours[0]:.2f}x"
        rows.append([str(n), *(f"{t:.2f}" for t in ours), ref_cell, ratio, "/".join(statuses)])
    return format_table(header, rows)


def planted_instance(rng: np.random.Generator, args: argparse.Namespace):
    n = int(rng.integers(args.n_min, args.n_max + 1))
    k = int(rng.integers(args.k_min, args.k_max + 1))
    sizes = 3 + rng.multinomial(n - 3 * k, rng.dirichlet(np.ones(k)))  # unequal, ≥ 3 each
    labels = rng.permutation(np.repeat(np.arange(k), sizes))
    sigma = float(rng.uniform(*args.noise))
    same = labels[:, None] == labels[None, :]
    T = np.where(same, rng.normal(1.0, sigma, (n, n)), rng.normal(0.0, sigma, (n, n)))
    return (T + T.T) / 2, labels, k


def recovery_table(args: argparse.Namespace) -> tuple[list[str], str]:
    methods = {
        "SDP (kmeans rounding)": lambda T, k: sdp_cluster(T, k, eps=args.eps),
        "spectral": spectral_cluster,
        "kmeans": kmeans_cluster,
    }
    hits = dict.fromkeys(methods, 0)
    ari = {name: [] for name in methods}
    seconds = dict.fromkeys(methods, 0.0)
    rng = np.random.default_rng(args.seed)
    for _ in tqdm(range(args.instances), desc="planted recovery"):
        T, labels, k = planted_instance(rng, args)
        for name, method in methods.items():
            start = time.perf_counter()
            grouping = method(T, k)
            seconds[name] += time.perf_counter() - start
            score = adjusted_rand_score(labels, grouping.labels)
            ari[name].append(score)
            hits[name] += score == 1.0
    m = args.instances
    rows = [
        [name, f"{hits[name]}/{m}", f"{hits[name] / m:.2f}", f"{np.mean(ari[name]):.3f}"]
        + [f"{seconds[name] / m:.3f}"]
        for name in methods
    ]
    summary = ", ".join(f"{name.split()[0]} {hits[name]}/{m}" for name in methods)
    header = ["method", "recovered", "rate", "mean ARI", "s / instance"]
    return format_table(header, rows), summary


def format_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join
    out = [line(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out.append(line("-" * w for w in widths))
    out += [line(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 300, 500])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reference-cap", type=int, default=300, help="largest n for reference")
    parser.add_argument("--eps", type=float, default=1e-4, help="SCS eps for every solve")
    parser.add_argument("--max-iters", type=int, default=5000)
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--n-min", type=int, default=24)
    parser.add_argument("--n-max", type=int, default=40)
    parser.add_argument("--k-min", type=int, default=3)
    parser.add_argument("--k-max", type=int, default=5)
    parser.add_argument("--noise", type=float, nargs=2, default=[0.6, 1.1], help="σ range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    start = time.perf_counter()
    timing = timing_table(args)
    recovery, summary = recovery_table(args)
    lines = [
        f"# benchmarks/clustering.py on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, cvxpy {cp.__version__}, SCS eps={args.eps}",
        "",
        f"## SDP solve time (compile + solve) vs n, random symmetric T, k={K_TIMING}",
        *timing,
        "SCS ships its own single-threaded OpenBLAS, so more BLAS threads (threadpoolctl) only",
        "reach numpy/cvxpy; 1 vs 2 threads differ by noise on a shared CPU.",
        "",
        f"## Exact recovery of planted groups: {args.instances} instances, n in "
        f"[{args.n_min}, {args.n_max}], k in [{args.k_min}, {args.k_max}], unequal sizes, "
        f"within N(1, σ), across N(0, σ), σ in [{args.noise[0]}, {args.noise[1]}]",
        *recovery,
        summary,
        "",
        f"total {time.perf_counter() - start:.0f} s",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
