"""Restartable merges: output that appears whole or not at all, and fingerprints of finished ones.

A merge writes into ``.{name}.partial`` next to its output folder and renames it into place
only when every shard, config and log is written; an exception deletes it. A merge killed
outright (SIGKILL, power loss) leaves it behind: the next merge into the same folder resumes it
at shard level when its ``.progress.json`` records the same merge (:class:`ShardProgress`),
keeping the finished shards and merging only the other tensors, and deletes it otherwise, so a
rerun never sees half an output. ``merge_config.json`` records a fingerprint of the inputs, the
method and its options, so that a rerun can tell a finished merge of the same inputs (skip it)
from a stale one (merge again).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_tae.errors import TaeError

CONFIG_FILE = "merge_config.json"
PARTIAL_SUFFIX = ".partial"
PROGRESS_FILE = ".progress.json"


def partial_path(path: str | os.PathLike) -> Path:
    """The folder a merge into ``path`` is written to before it is renamed into place."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


@contextmanager
def partial_folder(
    path: str | os.PathLike, overwrite: bool = False, *, fingerprint: str
) -> Iterator[Path]:
    """Yield the ``.{name}.partial`` folder next to ``path``; on success it replaces ``path``
    (without its ``.progress.json``), on any error it is deleted and ``path`` (if any) is left
    as it was.

    A partial folder already there is what a killed merge left: if its progress records
    ``fingerprint`` (the same merge), its finished shards are kept for the merge to resume
    from and the rest of it is deleted; otherwise it is deleted whole and a new one records
    ``fingerprint``. Run one merge per output folder at a time. Raises :class:`TaeError` if
    ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise TaeError(f"{path} already exists; pass overwrite=True or choose another folder.")
    tmp = partial_path(path)
    _reuse_or_clear(tmp, fingerprint)
    try:
        yield tmp
        (tmp / PROGRESS_FILE).unlink()
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _reuse_or_clear(tmp: Path, fingerprint: str) -> None:
    """Keep only the finished shards (and progress) of a partial folder of this merge; any
    other partial folder is replaced by an empty one whose progress records ``fingerprint``."""
    progress = ShardProgress.load(tmp)
    if progress is None or progress.fingerprint != fingerprint or not progress.intact():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ShardProgress(tmp, fingerprint).save()
        return
    keep = {PROGRESS_FILE, *(shard["file"] for shard in progress.shards)}
    for entry in tmp.iterdir():  # a shard cut short, config files written at the very end
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name not in keep:
            entry.unlink()


@dataclass
class ShardProgress:
    """The finished shards of a merge in a partial folder, kept in its ``.progress.json``.

    Each shard entry holds its file, its bytes and, per tensor in it (in merge order), the
    JSON state the engine needs to go on without merging it again (log entry, running norms).
    The engine hands each tensor's state to :meth:`note` as it merges it; the writer calls
    :meth:`add_shard` once a shard's file is whole on disk, which rewrites the file atomically,
    so a merge killed at any moment leaves a progress that lists only whole shards.
    """

    folder: Path
    fingerprint: str
    shards: list[dict[str, Any]] = field(default_factory=list)
    _pending: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ShardProgress | None:
        """The progress recorded in ``folder``, or ``None`` if there is none (or unreadable)."""
        try:
            data = json.loads((Path(folder) / PROGRESS_FILE).read_text())
            return cls(Path(folder), data["fingerprint"], data["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def intact(self) -> bool:
        """Whether every finished shard is still there (a merge killed while naming the final
        shards has moved them)."""
        return all((self.folder / shard["file"]).is_file() for shard in self.shards)

    def finished(self) -> dict[str, Any]:
        """The state of every tensor in a finished shard, in merge order."""
        return {name: state for shard in self.shards for name, state in shard["tensors"].items()}

    def note(self, name: str, state: Any) -> None:
        """Remember the state after tensor ``name`` until the shard holding it is finished."""
        self._pending[name] = state

    def add_shard(self, file: str, nbytes: int, names: list[str]) -> None:
        """Record the whole shard ``file`` (``nbytes`` of tensors ``names``) and save."""
        tensors = {name: self._pending.pop(name) for name in names}
        self.shards.append({"file": file, "bytes": nbytes, "tensors": tensors})
        self.save()

    def save(self) -> None:
        """Write ``.progress.json`` atomically: a synced temporary file renamed into place."""
        tmp = self.folder / f"{PROGRESS_FILE}.tmp"
        with open(tmp, "w") as f:
            json.dump({"fingerprint": self.fingerprint, "shards": self.shards}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / PROGRESS_FILE)


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
