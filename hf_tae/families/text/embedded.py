"""The embedded default of the instruction family: digit-string skills, each phrased by several
instruction templates, with a planted task structure.

Every input is a string of 3–5 random digits. An **underlying task** (a skill) is a function
of the digits with a one-token answer: ``max`` (largest digit), ``min`` (smallest), ``zero``
(is there a 0: yes/no) and ``even`` (how many even digits). Each skill is phrased by three
instruction templates (different wording, different position of the digits); a template is a
task, as instructions of one dataset are in approximate clustering for multi-instruction
tuning. What is planted, and why:

* **templates of one underlying task help each other**: they ask for the same function, so a
  template's rows are more training data for its siblings (each template alone has few rows);
* **different underlying tasks compete**: they map the *same* inputs to *different* answers,
  so a model trained on two of them must learn to read the instruction and sees half as many
  rows of each function.

The skills depend on the digits, not on their positions: LoRA adapters on a tiny T5 whose base
is random (and frozen, relative attention bias included) learn content skills in a few hundred
steps but not positional ones (measured: "first digit" and "last digit" stayed at 25–40% exact
match where max and min reached 90–100%), and a skill nobody learns plants nothing.

No instruction contains a digit: an earlier wording of ``zero`` ("is there a 0 in …") put a 0
in every input of one template, and that template stood apart from its siblings in every
estimate (the job split ``zero`` in two on data seeds 0 and 1). That wording stays reachable
as the skill ``zero_legacy`` (``--skills max min zero_legacy even`` is the old default).

Two more skills make a **harder variant** (``--skills max min zero even big five``): ``big``
(how many digits are 5 or more) answers in the same vocabulary as ``even`` and ``five`` (is
there a 5) in the same as ``zero``, so tasks that share an answer format but not a function sit
side by side.

The planted group of a template is its underlying task. Everything is generated from a seed
in milliseconds and learned by a tiny T5 with LoRA on 2 CPU cores in seconds per run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hf_tae.errors import TaeError
from hf_tae.families.text.data import SPLITS, TextTasks
from hf_tae.families.text.templates import Template

#: underlying task -> (answer of a digit list, three instruction templates over ``digits``)
SKILLS: dict[str, tuple[Callable[[list[str]], str], tuple[str, ...]]] = {
    "max": (max, ("max: {{digits}}", "the largest digit of {{digits}}",
                  "{{digits}} has the biggest digit")),
    "min": (min, ("min: {{digits}}", "the smallest digit of {{digits}}",
                  "{{digits}} has the lowest digit")),
    "zero": (lambda d: "yes" if "0" in d else "no",
             ("zero: {{digits}}", "is there a zero digit in {{digits}}", "{{digits}} contains a zero")),
    "even": (lambda d: str(sum(int(c) % 2 == 0 for c in d)),
             ("evens: {{digits}}", "how many even digits are in {{digits}}",
              "{{digits}} count of even digits")),
    "big": (lambda d: str(sum(int(c) >= 5 for c in d)),
            ("big: {{digits}}", "how many digits of {{digits}} are five or more",
             "{{digits}} count of large digits")),
    "five": (lambda d: "yes" if "5" in d else "no",
             ("five: {{digits}}", "is there a five digit in {{digits}}", "{{digits}} contains a five")),
    # the default's `zero` until session 13, kept to reproduce it (its second template puts a 0
    # in every input): --skills max min zero_legacy even
    "zero_legacy": (lambda d: "yes" if "0" in d else "no",
                    ("zero: {{digits}}", "is there a 0 in {{digits}}", "{{digits}} contains a zero")),
}  # fmt: skip


#: the skills of the embedded default; ``big`` and ``five`` are the harder variant (below)
DEFAULT_SKILLS = ("max", "min", "zero", "even")


def skill_templates(skills: Sequence[str] | None = None) -> tuple[list[Template], list[int]]:
    """The templates of ``skills`` (default: :data:`DEFAULT_SKILLS`) and their planted groups."""
    skills = list(skills or DEFAULT_SKILLS)
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise TaeError(f"unknown skills {unknown}; choose from {list(SKILLS)}.")
    templates, groups = [], []
    for group, skill in enumerate(skills):
        for j, text in enumerate(SKILLS[skill][1]):
            templates.append(Template(f"{skill}_{j}", text, "{{answer}}"))
            groups.append(group)
    return templates, groups


def make_digit_skills(
    skills: Sequence[str] | None = None,
    train_per_template: int = 60,
    eval_per_template: int = 40,
    min_digits: int = 3,
    max_digits: int = 5,
    seed: int = 0,
) -> TextTasks:
    """The embedded default: every template of every skill with its own random digit strings
    (``train_per_template`` training rows, ``eval_per_template`` validation and test rows)."""
    if not 1 <= min_digits <= max_digits:
        raise TaeError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}.")
    if train_per_template < 1 or eval_per_template < 1:
        raise TaeError("train_per_template and eval_per_template must be at least 1.")
    templates, groups = skill_templates(skills)
    rng = np.random.default_rng(seed)
    sizes = {
        "train": train_per_template,
        "validation": eval_per_template,
        "test": eval_per_template,
    }
    records = []
    for template in templates:
        answer = SKILLS[template.name.rsplit("_", 1)[0]][0]
        for split in SPLITS:
            for _ in range(sizes[split]):
                digits = [
                    str(d) for d in rng.integers(0, 10, rng.integers(min_digits, max_digits + 1))
                ]
                source, target = template.render(
                    {"digits": " ".join(digits), "answer": answer(digits)}
                )
                records.append(
                    {"task": template.name, "split": split, "input": source, "target": target}
                )
    return TextTasks.from_records(
        records, [t.name for t in templates], groups,
        description=f"digit skills {list(skills or DEFAULT_SKILLS)} × 3 templates",
    )  # fmt: skip
