"""Ray runtime: each engine is a Ray actor on a chosen node of a Ray cluster (several GPUs).

``runtime: {kind: ray, address: auto}`` in models.yaml. Every node declares its GPU memory as
the custom resource ``vram_gib`` (``ray start --resources='{"vram_gib": 12}'``); nodes without
it are not GPU nodes and get no engine. :meth:`RayRuntime.nodes` lists the live GPU nodes, the
supervisor plans per node (:mod:`vlmhub.scheduling.placement`) and names the node in
``LaunchRequest.node``; :meth:`RayRuntime.start` creates a named, detached actor
(:class:`~vlmhub.engines.ray_actor.EngineActor`, namespace ``vlmhub``) pinned to that node
(``NodeAffinitySchedulingStrategy(soft=False)``) and holding ``vram_gib`` = the model's planned
footprint, so Ray's own accounting agrees with vlmhub's. The actor spawns the engine there and
keeps its output; the handle carries the engine's URL (the node's IP with
``runtime.engine_host: node``, else 127.0.0.1) and the node's name.

A node's name is its ``vlmhub/node`` label (``ray start --labels='{"vlmhub/node": "gpu-a"}'``)
or else the first 8 characters of its Ray node id.

A model with replicas has one engine per replica (``MODEL#N``): each its own actor, ``vram_gib``
and key, on the node the supervisor names (:func:`vlmhub.scheduling.placement.room` spreads a
model's replicas over the nodes); nothing here knows about replicas.

Blocking: every Ray call blocks, so each runs in a worker thread (``asyncio.to_thread``) with a
timeout; calls for different engines may run concurrently. A stop touches only the actor named
by its handle (the actor name is unique per engine start).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from vlmhub.config.schema import RuntimeConfig
from vlmhub.engines import keys
from vlmhub.engines.base import EngineHandle, EngineStatus, LaunchRequest, Runtime
from vlmhub.engines.owner import this_owner
from vlmhub.engines.ray_actor import NODE_HOST, EngineActor, meta_for
from vlmhub.errors import EngineStartError, RuntimeUnavailable
from vlmhub.paths import default_state_dir

NAMESPACE = "vlmhub"
RESOURCE = "vram_gib"
NODE_LABEL = "vlmhub/node"
CALL_TIMEOUT_S = 10.0
"""How long one actor call may take before the actor counts as not answering."""
DEAD_NODE = re.compile(r"node has died\. Node Id: ([0-9a-f]+)")
"""How Ray's actor errors name a node that died (its id)."""
PLACE_TIMEOUT_S = 60.0
"""How long Ray may take to place an engine's actor on its node (resources freed late)."""


@dataclass(frozen=True)
class RayNode:
    name: str
    node_id: str
    ip: str
    vram_gib: float
    alive: bool


