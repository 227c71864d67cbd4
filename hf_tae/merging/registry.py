"""Merge methods as per-tensor functions, registered by name.

Every method of MaTS (merging_methods.md A.0) is block-diagonal over parameter tensors, so a
merge is one independent call per tensor: ``fn(block, **params) -> (merged, info)``. A
:class:`Block` carries what that call may read: the base tensor θ0, the M fine-tuned tensors
θ_i, the per-model weights and, for data-aware methods, each model's statistics for that tensor.
``info`` is a small JSON-able dict (e.g. CG residuals) that the engine writes to the merge log.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_tae.errors import TaeError


@dataclass
class TensorStats:
    """One model's statistics for one tensor (any may be missing).

    ``input_gram`` ``A = (1/T) Σ_t x_t x_tᵀ`` and ``outgrad_gram`` ``G = (1/T) Σ_t g_t g_tᵀ``
    belong to the linear layer that owns the weight; ``fisher`` is the diagonal Fisher shaped
    like the tensor and ``fisher_block`` the full Fisher of a small (e.g. (IA)³) vector.
    """

    fisher: torch.Tensor | None = None
    fisher_block: torch.Tensor | None = None
    input_gram: torch.Tensor | None = None
    outgrad_gram: torch.Tensor | None = None


@dataclass
class Block:
    """The inputs of one per-tensor merge.

    ``layout`` says how a linear weight is stored: ``"linear"`` for ``nn.Linear`` (``[out, in]``)
    and ``"conv1d"`` for GPT-2's ``Conv1D`` (``[in, out]``); ``None`` for any other tensor.
    """

    name: str
    base: torch.Tensor | None
    models: list[torch.Tensor]
    weights: list[float]
    stats: list[TensorStats] | None = None
    layout: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stat(self, kind: str) -> list[torch.Tensor] | None:
        """Every model's ``kind`` statistic for this tensor, or ``None`` if any model lacks it."""
        if self.stats is None:
            return None
        values = [getattr(s, kind) for s in self.stats]
        return None if any(v is None for v in values) else values

    def task_vectors(self) -> list[torch.Tensor]:
        if self.base is None:
            raise TaeError(f"tensor {self.name!r}: this method needs a base model; pass base=...")
        return [m - self.base for m in self.models]


MergeFn = Callable[..., tuple[torch.Tensor, dict[str, Any]]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, its parameters' defaults, and (given the resolved
    parameters) whether it needs θ0 and which statistics it reads (``"fisher"``, ``"gram"``,
    ``"kfac"``, ``"fisher_block"``). ``prepare``, if set, runs once before the per-tensor pass
    (e.g. TIES's global trimming thresholds) and its result lands in every ``Block.extra``."""

    name: str
    fn: MergeFn
    needs_base: Callable[[dict[str, Any]], bool]
    statistics: Callable[[dict[str, Any]], tuple[str, ...]]
    defaults: dict[str, Any]
    prepare: Callable[..., dict[str, Any]] | None = None

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``defaults`` updated by ``params``; unknown names raise :class:`TaeError`."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise TaeError(
                f"merge method {self.name!r} has no parameter(s) {unknown}; its parameters are "
                f"{sorted(self.defaults)}."
            )
        return {**self.defaults, **params}


METHODS: dict[str, MergeMethod] = {}


def register_method(
    name: str,
    *,
    needs_base: bool | Callable[[dict[str, Any]], bool],
    statistics: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]] = (),
    prepare: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(block, *, param=default, ...)`` under ``name``; its keyword-only
    parameters (with defaults) are the method's parameters."""

    def decorate(fn: MergeFn) -> MergeFn:
        defaults = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        base = needs_base if callable(needs_base) else lambda _params: needs_base
        stats = statistics if callable(statistics) else lambda _params: statistics
        METHODS[name] = MergeMethod(name, fn, base, stats, defaults, prepare)
        return fn

    return decorate


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; raises :class:`TaeError` listing the known ones."""
    # the methods register themselves on import
    from hf_tae.merging import heuristics, subspace  # noqa: F401

    if name not in METHODS:
        raise TaeError(f"unknown merge method {name!r}; choose one of {sorted(METHODS)}.")
    return METHODS[name]


def method_names() -> list[str]:
    get_method("average")
    return sorted(METHODS)
