"""Data-free methods: average (A.1), task arithmetic (A.2), TIES (A.3) and DARE.

Definitions follow ``peft.utils.merge_utils`` where the two coincide, so results can be checked
against it: TIES elects the sign on the *unweighted* trimmed task vectors (sign 0 -> +1) and
divides by the number of agreeing non-zero entries; DARE keeps each entry with probability
``density`` and rescales by ``1/density``. Unlike MaTS, ``average`` is a weighted mean for any
number of models (no λ/M shrinkage, E.1.5).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hf_tae.errors import TaeError
from hf_tae.merging.registry import Block, register_method


def weighted_average(block: Block) -> torch.Tensor:
    """``Σ w_i θ_i / Σ w_i`` (A.1)."""
    total = sum(block.weights)
    if total == 0:
        raise TaeError(f"tensor {block.name!r}: the model weights sum to 0; pass other weights.")
    out = torch.zeros_like(block.models[0])
    for w, m in zip(block.weights, block.models, strict=True):
        out += w * m
    return out / total


@register_method("average", needs_base=False)
def average(block: Block) -> tuple[torch.Tensor, dict[str, Any]]:
    return weighted_average(block), {}


@register_method("task_arithmetic", needs_base=True)
def task_arithmetic(block: Block, *, lam: float = 1.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """``θ0 + λ Σ w_i τ_i`` (A.2: a sum, not a mean)."""
    return block.base + lam * weighted_delta(block), {}


def weighted_delta(block: Block) -> torch.Tensor:
    """``Σ w_i (θ_i − θ0)``, accumulated without forming every ``τ_i``."""
    if block.base is None:
        raise TaeError(f"tensor {block.name!r}: this method needs a base model; pass base=...")
    delta = torch.zeros_like(block.base)
    for w, m in zip(block.weights, block.models, strict=True):
        delta += w * (m - block.base)
    return delta


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise TaeError(f"density={density} must lie in [0, 1] (the fraction of entries kept).")


def trim_threshold(values: torch.Tensor, density: float) -> float:
    """The ``k``-th largest ``|value|``, ``k = int(density · numel)`` (+inf when ``k = 0``)."""
    n = values.numel()
    k = int(density * n)
    if k == 0:
        return float("inf")
    return values.abs().reshape(-1).kthvalue(n - k + 1).values.item()  # selection, not a sort


def elect_and_merge(
    taus: list[torch.Tensor], weights: list[float], sign_method: str
) -> torch.Tensor:
    """TIES steps 3-4 (A.3): elect a sign per entry on the unweighted task vectors, then the
    weighted sum of the agreeing non-zero entries divided by their count (at least 1).
    Accumulated model by model: a few tensors of memory, never an ``[M, ...]`` stack (D.4)."""
    if sign_method not in ("total", "frequency"):
        raise TaeError(f"sign_method={sign_method!r}; choose 'total' or 'frequency'.")
    mass = torch.zeros_like(taus[0])
    for t in taus:
        mass += t if sign_method == "total" else t.sign()
    elected = torch.where(mass >= 0, 1.0, -1.0).to(mass.dtype)
    total, count = mass.zero_(), torch.zeros_like(mass)
    for w, t in zip(weights, taus, strict=True):
        agree = (t.sign() == elected).to(t.dtype)
        total += w * t * agree
        count += agree
    return total / count.clamp(min=1)


def _ties_prepare(
    task_vectors: Callable[[int], Iterable[torch.Tensor]], num_models: int, params: dict[str, Any]
) -> dict[str, Any]:
    if params["trim"] == "tensor":
        return {}
    if params["trim"] != "global":
        raise TaeError(f"trim={params['trim']!r}; choose 'tensor' or 'global'.")
    return {
        "thresholds": [
            global_trim_threshold(lambda i=i: task_vectors(i), params["density"])
            for i in range(num_models)
        ]
    }


@register_method("ties", needs_base=True, prepare=_ties_prepare)
def ties(
    block: Block,
    *,
    density: float = 0.2,
    lam: float = 1.0,
    sign_method: str = "total",
    trim: str = "tensor",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """TIES (A.3): keep the top ``density`` of each ``|τ_i|``, elect signs, disjoint mean.

    ``trim="tensor"`` trims each tensor on its own (mergekit/peft); ``trim="global"`` trims with
    each model's exact threshold over all merged tensors (MaTS; computed beforehand by an exact
    streaming radix select, D.4). Entries equal to the threshold are kept.
    """
    _check_density(density)
    thresholds = block.extra.get("thresholds")
    trimmed = []
    for i, m in enumerate(block.models):
        t = m - block.base
        th = thresholds[i] if thresholds else trim_threshold(t, density)
        trimmed.append(t.mul_(t.abs() >= th))
    return block.base + lam * elect_and_merge(trimmed, block.weights, sign_method), {}


def _generator(seed: int | None, name: str, index: int) -> torch.Generator | None:
    """A generator seeded by (seed, tensor, model), so a streamed merge is reproducible in any
    order; ``seed=None`` draws from torch's global generator (as peft does)."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{index}".encode()))


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale by ``1/density`` (DARE); the
    mask is drawn on the CPU, so a seeded merge is the same on every device."""
    mask = torch.bernoulli(torch.full(tau.shape, density, dtype=tau.dtype), generator=generator)
    return tau * mask.to(tau.device) / density


def _dare(block: Block, density: float, seed: int | None) -> list[torch.Tensor]:
    _check_density(density)
    if density == 0:
        raise TaeError("density=0 drops every entry; DARE needs density in (0, 1].")
    return [
        dare_drop(t, density, _generator(seed, block.name, i))
        for i, t in enumerate(block.task_vectors())
    ]


@register_method("dare_linear", needs_base=True)
def dare_linear(
    block: Block, *, density: float = 0.5, lam: float = 1.0, seed: int | None = 0
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DARE then task arithmetic: ``θ0 + λ Σ w_i drop(τ_i)``."""
    taus = _dare(block, density, seed)
    return block.base + lam * sum(w * t for w, t in zip(block.weights, taus, strict=True)), {}