class RayRuntime(Runtime):
    """Engines as Ray actors on the nodes of a Ray cluster. See the module docstring."""

    kind: ClassVar[str] = "ray"

    def __init__(self, rc: RuntimeConfig) -> None:
        self.rc = rc
        self.state_dir = default_state_dir()
        """Where the engines' keys live (``vlmhub route --state-dir`` sets it)."""
        self._actors: dict[str, Any] = {}
        self._seen: dict[str, list[str]] = {}
        """Output lines read so far per engine: what logs() shows after its node is gone."""
        self._stopped: set[str] = set()
        self._nodes: dict[str, RayNode] = {}
        self._dead: set[str] = set()
        """Node ids an actor error said are dead: gone before the GCS lists them so (a node
        id never comes back: a restarted node gets a new one)."""

    # ------------------------------------------------------------------ cluster
    def _connect(self) -> Any:
        """Join the cluster once (blocking). Raises RuntimeUnavailable with the fix."""
        import ray

        if not ray.is_initialized():
            self._reachable()
            try:
                ray.init(address=self.rc.address, namespace=NAMESPACE, log_to_driver=False,
                         logging_level=30, configure_logging=False)
            except Exception as exc:
                raise RuntimeUnavailable(
                    f"cannot join the Ray cluster at {self.rc.address!r}: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Fix: start "
                    "one (`ray start --head --resources='{\"vram_gib\": 12}'`), or set "
                    "runtime.address in models.yaml to its head (host:6379)."
                ) from None
        return ray

    def _reachable(self) -> None:
        """Fail fast (3 s) when an explicit ``host:port`` does not answer: ray.init would
        retry for minutes. ``auto`` fails fast by itself when no cluster runs here."""
        host, sep, port = self.rc.address.removeprefix("ray://").rpartition(":")
        if self.rc.address == "auto" or not sep or not port.isdigit():
            return
        try:
            socket.create_connection((host, int(port)), timeout=3.0).close()
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot join the Ray cluster at {self.rc.address!r}: {exc.strerror or exc}. "
                "Fix: start it (`ray start --head --port=6379 --resources='{\"vram_gib\": "
                "12}'`) or set runtime.address in models.yaml to its head (host:6379)."
            ) from None

    def _list_nodes(self) -> dict[str, RayNode]:
        ray = self._connect()
        found: dict[str, RayNode] = {}
        for n in ray.nodes():
            vram = float(n.get("Resources", {}).get(RESOURCE, 0.0))
            if vram <= 0:
                continue
            node_id = str(n["NodeID"])
            name = str(n.get("Labels", {}).get(NODE_LABEL) or node_id[:8])
            node = RayNode(name, node_id, str(n.get("NodeManagerAddress", "")), vram,
                           bool(n.get("Alive")) and node_id not in self._dead)
            if node.alive or name not in found:
                found[name] = node
        self._nodes = found
        return found

    async def nodes(self) -> dict[str, float]:
        """Live GPU nodes -> their ``vram_gib``. Blocks in a worker thread."""
        found = await asyncio.to_thread(self._list_nodes)
        return {n.name: n.vram_gib for n in found.values() if n.alive}

    def engine_bind(self, port: int) -> tuple[str, int]:
        """``runtime.engine_host`` (``node``: the actor puts its node's IP in the argv)."""
        return self.rc.engine_host, port

    # ------------------------------------------------------------------ lifecycle
    async def start(self, req: LaunchRequest) -> EngineHandle:
        """Create the engine's actor on ``req.node`` and spawn the engine there; returns once
        Ray placed it (not ready yet). Raises EngineStartError when Ray cannot place it."""
        return await asyncio.to_thread(self._start, req)

    def _start(self, req: LaunchRequest) -> EngineHandle:
        ray = self._connect()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = self._list_nodes()
        opts: dict[str, Any] = {
            "name": f"{self.rc.name_prefix}.{req.name}.{uuid.uuid4().hex[:8]}",
            "namespace": NAMESPACE, "lifetime": "detached", "num_cpus": 0,
            "max_restarts": 0, "max_task_retries": 0,
        }
        if req.vram_gib > 0:
            opts["resources"] = {RESOURCE: round(req.vram_gib, 4)}
        if req.node:
            node = nodes.get(req.node)
            if node is None or not node.alive:
                raise EngineStartError(req.name, f"{req.name}: the Ray node {req.node} is gone",
                                       [], "node_gone")
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        host = NODE_HOST if self.rc.engine_host == NODE_HOST else self.rc.engine_host
        meta = meta_for(req, owner=this_owner(), host=host)
        actor = ray.remote(EngineActor).options(**opts).remote(meta)
        argv = [*self.rc.process_argv, *req.argv]
        try:
            meta = ray.get(actor.launch.remote(req, argv), timeout=PLACE_TIMEOUT_S)
        except Exception as exc:
            self._note_dead_node(str(exc))
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            timeout = isinstance(exc, ray.exceptions.GetTimeoutError)
            why = (f"Ray did not place it on node {req.node or '(any)'} within "
                   f"{PLACE_TIMEOUT_S:.0f} s ({RESOURCE} {req.vram_gib:.2f} asked)"
                   if timeout else f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            raise EngineStartError(req.name, f"{req.name} could not start on Ray: {why}", [],
                                   "ray_place") from None
        self._actors[opts["name"]] = actor
        return self._handle(opts["name"], meta)

    def _handle(self, ident: str, meta: dict[str, Any]) -> EngineHandle:
        return EngineHandle(
            name=str(meta["name"]), runtime=self.kind, ident=ident, port=int(meta["port"]),
            spec_hash=str(meta.get("spec_hash", "")), started_at=float(meta["started_at"]),
            host=str(meta.get("host", "127.0.0.1")),
            health_path=str(meta.get("health_path", "/health")),
            owner=str(meta.get("owner", "")), node=str(meta.get("node", "")),
            api_key=keys.read_key(self.state_dir, str(meta["name"])),
        )

    def _actor(self, ident: str) -> Any | None:
        ray = self._connect()
        actor = self._actors.get(ident)
        if actor is None:
            try:
                actor = ray.get_actor(ident, namespace=NAMESPACE)
            except ValueError:
                return None
            self._actors[ident] = actor
        return actor

    def _call(self, ident: str, method: str, *args: Any) -> Any:
        """One actor call (blocking, :data:`CALL_TIMEOUT_S`). Raises LookupError when the
        actor is gone or dead, TimeoutError when it does not answer."""
        ray = self._connect()
        actor = self._actor(ident)
        if actor is None:
            raise LookupError(f"no actor {ident}")
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{ident} did not answer within {CALL_TIMEOUT_S:.0f} s") from None
        except ray.exceptions.RayActorError as exc:
            self._note_dead_node(str(exc))
            raise LookupError(str(exc).splitlines()[0] if str(exc) else "actor died") from None

    def _note_dead_node(self, message: str) -> None:
        """Remember the node an actor error says has died (Ray's message names its id)."""
        found = DEAD_NODE.search(message)
        if found:
            self._dead.add(found.group(1))

    def _gone_detail(self, handle: EngineHandle) -> str:
        node = self._list_nodes().get(handle.node)
        if handle.node and (node is None or not node.alive):
            return f"its Ray node {handle.node} is gone"
        return f"its Ray actor on node {handle.node or '?'} died"

    async def status(self, handle: EngineHandle) -> EngineStatus:
        """running; exited (code known while the actor lives; a dead actor or node: code
        unknown, the detail names the node); missing once stopped and removed."""
        return await asyncio.to_thread(self._status, handle)

    def _status(self, handle: EngineHandle) -> EngineStatus:
        stopped = handle.ident in self._stopped
        try:
            code = self._call(handle.ident, "poll")
        except TimeoutError as exc:
            return EngineStatus("running", detail=f"on node {handle.node}: {exc}")
        except LookupError:
            if stopped:
                return EngineStatus("missing", detail="stopped by vlmhub", stopped=True)
            return EngineStatus("exited", None, self._gone_detail(handle))
        if code is None:
            return EngineStatus("running", detail=f"on node {handle.node}")
        return EngineStatus("exited", code, f"exited with code {code} on node {handle.node}",
                            stopped=stopped)

    async def logs(self, handle: EngineHandle, tail: int | None = 200) -> list[str]:
        lines = await asyncio.to_thread(self._read_all, handle)
        return lines if tail is None else lines[-tail:] if tail > 0 else []

    def _read_all(self, handle: EngineHandle) -> list[str]:
        try:
            lines, _, _ = self._call(handle.ident, "lines", 0)
        except (LookupError, TimeoutError):
            return list(self._seen.get(handle.ident, []))
        self._seen[handle.ident] = list(lines)
        return list(lines)

    async def follow(self, handle: EngineHandle, poll_s: float = 0.1) -> AsyncIterator[str]:
        """Every output line from the start, then new ones (polled every ``poll_s``), until
        the engine has exited (or its actor is gone) and every line was read."""
        index = 0
        while True:
            try:
                lines, index, code = await asyncio.to_thread(
                    self._call, handle.ident, "lines", index)
            except (LookupError, TimeoutError):
                return
            self._seen.setdefault(handle.ident, []).extend(lines)
            for line in lines:
                yield line
            if code is not None and not lines:
                return
            if not lines:
                await asyncio.sleep(poll_s)

    async def stop(self, handle: EngineHandle, timeout_s: float = 20.0) -> None:
        """SIGTERM the engine's process group, SIGKILL it after ``timeout_s`` (at once with
        0), then kill its actor. Touches only the actor named by ``handle``. Idempotent."""
        self._stopped.add(handle.ident)
        with contextlib.suppress(LookupError, TimeoutError):
            sig = signal.SIGTERM if timeout_s > 0 else signal.SIGKILL
            code = await asyncio.to_thread(self._call, handle.ident, "signal", int(sig))
            deadline = time.monotonic() + timeout_s
            while code is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                code = await asyncio.to_thread(self._call, handle.ident, "poll")
            if code is None:
                await asyncio.to_thread(self._call, handle.ident, "signal", int(signal.SIGKILL))
        await asyncio.to_thread(self._kill_actor, handle.ident)

    def _kill_actor(self, ident: str) -> None:
        ray = self._connect()
        actor = self._actors.pop(ident, None)
        with contextlib.suppress(Exception):
            actor = actor or ray.get_actor(ident, namespace=NAMESPACE)
            ray.kill(actor, no_restart=True)

    async def adopt(self) -> list[EngineHandle]:
        """Every live engine actor in the ``vlmhub`` namespace, whoever started it."""
        return await asyncio.to_thread(self._adopt)

    def _adopt(self) -> list[EngineHandle]:
        ray = self._connect()
        prefix = f"{self.rc.name_prefix}."
        out: list[EngineHandle] = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            name = str(entry.get("name", ""))
            if entry.get("namespace") != NAMESPACE or not name.startswith(prefix):
                continue
            with contextlib.suppress(LookupError, TimeoutError):
                meta = self._call(name, "meta")
                if meta.get("exit_code") is None and "pid" in meta:
                    out.append(self._handle(name, meta))
        return out

    async def find(self, model: str) -> EngineHandle | None:
        """The running engine of ``model`` (any owner), or None (``vlmhub logs``/``stop``)."""
        return next((h for h in await self.adopt() if h.name == model), None)

    async def claim(self, handle: EngineHandle) -> None:
        with contextlib.suppress(LookupError, TimeoutError):
            await asyncio.to_thread(self._call, handle.ident, "set_owner", this_owner())
