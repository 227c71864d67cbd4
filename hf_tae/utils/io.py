"""Atomic writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Yield a binary handle on a temporary sibling of ``path``; on success fsync it and rename
    it over ``path``, on any error delete it and leave ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``path`` to fill; on success it replaces
    ``path``, on any error it is deleted and ``path`` (if any) is left as it was.

    Raises :class:`~hf_tae.errors.TaeError` if ``path`` exists and ``overwrite`` is false.
    """
    from hf_tae.errors import TaeError

    path = Path(path)
    if path.exists() and not overwrite:
        raise TaeError(f"{path} already exists; pass overwrite=True or choose another folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def prepare_repo(repo_id: str, repo_type: str = "dataset", *, revision: str | None = None,
                 private: bool | None = None):  # fmt: skip
    """Create ``repo_id`` and the branch ``revision`` where missing; returns the ``HfApi``
    to upload with."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    return api


def push_folder_to_hub(
    save: Callable[[Path], Path],
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    commit_message: str,
    repo_type: str = "dataset",
) -> str:
    """Create ``repo_id`` (and the branch ``revision``) if needed and upload the folder that
    ``save(tmp_path)`` writes; returns the commit URL.

    The artifacts saved as folders (graphs, affinity matrices) publish exactly what they save.
    """
    api = prepare_repo(repo_id, repo_type, revision=revision, private=private)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save(Path(tmp) / "artifact")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type=repo_type,
            revision=revision,
            commit_message=commit_message,
        )
    return str(info)


def load_dataset_config(source: str | os.PathLike, config: str, revision: str | None = None):
    """The ``train`` split of one config of a folder or Hub dataset repo laid out as
    ``<config>/*.parquet`` (as our artifacts save themselves).

    A local folder is read by absolute file paths: ``datasets`` caches
    ``load_dataset(folder, config)`` under the folder's *name* and the files' mtimes, so two
    folders named alike and written in the same second would read each other's data.
    """
    from datasets import load_dataset

    folder = Path(source)
    if folder.is_dir():
        files = sorted(str(p.resolve()) for p in (folder / config).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{folder} has no {config}/*.parquet files")
        return load_dataset("parquet", data_files={"train": files}, split="train")
    return load_dataset(str(source), config, split="train", revision=revision)


def artifact_source(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> str:
    """The source as a string; raises unless it is an existing folder (then with no
    ``revision``) or looks like a Hub repo id ``user/name``."""
    from hf_tae.errors import TaeError

    source = str(path_or_repo_id)
    if Path(source).is_dir():
        if revision is not None:
            raise TaeError(
                f"revision={revision!r} applies to Hub repos, but {source!r} is a local folder; "
                "drop revision or pass a Hub repo id."
            )
    elif source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise TaeError(
            f"{source!r} is neither an existing folder nor a Hub repo id like 'user/name'."
        )
    return source


def artifact_folder(path_or_repo_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder with the artifact: ``path_or_repo_id`` itself when it is a folder, else
    the Hub dataset repo of that id downloaded at ``revision`` (cached)."""
    source = artifact_source(path_or_repo_id, revision)
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, repo_type="dataset", revision=revision))


def read_artifact_json(source: str, filename: str, revision: str | None = None) -> dict:
    """A JSON file of an artifact folder, or of a Hub dataset repo at ``revision``."""
    if Path(source).is_dir():
        return json.loads((Path(source) / filename).read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(
        Path(hf_hub_download(source, filename, repo_type="dataset", revision=revision)).read_text()
    )
