"""Data-aware methods: diagonal Fisher (A.4), RegMean (A.5) and MaTS's conjugate gradient on
the RegMean, K-FAC, diagonal- and block-Fisher objectives (A.6, A.7).

All solve ``(Σ_i C_i) θ = Σ_i C_i θ_i`` (A.0) for one tensor. Linear weights are solved in
``V = Wᵀ`` layout (``[d_in, d_out]``; GPT-2's ``Conv1D`` already stores ``V``). Tensors that
the statistics do not cover get the weighted average (A.8): biases, norms, embeddings, and
weights tied to another module. Solves run in ``block``'s dtype (the engine uses float64).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_tae.errors import TaeError
from hf_tae.merging.cg import conjugate_gradient
from hf_tae.merging.heuristics import ties, weighted_average, weighted_delta
from hf_tae.merging.registry import Block, register_method


def shrink_offdiagonal(c: torch.Tensor, alpha: float) -> torch.Tensor:
    """``off_α(C) = α C + (1 − α) diag(C)`` (notation of merging_methods.md)."""
    if alpha == 1.0:
        return c
    return alpha * c + (1.0 - alpha) * torch.diag(torch.diagonal(c))


def _to_v(block: Block, w: torch.Tensor) -> torch.Tensor:
    return w.T if block.layout == "linear" else w


def _from_v(block: Block, v: torch.Tensor) -> torch.Tensor:
    return v.T.contiguous() if block.layout == "linear" else v.contiguous()


def _is_linear_weight(block: Block) -> bool:
    return block.layout in ("linear", "conv1d") and block.models[0].ndim == 2


def _fallback(block: Block, reason: str) -> tuple[torch.Tensor, dict[str, Any]]:
    return weighted_average(block), {"fallback": "average", "reason": reason}


def solve_spd(c: torch.Tensor, b: torch.Tensor, name: str, ridge: float) -> torch.Tensor:
    """``c⁻¹ b`` by Cholesky, with ``ridge · mean(diag c)`` added to the diagonal.

    A failed or numerically singular factorisation raises :class:`TaeError` naming the layer:
    MaTS's silent fallback (dropping zero rows, E.1.10) hides inputs that no task exercised.
    """
    if ridge:
        eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
        c = c + ridge * torch.diagonal(c).mean() * eye
    factor, info = torch.linalg.cholesky_ex(c)
    pivots = torch.diagonal(factor) ** 2
    scale = torch.diagonal(c).abs().max()
    if info != 0 or scale == 0 or pivots.min() <= 1e-12 * scale:
        raise TaeError(
            f"the summed input Gram of layer {name!r} is singular (an input feature no model's "
            "data activates, or fewer tokens than features); pass ridge=1e-6 (relative to the "
            "mean diagonal) or alpha<1, or compute the statistics on more data."
        )
    return torch.cholesky_solve(b, factor)


@register_method("fisher", needs_base=False, statistics=("fisher",))
def fisher(block: Block, *, floor: float = 1e-8) -> tuple[torch.Tensor, dict[str, Any]]:
    """``Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i`` with ``F̃ = max(F, floor)`` (A.4), elementwise; a
    tensor whose Fisher is zero for every model thus gets the weighted average."""
    fishers = block.stat("fisher")
    if fishers is None:
        return _fallback(block, "no Fisher")
    num = torch.zeros_like(block.models[0])
    den = torch.zeros_like(block.models[0])
    for w, f, m in zip(block.weights, fishers, block.models, strict=True):
        f = w * f.clamp(min=floor)
        num += f * m
        den += f
    return num / den, {}


def _regmean_system(
    block: Block, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]] | None:
    grams = block.stat("input_gram")
    if grams is None or not _is_linear_weight(block):
        return None
    shrunk = [w * shrink_offdiagonal(a, alpha) for w, a in zip(block.weights, grams, strict=True)]
    c = sum(shrunk)
    b = sum(a @ _to_v(block, m) for a, m in zip(shrunk, block.models, strict=True))
    return c, b, shrunk


@register_method("regmean", needs_base=False, statistics=("gram",))
def regmean(
    block: Block, *, alpha: float = 0.9, ridge: float = 0.0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``V* = (Σ_i off_α(A_i))⁻¹ Σ_i off_α(A_i) W_iᵀ`` per linear layer (A.5), by Cholesky."""
    system = _regmean_system(block, alpha)
    if system is None:
        return _fallback(block, "no input Gram")
    c, b, _ = system
    return _from_v(block, solve_spd(c, b, block.name, ridge)), {}


