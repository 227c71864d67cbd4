"""Image domains as tasks: one ``datasets.Dataset`` of labelled images, one task per domain.

The data contract every image loader returns (and the image pipeline builds its
:class:`~hf_tae.tasks.taskset.TaskSet` from):

* ``image`` (``datasets.Image()``), ``labels`` (``ClassLabel(names=class_names)``),
  ``task`` (``ClassLabel(names=domain_names)``), ``split`` (string ``"train"``,
  ``"validation"`` or ``"test"``), and optionally ``path`` (string: the source file, relative to
  the dataset's root, for provenance).

Every domain shares the same classes, so one class id means the same thing in every task, as in
DomainNet. :meth:`ImageDomains.from_dataset` turns any image-classification dataset with a domain
column into this layout.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.tasks.splits import SPLIT_NAMES
from hf_tae.utils.io import artifact_folder, atomic_folder, push_folder_to_hub

if TYPE_CHECKING:
    from datasets import Dataset, Features

INFO_FILE = "image_domains.json"
DATA_FOLDER = "dataset"
COLUMNS = ("image", "labels", "task", "split")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


def contract_features(
    class_names: Sequence[str], task_names: Sequence[str], with_path: bool = False
) -> Features:
    """The ``datasets.Features`` of the data contract (``path`` only when ``with_path``)."""
    from datasets import ClassLabel, Features, Image, Value

    features = {
        "image": Image(),
        "labels": ClassLabel(names=list(class_names)),
        "task": ClassLabel(names=list(task_names)),
        "split": Value("string"),
    }
    if with_path:
        features["path"] = Value("string")
    return Features(features)


def stratified_split(
    keys: np.ndarray, fractions: Sequence[float], seed: int, min_one: bool = True
) -> np.ndarray:
    """Assign every row a split index, separately for every distinct key (e.g. domain × class).

    ``fractions`` are the shares of the later splits (e.g. ``(validation, test)``); the rest is
    split 0. Rows of one key are permuted by one seeded generator (keys in sorted order) and cut
    at ``round(fraction × n)``; with ``min_one`` a key with at least ``len(fractions) + 1`` rows
    puts at least one row in every split whose fraction is positive, so small classes still
    reach validation and test.
    """
    keys = np.asarray(keys)
    rng = np.random.default_rng(seed)
    out = np.zeros(len(keys), dtype=np.int64)
    for key in np.unique(keys):
        rows = rng.permutation(np.flatnonzero(keys == key))
        n = len(rows)
        counts = [int(round(f * n)) for f in fractions]
        if min_one and n > len(fractions):
            counts = [max(c, 1) if f > 0 else c for c, f in zip(counts, fractions, strict=True)]
        start = n - sum(counts)
        if start < 0:  # rounding up left no training row: take them back from the last splits
            counts[-1] += start
            start = 0
        for code, count in enumerate(counts, start=1):
            out[rows[start : start + count]] = code
            start += count
    return out


def _check_fraction(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise TaeError(f"{name} must be in [0, 1), got {value!r}.")
    return float(value)


def _names_and_ids(values: list, feature: Any, column: str) -> tuple[list[str], np.ndarray]:
    """Names and integer ids of a label-like column (``ClassLabel``, strings or integers)."""
    if hasattr(feature, "names"):
        return [str(n) for n in feature.names], np.asarray(values, dtype=np.int64)
    if not values:
        raise TaeError(f"column {column!r} is empty; the dataset has no rows.")
    if any(v is None for v in values):
        raise TaeError(f"column {column!r} has missing values; every row needs a {column}.")
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return names, np.asarray([index[v] for v in values], dtype=np.int64)
    try:
        ints = np.asarray(values, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise TaeError(
            f"column {column!r} must hold a ClassLabel, strings or integers; got {type(values[0])}."
        ) from err
    uniques = np.unique(ints)
    return [str(v) for v in uniques], np.searchsorted(uniques, ints)


def _read_split_column(values: list, column: str) -> list[str]:
    out = []
    for value in values:
        name = _SPLIT_ALIASES.get(str(value), str(value))
        if name not in SPLIT_NAMES:
            raise TaeError(
                f"split column {column!r} holds {value!r}; use {list(SPLIT_NAMES)} "
                f"(or val/valid/dev for validation)."
            )
        out.append(name)
    return out


@dataclass
class ImageDomains:
    """Image domains as tasks: the data contract above plus names, planted groups and provenance.

    Attributes:
        dataset: the rows (columns ``image``, ``labels``, ``task``, ``split``, optional ``path``).
        task_names: one name per domain (the ``task`` ``ClassLabel`` names).
        class_names: the shared classes (the ``labels`` ``ClassLabel`` names).
        task_groups: planted group id of every domain (``None`` for real data without one).
        description: one line saying what the data is.
        skipped: source files left out because they did not decode (``on_bad_image="skip"``).
        info: provenance (source, loader arguments, seeds); saved with the data.
    """

    dataset: Dataset
    task_names: list[str]
    class_names: list[str]
    task_groups: np.ndarray | None = None
    description: str = ""
    skipped: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_names = [str(n) for n in self.task_names]
        self.class_names = [str(n) for n in self.class_names]
        missing = [c for c in COLUMNS if c not in self.dataset.column_names]
        if missing:
            raise TaeError(
                f"the dataset lacks column(s) {missing} of the image-domains contract "
                f"{list(COLUMNS)}; build it with ImageDomains.from_dataset()."
            )
        for column, names in (("task", self.task_names), ("labels", self.class_names)):
            feature_names = getattr(self.dataset.features[column], "names", None)
            if feature_names is None or list(feature_names) != names:
                raise TaeError(
                    f"column {column!r} must be a ClassLabel with names {names[:6]}…; got "
                    f"{self.dataset.features[column]}."
                )
        if self.task_groups is not None:
            self.task_groups = np.asarray(self.task_groups, dtype=np.int64)
            if self.task_groups.shape != (len(self.task_names),):
                raise TaeError(
                    f"task_groups needs one group id per domain ({len(self.task_names)}), "
                    f"got shape {self.task_groups.shape}."
                )

    # ------------------------------------------------------------------ summary
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        """Channels a model should read: ``info["num_channels"]`` if the loader set it, else 1
        when the first image is grayscale and 3 otherwise."""
        if "num_channels" in self.info:
            return int(self.info["num_channels"])
        if len(self.dataset) == 0:
            return 3
        mode = self.dataset[0]["image"].mode
        return 1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3

    def split_counts(self) -> dict[str, np.ndarray]:
        """Rows per split and domain: ``{split: int array [num_tasks]}``."""
        table = self.dataset.select_columns(["task", "split"]).to_dict()
        task = np.asarray(table["task"], dtype=np.int64)
        split = np.asarray(table["split"])
        return {
            name: np.bincount(task[split == name], minlength=self.num_tasks) for name in SPLIT_NAMES
        }

    def __repr__(self) -> str:
        counts = self.split_counts()
        shown = ", ".join(self.task_names[:6]) + (", …" if self.num_tasks > 6 else "")
        rows = " / ".join(f"{name} {int(c.sum())}" for name, c in counts.items())
        groups = "" if self.task_groups is None else f", groups {self.task_groups.tolist()}"
        skipped = f", skipped {len(self.skipped)}" if self.skipped else ""
        return (
            f"ImageDomains({self.num_tasks} domains [{shown}], {self.num_classes} classes, "
            f"rows: {rows}{groups}{skipped})"
        )

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha256 over everything that determines the data, independent of how it is stored.

        Hashes the names, planted groups, column features and every row (image *content*: the
        embedded bytes, or the bytes of the file an image row points to, so a path-based dataset
        and its saved, embedded copy agree). The description, ``info`` and row storage layout
        are not hashed.
        """
        digest = hashlib.sha256()
        meta = {
            "task_names": self.task_names,
            "class_names": self.class_names,
            "task_groups": None if self.task_groups is None else self.task_groups.tolist(),
            "features": {k: repr(v) for k, v in sorted(self.dataset.features.items())},
        }
        digest.update(json.dumps(meta, sort_keys=True).encode())
        columns = sorted(self.dataset.column_names)
        arrow = self.dataset.with_format("arrow")
        for batch in arrow.iter(batch_size=4096):
            for column in columns:
                digest.update(column.encode() + b"\0")
                values = batch.column(column).to_pylist()
                if column == "image":
                    for value in values:
                        digest.update(_image_digest(value))
                else:
                    digest.update(json.dumps(values, default=str).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``path/dataset`` (``save_to_disk``, image files embedded) and ``path/image_domains.json``.

        Written to a temporary sibling folder and renamed into place, so a crash never leaves a
        half-written folder behind; the folder is self-contained (no links to source files).
        """
        path = Path(path)
        info = {
            "task_names": self.task_names,
            "class_names": self.class_names,
            "task_groups": None if self.task_groups is None else self.task_groups.tolist(),
            "description": self.description,
            "skipped": list(self.skipped),
            "info": self.info,
            "fingerprint": self.fingerprint(),
        }
        with atomic_folder(path, overwrite) as tmp:
            self.dataset.save_to_disk(str(tmp / DATA_FOLDER))
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None) -> ImageDomains:
        """Load a folder written by :meth:`save`, or a Hub dataset repo pushed by
        :meth:`push_to_hub` (downloaded at ``revision``)."""
        from datasets import load_from_disk

        path = artifact_folder(path_or_repo_id, revision)
        info_file = path / INFO_FILE
        if not info_file.is_file() or not (path / DATA_FOLDER).is_dir():
            found = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such folder"
            raise TaeError(
                f"{path_or_repo_id} is not an ImageDomains folder: it needs {INFO_FILE} and {DATA_FOLDER}/ "
                f"as written by ImageDomains.save() (found: {found})."
            )
        info = json.loads(info_file.read_text())
        return cls(
            dataset=load_from_disk(str(path / DATA_FOLDER)),
            task_names=info["task_names"],
            class_names=info["class_names"],
            task_groups=None if info["task_groups"] is None else np.asarray(info["task_groups"]),
            description=info.get("description", ""),
            skipped=list(info.get("skipped", [])),
            info=dict(info.get("info", {})),
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload image domains with hf_tae",
    ) -> str:
        """Push the folder of :meth:`save` to a Hub dataset repo; returns the commit URL."""
        return push_folder_to_hub(
            self.save, repo_id, private=private, revision=revision, commit_message=commit_message
        )

    # ------------------------------------------------------------------ adapters
    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        domain_column: str = "domain",
        label_column: str = "label",
        image_column: str = "image",
        split_column: str | None = None,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        task_groups: Sequence[int] | None = None,
        description: str | None = None,
    ) -> ImageDomains:
        """Turn any image-classification dataset with a domain column into :class:`ImageDomains`.

        Domains become tasks (names from a ``ClassLabel`` domain column, else the sorted distinct
        values); classes keep a ``ClassLabel``'s order, else the sorted distinct values. Without
        ``split_column``, every (domain, class) is split separately (seeded) into
        validation/test at the given fractions and train for the rest. With ``split_column``
        (``train``/``validation``/``test``; ``val``/``valid``/``dev`` accepted), its splits are
        kept; if it has no validation rows and ``validation_fraction > 0``, validation is carved
        from each domain's train rows, stratified by class. A ``path`` column is kept.
        Images are not decoded.
        """
        from datasets import Image

        validation_fraction = _check_fraction("validation_fraction", validation_fraction)
        test_fraction = _check_fraction("test_fraction", test_fraction)
        if validation_fraction + test_fraction >= 1.0:
            raise TaeError(
                f"validation_fraction + test_fraction must leave rows for training, got "
                f"{validation_fraction} + {test_fraction}."
            )
        needed = [domain_column, label_column, image_column] + (
            [split_column] if split_column else []
        )
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise TaeError(
                f"the dataset has no column(s) {missing} (columns: {dataset.column_names}); pass "
                "domain_column=, label_column=, image_column= or split_column= to name them."
            )
        if len(dataset) == 0:
            raise TaeError("the dataset has no rows.")
        table = dataset.select_columns(
            [domain_column, label_column] + ([split_column] if split_column else [])
        ).to_dict()
        task_names, task = _names_and_ids(
            table[domain_column], dataset.features[domain_column], domain_column
        )
        class_names, labels = _names_and_ids(
            table[label_column], dataset.features[label_column], label_column
        )
        keys = task * len(class_names) + labels
        if split_column:
            split = np.asarray(_read_split_column(table[split_column], split_column), dtype=object)
            if validation_fraction > 0 and not np.any(split == "validation"):
                train = np.flatnonzero(split == "train")
                carved = stratified_split(keys[train], [validation_fraction], seed)
                split[train[carved == 1]] = "validation"
        else:
            codes = stratified_split(keys, [validation_fraction, test_fraction], seed)
            split = np.asarray(SPLIT_NAMES, dtype=object)[codes]

        keep = [image_column] + (["path"] if "path" in dataset.column_names else [])
        out = dataset.select_columns(keep)
        if image_column != "image":
            out = out.rename_column(image_column, "image")
        if not isinstance(out.features["image"], Image):
            try:
                out = out.cast_column("image", Image())
            except Exception as err:  # noqa: BLE001 - any cast failure means the same fix
                raise TaeError(
                    f"column {image_column!r} ({out.features['image']}) cannot be read as images; "
                    "it must hold PIL images, file paths or {'bytes', 'path'} dicts."
                ) from err
        features = contract_features(class_names, task_names, with_path="path" in keep)
        out = out.add_column("labels", labels.tolist(), feature=features["labels"])
        out = out.add_column("task", task.tolist(), feature=features["task"])
        out = out.add_column("split", split.tolist(), feature=features["split"])
        out = out.select_columns(list(features)).cast(features)
        return cls(
            dataset=out,
            task_names=task_names,
            class_names=class_names,
            task_groups=None if task_groups is None else np.asarray(task_groups),
            description=description
            or f"{len(task_names)} image domains as tasks over {len(class_names)} classes",
            info={
                "source": "from_dataset",
                "domain_column": domain_column,
                "label_column": label_column,
                "split_column": split_column,
                "validation_fraction": validation_fraction,
                "test_fraction": test_fraction,
                "seed": seed,
            },
        )


def _image_digest(value: dict | None) -> bytes:
    """sha256 of an image cell's content: its bytes, else the bytes of the file it names."""
    if value is None:
        return b"none"
    data = value.get("bytes")
    if data is None:
        path = value.get("path")
        if not path or not os.path.isfile(path):
            raise TaeError(
                f"image file {path!r} is gone; an ImageDomains fingerprint hashes image content."
            )
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.digest()
    return hashlib.sha256(data).digest()
