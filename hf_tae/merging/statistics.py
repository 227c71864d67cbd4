"""Merge statistics as a shareable artifact: one safetensors file with a JSON header.

Keys are ``{module}.input_gram`` (RegMean, K-FAC ``A``), ``{module}.outgrad_gram`` (K-FAC ``G``),
``{param}.fisher_diag`` and ``{param}.fisher_block`` (F, recommended shape). The header (the
safetensors metadata entry ``hf_tae``) records where they come from (model, revision, config
fingerprint, data hash), how they were reduced (counts and normalisation, E.1.7), each tracked
module's weight layout, and a checksum of every covered weight, so that statistics computed on
another model are refused at merge time, tensor by tensor, while streaming.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_tae.errors import TaeError
from hf_tae.merging.registry import TensorStats

FORMAT = "hf_tae.merge_statistics"
FILENAME = "merge_statistics.safetensors"
_SUFFIXES = {
    "input_gram": "input_gram",
    "outgrad_gram": "outgrad_gram",
    "fisher": "fisher_diag",
    "fisher_block": "fisher_block",
}
# config entries that change with saving or running (the Trainer turns use_cache off), not
# with the architecture
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
             "use_cache"}  # fmt: skip


def config_fingerprint(config: Mapping[str, Any] | None) -> str | None:
    """A short hash of a model config (``config.json`` as a dict) without its volatile keys."""
    if config is None:
        return None
    kept = {k: v for k, v in config.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checksum(tensor: torch.Tensor) -> list[float]:
    """``[Σ x, ‖x‖]`` in float64: cheap, streamable, and moved by any change of the weight."""
    t = tensor.detach().double()
    return [t.sum().item(), t.norm().item()]


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, FILENAME, repo_type="dataset", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise TaeError(
            f"could not download merge statistics {repo_id!r} (revision {revision!r}) from the "
            f"Hub: {err}. Check the repo id, the revision and your access to it."
        ) from err


class MergeStatistics:
    """Statistics of one fine-tuned model, in memory or read lazily from a safetensors file.

    Build them with :func:`~hf_tae.merging.compute_statistics`; :meth:`save` and :meth:`load`
    round-trip them. ``header`` holds ``model``, ``revision``, ``config_hash``, ``data_hash``,
    ``n_examples``, ``tokens`` (per module), ``fisher`` (``"empirical"``/``"true"``),
    ``reduction``, ``layouts`` (module -> ``"linear"``/``"conv1d"``) and ``checksums``;
    :meth:`push_to_hub` publishes them and :meth:`load` reads them back from the Hub.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] | None,
        header: Mapping[str, Any],
        path: str | os.PathLike | None = None,
    ):
        self.header = dict(header)
        self.path = None if path is None else Path(path)
        self._tensors = dict(tensors or {})
        self._keys = set(self._tensors)
        self._file = None
        if self.path is not None:
            self._file = safe_open(str(self.path), framework="pt")
            self._keys = set(self._file.keys())

    # ----------------------------------------------------------------- storage
    @classmethod
    def load(cls, source: str | os.PathLike, revision: str | None = None) -> MergeStatistics:
        """Open a statistics file, a folder holding one, or a Hub dataset repo
        (``user/name``, at ``revision``); tensors are read one at a time when a merge needs
        them."""
        path = Path(source)
        if not path.exists() and str(source).count("/") == 1 and not str(source).startswith("."):
            path = _download(str(source), revision)
        elif revision is not None:
            raise TaeError(f"revision={revision!r} applies to Hub repos, not to {source}.")
        if path.is_dir():
            path = path / FILENAME
        if not path.is_file():
            raise TaeError(f"statistics file {path} does not exist; pass the file saved by save().")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("hf_tae")
        header = json.loads(raw) if raw else {}
        if header.get("format") != FORMAT:
            raise TaeError(
                f"{path} is not a merge statistics file (no {FORMAT!r} header); compute it with "
                "hf_tae.merging.compute_statistics and save it with .save()."
            )
        return cls(None, header, path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload merge statistics with hf_tae",
    ) -> Any:
        """Upload the statistics (one file and a card quoting the header) to a Hub dataset
        repo, so others can merge with them (mergekit#168). Returns the commit (a ``str``, the
        commit URL, whose ``.oid`` pins it: ``load(repo_id, revision=commit.oid)``)."""
        import tempfile

        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        summary = {k: self.header.get(k) for k in
                   ("model", "revision", "statistics", "fisher", "reduction", "n_examples",
                    "data_hash", "config_hash", "normalisation")}  # fmt: skip
        card = (
            "---\ntags: [hf-tae, model-merging, merge-statistics]\n---\n"
            f"# Merge statistics of {self.header.get('model')}\n\n"
            "Per-layer statistics for data-aware merging (Fisher, RegMean, K-FAC; MaTS). "
            "Load with `hf_tae.merging.MergeStatistics.load(repo_id)`.\n\n"
            f"```json\n{json.dumps(summary, indent=2)}\n```\n"
        )
        with tempfile.TemporaryDirectory() as tmp:
            self.save(Path(tmp) / FILENAME)
            (Path(tmp) / "README.md").write_text(card)
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="dataset",
                                     revision=revision, commit_message=commit_message)  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write every tensor and the header to ``path`` (a ``.safetensors`` file), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: self._raw(k).contiguous() for k in sorted(self._keys)}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"hf_tae": json.dumps(self.header)})
        os.replace(tmp, path)
        return path

    def in_memory(self) -> MergeStatistics:
        """A copy with every tensor read into memory (for repeated merges, e.g. a sweep)."""
        return MergeStatistics({k: self._raw(k) for k in self._keys}, self.header)

    def keys(self) -> list[str]:
        return sorted(self._keys)

    def _raw(self, key: str) -> torch.Tensor:
        return self._tensors[key] if key in self._tensors else self._file.get_tensor(key)

    def _get(self, key: str) -> torch.Tensor:
        tensor = self._raw(key)
        if not torch.isfinite(tensor).all():
            raise TaeError(
                f"statistic {key!r} ({self.path or 'in memory'}) has NaN/inf entries; recompute "
                "the statistics (check the model's loss on that data for NaN)."
            )
        return tensor

    # ----------------------------------------------------------------- per tensor
    def layout(self, name: str) -> str | None:
        """``"linear"``/``"conv1d"`` if ``name`` is the weight of a tracked module."""
        module, _, leaf = name.rpartition(".")
        return self.header.get("layouts", {}).get(module) if leaf == "weight" else None

    def for_tensor(self, name: str) -> TensorStats:
        """Everything these statistics hold for parameter ``name``."""
        module = name.rpartition(".")[0]
        found = {}
        for field, suffix in _SUFFIXES.items():
            owner = module if field in ("input_gram", "outgrad_gram") else name
            key = f"{owner}.{suffix}"
            if field in ("input_gram", "outgrad_gram") and self.layout(name) is None:
                continue
            if key in self._keys:
                found[field] = self._get(key)
        return TensorStats(**found)

    def covered(self) -> dict[str, list[float]]:
        """Parameter name -> checksum of every weight these statistics describe."""
        return dict(self.header.get("checksums", {}))

    def check_tensor(self, name: str, tensor: torch.Tensor, label: str) -> None:
        """Raise :class:`TaeError` unless ``tensor`` is the weight the statistics were computed on
        (checksums agree to the rounding of ``tensor``'s dtype)."""
        expected = self.header.get("checksums", {}).get(name)
        if expected is None:
            return
        if list(tensor.shape) != self.header.get("shapes", {}).get(name, list(tensor.shape)):
            raise TaeError(
                f"tensor {name!r} of {label} has shape {list(tensor.shape)} but its statistics "
                f"were computed for {self.header['shapes'][name]}; they belong to another model."
            )
        got = checksum(tensor)
        eps = torch.finfo(tensor.dtype).eps if tensor.is_floating_point() else 0.0
        tol = max(1e-5, 8 * eps) * max(expected[1], 1e-12) * math.sqrt(2)
        if abs(got[0] - expected[0]) > tol or abs(got[1] - expected[1]) > tol:
            raise TaeError(
                f"the statistics given for {label} were computed on a different weight "
                f"{name!r} (checksum {expected} vs {got}): they belong to another model or "
                "revision; recompute them on this model or pass them in the models' order."
            )

    def check_config(self, config_hash: str | None, label: str) -> None:
        """Raise :class:`TaeError` if the statistics' model config differs from ``label``'s."""
        own = self.header.get("config_hash")
        if own and config_hash and own != config_hash:
            raise TaeError(
                f"the statistics given for {label} were computed on a model with another config "
                f"(model {self.header.get('model')!r}, config hash {own} vs {config_hash}); "
                "recompute them on this model."
            )
