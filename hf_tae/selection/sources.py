"""Data sources: a grouping of a gradient store's training rows into candidates to select.

GradEx (Li et al., EMNLP Findings 2024) chooses *sources* of training data for one target task:
whole tasks or datasets (instruction skills, domains), or clusters of training examples grouped
by their projected gradients (its CoT setting: agglomerative clustering, cosine distance,
average linkage). :class:`Sources` holds one source id per training row of a store, in the
store's row order (an explicit index: the reference code recovered rows from file order and
batch positions, which broke under multi-process collection), with the source names and how
the grouping was made, so a selection can be saved and reproduced with it.
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
from hf_tae.utils.io import atomic_write_text

if TYPE_CHECKING:
    from hf_tae.gradients.store import GradientStore

CLUSTER_METHODS = ("agglomerative", "kmeans")
#: Rows above which agglomerative clustering (a dense N×N distance matrix) is refused.
MAX_AGGLOMERATIVE_ROWS = 20_000


@dataclass(frozen=True)
class Sources:
    """One source id per training row of a gradient store.

    Attributes:
        ids: ``int64 [num_train_rows]``, the source of each ``train`` row in the order of
            ``store.tensors("train")``; every row has a source in ``0..len(names) - 1``.
        names: one name per source.
        method: how the grouping was made (``"tasks"``, ``"column"``, ``"agglomerative"``,
            ``"kmeans"``).
        details: the settings of the method (column name, number of clusters, seed), kept
            with the selection.
    """

    ids: np.ndarray
    names: list[str]
    method: str
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TaeError(f"Sources.ids must be a 1-D integer array, got {ids.dtype} {ids.shape}.")
        if len(set(self.names)) != len(self.names):
            raise TaeError(f"Sources.names has duplicates: {self.names}; name each source once.")
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.names)):
            raise TaeError(
                f"Sources.ids holds ids {int(ids.min())}..{int(ids.max())} but there are "
                f"{len(self.names)} source names; every training row needs a source in "
                f"0..{len(self.names) - 1} (sources must cover the training rows)."
            )
        object.__setattr__(self, "ids", ids.astype(np.int64))
        object.__setattr__(self, "names", [str(n) for n in self.names])

    def __len__(self) -> int:
        return len(self.names)

    def counts(self) -> np.ndarray:
        """Training rows per source."""
        return np.bincount(self.ids, minlength=len(self.names))

    def resolve(self, sources: Sequence[int | str]) -> list[int]:
        """Source ids of names or ids; unknown ones raise naming the known sources."""
        out = []
        for s in sources:
            if isinstance(s, str) and s in self.names:
                out.append(self.names.index(s))
            elif isinstance(s, int | np.integer) and not isinstance(s, bool) and 0 <= s < len(self):
                out.append(int(s))
            else:
                raise TaeError(f"unknown source {s!r}; the sources are {self.names}.")
        return out

    def check_store(self, store: GradientStore) -> None:
        """Raise unless there is exactly one source id per training row of ``store``."""
        rows = _train_rows(store)
        if len(self.ids) != rows:
            raise TaeError(
                f"the sources assign {len(self.ids)} rows but the gradient store at {store.path} "
                f"has {rows} training rows; build the sources from this store (sources must "
                "cover its training rows, one id per row)."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "details": self.details, "names": self.names,
                "counts": self.counts().tolist(), "ids": self.ids.tolist()}  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``sources.json`` (names, method, settings, counts and the per-row ids)."""
        return atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sources:
        data = json.loads(Path(path).read_text())
        return cls(np.asarray(data["ids"], dtype=np.int64), data["names"], data["method"],
                   data.get("details", {}))  # fmt: skip


def _train_rows(store: GradientStore) -> int:
    if "train" not in store.splits:
        raise TaeError(f"the gradient store at {store.path} has no train rows to group.")
    return len(store.dataset("train"))


def sources_from_tasks(store: GradientStore) -> Sources:
    """Each task of the store is a source (the rows of task t form source t)."""
    task = store.tensors("train")["task"].numpy()
    names = store.task_names or [str(t) for t in range(int(task.max()) + 1)]
    return Sources(task, names, "tasks")


