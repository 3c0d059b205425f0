"""Small, non-blocking facts about local processes, read from Linux /proc (with a ``kill(0)``
fallback elsewhere): is a pid alive, when did it start, is its process group alive, is any of
its processes frozen. None waits. Most read a few small files; the process-group ones
(:func:`group_states`, :func:`group_alive`, :func:`group_live_states`) read every process's
stat file when the group exists (Linux cannot list a group's members otherwise): with thousands
of processes on the machine that takes tens of milliseconds, so async code calls them in a
worker thread (:mod:`vlmhub.engines.process`), never on the event loop."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

FROZEN_STATES = frozenset("Tt")
"""/proc states of a process that runs no code until it gets SIGCONT (SIGSTOP, a debugger)."""
STUCK_STATES = frozenset("D")
"""Uninterruptible sleep: usually brief (disk I/O); a process stuck in it answers nothing."""


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def proc_start(pid: int) -> str | None:
    """The process start time in clock ticks since boot: tells a pid's reuse apart."""
    fields = proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (Linux /proc; elsewhere kill(0) only)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = proc_stat(pid)
    return not (fields and fields[0] == "Z")


def same_process(pid: int, start: str | None) -> bool:
    """True when ``pid`` is alive and, if ``start`` is known, started at that time."""
    if not alive(pid):
        return False
    now = proc_start(pid)
    return start is None or now is None or now == start


def group_states(pgid: int) -> list[str]:
    """The /proc states of the live (non-zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    states = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = proc_stat(int(entry.name))
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            states.append(fields[0])
    return states


def group_live_states(pgid: int) -> frozenset[str] | None:
    """The /proc states of the live processes of group ``pgid``; None when none is alive (no
    scan when ``killpg(pgid, 0)`` says the group is gone). Without /proc: an empty set while
    the group exists. One scan: see the module docs for where to call it."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if not Path("/proc").is_dir():
        return frozenset()
    return frozenset(group_states(pgid)) or None


def group_alive(pgid: int) -> bool:
    """True when a live (non-zombie) process is in process group ``pgid``.

    A zombie stays in its group until its parent reaps it, and the parent may be another
    vlmhub process, so on Linux the group is read from /proc instead of ``killpg(pgid, 0)``.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    return bool(group_states(pgid))


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to process group ``pgid``; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
