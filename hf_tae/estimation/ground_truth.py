"""Ground-truth subset scores by really fine-tuning a model on each task subset.

Grad-TAE estimates the fine-tuned model of every subset S from gradients (A.3); its reference
("true") affinities come from actually training on S (gradtae_methods.md A.4: the
``train_sample_tasks.py`` → ``train_node_pred_multitask.py --task_idxes S`` loop; B.1 for
2–3 seeds per subset). :class:`SubsetFineTuner` runs that loop with
:class:`~hf_tae.MultitaskTrainer` and returns a table with the columns of
:meth:`RegressionEstimator.evaluate <hf_tae.RegressionEstimator.evaluate>`, so
:meth:`AffinityMatrix.from_results <hf_tae.AffinityMatrix.from_results>` builds T from either.

The runs are long, so every finished (subset, seed) is recorded in ``results.jsonl`` before
the next starts, and a rerun on the same ``output_dir`` trains only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tae.errors import TaeError
from hf_tae.utils.io import atomic_write_text

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel

    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

RESULTS_FILE = "results.jsonl"
RUNS_DIR = "runs"
#: Columns of :meth:`SubsetFineTuner.run`: those of ``RegressionEstimator.evaluate`` plus ``seed``.
COLUMNS = ("subset_id", "subset", "task", "task_name", "num_rows", "f1", "accuracy", "log_loss")
METRICS = ("f1", "accuracy", "log_loss")


class SubsetFineTuner:
    """Fine-tune a fresh model on each task subset and score it per task (ground truth, A.4).

    Args:
        model_init: returns the model to fine-tune, called once per (subset, seed) right after
            ``transformers.set_seed(seed)``. The caller decides what "fresh" means: from
            scratch (A.4 re-initialises), or a meta-initialization θ0 with or without a head
            reset (A.4: ``--load_model_dir`` minus the final head layer).
        task_set: the tasks; subsets name its tasks by name or global id.
        args: training arguments, copied per run with ``output_dir`` under
            ``output_dir/runs/``, ``seed`` = the run seed, ``tasks=None`` (the subset is
            selected on the task set), and no evaluation, checkpoints, reporting or tqdm.
        output_dir: holds ``results.jsonl`` (one JSON line per finished (subset, seed)).
            Reuse it only with the same ``model_init``, ``task_set`` and ``args``: finished
            runs are keyed by (subset, seed, split) alone.
        seeds: one run per seed and subset (B.1 uses 2–3).
    """

    def __init__(
        self,
        model_init: Callable[[], PreTrainedModel],
        task_set: TaskSet,
        args: MultitaskTrainingArguments,
        output_dir: str | os.PathLike,
        seeds: Sequence[int] = (0,),
    ) -> None:
        if not seeds:
            raise TaeError("seeds is empty; give at least one seed, e.g. seeds=(0,).")
        self.model_init = model_init
        self.task_set = task_set
        self.args = args
        self.output_dir = Path(output_dir)
        self.seeds = [int(s) for s in seeds]

    @property
    def results_path(self) -> Path:
        return self.output_dir / RESULTS_FILE

    def canonical(self, subsets: Sequence[Sequence[int | str]]) -> list[tuple[int, ...]]:
        """Subsets as sorted tuples of global task ids (names or ids in; duplicates raise)."""
        out = []
        for subset in subsets:
            if isinstance(subset, str | int):
                raise TaeError(f"subsets must be a list of task lists, got the item {subset!r}.")
            out.append(tuple(sorted(int(t) for t in self.task_set.resolve(list(subset)))))
        return out

    def load_records(self) -> list[dict[str, Any]]:
        """The finished runs in ``results.jsonl``; a trailing partial line (a crash while some
        other writer appended) is ignored, a corrupt line elsewhere raises."""
        if not self.results_path.exists():
            return []
        lines = self.results_path.read_text().splitlines()
        records = []
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if k == len(lines) - 1:
                    break
                raise TaeError(
                    f"{self.results_path} line {k + 1} is not valid JSON ({err}); remove that "
                    "line to rerun its subset."
                ) from err
        return records

    def run(
        self,
        subsets: Sequence[Sequence[int | str]],
        split: str = "validation",
        show_progress: bool = True,
    ) -> pd.DataFrame:
        """Fine-tune on every subset for every seed (skipping finished runs) and score on ``split``.

        Returns one row per (subset, target task in the subset, seed) with the columns of
        ``RegressionEstimator.evaluate`` — ``subset_id`` (position in ``subsets``), ``subset``
        (sorted global task ids), ``task``, ``task_name``, ``num_rows`` (examples of the task in
        ``split``), ``f1``, ``accuracy``, ``log_loss`` (the trainer's per-task BCE) — plus
        ``seed``. ``AffinityMatrix.from_results`` accepts it as is (each seed then counts as a
        sample of ``m_i(S)``); :func:`average_seeds` gives one row per (subset, task) first.
        """
        import pandas as pd
        from tqdm.auto import tqdm

        canon = self.canonical(subsets)
        records = self.load_records()
        done = {(tuple(r["subset"]), r["seed"], r["split"]): r for r in records}
        todo = [
            (s, seed)
            for s in dict.fromkeys(canon)
            for seed in self.seeds
            if (s, seed, split) not in done
        ]
        for subset, seed in tqdm(todo, desc="fine-tuning subsets", disable=not show_progress):
            record = {
                "subset": list(subset),
                "seed": seed,
                "split": split,
                "rows": self._fine_tune(subset, seed, split),
            }
            records.append(record)
            done[(subset, seed, split)] = record
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
            atomic_write_text(self.results_path, text)
        shutil.rmtree(self.output_dir / RUNS_DIR, ignore_errors=True)
        rows = [
            {"subset_id": i, "subset": list(s), **row, "seed": seed}
            for i, s in enumerate(canon)
            for seed in self.seeds
            for row in done[(s, seed, split)]["rows"]
        ]
        return pd.DataFrame(rows, columns=[*COLUMNS, "seed"])

    def _fine_tune(self, subset: tuple[int, ...], seed: int, split: str) -> list[dict[str, Any]]:
        """Train ``model_init()`` on ``subset`` with ``seed``; per-task scores on ``split``."""
        from transformers import set_seed
        from transformers.trainer_callback import PrinterCallback

        from hf_tae.trainers import MultitaskTrainer

        run_name = f"{'-'.join(map(str, subset))}_seed{seed}"
        args = dataclasses.replace(
            self.args,
            output_dir=str(self.output_dir / RUNS_DIR / run_name),
            seed=seed,
            tasks=None,
            eval_strategy="no",
            save_strategy="no",
            load_best_model_at_end=False,
            report_to="none",
            disable_tqdm=True,
        )
        task_set = self.task_set.select(list(subset))
        set_seed(seed)
        model = self.model_init()
        trainer = MultitaskTrainer(model=model, args=args, task_set=task_set)
        trainer.remove_callback(PrinterCallback)  # no log lines under the progress bar
        trainer.train()
        metrics = trainer.evaluate_tasks(split)
        prefix = "eval" if split == "validation" else split
        counts = task_set.task_counts(split)
        return [
            {
                "task": t,
                "task_name": name,
                "num_rows": int(counts[name]),
                "f1": float(metrics[f"{prefix}_{name}_f1"]),
                "accuracy": float(metrics[f"{prefix}_{name}_accuracy"]),
                "log_loss": float(metrics[f"{prefix}_{name}_loss"]),
            }
            for t, name in zip(subset, task_set.task_names, strict=True)
        ]


def average_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (subset, task): the metrics of :meth:`SubsetFineTuner.run` averaged over
    seeds, with ``num_seeds`` instead of ``seed`` (B.1 averages 2–3 seeded runs)."""
    keys = ["subset_id", "task"]
    first = table.groupby(keys, sort=True)[["subset", "task_name", "num_rows"]].first()
    means = table.groupby(keys, sort=True)[list(METRICS)].mean()
    out = first.join(means).reset_index()
    out["num_seeds"] = table.groupby(keys, sort=True).size().to_numpy()
    return out[[*COLUMNS, "num_seeds"]]
