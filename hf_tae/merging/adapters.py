"""peft adapters as tensor sources, and merged adapters written back.

LoRA is merged in full space (F, C.3 peft#3004): each adapter is read as
``θ_i = θ0 + ΔW_i`` with ``ΔW_i = s_i · B_i A_i`` (``s = α/r``, or ``α/√r`` with rslora,
per-module ``rank_pattern``/``alpha_pattern``; transposed for ``fan_in_fan_out``), so every
method sees ordinary weights and no ``A``/``B`` cross terms arise. The merge is kept in full
space, or refactored to rank ``r`` by a truncated SVD of ``W* − θ0``. (IA)³ vectors are merged
as they are, against a base of ones, so task vectors are ``l_i − 1`` (A.2, A.9). Variants whose
weights are not ``θ0 + s·B A`` (DoRA, LoRA biases, modules_to_save, …) are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_tae.errors import TaeError
from hf_tae.merging.sources import TensorSource

_PREFIX = "base_model.model."
# LoRA options that change what a saved adapter means; set, they are refused
_REFUSED = {
    "use_dora": "DoRA rescales the merged weight column-wise",
    "lora_bias": "LoRA biases add a trained bias",
    "modules_to_save": "modules_to_save holds fully trained modules",
    "trainable_token_indices": "trainable tokens change embedding rows",
    "layer_replication": "layer replication changes the architecture",
    "target_parameters": "target_parameters adapts raw parameters",
    "use_qalora": "QA-LoRA pools its inputs",
    "use_bdlora": "BD-LoRA is block-diagonal",
    "kasa_config": "KaSA rescales singular values",
    "arrow_config": "Arrow routes between adapters",
    "alora_invocation_tokens": "aLoRA activates on tokens",
    "monteclora_config": "MonteCLoRA samples its factors",
    "velora_config": "VeLoRA compresses activations",
}


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rule: a ``rank_pattern``/``alpha_pattern`` key matches a module name's suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _adapter_file(folder: Path, label: str) -> Path:
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise TaeError(
            f"{label}: {folder} has no adapter_model.safetensors; save with safetensors."
        )
    return file


class LoraSource:
    """A LoRA adapter seen as a full model: ``get(name) = θ0 + s · B A`` for adapted weights."""

    kind = "lora"

    def __init__(self, folder: Path, label: str, base: TensorSource, config: dict[str, Any]):
        for option, why in _REFUSED.items():
            if config.get(option):
                raise TaeError(
                    f"{label}: {option}={config[option]!r} is not supported ({why}, so the adapter "
                    "is not θ0 + s·B·A); merge_and_unload() it and merge the full models instead."
                )
        if config.get("bias", "none") != "none":
            raise TaeError(
                f"{label}: bias={config['bias']!r} trains biases beside LoRA; retrain with "
                "bias='none' or merge_and_unload() and merge the full models."
            )
        self.label, self.base, self.config_dict = label, base, config
        self.folder, self.config = base.folder, base.config
        self._file = safe_open(str(_adapter_file(folder, label)), framework="pt")
        self.deltas: dict[str, tuple[str, str, float]] = {}  # weight -> (A key, B key, scale)
        for key in self._file.keys():
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise TaeError(
                        f"{label}: adapter tensor {key!r} is not a LoRA A/B matrix (embedding or "
                        "other LoRA layers are not supported); merge_and_unload() it first."
                    )
                continue
            module = key.removeprefix(_PREFIX).split(".lora_A.")[0]
            r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            scale = alpha / (r**0.5 if config.get("use_rslora") else r)
            self.deltas[f"{module}.weight"] = (key, key.replace(".lora_A.", ".lora_B."), scale)
        missing = sorted(set(self.deltas) - set(base.names()))
        if missing:
            raise TaeError(
                f"{label}: the adapter targets {missing[:3]} which the base model lacks; it was "
                "trained on another base model."
            )

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def delta(self, name: str) -> torch.Tensor:
        a_key, b_key, scale = self.deltas[name]
        a, b = self._file.get_tensor(a_key).double(), self._file.get_tensor(b_key).double()
        if a.ndim != 2:
            raise TaeError(
                f"{self.label}: {a_key} is not a matrix (convolution LoRA); not supported."
            )
        delta = scale * (b @ a)
        return delta.T if self.config_dict.get("fan_in_fan_out") else delta

    def get(self, name: str) -> torch.Tensor:
        base = self.base.get(name)
        if name not in self.deltas:
            return base
        delta = self.delta(name)
        if tuple(delta.shape) != tuple(base.shape):
            raise TaeError(
                f"{self.label}: ΔW of {name!r} has shape {tuple(delta.shape)} but the base weight "
                f"{tuple(base.shape)}; the adapter belongs to another base model."
            )
        return base.double() + delta


class IA3Source:
    """An (IA)³ adapter: its vectors only, named ``<module>.ia3_l`` as in statistics."""

    kind = "ia3"

    def __init__(self, folder: Path, label: str, config: dict[str, Any]):
        if config.get("modules_to_save"):
            raise TaeError(
                f"{label}: modules_to_save={config['modules_to_save']!r} is not supported; "
                "merge_and_unload() and merge the full models."
            )
        self.label, self.config_dict, self.folder = label, config, folder
        self.config = None
        self._file = safe_open(str(_adapter_file(folder, label)), framework="pt")
        self._keys = {k.removeprefix(_PREFIX): k for k in self._file.keys()}

    def names(self) -> list[str]:
        return list(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(self._keys[name]).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(self._keys[name])


class OnesSource:
    """The (IA)³ base: every vector at its initial value 1."""

    def __init__(self, like: IA3Source):
        self.label, self.folder, self.config, self._like = "(IA)³ base (ones)", None, None, like

    def names(self) -> list[str]:
        return self._like.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._like.shape(name)

    def get(self, name: str) -> torch.Tensor:
        return torch.ones(self.shape(name))


def open_adapter(folder: Path, label: str, base: TensorSource | None) -> TensorSource:
    """A LoRA or (IA)³ adapter folder as a tensor source; other adapter types are refused."""
    config = json.loads((folder / "adapter_config.json").read_text())
    kind = config.get("peft_type")
    if kind == "LORA":
        if base is None:
            raise TaeError(f"{label} is a LoRA adapter; pass base=<the base model folder>.")
        return LoraSource(folder, label, base, config)
    if kind == "IA3":
        return IA3Source(folder, label, config)
    raise TaeError(
        f"{label}: peft_type={kind!r} is not supported (LORA and IA3 are); merge_and_unload() "
        "the adapters and merge the full models."
    )


def lora_factors(delta: torch.Tensor, rank: int, fan_in_fan_out: bool) -> tuple[torch.Tensor, ...]:
    """``(A, B)`` with ``B A`` the best rank-``rank`` approximation of ``delta`` (scale 1)."""
    delta = delta.T if fan_in_fan_out else delta
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]), (u[:, :rank] * root[None])


class LoraWriter:
    """Writes merged ``ΔW* = W* − θ0`` of the adapted weights as a rank-``rank`` LoRA adapter
    (``lora_alpha = r``, so the scale is 1)."""

    def __init__(self, folder: Path, rank: int, template: LoraSource):
        self.folder, self.rank, self.template = folder, rank, template
        self.tensors: dict[str, torch.Tensor] = {}
        self.residuals: dict[str, float] = {}

    def add(self, name: str, delta: torch.Tensor, dtype: torch.dtype) -> None:
        fan = bool(self.template.config_dict.get("fan_in_fan_out"))
        a, b = lora_factors(delta, self.rank, fan)
        module = _PREFIX + name.removesuffix(".weight")
        self.tensors[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
        self.tensors[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
        approx = (b @ a).T if fan else b @ a
        self.residuals[name] = (
            (approx - delta.double()).norm() / delta.norm().clamp(min=1e-30)
        ).item()

    def close(self) -> None:
        save_file(self.tensors, str(self.folder / "adapter_model.safetensors"))
        config = dict(self.template.config_dict)
        config.update(r=self.rank, lora_alpha=self.rank, rank_pattern={}, alpha_pattern={},
                      use_rslora=False)  # fmt: skip
        (self.folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_ia3(folder: Path, tensors: dict[str, torch.Tensor], template: IA3Source) -> None:
    """Save merged (IA)³ vectors as an adapter with ``template``'s config."""
    save_file({_PREFIX + k: v.contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(template.config_dict, indent=2))
