"""Each managed engine's own API key: random, kept ``0600`` in the state dir.

vLLM checks ``Authorization: Bearer KEY`` on its API (``/v1/...``) when started with
``--api-key`` or the ``VLLM_API_KEY`` environment variable; its health path stays open. vlmhub
passes the key through the engine's environment only (never argv: ``ps`` would show it; never
a state record, Docker label or log line), and the router sends it upstream on every request.
So a local user who reaches ``127.0.0.1:81xx`` cannot use the engine around
``router.api_keys``.

One key per model name and state dir (``<state_dir>/engine-keys/<name>.key``): a restarted
router on the same state dir reads it to call the engines it adopts. Reading or creating the
small file blocks briefly; safe from any thread (a complete file is linked into place).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path

from vlmhub.logs import add_secrets

ENV = "VLLM_API_KEY"
"""The variable vLLM reads when ``--api-key`` is not given (``args.api_key or
envs.VLLM_API_KEY`` in its API server)."""
DIR = "engine-keys"
_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def key_path(state_dir: Path, name: str) -> Path:
    """Where ``name``'s engine key lives under ``state_dir``."""
    return Path(state_dir) / DIR / f"{_BAD.sub('_', name)}.key"


def read_key(state_dir: Path, name: str) -> str | None:
    """``name``'s key, or None when none was made (or the file is unreadable)."""
    try:
        key = key_path(state_dir, name).read_text().strip()
    except OSError:
        return None
    if key:
        add_secrets([key])  # masked in every log line from now on
    return key or None


def engine_key(state_dir: Path, name: str) -> str:
    """``name``'s key, made (random, mode 0600, folder 0700) on first use."""
    path = key_path(state_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(prefix=".key.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            with contextlib.suppress(FileExistsError):  # another start made it first
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    key = read_key(state_dir, name)
    if key is None:
        raise OSError(f"cannot read the engine key {path}")
    return key
