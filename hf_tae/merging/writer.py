"""Sharded safetensors output, written as tensors arrive (mergekit's ``TensorWriter``, D.3).

Tensors are buffered until ``max_shard_bytes`` and flushed as a shard, so memory holds at
most one shard besides the merge's own working set. On :meth:`ShardWriter.close` the shards
are named as ``save_pretrained`` names them (``model.safetensors``, or
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``).

Given a :class:`~hf_tae.merging.resume.ShardProgress`, each shard is synced to disk and then
recorded there, and the shards it already lists are taken as written: a resumed merge adds
only the tensors after them and ends with the shards and index an uninterrupted one writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_tae.merging.resume import ShardProgress


class ShardWriter:
    def __init__(
        self,
        folder: str | Path,
        max_shard_bytes: int = 5_000_000_000,
        prefix: str = "model",
        progress: ShardProgress | None = None,
    ):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.progress = progress
        self._buffer: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        for shard in progress.shards if progress is not None else ():
            self._shards.append((self.folder / shard["file"], list(shard["tensors"])))
            self.total_bytes += shard["bytes"]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._buffer and self._bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.contiguous()
        self._bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        if self.progress is not None:
            _sync(path)  # whole on disk before the progress says so
            self.progress.add_shard(path.name, self._bytes, list(self._buffer))
        self._buffer, self._bytes = {}, 0

    def close(self) -> list[Path]:
        """Flush, name the shards and write the index; returns the shard paths."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = [self.folder / f"{self.prefix}.safetensors"]
        else:
            final = [
                self.folder / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)
            ]
        weight_map = {}
        for (tmp, names), path in zip(self._shards, final, strict=True):
            tmp.rename(path)
            weight_map.update(dict.fromkeys(names, path.name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / f"{self.prefix}.safetensors.index.json").write_text(
                json.dumps(index, indent=2)
            )
        return final


def _sync(path: Path) -> None:
    """Flush ``path``'s data to disk (fsync), so that it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
