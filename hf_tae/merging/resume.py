"""Restartable merges: output that appears whole or not at all, and fingerprints of finished ones.

A merge writes into ``.{name}.partial`` next to its output folder and renames it into place
only when every shard, config and log is written; an exception deletes it, and a merge killed
outright (SIGKILL, power loss) leaves it behind for the next merge into the same folder to
delete first, so a rerun restarts cleanly and never sees half an output. ``merge_config.json``
records a fingerprint of the inputs, the method and its options, so that a rerun can tell a
finished merge of the same inputs (skip it) from a stale one (merge again).

Fingerprints are cheap: files count by resolved path, size and modification time (as make
does: a model saved again counts as new), in-memory tensors by their bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_tae.errors import TaeError

CONFIG_FILE = "merge_config.json"
PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """The folder a merge into ``path`` is written to before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


@contextmanager
def partial_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty ``.{name}.partial`` folder next to ``path``; on success it replaces
    ``path``, on any error it is deleted and ``path`` (if any) is left as it was.

    A partial folder already there is what a killed merge left: it is deleted first. Run one
    merge per output folder at a time. Raises :class:`TaeError` if ``path`` exists and
    ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise TaeError(f"{path} already exists; pass overwrite=True or choose another folder.")
    tmp = partial_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def finished_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint recorded by the finished merge in ``path``, or ``None``."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("fingerprint")
    except json.JSONDecodeError:
        return None


def fingerprint(*parts: Any) -> str:
    """sha256 of ``parts``: JSON values, paths (files by resolved path, size and mtime;
    folders by every file under them), tensors, state dicts, modules and
    :class:`~hf_tae.merging.MergeStatistics` (header, and file or tensors)."""
    digest = hashlib.sha256()
    for part in parts:
        _update(digest, part)
    return digest.hexdigest()


def _update(digest: Any, part: Any) -> None:
    from hf_tae.merging.statistics import MergeStatistics

    if isinstance(part, MergeStatistics):
        digest.update(json.dumps(part.header, sort_keys=True, default=str).encode())
        if part.path is not None:
            _update(digest, part.path)
        else:
            _update(digest, {k: part._raw(k) for k in part.keys()})
    elif isinstance(part, nn.Module):
        _update(digest, part.state_dict())
    elif isinstance(part, torch.Tensor):
        t = part.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(part, Mapping) and any(isinstance(v, torch.Tensor) for v in part.values()):
        for key in sorted(part):
            digest.update(str(key).encode())
            _update(digest, part[key])
    elif isinstance(part, list | tuple):
        digest.update(b"[")
        for item in part:
            _update(digest, item)
        digest.update(b"]")
    elif isinstance(part, os.PathLike):
        path = Path(part).resolve()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if not file.exists():
                raise TaeError(f"{file} does not exist; cannot fingerprint a missing input.")
            stat = file.stat()
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
