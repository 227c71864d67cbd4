"""Task grouping by semidefinite programming (Grad-TAE's SDP clustering, Li et al., KDD 2024).

A partition into groups C_1 … C_k with 0/1 indicators v_c is scored by the average
within-group density Σ_c v_cᵀ T v_c / |C_c|. With X = Σ_c v_c v_cᵀ / |C_c| this is ⟨T, X⟩,
and dropping rank(X) = k gives Grad-TAE's relaxation::

    max ⟨T, X⟩  s.t.  X ⪰ 0,  X ≥ 0 (elementwise),  X·1 = 1,  tr X = k,  X = Xᵀ.

The reference writes the row sums as n separate constraints tr(A_i X) = 1 (A_i all-ones in
column i); here they are one vectorized ``X @ 1 == 1``, which avoids building n dense n × n
matrices (1 GB at n = 500) and compiles faster: about 1.2× less time end to end at n ≤ 300
(``benchmarks/clustering.py``), where the shared SCS solve dominates. The reference code pins
no solver; here SCS is pinned (Clarabel is much slower at this size).

Scale: X has n² entries and every SCS iteration eigendecomposes an n × n matrix, so the time
grows roughly like n³. Measured with SCS, eps = 1e-4, k = 5, on a shared 2-core CPU: n = 100
in about 0.6 s, n = 300 in about 9 s, n = 500 in about 32 s, n = 600 in about 60 s; SCS's
bundled OpenBLAS is single-threaded, so more threads do not help
(``benchmarks/results/clustering.txt``). Above ``max_sdp_size`` (default
:data:`MAX_SDP_SIZE` = 600, about a minute) :func:`sdp_cluster` falls back to spectral
clustering with a warning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from hf_tae.clustering.baselines import spectral_cluster
from hf_tae.clustering.rounding import (
    Grouping,
    check_affinity,
    kmeans_rounding,
    make_grouping,
    threshold_rounding,
)
from hf_tae.errors import TaeError

#: Largest n solved as an SDP by :func:`sdp_cluster`; larger n falls back to spectral.
MAX_SDP_SIZE = 600
#: SCS tolerance (absolute and relative). 1e-4 is ample for rounding and keeps n = 500 fast.
DEFAULT_EPS = 1e-4
#: SCS iteration cap; n ≤ 500 converges in about 500 iterations at eps = 1e-4.
DEFAULT_MAX_ITERS = 5000
ROUNDINGS = ("kmeans", "threshold")
#: SCS status codes: failed / indeterminate (no usable certificate), and solved-inaccurate.
_SCS_FAILED = (-4, -3)
_SCS_INACCURATE = 2


@dataclass
class SdpSolution:
    """The relaxed solution: ``X`` (n × n, symmetrized), the cvxpy ``status``, the
    ``objective`` ⟨T', X⟩ on the matrix actually solved (T, or exp(T/temperature)),
    ``solve_time`` (seconds, compile and solve) and ``converged`` (status "optimal").

    ``status`` is "solver_error (last iterate)" when SCS stopped without any certificate and X
    is its last iterate."""

    X: np.ndarray
    status: str
    objective: float
    solve_time: float
    converged: bool


def sdp_relaxation(
    T: np.ndarray,
    k: int,
    *,
    temperature: float | None = None,
    max_iters: int = DEFAULT_MAX_ITERS,
    eps: float = DEFAULT_EPS,
    symmetrize: bool = False,
    verbose: bool = False,
) -> SdpSolution:
    """Solve Grad-TAE's SDP relaxation with SCS and return the best X found.

    ``temperature`` applies the reference's optional exp(T/temperature) preprocessing. The
    matrix is divided by its largest |entry| before solving (the maximizer is unchanged) so
    that ``eps`` acts on a unit scale; the reported objective is scaled back. If SCS stops
    short of "optimal" (e.g. "optimal_inaccurate" after ``max_iters``) a warning is issued and
    the best available X is returned; if there is no X at all, :class:`TaeError` is raised.
    """
    T = check_affinity(T, k, require_symmetric=True, symmetrize=symmetrize)
    if temperature is not None:
        if not temperature > 0:
            raise TaeError(f"temperature={temperature}; pass a positive number (or None).")
        T = check_affinity(np.exp(T / temperature), name=f"exp(T/{temperature})")
    n = T.shape[0]
    scale = float(np.abs(T).max()) or 1.0
    start = time.perf_counter()
    X = cp.Variable((n, n), symmetric=True)
    ones = np.ones(n)
    constraints = [X >> 0, X >= 0, X @ ones == ones, cp.trace(X) == k]
    problem = cp.Problem(cp.Maximize(cp.sum(cp.multiply(T / scale, X))), constraints)
    data, chain, inverse_data = problem.get_problem_data(cp.SCS)
    opts = {"eps": eps, "max_iters": max_iters}
    raw = chain.solve_via_data(problem, data, False, verbose, opts)
    info = raw["info"]
    last_iterate = info["status_val"] in _SCS_FAILED and np.isfinite(raw["x"]).all()
    if last_iterate:
        # SCS stopped (e.g. max_iters) before it could even certify "inaccurate"; keep its
        # last iterate as the best available X instead of letting cvxpy discard it.
        info["status_val"] = _SCS_INACCURATE
    try:
        with warnings.catch_warnings():  # cvxpy's generic "may be inaccurate": ours follows
            warnings.filterwarnings("ignore", "Solution may be inaccurate", UserWarning)
            problem.unpack_results(raw, chain, inverse_data)
    except cp.error.SolverError as err:
        raise TaeError(
            f"SCS returned no solution (status {info['status']!r}) for n={n}, k={k}; raise "
            "max_iters or eps, or use spectral_cluster."
        ) from err
    elapsed = time.perf_counter() - start
    if X.value is None:
        raise TaeError(
            f"SCS returned no solution (status {problem.status!r}) for n={n}, k={k}; raise "
            "max_iters or eps, or use spectral_cluster."
        )
    status = f"{cp.SOLVER_ERROR} (last iterate)" if last_iterate else str(problem.status)
    converged = status == cp.OPTIMAL
    if not converged:
        warnings.warn(
            f"SCS did not converge (status {info['status']!r}, max_iters={max_iters}, "
            f"eps={eps}, n={n}, k={k}); rounding the best X found, which may be poor. Raise "
            "max_iters or eps for a converged solution.",
            RuntimeWarning,
            stacklevel=2,
        )
    Xv = (X.value + X.value.T) / 2
    return SdpSolution(
        X=Xv,
        status=status,
        objective=float(np.sum(T * Xv)),
        solve_time=elapsed,
        converged=converged,
    )


def sdp_cluster(
    T: np.ndarray,
    k: int,
    *,
    rounding: str = "kmeans",
    symmetrize: bool = False,
    temperature: float | None = None,
    seed: int = 0,
    max_iters: int = DEFAULT_MAX_ITERS,
    eps: float = DEFAULT_EPS,
    threshold_c: float = 1.0,
    max_sdp_size: int | None = MAX_SDP_SIZE,
) -> Grouping:
    """Group n tasks into k groups: solve :func:`sdp_relaxation`, then round X.

    ``rounding="kmeans"`` (default) gives exactly k non-empty groups
    (:func:`~hf_tae.clustering.rounding.kmeans_rounding`); ``"threshold"`` is the reference
    threshold-and-scan at c/n with ``c = threshold_c``, which may give ≠ k groups.
    T must be symmetric unless ``symmetrize=True`` ((T + Tᵀ)/2). The grouping's objective is
    scored on that T, never on exp(T/temperature). For n > ``max_sdp_size`` (None: no limit)
    the SDP would take minutes and GBs, so spectral clustering is used instead, with a warning.
    """
    if rounding not in ROUNDINGS:
        raise TaeError(f"rounding={rounding!r}; use one of {list(ROUNDINGS)}.")
    T = check_affinity(T, k, require_symmetric=True, symmetrize=symmetrize)
    n = T.shape[0]
    if max_sdp_size is not None and n > max_sdp_size:
        warnings.warn(
            f"n={n} tasks exceeds max_sdp_size={max_sdp_size}: the SDP has n² variables and "
            "would be slow, so falling back to spectral clustering. Pass max_sdp_size=None to "
            "force the SDP.",
            UserWarning,
            stacklevel=2,
        )
        return spectral_cluster(T, k, seed=seed)
    solution = sdp_relaxation(T, k, temperature=temperature, max_iters=max_iters, eps=eps)
    start = time.perf_counter()
    if rounding == "kmeans":
        labels = kmeans_rounding(solution.X, k, seed=seed)
    else:
        labels = threshold_rounding(solution.X, c=threshold_c)
    elapsed = solution.solve_time + time.perf_counter() - start
    return make_grouping(T, labels, k, f"sdp-{rounding}", elapsed, sdp=solution)
