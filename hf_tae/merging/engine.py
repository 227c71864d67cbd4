"""``merge(...)``: one streaming pass over tensors, one registered method per tensor.

For every tensor name the engine reads θ0 and the M fine-tuned tensors (and each model's
statistics for it), checks them, calls the method, and hands the result to a sharded writer,
so memory stays near one tensor per input model plus its statistics (D.3). Methods with a
global step (TIES with ``trim="global"``) get extra streaming passes first. Solves run in
``solve_dtype`` (float64 by default) and the output takes the base's dtype. Output folders
appear whole or not at all, a killed merge resumes after its last finished shard, and a
finished one records a fingerprint of what was merged so that a rerun can skip it
(:mod:`hf_tae.merging.resume`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_tae.errors import TaeError
from hf_tae.merging.adapters import IA3Source, LoraSource, LoraWriter, OnesSource, write_ia3
from hf_tae.merging.registry import Block, get_method
from hf_tae.merging.resume import CONFIG_FILE, ShardProgress, finished_fingerprint, partial_folder
from hf_tae.merging.resume import fingerprint as inputs_fingerprint
from hf_tae.merging.sources import TensorSource, open_source, resolve_model
from hf_tae.merging.statistics import MergeStatistics, config_fingerprint
from hf_tae.merging.writer import ShardWriter
from hf_tae.utils.progress import tqdm

ModelLike = str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "spiece.model")  # fmt: skip
_STAT_KINDS = {"gram": ("gram", "kfac"), "kfac": ("kfac",), "fisher": ("fisher",),
               "fisher_block": ("fisher_block",)}  # fmt: skip


@dataclass
class MergeResult:
    """The merged tensors (``None`` when written to ``output_dir``), the per-tensor log
    (fallbacks, CG residuals), and whether a finished merge of the same inputs was found in
    ``output_dir`` and kept (``skipped``)."""

    state_dict: dict[str, torch.Tensor] | None
    log: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_dir: Path | None = None
    skipped: bool = False


def _open_statistics(statistics: Sequence[Any] | None, n: int) -> list[MergeStatistics] | None:
    if statistics is None:
        return None
    if len(statistics) != n:
        raise TaeError(
            f"{len(statistics)} statistics for {n} models; pass one per model, in order."
        )
    return [s if isinstance(s, MergeStatistics) else MergeStatistics.load(s) for s in statistics]


def _check_architecture(sources: list[TensorSource]) -> None:
    ref = sources[0]
    for src in sources[1:]:
        if (
            ref.config
            and src.config
            and config_fingerprint(ref.config) != config_fingerprint(src.config)
        ):
            keys = sorted(k for k in set(ref.config) | set(src.config)
                          if k not in ("_name_or_path", "transformers_version")
                          and ref.config.get(k) != src.config.get(k))  # fmt: skip
            raise TaeError(
                f"{src.label} has another architecture than {ref.label} (config differs in "
                f"{keys[:5]}); merge only models fine-tuned from the same base."
            )


def _check_names(ref: TensorSource, sources: list[TensorSource], names: list[str]) -> None:
    for src in sources:
        own = set(src.names())
        for name in names:
            if name not in own:
                raise TaeError(
                    f"tensor {name!r} is missing from {src.label}; every model must have the "
                    f"tensors of {ref.label} (same architecture and base)."
                )
            if src.shape(name) != ref.shape(name):
                raise TaeError(
                    f"tensor {name!r} has shape {src.shape(name)} in {src.label} but "
                    f"{ref.shape(name)} in {ref.label}; the models have different architectures."
                )
        extra = sorted(own - set(names))
        if extra and not isinstance(src, LoraSource):
            raise TaeError(
                f"tensor {extra[0]!r} of {src.label} is missing from {ref.label}; every model "
                "must have the same tensors (same architecture and base)."
            )


def merge(
    base: ModelLike | None,
    models: Sequence[ModelLike],
    method: str = "average",
    *,
    statistics: Sequence[MergeStatistics | str | os.PathLike] | None = None,
    weights: Sequence[float] | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    lora_rank: int | None = None,
    dtype: torch.dtype | None = None,
    solve_dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = 5_000_000_000,
    max_task_vector_ratio: float | None = 1.0,
    fixed: Mapping[str, torch.Tensor] | None = None,
    fingerprint: str | None = None,
    skip_if_finished: bool = False,
    **params: Any,
) -> MergeResult:
    """Merge ``models`` (fine-tuned from ``base``) with ``method`` and its ``params``.

    ``base`` and each model: a model folder (safetensors), a state dict, a module, or a peft
    LoRA / (IA)³ adapter folder (LoRA needs ``base``; (IA)³ merges ``l − 1`` and needs none).
    ``statistics``: one :class:`MergeStatistics` (or file) per model, for data-aware methods.
    ``weights``: per-model weights (default 1). With ``output_dir`` the result is written there
    (sharded safetensors, the base's config and tokenizer files, ``merge_config.json``,
    ``merge_log.json``) and not kept in memory; LoRA merges write a rank-``lora_rank`` adapter
    when ``lora_rank`` is set (else the full merged model); (IA)³ merges write an adapter.
    ``max_task_vector_ratio``: refuse a model whose ``‖θ_i − θ0‖ / ‖θ0‖`` over the weight
    matrices exceeds it (two random initialisations give about √2: a different base);
    ``None`` turns the check off. ``fixed``: tensors written as given instead of merged (e.g.
    task-private heads taken from each task's own model). A Hub model repo id
    (``user/name[@revision]``) is downloaded first (safetensors and config files only).

    Restarts: the output is written to ``.{name}.partial`` and renamed into place at the end,
    so an interrupted merge leaves nothing at ``output_dir``. After an exception the next merge
    starts afresh; after a kill, the next merge of the same fingerprint, ``max_shard_bytes``
    and ``device`` keeps the shards already finished and merges only the other tensors, giving
    bitwise the output of an uninterrupted merge.
    ``merge_config.json`` records ``fingerprint`` (default: one of the inputs, method, options
    and statistics, :func:`~hf_tae.merging.resume.fingerprint`); with ``skip_if_finished``, an
    ``output_dir`` holding a finished merge with the same fingerprint is kept as it is and
    returned with ``skipped=True`` (any other content still needs ``overwrite``).
    """
    spec = get_method(method)
    params = spec.check_params(params)
    if not models:
        raise TaeError("models is empty; pass the fine-tuned models to merge.")
    base = None if base is None else resolve_model(base, "the base model")
    models = [resolve_model(m, f"model {i}") for i, m in enumerate(models)]
    fixed = dict(fixed or {})
    if output_dir is not None:
        if fingerprint is None:
            fingerprint = inputs_fingerprint(
                method, params, weights, str(dtype), str(solve_dtype), lora_rank,
                max_task_vector_ratio, *(_fingerprint_input(m) for m in [base, *models]),
                *(_fingerprint_input(s) for s in statistics or ()), fixed,
            )  # fmt: skip
        if skip_if_finished and finished_fingerprint(output_dir) == fingerprint:
            log = json.loads((Path(output_dir) / "merge_log.json").read_text())
            return MergeResult(None, log, Path(output_dir), skipped=True)
    base_src = None if base is None else open_source(base, "the base model")
    srcs = [open_source(m, f"model {i} ({_describe(m)})", base_src) for i, m in enumerate(models)]
    kinds = {type(s) for s in srcs}
    if len(kinds) > 1:
        raise TaeError("the models mix adapter types and full models; merge one kind at a time.")
    ia3 = isinstance(srcs[0], IA3Source)
    if ia3:
        base_src = OnesSource(srcs[0])
    if spec.needs_base(params) and base_src is None:
        raise TaeError(f"merge method {method!r} with {params} needs base=<the base model>.")
    stats = _open_statistics(statistics, len(srcs))
    needed = spec.statistics(params)
    if needed and stats is None:
        raise TaeError(
            f"merge method {method!r} needs statistics {list(needed)}; compute one per model with "
            "hf_tae.merging.compute_statistics(model, dataloader, ...) and pass statistics=[...]."
        )
    weights = [1.0] * len(srcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(srcs):
        raise TaeError(f"{len(weights)} weights for {len(srcs)} models; pass one per model.")

    ref = base_src or srcs[0]
    _check_architecture([ref, *srcs] if not ia3 else srcs)
    names = ref.names()
    if isinstance(srcs[0], LoraSource) and lora_rank is not None:
        adapted = set().union(*(s.deltas for s in srcs))
        names = [n for n in names if n in adapted]
    _check_names(ref, [s for s in srcs if s is not ref], names)
    unknown = sorted(set(fixed) - set(names))
    if unknown:
        raise TaeError(
            f"fixed tensor {unknown[0]!r} is not a tensor of the models; check its name."
        )
    if stats is not None:
        _check_statistics(stats, srcs, needed, set(names))

    extra = {}
    if spec.prepare is not None:

        def task_vectors(i: int) -> Iterator[torch.Tensor]:
            for name in names:
                base_tensor = ref.get(name)
                if base_tensor.is_floating_point():
                    yield srcs[i].get(name).to(solve_dtype) - base_tensor.to(solve_dtype)

        extra = spec.prepare(task_vectors, len(srcs), params)

    log: dict[str, dict[str, Any]] = {}
    norms = torch.zeros(len(srcs) + 1, dtype=torch.float64)  # Σ‖τ_i‖², then ‖θ0‖²
    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:  # the output folder appears only when the merge succeeded
        folder = None
        if output_dir is not None:
            # the shard size and device change the bytes written, not what is merged
            key = inputs_fingerprint(fingerprint, max_shard_bytes, str(device))
            folder = stack.enter_context(partial_folder(output_dir, overwrite, fingerprint=key))
        writer = _writer(folder, srcs, lora_rank, ia3, max_shard_bytes)
        progress = writer.progress if isinstance(writer, ShardWriter) else None
        done = _resume(progress, log, norms)
        todo = [name for name in names if name not in done]
        for name in tqdm(todo, desc=f"merge ({method})", unit="tensor"):
            if name in fixed:
                tensor, info, stored = _fixed_tensor(name, fixed[name], ref)
            else:
                tensor, info, stored = _merge_tensor(name, ref if base_src else None, srcs,
                                                     weights, stats, spec, params, extra,
                                                     solve_dtype, device, norms)  # fmt: skip
            if info:
                log[name] = info
            if progress is not None:
                progress.note(name, {"log": info, "norms": norms.tolist()})
            out_dtype = dtype or stored
            if isinstance(writer, LoraWriter):
                writer.add(name, tensor - ref.get(name).to(tensor), out_dtype)
            elif writer is not None:
                writer.add(name, tensor.to(out_dtype))
            else:
                merged[name] = tensor.to(out_dtype)
        _check_bases(norms, srcs, max_task_vector_ratio)
        if folder is not None:
            _finish(folder, writer, merged, srcs, ref, ia3, method, params, weights, stats, log,
                    dtype, fingerprint)  # fmt: skip
    if output_dir is not None:
        return MergeResult(None, log, Path(output_dir))
    return MergeResult(merged, log)


def _resume(progress: ShardProgress | None, log: dict, norms: torch.Tensor) -> set[str]:
    """The tensors in the finished shards of a resumed merge; fills ``log`` with their entries
    and ``norms`` with the running norms after the last of them, so that the merge goes on as
    if it had merged them (floats survive JSON exactly)."""
    finished = progress.finished() if progress is not None else {}
    for name, state in finished.items():
        if state["log"]:
            log[name] = state["log"]
        norms.copy_(torch.tensor(state["norms"], dtype=norms.dtype))
    return set(finished)


def _fingerprint_input(item: Any) -> Any:
    """What identifies a model or statistics argument: a path as a path, the rest as is."""
    return Path(item) if isinstance(item, str) else item


def _fixed_tensor(name: str, tensor: torch.Tensor, ref: TensorSource):
    """A tensor given in ``fixed``: checked against the reference's shape, stored in its dtype."""
    stored = ref.get(name).dtype
    if tuple(tensor.shape) != ref.shape(name):
        raise TaeError(
            f"fixed tensor {name!r} has shape {tuple(tensor.shape)} but the models' is "
            f"{ref.shape(name)}; pass a tensor of the model's shape."
        )
    return tensor.detach().cpu(), {"fixed": True}, stored


def _describe(model: Any) -> str:
    return str(model) if isinstance(model, str | os.PathLike) else type(model).__name__


def _check_statistics(
    stats: list[MergeStatistics], srcs: list[TensorSource], needed: tuple[str, ...], names: set
) -> None:
    for s, src in zip(stats, srcs, strict=True):
        s.check_config(config_fingerprint(src.config), src.label)
        have = set(s.header.get("statistics", []))
        for kind in needed:
            if not have & set(_STAT_KINDS[kind]):
                raise TaeError(
                    f"the statistics of {src.label} hold {sorted(have)} but the method needs "
                    f"{kind!r}; recompute them with statistics=[{kind!r}, ...]."
                )
        unknown = sorted(set(s.covered()) - names)
        if unknown and not isinstance(src, LoraSource):
            raise TaeError(
                f"the statistics of {src.label} describe tensor {unknown[0]!r}, which the model "
                "lacks: they were computed on another model; recompute them on this one."
            )


def _merge_tensor(name, base, srcs, weights, stats, spec, params, extra, solve_dtype, device,
                  norms) -> tuple[torch.Tensor, dict, torch.dtype]:  # fmt: skip
    """Read, check and merge one tensor; returns it, its log entry and the dtype it is stored
    in (the base's, else model 0's). Each model's tensor is converted as it is read, so only
    one copy per model is alive (plus the method's own temporaries)."""
    first = srcs[0].get(name)
    if not first.is_floating_point():  # integer buffers: must agree, copied
        for s in srcs[1:]:
            if not torch.equal(s.get(name), first):
                raise TaeError(
                    f"integer tensor {name!r} differs in {s.label}; it cannot be merged."
                )
        return first, {}, first.dtype
    stored = first.dtype
    base_t = None
    if base is not None:
        base_raw = base.get(name)
        stored = base_raw.dtype
        base_t = base_raw.to(device=device, dtype=solve_dtype)
        del base_raw
    tracked = base_t is not None and base_t.ndim >= 2  # matrices: norms/biases start at 1 or 0
    if tracked:
        norms[-1] += base_t.double().pow(2).sum().cpu()
    models, tensor_stats, layout = [], None if stats is None else [], None
    for i, src in enumerate(srcs):
        raw = first if i == 0 else src.get(name)
        if stats is not None:
            stats[i].check_tensor(name, raw, src.label)
            tensor_stats.append(_to(stats[i].for_tensor(name), solve_dtype, device))
            layout = layout or stats[i].layout(name)
        t = raw.to(device=device, dtype=solve_dtype)
        del raw
        if not torch.isfinite(t).all():
            raise TaeError(f"tensor {name!r} of {src.label} has NaN/inf entries; fix the model.")
        if tracked:
            norms[i] += (t - base_t).double().pow(2).sum().cpu()
        models.append(t)
    del first
    block = Block(name, base_t, models, weights, tensor_stats, layout, dict(extra))
    tensor, info = spec.fn(block, **params)
    return tensor.cpu(), info, stored


def _to(ts, dtype, device):
    for key, value in vars(ts).items():
        if value is not None:
            setattr(ts, key, value.to(device=device, dtype=dtype))
    return ts


def _check_bases(norms: torch.Tensor, srcs: list[TensorSource], ratio: float | None) -> None:
    if ratio is None or norms[-1] == 0:
        return
    for i, src in enumerate(srcs):
        r = math.sqrt(norms[i] / norms[-1])
        if r > ratio:
            raise TaeError(
                f"{src.label} is far from the base (‖θ_i − θ0‖/‖θ0‖ = {r:.2f} > "
                f"max_task_vector_ratio={ratio}): it was not fine-tuned from this base. Pass the "
                "right base, or max_task_vector_ratio=None if this is intended."
            )


def _writer(folder, srcs, lora_rank, ia3, max_shard_bytes):
    if folder is None or ia3:
        return None
    if lora_rank is not None:
        if not isinstance(srcs[0], LoraSource):
            raise TaeError("lora_rank applies to LoRA adapters only; drop it for full models.")
        return LoraWriter(folder, lora_rank, srcs[0])
    return ShardWriter(folder, max_shard_bytes, progress=ShardProgress.load(folder))


def _finish(folder, writer, merged, srcs, ref, ia3, method, params, weights, stats, log,
            dtype, fingerprint) -> None:  # fmt: skip
    if ia3:
        write_ia3(folder, merged, srcs[0])
    else:
        writer.close()
        if isinstance(writer, LoraWriter):
            log["lora_svd_relative_error"] = writer.residuals
        elif ref.folder is not None:
            for file in _COPIED:
                if (ref.folder / file).is_file():
                    shutil.copy(ref.folder / file, folder / file)
            if dtype is not None and (folder / "config.json").is_file():
                config = json.loads((folder / "config.json").read_text())
                config["dtype"] = str(dtype).removeprefix("torch.")
                (folder / "config.json").write_text(json.dumps(config, indent=2))
    record = {
        "fingerprint": fingerprint,
        "merge_method": method,
        "parameters": params,
        "weights": weights,
        "models": [s.label for s in srcs],
        "statistics": None
        if stats is None
        else [
            {
                k: s.header.get(k)
                for k in ("model", "revision", "data_hash", "n_examples", "fisher", "reduction")
            }  # fmt: skip
            for s in stats
        ],
    }
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str))
    (folder / "merge_log.json").write_text(json.dumps(log, indent=2))
