"""Text tasks: (input, target) rows of named tasks, before tokenization.

:class:`TextTasks` holds one ``datasets.Dataset`` with columns ``task`` (a ``ClassLabel`` of
the task names), ``split`` (train / validation / test), ``input`` and ``target``, plus planted
groups when the data was built with them. Three ways to make tasks, as in instruction tuning:

* :func:`tasks_from_templates`: every instruction template applied to every row of a dataset
  is one task (approximate clustering for multi-instruction tuning: instructions of one
  dataset as tasks);
* :func:`tasks_from_column`: the values of a category/skill column are the tasks;
* :func:`tasks_from_datasets`: whole datasets (or BIG-bench task files) are the tasks.

:func:`load_rows` reads any ``datasets`` source by Hub name or local path (JSON, JSON lines,
CSV, Parquet files or a saved dataset folder).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.text.templates import Template, check_unique
from hf_tae.utils.io import artifact_folder, atomic_folder, push_folder_to_hub

if TYPE_CHECKING:
    from datasets import Dataset

SPLITS = ("train", "validation", "test")
#: What :meth:`TextTasks.save` writes: the marker file and the Arrow rows.
INFO_FILE = "text_tasks.json"
ROWS_FOLDER = "rows"
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class TextTasks:
    """Named text tasks: rows ``(task, split, input, target)``.

    Args:
        dataset: columns ``task`` (ClassLabel with the task names), ``split`` (split names),
            ``input`` and ``target`` (strings).
        task_groups: planted group id of every task, or None (real data).
        description: one line for reports.
    """

    def __init__(
        self,
        dataset: Dataset,
        task_groups: Sequence[int] | None = None,
        description: str = "text tasks",
    ):
        for column in ("task", "split", "input", "target"):
            if column not in dataset.column_names:
                raise TaeError(
                    f"text task data needs a {column!r} column; it has {dataset.column_names}."
                )
        self.dataset = dataset
        self.task_names = list(dataset.features["task"].names)
        self.task_groups = None if task_groups is None else [int(g) for g in task_groups]
        if self.task_groups is not None and len(self.task_groups) != len(self.task_names):
            raise TaeError(
                f"task_groups has {len(self.task_groups)} entries for {len(self.task_names)} tasks."
            )
        self.description = description

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def __repr__(self) -> str:
        counts = np.bincount(np.asarray(list(self.dataset["task"])), minlength=self.num_tasks)
        return (
            f"TextTasks({self.description}: {self.num_tasks} tasks, {len(self.dataset)} rows, "
            f"{int(counts.min())}–{int(counts.max())} per task)"
        )

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any]],
        task_names: Sequence[str],
        task_groups: Sequence[int] | None = None,
        description: str = "text tasks",
    ) -> TextTasks:
        """Tasks from records with ``task`` (a name of ``task_names``), ``split``, ``input`` and
        ``target``; checks that every task has training rows and every target is non-empty."""
        from datasets import ClassLabel, Dataset, Features, Value

        check_unique(list(task_names), "the task list")
        index = {name: i for i, name in enumerate(task_names)}
        counts = dict.fromkeys(task_names, 0)
        for record in records:
            if not str(record["target"]).strip():
                raise TaeError(
                    f"task {record['task']!r} has an empty target for the input "
                    f"{str(record['input'])[:80]!r}; drop such rows or fix the template."
                )
            if record["split"] not in SPLITS:
                raise TaeError(f"split {record['split']!r} is not one of {list(SPLITS)}.")
            if record["split"] == "train":
                counts[record["task"]] += 1
        empty = [name for name, n in counts.items() if n == 0]
        if empty:
            raise TaeError(
                f"tasks {empty} have no training rows; drop them or give them data "
                "(a template that filters out every row, or an empty category?)."
            )
        features = Features({"task": ClassLabel(names=list(task_names)), "split": Value("string"),
                             "input": Value("string"), "target": Value("string")})  # fmt: skip
        data = {
            "task": [index[r["task"]] for r in records],
            "split": [r["split"] for r in records],
            "input": [str(r["input"]) for r in records],
            "target": [str(r["target"]) for r in records],
        }
        return cls(Dataset.from_dict(data, features=features), task_groups, description)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the rows (Arrow, ``rows/``) and the groups/description (``text_tasks.json``)
        to the folder ``path``, atomically: a failed save leaves ``path`` as it was."""
        with atomic_folder(path, overwrite) as tmp:
            self.write(tmp)
        return Path(path)

    def write(self, folder: Path) -> None:
        """The files of :meth:`save` into an existing empty ``folder`` (not atomic)."""
        self.dataset.save_to_disk(str(folder / ROWS_FOLDER))
        info = {"task_groups": self.task_groups, "description": self.description}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2))

    @classmethod
    def load(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None) -> TextTasks:
        """The tasks written by :meth:`save`, from a folder or a Hub dataset repo pushed by
        :meth:`push_to_hub` (downloaded at ``revision``)."""
        from datasets import load_from_disk

        path = artifact_folder(path_or_repo_id, revision)
        if not (path / INFO_FILE).is_file() or not (path / ROWS_FOLDER).is_dir():
            raise TaeError(
                f"{path_or_repo_id} is not a saved TextTasks folder: it needs {INFO_FILE} and "
                f"{ROWS_FOLDER}/ as written by TextTasks.save() or a run's data/."
            )
        info = json.loads((path / INFO_FILE).read_text())
        return cls(load_from_disk(str(path / ROWS_FOLDER)), info["task_groups"],
                   info["description"])  # fmt: skip

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload text tasks with hf_tae",
    ) -> str:
        """Push the folder of :meth:`save` to a Hub dataset repo; returns the commit URL."""
        return push_folder_to_hub(self.save, repo_id, private=private, revision=revision,
                                  commit_message=commit_message)  # fmt: skip

    def fingerprint(self) -> str:
        """sha256 of the rows, names and groups."""
        digest = hashlib.sha256()
        for column in ("task", "split", "input", "target"):
            digest.update(json.dumps(list(self.dataset[column])).encode())
        digest.update(json.dumps([self.task_names, self.task_groups]).encode())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------- sources
