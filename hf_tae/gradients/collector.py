"""Step 2 of the pipeline: projected per-example gradients at θ0, into a GradientStore.

For every (row, task) example of the chosen splits, :class:`GradientCollector` runs the model
in eval mode, takes the per-example score s_e(θ0) and its projected gradient
z_e = Pᵀ∇s_e(θ0) as Grad-TAE (Li et al., KDD 2024) does, except that its reference code
collects in train mode (dropout on), for the first 10 tasks only, unprojected, and with a
Python loop of ``autograd.grad`` per example. It appends them
to a :class:`~hf_tae.gradients.store.GradientStore` shard by shard, so an interrupted run
resumes where it stopped. Under ``accelerate launch``/``torchrun`` each process takes every
``world_size``-th pending example (no DDP wrapper is needed: nothing is all-reduced) and the
store holds each example once, identical to a one-process run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_tae.errors import TaeError
from hf_tae.gradients.capture import ProjectedGradientCapture
from hf_tae.gradients.store import INFO_FILE as STORE_INFO_FILE
from hf_tae.gradients.store import GradientStore
from hf_tae.models.scores import ScoreFunction, default_score_function
from hf_tae.tasks.batching import Collate, default_collate, example_batches
from hf_tae.tasks.splits import SPLIT_NAMES
from hf_tae.tasks.taskset import TaskSet
from hf_tae.utils.distributed import process_state
from hf_tae.utils.progress import tqdm

logger = logging.getLogger(__name__)




class GradientCollector:
    """Collect projected per-example gradients of ``score_fn`` at the model's current weights.

    Args:
        model: the meta-initialization θ0 (any ``nn.Module``; a peft model differentiates its adapters).
        score_fn: per-example scalar (default: :class:`~hf_tae.models.scores.TaskLogitScore`
            for SIGN, :class:`~hf_tae.models.scores.GoldLogOddsScore` for the vision model; other
            models must pass theirs).
        dim, seed, kind, dense_kind, factor_dim, second_stage, include, exclude: the projection,
            see :class:`~hf_tae.gradients.capture.ProjectedGradientCapture`.
        batch_size: examples per forward/backward pass.
        rows_per_shard: examples per store shard (the unit of resumption).
        on_nonfinite: ``"raise"`` (default) stops and names the examples; ``"skip"`` leaves them
            out of the store and lists them in :attr:`skipped`.
        collate_fn: ``(task_set, rows) -> model inputs``; default stacks the input columns.
        model_id, model_revision: recorded in the store metadata (default: ``config._name_or_path``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        score_fn: ScoreFunction | None = None,
        *,
        dim: int | None = 200,
        seed: int = 0,
        kind: str = "factored",
        dense_kind: str = "rademacher",
        factor_dim: int = 16,
        second_stage: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        batch_size: int = 256,
        rows_per_shard: int = 4096,
        on_nonfinite: str = "raise",
        collate_fn: Collate | None = None,
        model_id: str | None = None,
        model_revision: str | None = None,
    ):
        if on_nonfinite not in ("raise", "skip"):
            raise TaeError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        if batch_size < 1 or rows_per_shard < 1:
            raise TaeError(
                f"batch_size and rows_per_shard must be >= 1, got {batch_size} and {rows_per_shard}."
            )
        if score_fn is None:
            try:
                score_fn = default_score_function(model)
            except ValueError as err:
                raise TaeError(str(err)) from err
        self.model, self.score_fn = model, score_fn
        self.capture = ProjectedGradientCapture(
            model, dim=dim, seed=seed, kind=kind, dense_kind=dense_kind, factor_dim=factor_dim,
            second_stage=second_stage, include=include, exclude=exclude,
            on_nonfinite="return",  # the collector names the offending examples itself
        )  # fmt: skip
        self.dim = self.capture.output_dim  # = dim, or the factored width when second_stage=False
        self.batch_size, self.rows_per_shard = batch_size, rows_per_shard
        self.on_nonfinite = on_nonfinite
        self.collate_fn = collate_fn or default_collate
        config = getattr(model, "config", None)
        self.model_id = (
            model_id if model_id is not None else getattr(config, "_name_or_path", "") or ""
        )
        self.model_revision = model_revision
        self.skipped: list[dict[str, Any]] = []

    def metadata(self, task_set: TaskSet, splits: Sequence[str]) -> dict[str, Any]:
        """What the store records and checks on resume and load."""
        from hf_tae import __version__

        return {
            "model": {
                "id": self.model_id,
                "revision": self.model_revision,
                "class": type(self.model).__name__,
            },
            "projector": self.capture.metadata(),
            "score_function": self.score_fn.config(),
            "task_names": list(task_set.all_task_names),
            "tasks": [int(t) for t in task_set.task_ids],
            "splits": list(splits),
            "hf_tae_version": __version__,
        }

    def _pending(
        self, task_set: TaskSet, splits: Sequence[str], done: set
    ) -> dict[str, np.ndarray]:
        parts = {"split": [], "task": [], "example_id": [], "label": []}
        for split in splits:
            ex = task_set.examples(split)
            keep = np.fromiter(
                ((split, int(t), int(r)) not in done for t, r in zip(ex["task"], ex["example_id"], strict=True)),
                dtype=bool, count=len(ex["task"]),
            )  # fmt: skip
            parts["split"].append(np.full(int(keep.sum()), split, dtype=object))
            for key in ("task", "example_id", "label"):
                parts[key].append(ex[key][keep])
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}

    def collect(
        self,
        task_set: TaskSet,
        output_dir: str | os.PathLike,
        splits: Sequence[str] = ("train", "validation"),
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> GradientStore:
        """Collect every example of ``splits`` into the store at ``output_dir`` (resuming if unfinished)."""
        for split in splits:
            if split not in SPLIT_NAMES:
                raise TaeError(f"unknown split {split!r}; use some of {list(SPLIT_NAMES)}.")
        for split in splits:
            empty = [name for name, count in task_set.task_counts(split).items() if count == 0]
            if empty:
                raise TaeError(
                    f"task(s) {empty} have no examples in the {split!r} split; drop them from the "
                    "selection (TaskSet.select) or collect other splits."
                )
        state = process_state()
        metadata = self.metadata(task_set, splits)
        if (
            not overwrite
            and (Path(output_dir) / STORE_INFO_FILE).is_file()
            and GradientStore(output_dir).finished
        ):
            # a finished job is a no-op, if it was made the same way; else say what differs
            return GradientStore.load(output_dir, expected_metadata=metadata)
        if state.is_main_process:  # creates, resumes, or refuses a mismatched store, once
            GradientStore.create(output_dir, metadata, self.dim, overwrite=overwrite)
        state.wait_for_everyone()
        store = GradientStore(output_dir)
        pending = self._pending(task_set, splits, store.completed_keys())
        mine = {k: v[state.process_index :: state.num_processes] for k, v in pending.items()}
        self._collect_rows(
            task_set,
            store,
            mine,
            state.process_index,
            show_progress and state.is_local_main_process,
        )
        state.wait_for_everyone()
        if state.is_main_process:
            store.finalize()
        state.wait_for_everyone()
        return GradientStore.load(output_dir, expected_metadata=metadata)

    def _collect_rows(
        self,
        task_set: TaskSet,
        store: GradientStore,
        rows: Mapping[str, np.ndarray],
        rank: int,
        progress: bool,
    ) -> None:
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        buffer: dict[str, list] = {
            k: [] for k in ("split", "task", "example_id", "label", "score", "grad")
        }
        n = len(rows["task"])
        bar = tqdm(total=n, desc="gradients", unit="ex", disable=not progress, dynamic_ncols=True)
        try:
            batches = example_batches(task_set, rows, self.batch_size, self.collate_fn, device)
            for sl, inputs, meta in batches:
                example_ids, tasks = rows["example_id"][sl], rows["task"][sl]
                with self.capture:
                    outputs = self.model(**inputs)
                    scores = self.score_fn(outputs, {**inputs, **meta})
                    grads = self.capture.per_example(scores)
                grads, scores = grads.detach().float().cpu(), scores.detach().float().cpu()
                finite = torch.isfinite(grads).all(1) & torch.isfinite(scores)
                if not finite.all():
                    bad = [
                        (str(rows["split"][sl][i]), int(tasks[i]), int(example_ids[i]))
                        for i in (~finite).nonzero().flatten().tolist()
                    ]
                    if self.on_nonfinite == "raise":
                        raise TaeError(f"non-finite gradient or score for (split, task, example_id) {bad[:5]}; "
                                       "inspect those examples, or pass on_nonfinite='skip' to leave them out.")  # fmt: skip
                    self.skipped.extend({"split": s, "task": t, "example_id": e} for s, t, e in bad)
                    logger.warning(
                        "skipping %d examples with non-finite gradients: %s", len(bad), bad[:5]
                    )
                keep = finite.numpy()
                for key, values in (("split", rows["split"][sl]), ("task", tasks), ("example_id", example_ids),
                                    ("label", rows["label"][sl]), ("score", scores.numpy()), ("grad", grads.numpy())):  # fmt: skip
                    buffer[key].append(np.asarray(values)[keep])
                if sum(len(b) for b in buffer["task"]) >= self.rows_per_shard:
                    self._flush(store, buffer, rank)
                bar.update(len(tasks))
            self._flush(store, buffer, rank)
        finally:
            bar.close()
            self.model.train(was_training)

    @staticmethod
    def _flush(store: GradientStore, buffer: dict[str, list], rank: int) -> None:
        if not buffer["task"] or sum(len(b) for b in buffer["task"]) == 0:
            return
        rows = {k: np.concatenate(v) for k, v in buffer.items()}
        rows["split"] = rows["split"].astype(str)
        store.write_shard(rows, rank=rank)
        for values in buffer.values():
            values.clear()