def sources_from_column(
    store: GradientStore,
    values: Sequence[Any],
    column: str = "column",
    names: Sequence[str] | None = None,
) -> Sources:
    """Sources from a column of the task set's dataset: ``values[example_id]`` for every row.

    ``values`` is indexed by the store's ``example_id`` (the row of the source dataset), e.g.
    ``task_set.dataset["domain"]``. Distinct values become sources in sorted order, unless
    ``names`` lists the values in the order wanted (integer codes of a ``ClassLabel`` column
    with its names: ``names[code]``).
    """
    values = np.asarray(values)
    if values.ndim != 1:
        raise TaeError(f"values of column {column!r} must be one value per dataset row.")
    example_id = store.tensors("train")["example_id"].numpy()
    if len(example_id) and example_id.max() >= len(values):
        raise TaeError(
            f"the store's training rows name dataset rows up to {int(example_id.max())} but "
            f"column {column!r} has {len(values)} values; pass the column of the dataset the "
            "gradients were collected on."
        )
    row_values = values[example_id]
    if names is not None and np.issubdtype(row_values.dtype, np.integer):
        ids, names = row_values, list(names)
    else:
        uniq = list(names) if names is not None else sorted(set(row_values.tolist()), key=str)
        index = {v: i for i, v in enumerate(uniq)}
        missing = sorted({v for v in row_values.tolist() if v not in index}, key=str)
        if missing:
            raise TaeError(
                f"column {column!r} has values {missing[:5]} not in names {uniq}; list every value."
            )
        ids = np.asarray([index[v] for v in row_values.tolist()], dtype=np.int64)
        names = [str(v) for v in uniq]
    return Sources(ids, names, "column", {"column": column})


def with_target_rows(sources: Sources, store: GradientStore, target: str) -> Sources:
    """``sources`` with the target task's training rows moved to a source of their own, named
    ``<target>:train`` and numbered last.

    Row sources (a column, clusters) mix the target's own rows into the candidates; as a
    source of their own they can be the base of every subset, as the target task is with task
    sources, so the estimates and the real check both train on them in every subset.
    """
    if target not in (store.task_names or []):
        raise TaeError(f"target {target!r} is not a task of the gradient store at {store.path}.")
    sources.check_store(store)
    own = store.tensors("train")["task"].numpy() == store.task_names.index(target)
    name = f"{target}:train"
    if name in sources.names:
        raise TaeError(f"a source is already named {name!r}; rename it to keep the target apart.")
    ids = np.where(own, len(sources), sources.ids)
    return Sources(ids, [*sources.names, name], sources.method,
                   {**sources.details, "target_rows": name})  # fmt: skip


def cluster_gradients(
    store: GradientStore,
    num_clusters: int,
    method: str = "agglomerative",
    seed: int = 0,
) -> Sources:
    """Sources as clusters of the training rows by their projected gradients.

    ``"agglomerative"``: average linkage on cosine distances, GradEx's grouping of CoT
    examples (scipy's hierarchy, cut into ``num_clusters``; a dense distance matrix, so at most
    :data:`MAX_AGGLOMERATIVE_ROWS` rows). ``"kmeans"``: k-means on the unit-normalized
    gradients (spherical k-means: the same cosine geometry, linear in the rows), scikit-learn's
    ``KMeans`` with 10 seeded restarts. Clusters are numbered by their first row.
    """
    grad = store.tensors("train")["grad"].numpy().astype(np.float64)
    clusters = cluster_rows(grad, num_clusters, method, seed)
    names = [f"cluster_{c}" for c in range(num_clusters)]
    return Sources(clusters, names, method, {"num_clusters": num_clusters, "seed": seed})


def cluster_rows(features: np.ndarray, num_clusters: int, method: str = "agglomerative",
                 seed: int = 0) -> np.ndarray:  # fmt: skip
    """Cluster labels ``[N]`` in ``0..num_clusters - 1`` (see :func:`cluster_gradients`)."""
    if method not in CLUSTER_METHODS:
        raise TaeError(f"method={method!r}; use one of {list(CLUSTER_METHODS)}.")
    n = len(features)
    if not (isinstance(num_clusters, int) and 1 <= num_clusters <= n):
        raise TaeError(f"num_clusters={num_clusters!r}; give an int in 1..{n} (the training rows).")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if (norms == 0).any():
        raise TaeError(
            f"{int((norms == 0).sum())} training rows have a zero gradient, which has no cosine "
            "direction; drop them from the store or group the rows another way."
        )
    unit = features / norms
    if method == "agglomerative":
        if n > MAX_AGGLOMERATIVE_ROWS:
            raise TaeError(
                f"agglomerative clustering of {n} rows needs an {n}×{n} distance matrix; use "
                f"method='kmeans' above {MAX_AGGLOMERATIVE_ROWS} rows."
            )
        from scipy.cluster.hierarchy import fcluster, linkage

        tree = linkage(unit, method="average", metric="cosine")
        labels = fcluster(tree, t=num_clusters, criterion="maxclust") - 1
    else:
        from sklearn.cluster import KMeans

        labels = KMeans(num_clusters, n_init=10, random_state=seed).fit_predict(unit)
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(np.argsort(first))  # relabel clusters by their first row
    relabel = dict(zip(np.unique(labels).tolist(), order.tolist(), strict=True))
    out = np.asarray([relabel[v] for v in labels.tolist()], dtype=np.int64)
    if out.max() + 1 != num_clusters:
        raise TaeError(
            f"the gradients split into only {out.max() + 1} distinct clusters, not {num_clusters} "
            "(duplicate rows); ask for fewer clusters."
        )
    return out