def load_rows(
    name_or_path: str, config: str | None = None, data_dir: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rows of every split of a ``datasets`` source: a Hub dataset name (``"super_glue"``, config
    ``"rte"``), a data file, a folder of data files, or a ``save_to_disk`` folder. Split names
    ``val``/``valid``/``dev`` count as ``validation``."""
    import datasets

    path = Path(name_or_path)
    if path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
    ):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise TaeError(f"{path} is not one of the readable file types {list(_FILE_BUILDERS)}.")
        loaded = datasets.load_dataset(builder, data_files={"train": str(path)})
    else:
        try:
            loaded = datasets.load_dataset(name_or_path, config, data_dir=data_dir)
        except Exception as err:
            raise TaeError(
                f"could not load the dataset {name_or_path!r} ({config=}): {err}"
            ) from err
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    aliases = {"val": "validation", "valid": "validation", "dev": "validation"}
    return {aliases.get(name, name): split.to_list() for name, split in loaded.items()}


def assign_splits(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, list[Mapping[str, Any]]]:
    """Rows per train/validation/test split. Splits the source lacks are carved out of its
    training rows with a seeded permutation; a source's ``test`` split without labels (e.g.
    SuperGLUE's, label -1) is replaced by a carved-out one."""
    if "train" not in splits:
        raise TaeError(f"the source has no 'train' split (splits: {list(splits)}).")
    train = list(splits["train"])
    out = {name: list(splits[name]) for name in ("validation", "test") if splits.get(name)}
    if "test" in out and all(row.get("label", 0) == -1 for row in out["test"]):
        del out["test"]
    missing = [name for name in ("validation", "test") if name not in out]
    if missing:
        order = np.random.default_rng(seed).permutation(len(train))
        fractions = {"validation": validation_fraction, "test": test_fraction}
        start = 0
        for name in missing:
            size = max(1, round(fractions[name] * len(train)))
            out[name] = [train[i] for i in order[start : start + size]]
            start += size
        train = [train[i] for i in order[start:]]
    out["train"] = train
    return {name: out[name] for name in SPLITS}


def _cap(rows: list, max_rows: int | None, seed: int) -> list:
    if max_rows is None or len(rows) <= max_rows:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))
    return [rows[i] for i in keep]


