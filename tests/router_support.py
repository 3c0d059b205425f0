"""Real test parts for the router: stub engine processes, a small supervisor over them, and a
router app served by a real uvicorn in a background thread."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
from aiohttp import web

from vlmhub.config.schema import Config, RouterConfig
from vlmhub.control.contract import AcquireError, Lease, ReplicaInfo, State
from vlmhub.engines.ports import free_port
from vlmhub.router.app import create_app
from vlmhub.router.metrics import RouterMetrics
from vlmhub.router.server import RouterServer

T = TypeVar("T")


class Backend(Protocol):
    name: str
    served: str
    api_key: str | None

    @property
    def base_url(self) -> str: ...


class StubEngine:
    """One ``python -m vlmhub.testing.stub_engine`` process on a free loopback port."""

    def __init__(self, name: str, served: str | None = None, *args: str,
                 api_key: str | None = None) -> None:
        self.name, self.served, self.api_key = name, served or name, api_key
        self.args = list(args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix=f"stub-{name}-", suffix=".log")[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> StubEngine:
        self.port = free_port()
        argv = [sys.executable, "-m", "vlmhub.testing.stub_engine", "--model", self.name,
                "--served-model-name", self.served, "--host", "127.0.0.1",
                "--port", str(self.port), "--stub-startup-delay", "0", *self.args]
        if self.api_key:
            argv += ["--api-key", self.api_key]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stub {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"stub {self.name} did not become healthy: {self.log.read_text()}")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(self.base_url + "/stub/stats", timeout=5.0).json()
        return result

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.unlink(missing_ok=True)


@dataclass
class TestSupervisor:
    """A small, real :class:`~vlmhub.replica.SupervisorLike` over already-running backends.

    Every model is "ready"; ``fail[name]`` makes acquire raise that error; ``acquire_delay``
    makes acquire wait (like a model loading). Counts leases and failure reports.
    """

    __test__ = False  # not a pytest test class

    backends: dict[str, Backend]
    aliases: dict[str, str] = field(default_factory=dict)
    fail: dict[str, AcquireError] = field(default_factory=dict)
    acquire_delay: dict[str, float] = field(default_factory=dict)
    acquired: int = 0
    released: int = 0
    double_releases: int = 0
    cancelled_acquires: int = 0
    in_flight: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    actions: list[tuple[str, str]] = field(default_factory=list)
    states: dict[str, State] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def resolve(self, name: str) -> str | None:
        return name if name in self.backends else self.aliases.get(name)

    def names(self) -> list[str]:
        return list(self.backends)

    def would_wait(self, name: str) -> bool:
        return name in self.acquire_delay

    async def acquire(self, name: str, priority: str | None = None) -> Lease:
        if name in self.fail:
            raise self.fail[name]
        if name in self.acquire_delay:
            try:
                await asyncio.sleep(self.acquire_delay[name])
            except asyncio.CancelledError:
                with self.lock:
                    self.cancelled_acquires += 1
                raise
        b = self.backends[name]
        with self.lock:
            self.acquired += 1
            self.in_flight[name] += 1
        return Lease(model=name, base_url=b.base_url, api_name=b.served, api_key=b.api_key)

    def release(self, lease: Lease) -> None:
        with self.lock:
            if lease.released:
                self.double_releases += 1
                return
            lease.released = True
            self.released += 1
            self.in_flight[lease.model] -= 1

    def report_failure(self, lease: Lease, reason: str) -> None:
        with self.lock:
            self.failures.append((lease.model, reason))

    def info(self, name: str) -> ReplicaInfo:
        b = self.backends[name]
        port = int(b.base_url.rsplit(":", 1)[1])
        return ReplicaInfo(
            name=name, state=self.states.get(name, "ready"), phase="ready", runtime="process",
            port=port, budget_gib=1.5, in_flight=self.in_flight[name], queued=0, pinned=False,
            external=False, last_used=None, last_load_s=0.1, last_error=None,
            aliases=tuple(a for a, n in self.aliases.items() if n == name), max_model_len=8192)

    def snapshot(self) -> list[ReplicaInfo]:
        return [self.info(n) for n in self.backends]

    async def load(self, name: str) -> ReplicaInfo:
        self.actions.append(("load", name))
        self.states[name] = "ready"
        return self.info(name)

    async def unload(self, name: str) -> ReplicaInfo:
        self.actions.append(("unload", name))
        self.states[name] = "stopped"
        return self.info(name)

    def settled(self, timeout_s: float = 5.0) -> bool:
        """Wait until every lease handed out was released."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.acquired == self.released:
                return True
            time.sleep(0.02)
        return False


def make_config(**router: Any) -> Config:
    return Config(router=RouterConfig(**router))


class RunningRouter:
    """``create_app`` served by a real uvicorn on a free 127.0.0.1 port, in its own thread."""

    def __init__(self, supervisor: TestSupervisor, config: Config) -> None:
        self.supervisor = supervisor
        self.metrics = RouterMetrics()
        self.app = create_app(supervisor, config, metrics=self.metrics)
        self._ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = RouterServer(self.app, "127.0.0.1", 0, on_ready=self._on_ready)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _on_ready(self, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        self._ready.set()

    def _run(self) -> None:
        asyncio.run(self.server.serve())

    def start(self) -> RunningRouter:
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("router did not start")
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        """Run a coroutine on the router's event loop and wait for its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(15)


@contextmanager
def running_router(supervisor: TestSupervisor, config: Config | None = None
                   ) -> Iterator[RunningRouter]:
    router = RunningRouter(supervisor, config or make_config()).start()
    try:
        yield router
    finally:
        router.stop()


@contextmanager
def engines(*specs: StubEngine) -> Iterator[dict[str, StubEngine]]:
    started: list[StubEngine] = []
    try:
        for spec in specs:
            started.append(spec.start())
        yield {e.name: e for e in started}
    finally:
        for e in started:
            e.stop()


def wait_for(predicate: Any, timeout_s: float = 5.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


@asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp ``app`` on a free loopback port in this event loop; yields its base
    URL (``http://127.0.0.1:PORT``) and cleans up on exit."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
