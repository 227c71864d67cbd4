"""How good is the first-order (linearized) model that Grad-TAE relies on?

Grad-TAE ("Scalable Multitask Learning Using Gradient-based Estimation of Task Affinity",
Li et al., KDD 2024) scores a subset S with ``s_e(θ0 + Δ) ≈ s_e(θ0) + ∇s_e(θ0)·Δ``. Its
reference code checks that on a really fine-tuned ``θ_ft``: ``Δ = θ_ft − θ0`` is rescaled to
several norms (graph: ‖Δ‖ ∈ {10, …, 1} on the non-head parameters; text: fractions
0.01…0.10 of ‖θ0‖), and for each the relative error of the linearization, averaged over
examples, is::

    mean_e [(s_e(θ0) + ∇s_e(θ0)·Δ − s_e(θ0 + Δ)) / max(|s_e(θ0 + Δ)|, |s_e(θ0)|)]²

GradEx (Li et al., EMNLP Findings 2024) reports the same ratio without the gradient term (a
zeroth-order baseline).

Unlike the reference this module

* computes ``∇s_e(θ0)·Δ`` exactly with forward-mode AD (``torch.func.jvp`` over
  ``torch.func.functional_call``), not through projected gradients, so the check is
  independent of the gradient store and of the projection;
* evaluates ``θ0 + Δ`` under :func:`~hf_tae.estimation.regression.apply_delta`, which puts θ0
  back bit for bit afterwards (the reference loads ``θ_ft`` in its batch loop and never
  restores θ0, so every batch after the first measures the wrong point);
* runs the model in eval mode (the reference keeps dropout on in the scores).

The scores are those of :class:`~hf_tae.gradients.collector.GradientCollector`: the same
``score_fn`` (default :class:`~hf_tae.models.scores.TaskLogitScore`, the logit of each
example's own task) called on the same inputs and ``task``/``example_id``/``example_label``
metadata, on the (row, task) examples of a task set's split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hf_tae.errors import TaeError
from hf_tae.tasks.batching import Collate, example_batches

if TYPE_CHECKING:
    import pandas as pd

    from hf_tae.models.scores import ScoreFunction
    from hf_tae.tasks.taskset import TaskSet

#: A.7 graph: ‖Δ‖ rescaled to 10, 9, …, 1.
DEFAULT_NORMS = tuple(float(n) for n in range(10, 0, -1))
#: A.7 text: ‖Δ‖ as fractions 0.01, …, 0.10 of ‖θ0‖.
TEXT_FRACTIONS = tuple(round(0.01 * k, 2) for k in range(1, 11))
COLUMNS = ("norm", "fraction", "first_order_error", "zeroth_order_error", "num_examples")


def parameter_delta(
    model: nn.Module,
    theta_ft: nn.Module | Mapping[str, torch.Tensor],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """``Δ = θ_ft − θ0`` on the trainable parameters of ``model`` kept by ``include``/``exclude``.

    ``theta_ft`` is the fine-tuned model or its state dict (a ``state_dict()`` or
    ``named_parameters()`` mapping; extra buffers are ignored). Patterns work as in
    :class:`~hf_tae.gradients.capture.ProjectedGradientCapture` (substring or regex), e.g.
    ``exclude="head"`` for Grad-TAE's "non-head parameters only". Tensors are detached, in the
    parameter's dtype and on its device.
    """
    from hf_tae.gradients.capture import select_parameters

    if isinstance(theta_ft, nn.Module):
        theta_ft = dict(theta_ft.named_parameters())
    if not isinstance(theta_ft, Mapping):
        raise TaeError(
            f"theta_ft must be the fine-tuned model or its state dict, got {type(theta_ft).__name__}."
        )
    known = set(model.state_dict()) | {n for n, _ in model.named_parameters()}
    unknown = sorted(set(theta_ft) - known)
    if unknown:
        raise TaeError(
            f"theta_ft has entries {unknown[:5]} that the model does not have; pass the state "
            f"dict of a fine-tuned copy of this model (its parameters include {sorted(known)[:5]})."
        )
    selected = select_parameters(model, include, exclude)
    missing = [name for name, _ in selected if name not in theta_ft]
    if missing:
        raise TaeError(
            f"theta_ft lacks the parameters {missing[:5]}; pass a full state dict of the "
            "fine-tuned model, or restrict the check with include=/exclude=."
        )
    delta = {}
    for name, param in selected:
        value = torch.as_tensor(theta_ft[name])
        if tuple(value.shape) != tuple(param.shape):
            raise TaeError(
                f"theta_ft[{name!r}] has shape {tuple(value.shape)} but the model's parameter has "
                f"{tuple(param.shape)}; theta_ft comes from a differently configured model."
            )
        delta[name] = value.detach().to(param.device, param.dtype) - param.detach()
    return delta


def _norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors.values()))


def _select_examples(
    task_set: TaskSet, split: str, max_examples: int | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """The (row, task) examples of ``split`` in collector order, optionally a seeded sample."""
    ex = task_set.examples(split)
    n = len(ex["task"])
    if n == 0:
        raise TaeError(f"the task set has no examples in the {split!r} split; check another split.")
    if max_examples is not None and max_examples < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=max_examples, replace=False))
        ex = {k: v[keep] for k, v in ex.items()}
    return ex


def _batches(
    task_set: TaskSet,
    ex: Mapping[str, np.ndarray],
    batch_size: int,
    collate_fn: Collate | None,
    device: torch.device,
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """``(inputs, meta)`` per batch of the examples ``ex``, as GradientCollector builds them."""
    for _, inputs, meta in example_batches(task_set, ex, batch_size, collate_fn, device):
        yield inputs, meta


def _example_batches(
    task_set: TaskSet,
    split: str,
    batch_size: int,
    collate_fn: Collate | None,
    device: torch.device,
    max_examples: int | None,
    seed: int,
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    ex = _select_examples(task_set, split, max_examples, seed)
    return _batches(task_set, ex, batch_size, collate_fn, device)


def default_score(model: nn.Module, score_fn: ScoreFunction | None) -> ScoreFunction:
    """``score_fn``, or the default of hf_tae's models (the collector's default)."""
    if score_fn is not None:
        return score_fn
    from hf_tae.models.scores import default_score_function

    try:
        return default_score_function(model)
    except ValueError as err:
        raise TaeError(str(err)) from err


def score_jvp(
    model: nn.Module,
    delta: Mapping[str, torch.Tensor],
    task_set: TaskSet,
    score_fn: ScoreFunction | None = None,
    split: str = "validation",
    batch_size: int = 256,
    collate_fn: Collate | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Per example of ``split``: ``score`` = s_e(θ0) and ``jvp`` = ∇s_e(θ0)·Δ, exactly.

    Forward-mode AD (``torch.func.jvp`` over ``functional_call``) with tangent ``delta`` on its
    parameters and zero elsewhere: one pass gives both, independent of any projection. Eval
    mode; the model's parameters are not modified. Also returns ``task`` and ``example_id``.
    Attention runs on PyTorch's math kernel: the fused scaled-dot-product kernels (flash on
    CPU, used by transformers' ``sdpa`` attention) have no forward-mode derivative.
    """
    from torch.func import functional_call, jvp
    from torch.nn.attention import SDPBackend, sdpa_kernel

    score_fn = default_score(model, score_fn)
    params = {name: p.detach() for name, p in model.named_parameters()}
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise TaeError(f"delta names parameters {unknown[:5]} that the model does not have.")
    names = list(delta)
    primals = tuple(params[n] for n in names)
    tangents = tuple(delta[n].to(params[n]) for n in names)
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {"task": [], "example_id": [], "score": [], "jvp": []}
    was_training = model.training
    model.eval()
    try:
        batches = _example_batches(
            task_set, split, batch_size, collate_fn, device, max_examples, seed
        )
        for inputs, meta in batches:

            def scores(*values: torch.Tensor, inputs=inputs, meta=meta) -> torch.Tensor:
                outputs = functional_call(
                    model, {**params, **dict(zip(names, values, strict=True))}, (), inputs
                )
                return score_fn(outputs, {**inputs, **meta})

            with sdpa_kernel(SDPBackend.MATH):
                s0, t = jvp(scores, primals, tangents)
            out["score"].append(s0.detach().double().cpu().numpy())
            out["jvp"].append(t.detach().double().cpu().numpy())
            out["task"].append(meta["task"].cpu().numpy())
            out["example_id"].append(meta["example_id"].cpu().numpy())
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()}