def tasks_from_templates(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    templates: Sequence[Template],
    max_rows_per_task: int | None = None,
    task_groups: Sequence[int] | None = None,
    seed: int = 0,
    description: str = "templates as tasks",
) -> TextTasks:
    """Every template applied to every row of every split: one task per template.

    ``max_rows_per_task`` caps the training rows of each task (validation and test rows are
    capped at a quarter of it), drawn with ``seed``.
    """
    if not templates:
        raise TaeError("no templates given; pass at least one Template.")
    splits = assign_splits(splits, seed=seed)
    records = []
    for template in templates:
        for split, rows in splits.items():
            cap = (
                max_rows_per_task
                if split == "train" or max_rows_per_task is None
                else max(1, max_rows_per_task // 4)
            )
            for row in _cap(list(rows), cap, seed):
                source, target = template.render(row)
                records.append(
                    {"task": template.name, "split": split, "input": source, "target": target}
                )
    return TextTasks.from_records(records, [t.name for t in templates], task_groups, description)


def tasks_from_column(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    column: str,
    template: Template,
    max_rows_per_task: int | None = None,
    seed: int = 0,
) -> TextTasks:
    """One task per value of ``column`` (a skill or category), each row rendered by ``template``."""
    splits = assign_splits(splits, seed=seed)
    values = sorted({str(row[column]) for rows in splits.values() for row in rows if column in row})
    if not values:
        raise TaeError(f"no row has the column {column!r}; name the category column of the data.")
    records = []
    for split, rows in splits.items():
        by_value: dict[str, list] = {}
        for row in rows:
            if column not in row:
                raise TaeError(
                    f"a {split} row lacks the category column {column!r}: {dict(row)!r}."
                )
            by_value.setdefault(str(row[column]), []).append(row)
        for value, group in by_value.items():
            cap = (
                max_rows_per_task
                if split == "train" or max_rows_per_task is None
                else max(1, max_rows_per_task // 4)
            )
            for row in _cap(group, cap, seed):
                source, target = template.render(row)
                records.append({"task": value, "split": split, "input": source, "target": target})
    return TextTasks.from_records(records, values, None, f"values of {column!r} as tasks")


def tasks_from_datasets(
    sources: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    template: Template | None = None,
    max_rows_per_task: int | None = None,
    seed: int = 0,
    description: str = "datasets as tasks",
) -> TextTasks:
    """One task per named dataset (its splits of rows); rows already holding ``input`` and
    ``target`` are used as they are unless ``template`` renders them."""
    records = []
    for name, splits in sources.items():
        for split, rows in assign_splits(splits, seed=seed).items():
            cap = (
                max_rows_per_task
                if split == "train" or max_rows_per_task is None
                else max(1, max_rows_per_task // 4)
            )
            for row in _cap(list(rows), cap, seed):
                if template is not None:
                    source, target = template.render(row)
                elif "input" in row and "target" in row:
                    source, target = row["input"], row["target"]
                else:
                    raise TaeError(
                        f"dataset {name!r} rows have no 'input'/'target' columns ({sorted(row)}); "
                        "pass a template that renders them."
                    )
                records.append({"task": name, "split": split, "input": source, "target": target})
    return TextTasks.from_records(records, list(sources), None, description)