@register_method("dare_ties", needs_base=True)
def dare_ties(
    block: Block,
    *,
    density: float = 0.5,
    lam: float = 1.0,
    sign_method: str = "total",
    seed: int | None = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DARE then TIES's sign election and disjoint mean."""
    taus = _dare(block, density, seed)
    return block.base + lam * elect_and_merge(taus, block.weights, sign_method), {}


def global_trim_threshold(tensors: Callable[[], Iterable[torch.Tensor]], density: float) -> float:
    """The exact ``k``-th largest ``|x|`` over every tensor ``tensors()`` yields,
    ``k = int(density · N)``, in four streaming passes (D.4).

    Radix select on the float32 bit patterns of ``|x|`` (monotone in the value for
    non-negative floats): each pass histograms one byte of the entries that share the bytes
    chosen so far, so memory is one tensor plus 256 counters, never the ``N`` values.
    """
    _check_density(density)
    total = sum(t.numel() for t in tensors())
    k = int(density * total)
    if k == 0:
        return float("inf")
    prefix, above = 0, 0  # bytes chosen so far; entries known to lie strictly above them
    for level, shift in enumerate((24, 16, 8, 0)):
        hist = torch.zeros(256, dtype=torch.int64)
        for t in tensors():
            bits = t.detach().abs().float().reshape(-1).view(torch.int32)
            if level:
                bits = bits[(bits >> (shift + 8)) == prefix]
            hist += torch.bincount((bits >> shift) & 255, minlength=256).cpu()
        at_least = above + hist.flip(0).cumsum(0)  # entries in bins >= 255 - j
        j = int(torch.nonzero(at_least >= k)[0])
        byte = 255 - j
        above = int(at_least[j]) - int(hist[byte])
        prefix = (prefix << 8) | byte
    return torch.tensor([prefix], dtype=torch.int32).view(torch.float32).item()
