"""Where vlmhub keeps its state on disk: the one place that names the state directory.

Pure and non-blocking (reads only the environment).
"""

from __future__ import annotations

import os
from pathlib import Path

STATE_DIR_ENV = "VLMHUB_STATE_DIR"


def default_state_dir() -> Path:
    """``$VLMHUB_STATE_DIR``, else ``~/.local/state/vlmhub``."""
    return Path(os.environ.get(STATE_DIR_ENV) or "~/.local/state/vlmhub").expanduser()
