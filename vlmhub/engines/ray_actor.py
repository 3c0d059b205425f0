"""The Ray actor that runs ONE engine on its node (see :mod:`vlmhub.engines.ray`).

It runs inside a Ray worker process on the node Ray placed it on (vlmhub must be installed
there). :meth:`EngineActor.launch` spawns the engine command (vLLM, or the stand-in) as a child
in its own process group, with a minimal environment built from the NODE's environment
(:func:`vlmhub.engines.process.engine_env`: secrets such as HF_TOKEN are read on the node,
never sent from the router), and collects its output lines in memory. The child gets
``PR_SET_PDEATHSIG``: when the actor's worker dies (the actor is killed, its node goes away),
the engine dies with it instead of running on unmanaged.

Every method returns at once (no waits inside the actor, but for up to 1 s in ``lines`` after
the engine exited, while its last output is read): the runtime polls from the router's side.
The actor is not threaded (one method at a time), which keeps the child's parent thread alive
for as long as the actor lives (the death signal follows the thread that forked).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any

from vlmhub.engines.base import LaunchRequest
from vlmhub.sizing.flags import redact

MAX_LINES = 20000
"""Output lines kept per engine (older ones are dropped; indexes stay absolute)."""
NODE_HOST = "node"
"""``runtime.engine_host: node``: the engine binds its node's IP (a multi-machine cluster)."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class EngineActor:
    """One engine process on this node. Created by :class:`~vlmhub.engines.ray.RayRuntime`
    with ``ray.remote``; ``meta`` describes the engine for adoption (name, port, spec hash,
    start time, owner, node, host, health path)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta_ = dict(meta)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines_: list[str] = []
        self.dropped = 0
        self.lock = threading.Lock()
        self.stopping = False
        self.eof = threading.Event()
        """Set when the engine's output pipe closed (every line is in ``lines_``)."""

    def launch(self, req: LaunchRequest, argv: list[str]) -> dict[str, Any]:
        """Spawn ``argv`` (with ``--host node`` replaced by this node's IP); return the meta
        with the node's IP and the pid. Raises OSError when the program cannot run."""
        from vlmhub.engines.process import engine_env

        ip = node_ip()
        argv = [ip if a == NODE_HOST and i and argv[i - 1] == "--host" else a
                for i, a in enumerate(argv)]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=engine_env(req), start_new_session=True, close_fds=True,
            preexec_fn=_die_with_parent,  # the actor runs its calls on one thread
        )
        threading.Thread(target=self._pump, daemon=True).start()
        host = ip if self.meta_.get("host") == NODE_HOST else self.meta_.get("host", "127.0.0.1")
        self.meta_.update(pid=self.proc.pid, node_ip=ip, host=host, argv=redact(argv))
        return dict(self.meta_)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            self._read(self.proc.stdout)
        finally:
            self.eof.set()

    def _read(self, stdout: Any) -> None:
        for raw in stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self.lock:
                self.lines_.append(line)
                if len(self.lines_) > MAX_LINES:
                    cut = len(self.lines_) - MAX_LINES
                    del self.lines_[:cut]
                    self.dropped += cut

    def meta(self) -> dict[str, Any]:
        return {**self.meta_, "exit_code": self.poll(), "stopping": self.stopping}

    def set_owner(self, owner: str) -> None:
        self.meta_["owner"] = owner

    def poll(self) -> int | None:
        """The engine's exit code (negative: the signal), or None while it runs."""
        return None if self.proc is None else self.proc.poll()

    def lines(self, start: int) -> tuple[list[str], int, int | None]:
        """Output lines from absolute index ``start``, the next index, and the exit code once
        the engine has exited and its output is read to the end (the pipe closed, or a second
        passed: a leftover child may hold it open); else None."""
        code = self.poll()
        if code is not None:  # let the pump read the last lines (blocks up to 1 s)
            self.eof.wait(1.0)
        with self.lock:
            begin = max(start - self.dropped, 0)
            out = self.lines_[begin:]
            return out, self.dropped + begin + len(out), code

    def signal(self, sig: int) -> int | None:
        """Send ``sig`` to the engine's process group (SIGTERM to stop, SIGKILL at the end);
        returns the exit code if it has already ended."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
        if self.proc is not None and sig == signal.SIGKILL:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2.0)
        return self.poll()


def node_ip() -> str:
    """This node's IP as Ray knows it (falls back to the host name's address)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    except Exception:
        return socket.gethostbyname(socket.gethostname())


def meta_for(req: LaunchRequest, *, owner: str, host: str, started_at: float | None = None
             ) -> dict[str, Any]:
    """What an actor records about its engine (no env values: they may hold secrets)."""
    return {
        "name": req.name, "port": req.port, "spec_hash": req.spec_hash,
        "health_path": req.health_path, "node": req.node, "owner": owner,
        "host": host, "started_at": started_at if started_at is not None else time.time(),
    }
