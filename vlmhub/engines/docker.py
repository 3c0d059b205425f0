"""Docker runtime: one container per engine, from the vllm/vllm-openai image (or a stand-in).

The Docker SDK is synchronous, so every call runs in a worker thread (``asyncio.to_thread``);
calls for different engines may run concurrently. :meth:`DockerRuntime.follow` reads the log
stream in a dedicated daemon thread that ends when the container exits or the reader stops.
Construction connects to the engine and blocks until it answers a ping (or fails).

Security: the engine port is published on 127.0.0.1 only; secret environment values
(``HF_TOKEN``) go into the container environment only, never into labels, handles or argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import docker
import docker.errors
import docker.types
import docker.utils
import requests.exceptions

from vlmhub.config.schema import RuntimeConfig
from vlmhub.engines import keys
from vlmhub.engines.adopt import Reconciled, reconcile_engines
from vlmhub.engines.base import EngineHandle, EngineStatus, LaunchRequest, Runtime
from vlmhub.engines.devices import Devices
from vlmhub.engines.owner import this_owner
from vlmhub.engines.procfs import FROZEN_STATES
from vlmhub.errors import EngineStartError, ImageUnavailable, PortInUse, RuntimeUnavailable
from vlmhub.paths import default_state_dir

PullProgress = Callable[[str, int | None, int | None], None]
"""Called as ``(layer id, bytes done, layer size)`` while an image is pulled; the sizes are
None for a layer that reports no byte counts ("Already exists", "Waiting")."""

CONTAINER_PORT = 8000
HF_MOUNT = "/root/.cache/huggingface"
VLLM_MOUNT = "/root/.cache/vllm"
LABEL_MANAGED = "vlmhub.managed"
LABEL_PREFIX = "vlmhub.prefix"
LABEL_MODEL = "vlmhub.model"
LABEL_HASH = "vlmhub.spec-hash"
LABEL_PORT = "vlmhub.port"
LABEL_HEALTH = "vlmhub.health-path"
LABEL_STARTED = "vlmhub.started-at"
LABEL_OWNER = "vlmhub.owner"
LABEL_NODE = "vlmhub.node"
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.-]")
_RUNNING = {"running", "restarting", "paused", "created"}
_PORT_BUSY = ("port is already allocated", "address already in use")
_NO_GPU = "could not select device driver"


def docker_host_text(rc: RuntimeConfig) -> str:
    """Where vlmhub looks for Docker, for messages."""
    if rc.docker_host:
        return f"runtime.docker_host={rc.docker_host}"
    env = os.environ.get("DOCKER_HOST")
    return f"DOCKER_HOST={env}" if env else "DOCKER_HOST unset (unix:///var/run/docker.sock)"


def _explain(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip() or type(exc).__name__


def _parse_time(text: str | None) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, ``Z``) as a Unix time; None when unset."""
    if not text or text.startswith("0001-"):
        return None
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", text)
    if m is None:
        return None
    frac = (m.group(2) or ".0")[:7]
    zone = m.group(3) or "Z"
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(m.group(1) + frac + zone).timestamp()


def device_requests(gpus: str | None, ids: list[int]) -> list[Any]:
    """The container's GPU request: the cards ``ids`` of its node (vlmhub.engines.devices)
    when it has some, else ``runtime.gpus`` (``all``, or a comma list of ids; None or empty:
    no GPU). Pure."""
    if ids:
        names = [str(i) for i in ids]
    elif not gpus:
        return []
    elif gpus.strip().lower() == "all":
        return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    else:
        names = [d.strip() for d in gpus.split(",") if d.strip()]
    return [docker.types.DeviceRequest(device_ids=names, capabilities=[["gpu"]])]


