"""GradientStore: the on-disk artifact of step 2, projected per-example gradients at θ0.

One row per example e = (row of the source dataset, task): ``task`` (int64), ``example_id``
(int64), ``split`` ("train" / "validation" / "test"), ``label`` (float32), ``score`` (float32,
s_e(θ0)) and ``grad`` (float32[d], the projected gradient z_e), plus a JSON metadata dict saying
how the gradients were made. Layout of a store folder::

    gradient_store.json                  format, dim, finished flag, rows and files per split
    metadata.json                        the caller's metadata, verbatim (after a JSON round trip)
    shards/rank00000-000000.parquet      while collecting: one file per write_shard() call
    data/train-00000-of-00001.parquet    after finalize(): canonical rows, one HF split per split
    README.md                            after finalize(): dataset card with ``configs:``

Collection writes shards as it goes, each atomically (temp file + ``os.replace``), so a killed
run leaves only complete shards; :meth:`GradientStore.create` with the same metadata resumes it
and :meth:`~GradientStore.completed_keys` says what to skip. Every rank writes its own shard
sequence; rank 0's :meth:`~GradientStore.finalize` merges them into sorted, de-duplicated data
files and flips ``finished`` in ``gradient_store.json`` last, which is the commit point. A
finished folder loads with :meth:`GradientStore.load`, with ``datasets.load_dataset(path,
split=...)``, or from the Hub after :meth:`~GradientStore.push_to_hub`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hf_tae.errors import TaeError
from hf_tae.tasks.splits import SPLIT_NAMES
from hf_tae.utils.io import (
    artifact_source,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    prepare_repo,
)
from hf_tae.utils.progress import tqdm

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

INFO_FILE = "gradient_store.json"
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"
SHARDS_DIR = "shards"
DATA_DIR = "data"
FORMAT = "hf_tae.GradientStore"
FORMAT_VERSION = 1

#: Columns of every shard and data file, in order.
COLUMNS = ("task", "example_id", "split", "label", "score", "grad")
#: Columns :meth:`GradientStore.tensors` returns (``split`` becomes integer codes there).
TENSOR_COLUMNS = ("task", "example_id", "label", "score", "grad")
#: Bounds for finalize(): bytes of one parquet data file and of one row group (the memory it
#: holds at a time). Module-level so that tests can shrink them.
MAX_FILE_BYTES = 512 * 2**20
MAX_ROW_GROUP_BYTES = 64 * 2**20

_SHARD_NAME = re.compile(r"rank(\d{5})-(\d{6})\.parquet")
_MISSING = object()


class GradientStore:
    """Projected per-example gradients at θ0 with scores, labels and tasks, in a folder.

    Make one with :meth:`create` (new, or resume an unfinished one) and fill it with
    :meth:`write_shard` and :meth:`finalize`; open a finished one with :meth:`load` (folder or
    Hub repo id). The constructor opens an existing store folder as it is, finished or not.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        info_path = self.path / INFO_FILE
        if not info_path.is_file():
            raise TaeError(
                f"{self.path} is not a gradient store (no {INFO_FILE}); make one with "
                "GradientStore.create(path, metadata, dim)."
            )
        info = json.loads(info_path.read_text())
        if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
            raise TaeError(
                f"{info_path} describes format {info.get('format')!r} version "
                f"{info.get('format_version')!r}; this hf_tae reads {FORMAT!r} version "
                f"{FORMAT_VERSION}. Load it with the hf_tae version that wrote it "
                f"({info.get('hf_tae_version')!r}) or recollect the gradients."
            )
        self._info: dict[str, Any] = info
        self._metadata: dict[str, Any] = json.loads((self.path / METADATA_FILE).read_text())
        self._next_seq: dict[int, int] = {}
        self._datasets: dict[str, Dataset] = {}

    # ------------------------------------------------------------------ properties
    @property
    def metadata(self) -> dict[str, Any]:
        """The caller's metadata (a copy: edits do not reach the store)."""
        return copy.deepcopy(self._metadata)

    @property
    def dim(self) -> int:
        """Width d of every projected gradient."""
        return int(self._info["dim"])

    @property
    def finished(self) -> bool:
        """Whether :meth:`finalize` has completed (only finished stores can be read or pushed)."""
        return bool(self._info.get("finished"))

    @property
    def task_names(self) -> list[str] | None:
        """``metadata["task_names"]`` when the caller recorded it, else ``None``."""
        names = self._metadata.get("task_names")
        return [str(n) for n in names] if names is not None else None

    @property
    def splits(self) -> list[str]:
        """Splits with at least one row, in canonical order (finished stores only)."""
        self._require_finished("list its splits")
        return [s for s in SPLIT_NAMES if s in self._info["splits"]]  # JSON sorts keys

    def __len__(self) -> int:
        """Rows in a finished store; distinct examples written so far in an unfinished one."""
        return int(self._info["num_rows"]) if self.finished else len(self.completed_keys())

    def __repr__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        return f"GradientStore(path={str(self.path)!r}, dim={self.dim}, rows={len(self)}, {state})"

    # ------------------------------------------------------------------ creating
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        metadata: Mapping[str, Any],
        dim: int,
        overwrite: bool = False,
    ) -> GradientStore:
        """Make a new store folder at ``path``, or resume the unfinished one already there.

        Resuming requires ``metadata`` and ``dim`` equal to the stored ones (gradients made
        differently must not be mixed); otherwise a :class:`TaeError` lists the differing keys.
        A finished store at ``path`` is an error unless ``overwrite=True``, which deletes it (or
        an unfinished one) and starts over. A non-empty folder that is not a store is never
        deleted. Every rank of a distributed run may call this with the same arguments (the
        first one creates, the others resume); use ``overwrite=True`` on one process only,
        before the others call it.
        """
        metadata = _normalized_metadata(metadata, "metadata")
        if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
            raise TaeError(
                f"dim must be a positive int (the projector's output width), got {dim!r}."
            )
        dim = int(dim)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise TaeError(f"{path} is a file; choose a folder path for the gradient store.")
        if (path / INFO_FILE).is_file():
            existing = cls(path)
            if overwrite:
                shutil.rmtree(path)
            elif existing.finished:
                raise TaeError(
                    f"{path} already holds a finished gradient store; load it with "
                    "GradientStore.load(), or pass overwrite=True (or another path) to recollect."
                )
            else:
                differences = _differences(existing._metadata, metadata, only_expected=False)
                if existing.dim != dim:
                    differences.insert(0, ("dim", existing.dim, dim))
                if differences:
                    raise TaeError(
                        f"cannot resume the unfinished gradient store at {path}: it was made with "
                        f"other settings than you pass:\n{_format(differences, 'you pass')}\n"
                        "Write to another path, or pass overwrite=True to delete it and start over."
                    )
                logger.info("resuming the unfinished gradient store at %s", path)
                return existing
        elif path.is_dir() and any(path.iterdir()):
            raise TaeError(
                f"{path} exists and is not a gradient store; choose another path "
                "(hf_tae never deletes a folder it did not write, even with overwrite=True)."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (tmp / SHARDS_DIR).mkdir()
            atomic_write_text(tmp / METADATA_FILE, _dumps(metadata))
            atomic_write_text(tmp / INFO_FILE, _dumps(_new_info(dim)))
            os.replace(tmp, path)  # also replaces an empty folder; fails on a non-empty one
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if (path / INFO_FILE).is_file():  # another rank created it meanwhile
                return cls.create(path, metadata, dim)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(path)

    # ------------------------------------------------------------------ writing
    def completed_keys(self) -> set[tuple[str, int, int]]:
        """``(split, task, example_id)`` of every row written so far (to skip them on resume)."""
        columns = ["split", "task", "example_id"]
        files = self._data_files() if self.finished else self._shard_paths()
        keys: set[tuple[str, int, int]] = set()
        for file in files:
            table = pq.read_table(file, columns=columns)
            keys.update(zip(*(table[c].to_pylist() for c in columns), strict=True))
        return keys

    def write_shard(self, rows: Mapping[str, Any], rank: int = 0) -> Path | None:
        """Validate one batch of rows and write it as this rank's next shard, atomically.

        ``rows`` maps every column of :data:`COLUMNS` to a numpy array or torch tensor with one
        entry per example (``grad``: ``[n, dim]``); ``split`` may also be one string for all
        rows. The shard is ``shards/rank{rank:05d}-{seq:06d}.parquet``, ``seq`` continuing after
        this rank's existing shards. Returns its path, or ``None`` for zero rows (nothing
        written). Each rank must be written by one process only.
        """
        self._require_unfinished()
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 0:
            raise TaeError(f"rank must be a non-negative int (the process index), got {rank!r}.")
        table = _rows_to_table(rows, self.dim, self.task_names)
        if table.num_rows == 0:
            return None
        rank = int(rank)
        if rank not in self._next_seq:
            self._next_seq[rank] = self._start_rank(rank)
        path = self.path / SHARDS_DIR / f"rank{rank:05d}-{self._next_seq[rank]:06d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        self._next_seq[rank] += 1
        return path

    def finalize(self) -> GradientStore:
        """Merge all shards into the canonical data files and mark the store finished.

        Call it on rank 0 only, after every rank has written its last shard. Rows are
        de-duplicated by ``(split, task, example_id)``, keeping the first in (rank, seq, row)
        order, and sorted by split (train, validation, test), task and example_id. Shards are
        staged in one memory-mapped Arrow file, so memory stays bounded by a row group. The
        finished flag is written last: a crash before it leaves an unfinished store that
        ``create`` resumes and ``finalize`` redoes; the shards are removed after it.
        """
        if self.finished:
            shutil.rmtree(self.path / SHARDS_DIR, ignore_errors=True)
            return self
        shards = self._shard_paths()
        if not shards:
            raise TaeError(
                f"the gradient store at {self.path} has no shards to finalize; write rows with "
                "write_shard() first (on every rank) and call finalize() once they are done."
            )
        shutil.rmtree(self.path / DATA_DIR, ignore_errors=True)  # left by an interrupted finalize
        fd, staging = tempfile.mkstemp(prefix=".merge-", suffix=".arrow", dir=self.path)
        os.close(fd)
        try:
            schema = _schema(self.dim)
            with pa.OSFile(staging, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for shard in tqdm(
                    shards, desc="merging gradient shards", unit="shard", leave=False
                ):
                    writer.write_table(_read_shard(shard, schema))
            with pa.memory_map(staging) as source:
                table = pa.ipc.open_file(source).read_all()
                splits = self._write_data(table)
                del table
        finally:
            Path(staging).unlink(missing_ok=True)
        info = dict(self._info)
        info["finished"] = True
        info["num_rows"] = sum(s["num_rows"] for s in splits.values())
        info["splits"] = splits
        atomic_write_text(self.path / METADATA_FILE, _dumps(self._metadata))
        atomic_write_text(self.path / CARD_FILE, _card(self._metadata, info))
        atomic_write_text(self.path / INFO_FILE, _dumps(info))  # commit point
        self._info = info
        shutil.rmtree(self.path / SHARDS_DIR, ignore_errors=True)
        logger.info("finalized gradient store %s: %d rows", self.path, info["num_rows"])
        return self

    def _write_data(self, table: pa.Table) -> dict[str, dict[str, Any]]:
        """Write the sorted, de-duplicated rows of ``table`` as parquet files per split."""
        codes = pc.index_in(table["split"], value_set=pa.array(SPLIT_NAMES)).to_numpy()
        task = table["task"].to_numpy()
        example_id = table["example_id"].to_numpy()
        order = np.lexsort((np.arange(len(codes)), example_id, task, codes))
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = (
            (np.diff(codes[order]) != 0)
            | (np.diff(task[order]) != 0)
            | (np.diff(example_id[order]) != 0)
        )
        if not keep.all():
            logger.info("dropping %d duplicate gradient rows", int((~keep).sum()))
        order = order[keep]
        row_bytes = 4 * self.dim + 64
        rows_per_file = max(1, MAX_FILE_BYTES // row_bytes)
        rows_per_group = max(1, min(rows_per_file, MAX_ROW_GROUP_BYTES // row_bytes))
        sorted_codes = codes[order]
        splits: dict[str, dict[str, Any]] = {}
        for code, split in enumerate(SPLIT_NAMES):
            rows = order[sorted_codes == code]
            if len(rows) == 0:
                continue
            num_files = -(-len(rows) // rows_per_file)
            files = []
            for i in range(num_files):
                name = f"{DATA_DIR}/{split}-{i:05d}-of-{num_files:05d}.parquet"
                chunk = rows[i * rows_per_file : (i + 1) * rows_per_file]
                _write_parquet(self.path / name, table, chunk, rows_per_group)
                files.append(name)
            splits[split] = {"num_rows": len(rows), "files": files}
        return splits

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(
        cls,
        path_or_repo_id: str | os.PathLike,
        expected_metadata: Mapping[str, Any] | None = None,
        revision: str | None = None,
    ) -> GradientStore:
        """Open a finished store from a folder or a Hub dataset repo id (at ``revision``).

        With ``expected_metadata``, every key it gives (nested dicts key by key) must equal the
        stored value; otherwise a :class:`TaeError` lists each differing key with both values.
        Hub repos are downloaded once into the Hugging Face cache.
        """
        source = artifact_source(path_or_repo_id, revision)
        folder = Path(source) if Path(source).is_dir() else _download(source, revision)
        store = cls(folder)
        if not store.finished:
            raise TaeError(
                f"the gradient store at {folder} is unfinished; call finalize() on rank 0 once "
                "every rank has written, or resume it with GradientStore.create(path, metadata, dim)."
            )
        if expected_metadata is not None:
            expected = _normalized_metadata(expected_metadata, "expected_metadata")
            differences = _differences(store._metadata, expected, only_expected=True)
            if differences:
                raise TaeError(
                    f"the gradient store {source!r} does not match expected_metadata:\n"
                    f"{_format(differences, 'you expect')}\n"
                    "Recollect the gradients with the expected settings (another path, or "
                    "overwrite=True), or load the store that was made with them."
                )
        return store

    @classmethod
    def from_hub(
        cls,
        repo_id: str,
        expected_metadata: Mapping[str, Any] | None = None,
        revision: str | None = None,
    ) -> GradientStore:
        """Same as :meth:`load` with a Hub repo id."""
        return cls.load(repo_id, expected_metadata=expected_metadata, revision=revision)

    def dataset(self, split: str) -> Dataset:
        """The rows of one split as a memory-mapped ``datasets.Dataset`` (cached per store)."""
        self._require_finished("read it")
        if split not in SPLIT_NAMES:
            raise TaeError(f"unknown split {split!r}; use one of {list(SPLIT_NAMES)}.")
        if split not in self._info["splits"]:
            raise TaeError(
                f"the gradient store at {self.path} has no {split!r} rows; it holds {self.splits}."
            )
        if split not in self._datasets:
            from datasets import Features, List, Value, load_dataset

            features = Features(
                {
                    "task": Value("int64"),
                    "example_id": Value("int64"),
                    "split": Value("string"),
                    "label": Value("float32"),
                    "score": Value("float32"),
                    "grad": List(Value("float32"), length=self.dim),
                }
            )
            files = [str(self.path / f) for f in self._info["splits"][split]["files"]]
            self._datasets[split] = load_dataset(
                "parquet", data_files={split: files}, split=split, features=features
            )
        return self._datasets[split]

    def tensors(
        self, split: str | None = None, tasks: Sequence[int | str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Columns as tensors: ``task``, ``example_id``, ``label``, ``score``, ``grad`` ``[n, d]``.

        ``split`` selects one split (default: all, in canonical order), ``tasks`` a subset of
        task ids or names (names need ``metadata["task_names"]``). Also returns ``split`` as
        codes into ``SPLIT_NAMES`` (0 train, 1 validation, 2 test). Rows come in the store's
        sorted order; the data are read from the memory-mapped Arrow files of :meth:`dataset`.
        """
        import torch

        splits = self.splits if split is None else [split]
        task_ids = None if tasks is None else self._task_ids(tasks)
        parts: list[dict[str, torch.Tensor]] = []
        for name in splits:
            ds = self.dataset(name)
            if task_ids is not None:
                column = ds.with_format("numpy", columns=["task"])[:]["task"]
                ds = ds.select(np.flatnonzero(np.isin(column, task_ids)))
            part = ds.with_format("torch", columns=list(TENSOR_COLUMNS))[:]
            part["grad"] = part["grad"].reshape(-1, self.dim)  # [0, d] also when empty
            part["split"] = torch.full((len(ds),), SPLIT_NAMES.index(name), dtype=torch.int64)
            parts.append(part)
        return {key: torch.cat([p[key] for p in parts]) for key in (*TENSOR_COLUMNS, "split")}

    # ------------------------------------------------------------------ Hub
    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload gradient store with hf_tae",
    ) -> CommitInfo:
        """Upload the finished store to a Hub dataset repo; returns the commit.

        The result is a ``str`` (the commit URL) whose ``.oid`` is the commit sha, to pin with
        ``load(repo_id, revision=sha)``. ``revision`` is the branch to push to, created if
        missing. Data files of an earlier push that this store does not have are deleted in the
        same commit, so the repo never mixes two stores.
        """
        self._require_finished("push it to the Hub")
        api = prepare_repo(repo_id, "dataset", revision=revision, private=private)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=self.path,
            repo_type="dataset",
            revision=revision,
            commit_message=commit_message,
            allow_patterns=[INFO_FILE, METADATA_FILE, CARD_FILE, f"{DATA_DIR}/*.parquet"],
            delete_patterns=[f"{DATA_DIR}/*.parquet"],
        )

    # ------------------------------------------------------------------ helpers
    def _require_finished(self, action: str) -> None:
        if not self.finished:
            raise TaeError(
                f"the gradient store at {self.path} is unfinished; call finalize() before you "
                f"{action}."
            )

    def _require_unfinished(self) -> None:
        if self.finished:
            raise TaeError(
                f"the gradient store at {self.path} is finished and read-only; to recollect, "
                "call GradientStore.create(path, metadata, dim, overwrite=True) or use another path."
            )

    def _shard_paths(self) -> list[Path]:
        """Complete shards in (rank, seq) order; temp files of interrupted writes are ignored."""
        folder = self.path / SHARDS_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if _SHARD_NAME.fullmatch(p.name))

    def _data_files(self) -> list[Path]:
        return [self.path / f for s in self._info["splits"].values() for f in s["files"]]

    def _start_rank(self, rank: int) -> int:
        """Next shard seq of ``rank``; removes temp files its killed writes left behind."""
        folder = self.path / SHARDS_DIR
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(f".rank{rank:05d}-*"):
            stale.unlink(missing_ok=True)
        seqs = [
            int(match.group(2))
            for p in folder.iterdir()
            if (match := _SHARD_NAME.fullmatch(p.name)) and int(match.group(1)) == rank
        ]
        return max(seqs, default=-1) + 1

    def _task_ids(self, tasks: Sequence[int | str]) -> np.ndarray:
        if isinstance(tasks, str | int):
            tasks = [tasks]
        names = self.task_names
        ids = []
        for task in tasks:
            if isinstance(task, str):
                if names is None or task not in names:
                    known = names if names is not None else "none (no metadata['task_names'])"
                    raise TaeError(f"unknown task {task!r}; the store's task names are {known}.")
                ids.append(names.index(task))
            elif isinstance(task, int | np.integer) and not isinstance(task, bool):
                ids.append(int(task))
            else:
                raise TaeError(f"tasks must be task ids (int) or names (str), got {task!r}.")
        return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------- module helpers
def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("task", pa.int64()),
            ("example_id", pa.int64()),
            ("split", pa.string()),
            ("label", pa.float32()),
            ("score", pa.float32()),
            ("grad", pa.list_(pa.float32(), dim)),
        ]
    )


def _new_info(dim: int) -> dict[str, Any]:
    from hf_tae import __version__

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hf_tae_version": __version__,
        "dim": dim,
        "finished": False,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _normalized_metadata(metadata: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``metadata`` after a JSON round trip (tuples become lists), so it compares as stored."""
    if not isinstance(metadata, Mapping):
        raise TaeError(f"{name} must be a dict of JSON values, got {type(metadata).__name__}.")

    def plain(obj: Any) -> Any:  # numpy scalars / arrays and torch.Size-like objects
        if hasattr(obj, "tolist"):
            return obj.tolist()
        raise TypeError(f"{obj!r} ({type(obj).__name__}) is not JSON serializable")

    try:
        return json.loads(json.dumps(dict(metadata), default=plain, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise TaeError(
            f"{name} must be JSON-serializable: {err}. Convert dtypes, paths and other objects "
            "to str, int, float, bool, list or dict (and NaN/inf to None or a string)."
        ) from err


def _differences(
    stored: Mapping[str, Any], wanted: Mapping[str, Any], only_expected: bool, prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, stored value, wanted value)`` for every key whose values differ.

    Nested dicts are compared key by key. With ``only_expected`` only keys of ``wanted`` count
    (a partial expectation); otherwise keys missing on either side count too.
    """
    keys = set(wanted) if only_expected else set(stored) | set(wanted)
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(keys, key=str):
        a, b = stored.get(key, _MISSING), wanted.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, only_expected, f"{prefix}{key}."))
        elif a != b or (isinstance(a, bool) != isinstance(b, bool)):  # JSON: true != 1
            out.append((f"{prefix}{key}", a, b))
    return out


def _format(differences: list[tuple[str, Any, Any]], verb: str) -> str:
    """One line per difference: ``- projector.dim: store made with 200, you expect 400``."""

    def show(value: Any) -> str:
        if value is _MISSING:
            return "no such key"
        text = json.dumps(value)
        return text if len(text) <= 200 else text[:197] + "..."

    return "\n".join(
        f"  - {key}: store made with {show(a)}, {verb} {show(b)}" for key, a, b in differences
    )


def _as_numpy(value: Any) -> np.ndarray:
    """A numpy view of an array-like; torch tensors are detached, moved to CPU, and half/bf16
    widened to float32 (numpy has no bfloat16)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _rows_to_table(rows: Mapping[str, Any], dim: int, task_names: list[str] | None) -> pa.Table:
    """Check one batch of rows against the store's contract and build its Arrow table."""
    if not isinstance(rows, Mapping) or not rows:
        raise TaeError(
            f"rows is empty; write_shard needs a dict with columns {list(COLUMNS)}, one entry "
            "per example in each."
        )
    missing = [c for c in COLUMNS if c not in rows]
    unknown = sorted(str(c) for c in set(rows) - set(COLUMNS))
    if missing or unknown:
        raise TaeError(
            f"rows has columns {sorted(map(str, rows))}; missing {missing}, unknown {unknown}. "
            f"write_shard needs exactly {list(COLUMNS)}."
        )
    arrays = {c: _as_numpy(rows[c]) for c in COLUMNS if c != "split"}
    n = len(arrays["task"]) if arrays["task"].ndim else -1
    split = rows["split"]
    arrays["split"] = np.full(max(n, 0), split) if isinstance(split, str) else _as_numpy(split)
    lengths = {c: (len(a) if a.ndim else "scalar") for c, a in arrays.items()}
    if len(set(lengths.values())) != 1 or n < 0:
        raise TaeError(
            f"rows columns have different lengths {lengths}; every column needs one entry per "
            "example (grad: one row of the projected gradient per example)."
        )
    for c in ("task", "example_id", "split", "label", "score"):
        if arrays[c].ndim != 1:
            raise TaeError(f"rows[{c!r}] has shape {arrays[c].shape}; expected [{n}].")
    grad = arrays["grad"]
    if grad.ndim != 2 or grad.shape[1] != dim:
        raise TaeError(
            f"rows['grad'] has shape {grad.shape}; this store holds {dim}-dimensional gradients, "
            f"so it must be [{n}, {dim}]. Project to dim={dim} or create a store with the dim "
            "your projector has."
        )
    for c in ("task", "example_id"):
        if not np.issubdtype(arrays[c].dtype, np.integer):
            raise TaeError(f"rows[{c!r}] has dtype {arrays[c].dtype}; it must hold integers.")
        if n and arrays[c].min() < 0:
            raise TaeError(f"rows[{c!r}] has negative values; ids are row / task indices >= 0.")
    for c in ("label", "score", "grad"):
        if arrays[c].dtype.kind not in "biuf":
            raise TaeError(f"rows[{c!r}] has dtype {arrays[c].dtype}; it must be numeric.")
    if task_names is not None and n and arrays["task"].max() >= len(task_names):
        raise TaeError(
            f"rows['task'] has task id {int(arrays['task'].max())}, but the metadata names "
            f"{len(task_names)} tasks (ids 0..{len(task_names) - 1})."
        )
    bad_splits = sorted(set(arrays["split"].astype(str).tolist()) - set(SPLIT_NAMES))
    if bad_splits:
        raise TaeError(f"unknown split(s) {bad_splits} in rows['split']; use {list(SPLIT_NAMES)}.")
    grad = np.ascontiguousarray(grad, dtype=np.float32)
    label = arrays["label"].astype(np.float32)
    score = arrays["score"].astype(np.float32)
    finite = np.isfinite(grad).all(axis=1) & np.isfinite(label) & np.isfinite(score)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        where = [
            f"({arrays['split'][i]}, task {int(arrays['task'][i])}, example_id "
            f"{int(arrays['example_id'][i])})"
            for i in bad[:10]
        ]
        raise TaeError(
            f"{len(bad)} row(s) have NaN/inf in grad, score or label: {', '.join(where)}"
            f"{' ...' if len(bad) > 10 else ''}. Check the model and score at θ0 for these "
            "examples (e.g. a diverged checkpoint or a log of 0), or leave them out."
        )
    return pa.table(
        {
            "task": pa.array(arrays["task"], pa.int64()),
            "example_id": pa.array(arrays["example_id"], pa.int64()),
            "split": pa.array(arrays["split"].astype(str), pa.string()),
            "label": pa.array(label),
            "score": pa.array(score),
            "grad": pa.FixedSizeListArray.from_arrays(pa.array(grad.reshape(-1)), dim),
        },
        schema=_schema(dim),
    )


def _read_shard(path: Path, schema: pa.Schema) -> pa.Table:
    try:
        return pq.read_table(path).select(list(COLUMNS)).cast(schema)
    except (pa.ArrowException, KeyError) as err:
        raise TaeError(
            f"shard {path} does not match this store's schema {schema}: {err}. It was not "
            "written by this store's write_shard(); delete it and resume."
        ) from err


def _write_parquet(path: Path, table: pa.Table, rows: np.ndarray, rows_per_group: int) -> None:
    """Write ``table``'s ``rows`` (in that order) to ``path`` via a temp file and ``os.replace``."""
    with atomic_open(path) as handle, pq.ParquetWriter(handle, table.schema) as writer:
        for start in range(0, len(rows), rows_per_group):
            writer.write_table(table.take(rows[start : start + rows_per_group]))


def _download(repo_id: str, revision: str | None) -> Path:
    """Snapshot of a Hub dataset repo in the local HF cache; Hub errors become TaeError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError) as err:
        raise TaeError(
            f"could not download the gradient store {repo_id!r} (revision {revision!r}) from "
            f"the Hub: {err}. Check the repo id, the revision and your access to it."
        ) from err


def _card(metadata: dict[str, Any], info: dict[str, Any]) -> str:
    """Dataset card: ``configs:`` so ``load_dataset(path_or_repo, split=...)`` works, and the
    metadata that says how the gradients were made."""
    splits = [s for s in SPLIT_NAMES if s in info["splits"]]
    configs = "".join(f"  - split: {s}\n    path: {DATA_DIR}/{s}-*.parquet\n" for s in splits)
    rows = ", ".join(f"{info['splits'][s]['num_rows']} {s}" for s in splits)
    names = metadata.get("task_names")
    meta_text = json.dumps(metadata, indent=2, sort_keys=True)
    if len(meta_text) > 20_000:
        meta_text = meta_text[:20_000] + "\n... (truncated; see metadata.json)"
    return (
        f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}"
        "tags:\n- hf-tae\n- gradients\n- task-affinity\n---\n\n"
        "# Grad-TAE gradient store\n\n"
        f"Projected per-example gradients at θ0 ({info['num_rows']} rows: {rows}; "
        f"d = {info['dim']}{f', {len(names)} tasks' if names else ''}), written by hf_tae "
        f"{info['hf_tae_version']}. Columns: `task`, `example_id` (row in the source dataset), "
        "`split`, `label`, `score` (s_e(θ0)) and `grad` (float32[d]); one row per "
        "(example, task), sorted by split, task and example_id.\n\n"
        "Load with `hf_tae.gradients.store.GradientStore.load(path_or_repo_id, "
        "expected_metadata=...)`, which checks how the gradients were made, or with "
        "`datasets.load_dataset(path_or_repo_id, split='train')`.\n\n"
        f"Metadata (`metadata.json`):\n\n```json\n{meta_text}\n```\n"
    )
