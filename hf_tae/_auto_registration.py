"""Register hf_tae's model classes with transformers' Auto classes as soon as both are imported.

``import hf_tae`` must not import transformers (test utilities have to set ``HF_ENDPOINT``
first, and the import is slow), yet ``AutoModel.from_pretrained`` on a saved hf_tae model
should work once hf_tae is imported. So: register now if transformers is already loaded,
otherwise right after its first import, through a one-shot import hook.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``transformers`` to register hf_tae.models after it runs."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib protocol
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):  # noqa: ANN001, ANN202
            exec_module(module)
            importlib.import_module("hf_tae.models")

        loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Register now if transformers is loaded, else once it is (idempotent)."""
    if "transformers" in sys.modules:
        importlib.import_module("hf_tae.models")
    elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTransformers())
