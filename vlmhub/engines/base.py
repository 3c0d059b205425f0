"""The runtime seam: how the supervisor starts, watches and stops one engine.

A :class:`Runtime` is to the supervisor what a transport is to httpx: a small interface with
interchangeable implementations (Docker containers, local processes). The supervisor never
knows which one it drives. Every method is a coroutine; implementations that wrap blocking
libraries (the Docker SDK) run them in worker threads, so calls for different engines may run
concurrently, while calls for ONE engine are serialised by the supervisor.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import httpx

from vlmhub.engine_log import LogParser, format_failure
from vlmhub.errors import EngineStartError, EngineStartTimeout

EngineState = Literal["running", "exited", "missing"]
PhaseCallback = Callable[[str, str], None]
"""Called with (phase, log line) as the engine moves through its start-up phases."""


@dataclass(frozen=True)
class LaunchRequest:
    """Everything a runtime needs to start one engine. Secrets are never stored here:
    ``pass_env`` names host variables (HF_TOKEN) whose values the runtime copies at start."""

    name: str
    spec_hash: str
    image: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    pass_env: list[str] = field(default_factory=list)
    health_path: str = "/health"
    startup_timeout_s: float = 900.0
    node: str = ""
    """The GPU node to start it on (a Ray node's name; ``""``: the only GPU, or any node)."""
    vram_gib: float = 0.0
    """The GPU memory it is planned to hold (the Ray runtime reserves it as ``vram_gib``)."""
    api_key: str | None = field(default=None, repr=False)
    """The engine's own key (:mod:`vlmhub.engines.keys`): the runtime passes it in the
    engine's environment only (``VLLM_API_KEY``), never in argv, records or labels."""


@dataclass(frozen=True)
class EngineHandle:
    """A started engine: enough to reach it, watch it and stop it, even after a restart."""

    name: str
    runtime: str
    ident: str
    port: int
    spec_hash: str
    started_at: float
    host: str = "127.0.0.1"
    health_path: str = "/health"
    owner: str = ""
    """The vlmhub process that started or adopted it (``host:pid:start``, see
    :mod:`vlmhub.engines.owner`); empty when unknown. Not part of the engine's identity."""
    node: str = ""
    """The GPU node it runs on (a Ray node's name); ``""`` with one GPU."""
    api_key: str | None = field(default=None, repr=False, compare=False)
    """The key its API wants (``Authorization: Bearer``); None for an engine started without
    one. Read from the state dir, so an adopted engine has it too."""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class EngineStatus:
    """``state``: running; exited (``exit_code`` when known: negative is the signal that ended
    it); missing (removed). ``stopped`` is True when the engine ended because a vlmhub process
    stopped it on request (``vlmhub stop``, a router's stop or reconcile): then an exit, even
    with code 0, or a missing engine is not a crash."""

    state: EngineState
    exit_code: int | None = None
    detail: str = ""
    stopped: bool = False


class Runtime(abc.ABC):
    """Start, watch and stop engines of one kind."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def engine_bind(self, port: int) -> tuple[str, int]:
        """The (host, port) the engine must listen on inside its sandbox for host ``port``."""

    @abc.abstractmethod
    async def start(self, req: LaunchRequest) -> EngineHandle:
        """Launch the engine and return at once; it is not ready yet (see :func:`wait_ready`)."""

    @abc.abstractmethod
    async def status(self, handle: EngineHandle) -> EngineStatus:
        """Whether the engine process/container still runs."""

    @abc.abstractmethod
    async def logs(self, handle: EngineHandle, tail: int | None = 200) -> list[str]:
        """The last ``tail`` log lines (all with None)."""

    @abc.abstractmethod
    def follow(self, handle: EngineHandle) -> AsyncIterator[str]:
        """Every log line from the start, then new ones as they come, until the engine exits."""

    @abc.abstractmethod
    async def stop(self, handle: EngineHandle, timeout_s: float = 20.0) -> None:
        """Ask the engine to stop, kill it after ``timeout_s`` (the SIGTERM grace), then remove
        it. Idempotent. Touches only the engine of ``handle``: never a newer engine of the same
        model. ``timeout_s=0`` kills at once (a hung engine); an engine that cannot answer
        (frozen by SIGSTOP) is killed at once whatever the grace."""

    @abc.abstractmethod
    async def adopt(self) -> list[EngineHandle]:
        """Every running engine of this runtime, started by any vlmhub process (each handle
        names its ``owner``; :func:`~vlmhub.engines.adopt.reconcile_engines` adopts only
        those whose owner is gone)."""

    async def nodes(self) -> dict[str, float] | None:
        """The live GPU nodes and each one's GPU memory (GiB), for a runtime that spans
        several (Ray); None (the default): one GPU, the one of ``gpu:`` in models.yaml."""
        return None

    async def claim(self, handle: EngineHandle) -> None:  # noqa: B027 - optional hook
        """Record this process as the owner of an adopted engine. A no-op by default (Docker
        labels cannot change)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release clients and threads. Engines keep running."""


FAST_POLL_S = 0.05
"""How often :func:`wait_ready` probes an engine early in its start, and once its log says its
server is up: a stand-in or a small cached model is ready in a second or two, and a 250 ms poll
was most of vlmhub's own cold-start cost (docs/benchmarks.md)."""
FAST_POLL_FOR_S = 3.0
"""How long after the spawn :func:`wait_ready` polls every :data:`FAST_POLL_S` (then every
``poll_s``, woken early by the "server up" log line)."""


async def probe(handle: EngineHandle, client: httpx.AsyncClient) -> bool:
    """True when the engine answers 200 on its health path. Never raises."""
    try:
        r = await client.get(handle.base_url + handle.health_path, timeout=2.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


LOG_CATCH_UP_S = 1.0
"""How long a healthy engine's log may lag behind its health answer before wait_ready returns
anyway (the log carries the memory facts the budgets record)."""


async def wait_ready(
    runtime: Runtime,
    handle: EngineHandle,
    *,
    timeout_s: float,
    on_phase: PhaseCallback | None = None,
    poll_s: float = 0.25,
    parser: LogParser | None = None,
) -> LogParser:
    """Block (asynchronously) until the engine is healthy; return the parsed start-up log.

    Follows the log to report phases, polls the health path (vLLM refuses connections while it
    loads), and raises :class:`EngineStartError` with the parsed vLLM reason if the engine
    exits first, or :class:`EngineStartTimeout` after ``timeout_s``. ``parser.facts`` holds
    the memory vLLM reported (see :data:`vlmhub.engine_log.MEMORY_FACTS`); pass your own
    ``parser`` to read them after a failed start too (for :func:`vlmhub.budgets.observe_start`).

    It polls every :data:`FAST_POLL_S` for the first :data:`FAST_POLL_FOR_S`, then every
    ``poll_s``; the log line that says the server is up wakes it at once.
    """
    parser = parser if parser is not None else LogParser()

    serving = asyncio.Event()  # the engine logged that its HTTP server is up

    async def pump() -> None:
        async for line in runtime.follow(handle):
            for event in parser.feed(line):
                phase = getattr(event, "phase", None)
                if phase == "ready":
                    serving.set()
                if phase is not None and on_phase is not None:
                    on_phase(str(phase), line)

    pump_task = asyncio.create_task(pump())
    deadline = time.monotonic() + timeout_s
    fast_until = time.monotonic() + FAST_POLL_FOR_S
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if await probe(handle, client):
                    if not serving.is_set():  # let the log pump catch up: its memory facts
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(serving.wait(), LOG_CATCH_UP_S)
                    if on_phase is not None:
                        on_phase("ready", "health check passed")
                    return parser
                st = await runtime.status(handle)
                if st.state != "running":
                    await asyncio.sleep(0.2)  # let the log pump catch the last lines
                    tail = await runtime.logs(handle, tail=40)
                    raise _start_error(handle, tail, st)
                if time.monotonic() > deadline:
                    tail = await runtime.logs(handle, tail=40)
                    raise _timeout_error(handle, tail, timeout_s, parser.phase)
                if serving.is_set():  # logged as up: probe every FAST_POLL_S until it answers
                    await asyncio.sleep(FAST_POLL_S)
                else:  # the "server up" log line cuts the wait short
                    fast = time.monotonic() < fast_until
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(serving.wait(), FAST_POLL_S if fast else poll_s)
    finally:
        pump_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump_task


def _start_error(handle: EngineHandle, tail: list[str], st: EngineStatus) -> EngineStartError:
    from vlmhub.engine_log import diagnose

    known = diagnose(tail)
    code = f" (exit code {st.exit_code})" if st.exit_code is not None else ""
    message = f"{handle.name} exited before it was ready{code}.\n" + format_failure(known, tail)
    return EngineStartError(handle.name, message, tail, known.code if known else "engine_exited")


def _timeout_error(
    handle: EngineHandle, tail: list[str], timeout_s: float, phase: str | None
) -> EngineStartTimeout:
    """The engine still runs but is not healthy: say so (it did not exit), with the log."""
    from vlmhub.engine_log import clean_line, diagnose

    known = diagnose(tail)
    message = (
        f"{handle.name} did not become ready within {timeout_s:.0f} s "
        f"(last phase: {phase or 'none seen'}).\n"
    )
    if known is not None:
        message += format_failure(known, tail)
    else:
        lines = [c for c in (clean_line(t) for t in tail) if c.strip()][-15:]
        message += (
            "Fix: if the engine is only slow (the first start downloads the weights and "
            "compiles), raise startup_timeout_s for this model; otherwise read its log."
        )
        if lines:
            message += f"\nLast {len(lines)} log lines:\n" + "\n".join(f"  | {c}" for c in lines)
    return EngineStartTimeout(handle.name, message, tail, "timeout")
