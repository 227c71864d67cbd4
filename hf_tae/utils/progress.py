"""Silence every progress bar of a job (``--disable_tqdm true``), then restore the previous state.

The libraries' own switches cover their bars (``datasets``: "Generating train split", "Map",
parquet saving; ``huggingface_hub``: uploads and downloads; ``transformers``: downloads). Plain
``tqdm`` bars that decide ``disable=`` by themselves (e.g. the estimator's "fitting subsets") are
silenced by forcing ``disable=True`` in ``tqdm``'s constructor while the context is open. tqdm's
``TQDM_DISABLE`` environment variable cannot do this: tqdm reads it once, when it is imported,
and an explicit ``disable=False`` overrides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

_TQDM_DISABLE_POSITION = 10  # tqdm(iterable, desc, total, leave, file, ncols, mininterval,
#                               maxinterval, miniters, ascii, disable, …)


@contextmanager
def _library_switch(is_enabled, disable, enable) -> Iterator[None]:
    was_enabled = is_enabled()
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()


@contextmanager
def _tqdm_forced_off() -> Iterator[None]:
    """Every ``tqdm`` (and subclass) constructed inside the context is disabled."""
    from tqdm import std

    cls = std.tqdm
    original = vars(cls)["__init__"]  # a partialmethod holding tqdm's env defaults

    def disabled_init(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > _TQDM_DISABLE_POSITION:
            args = (*args[:_TQDM_DISABLE_POSITION], True, *args[_TQDM_DISABLE_POSITION + 1 :])
        else:
            kwargs["disable"] = True
        original.__get__(self, type(self))(*args, **kwargs)

    cls.__init__ = disabled_init
    try:
        yield
    finally:
        cls.__init__ = original


@contextmanager
def progress_bars_disabled(disable: bool = True) -> Iterator[None]:
    """Within the context, no progress bar of ``tqdm``, ``datasets``, ``huggingface_hub`` or
    ``transformers`` is shown (a no-op when ``disable`` is false); on exit each library's switch
    is back where it was."""
    if not disable:
        yield
        return
    import datasets.utils as datasets_utils
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    with ExitStack() as stack:
        stack.enter_context(
            _library_switch(
                lambda: not datasets_utils.are_progress_bars_disabled(),
                datasets_utils.disable_progress_bars,
                datasets_utils.enable_progress_bars,
            )
        )
        stack.enter_context(
            _library_switch(
                lambda: not hub_utils.are_progress_bars_disabled(),
                hub_utils.disable_progress_bars,
                hub_utils.enable_progress_bars,
            )
        )
        stack.enter_context(
            _library_switch(
                transformers_logging.is_progress_bar_enabled,
                transformers_logging.disable_progress_bar,
                transformers_logging.enable_progress_bar,
            )
        )
        stack.enter_context(_tqdm_forced_off())
        yield
