"""Ground-truth subset scores by really fine-tuning a model on each task subset.

Grad-TAE (Li et al., KDD 2024) estimates the fine-tuned model of every subset S from
gradients; its reference ("true") affinities come from actually training on S (in its code,
the ``train_sample_tasks.py`` → ``train_node_pred_multitask.py --task_idxes S`` loop; the
approximate clustering for multi-instruction tuning uses 2–3 seeds per subset).
:class:`SubsetFineTuner` runs that loop with :class:`~hf_tae.MultitaskTrainer` and returns a
table with the columns of
:meth:`RegressionEstimator.evaluate <hf_tae.RegressionEstimator.evaluate>`, so
:meth:`AffinityMatrix.from_results <hf_tae.AffinityMatrix.from_results>` builds T from either.

The runs are long, so every finished (subset, seed) is recorded in ``results.jsonl`` before
the next starts, and a rerun on the same ``output_dir`` trains only what is missing.

Under ``accelerate launch`` or ``torchrun`` the runs are independent, so they are shared out, not
data-parallelized: each process takes every ``world_size``-th pending (subset, seed) (the
pattern of :class:`~hf_tae.gradients.collector.GradientCollector`) and trains it alone. The
``Trainer`` would otherwise join the launch's process group (``TrainingArguments`` builds its
accelerate ``PartialState`` from the launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) and wrap
the model in DDP, all-reducing gradients between ranks that train different subsets. So each run
is built inside :func:`_single_process_accelerate`, which hides those variables and accelerate's
singleton state for the run, and restores both afterwards: ``parallel_mode`` is then
``NOT_PARALLEL``, there is no DDP wrapper and no sharded dataloader, and the run equals a
one-process run of the same (subset, seed). Each process appends its finished runs to
``results.rank{r}.jsonl``; after a barrier the main process merges them into ``results.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_tae.errors import TaeError
from hf_tae.estimation.schema import METRICS, RESULT_COLUMNS
from hf_tae.trainers.metrics import GENERATION_METRICS
from hf_tae.utils.distributed import process_state
from hf_tae.utils.io import atomic_folder, atomic_write_text

if TYPE_CHECKING:
    import pandas as pd
    from transformers import PreTrainedModel

    from hf_tae.tasks.taskset import TaskSet
    from hf_tae.trainers.arguments import MultitaskTrainingArguments

RESULTS_FILE = "results.jsonl"
#: What the runs in a folder were trained with; a run with other settings refuses the folder.
SETTINGS_FILE = "settings.json"
#: Arguments every run overrides, that only pick the run (see ``SubsetFineTuner._fine_tune``),
#: or that a Trainer fills in on the arguments it is given (``label_names``).
_PER_RUN_ARGUMENTS = frozenset({
    "seed", "tasks", "eval_strategy", "save_strategy", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "per_device_eval_batch_size", "eval_steps",
    "save_steps", "eval_on_start", "eval_delay", "label_names",
})  # fmt: skip
#: Per-process results under a multi-process launch (``results.rank{r}.jsonl``), merged on exit.
RANK_RESULTS_GLOB = "results.rank*.jsonl"
RUNS_DIR = "runs"
#: Models kept on request (``run(keep_models=...)``), one folder per (subset, seed).
MODELS_DIR = "models"
#: Launcher variables from which accelerate and transformers infer a distributed run.
_DISTRIBUTED_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
    "MPI_LOCALRANKID", "ACCELERATE_TORCH_DEVICE",
)  # fmt: skip
#: Columns of :meth:`SubsetFineTuner.run`: the results schema, plus ``seed``.
COLUMNS = RESULT_COLUMNS


class SubsetFineTuner:
    """Fine-tune a fresh model on each task subset and score it per task (Grad-TAE's ground truth).

    Args:
        model_init: returns the model to fine-tune, called once per (subset, seed) right after
            ``transformers.set_seed(seed)``. The caller decides what "fresh" means: from
            scratch (Grad-TAE's code re-initialises), or a meta-initialization θ0 with or
            without a head reset (Grad-TAE's ``--load_model_dir`` minus the final head layer).
        task_set: the tasks; subsets name its tasks by name or global id.
        args: training arguments, copied per run with ``output_dir`` under
            ``output_dir/runs/``, ``seed`` = the run seed, ``tasks=None`` (the subset is
            selected on the task set), and no evaluation, checkpoints, reporting or tqdm.
        output_dir: holds ``results.jsonl`` (one JSON line per finished (subset, seed)) and
            ``settings.json`` (what the runs were trained with: the arguments that change the
            weights, the task names, the trainer and ``fingerprint``). A rerun with other
            settings raises instead of mixing runs of two configurations.
        seeds: one run per seed and subset (approximate clustering for multi-instruction
            tuning uses 2–3).
        trainer_class: the Trainer of every run (default :class:`~hf_tae.MultitaskTrainer`;
            a family's ``trainer_class``, e.g. the seq2seq trainer of text tasks).
        fingerprint: what else determines the runs and is not in ``args``, e.g. the
            fingerprint of the meta-initialization that ``model_init`` copies.
        generate_splits: splits also scored by greedy generation (the text trainers'
            ``evaluate_tasks(split, generate=True)``): their rows gain ``rougeL`` and
            ``generated_exact_match`` (:data:`~hf_tae.trainers.metrics.GENERATION_METRICS`).
    """

    def __init__(
        self,
        model_init: Callable[[], PreTrainedModel],
        task_set: TaskSet,
        args: MultitaskTrainingArguments,
        output_dir: str | os.PathLike,
        seeds: Sequence[int] = (0,),
        trainer_class: type | None = None,
        fingerprint: str | None = None,
        generate_splits: Sequence[str] = (),
    ) -> None:
        if not seeds:
            raise TaeError("seeds is empty; give at least one seed, e.g. seeds=(0,).")
        if generate_splits and not trainer_generates(trainer_class):
            raise TaeError(
                f"generate_splits={list(generate_splits)} needs a trainer that generates (the "
                f"text families' seq2seq or SFT trainer); {trainer_class} does not. Drop the "
                "generation metrics for this family."
            )
        self.model_init = model_init
        self.task_set = task_set
        self.args = args
        self.output_dir = Path(output_dir)
        self.seeds = [int(s) for s in seeds]
        self.trainer_class = trainer_class
        self.fingerprint = fingerprint
        self.generate_splits = sorted(set(generate_splits))

    @property
    def settings(self) -> dict[str, Any]:
        """What determines a run besides its subset and seed (saved as ``settings.json``)."""
        from hf_tae.trainers import MultitaskTrainer
        from hf_tae.trainers.arguments import weight_settings

        trainer = self.trainer_class or MultitaskTrainer
        return {
            "training": weight_settings(self.args, ignore=_PER_RUN_ARGUMENTS),
            "task_names": list(self.task_set.all_task_names),
            "trainer": f"{trainer.__module__}.{trainer.__qualname__}",
            "fingerprint": self.fingerprint,
        } | ({"generate_splits": self.generate_splits} if self.generate_splits else {})

    def check_settings(self) -> None:
        """Refuse an ``output_dir`` whose finished runs were trained with other settings (the
        differences are named) or with unknown ones (results without ``settings.json``, from
        earlier hf_tae); stamp a new folder with this tuner's settings."""
        path = self.output_dir / SETTINGS_FILE
        ours = self.settings
        if not path.is_file() and self.load_records():
            raise TaeError(
                f"{self.output_dir} holds fine-tuning runs but no {SETTINGS_FILE} saying what "
                "they were trained with (an older hf_tae wrote them); delete that folder to "
                "train them again, or write to another output folder."
            )
        if path.is_file():
            theirs = json.loads(path.read_text())
            if theirs != ours:
                raise TaeError(
                    f"{self.output_dir} holds fine-tuning runs trained with other settings "
                    f"({_differences(theirs, ours)}); delete that folder to train them again "
                    "with the new settings, or write to another output folder."
                )
            return
        if process_state().is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(ours, indent=1, sort_keys=True))

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

    def rank_results_path(self, rank: int) -> Path:
        """Where process ``rank`` of a multi-process launch appends its finished runs."""
        return self.output_dir / f"results.rank{rank}.jsonl"

    def load_records(self) -> list[dict[str, Any]]:
        """The finished runs in ``results.jsonl`` and in any ``results.rank{r}.jsonl`` left by an
        interrupted multi-process run (the first record of a (subset, seed, split) wins).

        A trailing partial line (a crash mid-append) is ignored, a corrupt line elsewhere raises.
        """
        paths = [self.results_path, *sorted(self.output_dir.glob(RANK_RESULTS_GLOB))]
        records, seen = [], set()
        for path in paths:
            for record in _read_jsonl(path):
                key = (tuple(record["subset"]), record["seed"], record["split"])
                if key not in seen:
                    seen.add(key)
                    records.append(record)
        return records

    def run(
        self,
        subsets: Sequence[Sequence[int | str]],
        split: str = "validation",
        show_progress: bool = True,
        extra_splits: Sequence[str] = (),
        keep_models: Sequence[Sequence[int | str]] = (),
    ) -> pd.DataFrame:
        """Fine-tune on every subset for every seed (skipping finished runs) and score on ``split``.

        ``extra_splits``: every run this call trains is also scored on these splits and recorded,
        so a later ``run(..., split=<one of them>)`` finds it done without training again.
        ``keep_models``: subsets (among ``subsets``) whose model of the first seed is saved to
        :meth:`model_path` (e.g. to merge the group models); a finished run whose model is
        missing is trained again to save it (its recorded scores are kept).

        Returns one row per (subset, target task in the subset, seed) with the columns of
        ``RegressionEstimator.evaluate`` — ``subset_id`` (position in ``subsets``), ``subset``
        (sorted global task ids), ``task``, ``task_name``, ``num_rows`` (examples of the task in
        ``split``), ``f1``, ``accuracy``, ``log_loss`` (the trainer's per-task metrics, :mod:`hf_tae.estimation.schema`) — plus
        ``seed`` (and ``rougeL``, ``generated_exact_match`` where ``split`` is one of the
        ``generate_splits``). ``AffinityMatrix.from_results`` accepts it as is (each seed then counts as a
        sample of ``m_i(S)``); :func:`average_seeds` gives one row per (subset, task) first.

        Under ``torchrun``/``accelerate launch`` every process calls ``run`` with the same
        arguments; each trains every ``world_size``-th pending run alone (no DDP, see the module
        docstring), and all return the full table once the main process has merged the
        per-rank results. Each record in ``results.jsonl`` names the ``rank`` that trained it.
        """
        import pandas as pd

        from hf_tae.utils.progress import tqdm

        state = process_state()
        # read now: every TrainingArguments resets accelerate's singleton state in place
        world, rank, local_rank = (
            state.num_processes,
            state.process_index,
            state.local_process_index,
        )
        is_local_main = state.is_local_main_process
        canon = self.canonical(subsets)
        self.check_settings()
        records = self.load_records()
        done = {(tuple(r["subset"]), r["seed"], r["split"]): r for r in records}
        keep = {(s, self.seeds[0]) for s in self.canonical(keep_models)}
        missing = set(self.pending(subsets, split, records))
        todo = [
            (s, seed)
            for s in dict.fromkeys(canon)
            for seed in self.seeds
            if (s, seed) in missing or ((s, seed) in keep and not self.model_path(s, seed).is_dir())
        ]
        if world > 1:  # every process must see the same pending list before any appends
            state.wait_for_everyone()
        mine = todo[rank::world]  # round-robin share of this process, as GradientCollector
        bar = tqdm(mine, desc="fine-tuning subsets", disable=not (show_progress and is_local_main))
        splits = list(dict.fromkeys([split, *extra_splits]))
        for subset, seed in bar:
            scored = [sp for sp in splits if (subset, seed, sp) not in done]
            if world > 1:
                with _single_process_accelerate(local_rank):
                    by_split = self._fine_tune(subset, seed, scored, local_rank=local_rank,
                                               save=(subset, seed) in keep)  # fmt: skip
            else:
                by_split = self._fine_tune(subset, seed, scored, save=(subset, seed) in keep)
            new = [{"subset": list(subset), "seed": seed, "split": sp, "rank": rank,
                    "rows": by_split[sp]} for sp in scored]  # fmt: skip
            for record in new:
                done[(subset, seed, record["split"])] = record
            if world > 1:
                _append_line(self.rank_results_path(rank),
                             "\n".join(json.dumps(r, sort_keys=True) for r in new))  # fmt: skip
            else:
                records.extend(new)
                text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
                atomic_write_text(self.results_path, text)
        self._merge_ranks(distributed=world > 1)
        if world > 1:
            done = {(tuple(r["subset"]), r["seed"], r["split"]): r for r in self.load_records()}
        rows = [
            {"subset_id": i, "subset": list(s), **row, "seed": seed}
            for i, s in enumerate(canon)
            for seed in self.seeds
            for row in done[(s, seed, split)]["rows"]
        ]
        generated = [m for m in GENERATION_METRICS if rows and all(m in r for r in rows)]
        return pd.DataFrame(rows, columns=[*COLUMNS, *generated, "seed"])

    def pending(self, subsets: Sequence[Sequence[int | str]], split: str = "validation",
                records: Sequence[dict[str, Any]] | None = None) -> list[tuple[tuple[int, ...], int]]:  # fmt: skip
        """The (subset, seed) runs of ``subsets`` with no finished record on ``split`` (what
        :meth:`run` would train), in order; ``records``: :meth:`load_records`, if read already."""
        records = self.load_records() if records is None else records
        done = {(tuple(r["subset"]), r["seed"]) for r in records if r["split"] == split}
        return [(s, seed) for s in dict.fromkeys(self.canonical(subsets)) for seed in self.seeds
                if (s, seed) not in done]  # fmt: skip

    def _merge_ranks(self, distributed: bool) -> None:
        """Fold any ``results.rank{r}.jsonl`` into ``results.jsonl`` (atomically, then delete
        them) and remove the run folders. ``distributed``: after every process finished its
        share, the main process merges while the others wait."""
        state = None
        if distributed:
            from accelerate import PartialState

            state = PartialState()  # the launch's state, restored by _single_process_accelerate
            state.wait_for_everyone()
        if state is None or state.is_main_process:
            rank_files = list(self.output_dir.glob(RANK_RESULTS_GLOB))
            if rank_files:
                records = self.load_records()
                text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
                atomic_write_text(self.results_path, text)
                for path in rank_files:
                    path.unlink()
            shutil.rmtree(self.output_dir / RUNS_DIR, ignore_errors=True)
        if state is not None:
            state.wait_for_everyone()

    def model_path(self, subset: Sequence[int], seed: int) -> Path:
        """Where ``run(keep_models=...)`` saves the model of ``subset`` (global ids) and ``seed``."""
        return self.output_dir / MODELS_DIR / f"{'-'.join(map(str, subset))}_seed{seed}"

    def _fine_tune(
        self,
        subset: tuple[int, ...],
        seed: int,
        splits: Sequence[str],
        local_rank: int | None = None,
        save: bool = False,
    ) -> dict[str, list[dict[str, Any]]]:
        """Train ``model_init()`` on ``subset`` with ``seed``; per-task scores on each split.

        ``local_rank`` (multi-process launches only) picks this process's GPU for the run;
        ``save`` keeps the trained model in :meth:`model_path` (written atomically).
        """
        import torch
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
        if local_rank is not None and not args.use_cpu and torch.cuda.is_available():
            # without a distributed launch the Trainer always picks cuda:0; put each process's
            # runs on its own GPU (TrainingArguments.device is a functools.cached_property)
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            _ = args.device  # sets up the (single-process) accelerate state first
            args.__dict__["_setup_devices"] = device
            torch.cuda.set_device(device)
        task_set = self.task_set.select(list(subset))
        set_seed(seed)
        model = self.model_init()
        trainer = (self.trainer_class or MultitaskTrainer)(
            model=model, args=args, task_set=task_set
        )
        if trainer.accelerator.num_processes != 1 or trainer.args.world_size != 1:
            raise TaeError(
                f"the Trainer of subset {list(subset)} joined a {trainer.args.world_size}-process "
                "group, but each (subset, seed) run must train alone; run the fine-tuning in one "
                "process (python script.py) if this accelerate/transformers version defeats "
                "SubsetFineTuner.run's isolation."
            )
        trainer.remove_callback(PrinterCallback)  # no log lines under the progress bar
        trainer.train()
        if save:
            with atomic_folder(self.model_path(subset, seed), overwrite=True) as folder:
                trainer.save_model(str(folder))
        out = {}
        for split in splits:
            generate = split in self.generate_splits
            metrics = (trainer.evaluate_tasks(split, generate=True) if generate
                       else trainer.evaluate_tasks(split))  # fmt: skip
            prefix = "eval" if split == "validation" else split
            counts = task_set.task_counts(split)
            names = (*METRICS, *GENERATION_METRICS) if generate else METRICS
            out[split] = [
                {
                    "task": t,
                    "task_name": name,
                    "num_rows": int(counts[name]),
                    **{m: float(metrics[f"{prefix}_{name}_{m}"]) for m in names},
                }
                for t, name in zip(subset, task_set.task_names, strict=True)
            ]
        return out


def trainer_generates(trainer_class: type | None) -> bool:
    """Whether ``trainer_class.evaluate_tasks`` can score greedily generated targets (the text
    trainers' ``generate=True``); None is :class:`~hf_tae.MultitaskTrainer`, which cannot."""
    import inspect

    if trainer_class is None:
        return False
    return "generate" in inspect.signature(trainer_class.evaluate_tasks).parameters


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """``key: old -> new`` for every setting that differs (nested keys dotted), at most 6."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _differences(a, b, f"{prefix}{key}.")
            changes.extend([inner] if inner else [])
        elif a != b:
            shown = [str(v) if len(str(v)) <= 40 else f"{str(v)[:37]}..." for v in (a, b)]
            changes.append(f"{prefix}{key}: {shown[0]} -> {shown[1]}")
    return "; ".join(changes[:6]) + ("; ..." if len(changes) > 6 else "")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON lines of ``path`` (none if missing); a trailing partial line is ignored."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
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
                f"{path} line {k + 1} is not valid JSON ({err}); remove that line to rerun its "
                "subset."
            ) from err
    return records


def _append_line(path: Path, line: str) -> None:
    """Append one JSON line durably (a single ``write`` of the whole line, then fsync).

    A crash can leave at most a partial last line, which :func:`_read_jsonl` ignores; if an
    earlier crash left one, a newline is written first so the new record stays parseable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            prefix = "" if handle.read(1) == b"\n" else "\n"
    with path.open("a", encoding="utf-8") as handle:
        handle.write(prefix + line + "\n")
        handle.flush()
        os.fsync(handle.fileno())



@contextlib.contextmanager
def _single_process_accelerate(local_rank: int) -> Iterator[None]:
    """Make a ``Trainer`` built inside run in this process alone, then restore the launch.

    ``TrainingArguments`` resets accelerate's singleton states and rebuilds them from the
    launcher's environment, so under ``torchrun``/``accelerate launch`` every Trainer would be
    a DDP member. Here the launcher variables (and ``ACCELERATE_TORCH_DEVICE``) are hidden and
    the ``PartialState``/``AcceleratorState``/``GradientState`` singletons emptied, so the
    Trainer's accelerate state comes up as ``DistributedType.NO`` (one process, no DDP, no
    dataloader sharding); on exit the environment and the launch's states are put back in
    place, so ``PartialState().wait_for_everyone()`` reaches the launch's process group again.
    ``local_rank`` sets ``ACCELERATE_TORCH_DEVICE`` to this process's GPU when there is one.
    """
    import torch
    from accelerate.state import AcceleratorState, GradientState, PartialState

    shared = [cls._shared_state for cls in (PartialState, AcceleratorState, GradientState)]
    snapshots = [dict(d) for d in shared]
    env = {k: os.environ[k] for k in _DISTRIBUTED_ENV if k in os.environ}
    # TrainingArguments warns that the (launch's) process group is initialized but unused:
    # intended here, so silence that logger for the run
    args_logger = logging.getLogger("transformers.training_args")
    level = args_logger.level
    args_logger.setLevel(logging.ERROR)
    try:
        for key in env:
            del os.environ[key]
        use_cpu = env.get("ACCELERATE_USE_CPU", os.environ.get("ACCELERATE_USE_CPU", ""))
        if torch.cuda.is_available() and use_cpu.lower() not in ("1", "true", "yes"):
            os.environ["ACCELERATE_TORCH_DEVICE"] = f"cuda:{local_rank % torch.cuda.device_count()}"
        for d in shared:
            d.clear()
        yield
    finally:
        for d, snapshot in zip(shared, snapshots, strict=True):
            d.clear()
            d.update(snapshot)
        for key in _DISTRIBUTED_ENV:
            os.environ.pop(key, None)
        os.environ.update(env)
        args_logger.setLevel(level)


def average_seeds(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (subset, task): the metrics of :meth:`SubsetFineTuner.run` averaged over
    seeds, with ``num_seeds`` instead of ``seed`` (approximate clustering for multi-instruction
    tuning averages 2–3 seeded runs)."""
    keys = ["subset_id", "task"]
    first = table.groupby(keys, sort=True)[["subset", "task_name", "num_rows"]].first()
    means = table.groupby(keys, sort=True)[list(METRICS)].mean()
    out = first.join(means).reset_index()
    out["num_seeds"] = table.groupby(keys, sort=True).size().to_numpy()
    return out[[*COLUMNS, "num_seeds"]]


def read_runs(folders: Sequence[str | os.PathLike], split: str = "validation") -> pd.DataFrame:
    """The finished runs of one or more :class:`SubsetFineTuner` folders as the table
    :meth:`SubsetFineTuner.run` returns (``subset_id`` numbers the subsets in order of first
    appearance), without a model or training: to compare finished truths afterwards, e.g. the
    job's ``ground_truth/`` and ``ground_truth_members/member_*/``. Raises when no folder
    holds a run on ``split``."""
    import pandas as pd

    records = [r for folder in folders for r in _read_jsonl(Path(folder) / RESULTS_FILE)
               if r["split"] == split]  # fmt: skip
    if not records:
        raise TaeError(f"no finished {split!r} runs in {[str(f) for f in folders]}; run the "
                       f"fine-tuning first (SubsetFineTuner.run or the job's --ground_truth).")  # fmt: skip
    ids: dict[tuple[int, ...], int] = {}
    rows = [
        {"subset_id": ids.setdefault(tuple(r["subset"]), len(ids)), "subset": list(r["subset"]),
         **row, "seed": r["seed"]}
        for r in records for row in r["rows"]
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=[*COLUMNS, "seed"])
