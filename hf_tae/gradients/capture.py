"""Projected per-example gradients of a batch from one backward pass, with module hooks.

:class:`ProjectedGradientCapture` hooks the modules that own the selected parameters
(in the style of kronfluence, Bae et al., and Bergson, EleutherAI). During the caller's
forward pass a forward hook records what each call needs;
:meth:`ProjectedGradientCapture.per_example` then runs one backward of ``scores.sum()`` and
the output-gradient hooks turn each call's ``(input, output gradient)`` into per-example
projected features, so nothing of size ``B × D`` is ever formed on the factored path. Each
parameter takes one of three paths (recorded in ``capture.paths``):

``"factored"`` (``kind="factored"``; weights and biases of ``nn.Linear``, GPT-2's ``Conv1D``,
    peft's ``lora_A``/``lora_B`` linears, ``nn.Embedding`` weights, and ``nn.Conv1d``/
    ``nn.Conv2d``/``nn.Conv3d``)
    The forward hook stores ``x @ P_in`` (a row lookup for an embedding); the gradient hook
    forms ``Σ_t (P_outᵀ g_t)(P_inᵀ x_t)ᵀ`` per example (LoGra, Choe et al.) and the bias feature
    ``Σ_t g_t`` (projected by the bias's own stage-1 block). No ``[out, in]`` tensor exists.
    A convolution is the same sum over output positions ``p``, with ``x_p`` the input patch
    (``F.unfold`` order, matching the weight viewed as ``[C_out, C_in/groups·kh·kw]``) and
    ``g_p`` the output gradient at ``p``: the forward hook convolves the input with ``P_inᵀ``
    reshaped as a kernel (the module's own stride, padding, dilation, padding mode and
    groups), so the patches are projected without being unfolded; with ``groups > 1``
    output channel ``o`` of group ``j`` pairs with the patches of group ``j`` only.
``"exact"`` (every parameter of ``kind="dense"``; other parameters of leaf modules, e.g.
    norms, PReLU, transposed convolutions, convolution subclasses that override ``forward``)
    The gradient hook recomputes the module on its saved inputs with ``torch.func``
    (``vmap`` over examples of ``vjp``) to get exact per-example gradients of the module's
    own parameters, which are then projected (Kronecker stage-1 blocks for matrices in
    factored mode, dense JL otherwise). Only that module's gradients exist at a time. A batch
    norm on running statistics (eval mode) is a per-channel affine map: its per-example
    ``Σ g x̂`` and ``Σ g`` are formed directly, without ``torch.func``.
``"loop"`` (parameters owned by modules that have children, e.g. a class token)
    One ``torch.autograd.grad`` of ``s_e`` per example (LESS's way, Xia et al.) on those
    parameters only. Slow; exclude such parameters when they do not matter.

A weight tied between modules (GPT-2's ``wte``/``lm_head``) is handled by each module for
its own use and the contributions add up; its path joins the uses (``"exact+factored"``).

A hooked call whose output lacks the batch dimension (e.g. GPT-2's position embedding of
``position_ids`` of shape ``[1, T]``, T5's relative attention bias) cannot be split by
example from its output gradient; it is handled by one backward per example to that output
(with a warning); so is an embedding lookup of indices built inside the model, whose
leading size may equal the batch size by chance. Pass batched inputs (``position_ids`` of
shape ``[B, T]``, ``decoder_input_ids``) to avoid it.

To skip the weight-gradient GEMMs (as kronfluence does) every parameter except those
on the loop path has ``requires_grad=False`` inside the context; a hooked module whose
output would not require grad gets a zero-valued root tensor added, so autograd still
reaches the hooks. Inputs of the model that require grad are detached: the capture
differentiates the selected parameters only. All flags and hooks are restored on exit.

Limitations: a parameter used outside its module's ``forward`` (e.g. ``nn.MultiheadAttention``
reading ``out_proj.weight`` directly) is not seen (a warning names parameters whose module
did not run); gradient checkpointing is refused; every hooked module must keep example
``e`` in row ``e`` of its output (dimension 0 is the batch), as for Opacus. The exact path
differentiates each example alone, so batch-coupled gradients (``scale_grad_by_freq``
embeddings, batch norm in training mode) use the example's own statistics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_tae.errors import TaeError
from hf_tae.gradients.projection import DEFAULT_CACHE_BYTES, GradientProjector, apply_factor
from hf_tae.utils.patterns import compile_patterns, matches_any

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def factored_layer(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"``, ``"embedding"`` or ``"conv"``: modules of the factored path.

    peft's LoRA A/B are ``nn.Linear``. An embedding is a linear map of one-hot inputs (its
    weight is ``[in, out]`` like GPT-2's ``Conv1D``); one that renormalizes rows
    (``max_norm``) or scales gradients by frequency is left to the exact path. ``"conv1d"``
    is GPT-2's ``Conv1D`` (a linear layer); ``"conv"`` is ``nn.Conv1d``/``Conv2d``/``Conv3d``
    (peft's LoRA convolution adapters included), unless a subclass overrides ``forward`` or
    ``_conv_forward`` (e.g. weight standardization): those take the exact path.
    """
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    for conv in _CONVS:
        if isinstance(module, conv):
            cls = type(module)
            plain = cls.forward is conv.forward and cls._conv_forward is conv._conv_forward
            return "conv" if plain else None
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return None if module.scale_grad_by_freq else "embedding"
    return None


