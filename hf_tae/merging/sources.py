"""Models as tensor sources: read one tensor at a time, never a whole model.

A folder of safetensors shards (``model.safetensors`` or ``model.safetensors.index.json``) is
read through ``safe_open`` (memory-mapped, one tensor copied out per ``get``), as mergekit's
lazy loader does (D.3); an in-memory state dict or ``nn.Module`` is wrapped as is. Adapters
(peft LoRA / (IA)³ folders) are in :mod:`hf_tae.merging.adapters`. A Hub model repo id
(``user/name``, or ``user/name@revision`` as in mergekit) that is not a local path is
downloaded first with ``snapshot_download``, safetensors and JSON/tokenizer files only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from torch import nn

from hf_tae.errors import TaeError


class TensorSource(Protocol):
    """What the merge engine reads from a model."""

    label: str
    folder: Path | None
    config: dict[str, Any] | None

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


class SafetensorsSource:
    """A Hugging Face model folder (or one ``.safetensors`` file), read tensor by tensor."""

    def __init__(self, path: str | os.PathLike, label: str):
        path = Path(path)
        self.label = label
        if path.is_file():
            self.folder, files = path.parent, {None: path}
        else:
            self.folder = path
            index = _read_json(path / "model.safetensors.index.json")
            if index is not None:
                files = {name: path / file for name, file in index["weight_map"].items()}
            elif (path / "model.safetensors").is_file():
                files = {None: path / "model.safetensors"}
            else:
                raise TaeError(
                    f"{label}: {path} holds no model.safetensors or model.safetensors.index.json; "
                    "save the model with save_pretrained(safe_serialization=True)."
                )
        self.config = _read_json(self.folder / "config.json")
        self._handles: dict[Path, Any] = {}
        self._file_of: dict[str, Path] = {}
        for file in sorted(set(files.values())):
            for name in self._handle(file).keys():
                self._file_of[name] = file

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self._file_of[name]).get_tensor(name)


class StateDictSource:
    """An in-memory state dict or module; tied tensors (one storage, several names, as in
    ``model.state_dict()``) are kept once, under their first name, as ``save_pretrained``
    writes them."""

    def __init__(self, model: Mapping[str, torch.Tensor] | nn.Module, label: str):
        self.label, self.folder = label, None
        config = getattr(model, "config", None)
        self.config = config.to_diff_dict() if hasattr(config, "to_diff_dict") else None
        state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
        seen: set[tuple[int, int, tuple[int, ...]]] = set()
        self._tensors: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            key = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
            )
            if key in seen:
                continue
            seen.add(key)
            self._tensors[name] = tensor.detach()

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


#: What a merge reads from a Hub model repo: weights as safetensors (never pickles), the
#: config and adapter config, the shard index and the tokenizer files copied to the output.
HUB_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def is_hub_id(model: Any) -> bool:
    """Whether ``model`` reads as a Hub repo id (``user/name[@revision]``) and not a local path."""
    return (
        isinstance(model, str)
        and _REPO_ID.match(model) is not None
        and not Path(model).exists()
        and not model.startswith((".", "/", "~"))
    )


def download_model(model: str, label: str) -> Path:
    """The local snapshot of Hub model ``user/name[@revision]`` (safetensors, JSON and tokenizer
    files only; cached by ``huggingface_hub``, so a second merge downloads nothing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = model.partition("@")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=list(HUB_PATTERNS)))  # fmt: skip
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise TaeError(
            f"{label}: could not download {repo_id!r} (revision {revision or 'main'!r}) from the "
            f"Hub: {err}. Check the repo id, the revision and your access (HF_TOKEN), or pass a "
            "local folder."
        ) from err
    if not any(path.glob("*.safetensors")):
        raise TaeError(
            f"{label}: the Hub repo {repo_id!r} holds no .safetensors weights (pickled "
            "pytorch_model.bin files are not read); convert the model to safetensors first."
        )
    return path


def resolve_model(model: Any, label: str) -> Any:
    """``model`` with a Hub repo id replaced by its downloaded snapshot folder."""
    return download_model(model, label) if is_hub_id(model) else model


def open_source(
    model: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
    label: str,
    base: TensorSource | None = None,
) -> TensorSource:
    """A tensor source for a model folder, a Hub model repo id (``user/name[@revision]``), a
    peft adapter folder or repo (needs ``base`` for LoRA), a state dict or a module."""
    if isinstance(model, nn.Module):
        if hasattr(model, "peft_config"):
            raise TaeError(
                f"{label} is a PeftModel; pass its saved adapter folder (save_pretrained) or "
                "model.merge_and_unload()."
            )
        return StateDictSource(model, label)
    if isinstance(model, Mapping):
        return StateDictSource(model, label)
    path = Path(resolve_model(model, label))
    if not path.exists():
        raise TaeError(
            f"{label}: {path} does not exist; pass a model folder, file, Hub repo id "
            "(user/name[@revision]) or state dict."
        )
    if (path / "adapter_config.json").is_file():
        from hf_tae.merging.adapters import open_adapter

        return open_adapter(path, label, base)
    return SafetensorsSource(path, label)
