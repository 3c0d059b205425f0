"""The Ray tier, replicas (issue 24 item 4): one model with ``replicas: 2`` on a real three-node
Ray cluster on this machine (tests/ray_support.py), stand-in engines as Ray-launched engines,
`vlmhub route` as a process, the real openai SDK with every request counted.

The nodes differ: the head declares 16 GiB (two replicas of 5.72 GiB fit there), the workers
``w1`` and ``w2`` 8 GiB (one fits). So "most room left" alone would put both replicas on the
head; they must spread:
1. the two replicas run on two different nodes (the router's ``/api/models`` and ``vlmhub ps``
   agree), both serve (``x-vlmhub-replica`` names each), and least-in-flight balancing shares
   the work between them;
2. the worker node holding one replica is killed under load: the only requests that fail are
   ones the lost replica held (in flight on it when its engine died, or leased to it in the few
   milliseconds before the router saw it fail: the ``x-vlmhub-replica`` of each failure names
   it); no request sent after the router failed it is lost (the survivor serves them, and a
   request that could not reach the dead engine waits and is sent to a live one), and the lost
   replica is replaced on the node that holds no replica (the other worker), not beside its
   sibling on the roomier head;
3. another model is loaded on the head, and the node holding the replacement is killed too:
   no node has room without evicting anything, so the lost replica stays failed (pending)
   while its sibling serves alone, and the other model is not evicted for it; once that model
   is unloaded, the replacement goes beside its sibling on the head (no other node is left).
The tests run in order on one cluster and one router (module scope).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
import yaml
from ray_support import Clients, LocalCluster, RayHub, demo_config, engine_actors, local_cluster
from route_support import route_process

from vlmhub.engines.ports import free_port

pytestmark = pytest.mark.ray
MODEL = "ray-pages"
OTHER = "ray-vl"
"""Another model (one engine): it fills the head in the last test."""
CLIENTS = 6
"""Concurrent clients of the load: 3 requests in flight on each replica, on average."""


@pytest.fixture(scope="module")
def mixed_cluster() -> Iterator[LocalCluster]:
    """A 16 GiB head and two 8 GiB workers."""
    yield from local_cluster(head_gib=16.0, worker_gib=8.0)


class Hub(RayHub):
    """The router of this module, with what its tests ask of it."""

    def rows(self) -> dict[str, dict[str, Any]]:
        """/api/models: each model's snapshot."""
        return {m["name"]: m for m in httpx.get(self.url + "/api/models").json()["models"]}

    def replicas(self) -> dict[str, dict[str, Any]]:
        """/api/models: each replica's snapshot (state, node, port, last_error)."""
        return {r["replica"]: r for r in self.rows()[MODEL]["replicas"]}

    def nodes(self) -> dict[str, str]:
        """Ready replica -> its node."""
        return {n: r["node"] for n, r in self.replicas().items() if r["state"] == "ready"}

    def ask(self) -> str:
        """One request; the replica that served it (``x-vlmhub-replica``: name@port)."""
        raw = self.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert (raw.parse().choices[0].message.content or "").startswith(f"{MODEL}:")
        return raw.headers["x-vlmhub-replica"].split("@")[0]

    def wait(self, what: str, ok: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok(self.replicas()):
            assert time.monotonic() < deadline, f"{what}: {self.replicas()}"
            time.sleep(0.2)


class Load(Clients):
    """CLIENTS clients asking in a loop until stopped; each request is recorded with when it
    was sent, which replica answered (the header, also on an error) and how it ended."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(CLIENTS)
        self.clients = [hub.client() for _ in range(CLIENTS)]
        self.done: list[tuple[float, str, str]] = []
        """(sent at, replica, "ok" or the error)."""

    def one(self, index: int) -> None:
        sent = time.monotonic()
        try:
            raw = self.clients[index].chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            text = raw.parse().choices[0].message.content or ""
            outcome = "ok" if text.startswith(f"{MODEL}:") else f"wrong answer {text!r}"
            replica = raw.headers.get("x-vlmhub-replica", "?")
        except openai.APIStatusError as exc:
            outcome = f"{exc.status_code}: {exc.message}"
            replica = exc.response.headers.get("x-vlmhub-replica", "?")
        except Exception as exc:
            outcome, replica = f"{type(exc).__name__}: {exc}", "?"
        self.done.append((sent, replica.split("@")[0], outcome))

    def served(self) -> collections.Counter[str]:
        return collections.Counter(r for _, r, o in self.done if o == "ok")

    def failed(self) -> list[tuple[float, str, str]]:
        return [d for d in self.done if d[2] != "ok"]


@pytest.fixture(scope="module")
def hub(mixed_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """`vlmhub route` on examples/ray-demo.yaml's first model as ``ray-pages`` with
    ``replicas: 2`` and stand-ins taking 0.2 s per request, joined to the mixed cluster."""
    root = tmp_path_factory.mktemp("ray-replicas")
    port = free_port()
    config = demo_config(mixed_cluster, port)
    config["router"]["restart_backoff_s"] = 0.5
    config["runtime"]["process_argv"] += ["--stub-request-delay", "0.2"]
    entry = config["models"]["ray-ocr"]
    entry["spec"] = {**entry["spec"], "hf_repo": f"stub/{MODEL}"}
    config["models"] = {MODEL: {**entry, "replicas": 2}, OTHER: config["models"]["ray-vl"]}
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    with route_process(path, root, port) as url:
        yield Hub(url, mixed_cluster, root / "route.log")


def test_ray_replicas_run_on_different_nodes_and_share_the_work(hub: Hub) -> None:
    """The first request starts one replica (on the head: most room); the second replica
    comes up on a worker although the head has room for it too; `vlmhub ps` lists both engines
    with their nodes; both serve, evenly."""
    first = hub.ask()
    hub.wait("both replicas ready",
             lambda rs: [r["state"] for r in rs.values()] == ["ready", "ready"])
    nodes = hub.nodes()
    assert nodes[first] == "head"
    assert len(set(nodes.values())) == 2 and set(nodes.values()) <= {"head", "w1", "w2"}, nodes
    actors = engine_actors()
    assert sorted(actors) == [f"{MODEL}#1", f"{MODEL}#2"], actors
    ps = {r["name"]: r for r in json.loads(hub.cli("ps", "--json").stdout)}  # each engine
    assert {n: (r["runtime"], r["node"], r["healthy"]) for n, r in ps.items()} == {
        n: ("ray", node, True) for n, node in nodes.items()}
    with ThreadPoolExecutor(16) as pool:
        served = collections.Counter(pool.map(lambda _: hub.ask(), range(64)))
    print(f"replicas on {nodes}; 64 requests from 16 clients served {dict(served)}")
    assert set(served) == {f"{MODEL}#1", f"{MODEL}#2"} and sum(served.values()) == 64
    assert max(served.values()) <= 1.2 * min(served.values()), served


def lose_node(hub: Hub, node: str, while_down: Callable[[str], None] | None = None
              ) -> tuple[str, str, Load, dict[str, float]]:
    """Kill ``node`` (it holds a replica) under load; wait until its replica is seen down (no
    longer ready there: failed, or already starting elsewhere; the router logged why), call
    ``while_down(lost replica)``, then wait until it is ready again on another node; 1 s more
    of load. Returns the lost replica, the survivor, the load and the moments (killed, seen
    down, back)."""
    nodes = hub.nodes()
    lost = next(r for r, n in nodes.items() if n == node)
    survivor = next(r for r in nodes if r != lost)
    with Load(hub) as load:
        time.sleep(1.5)
        hub.cluster.cluster.remove_node(hub.cluster.workers.pop(node))
        at = {"killed": time.monotonic()}
        hub.wait(f"{lost} down", lambda rs: (rs[lost]["state"], rs[lost]["node"]) != (
            "ready", node), 30)
        at["failed"] = time.monotonic()
        if while_down is not None:
            while_down(lost)
        hub.wait(f"{lost} back", lambda rs: rs[lost]["state"] == "ready"
                 and rs[lost]["node"] != node, 60)
        at["back"] = time.monotonic()
        time.sleep(1.0)
    # why: the node watch's "its node NAME is gone", or what the router saw first on a request
    # in flight there ("engine could not be reached: Server disconnected")
    assert f"WARNING vlmhub.engine: {lost} crashed: " in hub.log.read_text()
    assert node not in httpx.get(hub.url + "/api/ui").json()["gpu"]["nodes"]
    failed = load.failed()
    in_window = [d for d in load.done if at["killed"] <= d[0] < at["back"]]
    print(f"node {node} killed: {lost} seen down {at['failed'] - at['killed']:.1f} s later, "
          f"ready again on {hub.nodes().get(lost)} {at['back'] - at['failed']:.1f} s after "
          f"that; {len(load.done)} requests in all, served {dict(load.served())}, "
          f"{len(in_window)} sent between the kill and the replacement; failed {len(failed)}: "
          f"{[(r, o[:80]) for _, r, o in failed]}")
    return lost, survivor, load, at


def check_only_in_flight_failed(load: Load, lost: str, survivor: str, at: dict[str, float]
                                ) -> None:
    """Failures: only requests the lost replica held, none sent after the replica was seen
    down; the survivor served in the meantime."""
    failed = load.failed()
    assert all(r == lost for _, r, _ in failed), failed
    assert all(sent < at["failed"] for sent, _, _ in failed), failed
    during = collections.Counter(r for sent, r, o in load.done
                                 if o == "ok" and at["killed"] < sent < at["back"])
    assert during[survivor] > 0, during


def test_ray_lost_node_replica_is_replaced_on_a_node_without_one(hub: Hub) -> None:
    """The worker holding a replica is killed under load: its replica is failed and replaced
    on the other worker (the head has more room, but holds its sibling); the survivor keeps
    its engine and serves throughout."""
    nodes = hub.nodes()
    worker = next(n for n in nodes.values() if n in hub.cluster.workers)
    spare = next(w for w in hub.cluster.workers if w != worker)
    before = engine_actors()
    lost, survivor, load, at = lose_node(hub, worker)
    check_only_in_flight_failed(load, lost, survivor, at)
    after = hub.nodes()
    assert after == {survivor: nodes[survivor], lost: spare}, after
    actors = engine_actors()
    assert actors[survivor] == before[survivor]  # the very same engine
    assert actors[lost] != before[lost]  # a new one
    assert hub.replicas()[survivor]["restarts"] == 0
    assert load.served()[lost] > 0  # the replacement serves


def test_ray_with_no_room_the_lost_replica_waits_then_joins_its_sibling(hub: Hub) -> None:
    """The head is filled (another model beside the first replica) and the last worker, with
    the replacement, is killed: no node has room without an eviction, so the lost replica
    stays failed while its sibling serves, and the other model is not evicted for it (a
    further replica never evicts). Unloading the other model makes room: the replacement
    starts on the head, beside its sibling."""
    httpx.post(f"{hub.url}/api/models/{OTHER}/load", timeout=60).raise_for_status()
    assert hub.rows()[OTHER]["node"] == "head"  # beside #1: the worker has no room for it
    nodes = hub.nodes()
    worker = next(n for n in nodes.values() if n in hub.cluster.workers)
    pending: dict[str, Any] = {}

    def no_room(lost: str) -> None:
        time.sleep(3.0)  # six restart backoffs (0.5 s): it would have started by now
        pending.update(hub.replicas()[lost])
        assert pending["state"] == "failed", pending
        assert hub.rows()[OTHER]["state"] == "ready"  # not evicted for it
        httpx.post(f"{hub.url}/api/models/{OTHER}/unload", timeout=60).raise_for_status()

    lost, survivor, load, at = lose_node(hub, worker, no_room)
    print(f"pending while no node had room: {pending['state']}: {pending['last_error']}")
    assert f"{lost} crashed" in (pending["last_error"] or "")
    check_only_in_flight_failed(load, lost, survivor, at)
    assert hub.nodes() == {survivor: "head", lost: "head"}
    assert hub.rows()[OTHER]["state"] == "stopped"
    assert load.served()[lost] > 0
