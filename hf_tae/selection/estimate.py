"""Estimated fine-tuning on subsets of sources, scored on one target task.

GradEx (Li et al., EMNLP Findings 2024) estimates the model fine-tuned on a subset of data
sources with the same first-order regression as Grad-TAE: fit ``w_S`` on the projected
gradients of the sources' training rows, take ``θ_S ≈ θ0 + P w_S``, and score it on the target.
:class:`SourceEstimator` reuses :class:`~hf_tae.estimation.regression.RegressionEstimator` on a
:class:`SourceView` of the gradient store, where a "task" of the fit is a source and the
target's validation and test rows form one extra task that is scored but never fitted.

Step size (notes B.2 step 4): GradEx rescales ``Δθ = P w_S`` to a fraction of ``‖θ0‖`` (CoT
0.4, Alpaca 0.02) or, in Grad-TAE's image code, to a fixed norm (2). Here that rescaling is
available in either estimator mode (``step_norm`` or ``step_fraction``), measured exactly through
the store's projector when it has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS

if TYPE_CHECKING:
    import pandas as pd

    from hf_tae.gradients.store import GradientStore
    from hf_tae.selection.sources import Sources

#: Columns of :meth:`SourceEstimator.estimate`.
COLUMNS = ("subset_id", "subset", "num_sources", "train_rows", "step_norm", *METRICS)


class SourceView:
    """A read-only view of a :class:`~hf_tae.gradients.store.GradientStore` for one target.

    Training rows keep their gradients, scores and labels, with the task id replaced by the
    row's source id (``0..K-1``); the target task's validation and test rows get task id ``K``
    (named ``target:<name>``). It offers what the estimator reads from a store
    (``tensors``, ``splits``, ``task_names``, ``dim``, ``metadata``, ``finished``, ``path``).
    """

    def __init__(self, store: GradientStore, sources: Sources, target: int | str) -> None:
        sources.check_store(store)
        names = store.task_names
        self.target = _task_id(store, target)
        self.target_name = names[self.target] if names else str(self.target)
        self.store, self.sources = store, sources
        self.path, self.dim, self.finished = store.path, store.dim, store.finished
        self.metadata = {**store.metadata, "task_names": self.task_names}
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        if not any(len(self.tensors(s)["task"]) for s in self.splits if s != "train"):
            raise TaeError(
                f"the target {self.target_name!r} has no validation or test rows in the "
                f"gradient store at {store.path}; collect them to score the target."
            )

    @property
    def task_names(self) -> list[str]:
        return [*self.sources.names, f"target:{self.target_name}"]

    @property
    def splits(self) -> list[str]:
        return self.store.splits

    def tensors(self, split: str | None = None, tasks=None) -> dict[str, torch.Tensor]:
        if split is None or tasks is not None:
            raise TaeError("a SourceView serves whole splits only: call tensors(split).")
        if split not in self._cache:
            if split == "train":
                rows = dict(self.store.tensors("train"))
                rows["task"] = torch.as_tensor(self.sources.ids)
            else:
                rows = dict(self.store.tensors(split, tasks=[self.target]))
                rows["task"] = torch.full_like(rows["task"], len(self.sources))
            self._cache[split] = rows
        return self._cache[split]


def _task_id(store: GradientStore, target: int | str) -> int:
    names = store.task_names
    if isinstance(target, str) and names and target in names:
        return names.index(target)
    if isinstance(target, int | np.integer) and not isinstance(target, bool):
        count = len(names) if names else int(store.tensors("train")["task"].max()) + 1
        if 0 <= target < count:
            return int(target)
    raise TaeError(f"target {target!r} is not a task of the gradient store; its tasks are {names}.")


def _check_step(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise TaeError(f"{name}={value!r}: give a finite step size > 0, or None for no rescaling.")
    return float(value)


class SourceEstimator:
    """Estimate the target's metric after fine-tuning on any subset of sources.

    Args:
        store: the gradient store at θ0 (training rows of every source, the target's
            validation rows).
        sources: one source per training row (:mod:`hf_tae.selection.sources`).
        target: the target task (name or id in the store).
        base: sources in every subset (e.g. the target's own training data); the candidates
            are the other sources with training rows.
        step_norm: rescale every ``Δθ = P w_S`` to this L2 norm.
        step_fraction: or to this fraction of ``theta0_norm`` (``‖θ0‖`` over the projected
            parameters).
        norm: how ``‖Δθ‖`` is measured: ``"lift"`` (exact ``‖P w‖`` through the store's
            projector; the default when the store records one) or ``"w"`` (``‖w‖``, exact
            for an orthonormal or identity projection).
        **estimator_kwargs: passed to :class:`~hf_tae.estimation.regression.RegressionEstimator`
            (``loss``, ``l2``, ``mode``, ``C``, ``label_kind``, ``device``, …).
    """

    def __init__(
        self,
        store: GradientStore,
        sources: Sources,
        target: int | str,
        base: Sequence[int | str] = (),
        *,
        step_norm: float | None = None,
        step_fraction: float | None = None,
        theta0_norm: float | None = None,
        norm: str | None = None,
        **estimator_kwargs: Any,
    ) -> None:
        from hf_tae.estimation.regression import RegressionEstimator

        self.step_norm = _check_step("step_norm", step_norm)
        self.step_fraction = _check_step("step_fraction", step_fraction)
        if self.step_norm is not None and self.step_fraction is not None:
            raise TaeError("give step_norm or step_fraction, not both.")
        if self.step_fraction is not None:
            theta0_norm = _check_step("theta0_norm", theta0_norm)
            if theta0_norm is None:
                raise TaeError(
                    "step_fraction needs theta0_norm (‖θ0‖ of the projected parameters)."
                )
        if norm is None:
            norm = "lift" if "projector" in store.metadata else "w"
        if norm not in ("lift", "w"):
            raise TaeError(f"norm={norm!r}; use 'lift' or 'w'.")
        self.theta0_norm, self.norm = theta0_norm, norm
        self.sources = sources
        self.view = SourceView(store, sources, target)
        self.target, self.target_name = self.view.target, self.view.target_name
        self.base = sorted(set(sources.resolve(base)))
        self._counts = sources.counts()
        #: Sources a selection chooses from: those with training rows, outside the base.
        self.candidates = [
            s for s in range(len(sources)) if s not in self.base and self._counts[s] > 0
        ]
        self.estimator = RegressionEstimator(self.view, **estimator_kwargs)

    @property
    def target_step(self) -> float | None:
        """The ``‖Δθ‖`` every estimate is rescaled to (None: as fitted)."""
        if self.step_fraction is not None:
            return self.step_fraction * float(self.theta0_norm)
        return self.step_norm

    def canonical(self, subsets: Sequence[Sequence[int | str]]) -> list[tuple[int, ...]]:
        """Subsets of sources (names or ids) as sorted id tuples with the base added; a subset
        whose sources hold no training rows raises."""
        out = []
        for subset in subsets:
            if isinstance(subset, str | int):
                raise TaeError(f"subsets must be a list of source lists, got the item {subset!r}.")
            ids = tuple(sorted(set(self.sources.resolve(list(subset))) | set(self.base)))
            if not ids or self._counts[list(ids)].sum() == 0:
                raise TaeError(
                    f"subset {list(subset)} (with base {self.base}) has no training rows; every "
                    "estimate needs rows to fit, so drop it or add sources with rows."
                )
            out.append(ids)
        return out

    def fit(self, subsets: Sequence[Sequence[int | str]]) -> torch.Tensor:
        """``w`` ``[len(subsets), d]``, rescaled to the step size when one is set."""
        w = self.estimator.fit(self.canonical(subsets))
        return self.rescale(w)

    def delta_norms(self, w: torch.Tensor) -> torch.Tensor:
        """``‖Δθ‖ = ‖P w‖`` per row (exact through the projector), or ``‖w‖`` with ``norm="w"``."""
        if self.norm == "w":
            return w.norm(dim=1)
        norms = [
            math.sqrt(
                sum(float((d.double() ** 2).sum()) for d in self.estimator.lift(row).values())
            )
            for row in w
        ]
        return torch.tensor(norms, dtype=w.dtype, device=w.device)

    def rescale(self, w: torch.Tensor) -> torch.Tensor:
        target = self.target_step
        if target is None:
            return w
        norms = self.delta_norms(w)
        if (norms == 0).any():
            raise TaeError(
                "a fitted Δθ is 0 and has no direction to rescale; lower l2 or drop the step size."
            )
        return w * (target / norms)[:, None]

    def score(self, subsets: Sequence[Sequence[int | str]], w: torch.Tensor,
              split: str = "validation") -> pd.DataFrame:  # fmt: skip
        """The target's metrics for each subset's ``w`` (see :data:`COLUMNS`)."""
        canon = self.canonical(subsets)
        table = self.estimator.evaluate(canon, w, split=split, targets=[len(self.sources)])
        table = table.sort_values("subset_id", ignore_index=True)
        table["num_sources"] = [len(s) for s in canon]
        table["train_rows"] = [int(self._counts[list(s)].sum()) for s in canon]
        table["step_norm"] = self.delta_norms(torch.as_tensor(w)).cpu().numpy()
        return table[list(COLUMNS)]

    def estimate(self, subsets: Sequence[Sequence[int | str]],
                 split: str = "validation") -> pd.DataFrame:  # fmt: skip
        """Fit and score every subset: one row per subset (see :data:`COLUMNS`)."""
        return self.score(subsets, self.fit(subsets), split)

    def theta0_score(self, split: str = "validation") -> dict[str, float]:
        """The target's metrics at θ0 (``w = 0``), the score of selecting nothing."""
        d = self.view.dim
        one = [self.base or self.candidates[:1]]
        table = self.estimator.evaluate(
            self.canonical(one), torch.zeros(1, d), split=split, targets=[len(self.sources)]
        )
        return {m: float(table[m].iloc[0]) for m in METRICS}


class SourceEstimatorEnsemble:
    """:class:`SourceEstimator` s of several meta-initializations, their estimates averaged.

    One θ0 is one draw: on the planted benchmarks two θ0s that differ only in floating-point
    order chose different sources (README: data selection). Averaging the estimated target
    metrics of every subset over θ0s (as Grad-TAE averages affinities over meta-initializations)
    steadies the ranking. Every member must serve the same sources, base and target over the
    same training rows. ``fit``, ``view`` and ``estimator`` are the first member's (the A.7
    check and the similarity tables look at one model).
    """

    def __init__(self, members: Sequence[SourceEstimator]) -> None:
        members = list(members)
        if not members:
            raise TaeError("an ensemble needs at least one SourceEstimator.")
        first = members[0]
        ids = first.view.store.tensors("train")["example_id"]
        for i, m in enumerate(members[1:], start=1):
            same = (m.sources.names == first.sources.names and m.base == first.base
                    and m.target_name == first.target_name
                    and torch.equal(m.view.store.tensors("train")["example_id"], ids))  # fmt: skip
            if not same:
                raise TaeError(
                    f"ensemble member {i} (store {m.view.store.path}) does not serve the same "
                    "sources, base, target and training rows as member 0 "
                    f"({first.view.store.path}); build every member from one task set."
                )
        self.members = members
        self.sources, self.base, self.candidates = first.sources, first.base, first.candidates
        self.view, self.estimator = first.view, first.estimator
        self.target, self.target_name = first.target, first.target_name

    def __len__(self) -> int:
        return len(self.members)

    def fit(self, subsets: Sequence[Sequence[int | str]]) -> torch.Tensor:
        """The first member's ``w`` (one θ0 is what a weight vector can be lifted onto)."""
        return self.members[0].fit(subsets)

    def estimate(self, subsets: Sequence[Sequence[int | str]],
                 split: str = "validation") -> pd.DataFrame:  # fmt: skip
        """Every member's :meth:`SourceEstimator.estimate`, metrics and step norms averaged."""
        tables = [m.estimate(subsets, split) for m in self.members]
        out = tables[0].copy()
        for column in (*METRICS, "step_norm"):
            out[column] = np.mean([t[column].to_numpy() for t in tables], axis=0)
        return out

    def theta0_score(self, split: str = "validation") -> dict[str, float]:
        """The target's metrics at the θ0s (``w = 0``), averaged."""
        scores = [m.theta0_score(split) for m in self.members]
        return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