@dataclass
class _ModulePlan:
    """What the hooks of one module compute; names are canonical parameter names."""

    name: str
    module: nn.Module
    layer: str | None  # factored_layer(module)
    weight: str | None = None  # factored-path weight
    bias: str | None = None  # factored-path bias
    exact: dict[str, str] = field(default_factory=dict)  # attribute -> name, exact path


@dataclass
class _Call:
    """One call of a hooked module in the forward pass."""

    plan: _ModulePlan
    batched: bool  # dimension 0 of the output is the batch
    out_meta: tuple[tuple[int, ...], torch.dtype, torch.device]
    # x @ P_in for a factored weight: [N, k_in], or [N, groups, k_in, positions] for a conv
    inputs_proj: torch.Tensor | None = None
    args: tuple = ()  # saved inputs for the exact path
    kwargs: dict = field(default_factory=dict)
    edge: Any = None  # gradient edge of an unbatched output (per-example loop)


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters of ``model`` kept by ``include`` and not dropped by ``exclude``.

    Patterns match a parameter name as a substring or a regular expression (``re.search``).
    For a peft model only the adapters are trainable, so only they are selected by default.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TaeError(
            "the model has no parameter with requires_grad=True; unfreeze the parameters to "
            "differentiate (a peft model trains its adapters)."
        )
    keep, drop = compile_patterns("include", include), compile_patterns("exclude", exclude)
    selected = [
        (n, p) for n, p in trainable if (not keep or matches_any(n, keep)) and not matches_any(n, drop)
    ]
    if not selected:
        raise TaeError(
            f"include={include!r} and exclude={exclude!r} select none of the {len(trainable)} "
            f"trainable parameters (e.g. {[n for n, _ in trainable[:3]]}); loosen the patterns."
        )
    return selected


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _use(kind: str, module: nn.Module, attr: str) -> str:
    """How the hooks of ``module`` handle its parameter ``attr``."""
    if kind == "factored" and factored_layer(module) and attr in ("weight", "bias"):
        return "factored"
    return "exact" if _is_leaf(module) else "loop"


def _path(uses: list[str]) -> str:
    """Path of a parameter from the uses of its owners (several when tied)."""
    return "loop" if "loop" in uses else "+".join(sorted(set(uses)))


def _plan_modules(
    model: nn.Module, selected: list[tuple[str, nn.Parameter]], kind: str
) -> tuple[list[_ModulePlan], dict[str, str]]:
    """Module hook plans and the path of every selected parameter.

    A tied parameter is handled by each owning module for its own use and the projected
    contributions add up, unless one owner needs the loop path (then autograd sees all uses).
    """
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {id(p): [] for _, p in selected}
    for module_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in owners:
                owners[id(p)].append((module_name, module, attr))
    paths = {
        name: _path([_use(kind, module, attr) for _, module, attr in owners[id(p)]])
        for name, p in selected
    }
    plans: dict[int, _ModulePlan] = {}
    for name, p in selected:
        if paths[name] == "loop":
            continue
        for module_name, module, attr in owners[id(p)]:
            plan = plans.setdefault(
                id(module), _ModulePlan(module_name, module, factored_layer(module))
            )
            if _use(kind, module, attr) == "exact":
                plan.exact[attr] = name
            else:
                setattr(plan, attr, name)
    return list(plans.values()), paths


