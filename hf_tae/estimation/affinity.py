"""Step 4: the n × n task-affinity matrix from per-subset, per-task scores.

``T[i, j]`` says how well task i does when trained together with task j. Two constructions
(Grad-TAE, Li et al. 2024):

* higher-order (``pairwise=False``): for each target task i, its metric ``m_i(S)`` over every
  subset S ∋ i (negated for losses) is z-normalized within task i,
  ``(m − mean) / (std + 1e-3)``, and ``T[i, j]`` is the mean of the normalized ``m_i(S)`` over
  the subsets S ∋ {i, j} (the reference notebook). With ``normalize=False`` the z-normalization
  is skipped: ``T[i, j] = (1/n_ij) Σ_{S ∋ i, j} m_i(S)`` on the raw metric, still negated for
  losses (the poster's formula; every entry of task i then carries task i's metric level);
* pairwise (every S a pair): ``T[i, j] = f_i({i, j})`` (negated for losses).

Entries no subset covers are NaN. ``symmetrize`` averages ``(T + Tᵀ)/2`` and
``zero_diagonal`` sets ``T[i, i] = 0``, as the reference notebook does before clustering.
Saved as a dataset folder (``affinity`` and ``subsets`` configs, ``metadata.json``, a card
with ``heatmap.png``) that loads from its path or a Hub repo id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.utils.io import (
    artifact_source,
    atomic_folder,
    load_dataset_config,
    read_artifact_json,
)

if TYPE_CHECKING:
    import pandas as pd

KINDS = ("estimated", "fine-tuned", "pairwise", "higher-order", "gradient-cosine", "fisher",
         "ntk")  # fmt: skip
#: Kinds whose entries are cosines: an identical copy of a task has affinity 1 with it.
COSINE_KINDS = ("gradient-cosine", "fisher", "ntk")
CONFIGS = ("affinity", "subsets")
METADATA_FILE = "metadata.json"
HEATMAP_FILE = "heatmap.png"
FORMAT = "hf_tae.AffinityMatrix"
#: Metric names treated as losses (lower is better) when ``higher_is_better`` is not given.
LOSS_METRICS = ("log_loss", "loss", "bce", "mse", "eval_loss")
#: Added to the standard deviation in the z-normalization (A.4).
STD_EPS = 1e-3


class AffinityMatrix:
    """An n × n task affinity with task names, kind, counts, provenance and source results.

    Build one with :meth:`from_results`; ``values[i, j]`` is the affinity of target task i
    to task j and ``counts[i, j]`` the number of subsets it averages.
    """

    def __init__(
        self,
        values: np.ndarray,
        task_names: Sequence[str],
        kind: str,
        counts: np.ndarray | None = None,
        results: pd.DataFrame | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        values = np.asarray(values, dtype=np.float64)
        n = len(task_names)
        if values.shape != (n, n):
            raise TaeError(f"values has shape {values.shape}; {n} task names need ({n}, {n}).")
        if kind not in KINDS:
            raise TaeError(f"kind={kind!r}; use one of {list(KINDS)}.")
        self.values = values
        self.task_names = [str(t) for t in task_names]
        self.kind = kind
        self.counts = (
            np.zeros((n, n), dtype=np.int64) if counts is None else np.asarray(counts, np.int64)
        )
        self.results = results
        self.provenance = dict(provenance or {})

    def __repr__(self) -> str:
        return f"AffinityMatrix(kind={self.kind!r}, tasks={len(self.task_names)})"

    def to_numpy(self) -> np.ndarray:
        """A copy of the n × n values."""
        return self.values.copy()

    # ------------------------------------------------------------------ building
    @classmethod
    def from_results(
        cls,
        results: pd.DataFrame,
        task_names: Sequence[str],
        metric: str = "f1",
        higher_is_better: bool | None = None,
        pairwise: bool = False,
        kind: str | None = None,
        symmetrize: bool = False,
        zero_diagonal: bool = False,
        provenance: Mapping[str, Any] | None = None,
        normalize: bool = True,
    ) -> AffinityMatrix:
        """Affinity from a results table with columns ``subset_id``, ``subset`` (task ids of S),
        ``task`` (target task id) and ``metric`` (e.g. :meth:`RegressionEstimator.evaluate`).

        ``higher_is_better`` defaults to False for the metrics in :data:`LOSS_METRICS`; losses
        are negated either way, so a higher ``T[i, j]`` always means task i does better with j.
        ``normalize`` (higher-order only): z-normalize each target task's metric before
        averaging (Grad-TAE's reference notebook; default) or average the raw (sign-adjusted)
        metric (the poster's formula). Pairwise matrices are always raw. ``kind`` defaults to
        ``"pairwise"`` or ``"estimated"``. ``provenance`` records ``normalized``.
        """
        n = len(task_names)
        missing = [c for c in ("subset_id", "subset", "task", metric) if c not in results]
        if missing:
            raise TaeError(
                f"results lacks columns {missing}; it needs subset_id, subset (task ids), task "
                f"and the metric {metric!r} (columns: {list(results.columns)})."
            )
        if higher_is_better is None:
            higher_is_better = metric not in LOSS_METRICS
        subsets = [tuple(int(t) for t in s) for s in results["subset"]]
        tasks = results["task"].to_numpy(dtype=np.int64)
        m = results[metric].to_numpy(dtype=np.float64) * (1.0 if higher_is_better else -1.0)
        if not np.isfinite(m).all():
            raise TaeError(f"results[{metric!r}] has NaN/inf values; drop or fix those rows.")
        bad = [(s, t) for s, t in zip(subsets, tasks, strict=True) if t not in s or max(s) >= n]
        if bad:
            raise TaeError(
                f"results rows {bad[:3]} have a target task outside its subset or ids >= {n} "
                "tasks; score only the tasks of each subset, with ids into task_names."
            )
        values = np.full((n, n), np.nan)
        counts = np.zeros((n, n), dtype=np.int64)
        if pairwise:
            for s, t, v in zip(subsets, tasks, m, strict=True):
                if len(s) != 2:
                    raise TaeError(
                        f"pairwise=True needs subsets of two tasks; got {list(s)}. Use "
                        "all_pairs() subsets, or pairwise=False for higher-order subsets."
                    )
                j = s[0] if s[1] == t else s[1]
                values[t, j] = v if counts[t, j] == 0 else values[t, j] + v
                counts[t, j] += 1
            values = np.where(counts > 0, values / np.maximum(counts, 1), np.nan)
        else:
            sums = np.zeros((n, n))
            for i in range(n):
                rows = np.flatnonzero(tasks == i)
                if len(rows) == 0:
                    continue
                z = m[rows]
                if normalize:
                    z = (z - z.mean()) / (z.std() + STD_EPS)
                for r, zr in zip(rows, z, strict=True):
                    members = list(subsets[r])
                    sums[i, members] += zr
                    counts[i, members] += 1
            values = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if symmetrize:
            values = (values + values.T) / 2
        if zero_diagonal:
            np.fill_diagonal(values, 0.0)
        info = {
            "metric": metric,
            "higher_is_better": bool(higher_is_better),
            "pairwise": pairwise,
            "normalized": bool(normalize and not pairwise),
            "symmetrized": symmetrize,
            "zero_diagonal": zero_diagonal,
            "num_subsets": int(results["subset_id"].nunique()),
            "formula": "Grad-TAE task affinity (Li et al., KDD 2024)",
            **dict(provenance or {}),
        }
        kind = kind or ("pairwise" if pairwise else "estimated")
        return cls(values, task_names, kind, counts, results.reset_index(drop=True), info)

    # ------------------------------------------------------------------ storage
    @classmethod
    def average(cls, matrices: Sequence[AffinityMatrix], kind: str | None = None) -> AffinityMatrix:
        """Entry-wise mean of matrices over the same tasks, ignoring NaN entries (pairs a member
        never covered); counts add up and the result tables are stacked with a ``member`` column.

        For ensembles: estimates from several meta-initializations or projections (as in
        Grad-TAE, whose run index selects the checkpoint and the projection) are averaged after
        each was z-scored on its own, so one θ0's offsets do not leak into another's.
        """
        import pandas as pd

        if not matrices:
            raise TaeError("average needs at least one AffinityMatrix.")
        names = list(matrices[0].task_names)
        for k, m in enumerate(matrices):
            if list(m.task_names) != names:
                raise TaeError(
                    f"matrix {k} has tasks {list(m.task_names)[:5]}…, matrix 0 {names[:5]}…; "
                    "average matrices built over the same task list."
                )
        stack = np.stack([m.values for m in matrices])
        finite = np.isfinite(stack)
        total = np.where(finite, stack, 0.0).sum(0)
        hits = finite.sum(0)
        values = np.where(hits > 0, total / np.maximum(hits, 1), np.nan)
        tables = [
            m.results.assign(member=k) for k, m in enumerate(matrices) if m.results is not None
        ]
        return cls(
            values,
            names,
            kind=kind or matrices[0].kind,
            counts=sum(m.counts for m in matrices),
            results=pd.concat(tables, ignore_index=True) if tables else None,
            provenance={**matrices[0].provenance, "members": len(matrices)},
        )

    def save(
        self,
        path: str | os.PathLike,
        overwrite: bool = False,
        group_order: Sequence[int] | None = None,
    ) -> Path:
        """Write the dataset folder (``affinity/``, ``subsets/`` parquet, ``metadata.json``,
        ``heatmap.png``, ``README.md``) via a temporary sibling folder renamed into place.

        ``group_order`` (task ids) reorders the heatmap only, e.g. by cluster.
        """
        from datasets import Dataset

        path = Path(path)
        if path.exists() and not overwrite:  # before any work
            raise TaeError(f"{path} already exists; pass overwrite=True or choose another folder.")
        n = len(self.task_names)
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        affinity = Dataset.from_dict(
            {
                "task": i.ravel(),
                "other": j.ravel(),
                "task_name": [self.task_names[k] for k in i.ravel()],
                "other_name": [self.task_names[k] for k in j.ravel()],
                "value": self.values.ravel(),
                "count": self.counts.ravel(),
            }
        )
        with atomic_folder(path, overwrite) as tmp:
            (tmp / "affinity").mkdir()
            affinity.to_parquet(str(tmp / "affinity" / "train-00000-of-00001.parquet"))
            has_subsets = self.results is not None and len(self.results) > 0
            if has_subsets:
                (tmp / "subsets").mkdir()
                Dataset.from_pandas(self.results, preserve_index=False).to_parquet(
                    str(tmp / "subsets" / "train-00000-of-00001.parquet")
                )
            meta = {
                "format": FORMAT,
                "task_names": self.task_names,
                "kind": self.kind,
                "has_subsets": has_subsets,
                "provenance": self.provenance,
            }
            (tmp / METADATA_FILE).write_text(
                json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n"
            )
            self.plot(tmp / HEATMAP_FILE, order=group_order)
            (tmp / "README.md").write_text(self._card(has_subsets))
        return path

    @classmethod
    def load(
        cls, path_or_repo_id: str | os.PathLike, revision: str | None = None
    ) -> AffinityMatrix:
        """Load a folder written by :meth:`save`, or a Hub dataset repo holding one."""
        source = artifact_source(path_or_repo_id, revision)
        try:
            meta = read_artifact_json(source, METADATA_FILE, revision)
            table = load_dataset_config(source, "affinity", revision).to_pandas()
            results = None
            if meta.get("has_subsets"):
                results = load_dataset_config(source, "subsets", revision).to_pandas()
                results["subset"] = [list(map(int, s)) for s in results["subset"]]
        except (FileNotFoundError, ValueError, OSError) as err:
            raise TaeError(
                f"could not load an affinity matrix from {source!r}: {err}. Expected the folder "
                "layout of AffinityMatrix.save() (metadata.json, configs affinity and subsets)."
            ) from err
        if meta.get("format") != FORMAT:
            raise TaeError(f"{source!r} holds {meta.get('format')!r}, not an affinity matrix.")
        n = len(meta["task_names"])
        values = np.full((n, n), np.nan)
        counts = np.zeros((n, n), dtype=np.int64)
        values[table["task"], table["other"]] = table["value"]
        counts[table["task"], table["other"]] = table["count"]
        return cls(values, meta["task_names"], meta["kind"], counts, results, meta["provenance"])

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str = "Upload task affinity matrix with hf_tae",
    ) -> str:
        """Push the folder of :meth:`save` to a Hub dataset repo; returns the commit URL."""
        from hf_tae.utils.io import push_folder_to_hub

        return push_folder_to_hub(
            self.save, repo_id, private=private, revision=revision, commit_message=commit_message
        )

    # ------------------------------------------------------------------ presentation
    def plot(self, path: str | os.PathLike, order: Sequence[int] | None = None) -> Path:
        """Heatmap PNG (matplotlib Agg), tasks in ``order`` (default: as stored), written atomically."""
        from hf_tae.utils.plots import pyplot, save_figure

        plt = pyplot()
        n = len(self.task_names)
        order = list(range(n)) if order is None else [int(k) for k in order]
        if sorted(order) != list(range(n)):
            raise TaeError(f"order must be a permutation of 0..{n - 1}, got {order}.")
        size = min(12.0, 2.5 + 0.35 * n)
        fig, ax = plt.subplots(figsize=(size + 1, size))
        image = ax.imshow(self.values[np.ix_(order, order)], cmap="viridis")
        if n <= 60:
            labels = [self.task_names[k] for k in order]
            ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(n), labels, fontsize=7)
        ax.set_xlabel("task j (trained with)")
        ax.set_ylabel("target task i")
        ax.set_title(f"{self.kind} task affinity ({self.provenance.get('metric', 'score')})")
        fig.colorbar(image, ax=ax)
        return save_figure(fig, path, dpi=100)

    def _card(self, has_subsets: bool) -> str:
        configs = "".join(
            f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train-*.parquet\n"
            for name in CONFIGS
            if name == "affinity" or has_subsets
        )
        return (
            f"---\nconfigs:\n{configs}tags:\n- hf-tae\n- task-affinity\n---\n\n"
            f"# Task affinity matrix ({self.kind})\n\n"
            f"{len(self.task_names)} tasks. `affinity`: one row per (task, other) with the value "
            "T[task, other] and the number of subsets it averages; `subsets`: the per-(subset, "
            "task) results it was computed from (Grad-TAE, Li et al., KDD 2024).\n\n"
            f"![heatmap]({HEATMAP_FILE})\n\n"
            "Load with `hf_tae.estimation.AffinityMatrix.load(path_or_repo_id)`.\n\n"
            f"Provenance:\n\n```json\n{json.dumps(self.provenance, indent=2, sort_keys=True, default=str)}\n```\n"
        )
