"""Process runtime: each engine is a local process (``vllm serve`` or a configured command).

The engine runs in its own session and process group, so Ctrl-C in the terminal does not reach
it and :meth:`ProcessRuntime.stop` can signal every process it spawned (vLLM's EngineCore
workers too). Its stdout and stderr go to ``<state_dir>/logs/<name>.log`` and a JSON state
file ``<state_dir>/process/<name>.json`` records it, so that ``vlmhub logs``/``ps``/``stop``
and a restarted router find it from another process.

Nothing here blocks for long: spawning, signalling and reading small local files happen in the
event-loop thread; waits are ``asyncio.sleep`` polls. Secret values are inherited from the
environment and never written to the state file or printed (argv is redacted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from vlmhub.config import RuntimeConfig
from vlmhub.errors import EngineStartError, PortInUse, RuntimeUnavailable
from vlmhub.flags import redact
from vlmhub.runtimes.base import EngineHandle, EngineStatus, LaunchRequest, Runtime
from vlmhub.runtimes.ports import port_is_free
from vlmhub.runtimes.reconcile import Reconciled, reconcile_engines

_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
"""Engines spawned by THIS process (any runtime instance): only the parent can reap a child
and read its exit code, so instances that adopt one of them share its Popen."""


def default_state_dir() -> Path:
    """``$VLMHUB_STATE_DIR``, else ``~/.local/state/vlmhub``."""
    return Path(os.environ.get("VLMHUB_STATE_DIR") or "~/.local/state/vlmhub").expanduser()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _proc_start(pid: int) -> str | None:
    """The process start time in clock ticks since boot: tells a pid's reuse apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (Linux /proc; elsewhere kill(0) only)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _proc_stat(pid)
    return not (fields and fields[0] == "Z")


def _group_alive(pgid: int) -> bool:
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
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._:-" else "_" for c in name)
    return cleaned.lstrip(".") or "_"