def _scores_at(
    model: nn.Module,
    task_set: TaskSet,
    score_fn: ScoreFunction,
    split: str,
    batch_size: int,
    collate_fn: Collate | None,
    max_examples: int | None,
    seed: int,
) -> np.ndarray:
    """s_e at the model's current parameters, in the order of :func:`score_jvp`."""
    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for inputs, meta in _example_batches(
            task_set, split, batch_size, collate_fn, device, max_examples, seed
        ):
            scores = score_fn(model(**inputs), {**inputs, **meta})
            parts.append(scores.detach().double().cpu().numpy())
    return np.concatenate(parts)


def _relative_sq(numerator: np.ndarray, s_new: np.ndarray, s0: np.ndarray) -> float:
    """Mean of ``[numerator / max(|s_new|, |s0|)]²`` (Grad-TAE's ratio); 0/0 counts as 0."""
    denom = np.maximum(np.abs(s_new), np.abs(s0))
    ratio = np.divide(numerator, denom, out=np.zeros_like(numerator), where=denom > 0)
    ratio[(denom == 0) & (numerator != 0)] = np.inf
    return float(np.mean(ratio**2))


def _check_positive(label: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, int | float):
        values = [values]
    values = [float(v) for v in values]
    if not values:
        raise TaeError(f"{label} is empty; give at least one value, e.g. {label}=(1.0,).")
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    if bad:
        raise TaeError(
            f"{label} must be finite numbers > 0 (Δ is rescaled to each), got {bad}; drop them."
        )
    return values


