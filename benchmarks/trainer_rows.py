"""Trainer rows from Arrow vs in-memory tensors: time of one fine-tuning run, same results.

The trainers feed the HF ``Trainer`` either the torch-formatted ``datasets.Dataset`` of a
task set's split (every random batch gathered row by row from Arrow) or the same rows as
in-memory tensors (``hf_tae.tasks.tensor_rows.in_memory_rows``, the default where the columns
stack and fit). This runs the same subset fine-tuning (``SubsetFineTuner``, the family's
training defaults, one seed) both ways, in one process, and prints the wall time of each, the
ratio, and whether the per-task test metrics are identical.

    python benchmarks/trainer_rows.py                  # the image default, 2 domains, 600 steps
    python benchmarks/trainer_rows.py --family graph   # the graph default, 2 communities
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from unittest import mock


def main(argv: list[str] | None = None) -> None:
    import dataclasses

    import pandas as pd

    from hf_tae.evaluation.ground_truth import SubsetFineTuner
    from hf_tae.families import get_family
    from hf_tae.pipeline import stages
    from hf_tae.pipeline.run import build_parser

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family", default="images", help="A registered family (its default data)."
    )
    parser.add_argument("--repeats", type=int, default=2, help="Runs per way (the fastest counts).")
    args = parser.parse_args(argv)
    family = get_family(args.family)
    results, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        family_args, *_, training_args = build_parser(family).parse_args_and_config(
            ["--output_dir", tmp, "--disable_tqdm", "true"]
        )
        tasks = family.load_tasks(family_args)
        training_args = dataclasses.replace(stages.run_arguments(training_args), disable_tqdm=True)
        subset = tuple(tasks.task_names[:2])
        for way in ("arrow rows", "in-memory tensors"):
            times = []
            for repeat in range(args.repeats):
                tuner = SubsetFineTuner(lambda: family.model_init(family_args, tasks), tasks,
                                        training_args, f"{tmp}/{way}/{repeat}", seeds=[0])  # fmt: skip
                rows_as_given = mock.patch("hf_tae.trainers.multitask.in_memory_rows", lambda r: r)
                start = time.perf_counter()
                with rows_as_given if way == "arrow rows" else contextlib.nullcontext():
                    table = tuner.run([subset], split="test", show_progress=False)
                times.append(time.perf_counter() - start)
            seconds[way], results[way] = min(times), table
    metrics = [c for c in results["arrow rows"].columns if c in ("f1", "accuracy", "log_loss")]
    same = results["arrow rows"][metrics].equals(results["in-memory tensors"][metrics])
    print(pd.DataFrame({"seconds": seconds}).round(2).to_string())
    length = (f"{training_args.max_steps} steps" if training_args.max_steps > 0
              else f"{training_args.num_train_epochs:g} epochs")  # fmt: skip
    ratio = seconds["arrow rows"] / seconds["in-memory tensors"]
    print(
        f"{args.family}: in-memory tensors {ratio:.2f}x faster than Arrow rows for one run "
        f"({length}) on {list(subset)}; per-task test metrics identical: {same}"
    )


if __name__ == "__main__":
    main()
