"""Suite-wide isolation: no test writes into the user's real state dir.

Engines started without an explicit state dir (runtimes built in a test with defaults) keep
their state files and engine keys under ``default_state_dir()``; each test gets its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("VLMHUB_STATE_DIR", str(state))
    return state
