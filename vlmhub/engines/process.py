"""Process runtime: each engine is a local process (``vllm serve`` or a configured command).

The engine runs in its own session and process group, so Ctrl-C in the terminal does not reach
it and :meth:`ProcessRuntime.stop` can signal every process it spawned (vLLM's EngineCore
workers too). Its stdout and stderr go to ``<state_dir>/logs/<name>.log`` and a JSON state
file ``<state_dir>/process/<name>.json`` records it, so that ``vlmhub logs``/``ps``/``stop``
and a restarted router find it from another process.

Each record names its engine (pid, start time) and its owner (the vlmhub process that started
or adopted it), and every operation on a record checks that it is still the same engine: a stop
of an old engine never touches the record (or process) of a newer engine of the same model.
Records are read and rewritten under a short ``flock`` on ``<state_dir>/process/.lock``.

The engine does NOT inherit the router's environment (API keys and other secrets stay out): it
gets a minimal base (:func:`engine_env`: PATH, HOME, locale, temp dir and what vLLM, CUDA, Hugging
Face and the BLAS libraries read), the ``pass_env`` names (HF_TOKEN) and the request's own
``env``. Secret values are never written to the state file or printed (argv is redacted).

Nothing here blocks for long: spawning, signalling and reading small local files happen in the
event-loop thread; waits are ``asyncio.sleep`` polls. The one slow read, a process group's
states (a scan of every process in /proc, tens of milliseconds with thousands of processes),
runs in a worker thread during a stop, so a stop never stalls the router's data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from vlmhub.config.schema import RuntimeConfig
from vlmhub.engines import keys
from vlmhub.engines.adopt import Reconciled, reconcile_engines
from vlmhub.engines.base import EngineHandle, EngineStatus, LaunchRequest, Runtime
from vlmhub.engines.devices import Devices
from vlmhub.engines.owner import this_owner
from vlmhub.engines.ports import port_is_free
from vlmhub.engines.procfs import (
    FROZEN_STATES,
    STUCK_STATES,
    alive,
    group_live_states,
    proc_start,
    proc_stat,
    same_process,
    signal_group,
)
from vlmhub.errors import EngineStartError, PortInUse, RuntimeUnavailable
from vlmhub.paths import default_state_dir
from vlmhub.sizing.flags import redact

STUCK_AFTER_S = 5.0
"""A stopping engine whose processes stay in uninterruptible sleep (D) this long is killed
without waiting for the rest of the SIGTERM grace."""

# The engine's environment is NOT the router's: it gets only these variables (when set), those
# starting with one of BASE_ENV_PREFIXES (what vLLM, PyTorch, CUDA/ROCm, Hugging Face and the
# BLAS libraries read), the runtime.pass_env names and the env of models.yaml. Anything else
# (VLMHUB_API_KEYS, cloud credentials, other secrets) stays out.
BASE_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TMP", "TEMP",
    "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD", "CC", "CXX",
    "XDG_CACHE_HOME", "HF_HOME", "HF_ENDPOINT", "TORCH_HOME",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy",
})  # fmt: skip
BASE_ENV_PREFIXES = (
    "LC_", "CUDA_", "NVIDIA_", "VLLM_", "HF_HUB_", "HF_XET_", "TRANSFORMERS_", "TOKENIZERS_",
    "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "TRITON_", "NCCL_", "OMP_", "MKL_", "KMP_",
    "OPENBLAS_", "HIP_", "ROCM_", "ROCR_",
)  # fmt: skip


@dataclass(frozen=True)
class _Child:
    popen: subprocess.Popen[bytes]
    started_at: float


_CHILDREN: dict[int, _Child] = {}
"""Engines spawned by THIS process (any runtime instance), by pid: only the parent can reap a
child and read its exit code, so instances that adopt one of them share its Popen. The start
time tells a reused pid apart."""


def engine_env(req: LaunchRequest, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The engine's whole environment: the base variables of ``environ`` (default: this
    process's; see :data:`BASE_ENV` and :data:`BASE_ENV_PREFIXES`), then the ``req.pass_env``
    names that are set, then ``req.env``."""
    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k in BASE_ENV or k.startswith(BASE_ENV_PREFIXES)}
    env.update({k: source[k] for k in req.pass_env if k in source})
    key = {keys.ENV: req.api_key} if req.api_key else {}
    return {**env, "PYTHONUNBUFFERED": "1", **req.env, **key}


def _child(pid: int, started_at: float) -> subprocess.Popen[bytes] | None:
    """The Popen of the engine spawned here as ``pid`` at ``started_at``, else None."""
    child = _CHILDREN.get(pid)
    return child.popen if child is not None and child.started_at == started_at else None


def _same_engine(data: Mapping[str, Any], handle: EngineHandle) -> bool:
    """Whether a state record describes ``handle``'s engine (not a newer one of the model)."""
    return (int(data["pid"]) == int(handle.ident)
            and float(data.get("started_at", 0.0)) == handle.started_at)


def _running_detail(pid: int) -> str:
    fields = proc_stat(pid)
    if fields and fields[0] in FROZEN_STATES:
        return f"pid {pid} is frozen (SIGSTOP or a debugger): it answers nothing"
    return f"pid {pid}"


