"""Conjugate gradient in torch for one SPD system per parameter block (MaTS, A.7).

Works on tensors of any shape (the operator maps a ``[d_in, d_out]`` matrix to one of the
same shape), so a K-FAC system ``Σ_i A_i X G_i`` is solved without forming its
``(d_in d_out)²`` matrix. Stops after ``max_iter`` iterations or when
``‖b − A x‖ ≤ rtol · ‖b‖`` (scipy's criterion and default ``rtol``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    *,
    max_iter: int = 100,
    rtol: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Solve ``apply(x) = b`` from ``x0``; returns ``x`` and the residuals (A.7 asks to log
    the initial and final ``‖A x − b‖`` of every block) and the iteration count."""
    x = x0.clone()
    r = b - apply(x)
    p = r.clone()
    rs = (r * r).sum()
    initial = rs.sqrt().item()
    tol = rtol * b.norm().item()
    iterations = 0
    while iterations < max_iter and rs.sqrt().item() > tol:
        ap = apply(p)
        curvature = (p * ap).sum()
        if curvature <= 0:  # p lies in the operator's null space: nothing left to fit
            break
        step = rs / curvature
        x += step * p
        r -= step * ap
        rs_new = (r * r).sum()
        p = r + (rs_new / rs) * p
        rs = rs_new
        iterations += 1
    final = (b - apply(x)).norm().item()
    return x, {
        "initial_residual": initial,
        "final_residual": final,
        "rhs_norm": b.norm().item(),
        "iterations": iterations,
    }
