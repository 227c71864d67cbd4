"""Tiny saved models for the merge resume tests: a base and three fine-tuned copies."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {"embed.weight": (64, 16), "layer.0.weight": (16, 16), "layer.0.bias": (16,),
          "layer.1.weight": (32, 16), "head.weight": (4, 32)}  # fmt: skip


def save_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``tensors`` as a saved model folder (one safetensors file and a config)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "toy", "hidden_size": 16}')
    return folder


def base_and_tuned(root: Path) -> tuple[Path, list[Path]]:
    """A random base model and three copies moved by small noise (seeded), under ``root``."""
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    paths = [save_model(root / "base", base)]
    for i in range(3):
        tuned = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        paths.append(save_model(root / f"m{i}", tuned))
    return paths[0], paths[1:]