async def _group(pgid: int) -> frozenset[str] | None:
    """:func:`group_live_states` of ``pgid``, read in a worker thread: with thousands of
    processes on the machine the /proc scan takes tens of milliseconds, and the event loop
    (the router's data path) must not stall for it."""
    return await asyncio.to_thread(group_live_states, pgid)


async def _terminate(pgid: int, child: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM the group, then SIGKILL it after ``grace_s``, or as soon as one of its
    processes is frozen (T) or stuck in D for :data:`STUCK_AFTER_S`. Polls with
    ``asyncio.sleep``; the group's /proc states are read off the event loop (:func:`_group`),
    once per poll."""

    def leader_running() -> bool:
        return child.poll() is None if child is not None else alive(pgid)

    async def running() -> frozenset[str] | None:
        """The group's live states; None once the leader and the whole group are gone."""
        states = await _group(pgid)
        return states if states is not None or not leader_running() else frozenset()

    states = await running()
    if grace_s > 0 and states is not None and not FROZEN_STATES & states:
        signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        stuck_since: float | None = None
        while time.monotonic() < deadline and (states := await running()) is not None:
            if states & FROZEN_STATES:
                break
            if states & STUCK_STATES:
                stuck_since = stuck_since or time.monotonic()
                if time.monotonic() - stuck_since >= STUCK_AFTER_S:
                    break
            else:
                stuck_since = None
            await asyncio.sleep(0.05)
    if states is not None and await running() is not None:
        signal_group(pgid, signal.SIGKILL)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and await running() is not None:
            await asyncio.sleep(0.05)


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._:-" else "_" for c in name)
    return cleaned.lstrip(".") or "_"


class ProcessRuntime(Runtime):
    """Engines as local process groups started from ``rc.process_argv + argv``."""

    kind: ClassVar[str] = "process"

    def __init__(self, rc: RuntimeConfig, state_dir: Path | None = None,
                 devices: Devices | None = None) -> None:
        self.rc = rc
        self.state_dir = Path(state_dir) if state_dir is not None else default_state_dir()
        self.devices = devices or Devices()
        """This machine's cards (vlmhub.engines.devices): with several, each is a node."""

    # ------------------------------------------------------------------ paths and records
    def log_path(self, name: str) -> Path:
        return self.state_dir / "logs" / f"{_safe_name(name)}.log"

    def state_path(self, name: str) -> Path:
        return self.state_dir / "process" / f"{_safe_name(name)}.json"

    def engine_bind(self, port: int) -> tuple[str, int]:
        """The engine listens on the host's loopback, on the host port itself."""
        return "127.0.0.1", port

    @contextlib.contextmanager
    def _records_locked(self) -> Iterator[None]:
        """Hold the state dir's record lock (``flock``; every holder keeps it for a read and
        a write, or one spawn), so that no other vlmhub process rewrites a record meanwhile."""
        folder = self.state_dir / "process"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

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

    def _own_record(self, handle: EngineHandle) -> dict[str, Any] | None:
        """``handle``'s record, or None when it is gone or now belongs to a newer engine."""
        data = self._read_state(self.state_path(handle.name))
        return data if data is not None and _same_engine(data, handle) else None

    def _update_record(self, handle: EngineHandle, **changes: Any) -> None:
        """Rewrite ``handle``'s record with ``changes``, only if it is still that engine's."""
        with self._records_locked():
            data = self._own_record(handle)
            if data is not None:
                self._write_state(handle.name, {**data, **changes})

    def _drop_record(self, handle: EngineHandle) -> None:
        """Remove ``handle``'s record, only if it is still that engine's."""
        with self._records_locked():
            if self._own_record(handle) is not None:
                with contextlib.suppress(FileNotFoundError):
                    self.state_path(handle.name).unlink()

    def _record_live(self, data: Mapping[str, Any]) -> bool:
        """Whether the recorded process still runs and is the one recorded (not a reused pid)."""
        pid = int(data["pid"])
        child = _child(pid, float(data.get("started_at", 0.0)))
        if child is not None:
            return child.poll() is None
        return same_process(pid, data.get("proc_start"))

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
            owner=str(data.get("owner", "")),
            node=str(data.get("node", "")),
            api_key=keys.read_key(self.state_dir, str(data["name"])),
        )

    async def nodes(self) -> dict[str, float] | None:
        """This machine's cards as nodes (``gpu0``, ...) with two or more; else None."""
        return self.devices.nodes()

    # ------------------------------------------------------------------ lifecycle
    async def start(self, req: LaunchRequest) -> EngineHandle:
        """Spawn the engine (own session and process group) and return at once.

        Raises :class:`PortInUse` when ``req.port`` is taken on 127.0.0.1,
        :class:`RuntimeUnavailable` when the command cannot be run, and
        :class:`EngineStartError` when this model already runs from this state dir.
        """
        argv = [*self.rc.process_argv, *req.argv]
        program = argv[0]
        with self._records_locked():
            old = self._read_state(self.state_path(req.name))
            if old is not None and self._record_live(old):
                raise EngineStartError(
                    req.name,
                    f"{req.name} already runs as process {old['pid']} on port "
                    f"{old.get('port')}. Fix: `vlmhub stop {req.name}` first, or use the "
                    "running engine.",
                    [],
                    "already_running",
                )
            if not port_is_free(req.port, "127.0.0.1"):
                raise PortInUse(
                    f"port {req.port} on 127.0.0.1 is already in use (another engine or "
                    "program). Fix: choose another port (--port), or leave it out and vlmhub "
                    "picks a free one from runtime.port_range."
                )
            if shutil.which(program) is None and not Path(program).is_file():
                raise RuntimeUnavailable(
                    f"cannot run {program!r}: not found on PATH. Fix: install vLLM in this "
                    "environment (`pip install vllm`), or set runtime.process_argv in "
                    "models.yaml to the engine command (e.g. [\"{python}\", \"-m\", "
                    "\"vllm.entrypoints.openai.api_server\"]), or use runtime.kind: docker."
                )
            env = {**engine_env(req), **self.devices.env(req.node)}  # its card(s) only
            proc, log = self._spawn(req.name, argv, env)
            started_at = time.time()
            _CHILDREN[proc.pid] = _Child(proc, started_at)
            data = {
                "name": req.name,
                "pid": proc.pid,
                "port": req.port,
                "spec_hash": req.spec_hash,
                "started_at": started_at,
                "argv": redact(argv),
                "health_path": req.health_path,
                "proc_start": proc_start(proc.pid),
                "owner": this_owner(),
                "log": str(log),
                "node": req.node,
            }
            self._write_state(req.name, data)
        return self._handle(data)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]
               ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``argv`` in its own session, its output in a fresh log file (the previous
        one is kept as ``.log.1``)."""
        log = self.log_path(name)
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
                    f"cannot run {argv[0]!r}: {exc.strerror or exc}. Fix: check "
                    "runtime.process_argv in models.yaml (the program must exist and be "
                    "executable)."
                ) from None
        return proc, log

    async def status(self, handle: EngineHandle) -> EngineStatus:
        """running (the detail says when it is frozen); exited (with the exit code when this
        process spawned it; a negative code is the signal that ended it); or missing once
        stopped and its record removed. ``stopped`` is True when a vlmhub stop (from any
        process) ended it."""
        pid = int(handle.ident)
        raw = self._read_state(self.state_path(handle.name))
        data = raw if raw is not None and _same_engine(raw, handle) else None
        stopping = data is not None and bool(data.get("stopping"))
        child = _child(pid, handle.started_at)
        if child is not None:
            code = child.poll()
            if code is None:
                return EngineStatus("running", detail=_running_detail(pid))
            # a record is removed only by a vlmhub stop (a newer engine's record says nothing)
            stopped = raw is None or stopping
            why = " (stopped by vlmhub)" if stopped else ""
            return EngineStatus("exited", code, f"pid {pid} exited with code {code}{why}",
                                stopped=stopped)
        if data is not None and self._record_live(data):
            return EngineStatus("running", detail=_running_detail(pid))
        if data is None and not alive(pid):
            return EngineStatus("missing", detail=f"pid {pid} is gone and its record removed",
                                stopped=True)
        return EngineStatus("exited", None, f"pid {pid} exited (exit code unknown: it was "
                            "started by another vlmhub process)", stopped=stopping)

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
        """SIGTERM the engine's process group, SIGKILL it after ``timeout_s`` (at once with
        ``timeout_s=0``, when a process of the group is frozen by SIGSTOP, or when one stays in
        uninterruptible sleep for :data:`STUCK_AFTER_S`), then drop its record. Waits with
        ``asyncio.sleep``; an engine already gone is fine. Touches only ``handle``'s engine:
        a newer engine of the same model (its process and its record) is left alone."""
        pid = int(handle.ident)
        data = self._own_record(handle)
        child = _child(pid, handle.started_at)
        # Only signal a process that is provably ours: a spawned child, or the pid recorded
        # for this engine with the same start time (not a reused pid).
        # A dead leader whose group still exists left workers behind (a pid in use as a
        # process-group id is never reused), and they are ours too.
        ours = child is not None or (data is not None and (
            self._record_live(data) or (not alive(pid) and await _group(pid) is not None)))
        if ours:
            if data is not None:  # tell the engine's parent (maybe another router) it was us
                self._update_record(handle, stopping={"by": this_owner(), "at": time.time()})
            await _terminate(pid, child, timeout_s)
        if child is not None:
            _CHILDREN.pop(pid, None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)
        self._drop_record(handle)

    async def claim(self, handle: EngineHandle) -> None:
        """Make this process the owner of ``handle``'s engine (after adopting it)."""
        self._update_record(handle, owner=this_owner())

    async def adopt(self) -> list[EngineHandle]:
        """Engines recorded in the state dir whose process still runs, whoever owns them."""
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
        """See :func:`~vlmhub.engines.adopt.reconcile_engines`."""
        return await reconcile_engines(self, wanted, timeout_s=timeout_s)
