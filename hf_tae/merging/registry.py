"""Merge methods as per-tensor functions, registered by name.

Every method of MaTS (merging_methods.md A.0) is block-diagonal over parameter tensors, so a
merge is one independent call per tensor: ``fn(block, **params) -> (merged, info)``. A
:class:`Block` carries what that call may read: the base tensor θ0, the M fine-tuned tensors
θ_i, the per-model weights and, for data-aware methods, each model's statistics for that tensor.
``info`` is a small JSON-able dict (e.g. CG residuals) that the engine writes to the merge log.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
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
    (e.g. TIES's global trimming thresholds) and its result lands in every ``Block.extra``.
    ``types`` holds each parameter's annotated type (``float``, ``int | None``, ...): what a
    parameter given as text (``--merge_methods ties:density=0.2``) is converted to."""

    name: str
    fn: MergeFn
    needs_base: Callable[[dict[str, Any]], bool]
    statistics: Callable[[dict[str, Any]], tuple[str, ...]]
    defaults: dict[str, Any]
    prepare: Callable[..., dict[str, Any]] | None = None
    types: dict[str, Any] = field(default_factory=dict)

    def check_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``defaults`` updated by ``params``; unknown names raise :class:`TaeError`."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise TaeError(
                f"merge method {self.name!r} has no parameter(s) {unknown}; its parameters are "
                f"{sorted(self.defaults)}."
            )
        return {**self.defaults, **params}

    def parse_value(self, name: str, text: str) -> Any:
        """Parameter ``name`` given as ``text``, converted to its registered type (``none``
        for an optional one); a bad value raises :class:`TaeError` naming both."""
        self.check_params({name: None})
        kind = self.types.get(name, str)
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        options = typing.get_args(kind) if union else (kind,)
        if type(None) in options and text.strip().lower() == "none":
            return None
        for option in options:
            try:
                return _convert(text, option)
            except (TypeError, ValueError):
                continue
        raise TaeError(
            f"merge method {self.name!r}: {name}={text!r} is not a valid "
            f"{getattr(kind, '__name__', kind)}; e.g. {name}={self.defaults[name]}."
        )


def _convert(text: str, kind: Any) -> Any:
    """``text`` as ``kind`` (bool, int, float or str); raises ValueError when it is not one."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false"):
            raise ValueError(text)
        return lowered == "true"
    if kind in (int, float, str):
        return kind(text.strip())
    raise ValueError(f"no conversion to {kind}")


#: other spellings of parameter names, in YAML configs and ``--merge_methods``
#: (``lambda`` is what mergekit calls ``lam``, a Python keyword)
PARAM_ALIASES = {"lambda": "lam"}


def canonical_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with alias names (:data:`PARAM_ALIASES`) replaced by the registered ones;
    an alias given together with its registered name raises."""
    out = dict(params)
    for alias, name in PARAM_ALIASES.items():
        if alias in out:
            if name in out:
                raise TaeError(f"both {alias!r} and {name!r} given; they are one parameter.")
            out[name] = out.pop(alias)
    return out


@dataclass(frozen=True)
class MethodChoice:
    """One merge of the pipeline: a method and the parameters given to it (typed, canonical
    names; the rest keep their defaults). ``label`` names it in tables, as written
    (``ties density=0.2 lambda=0.8``); ``folder`` is the label made a safe folder name."""

    method: str
    params: dict[str, Any]
    label: str

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", self.label.replace(" ", "_"))


def parse_method_choice(text: str) -> MethodChoice:
    """``name`` or ``name:key=value,key=value`` (``--merge_methods``) as a
    :class:`MethodChoice`, values converted to the method's parameter types. An unknown
    method or parameter, a malformed item or a bad value raises :class:`TaeError` naming the
    method, the parameter and the valid ones."""
    name, _, rest = text.strip().partition(":")
    spec = get_method(name.strip())
    given: dict[str, str] = {}
    for item in rest.split(",") if rest.strip() else ():
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key or not value:
            raise TaeError(
                f"merge method {spec.name!r}: option {item!r} is not key=value; write e.g. "
                f"{spec.name}:{','.join(f'{k}={v}' for k, v in spec.defaults.items()) or '<none>'}"
                f" (parameters: {sorted(spec.defaults)})."
            )
        if key in given:
            raise TaeError(f"merge method {spec.name!r}: option {key!r} given twice in {text!r}.")
        given[key] = value
    typed = {key: spec.parse_value(PARAM_ALIASES.get(key, key), v) for key, v in given.items()}
    params = canonical_params(typed)
    spec.check_params(params)
    label = " ".join([spec.name, *(f"{k}={v}" for k, v in typed.items())])
    return MethodChoice(spec.name, params, label)


def parse_method_choices(texts: Sequence[str]) -> list[MethodChoice]:
    """:func:`parse_method_choice` of each; two that merge alike (the same method and
    resolved parameters, e.g. ``ties`` and ``ties:density=0.2``) raise."""
    choices = [parse_method_choice(t) for t in texts]
    seen: dict[tuple[str, str], str] = {}
    for choice in choices:
        resolved = get_method(choice.method).check_params(choice.params)
        key = (choice.method, repr(sorted(resolved.items())))
        if key in seen:
            raise TaeError(
                f"merge methods {seen[key]!r} and {choice.label!r} are the same merge; give it once."
            )
        seen[key] = choice.label
    return choices


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
        try:
            hints = typing.get_type_hints(fn)
        except NameError:  # an annotation this module cannot resolve: type by default value
            hints = {}
        kinds = {p: hints.get(p, type(default)) for p, default in defaults.items()}
        METHODS[name] = MergeMethod(name, fn, base, stats, defaults, prepare, kinds)
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
