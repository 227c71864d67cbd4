"""One graph with many binary community tasks, stored as ``datasets`` tables.

Layout (one dataset repo or folder, three configs, parquet): ``nodes`` (``node_id``, ``x``,
``labels`` = membership row over all tasks, ``split`` = per-task split codes 0/1/2),
``edges`` (``src``, ``dst``, each undirected edge once) and ``tasks`` (``task``, ``name``,
``group``, ``size``). The same folder loads from a local path or a Hub repo id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.base import planted_groups_or_none
from hf_tae.tasks.splits import SPLIT_NAMES, check_positives_per_split
from hf_tae.utils.io import (
    artifact_source,
    atomic_folder,
    load_dataset_config,
    read_artifact_json,
)

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_tae.tasks.taskset import TaskSet

CONFIGS = ("nodes", "edges", "tasks")
INFO_FILE = "graph_info.json"


@dataclass
class CommunityGraph:
    """A graph whose tasks are "does node v belong to community c" (as in Grad-TAE).

    Attributes:
        x: node features ``[num_nodes, num_features]``.
        edge_index: undirected edges ``[2, num_edges]``, each stored once.
        labels: membership matrix ``[num_nodes, num_tasks]`` (0/1).
        split: per-(node, task) split codes ``[num_nodes, num_tasks]`` (0 train, 1 validation, 2 test).
        task_names: one name per task column.
        task_groups: planted group of each task (ids >= 0), or ``None`` when the data has no
            planted groups (real data such as SNAP). An all-negative list (the old ``-1``
            convention for "unknown") is read as ``None``; a partly negative one is an error.
        node_ids: original node identifiers (e.g. SNAP ids) of the relabelled nodes.
        info: provenance (source files or generator parameters, seeds).
    """

    x: np.ndarray
    edge_index: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    task_names: list[str]
    task_groups: list[int] | None = None
    node_ids: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, dtype=np.float32)
        self.edge_index = np.asarray(self.edge_index, dtype=np.int64).reshape(2, -1)
        self.labels = np.asarray(self.labels, dtype=np.int8)
        self.split = np.asarray(self.split, dtype=np.int8)
        self.task_names = [str(n) for n in self.task_names]
        n_nodes, n_tasks = self.labels.shape if self.labels.ndim == 2 else (-1, -1)
        if self.labels.ndim != 2 or self.split.shape != self.labels.shape:
            raise TaeError(
                f"labels {self.labels.shape} and split {self.split.shape} must both be [num_nodes, num_tasks]."
            )
        if self.x.ndim != 2 or self.x.shape[0] != n_nodes:
            raise TaeError(
                f"x has shape {self.x.shape}; expected [{n_nodes}, num_features] (one row per node)."
            )
        if len(self.task_names) != n_tasks or len(set(self.task_names)) != n_tasks:
            raise TaeError(
                f"need {n_tasks} distinct task names, got {len(set(self.task_names))} distinct."
            )
        self.task_groups = planted_groups_or_none(self.task_groups, n_tasks)
        if self.node_ids is None:
            self.node_ids = np.arange(n_nodes, dtype=np.int64)
        self.node_ids = np.asarray(self.node_ids, dtype=np.int64)
        if self.edge_index.size and (self.edge_index.min() < 0 or self.edge_index.max() >= n_nodes):
            raise TaeError(
                "edge_index refers to nodes outside 0..num_nodes-1; relabel the nodes first."
            )
        if not set(np.unique(self.split)) <= {0, 1, 2}:
            raise TaeError("split codes must be 0 (train), 1 (validation) or 2 (test).")

    @property
    def num_nodes(self) -> int:
        return self.labels.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[1]

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    def __repr__(self) -> str:
        return (
            f"CommunityGraph(name={self.info.get('name', '?')!r}, nodes={self.num_nodes}, edges={self.num_edges}, "
            f"tasks={self.num_tasks}, features={self.x.shape[1]})"
        )

    def check(self) -> None:
        """Raise if some task has no positive node in some split."""
        check_positives_per_split(self.labels, self.split, self.task_names)

    # ----------------------------------------------------------------- model views
    def hop_features(self, num_hops: int = 3) -> np.ndarray:
        """SIGN hop features ``[num_nodes, num_hops + 1, num_features]``."""
        from hf_tae.families.graph.features import sign_features

        return sign_features(self.x, self.edge_index, num_hops)

    def task_set(self, num_hops: int = 3, tasks: Sequence[str | int] | None = None) -> TaskSet:
        """The node-level multitask view: rows are nodes with ``hop_features``, ``labels``, ``split``."""
        from datasets import Array2D, Dataset, Features, List, Value

        from hf_tae.tasks.taskset import TaskSet

        self.check()
        hops = self.hop_features(num_hops)
        features = Features(
            {
                "node_id": Value("int64"),
                "hop_features": Array2D(shape=hops.shape[1:], dtype="float32"),
                "labels": List(Value("float32"), length=self.num_tasks),
                "split": List(Value("int8"), length=self.num_tasks),
            }
        )
        ds = Dataset.from_dict(
            {
                "node_id": self.node_ids,
                "hop_features": hops,
                "labels": self.labels.astype(np.float32),
                "split": self.split,
            },
            features=features,
        )
        task_set = TaskSet(ds, task_names=self.task_names, source=self)
        return task_set.select(tasks) if tasks is not None else task_set

    # ----------------------------------------------------------------- datasets
    def to_datasets(self) -> dict[str, Dataset]:
        """The three tables (``nodes``, ``edges``, ``tasks``) as ``datasets.Dataset``."""
        from datasets import Dataset, Features, List, Value

        nodes = Dataset.from_dict(
            {"node_id": self.node_ids, "x": self.x, "labels": self.labels, "split": self.split},
            features=Features(
                {
                    "node_id": Value("int64"),
                    "x": List(Value("float32"), length=self.x.shape[1]),
                    "labels": List(Value("int8"), length=self.num_tasks),
                    "split": List(Value("int8"), length=self.num_tasks),
                }
            ),
        )
        edges = Dataset.from_dict(
            {"src": self.edge_index[0], "dst": self.edge_index[1]},
            features=Features({"src": Value("int64"), "dst": Value("int64")}),
        )
        tasks = Dataset.from_dict(
            {
                "task": np.arange(self.num_tasks),
                "name": self.task_names,
                "group": self.task_groups or [None] * self.num_tasks,  # null: no planted groups
                "size": self.labels.sum(0).astype(np.int64),
            },
            features=Features(
                {
                    "task": Value("int64"),
                    "name": Value("string"),
                    "group": Value("int64"),
                    "size": Value("int64"),
                }
            ),
        )
        return {"nodes": nodes, "edges": edges, "tasks": tasks}

    @classmethod
    def from_datasets(
        cls, tables: dict[str, Dataset], info: dict[str, Any] | None = None
    ) -> CommunityGraph:
        """Rebuild from the three tables written by :meth:`to_datasets`."""
        missing = [c for c in CONFIGS if c not in tables]
        if missing:
            raise TaeError(
                f"graph tables {missing} are missing; a community graph needs {list(CONFIGS)}."
            )
        nodes = tables["nodes"].with_format("numpy")
        edges = tables["edges"].with_format("numpy")
        tasks = tables["tasks"].to_dict()
        order = np.argsort(tasks["task"], kind="stable")
        return cls(
            x=np.stack(nodes["x"]) if len(nodes) else np.zeros((0, 0)),
            edge_index=np.stack([edges["src"], edges["dst"]]),
            labels=np.stack(nodes["labels"]),
            split=np.stack(nodes["split"]),
            task_names=[tasks["name"][i] for i in order],
            task_groups=[tasks["group"][i] for i in order] if "group" in tasks else None,
            node_ids=nodes["node_id"],
            info=dict(info or {}),
        )

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the folder layout (parquet per config, ``graph_info.json``, dataset card).

        Written to a temporary sibling folder and renamed into place, so a crash never leaves
        a half-written graph behind.
        """
        path = Path(path)
        with atomic_folder(path, overwrite) as tmp:
            for name, table in self.to_datasets().items():
                (tmp / name).mkdir()
                table.to_parquet(str(tmp / name / "train-00000-of-00001.parquet"))
            (tmp / INFO_FILE).write_text(
                json.dumps(self.info, indent=2, sort_keys=True, default=str)
            )
            (tmp / "README.md").write_text(self._card())
        return path

    @classmethod
    def load(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None
    ) -> CommunityGraph:
        """Load from a folder written by :meth:`save` or from a Hub dataset repo with that layout."""
        source = artifact_source(path_or_repo_id, revision)
        try:
            tables = {name: load_dataset_config(source, name, revision) for name in CONFIGS}
        except (FileNotFoundError, ValueError) as err:
            raise TaeError(
                f"could not load a community graph from {source!r}: {err}. Expected configs {list(CONFIGS)} "
                "as written by CommunityGraph.save()."
            ) from err
        return cls.from_datasets(tables, read_artifact_json(source, INFO_FILE, revision))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload community graph with hf_tae",
    ) -> str:
        """Push the folder layout of :meth:`save` to a Hub dataset repo; returns the commit URL."""
        from hf_tae.utils.io import push_folder_to_hub

        return push_folder_to_hub(
            self.save, repo_id, private=private, revision=revision, commit_message=commit_message
        )

    def _card(self) -> str:
        configs = "\n".join(
            f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train-*.parquet"
            for name in CONFIGS
        )
        sizes = self.labels.sum(0)
        return (
            f"---\nconfigs:\n{configs}\ntags:\n- graph\n- community-detection\n- multitask\n- hf-tae\n---\n\n"
            f"# {self.info.get('name', 'community graph')}\n\n"
            f"{self.num_nodes} nodes, {self.num_edges} undirected edges, {self.num_tasks} community tasks "
            f"(sizes {int(sizes.min())}–{int(sizes.max())}), {self.x.shape[1]} node features. "
            f"Per-task splits: codes 0/1/2 = {', '.join(SPLIT_NAMES)} in the `split` column.\n\n"
            "Load with `hf_tae.CommunityGraph.load(path_or_repo_id)`, or table by table with "
            "`datasets.load_dataset(path_or_repo_id, 'nodes' | 'edges' | 'tasks', split='train')`.\n\n"
            f"Provenance:\n\n```json\n{json.dumps(self.info, indent=2, sort_keys=True, default=str)}\n```\n"
        )