def first_order_check(
    model: nn.Module,
    theta_ft: nn.Module | Mapping[str, torch.Tensor],
    task_set: TaskSet,
    score_fn: ScoreFunction | None = None,
    norms: Sequence[float] | None = None,
    fractions: Sequence[float] | None = None,
    split: str = "validation",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    batch_size: int = 256,
    collate_fn: Collate | None = None,
    max_examples: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Grad-TAE's first-order approximation check around ``model`` (θ0) towards ``theta_ft``.

    Args:
        model: θ0, e.g. the meta-initialization the gradients were collected at.
        theta_ft: the model fine-tuned from θ0 (or its state dict).
        task_set: the examples are the (row, task) pairs of ``split``, as the collector's.
        score_fn: the per-example score (default :class:`~hf_tae.models.scores.TaskLogitScore`
            for models with ``config.num_tasks``).
        norms: rescale ``Δ = θ_ft − θ0`` to these L2 norms (default: Grad-TAE graph, 10, …, 1).
        fractions: instead, rescale ``‖Δ‖`` to these fractions of ``‖θ0‖`` over the same
            parameters (Grad-TAE text: :data:`TEXT_FRACTIONS`).
        include, exclude: which trainable parameters Δ moves (patterns as in
            :class:`~hf_tae.gradients.capture.ProjectedGradientCapture`); the rest stay at θ0.
            Grad-TAE graph: ``exclude="head"`` (SIGN's output layer).
        batch_size: examples per forward pass.
        collate_fn: ``(task_set, rows) -> model inputs`` (default: the input columns).
        max_examples: score a seeded uniform sample of this many examples instead of all.

    Returns one row per norm with ``norm`` (‖Δ‖ used), ``fraction`` (``norm / ‖θ0‖``),
    ``first_order_error`` (Grad-TAE's ratio), ``zeroth_order_error`` (the same without
    ``∇s·Δ``, GradEx's baseline) and ``num_examples``. θ0 is restored exactly afterwards.
    """
    import pandas as pd

    from hf_tae.estimation.regression import apply_delta

    if norms is not None and fractions is not None:
        raise TaeError("give norms= or fractions= (of ‖θ0‖), not both.")
    if batch_size < 1:
        raise TaeError(f"batch_size must be >= 1, got {batch_size}.")
    if max_examples is not None and max_examples < 1:
        raise TaeError(f"max_examples must be >= 1 or None, got {max_examples}.")
    score_fn = default_score(model, score_fn)
    delta = parameter_delta(model, theta_ft, include, exclude)
    delta_norm = _norm(delta)
    if delta_norm == 0:
        raise TaeError(
            "theta_ft equals θ0 on the chosen parameters (Δ = 0); pass the fine-tuned model, or "
            "check include=/exclude= select parameters that fine-tuning changed."
        )
    params = dict(model.named_parameters())
    theta0_norm = _norm({n: params[n].detach() for n in delta})
    if fractions is not None:
        fractions = _check_positive("fractions", fractions)
        targets = [f * theta0_norm for f in fractions]
    else:
        targets = _check_positive("norms", DEFAULT_NORMS if norms is None else norms)
    common = (task_set, score_fn, split, batch_size, collate_fn, max_examples, seed)
    base = score_jvp(model, delta, *common)
    s0, jvp_unit = base["score"], base["jvp"]
    rows = []
    was_training = model.training
    model.eval()
    try:
        for target in targets:
            scale = target / delta_norm  # ∇s·(cΔ) = c ∇s·Δ: one JVP serves every norm
            with apply_delta(model, delta, scale=scale):
                s_new = _scores_at(model, *common)
            rows.append(
                {
                    "norm": target,
                    "fraction": target / theta0_norm if theta0_norm > 0 else math.nan,
                    "first_order_error": _relative_sq(s0 + scale * jvp_unit - s_new, s_new, s0),
                    "zeroth_order_error": _relative_sq(s0 - s_new, s_new, s0),
                    "num_examples": len(s0),
                }
            )
    finally:
        model.train(was_training)
    return pd.DataFrame(rows, columns=list(COLUMNS))
