"""Task families: what the pipeline needs to know about one kind of data and model.

:class:`TaskFamily` is the contract, :func:`register_family` adds one and
:func:`get_family` finds one by name (``hf-tae run <name>``). The built-in families register
themselves on first lookup, so importing this package stays light.
"""

from __future__ import annotations

import importlib

from hf_tae.errors import TaeError
from hf_tae.families.base import TaskFamily, TaskMetrics

#: Modules of the built-in families, imported on first lookup.
_BUILTIN = (
    "hf_tae.families.graph.family",
    "hf_tae.families.image.family",
    "hf_tae.families.text.family",
)
_REGISTRY: dict[str, type[TaskFamily]] = {}


def register_family(cls: type[TaskFamily]) -> type[TaskFamily]:
    """Class decorator: make ``cls`` available as ``get_family(cls.name)``."""
    if not (isinstance(cls, type) and issubclass(cls, TaskFamily)) or not cls.name:
        raise TaeError(f"{cls!r} must be a TaskFamily subclass with a non-empty name.")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)


def family_names() -> list[str]:
    """Names of the registered families, built-ins first."""
    _load_builtin()
    return list(_REGISTRY)


def get_family(name: str | TaskFamily | type[TaskFamily]) -> TaskFamily:
    """The family registered as ``name`` (an instance; a family instance or class passes through)."""
    if isinstance(name, TaskFamily):
        return name
    if isinstance(name, type) and issubclass(name, TaskFamily):
        return name()
    _load_builtin()
    if name not in _REGISTRY:
        raise TaeError(f"unknown task family {name!r}; known families: {list(_REGISTRY)}.")
    return _REGISTRY[name]()


__all__ = ["TaskFamily", "TaskMetrics", "family_names", "get_family", "register_family"]
