"""pytest plugin: one loopback Hugging Face Hub per test session.

Enable it in a ``conftest.py``::

    pytest_plugins = ["hf_tae.testing.pytest_plugin"]

or on the command line with ``-p hf_tae.testing.pytest_plugin``. At ``pytest_configure`` it
starts a :class:`~hf_tae.testing.loopback_hub.LoopbackHub` on ``127.0.0.1`` and exports its
environment (``HF_ENDPOINT``, a dummy ``HF_TOKEN``, Xet and telemetry off, offline mode off,
``HF_HOME`` in a fresh temporary directory), so ``push_to_hub`` / ``from_pretrained`` /
``load_dataset`` in the tests, and in subprocesses they start, talk to it. At
``pytest_unconfigure`` it stops the server, restores the environment and removes the directory.

``huggingface_hub``, ``datasets`` and ``transformers`` read ``HF_ENDPOINT`` at import time, so
this module imports nothing from them, from torch or from the rest of hf_tae, and ``conftest.py``
files must not import them at module level either (import them in fixtures or test modules); the
plugin raises a clear error otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass

import pytest

from hf_tae.testing.loopback_hub import DEFAULT_USER, LoopbackHub


@dataclass
class _Session:
    hub: LoopbackHub
    hf_home: str
    saved_env: dict[str, str | None]


_SESSION_KEY = pytest.StashKey[_Session]()


def pytest_configure(config: pytest.Config) -> None:
    """Start the session's loopback Hub and point the HF clients at it."""
    hub = LoopbackHub().start()
    hf_home = tempfile.mkdtemp(prefix="hf_tae-loopback-hub-")
    saved_env = {name: os.environ.get(name) for name in hub.env(hf_home)}
    try:
        hub.apply_env(hf_home)
    except RuntimeError as err:  # an HF library was imported first, e.g. by a conftest.py
        hub.stop()
        shutil.rmtree(hf_home, ignore_errors=True)
        raise pytest.UsageError(str(err)) from None
    config.stash[_SESSION_KEY] = _Session(hub, hf_home, saved_env)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the server, restore the environment and delete the temporary ``HF_HOME``."""
    session = config.stash.get(_SESSION_KEY, None)
    if session is None:
        return
    del config.stash[_SESSION_KEY]
    session.hub.stop()
    for name, value in session.saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(session.hf_home, ignore_errors=True)


@pytest.fixture(scope="session")
def loopback_hub(pytestconfig: pytest.Config) -> LoopbackHub:
    """The running session-wide :class:`LoopbackHub` (its ``endpoint`` is ``HF_ENDPOINT``)."""
    return pytestconfig.stash[_SESSION_KEY].hub


@pytest.fixture
def hub_repo_id() -> str:
    """A fresh repo id, unique per test, e.g. ``"tae-tester/test-1a2b3c4d"``."""
    return f"{DEFAULT_USER}/test-{uuid.uuid4().hex[:8]}"