def per_example_module_grads(
    module: nn.Module,
    attrs: Sequence[str],
    args: tuple,
    kwargs: Mapping[str, Any],
    cotangents: torch.Tensor,
    batched: bool,
) -> dict[str, torch.Tensor]:
    """Exact per-example gradients ``{attr: [B, *shape]}`` of ``module``'s own parameters.

    ``cotangents[e]`` is ``∂s_e/∂output``. For a batched call, example ``e`` is the module
    applied to row ``e`` of every input whose dimension 0 is the batch (kept as a batch of
    one, so modules that need a batch axis work); for an unbatched call the inputs are shared
    and only the cotangent varies. Uses ``torch.func`` ``vjp`` under ``vmap``, except
    for batch norm on running statistics, a per-channel affine map whose gradients have a
    closed form (:func:`batch_norm_eval_grads`).
    """
    closed_form = batch_norm_eval_grads(module, attrs, args, kwargs, cotangents, batched)
    if closed_form is not None:
        return closed_form
    params = {attr: getattr(module, attr).detach() for attr in attrs}

    def pullback(call_args: tuple, call_kwargs: dict, cotangent: torch.Tensor) -> dict:
        _, vjp_fn = torch.func.vjp(
            lambda p: torch.func.functional_call(module, p, call_args, call_kwargs), params
        )
        return vjp_fn(cotangent)[0]

    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    if not batched:
        _, vjp_fn = torch.func.vjp(
            lambda p: torch.func.functional_call(module, p, args, kwargs), params
        )
        return torch.func.vmap(lambda c: vjp_fn(c)[0])(cotangents)
    size = cotangents.shape[0]

    def batch_dim(value: Any) -> int | None:
        is_batched = isinstance(value, torch.Tensor) and value.ndim > 0
        return 0 if is_batched and value.shape[0] == size else None

    arg_dims = tuple(batch_dim(a) for a in args)
    kwarg_dims = {k: batch_dim(v) for k, v in kwargs.items()}
    args = tuple(a.unsqueeze(1) if d == 0 else a for a, d in zip(args, arg_dims, strict=True))
    kwargs = {k: v.unsqueeze(1) if kwarg_dims[k] == 0 else v for k, v in kwargs.items()}
    return torch.func.vmap(pullback, in_dims=(arg_dims, kwarg_dims, 0))(
        args, kwargs, cotangents.unsqueeze(1)
    )


