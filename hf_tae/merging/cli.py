"""``hf-tae merge config.yaml [output_dir]``: a merge described in YAML close to mergekit's.

    merge_method: mats            # any registered method (hf_tae.merging.method_names())
    base_model: ./base            # model folder or Hub id; omit for (IA)³ adapters
    models:
      - model: ./task_a           # folder, peft adapter folder or Hub id user/name[@revision]
        parameters: {weight: 1.0, statistics: ./task_a.stats.safetensors}
      - model: ./task_b
        parameters: {statistics: ./task_b.stats.safetensors}
    parameters: {objective: kfac, init: task_arithmetic, init_lambda: 0.3, max_iter: 100}
    dtype: bfloat16               # optional output dtype (default: the base's)
    lora_rank: 16                 # optional: write LoRA merges as a rank-16 adapter
    output_dir: ./merged          # or the second command-line argument

Per-model ``parameters`` hold ``weight`` and ``statistics`` only (other per-model values,
mergekit's gradients and slices are not supported); ``lambda`` is accepted for ``lam``.
Hub model ids are downloaded (safetensors and config files only). A rerun into a folder that
holds the finished merge of the same inputs and options skips it; an interrupted merge leaves
no output folder behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hf_tae.errors import TaeError
from hf_tae.merging.registry import canonical_params

_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "lora_rank", "output_dir"}
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _model_entry(entry: Any, i: int) -> tuple[str, float, str | None]:
    if isinstance(entry, str):
        return entry, 1.0, None
    if not isinstance(entry, dict) or "model" not in entry:
        raise TaeError(
            f"models[{i}] must be a path or a mapping with a 'model' key; got {entry!r}."
        )
    params = dict(entry.get("parameters") or {})
    weight = float(params.pop("weight", 1.0))
    stats = params.pop("statistics", None)
    if params:
        raise TaeError(
            f"models[{i}].parameters has {sorted(params)}; per-model parameters are 'weight' and "
            "'statistics' only: move method parameters to the top-level 'parameters'."
        )
    return str(entry["model"]), weight, stats


def merge_from_config(config: dict[str, Any], output_dir: str | None = None, **options: Any):
    """Run the merge a parsed YAML config describes; returns its
    :class:`~hf_tae.merging.MergeResult`."""
    import torch

    from hf_tae.merging.engine import merge

    unknown = sorted(set(config) - _TOP)
    if unknown:
        raise TaeError(f"unknown config keys {unknown}; the keys are {sorted(_TOP)}.")
    if "merge_method" not in config or not config.get("models"):
        raise TaeError("the config needs 'merge_method' and a non-empty 'models' list.")
    entries = [_model_entry(e, i) for i, e in enumerate(config["models"])]
    stats = [s for _, _, s in entries]
    if any(s is not None for s in stats) and None in stats:
        raise TaeError("give 'statistics' for every model or for none.")
    params = canonical_params(config.get("parameters") or {})
    dtype = config.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise TaeError(f"dtype={dtype!r}; choose one of {list(_DTYPES)}.")
    out = output_dir or config.get("output_dir")
    if out is None:
        raise TaeError("no output folder: pass it as the second argument or set 'output_dir'.")
    return merge(
        config.get("base_model"),
        [m for m, _, _ in entries],
        config["merge_method"],
        statistics=None if stats[0] is None else stats,
        weights=[w for _, w, _ in entries],
        output_dir=out,
        lora_rank=config.get("lora_rank"),
        dtype=None if dtype is None else getattr(torch, dtype),
        **options,
        **params,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-tae merge",
        description="Merge fine-tuned models (or peft adapters) of one base as a YAML config says.",
        epilog="config format:\n" + (__doc__ or "").split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="YAML file: merge_method, base_model, models, parameters")
    parser.add_argument("output_dir", nargs="?", help="output folder (default: the config's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="merge again into an existing output folder (default: keep a "
                        "finished merge of the same inputs and options, refuse anything else)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="device of the solves (e.g. cuda)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``hf-tae merge``; a bad config prints the :class:`TaeError` and returns 2."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    import yaml

    try:
        path = Path(args.config)
        if not path.is_file():
            raise TaeError(f"config {path} does not exist; pass a YAML file.")
        config = yaml.safe_load(path.read_text()) or {}
        if not isinstance(config, dict):
            raise TaeError(f"{path} must hold a YAML mapping (merge_method, models, ...).")
        result = merge_from_config(config, args.output_dir, overwrite=args.overwrite,
                                   device=args.device, skip_if_finished=not args.overwrite)  # fmt: skip
    except TaeError as err:
        print(f"hf-tae merge: error: {err}", file=sys.stderr)
        return 2
    if result.skipped:
        print(f"{result.output_dir} already holds this merge (same inputs and options); kept")
    else:
        print(f"merged model written to {result.output_dir}")
    return 0
