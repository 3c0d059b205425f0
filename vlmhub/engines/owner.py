"""Who owns engines: one router per state dir, and an owner stamp on every engine.

* :func:`lock_state_dir`: ``vlmhub route`` holds an exclusive ``flock`` on
  ``<state_dir>/router.lock`` for its whole life (the file holds its pid, port and URL as
  JSON), so a second router on the same state dir refuses at once with a message naming the
  first. The lock is released by the kernel when the router's process ends, however it ends.
* :func:`this_owner` / :func:`owned_by_other`: each engine records the vlmhub process that
  started (or adopted) it as ``host:pid:start``. Adoption takes only engines whose owner is gone
  (or is this process), so a router never adopts, nor stops, the engines another live vlmhub
  process runs.

Everything here is synchronous and quick (a few small files, one non-blocking ``flock``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from functools import cache
from pathlib import Path
from typing import Any

from vlmhub.engines.procfs import proc_start, same_process
from vlmhub.errors import VlmhubError

LOCK_NAME = "router.lock"


class StateDirBusy(VlmhubError):
    """Another live router holds the state dir's lock."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        self.holder = holder
        super().__init__(message)


@cache
def _host() -> str:
    return socket.gethostname()


def this_owner() -> str:
    """This process as an engine owner: ``host:pid:start`` (start: /proc ticks, or empty)."""
    pid = os.getpid()
    return f"{_host()}:{pid}:{proc_start(pid) or ''}"


def owned_by_other(owner: str) -> bool:
    """True when ``owner`` (a :func:`this_owner` stamp) is another vlmhub process that still
    runs. An empty or unreadable stamp (an engine of an older vlmhub) counts as gone. An owner
    on another host cannot be checked from here: it counts as alive (never adopt blindly)."""
    if not owner or owner == this_owner():
        return False
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != _host():
        return True
    return pid != os.getpid() and same_process(pid, start or None)


def describe_owner(owner: str) -> str:
    """``pid N`` (``on HOST`` when it is another machine) for messages."""
    try:
        host, pid_text, _ = owner.rsplit(":", 2)
    except ValueError:
        return "an unknown process"
    return f"pid {pid_text}" + ("" if host == _host() else f" on {host}")


class StateDirLock:
    """An exclusive lock on a state dir, held through an open file descriptor."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def record(self, **info: Any) -> None:
        """Replace the lock file's JSON (pid, start time and ``info``) for other routers."""
        if self._fd is None:
            return
        data = {"pid": os.getpid(), "owner": this_owner(), "since": time.time(), **info}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(data).encode(), 0)

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a router opening it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> dict[str, Any]:
    """The JSON the lock's holder wrote ({} when unreadable or not written yet)."""
    for _ in range(20):  # the holder writes right after it locks: give it a moment
        try:
            data = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            return data
        time.sleep(0.05)
    return {}


def lock_state_dir(state_dir: Path, **info: Any) -> StateDirLock:
    """Take ``state_dir``'s router lock without waiting, recording ``info`` (port, url).

    Raises :class:`StateDirBusy` naming the router that holds it and how to run side by side.
    The descriptor is close-on-exec, so engines never inherit (and never keep) the lock.
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = read_holder(path)
        raise StateDirBusy(busy_message(state_dir, holder), holder) from None
    except BaseException:
        os.close(fd)
        raise
    lock = StateDirLock(path, fd)
    lock.record(**info)
    return lock


def busy_message(state_dir: Path, holder: dict[str, Any]) -> str:
    """Who holds the state dir, and the three ways out."""
    pid = holder.get("pid", "?")
    where = f", port {holder['port']}" if holder.get("port") else ""
    url = f" at {holder['url']}" if holder.get("url") else ""
    return (
        f"another vlmhub router (pid {pid}{where}) already owns the state dir {state_dir} and "
        f"its engines{url}. Two routers on one state dir would adopt and stop each other's "
        f"engines. Fix: use that router, or stop it first (Ctrl-C in its terminal, or "
        f"`kill {pid}`), or run this one side by side with its own state dir: "
        "`vlmhub route --state-dir DIR --port N` (or VLMHUB_STATE_DIR=DIR); with "
        "runtime.kind docker also give it its own runtime.name_prefix."
    )