def project_patches(
    module: nn.Module, x: torch.Tensor, factor: torch.Tensor | None
) -> torch.Tensor:
    """``P_inᵀ x_p`` for every input patch ``x_p`` of convolution ``module``, per group.

    ``x`` is the module's input (``[N, C_in, *spatial]``, or unbatched ``[C_in, *spatial]``),
    ``factor`` is ``P_in`` ``[C_in/groups · prod(kernel_size), k_in]`` (``None``: identity).
    The patches are never unfolded: ``P_inᵀ`` reshaped as a ``[k_in, C_in/groups, *kernel]``
    kernel, repeated for every group, is applied by the module's own ``_conv_forward``, so
    stride, padding (ints or ``"same"``/``"valid"``), dilation, ``padding_mode`` and groups
    are the module's. Patch entries are ordered as ``F.unfold`` orders them, i.e. as the
    weight ``[C_out, C_in/groups, *kernel]`` flattens. Returns ``[N, groups, k_in, L]``
    (``L`` output positions).
    """
    kernel, groups = tuple(module.kernel_size), module.groups
    if x.ndim == len(kernel) + 1:
        x = x.unsqueeze(0)
    if factor is None:
        side = module.in_channels // groups * math.prod(kernel)
        factor = torch.eye(side, dtype=x.dtype, device=x.device)
    k_in = factor.shape[1]
    weight = factor.T.reshape(k_in, module.in_channels // groups, *kernel)
    if groups > 1:
        weight = weight.repeat(groups, *[1] * (weight.ndim - 1))
    out = module._conv_forward(x, weight, None)
    return out.reshape(out.shape[0], groups, k_in, -1)


def conv_features(
    grads: torch.Tensor,
    inputs: torch.Tensor,
    rows: torch.Tensor | None,
    order: str | None = None,
) -> torch.Tensor:
    """``Σ_j Σ_p (P_out[j]ᵀ g_p^(j)) (u_p^(j))ᵀ`` per example, ``[B, k_out, k_in]``.

    ``grads`` ``[B, G, C_out/G, L]`` are output gradients by group, ``inputs`` ``[B, G, k_in,
    L]`` the projected patches ``u_p^(j) = P_inᵀ x_p^(j)``, ``rows`` is ``P_out``
    ``[C_out, k_out]`` (``None``: identity). Either the gradients are projected first
    (``L·(C_out·k_out + G·k_out·k_in)`` multiply-adds per example) or the positions are summed
    first, giving the input-projected gradient ``[C_out, k_in]``, then ``P_out`` is applied
    (``L·C_out·k_in + C_out·k_out·k_in``). ``order`` (``"grads_first"`` or
    ``"positions_first"``) forces one; by default the cheaper is used (the second for
    depthwise convolutions, where ``G·k_out`` exceeds ``C_out``). Neither forms a
    ``[C_out, C_in·kh·kw]`` tensor per example.
    """
    size, groups, per_group, positions = grads.shape
    c_out, k_in = groups * per_group, inputs.shape[2]
    if order is None and rows is not None:
        k_out = rows.shape[1]
        grads_first = positions * (c_out * k_out + groups * k_out * k_in)
        positions_first = positions * c_out * k_in + c_out * k_out * k_in
        order = "grads_first" if grads_first <= positions_first else "positions_first"
    if rows is not None and order == "grads_first":
        # [G, k_out, C_out/G] @ [B, G, C_out/G, L] -> [B, G, k_out, L]
        grads_proj = rows.reshape(groups, per_group, -1).transpose(1, 2) @ grads
        features = grads_proj @ inputs.transpose(2, 3)  # [B, G, k_out, k_in]
        return features[:, 0] if groups == 1 else features.sum(1)
    half = (grads @ inputs.transpose(2, 3)).reshape(size, c_out, k_in)  # [B, C_out, k_in]
    return half if rows is None else rows.T @ half


def batch_norm_eval_grads(
    module: nn.Module,
    attrs: Sequence[str],
    args: tuple,
    kwargs: Mapping[str, Any],
    cotangents: torch.Tensor,
    batched: bool,
) -> dict[str, torch.Tensor] | None:
    """Per-example ``weight``/``bias`` gradients of a batch norm that uses running statistics.

    Then ``y = γ x̂ + β`` with ``x̂ = (x - running_mean) / sqrt(running_var + eps)`` channel by
    channel (dimension 1), so ``∂s_e/∂γ = Σ g x̂`` and ``∂s_e/∂β = Σ g`` over every other axis
    of example ``e`` (all rows of a shared input for an unbatched call). ``None`` when that
    does not apply (training mode or no running statistics: batch statistics couple the
    examples; a subclass that overrides ``forward``); the caller then uses ``torch.func``.
    """
    norm = nn.modules.batchnorm._BatchNorm
    if (
        not isinstance(module, norm)
        or type(module).forward is not norm.forward
        or module.training
        or module.running_mean is None
        or module.running_var is None
        or not set(attrs) <= {"weight", "bias"}
        or len(args) != 1
        or kwargs
        or not isinstance(args[0], torch.Tensor)
    ):
        return None
    size, channels = cotangents.shape[0], module.num_features
    dtype = torch.promote_types(cotangents.dtype, module.running_var.dtype)
    x = args[0].detach().to(dtype)
    x = x.reshape(x.shape[0], channels, -1)  # [N, C, L]; N = B for a batched call
    grads = cotangents.to(dtype).reshape(size, -1, channels, x.shape[2])  # [B, 1 or N, C, L]
    bias = grads.sum((1, 3))
    out = {"bias": bias} if "bias" in attrs else {}
    if "weight" in attrs:  # Σ g x̂ = (Σ g x - mean Σ g) / std: x̂ is never formed
        scale = (module.running_var.to(dtype) + module.eps).rsqrt()
        if batched:  # example e pairs with row e of the input
            moment = torch.linalg.vecdot(grads[:, 0], x)
        else:  # the input is shared by every example
            moment = torch.linalg.vecdot(grads, x[None]).sum(1)
        out["weight"] = (moment - module.running_mean.to(dtype) * bias) * scale
    return out


class ProjectedGradientCapture:
    """Context manager giving projected per-example gradients ``z_e = Pᵀ ∇θ s_e(θ)``.

    Example::

        capture = ProjectedGradientCapture(model, dim=200, seed=0)
        model.eval()
        with capture:
            out = model(**batch)
            scores = score_fn(out, batch)  # [B], s_e depends on example e only
            z = capture.per_example(scores)  # [B, capture.output_dim]
        delta = capture.lift(w)  # {name: Δθ_name}, Δθ = P w

    Args:
        model: any ``nn.Module`` (a peft model differentiates its adapters).
        dim: output dimension (``None`` for ``kind="factored"`` without second stage, whose
            output has one coordinate per factored feature).
        seed: seed of every projection matrix (see :mod:`hf_tae.gradients.projection`).
        kind: ``"factored"`` (Kronecker per linear weight, fast) or ``"dense"`` (dense JL of
            exact per-example gradients, the reference).
        dense_kind: ``"rademacher"`` or ``"gaussian"`` entries.
        factor_dim: per-side dimension of the Kronecker factors (capped at the layer sizes).
        second_stage: map the factored features to ``dim`` with a dense JL matrix.
        include, exclude: substrings or regular expressions on parameter names restricting the
            trainable parameters that are differentiated.
        on_nonfinite: ``"raise"`` a :class:`TaeError` naming the batch positions whose
            projected gradient has NaN/inf, or ``"return"`` them (listed in
            :attr:`nonfinite_positions`) for the caller to skip.
        dtype: dtype of the accumulated features and of the result (float64 for checks).
        cache_bytes: memory budget for projection matrices reused across batches.

    Attributes:
        parameters: ``(name, shape)`` of the differentiated parameters, in model order.
        paths: ``{name: "factored" | "exact" | "exact+factored" | "loop"}`` (module
            docstring).
        projector: the :class:`~hf_tae.gradients.projection.GradientProjector`.
        nonfinite_positions: batch positions with non-finite features in the last call.
    """

    def __init__(
        self,
        model: nn.Module,
        dim: int | None = 200,
        seed: int = 0,
        kind: str = "factored",
        dense_kind: str = "rademacher",
        factor_dim: int = 16,
        second_stage: bool = True,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        *,
        on_nonfinite: str = "raise",
        dtype: torch.dtype = torch.float32,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if on_nonfinite not in ("raise", "return"):
            raise TaeError(f"on_nonfinite must be 'raise' or 'return', got {on_nonfinite!r}.")
        if dtype not in (torch.float32, torch.float64):
            raise TaeError(f"dtype must be torch.float32 or torch.float64, got {dtype}.")
        selected = select_parameters(model, include, exclude)
        self.model, self.on_nonfinite, self.dtype = model, on_nonfinite, dtype
        self.parameters = [(name, tuple(p.shape)) for name, p in selected]
        self._plans, self.paths = _plan_modules(model, selected, kind)
        self.projector = GradientProjector(
            self.parameters,
            kind=kind,
            dim=dim,
            seed=seed,
            dense_kind=dense_kind,
            factor_dim=factor_dim,
            second_stage=second_stage,
            cache_bytes=cache_bytes,
        )
        self.nonfinite_positions: list[int] = []
        self._devices = {name: p.device for name, p in selected}
        self._loop_params = [(n, p) for n, p in selected if self.paths[n] == "loop"]
        self._root = torch.zeros((), requires_grad=True)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._warned: set[str] = set()
        self._active = self._recomputing = self._in_backward = self._hooks_live = False
        self._reset()

    @property
    def output_dim(self) -> int:
        """Length of each projected gradient."""
        return self.projector.output_dim

    def _reset(self) -> None:
        self._calls: list[_Call] = []
        self._batch_size: int | None = None
        self._input_storages: set[int] = set()
        self._root_used = False
        self._stage1: torch.Tensor | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> ProjectedGradientCapture:
        if self._active:
            raise TaeError("this capture is already active; do not nest `with capture:` blocks.")
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            raise TaeError(
                "gradient checkpointing recomputes the forward pass inside backward, which the "
                "hooks cannot follow; disable it first (model.activation_checkpointing_disable(), "
                "model.gradient_checkpointing_disable() before transformers 5)."
            )
        if self.model.training:
            warnings.warn(
                "the model is in training mode: dropout makes the projected gradients random; "
                "call model.eval() before capturing.",
                stacklevel=2,
            )
        loop_ids = {id(p) for _, p in self._loop_params}
        self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_flags:
            p.requires_grad_(id(p) in loop_ids)
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True)
        ]
        for plan in self._plans:
            hook = partial(self._on_forward, plan)
            self._handles.append(plan.module.register_forward_hook(hook, with_kwargs=True))
        self._active = True
        self._reset()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        for p, flag in self._saved_flags:
            p.requires_grad_(flag)
        self._handles, self._saved_flags = [], []
        self._active = False
        self._reset()

    # ------------------------------------------------------------------ forward hooks
    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Record the batch size (dimension 0 of the first tensor input); detach inputs."""
        if self._recomputing:
            return None
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        self._batch_size = tensors[0].shape[0] if tensors and tensors[0].ndim else None
        self._input_storages = {t.untyped_storage().data_ptr() for t in tensors}

        def detach(value: Any) -> Any:
            is_grad_tensor = isinstance(value, torch.Tensor) and value.requires_grad
            return value.detach() if is_grad_tensor else value

        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}

    def _on_forward(
        self, plan: _ModulePlan, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> torch.Tensor | None:
        """Record one call: projected input (factored) or inputs (exact); hook its output."""
        if self._recomputing or not torch.is_grad_enabled():
            return None
        if self._in_backward:
            raise TaeError(
                f"module {plan.name!r} ran during the backward pass (gradient checkpointing?); "
                "disable recomputation while capturing."
            )
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise TaeError(
                f"module {plan.name!r} ({type(module).__name__}) returned {type(output).__name__}, "
                f"but a module whose parameters are captured must return one floating tensor; "
                f"exclude {self._plan_names(plan)} (exclude=[...])."
            )
        if not output.requires_grad:
            output = output + self._root  # D1.3: lets autograd reach the hook without dW
            self._root_used = True
        batched = self._is_batched(args, kwargs, output)
        call = _Call(plan, batched, (tuple(output.shape), output.dtype, output.device))
        if plan.weight is not None:
            call.inputs_proj = self._project_inputs(plan, args, kwargs)
        if plan.exact:
            call.args, call.kwargs = args, kwargs
        if batched:
            output.register_hook(partial(self._on_output_grad, call))
        else:
            call.edge = torch.autograd.graph.get_gradient_edge(output)
        self._calls.append(call)
        return output

    def _is_batched(self, args: tuple, kwargs: dict, output: torch.Tensor) -> bool:
        """Whether dimension 0 of ``output`` is the batch, so hooks can split it by example.

        The leading size must be the batch size. A lookup on integer inputs only (an
        embedding) must also read a tensor passed to the model: indices built inside the
        model (T5's relative position buckets, shifted decoder ids) may have a leading size
        equal to the batch size by chance. Unbatched calls are exact but slower (per-example
        backward passes), so doubt goes that way.
        """
        size = self._batch_size
        if size is None:
            return True
        if output.ndim == 0 or output.shape[0] != size:
            return False
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if any(t.is_floating_point() or t.is_complex() for t in tensors):
            return True
        return any(t.untyped_storage().data_ptr() in self._input_storages for t in tensors)

    def _plan_names(self, plan: _ModulePlan) -> list[str]:
        names = [plan.weight, plan.bias, *plan.exact.values()]
        return [name for name in names if name is not None]

    def _project_inputs(self, plan: _ModulePlan, args: tuple, kwargs: dict) -> torch.Tensor:
        """``x @ P_in`` flattened to ``[N, k_in]`` (as in LoGra); the raw activation is not kept.

        For an embedding ``x`` is one-hot, so ``x @ P_in`` is a row lookup in ``P_in``
        (zero at ``padding_idx``, which receives no gradient).
        """
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            raise TaeError(
                f"module {plan.name!r} was called with {len(args)} positional and "
                f"{len(kwargs)} keyword arguments, but the factored path needs module(x); use "
                f"kind='dense' or exclude {plan.weight!r}."
            )
        x, module = args[0].detach(), plan.module
        block = self.projector.blocks[plan.weight]
        if plan.layer == "conv":
            return project_patches(module, x, block.col_factor(x.device, x.dtype))
        if plan.layer == "linear":
            return apply_factor(x.reshape(-1, x.shape[-1]), block.col_factor(x.device, x.dtype))
        if plan.layer == "conv1d":
            return apply_factor(x.reshape(-1, x.shape[-1]), block.row_factor(x.device, x.dtype))
        ids, dtype = x.reshape(-1), module.weight.dtype
        factor = block.row_factor(x.device, dtype)
        if factor is None:
            factor = torch.eye(module.num_embeddings, dtype=dtype, device=x.device)
        rows = factor[ids]
        if module.padding_idx is not None:
            rows[ids == module.padding_idx] = 0
        return rows

    # ------------------------------------------------------------------ backward side
    def _on_output_grad(self, call: _Call, grad: torch.Tensor) -> None:
        """Tensor hook on a batched output: its gradient is the per-example cotangent."""
        if self._hooks_live:
            self._accumulate(call, grad)

    def _accumulate(self, call: _Call, cotangents: torch.Tensor) -> None:
        """Add one call's per-example stage-1 features; ``cotangents[e] = ∂s_e/∂output``."""
        size = self._stage1.shape[0]
        if cotangents.shape[0] != size:
            raise TaeError(
                f"module {call.plan.name!r} produced an output with leading dimension "
                f"{cotangents.shape[0]}, but the scores have {size} entries; dimension 0 of every "
                f"captured module's output must be the batch (exclude {self._plan_names(call.plan)})."
            )
        plan = call.plan
        if plan.layer == "conv" and (plan.weight is not None or plan.bias is not None):
            self._accumulate_conv(call, cotangents)
        elif plan.weight is not None or plan.bias is not None:
            self._accumulate_factored(call, cotangents.reshape(size, -1, cotangents.shape[-1]))
        if plan.exact:
            self._recomputing = True
            try:
                grads = per_example_module_grads(
                    plan.module, list(plan.exact), call.args, call.kwargs, cotangents, call.batched
                )
            finally:
                self._recomputing = False
            for attr, grad in grads.items():
                self._add(plan.exact[attr], self.projector.blocks[plan.exact[attr]].project, grad)

    def _add(self, name: str, project, grad: torch.Tensor) -> None:
        """``stage1[:, offsets[name]] += project(grad flattened per example)``."""
        stage1 = self._stage1
        flat = grad.reshape(stage1.shape[0], -1).to(stage1.dtype)
        stage1[:, self.projector.offsets[name]] += project(flat)

    def _accumulate_factored(self, call: _Call, grads: torch.Tensor) -> None:
        """Kronecker features ``Σ_t (P_outᵀ g_t)(P_inᵀ x_t)ᵀ`` and bias features ``Σ_t g_t``.

        ``grads`` is ``[B, T, out]`` (LoGra's factored projection, Choe et al. 2024).
        """
        plan, dtype = call.plan, self._stage1.dtype
        if plan.bias is not None:
            self._add(plan.bias, self.projector.blocks[plan.bias].project, grads.sum(1))
        if plan.weight is None:
            return
        block = self.projector.blocks[plan.weight]
        rows_are_outputs = plan.layer == "linear"  # Conv1D and embedding weights are [in, out]
        side = block.row_factor if rows_are_outputs else block.col_factor
        grads_proj = apply_factor(grads, side(grads.device, grads.dtype)).to(dtype)
        inputs = call.inputs_proj.to(dtype)
        size = grads.shape[0]
        if call.batched:
            inputs = inputs.reshape(size, -1, inputs.shape[-1])
        else:
            inputs = inputs.unsqueeze(0).expand(size, -1, -1)
        if rows_are_outputs:
            features = grads_proj.transpose(1, 2) @ inputs
        else:
            features = inputs.transpose(1, 2) @ grads_proj
        self._add(plan.weight, lambda flat: flat, features)

    def _accumulate_conv(self, call: _Call, cotangents: torch.Tensor) -> None:
        """Convolution features ``Σ_j Σ_p (P_out[j]ᵀ g_p^(j)) (P_inᵀ x_p^(j))ᵀ`` and ``Σ_p g_p``.

        ``cotangents`` is ``[B, *output shape]``; ``j`` runs over the groups (``P_out[j]``:
        the rows of ``P_out`` of group ``j``'s output channels), ``p`` over output positions
        (and over the leading axis of an unbatched call's output). See
        :func:`conv_features` for the contraction order.
        """
        plan, module, dtype = call.plan, call.plan.module, self._stage1.dtype
        size, groups, c_out = cotangents.shape[0], module.groups, module.out_channels
        positions = math.prod(call.out_meta[0][-len(module.kernel_size) :])
        grads = cotangents.reshape(size, -1, groups, c_out // groups, positions)
        if plan.bias is not None:
            bias_grads = grads.sum((1, 4)).reshape(size, c_out)
            self._add(plan.bias, self.projector.blocks[plan.bias].project, bias_grads)
        if plan.weight is None:
            return
        # [B, N, G, C_out/G, L] -> [B, G, C_out/G, N·L] (N = 1 for a batched call)
        grads = grads.permute(0, 2, 3, 1, 4).reshape(size, groups, c_out // groups, -1)
        inputs = call.inputs_proj.to(dtype)  # [N, G, k_in, L]
        if not call.batched:  # inputs shared by all examples: positions of all N rows
            inputs = inputs.permute(1, 2, 0, 3).reshape(1, groups, inputs.shape[2], -1)
            inputs = inputs.expand(size, -1, -1, -1)
        block = self.projector.blocks[plan.weight]
        features = conv_features(grads.to(dtype), inputs, block.row_factor(grads.device, dtype))
        self._add(plan.weight, lambda flat: flat, features)

    def per_example(self, scores: torch.Tensor) -> torch.Tensor:
        """Projected per-example gradients ``[B, output_dim]`` of ``scores`` (``[B]``).

        Runs one backward of ``scores.sum()`` (plus one per example for loop-path
        parameters and unbatched calls). ``scores[e]`` must depend on example ``e`` only.
        Consumes the forward pass(es) recorded since the last call.
        """
        size = self._check_scores(scores)
        calls, self._calls = self._calls, []
        self._warn_unseen(calls)
        self._stage1 = torch.zeros(
            size, self.projector.stage1_dim, dtype=self.dtype, device=scores.device
        )
        self._in_backward = True
        try:
            self._run_loops(scores, [call for call in calls if not call.batched])
            sources = [self._root] if self._root_used else []
            sources += [p for _, p in self._loop_params]
            self._hooks_live = True
            torch.autograd.grad(scores.sum(), sources, allow_unused=True)
            features = self.projector.from_stage1(self._stage1)
        finally:
            self._in_backward = self._hooks_live = False
            self._reset()
        return self._check_finite(features)

    def _check_scores(self, scores: torch.Tensor) -> int:
        if not self._active:
            raise TaeError(
                "per_example must be called inside `with capture:`, after the forward pass."
            )
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.numel() == 0:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)
            raise TaeError(
                f"scores must be a 1-D tensor [batch] with one scalar per example, got {shape}; "
                "reduce each example's output to one value (e.g. mean over its tokens) and do "
                "not sum over the batch."
            )
        if not scores.is_floating_point() or not scores.requires_grad:
            raise TaeError(
                "scores are not attached to the autograd graph (or not floating); compute them "
                "from the outputs of a forward pass run inside `with capture:`, without "
                "torch.no_grad() or .detach()."
            )
        if self._batch_size is not None and scores.shape[0] != self._batch_size:
            raise TaeError(
                f"scores have {scores.shape[0]} entries but the forward pass had a batch of "
                f"{self._batch_size}; return one score per example of the batch."
            )
        if not self._root_used and not self._loop_params:
            raise TaeError(
                "no module with selected parameters ran under autograd inside `with capture:` "
                "since the last per_example call; run the forward pass inside the context, with "
                "gradients enabled, once per per_example call."
            )
        return scores.shape[0]

    def _warn_unseen(self, calls: list[_Call]) -> None:
        """Warn once about parameters whose module never ran (their gradient is taken as 0)."""
        seen = {name for call in calls for name in self._plan_names(call.plan)}
        unseen = [n for n, path in self.paths.items() if path != "loop" and n not in seen]
        new = [n for n in unseen if n not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"the modules of parameters {new[:5]} did not run in the forward pass; their "
                "gradients are taken as zero. If the model uses them outside their module's "
                "forward (e.g. nn.MultiheadAttention's out_proj), exclude them.",
                stacklevel=3,
            )

    def _run_loops(self, scores: torch.Tensor, unbatched: list[_Call]) -> None:
        """Per-example backward passes for loop-path parameters and unbatched calls."""
        targets = [p for _, p in self._loop_params] + [call.edge for call in unbatched]
        if not targets:
            return
        new = {call.plan.name for call in unbatched} - self._warned
        if new:
            self._warned.update(new)
            warnings.warn(
                f"modules {sorted(new)} ran on inputs without the batch dimension; their "
                "per-example gradients take one backward pass per example. Pass batched inputs "
                "(e.g. position_ids of shape [batch, seq], decoder_input_ids) to avoid it.",
                stacklevel=3,
            )
        metas = [(p.shape, p.dtype, p.device) for _, p in self._loop_params]
        metas += [call.out_meta for call in unbatched]
        columns: list[list[torch.Tensor]] = [[] for _ in targets]
        for e in range(scores.shape[0]):
            grads = torch.autograd.grad(scores[e], targets, retain_graph=True, allow_unused=True)
            for column, grad, (shape, dtype, device) in zip(columns, grads, metas, strict=True):
                column.append(
                    torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad
                )
        stacked = [torch.stack(column) for column in columns]
        for (name, _), grad in zip(self._loop_params, stacked, strict=False):
            self._add(name, self.projector.blocks[name].project, grad)
        for call, cotangents in zip(unbatched, stacked[len(self._loop_params) :], strict=True):
            self._accumulate(call, cotangents)

    def _check_finite(self, features: torch.Tensor) -> torch.Tensor:
        bad = (~torch.isfinite(features).all(dim=1)).nonzero().flatten().tolist()
        self.nonfinite_positions = bad
        if bad and self.on_nonfinite == "raise":
            raise TaeError(
                f"projected gradients at batch positions {bad[:10]} are not finite (NaN/inf); "
                "check those examples' scores (e.g. log-odds of p=1 are infinite, clamp them), "
                "or pass on_nonfinite='return' to get them and skip those rows."
            )
        return features

    # ------------------------------------------------------------------ parameter space
    def lift(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Δθ = P w``: ``[output_dim]`` -> ``{name: tensor shaped like the parameter}``.

        The adjoint of the projection (Grad-TAE's lift to parameter space); tensors are in ``w``'s
        dtype, on their parameter's device.
        """
        delta = self.projector.lift(w)
        return {name: d.to(self._devices[name]) for name, d in delta.items()}

    def metadata(self) -> dict[str, Any]:
        """JSON-able record of the projection and of each parameter's path."""
        return {**self.projector.metadata(), "paths": dict(self.paths)}
