"""BIG-bench JSON tasks as text tasks.

BIG-bench (Srivastava et al., 2022) ships every JSON task as a ``task.json`` file: a ``name``,
``keywords`` (e.g. "arithmetic", "common sense") and ``examples``, each with an ``input`` and
either a ``target`` (a string or a list of acceptable strings; the first is trained on) or
``target_scores`` (multiple choice: ``{choice: score}``; the best-scored choice is the target
and the choices are appended to the input, as BIG-bench's own formatting does). Tasks with
subtasks keep one ``task.json`` per subtask folder; each becomes its own task, named by its
folder path (``arithmetic/2_digit_subtraction``).

:func:`read_bigbench` reads a folder tree of ``task.json`` files, one file, or the ``bigbench``
source tarball as ``pip download --no-deps bigbench==1.0.0`` saves it (streamed; never
installed: the package pulls TensorFlow).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_tae.errors import TaeError
from hf_tae.families.text.data import TextTasks, tasks_from_datasets

TASK_FILE = "task.json"
_ROOT_MARKER = "benchmark_tasks/"


@dataclass(frozen=True)
class BigBenchTask:
    """One BIG-bench JSON task: its name (folder path), keywords and (input, target) rows."""

    name: str
    keywords: tuple[str, ...]
    rows: list[dict[str, str]]


def _example_row(example: Mapping[str, Any], task: str, position: int) -> dict[str, str]:
    if "input" not in example:
        raise TaeError(f"BIG-bench task {task!r}: example {position} has no 'input'.")
    source = str(example["input"])
    if "target_scores" in example:
        scores = example["target_scores"]
        if not isinstance(scores, Mapping) or not scores:
            raise TaeError(f"BIG-bench task {task!r}: example {position} has empty target_scores.")
        target = max(scores, key=lambda choice: float(scores[choice]))
        source += "".join(f"\n  choice: {choice}" for choice in scores)
    elif "target" in example:
        target = example["target"]
        if isinstance(target, list):
            if not target:
                raise TaeError(
                    f"BIG-bench task {task!r}: example {position} has an empty target list."
                )
            target = target[0]
    else:
        raise TaeError(
            f"BIG-bench task {task!r}: example {position} has neither 'target' nor 'target_scores'."
        )
    return {"input": source, "target": str(target)}


def parse_bigbench_task(spec: Mapping[str, Any], name: str) -> BigBenchTask:
    """A :class:`BigBenchTask` from the parsed ``task.json`` of the task called ``name``."""
    examples = spec.get("examples")
    if not isinstance(examples, list) or not examples:
        raise TaeError(f"BIG-bench task {name!r} has no 'examples' list (programmatic task?).")
    prefix = str(spec.get("task_prefix", ""))
    rows = [_example_row(example, name, i) for i, example in enumerate(examples)]
    if prefix:
        rows = [{"input": prefix + row["input"], "target": row["target"]} for row in rows]
    return BigBenchTask(name, tuple(str(k) for k in spec.get("keywords", [])), rows)


def _task_name(path: str) -> str:
    """``arithmetic/2_digit_subtraction`` from ``…/benchmark_tasks/arithmetic/2_digit_subtraction/task.json``."""
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if _ROOT_MARKER in parent + "/":
        parent = (parent + "/").split(_ROOT_MARKER, 1)[1].rstrip("/")
    return parent or "task"


def iter_task_files(source: str | os.PathLike) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(task name, parsed task.json)`` of every JSON task under ``source``: a folder tree, one
    ``task.json`` file, or a ``.tar.gz`` / ``.tar`` archive (the bigbench sdist)."""
    path = Path(source)
    if not path.exists():
        raise TaeError(
            f"BIG-bench source {str(path)!r} does not exist; give a folder of task.json files, "
            "one task.json, or the tarball of `pip download --no-deps bigbench==1.0.0`."
        )
    if path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            for member in archive:
                if member.isfile() and member.name.endswith("/" + TASK_FILE):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        yield _task_name(member.name), _load_json(handle.read(), member.name)
        return
    if path.is_file():
        yield path.parent.name or "task", _load_json(path.read_bytes(), str(path))
        return
    for file in sorted(path.rglob(TASK_FILE)):
        relative = file.relative_to(path).as_posix()
        yield (
            _task_name(relative) if "/" in relative else path.name,
            _load_json(file.read_bytes(), str(file)),
        )


def _load_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise TaeError(f"{where} is not valid JSON: {err}") from err


def read_bigbench(
    source: str | os.PathLike,
    names: Sequence[str] | None = None,
    keywords: Sequence[str] | None = None,
) -> list[BigBenchTask]:
    """The JSON tasks under ``source`` (:func:`iter_task_files`), optionally only those whose
    name is in ``names`` (a top-level name selects all its subtasks) or that carry any of
    ``keywords``. Tasks without examples are skipped unless named."""
    wanted = set(names or [])
    tasks, found = [], set()
    for name, spec in iter_task_files(source):
        top = name.split("/", 1)[0]
        if wanted and name not in wanted and top not in wanted:
            continue
        if keywords and not set(keywords) & set(spec.get("keywords", [])):
            continue
        if not spec.get("examples") and not (wanted & {name, top}):
            continue
        tasks.append(parse_bigbench_task(spec, name))
        found.update({name, top})
    missing = sorted(wanted - found)
    if missing:
        raise TaeError(f"BIG-bench tasks {missing} are not in {os.fspath(source)!r}.")
    if not tasks:
        raise TaeError(
            f"no BIG-bench JSON task under {os.fspath(source)!r} matches {names=}, {keywords=}."
        )
    return tasks


def bigbench_tasks(
    source: str | os.PathLike,
    names: Sequence[str] | None = None,
    keywords: Sequence[str] | None = None,
    max_rows_per_task: int | None = None,
    seed: int = 0,
) -> TextTasks:
    """:class:`TextTasks` with one task per BIG-bench JSON task; train/validation/test splits
    are carved out of each task's examples (80/10/10, seeded)."""
    tasks = read_bigbench(source, names, keywords)
    return tasks_from_datasets(
        {task.name: {"train": task.rows} for task in tasks},
        max_rows_per_task=max_rows_per_task,
        seed=seed,
        description=f"BIG-bench JSON tasks from {Path(source).name}",
    )
