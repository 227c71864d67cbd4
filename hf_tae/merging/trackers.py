"""Merge statistics from a model and a dataloader, by hooks on tracked modules.

One tracker per statistic, as kronfluence does: :class:`GramTracker` accumulates the input
Gram ``Σ_t x_t x_tᵀ`` of every ``nn.Linear``/``Conv1D`` (RegMean, K-FAC ``A``; A.5),
:class:`OutputGradTracker` the output-gradient Gram ``Σ_t g_t g_tᵀ`` (K-FAC ``G``; A.6), and
:class:`FisherTracker` the diagonal (and, for small vectors, full) Fisher from per-example
gradients (A.4). Padding is masked: encoder modules and decoder cross-attention inputs (the
encoder output) use ``attention_mask``, other decoder modules ``decoder_attention_mask`` (or
``labels != -100``). Grams are divided by their module's token count, Fishers by the example
count, and the counts are recorded (E.1.7).

Fisher and K-FAC need one backward per example (batch size 1, as MaTS): ``log p`` is the
example's summed (``reduction="sum"``) or mean (``"mean"``, MaTS) token log-likelihood of
the gold labels (``fisher="empirical"``) or of labels sampled from the model at each labeled
position (``"true"``; for a causal LM this is teacher-forced per-token sampling, not a sampled
sequence). Input Grams alone need only batched forward passes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_tae.errors import TaeError
from hf_tae.merging.statistics import FORMAT, MergeStatistics, checksum, config_fingerprint
from hf_tae.utils.patterns import compile_patterns, matches_any
from hf_tae.utils.progress import tqdm

KINDS = ("gram", "kfac", "fisher", "fisher_block")


class _Masks:
    """The padding masks of the current forward pass and which module reads which."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        self.encoder_modules: set[int] = set()
        self.handle: Any = None
        self.encoder_output: torch.Tensor | None = None
        self.encoder: torch.Tensor | None = None
        self.decoder: torch.Tensor | None = None
        if self.encoder_decoder:
            encoder = model.get_encoder()
            self.encoder_modules = {id(m) for m in encoder.modules()}
            self.handle = encoder.register_forward_hook(self._grab_encoder_output)

    def _grab_encoder_output(self, _module, _inputs, output) -> None:
        self.encoder_output = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def set(self, batch: Mapping[str, Any]) -> None:
        self.encoder = batch.get("attention_mask")
        self.decoder = batch.get("decoder_attention_mask")
        if self.decoder is None and self.encoder_decoder and batch.get("labels") is not None:
            self.decoder = batch["labels"] != -100
        self.encoder_output = None

    def for_call(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if not self.encoder_decoder or id(module) in self.encoder_modules:
            return self.encoder
        if self.encoder_output is not None and x is self.encoder_output:
            return self.encoder
        return self.decoder


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The ``[tokens, d]`` rows of ``x`` that are not padding."""
    if mask is not None and x.ndim == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class GramTracker:
    """``Σ_t x_t x_tᵀ`` (float32) and the token count of one module's inputs."""

    def __init__(self, dim: int, device: torch.device):
        self.sum = torch.zeros(dim, dim, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float()
        self.sum += rows.T @ rows
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).cpu()


OutputGradTracker = GramTracker  # the same accumulation, on output gradients (K-FAC G)


class FisherTracker:
    """Per-example squared gradients of chosen parameters (diagonal), or outer products of
    their flattened gradients (block, for small vectors such as (IA)³'s)."""

    def __init__(self, params: dict[str, nn.Parameter], block: bool):
        self.params = params
        self.block = block
        self.sums = {
            n: torch.zeros((p.numel(), p.numel()) if block else p.shape, device=p.device)
            for n, p in params.items()
        }
        self.count = 0

    def add(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        for name, grad in grads.items():
            if grad is None:
                continue
            g = grad.detach().float()
            if self.block:
                flat = g.reshape(-1)
                self.sums[name] += torch.outer(flat, flat)
            else:
                self.sums[name] += g * g
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        return {n: (s / max(self.count, 1)).cpu() for n, s in self.sums.items()}


def _is_causal_lm(model: nn.Module) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    return not getattr(config, "is_encoder_decoder", False) and type(inner).__name__.endswith(
        ("ForCausalLM", "LMHeadModel")
    )


def log_likelihood(
    model: nn.Module, batch: Mapping[str, Any], outputs: Any, *, sample: bool, reduction: str
) -> torch.Tensor:
    """Per-example ``log p(y | x)`` from ``outputs.logits`` and ``batch["labels"]`` (``-100``
    ignored; shifted by one for a causal LM); with ``sample``, ``y`` is drawn from the model at
    every labeled position."""
    labels = batch.get("labels")
    logits = getattr(outputs, "logits", None)
    if labels is None or logits is None or labels.is_floating_point():
        raise TaeError(
            "Fisher and K-FAC statistics need batches with integer 'labels' and a model that "
            "returns logits; pass log_likelihood=callable(model, batch, outputs) for other models."
        )
    if _is_causal_lm(model):
        logits, labels = logits[:, :-1], labels[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != -100
    if sample:
        drawn = torch.distributions.Categorical(logits=logp.detach()).sample()
        labels = torch.where(valid, drawn, labels)
    token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    dims = tuple(range(1, token.ndim))
    total = token.sum(dim=dims) if dims else token
    if reduction == "mean" and dims:
        total = total / valid.sum(dim=dims).clamp(min=1)
    return total


def _examples(batch: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    """The batch split into batches of one (tensors whose dimension 0 is the batch)."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim}
    if len(sizes) != 1:
        raise TaeError(
            f"batch tensors disagree on the batch size ({sorted(sizes)}); fix the collator."
        )
    size = sizes.pop()
    for e in range(size):
        yield {
            k: v[e : e + 1] if isinstance(v, torch.Tensor) and v.ndim else v
            for k, v in batch.items()
        }


def _hash_batch(digest: Any, batch: Mapping[str, Any]) -> None:
    for key in sorted(batch):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())


def compute_statistics(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, Any]],
    statistics: Sequence[str] = ("gram",),
    *,
    fisher: str = "empirical",
    reduction: str = "mean",
    max_examples: int | None = 1000,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    fisher_block: str | Sequence[str] | None = None,
    max_outgrad_dim: int = 8192,
    log_likelihood_fn: Callable[..., torch.Tensor] | None = None,
    model_id: str | None = None,
    revision: str | None = None,
) -> MergeStatistics:
    """Statistics of ``model`` on at most ``max_examples`` examples of ``dataloader``.

    ``statistics`` ⊆ ``("gram", "kfac", "fisher", "fisher_block")``: input Grams of linear
    layers, K-FAC factors (input and output-gradient Grams), the diagonal Fisher of trainable
    parameters, and the full Fisher of trainable parameters matching ``fisher_block`` patterns
    (small vectors). ``include``/``exclude`` filter modules (Grams) and parameters (Fisher) by
    name (substring or regex). Modules with more than ``max_outgrad_dim`` outputs get no ``G``
    (MaTS skips ``lm_head``, A.6). Linear weights tied to another module (GPT-2's ``lm_head``)
    are not tracked: they are averaged (A.8).
    """
    unknown = sorted(set(statistics) - set(KINDS))
    if unknown or not statistics:
        raise TaeError(f"statistics={list(statistics)}: choose among {list(KINDS)}.")
    if fisher not in ("empirical", "true") or reduction not in ("mean", "sum"):
        raise TaeError(
            f"fisher={fisher!r}, reduction={reduction!r}: use fisher 'empirical' or 'true' and "
            "reduction 'mean' (MaTS) or 'sum'."
        )
    keep, drop = compile_patterns("include", include), compile_patterns("exclude", exclude)
    canonical = _canonical_names(model)

    def selected(name: str) -> bool:
        return (not keep or matches_any(name, keep)) and not matches_any(name, drop)

    param_names = {id(p): canonical(n) for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    masks = _Masks(model)
    grams: dict[str, GramTracker] = {}
    outgrads: dict[str, OutputGradTracker] = {}
    layouts: dict[str, str] = {}
    checksums: dict[str, list[float]] = {}
    shapes: dict[str, list[int]] = {}
    handles = []
    want_gram = "gram" in statistics or "kfac" in statistics
    for name, module in model.named_modules():
        name = canonical(name)
        is_linear = isinstance(module, nn.Linear | Conv1D)
        if not (want_gram and is_linear and selected(name)):
            continue
        if param_names.get(id(module.weight)) != f"{name}.weight":  # tied to another module
            continue
        layout = "linear" if isinstance(module, nn.Linear) else "conv1d"
        d_in, d_out = module.weight.shape[::-1] if layout == "linear" else module.weight.shape
        layouts[name] = layout
        checksums[f"{name}.weight"] = checksum(module.weight)
        shapes[f"{name}.weight"] = list(module.weight.shape)
        grams[name] = GramTracker(d_in, device)
        if "kfac" in statistics and d_out <= max_outgrad_dim:
            outgrads[name] = OutputGradTracker(d_out, device)
        handles.append(module.register_forward_hook(_gram_hook(name, grams, outgrads, masks)))

    trainable = {
        canonical(n): p for n, p in model.named_parameters() if p.requires_grad and selected(n)
    }
    block_patterns = compile_patterns("fisher_block", fisher_block)
    trackers: list[FisherTracker] = []
    if "fisher" in statistics:
        trackers.append(FisherTracker(trainable, block=False))
    if "fisher_block" in statistics:
        if not block_patterns:
            raise TaeError("statistics 'fisher_block' needs fisher_block=<parameter patterns>.")
        chosen = {n: p for n, p in trainable.items() if matches_any(n, block_patterns)}
        trackers.append(FisherTracker(chosen, block=True))
    for tracker in trackers:
        for n, p in tracker.params.items():
            checksums[n], shapes[n] = checksum(p), list(p.shape)
    if want_gram and not grams:
        raise TaeError("no nn.Linear/Conv1D module matches include/exclude; loosen the patterns.")

    backward = "kfac" in statistics or bool(trackers)
    grad_params = {n: p for t in trackers for n, p in t.params.items()}
    if backward and not grad_params:
        grad_params = {canonical(n): p for n, p in model.named_parameters() if p.requires_grad}
    ll = log_likelihood_fn or (
        lambda m, b, o: log_likelihood(m, b, o, sample=fisher == "true", reduction=reduction)
    )
    digest = hashlib.sha256()
    n_examples = 0
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=max_examples, desc="merge statistics", unit="ex")
        for batch in dataloader:
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            }
            for example in _examples(batch) if backward else [batch]:
                if max_examples is not None and n_examples >= max_examples:
                    break
                size = next(v.shape[0] for v in example.values() if isinstance(v, torch.Tensor))
                if max_examples is not None and n_examples + size > max_examples:
                    example = dict(_slice(example, max_examples - n_examples))
                    size = max_examples - n_examples
                for one in _examples(example) if not backward else [example]:
                    _hash_batch(digest, one)  # per example: the hash ignores the batching
                masks.set(example)
                if backward:
                    with torch.enable_grad():
                        outputs = model(**example)
                        logp = ll(model, example, outputs).sum()
                        names = list(grad_params)
                        grads = torch.autograd.grad(
                            logp, [grad_params[n] for n in names], allow_unused=True
                        )
                    by_name = dict(zip(names, grads, strict=True))
                    for tracker in trackers:
                        tracker.add({n: by_name[n] for n in tracker.params})
                else:
                    with torch.no_grad():
                        model(**example)
                n_examples += size
                bar.update(size)
            if max_examples is not None and n_examples >= max_examples:
                break
        bar.close()
    finally:
        for handle in [*handles, masks.handle]:
            if handle is not None:
                handle.remove()
        model.train(was_training)
    if n_examples == 0:
        raise TaeError("the dataloader yielded no examples; pass a non-empty dataloader.")

    tensors: dict[str, torch.Tensor] = {}
    for name, tracker in grams.items():
        tensors[f"{name}.input_gram"] = tracker.mean()
    for name, tracker in outgrads.items():
        tensors[f"{name}.outgrad_gram"] = tracker.mean()
    for tracker in trackers:
        suffix = "fisher_block" if tracker.block else "fisher_diag"
        for n, value in tracker.mean().items():
            tensors[f"{n}.{suffix}"] = value
    config = getattr(model, "config", None)
    header = {
        "format": FORMAT,
        "version": 1,
        "statistics": list(statistics),
        "model": model_id or getattr(config, "_name_or_path", None) or type(model).__name__,
        "revision": revision,
        "config_hash": config_fingerprint(config.to_diff_dict()) if config is not None else None,
        "data_hash": digest.hexdigest()[:16],
        "n_examples": n_examples,
        "tokens": {name: t.count for name, t in grams.items()},
        "fisher": fisher if trackers else None,
        "reduction": reduction if backward else None,
        "normalisation": "Grams / module token count; Fishers / example count",
        "layouts": layouts,
        "checksums": checksums,
        "shapes": shapes,
    }
    return MergeStatistics(tensors, header)


def _canonical_names(model: nn.Module) -> Callable[[str], str]:
    """Names as the merge reads them: a peft (IA)³ model's ``base_model.model.x.ia3_l.default``
    becomes ``x.ia3_l``, the key of its saved adapter without the prefix. LoRA models are
    refused: their statistics belong to the full weight (compute them after
    ``merge_and_unload()``)."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return lambda name: name
    if any(str(getattr(c, "peft_type", "")).endswith("LORA") for c in configs.values()):
        raise TaeError(
            "LoRA is merged in full space: compute the statistics on model.merge_and_unload() "
            "(the full fine-tuned model), not on the PeftModel."
        )
    adapters = set(configs)

    def canonical(name: str) -> str:
        parts = name.removeprefix("base_model.model.").split(".")
        return ".".join(p for p in parts if p not in adapters)

    return canonical


def _slice(batch: Mapping[str, Any], size: int) -> Iterable[tuple[str, Any]]:
    for k, v in batch.items():
        yield k, v[:size] if isinstance(v, torch.Tensor) and v.ndim else v


def _gram_hook(
    name: str, grams: dict[str, GramTracker], outgrads: dict[str, GramTracker], masks: _Masks
) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0]
        mask = masks.for_call(module, x)
        grams[name].add(_rows(x, mask))
        tracker = outgrads.get(name)
        if tracker is not None and torch.is_grad_enabled() and output.requires_grad:
            output.register_hook(lambda g: tracker.add(_rows(g, mask)))

    return hook
