"""Instruction templates: Jinja strings that turn a dataset row into an (input, target) pair.

A template is written as promptsource writes them: one Jinja string whose input and target
parts are separated by ``|||`` (``"{{premise}} Question: does this imply {{hypothesis}}? |||
{{ answer_choices[label] }}"``), optionally with ``answer_choices`` (``"yes ||| no"``, exposed
to the Jinja string as the list ``answer_choices``). The input and target may also be given as
two strings. Templates come from Python (:class:`Template`) or from a YAML/JSON file
(:func:`load_templates`)::

    templates:
      - name: rte_imply
        jinja: "{{premise}} Does this imply {{hypothesis}}? ||| {{ answer_choices[label] }}"
        answer_choices: "yes ||| no"
      - name: rte_plain
        input: "premise: {{premise}} hypothesis: {{hypothesis}}"
        target: "{{ answer_choices[label] }}"
        answer_choices: ["entailment", "not entailment"]
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from hf_tae.errors import TaeError

SEPARATOR = "|||"


def _split_choices(choices: str | Sequence[str] | None) -> list[str] | None:
    if choices is None:
        return None
    if isinstance(choices, str):
        return [c.strip() for c in choices.split(SEPARATOR)]
    return [str(c) for c in choices]


@dataclass(frozen=True)
class Template:
    """One instruction template: a task of the text family is a template applied to a dataset.

    Args:
        name: the task name (unique within a task set).
        input: Jinja string of the model input.
        target: Jinja string of the target.
        answer_choices: the answer strings (a list, or one string separated by ``|||``),
            available to both Jinja strings as ``answer_choices``.
    """

    name: str
    input: str
    target: str
    answer_choices: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer_choices", _split_choices(self.answer_choices))
        if not self.name:
            raise TaeError("a template has an empty name; give every template a unique name.")

    @classmethod
    def from_jinja(
        cls, name: str, jinja: str, answer_choices: str | Sequence[str] | None = None
    ) -> Template:
        """A template from one promptsource-style string ``"<input> ||| <target>"``."""
        parts = jinja.split(SEPARATOR)
        if len(parts) != 2:
            raise TaeError(
                f"template {name!r}: the jinja string must hold exactly one {SEPARATOR!r} between "
                f"its input and target parts, found {len(parts) - 1}."
            )
        return cls(name, parts[0].strip(), parts[1].strip(), _split_choices(answer_choices))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Template:
        """A template from a mapping with ``name`` and ``jinja`` or ``input`` + ``target``."""
        name = str(spec.get("name") or "")
        if "jinja" in spec:
            return cls.from_jinja(name, str(spec["jinja"]), spec.get("answer_choices"))
        if "input" in spec and "target" in spec:
            return cls(name, str(spec["input"]), str(spec["target"]), spec.get("answer_choices"))
        raise TaeError(
            f"template {name or spec!r} needs a 'jinja' string ('<input> ||| <target>') or "
            "both 'input' and 'target' strings."
        )

    @cached_property
    def _compiled(self):
        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment

        env = SandboxedEnvironment(undefined=StrictUndefined)
        try:
            return env.from_string(self.input), env.from_string(self.target)
        except Exception as err:
            raise TaeError(f"template {self.name!r} is not valid Jinja: {err}") from err

    def render(self, row: Mapping[str, Any]) -> tuple[str, str]:
        """``(input, target)`` of ``row``, whitespace-stripped.

        Raises:
            TaeError: naming the template and the column when the row lacks a column the
                template uses, or the template fails on the row's values.
        """
        from jinja2 import UndefinedError

        variables = dict(row)
        if self.answer_choices is not None:
            variables["answer_choices"] = self.answer_choices
        out = []
        for part, compiled in zip(("input", "target"), self._compiled, strict=True):
            try:
                out.append(compiled.render(**variables).strip())
            except UndefinedError as err:
                raise TaeError(
                    f"template {self.name!r} does not render the {part} of a row with columns "
                    f"{sorted(row)}: {err.message}. Name an existing column in the template, "
                    "or rename the dataset's column."
                ) from err
            except Exception as err:
                raise TaeError(
                    f"template {self.name!r} fails on the {part} of the row {dict(row)!r}: "
                    f"{type(err).__name__}: {err}."
                ) from err
        return out[0], out[1]


def load_templates(path: str | os.PathLike) -> list[Template]:
    """Templates from a YAML or JSON file: a list of template mappings, or a mapping with a
    ``templates`` list (see the module docstring)."""
    import yaml

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TaeError(f"template file {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        spec = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise TaeError(f"template file {path!r} is not valid JSON/YAML: {err}") from err
    if isinstance(spec, Mapping):
        spec = spec.get("templates")
    if not isinstance(spec, list) or not spec:
        raise TaeError(
            f"template file {path!r} must hold a non-empty list of templates (or a 'templates' "
            "list), each with 'name' and 'jinja' (or 'input' and 'target')."
        )
    templates = [Template.from_dict(item) for item in spec]
    check_unique([t.name for t in templates], f"template file {path!r}")
    return templates


def check_unique(names: Sequence[str], where: str) -> None:
    """Raise when a task name repeats (names are task ids)."""
    seen = set()
    for name in names:
        if name in seen:
            raise TaeError(f"{where} names the task {name!r} twice; task names must be unique.")
        seen.add(name)
