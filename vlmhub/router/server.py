"""Run the router app under uvicorn, in this process and on this event loop.

The listening socket is bound before uvicorn starts (so a taken port is a clear
:class:`~vlmhub.errors.PortInUse`, with no race, and port 0 works). In the main thread the
first Ctrl-C / SIGTERM drains (new ``/v1`` requests get 503 while those in flight finish, up to
``drain_timeout_s``), then uvicorn stops; a second one stops at once. No signal is re-raised
after shutdown, so the caller's clean-up (stopping engines) runs undisturbed.

:func:`run` is ``asyncio.run`` on uvloop's event loop when uvloop is installed (about 10 % more
router throughput, docs/benchmarks.md), else on asyncio's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette

from vlmhub.errors import PortInUse, VlmhubError
from vlmhub.router.app import drain, in_flight

log = logging.getLogger("vlmhub.router")
T = TypeVar("T")
ReadyCallback = Callable[[int], object]
"""Called once with the bound port when the router accepts requests."""
StopCallback = Callable[[int], object]
"""Called once with the number of requests in flight when a stop is requested."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's ``new_event_loop`` when uvloop can be imported, else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop of :func:`loop_factory`. Blocks until ``main`` ends."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening). Blocks only on bind()."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise VlmhubError(f"cannot listen on {host!r}: {exc.strerror}. Fix: pass --host with "
                          "an address of this machine (127.0.0.1 for local use only).") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(
                f"port {port} on {host} is already in use by another program. Fix: pass "
                f"--port N to use another port (or router.port in models.yaml), or stop the "
                f"program listening on {port} (`ss -ltnp 'sport = :{port}'` shows it)."
            ) from None
        raise VlmhubError(f"cannot listen on {host}:{port}: {exc.strerror}. Fix: pass --port "
                          "with a port above 1024, or --host with an address of this "
                          "machine.") from None
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with vlmhub's signal handling and a start-up callback."""

    def __init__(self, config: uvicorn.Config, owner: RouterServer) -> None:
        super().__init__(config)
        self.owner = owner

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self.owner.started()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self.owner.request_stop)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


class RouterServer:
    """One uvicorn server for one router app. Construct (binds), then ``await serve()``.

    ``serve`` blocks (asynchronously) until the server has stopped; :meth:`request_stop`
    (signals call it) drains then stops; :meth:`stop` is safe from any thread.
    """

    def __init__(
        self,
        app: Starlette,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        drain_timeout_s: float | None = None,
        grace_s: float = 5.0,
        log_level: str = "warning",
        on_ready: ReadyCallback | None = None,
        on_stop: StopCallback | None = None,
    ) -> None:
        self.app, self.host = app, host
        self.sock = bind_socket(host, port)
        self.port = int(self.sock.getsockname()[1])
        self.drain_timeout_s = drain_timeout_s
        self.on_ready, self.on_stop = on_ready, on_stop
        # log_config=None: uvicorn's own lines (an unhandled exception's traceback) go through
        # vlmhub's masked writer when vlmhub.logs.configure ran, not to a handler of uvicorn's.
        # access_log=False: vlmhub.access writes the one access line; uvicorn's own (a
        # LogRecord per request through the masking handler) doubled the log's cost.
        config = uvicorn.Config(app, host=host, port=self.port, lifespan="on",
                                log_level=log_level, log_config=None, loop="asyncio",
                                access_log=False,
                                timeout_graceful_shutdown=max(1, round(grace_s)))
        self.server = _Uvicorn(config, self)
        self._stopping = False
        self._drain_task: asyncio.Task[Any] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def started(self) -> None:
        """uvicorn is listening (called by its server on the event loop): tell ``on_ready``."""
        if self.on_ready is not None:
            self.on_ready(self.port)

    async def serve(self) -> None:
        """Serve until stopped. Raises :class:`VlmhubError` if start-up fails."""
        try:
            await self.server.serve(sockets=[self.sock])
        except SystemExit:  # uvicorn exits when the app's lifespan start-up fails
            raise VlmhubError("the router failed to start (see the messages above)") from None
        finally:
            self.sock.close()
            if self._drain_task is not None and not self._drain_task.done():
                self._drain_task.cancel()

    def request_stop(self) -> None:
        """First call: drain (if configured), then stop. Second call: stop now.

        Call on the server's event loop (signal handlers do).
        """
        if self._stopping:
            self.server.force_exit = self.server.should_exit = True
            return
        self._stopping = True
        if self.on_stop is not None:
            self.on_stop(in_flight(self.app) if hasattr(self.app.state, "router") else 0)
        if self.drain_timeout_s is None or not hasattr(self.app.state, "router"):
            self.server.should_exit = True
            return
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            drained = await drain(self.app, self.drain_timeout_s or 0.0)
            if not drained:
                log.warning("%d request(s) still in flight after %.0f s; stopping anyway",
                            in_flight(self.app), self.drain_timeout_s or 0.0)
        finally:
            self.server.should_exit = True

    def stop(self) -> None:
        """Stop without draining (thread-safe: uvicorn polls the flag every 0.1 s)."""
        self.server.should_exit = True


async def serve_router(
    app: Starlette,
    host: str,
    port: int,
    *,
    on_ready: ReadyCallback | None = None,
    on_stop: StopCallback | None = None,
    drain_timeout_s: float | None = None,
) -> None:
    """Serve ``app`` on ``host:port`` until Ctrl-C / SIGTERM (draining first when
    ``drain_timeout_s`` is given). Raises :class:`PortInUse` at once if the port is taken."""
    server = RouterServer(app, host, port, drain_timeout_s=drain_timeout_s, on_ready=on_ready,
                          on_stop=on_stop)
    await server.serve()
