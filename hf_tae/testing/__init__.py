"""Test utilities for hf_tae users and its own test suite (standard library only).

Importing this package must stay cheap and must not import any Hugging Face library:
:mod:`hf_tae.testing.pytest_plugin` sets ``HF_ENDPOINT`` before they are imported.
"""

from hf_tae.testing.loopback_hub import LoopbackHub

__all__ = ["LoopbackHub"]
