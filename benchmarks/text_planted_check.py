"""Is the instruction family's planted structure real? A check by fine-tuning alone.

What it measures
    On the embedded digit-skills default (4 skills × 3 templates; :mod:`hf_tae.families.text.embedded`),
    every template ``t`` is fine-tuned (fresh LoRA adapters on the fixed tiny T5 base, the family's
    training defaults: the same number of steps in every run) three ways, each with every ``--seeds``
    seed:

    * **alone**: on ``t``'s rows only;
    * **with a sibling**: ``t`` and another template of the same skill (pairs within a group);
    * **with a stranger**: ``t`` and the template at the same position of the next skill.

    It prints, per condition, ``t``'s mean test target loss and exact match over templates and
    seeds, and the per-template differences: a sibling should lower the loss (templates of one
    skill help each other), a stranger should raise it (skills compete).

    python benchmarks/text_planted_check.py --output_dir /tmp/text_check --seeds 0 1

    Any other option is the family's (``hf-tae run instructions --help``), e.g. ``--skills max
    min even big`` or ``--train_per_template 40`` to check another design of the default.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch
    from transformers import HfArgumentParser

    torch.set_num_threads(1)
    from hf_tae.evaluation.ground_truth import SubsetFineTuner
    from hf_tae.families import get_family
    from hf_tae.trainers import MultitaskTrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="runs/text_planted_check")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max_steps", type=int, default=None)
    cli, rest = parser.parse_known_args()
    family = get_family("instructions")
    (args,) = HfArgumentParser(family.arguments_class).parse_args_into_dataclasses(rest)
    tasks = family.load_tasks(args)
    groups = np.asarray(tasks.source.task_groups)
    n, k = len(groups), int(groups.max()) + 1
    size = n // k
    sibling = {t: (t // size) * size + (t % size + 1) % size for t in range(n)}
    stranger = {t: (t + size) % n for t in range(n)}
    subsets = [(t,) for t in range(n)] + [tuple(sorted((t, sibling[t]))) for t in range(n)]
    subsets += [tuple(sorted((t, stranger[t]))) for t in range(n)]
    subsets = list(dict.fromkeys(subsets))
    training = dict(
        family.training_defaults, output_dir=cli.output_dir, report_to=[], disable_tqdm=True
    )
    if cli.max_steps:
        training["max_steps"] = cli.max_steps
    targs = MultitaskTrainingArguments(**training)

    def model_init():
        return family.model_init(args, tasks)

    start = time.perf_counter()
    table = SubsetFineTuner(model_init, tasks, targs, Path(cli.output_dir) / "runs", seeds=cli.seeds,
                            trainer_class=family.trainer_class).run(subsets, split="test")  # fmt: skip
    seconds = time.perf_counter() - start
    table["subset"] = [tuple(s) for s in table["subset"]]
    mean = table.groupby(["subset", "task"])[["log_loss", "accuracy"]].mean()
    lookup = {key: values for key, values in zip(mean.index, mean.to_numpy(), strict=True)}

    def score(t, partner):
        return lookup[((t,) if partner is None else tuple(sorted((t, partner))), t)]

    rows = {name: np.array([[*score(t, p)] for t, p in ((t, part(t)) for t in range(n))])
            for name, part in (("alone", lambda t: None), ("with a sibling", sibling.get),
                               ("with a stranger", stranger.get))}  # fmt: skip
    print(f"{len(subsets)} subsets × {len(cli.seeds)} seeds in {seconds:.0f} s")
    print(f"{'condition':>16} {'target loss':>12} {'exact match':>12}")
    for name, values in rows.items():
        print(f"{name:>16} {values[:, 0].mean():12.3f} {values[:, 1].mean():12.3f}")
    help_ = rows["alone"][:, 0] - rows["with a sibling"][:, 0]
    hurt = rows["with a stranger"][:, 0] - rows["alone"][:, 0]
    print(
        f"sibling lowers the loss for {int((help_ > 0).sum())}/{n} templates (mean {help_.mean():+.3f}); "
        f"stranger raises it for {int((hurt > 0).sum())}/{n} (mean {hurt.mean():+.3f})"
    )
    summary = {"seconds": seconds, "seeds": cli.seeds, "tasks": tasks.task_names,
               **{name: {"log_loss": v[:, 0].tolist(), "accuracy": v[:, 1].tolist()} for name, v in rows.items()}}  # fmt: skip
    (Path(cli.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