class ProcessRuntime(Runtime):
    """Engines as local process groups started from ``rc.process_argv + argv``."""

    kind: ClassVar[str] = "process"

    def __init__(self, rc: RuntimeConfig, state_dir: Path | None = None) -> None:
        self.rc = rc
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()

    # ------------------------------------------------------------------ paths and records
    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{_safe_name(name)}.log"

    def state_path(self, name: str) -> Path:
        return self.state_dir / "process" / f"{_safe_name(name)}.json"

    def engine_bind(self, port: int) -> tuple[str, int]:
        """The engine listens on the host's loopback, on the host port itself."""
        return "127.0.0.1", port

    def _read_state(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None

    def _write_state(self, name: str, data: Mapping[str, Any]) -> None:
        path = self.state_path(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)

    def _record_live(self, data: Mapping[str, Any]) -> bool:
        """Whether the recorded process still runs and is the one recorded (not a reused pid)."""
        pid = int(data["pid"])
        child = _CHILDREN.get(pid)
        if child is not None:
            return child.poll() is None
        if not _alive(pid):
            return False
        recorded, now = data.get("proc_start"), _proc_start(pid)
        return recorded is None or now is None or recorded == now

    def _handle(self, data: Mapping[str, Any]) -> EngineHandle:
        return EngineHandle(
            name=str(data["name"]),
            runtime=self.kind,
            ident=str(data["pid"]),
            port=int(data.get("port", 0)),
            spec_hash=str(data.get("spec_hash", "")),
            started_at=float(data.get("started_at", 0.0)),
            host="127.0.0.1",
            health_path=str(data.get("health_path", "/health")),
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self, req: LaunchRequest) -> EngineHandle:
        """Spawn the engine (own session and process group) and return at once.

        Raises :class:`PortInUse` when ``req.port`` is taken on 127.0.0.1,
        :class:`RuntimeUnavailable` when the command cannot be run, and
        :class:`EngineStartError` when this model already runs from this state dir.
        """
        argv = [*self.rc.process_argv, *req.argv]
        old = self._read_state(self.state_path(req.name))
        if old is not None and self._record_live(old):
            raise EngineStartError(
                req.name,
                f"{req.name} already runs as process {old['pid']} on port {old.get('port')}. "
                f"Fix: `vlmhub stop {req.name}` first, or use the running engine.",
                [],
                "already_running",
            )
        if not port_is_free(req.port, "127.0.0.1"):
            raise PortInUse(
                f"port {req.port} on 127.0.0.1 is already in use (another engine or program). "
                "Fix: choose another port (--port), or leave it out and vlmhub picks a free "
                "one from runtime.port_range."
            )
        program = argv[0]
        if shutil.which(program) is None and not Path(program).is_file():
            raise RuntimeUnavailable(
                f"cannot run {program!r}: not found on PATH. Fix: install vLLM in this "
                "environment (`pip install vllm`), or set runtime.process_argv in models.yaml "
                "to the engine command (e.g. [\"{python}\", \"-m\", "
                "\"vllm.entrypoints.openai.api_server\"]), or use runtime.kind: docker."
            )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **req.env}
        log = self.log_path(req.name)
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if log.exists():
            os.replace(log, log.with_suffix(".log.1"))
        with open(log, "wb") as out:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True, close_fds=True,
                )
            except OSError as exc:
                raise RuntimeUnavailable(
                    f"cannot run {program!r}: {exc.strerror or exc}. Fix: check "
                    "runtime.process_argv in models.yaml (the program must exist and be "
                    "executable)."
                ) from None
        _CHILDREN[proc.pid] = proc
        data = {
            "name": req.name,
            "pid": proc.pid,
            "port": req.port,
            "spec_hash": req.spec_hash,
            "started_at": time.time(),
            "argv": redact(argv),
            "health_path": req.health_path,
            "proc_start": _proc_start(proc.pid),
            "log": str(log),
        }
        self._write_state(req.name, data)
        return self._handle(data)

    async def status(self, handle: EngineHandle) -> EngineStatus:
        """running; exited (with the exit code when this process spawned it; a negative code
        is the signal that ended it); or missing once stopped and its record removed."""
        pid = int(handle.ident)
        child = _CHILDREN.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return EngineStatus("running", detail=f"pid {pid}")
            return EngineStatus("exited", code, f"pid {pid} exited with code {code}")
        data = self._read_state(self.state_path(handle.name))
        if data is not None and int(data["pid"]) == pid and self._record_live(data):
            return EngineStatus("running", detail=f"pid {pid}")
        if data is None and not _alive(pid):
            return EngineStatus("missing", detail=f"pid {pid} is gone and its record removed")
        return EngineStatus("exited", None, f"pid {pid} exited (exit code unknown: it was "
                            "started by another vlmhub process)")

    async def logs(self, handle: EngineHandle, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of the engine's log file (all with None)."""
        return self.read_log(handle.name, tail)

    def read_log(self, name: str, tail: int | None = 200) -> list[str]:
        """Lines of ``name``'s log file, even after the engine stopped; [] without one."""
        try:
            raw = self.log_path(name).read_bytes()
        except OSError:
            return []
        lines = [ln.rstrip("\r") for ln in raw.decode("utf-8", "replace").split("\n")]
        lines = [ln for ln in lines if ln.strip()]
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    async def follow(self, handle: EngineHandle, poll_s: float = 0.1) -> AsyncIterator[str]:
        """Every line of the log file from the start, then new lines (polled every ``poll_s``)
        until the engine has exited and the file is read to its end."""
        path = self.log_path(handle.name)
        buf = b""
        with contextlib.ExitStack() as stack:
            fh = None
            while True:
                if fh is None:
                    try:
                        fh = stack.enter_context(open(path, "rb"))
                    except OSError:
                        fh = None
                chunk = fh.read(65536) if fh is not None else b""
                if chunk:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        yield line.decode("utf-8", "replace").rstrip("\r")
                    continue
                if (await self.status(handle)).state != "running":
                    rest = fh.read() if fh is not None else b""
                    buf += rest
                    if rest:
                        continue
                    break
                await asyncio.sleep(poll_s)
        if buf:
            yield buf.decode("utf-8", "replace").rstrip("\r")

    async def stop(self, handle: EngineHandle, timeout_s: float = 20.0) -> None:
        """SIGTERM the engine's process group, SIGKILL it after ``timeout_s``, then drop its
        record. Waits with ``asyncio.sleep``; an engine already gone is fine."""
        pid = int(handle.ident)
        data = self._read_state(self.state_path(handle.name))
        own_record = data is not None and int(data["pid"]) == pid
        # Only signal a process that is provably ours: a spawned child, or the pid recorded
        # for this engine with the same start time (not a reused pid).
        # A dead leader whose group still exists left workers behind (a pid in use as a
        # process-group id is never reused), and they are ours too.
        ours = pid in _CHILDREN or (own_record and data is not None and (
            self._record_live(data) or (not _alive(pid) and _group_alive(pid))))
        if ours:
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self._pid_running(pid):
                await asyncio.sleep(0.05)
            while time.monotonic() < deadline and _group_alive(pid):
                await asyncio.sleep(0.05)  # workers the leader left behind
            if self._pid_running(pid) or _group_alive(pid):
                _signal_group(pid, signal.SIGKILL)
                end = time.monotonic() + 5.0
                while time.monotonic() < end and self._pid_running(pid):
                    await asyncio.sleep(0.05)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        if own_record:
            with contextlib.suppress(FileNotFoundError):
                self.state_path(handle.name).unlink()

    def _pid_running(self, pid: int) -> bool:
        child = _CHILDREN.get(pid)
        if child is not None:
            return child.poll() is None
        return _alive(pid)

    async def adopt(self) -> list[EngineHandle]:
        """Engines recorded in the state dir whose process still runs."""
        return [self._handle(data) for data in self._records() if self._record_live(data)]

    def _records(self) -> list[dict[str, Any]]:
        folder = self.state_dir / "process"
        if not folder.is_dir():
            return []
        found = (self._read_state(p) for p in sorted(folder.glob("*.json")))
        return [d for d in found if d is not None and "name" in d]

    async def find(self, model: str) -> EngineHandle | None:
        """The recorded engine of ``model``, running or exited, or None."""
        data = self._read_state(self.state_path(model))
        return self._handle(data) if data is not None and "name" in data else None

    async def reconcile(self, wanted: Mapping[str, str], timeout_s: float = 20.0) -> Reconciled:
        """See :func:`~vlmhub.runtimes.reconcile.reconcile_engines`."""
        return await reconcile_engines(self, wanted, timeout_s=timeout_s)
