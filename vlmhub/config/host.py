"""The host's RAM, for level-1 sleepers (their weights move there: docs/vram.md).

Pure readers over files given by path (tests pass fake ones): ``/proc/meminfo``'s ``MemTotal``
and this process's cgroup memory limit (v2 ``memory.max``, else v1
``memory.limit_in_bytes``), whichever is smaller. Blocks only on those small reads.
"""

from __future__ import annotations

import math
from pathlib import Path

GIB = 1024**3
V1_UNLIMITED = 2**62
"""cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages, about 2**63)."""


def meminfo_total_gib(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """``MemTotal`` of ``meminfo`` in GiB; None when it cannot be read."""
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key.strip() == "MemTotal":
                kib = float(rest.split()[0])
                return kib * 1024 / GIB
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_limit_gib(root: Path = Path("/sys/fs/cgroup"),
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """This process's cgroup memory limit in GiB; None when there is none (or none readable).

    cgroup v2: ``<root>/<path>/memory.max`` of the ``0::<path>`` line ("max": no limit).
    cgroup v1: ``<root>/memory/<path>/memory.limit_in_bytes`` of the ``memory`` controller's
    line. A container usually sees its own cgroup at the root, so the root's file is read
    when the path's is missing.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    v2, v1 = None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    candidates: list[Path] = []
    if v2 is not None:
        candidates += [root / v2.lstrip("/") / "memory.max", root / "memory.max"]
    if v1 is not None:
        candidates += [root / "memory" / v1.lstrip("/") / "memory.limit_in_bytes",
                       root / "memory" / "memory.limit_in_bytes"]
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return None if value >= V1_UNLIMITED else value / GIB
    return None


def host_total_gib(meminfo: Path = Path("/proc/meminfo"), root: Path = Path("/sys/fs/cgroup"),
                   proc_cgroup: Path = Path("/proc/self/cgroup")) -> float:
    """The RAM this process may use: MemTotal or the cgroup limit, whichever is smaller
    (``math.inf`` when neither can be read)."""
    found = [g for g in (meminfo_total_gib(meminfo), cgroup_limit_gib(root, proc_cgroup))
             if g is not None]
    return min(found) if found else math.inf


def host_budget_gib(total_gib: float | None, reserve_gib: float) -> float:
    """What level-1 sleepers may fill: ``total_gib`` (None: read from this host) less
    ``reserve_gib`` (the OS, vlmhub, the engines' own processes)."""
    total = host_total_gib() if total_gib is None else total_gib
    return max(total - reserve_gib, 0.0)