def _initial(block: Block, init: str, lam: float, density: float) -> torch.Tensor:
    if init == "average":
        return weighted_average(block)
    if init == "base":
        if block.base is None:
            raise TaeError(f"tensor {block.name!r}: init='base' needs a base model; pass base=...")
        return block.base
    if init == "task_arithmetic":
        return block.base + lam * weighted_delta(block)
    if init == "ties":
        return ties(block, density=density, lam=lam)[0]
    raise TaeError(f"init={init!r}; choose 'average', 'task_arithmetic', 'ties' or 'base'.")


Operator = Callable[[torch.Tensor], torch.Tensor]


def _system(
    block: Block, objective: str, alpha: float
) -> tuple[Operator, torch.Tensor, bool] | None:
    """The operator, right-hand side, and whether they live in ``V`` layout (A.7's table)."""
    w = block.weights
    if objective == "average":
        return (lambda x: x), weighted_average(block), False
    if objective == "fisher":
        fishers = block.stat("fisher")
        if fishers is None:
            return None
        total = sum(wi * f for wi, f in zip(w, fishers, strict=True))
        rhs = sum(wi * f * m for wi, f, m in zip(w, fishers, block.models, strict=True))
        return (lambda x: total * x), rhs, False
    if objective == "fisher_block":
        blocks = block.stat("fisher_block")
        if blocks is None:
            return None
        shape = block.models[0].shape
        c = sum(wi * shrink_offdiagonal(f, alpha) for wi, f in zip(w, blocks, strict=True))
        rhs = sum(
            wi * shrink_offdiagonal(f, alpha) @ m.reshape(-1)
            for wi, f, m in zip(w, blocks, block.models, strict=True)
        ).reshape(shape)
        return (lambda x: (c @ x.reshape(-1)).reshape(shape)), rhs, False
    if objective == "regmean":
        system = _regmean_system(block, alpha)
        if system is None:
            return None
        c, rhs, _ = system
        return (lambda x: c @ x), rhs, True
    if objective == "kfac":
        grams, outs = block.stat("input_gram"), block.stat("outgrad_gram")
        if grams is None or outs is None or not _is_linear_weight(block):
            return None
        pairs = [
            (wi * shrink_offdiagonal(a, alpha), shrink_offdiagonal(g, alpha))
            for wi, a, g in zip(w, grams, outs, strict=True)
        ]
        rhs = sum(a @ _to_v(block, m) @ g for (a, g), m in zip(pairs, block.models, strict=True))
        return (lambda x: sum(a @ x @ g for a, g in pairs)), rhs, True
    raise TaeError(
        f"objective={objective!r}; choose 'regmean', 'kfac', 'fisher', 'fisher_block' or 'average'."
    )


_OBJECTIVE_STATS = {
    "average": (),
    "fisher": ("fisher",),
    "fisher_block": ("fisher_block",),
    "regmean": ("gram",),
    "kfac": ("kfac",),
}


@register_method(
    "mats",
    needs_base=lambda p: p["init"] in ("task_arithmetic", "ties", "base"),
    statistics=lambda p: _OBJECTIVE_STATS.get(p["objective"], ()),
)
def mats(
    block: Block,
    *,
    objective: str = "regmean",
    init: str = "task_arithmetic",
    init_lambda: float = 0.3,
    init_density: float = 0.2,
    alpha: float = 1.0,
    max_iter: int = 100,
    rtol: float = 1e-5,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """MaTS (A.7): conjugate gradient on ``objective`` from ``init`` (TA with ``init_lambda``,
    TIES with ``init_density``/``init_lambda``, the average, or the base), at most ``max_iter``
    iterations. ``alpha`` shrinks the off-diagonal of every Gram/Fisher block (also ``G``).
    The component of ``init`` in the operator's null space is kept, so few iterations act as
    a regulariser (A.7). Tensors the statistics do not cover get the weighted average (A.8).
    """
    system = _system(block, objective, alpha)
    if system is None:
        return _fallback(block, f"no statistics for objective {objective!r}")
    apply, rhs, in_v = system
    x0 = _initial(block, init, init_lambda, init_density)
    x0 = _to_v(block, x0) if in_v else x0
    x, info = conjugate_gradient(apply, rhs, x0, max_iter=max_iter, rtol=rtol)
    return (_from_v(block, x) if in_v else x), info
