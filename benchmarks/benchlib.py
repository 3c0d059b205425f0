"""What the benchmark scripts share: child processes, /proc readings, the machine's description
and the generated blocks of docs/benchmarks.md.

A benchmark script regenerates its own part of docs/benchmarks.md with ``--update-doc``: the
text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` is replaced by what the run
produced (its command, the machine, every table), and the prose around it is left alone.
A script that prints its block instead pipes it in:

    python benchmarks/simulate_table.py | python benchmarks/benchlib.py docs/benchmarks.md simulate
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class Processes:
    """The child processes of this run; all stopped by :meth:`stop_all` (SIGTERM, then KILL,
    to each one's process group)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        full = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1", **(env or {})}
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=full,
                                start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc, log in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of process ``pid`` so far, from /proc (None where unavailable)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int | None) -> tuple[float, float] | None:
    """(resident now, peak resident) of process ``pid`` in MiB, from /proc (VmRSS, VmHWM)."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    if len(found) != 2:
        return None
    return int(found["VmRSS"]) / 1024, int(found["VmHWM"]) / 1024


def fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def machine(packages: Sequence[str]) -> dict[str, str]:
    """The date, the machine, the load, the versions of ``packages`` and vlmhub's commit."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "vlmhub"],
                           capture_output=True, text=True, check=False).stdout.strip()
    info = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(),
            "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
            "vlmhub commit": (git or "unknown") + (" + uncommitted changes in vlmhub/"
                                                   if dirty else "")}
    for pkg in packages:
        info[pkg] = version(pkg)
    return info


def update_doc(doc: Path, name: str, text: str) -> None:
    """Replace the block ``name`` of ``doc`` (between its begin and end markers) by ``text``."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    current = doc.read_text()
    if current.count(begin) != 1 or current.count(end) != 1:
        raise SystemExit(f"{doc}: needs exactly one {begin!r} and one {end!r} line")
    head, rest = current.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")


def save_report(out: Path, info: Mapping[str, str], elapsed_s: float, text: str,
                results: Mapping[str, Any], doc: Path | None, block_name: str) -> None:
    """Write ``summary.md`` (the command, the set-up and ``text``) and ``results.json`` to
    ``out``, and the summary into ``doc``'s block ``block_name`` when ``doc`` is given."""
    setup = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("command", "date"))
    block = "\n".join([f"Run of {info['date']} ({elapsed_s:.0f} s):", "", "```sh",
                       info["command"], "```", "", f"Set-up: {setup}.", "", text])
    (out / "summary.md").write_text(block)
    (out / "results.json").write_text(json.dumps(
        {"info": dict(info), "elapsed_s": elapsed_s, **results}, indent=2))
    if doc is not None:
        update_doc(doc, block_name, block)
        print(f"updated the {block_name} block of {doc}")


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the clean-up in ``finally`` runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # the block from standard input: benchlib.py FILE NAME
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: benchlib.py FILE BLOCK_NAME < text")
    update_doc(Path(sys.argv[1]), sys.argv[2], sys.stdin.read())
