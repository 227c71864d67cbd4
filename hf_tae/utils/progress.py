"""Silence every progress bar of a job (``--disable_tqdm true``), then restore the previous state.

The libraries' own switches cover their bars (``datasets``: "Generating train split", "Map",
parquet saving; ``huggingface_hub``: uploads and downloads; ``transformers``: downloads), and
hf_tae has one of the same kind for its own bars (gradients, store merging, subset fits,
fine-tuning runs), which are all made by this module's :func:`tqdm`. tqdm's ``TQDM_DISABLE``
environment variable cannot do this: tqdm reads it once, when it is imported, and an explicit
``disable=False`` overrides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

_enabled = True


def disable_progress_bars() -> None:
    """Hide every hf_tae progress bar (as ``datasets.disable_progress_bars`` does for its own)."""
    global _enabled
    _enabled = False


def enable_progress_bars() -> None:
    """Show hf_tae's progress bars again (each bar's own ``disable=`` still applies)."""
    global _enabled
    _enabled = True


def are_progress_bars_disabled() -> bool:
    return not _enabled


def tqdm(*args: Any, **kwargs: Any):
    """``tqdm.auto.tqdm``, hidden while :func:`disable_progress_bars` is in effect; every
    progress bar of the library is made through this."""
    from tqdm.auto import tqdm as _tqdm

    if not _enabled:
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)


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
        stack.enter_context(
            _library_switch(lambda: _enabled, disable_progress_bars, enable_progress_bars)
        )
        yield