class DockerRuntime(Runtime):
    """Engines as Docker containers named ``<name_prefix>-<model>``, labelled for adoption.

    ``client`` may be given (tests, a shared connection); otherwise one is made from
    ``rc.docker_host`` or the environment (``DOCKER_HOST``) and pinged, which blocks briefly
    and raises :class:`RuntimeUnavailable` naming the address when nothing answers.
    """

    kind: ClassVar[str] = "docker"

    def __init__(self, rc: RuntimeConfig, client: Any | None = None,
                 devices: Devices | None = None) -> None:
        self.rc = rc
        self.client: Any = client if client is not None else self._connect(rc)
        self.devices = devices or Devices()
        """This machine's cards (vlmhub.engines.devices): with several, each is a node."""
        self.state_dir = default_state_dir()
        """Where the engines' keys live (``vlmhub route --state-dir`` sets it)."""

    @staticmethod
    def _connect(rc: RuntimeConfig) -> Any:
        try:
            if rc.docker_host:
                client = docker.DockerClient(base_url=rc.docker_host)
            else:
                client = docker.from_env()
            client.ping()
        except Exception as exc:  # the SDK raises DockerException, requests and OS errors
            raise RuntimeUnavailable(
                f"cannot reach the Docker engine ({docker_host_text(rc)}): {_explain(exc)}. "
                "Fix: start Docker (`sudo systemctl start docker`, or `dockerd &`), or point "
                "DOCKER_HOST / runtime.docker_host in models.yaml at a running engine, or use "
                "runtime.kind: process."
            ) from None
        return client

    # ------------------------------------------------------------------ naming and labels
    def container_name(self, model: str) -> str:
        """The container name for ``model`` (characters Docker rejects become ``_``)."""
        return _NAME_BAD.sub("_", f"{self.rc.name_prefix}-{model}")

    def engine_bind(self, port: int) -> tuple[str, int]:
        """Inside the container the engine listens on all interfaces of its own network
        namespace; only the host side is restricted (published on 127.0.0.1)."""
        return "0.0.0.0", CONTAINER_PORT

    def _handle(self, container: Any) -> EngineHandle:
        labels: dict[str, str] = container.labels or {}
        state = container.attrs.get("State", {})
        started = _parse_time(state.get("StartedAt"))
        if started is None:
            started = float(labels.get(LABEL_STARTED, "0") or 0)
        return EngineHandle(
            name=labels.get(LABEL_MODEL, container.name),
            runtime=self.kind,
            ident=container.id,
            port=int(labels.get(LABEL_PORT, "0") or 0),
            spec_hash=labels.get(LABEL_HASH, ""),
            started_at=started,
            host="127.0.0.1",
            health_path=labels.get(LABEL_HEALTH, "/health"),
            owner=labels.get(LABEL_OWNER, ""),
            node=labels.get(LABEL_NODE, ""),
            api_key=keys.read_key(self.state_dir, labels.get(LABEL_MODEL, container.name)),
        )

    async def nodes(self) -> dict[str, float] | None:
        """This machine's cards as nodes (``gpu0``, ...) with two or more; else None."""
        return self.devices.nodes()

    # ------------------------------------------------------------------ images
    async def ensure_image(self, image: str, progress: PullProgress | None = None) -> None:
        """Return at once if ``image`` is present; otherwise pull it, reporting per-layer
        bytes to ``progress`` (called from the pulling thread).

        The pull runs in a daemon thread, so cancelling this coroutine returns at once (the
        pull carries on in the background until it ends or the process exits)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(exc: BaseException | None) -> None:
            if future.done():
                return
            if exc is None:
                future.set_result(None)
            else:
                future.set_exception(exc)

        def run() -> None:
            error: BaseException | None = None
            try:
                self._ensure_image(image, progress)
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, error)

        threading.Thread(target=run, name=f"vlmhub-pull-{image}", daemon=True).start()
        await future

    def _ensure_image(self, image: str, progress: PullProgress | None) -> None:
        try:
            self.client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except docker.errors.APIError as exc:
            raise RuntimeUnavailable(f"Docker could not look up image {image}: "
                                     f"{_explain(exc)}") from None
        repo, tag = docker.utils.parse_repository_tag(image)
        reason: str | None = None
        report = _PullReporter(progress) if progress is not None else None
        try:
            for event in self.client.api.pull(repo, tag=tag or None, stream=True, decode=True):
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    reason = str(event.get("error"))
                    break
                if report is not None and event.get("id"):
                    report(event)
        except docker.errors.APIError as exc:
            reason = _explain(exc)
        except Exception as exc:  # a dropped connection mid-stream
            reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            try:
                self.client.images.get(image)
                return
            except docker.errors.ImageNotFound:
                reason = "the pull ended but the image is still missing"
        raise ImageUnavailable(
            f"image {image} is not present locally and the pull failed: {reason}. Fix: check "
            f"the network and the registry (and `docker login` for a private one), try "
            f"`docker pull {image}`, or build/load the image locally (for the stand-in engine: "
            "scripts/build-stub-image.sh)."
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self, req: LaunchRequest) -> EngineHandle:
        """Create and start the container (blocks a worker thread for the Docker calls only;
        the image must be present: see :meth:`ensure_image`). Raises
        :class:`RuntimeUnavailable` naming the address when Docker does not answer."""
        with self._reachable():
            return await asyncio.to_thread(self._start, req)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Turn a lost connection to Docker (dockerd stopped or restarting) into
        :class:`RuntimeUnavailable` with the address and the fix."""
        try:
            yield
        except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
            if isinstance(exc, docker.errors.APIError):
                raise
            raise RuntimeUnavailable(
                f"cannot reach the Docker engine ({docker_host_text(self.rc)}): "
                f"{_explain(exc)}. Fix: start Docker again (`sudo systemctl start docker`, or "
                "`dockerd &`); vlmhub starts the engine on the next request."
            ) from None

    def _container_kwargs(self, req: LaunchRequest) -> dict[str, Any]:
        env = dict(req.env)
        for key in req.pass_env:
            value = os.environ.get(key)
            if value is not None:
                env[key] = value
        if req.api_key:
            env[keys.ENV] = req.api_key  # the container's environment only: not argv, labels
        volumes: dict[str, dict[str, str]] = {}
        for host_dir, inner in ((self.rc.hf_cache, HF_MOUNT), (self.rc.vllm_cache, VLLM_MOUNT)):
            path = Path(host_dir).expanduser()
            path.mkdir(parents=True, exist_ok=True)
            volumes[str(path.resolve())] = {"bind": inner, "mode": "rw"}
        labels = {
            LABEL_MANAGED: "1",
            LABEL_PREFIX: self.rc.name_prefix,
            LABEL_MODEL: req.name,
            LABEL_HASH: req.spec_hash,
            LABEL_PORT: str(req.port),
            LABEL_HEALTH: req.health_path,
            LABEL_STARTED: f"{time.time():.3f}",
            LABEL_OWNER: this_owner(),
            LABEL_NODE: req.node,
        }
        kwargs: dict[str, Any] = {
            "image": req.image,
            "command": list(req.argv),
            "name": self.container_name(req.name),
            "labels": labels,
            "environment": env,
            "ports": {f"{CONTAINER_PORT}/tcp": ("127.0.0.1", req.port)},
            "volumes": volumes,
            "detach": True,
        }
        if self.rc.ipc_host:
            kwargs["ipc_mode"] = "host"
        else:
            kwargs["shm_size"] = "2g"
        requests_ = device_requests(self.rc.gpus, self.devices.ids(req.node))
        if requests_:
            kwargs["device_requests"] = requests_
        return kwargs

    def _start(self, req: LaunchRequest) -> EngineHandle:
        name = self.container_name(req.name)
        self._remove_stale(name, req.name)
        kwargs = self._container_kwargs(req)
        try:
            container = self.client.containers.create(**kwargs)
        except docker.errors.ImageNotFound:
            raise ImageUnavailable(
                f"image {req.image} is not present locally. Fix: `docker pull {req.image}` "
                "(vlmhub serve pulls it for you), or build/load it locally."
            ) from None
        except docker.errors.APIError as exc:
            raise EngineStartError(req.name, f"Docker could not create container {name}: "
                                   f"{_explain(exc)}", [], "docker_create") from None
        try:
            container.start()
        except docker.errors.APIError as exc:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
            raise self._start_failure(req, name, exc) from None
        container.reload()
        return self._handle(container)

    def _remove_stale(self, name: str, model: str) -> None:
        try:
            old = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        if old.status in ("running", "restarting", "paused"):
            raise EngineStartError(
                model,
                f"container {name} is already running (another vlmhub serve or router?). "
                f"Fix: `vlmhub stop {model}` (or `docker rm -f {name}`), or use it as it is.",
                [],
                "already_running",
            )
        with contextlib.suppress(docker.errors.NotFound):
            old.remove(force=True)

    def _start_failure(self, req: LaunchRequest, name: str, exc: BaseException) -> Exception:
        text = _explain(exc)
        if any(marker in text for marker in _PORT_BUSY):
            return PortInUse(
                f"port {req.port} on 127.0.0.1 is already in use, so Docker cannot publish "
                f"{name}'s port ({text}). Fix: choose another port (--port), or leave it out "
                "and vlmhub picks a free one from runtime.port_range."
            )
        if _NO_GPU in text:
            return RuntimeUnavailable(
                f"Docker has no NVIDIA container runtime ({text}). Fix: install the NVIDIA "
                "Container Toolkit (nvidia-container-toolkit) and restart Docker, or set "
                "runtime.gpus: null in models.yaml to run without a GPU."
            )
        return EngineStartError(req.name, f"Docker could not start container {name}: {text}",
                                [], "docker_start")

    async def status(self, handle: EngineHandle) -> EngineStatus:
        """The container's state (one Docker call in a worker thread); raises
        :class:`RuntimeUnavailable` when Docker does not answer."""
        with self._reachable():
            return await asyncio.to_thread(self._status, handle)

    def _status(self, handle: EngineHandle) -> EngineStatus:
        try:
            container = self.client.containers.get(handle.ident)
        except docker.errors.NotFound:
            return EngineStatus("missing", detail="container removed (stopped by vlmhub, or "
                                "`docker rm`)", stopped=True)
        state = container.attrs.get("State", {})
        status = str(state.get("Status", container.status))
        if status in _RUNNING:
            return EngineStatus("running", detail=status)
        code = state.get("ExitCode")
        detail = status + (f": {state['Error']}" if state.get("Error") else "")
        if state.get("OOMKilled"):
            detail += " (killed by the kernel: out of host memory)"
        return EngineStatus("exited", int(code) if code is not None else None, detail)

    async def logs(self, handle: EngineHandle, tail: int | None = 200) -> list[str]:
        """The last ``tail`` lines of stdout and stderr (a worker thread); [] when removed."""
        return await asyncio.to_thread(self._logs, handle, tail)

    def _logs(self, handle: EngineHandle, tail: int | None) -> list[str]:
        try:
            container = self.client.containers.get(handle.ident)
            raw: bytes = container.logs(stdout=True, stderr=True,
                                        tail="all" if tail is None else tail)
        except docker.errors.NotFound:
            return []
        return [ln.rstrip("\r") for ln in raw.decode("utf-8", "replace").split("\n")
                if ln.strip()] if raw else []

    async def follow(self, handle: EngineHandle) -> AsyncIterator[str]:
        """Every log line since the container started, then new ones until it exits.

        A daemon thread reads Docker's blocking stream and hands lines to this coroutine
        through an ``asyncio.Queue``; when the consumer stops early the stream is closed, which
        ends the thread.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        streams: list[Any] = []
        done = threading.Event()

        def put(item: str | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                container = self.client.containers.get(handle.ident)
                stream = container.logs(stdout=True, stderr=True, stream=True, follow=True)
                streams.append(stream)
                if done.is_set():
                    return
                buf = b""
                for chunk in stream:
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        put(line.decode("utf-8", "replace").rstrip("\r"))
                if buf:
                    put(buf.decode("utf-8", "replace").rstrip("\r"))
            except Exception:  # container gone, daemon gone, stream closed: the log ends
                return
            finally:
                put(None)

        thread = threading.Thread(target=pump, name=f"vlmhub-logs-{handle.name}", daemon=True)
        thread.start()
        try:
            while (line := await queue.get()) is not None:
                yield line
        finally:
            done.set()
            for stream in streams:
                with contextlib.suppress(Exception):
                    stream.close()

    async def stop(self, handle: EngineHandle, timeout_s: float = 20.0) -> None:
        """``docker stop`` (SIGTERM, SIGKILL after ``timeout_s``), then remove the container,
        found by its id (never by name: a newer container of the model is left alone). A
        container whose processes are frozen (SIGSTOP) is killed at once. Blocks a worker
        thread up to ``timeout_s``; a container already gone is fine. An unreachable Docker
        engine raises :class:`RuntimeUnavailable` (the container's fate is unknown)."""
        with self._reachable():
            await asyncio.to_thread(self._stop, handle.ident, timeout_s)

    def _stop(self, ident: str, timeout_s: float) -> None:
        try:
            container = self.client.containers.get(ident)
        except docker.errors.NotFound:
            return
        with contextlib.suppress(docker.errors.NotFound):
            if container.status in _RUNNING:
                grace = 0 if self._frozen(container) else max(0, math.ceil(timeout_s))
                container.stop(timeout=grace)
        try:
            container.remove(force=True)  # returns once the container is gone
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if "already in progress" not in _explain(exc):  # a concurrent stop removes it
                raise

    @staticmethod
    def _frozen(container: Any) -> bool:
        """Whether a process of the running container is stopped (T): it would sit out the
        whole grace. One ``docker top``; False when Docker cannot tell."""
        if container.status != "running":
            return False
        try:
            top = container.top(ps_args="-o pid,stat")  # Docker needs the pid column
        except docker.errors.APIError:
            return False
        rows = top.get("Processes") or []
        return any(len(row) > 1 and str(row[1])[:1] in FROZEN_STATES for row in rows)

    async def adopt(self) -> list[EngineHandle]:
        """Running containers labelled by vlmhub with this runtime's name prefix, whoever
        owns them (label ``vlmhub.owner``)."""
        return await asyncio.to_thread(self._adopt)

    def _list(self, running_only: bool) -> list[Any]:
        filters: dict[str, Any] = {
            "label": [f"{LABEL_MANAGED}=1", f"{LABEL_PREFIX}={self.rc.name_prefix}"]
        }
        if running_only:
            filters["status"] = "running"
        return list(self.client.containers.list(all=not running_only, filters=filters))

    def _adopt(self) -> list[EngineHandle]:
        return [self._handle(c) for c in self._list(running_only=True)]

    async def find(self, model: str) -> EngineHandle | None:
        """The vlmhub container of ``model`` in any state (running or exited), or None."""
        return await asyncio.to_thread(self._find, model)

    def _find(self, model: str) -> EngineHandle | None:
        try:
            container = self.client.containers.get(self.container_name(model))
        except docker.errors.NotFound:
            return None
        if (container.labels or {}).get(LABEL_MANAGED) != "1":
            return None
        return self._handle(container)

    async def reconcile(self, wanted: Mapping[str, str], timeout_s: float = 20.0) -> Reconciled:
        """Adopt running containers against ``wanted`` (model name -> current spec hash).

        Returns :class:`~vlmhub.engines.adopt.Reconciled`: ``kept`` (hash matches: use
        as is), ``stopped`` (hash changed: stopped and removed, start them again) and
        ``unknown`` (models not wanted: left running).
        """
        return await reconcile_engines(self, wanted, timeout_s=timeout_s)

    async def close(self) -> None:
        """Close the Docker connection pool. Containers keep running."""
        await asyncio.to_thread(self.client.close)


class _PullReporter:
    """Turns Docker's pull events into ``progress(layer, done, size)`` calls: download bytes
    while a layer downloads, ``(size, size)`` once it is complete (extraction is not counted)."""

    def __init__(self, progress: PullProgress) -> None:
        self.progress = progress
        self.sizes: dict[str, int] = {}

    def __call__(self, event: Mapping[str, Any]) -> None:
        layer = str(event.get("id"))
        detail = event.get("progressDetail") or {}
        status = str(event.get("status", ""))
        current, total = detail.get("current"), detail.get("total")
        if status == "Downloading" and isinstance(current, int):
            if isinstance(total, int) and total > 0:
                self.sizes[layer] = total
            self.progress(layer, current, self.sizes.get(layer))
        elif status in ("Download complete", "Pull complete", "Already exists"):
            size = self.sizes.get(layer)
            self.progress(layer, size, size)
        elif status in ("Pulling fs layer", "Waiting"):
            self.progress(layer, 0 if layer in self.sizes else None, self.sizes.get(layer))
