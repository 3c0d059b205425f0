"""The Ray tier (issue 12): `vlmhub route` with `runtime: {kind: ray}` over a real three-node
Ray cluster on this machine (tests/ray_support.py), stand-in engines as the workloads, each
node a pretend 8 GiB GPU on which one model of examples/ray-demo.yaml fits (5.72 GiB).

Through the real openai SDK, with every request of concurrent clients counted:
1. models spread across the nodes (three start at once, one per node);
2. a swap on one node leaves the other nodes' engines alone (same actor, same port, no request
   lost while it happens);
3. a killed worker node's model becomes failed (naming the node) and restarts on a live node,
   while no request for a model on a surviving node is lost;
4. engines outlive a crashed router and a new router adopts them;
5. with ``engine_host: node`` an engine listens on its node's IP.
The tests run in order on one cluster and one router (module scope).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from ray_support import (  # noqa: F401
    Clients,
    LocalCluster,
    RayHub,
    demo_config,
    engine_actors,
    ray_cluster,
)
from route_support import route_process

from vlmhub.config.schema import RuntimeConfig
from vlmhub.engines.base import LaunchRequest, wait_ready
from vlmhub.engines.ports import free_port
from vlmhub.engines.ray import RayRuntime

pytestmark = pytest.mark.ray
MODELS = ("ray-ocr", "ray-vl", "ray-phi", "ray-smol")


class Hub(RayHub):
    """The router of this module, with what its tests ask of it."""

    def models(self) -> dict[str, dict[str, Any]]:
        """/v1/models as the client sees it."""
        return {m["id"]: m for m in httpx.get(self.url + "/v1/models").json()["data"]}

    def admin(self) -> dict[str, dict[str, Any]]:
        """/api/models (loopback: no admin key needed): state, node, port, last_error."""
        return {m["name"]: m for m in httpx.get(self.url + "/api/models").json()["models"]}

    def nodes(self) -> dict[str, float]:
        """The dashboard's GPU nodes: name -> usable GiB."""
        return dict(httpx.get(self.url + "/api/ui").json()["gpu"]["nodes"])

    def ask(self, model: str) -> str:
        r = self.client().chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        return r.choices[0].message.content or ""


class Load(Clients):
    """Two clients per model of ``models`` asking in a loop until stopped; every request is
    counted."""

    def __init__(self, hub: Hub, models: tuple[str, ...]) -> None:
        super().__init__(2 * len(models))
        self.hub, self.models = hub, models
        self.ok: dict[str, int] = {}
        self.failed: list[str] = []
        self.clients = [hub.client() for _ in range(self.count)]

    def one(self, index: int) -> None:
        model = self.models[index // 2]
        try:
            r = self.clients[index].chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            text = r.choices[0].message.content or ""
            assert text.startswith(f"{model}:"), text
            self.ok[model] = self.ok.get(model, 0) + 1
        except Exception as exc:
            self.failed.append(f"{model}: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def hub(ray_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory  # noqa: F811
        ) -> Iterator[Hub]:
    """`vlmhub route` on examples/ray-demo.yaml, joined to the local cluster."""
    root = tmp_path_factory.mktemp("ray")
    port = free_port()
    config = demo_config(ray_cluster, port)
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    with route_process(path, root, port) as url:
        yield Hub(url, ray_cluster, root / "route.log")


def test_ray_models_spread_across_nodes(hub: Hub) -> None:
    """Three models asked at once start at once, one on each node (none fits twice): a
    second start begins before the first is ready (one start at a time per node, not per
    cluster)."""
    assert hub.nodes() == {"head": 7.5, "w1": 7.5, "w2": 7.5}
    answers: dict[str, str] = {}

    def ask(m: str) -> None:
        answers[m] = hub.ask(m)

    began = time.monotonic()
    threads = [threading.Thread(target=ask, args=(m,)) for m in MODELS[:3]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {m: a.split(":")[0] for m, a in answers.items()} == {m: m for m in MODELS[:3]}
    cards = hub.models()
    assert {m: cards[m]["state"] for m in MODELS[:3]} == dict.fromkeys(MODELS[:3], "ready")
    assert sorted(cards[m]["node"] for m in MODELS[:3]) == ["head", "w1", "w2"]
    assert "node" not in cards["ray-smol"]  # stopped: on no node
    lines = [ln for ln in hub.log.read_text().splitlines() if "vlmhub.engine" in ln]
    first_ready = next(i for i, ln in enumerate(lines) if ": ready in " in ln)
    starts = [i for i, ln in enumerate(lines) if ": starting (ray on node " in ln]
    assert len(starts) == 3 and starts[1] < first_ready, lines  # concurrent starts
    loads = {m: (c["node"], c["last_load_s"]) for m, c in hub.admin().items() if c["node"]}
    print(f"spread: {time.monotonic() - began:.1f} s for three cold starts at once: {loads}")
    actors = engine_actors()
    assert sorted(actors) == sorted(MODELS[:3])


def test_ray_ps_and_logs_see_the_cluster_engines(hub: Hub) -> None:
    """`vlmhub ps` lists the engines running on the cluster with their nodes; `vlmhub logs`
    reads an engine's output from its node."""
    rows = {r["name"]: r for r in json.loads(hub.cli("ps", "--json").stdout)}
    cards = hub.admin()
    assert {n: (r["runtime"], r["node"], r["port"], r["healthy"]) for n, r in rows.items()} == {
        m: ("ray", cards[m]["node"], cards[m]["port"], True) for m in MODELS[:3]}
    assert "Application startup complete." in hub.cli("logs", "ray-ocr").stdout


def test_ray_swap_on_one_node_leaves_the_others_alone(hub: Hub) -> None:
    """ray-smol needs a node: the one whose model is idle gives way; the two busy models keep
    their engines (same actor, same port) and lose no request meanwhile."""
    before_cards, before_actors = hub.admin(), engine_actors()
    busy, idle = MODELS[:2], MODELS[2]
    with Load(hub, busy) as load:
        time.sleep(1.0)
        assert hub.ask("ray-smol").startswith("ray-smol:")
        time.sleep(1.0)
    print(f"swap on one node: requests served meanwhile {load.ok}, failed {len(load.failed)}")
    assert load.failed == []
    assert all(load.ok.get(m, 0) > 0 for m in busy), load.ok
    after_cards, after_actors = hub.admin(), engine_actors()
    assert after_cards[idle]["state"] == "stopped"
    assert after_cards["ray-smol"]["node"] == before_cards[idle]["node"]  # swapped there
    for m in busy:  # untouched: the very same engine on the same node
        assert after_actors[m] == before_actors[m]
        assert (after_cards[m]["node"], after_cards[m]["port"]) == (
            before_cards[m]["node"], before_cards[m]["port"])
        assert after_cards[m]["restarts"] == 0
    assert idle not in after_actors  # its engine (actor) is gone


def test_ray_killed_node_fails_its_model_which_restarts_elsewhere(hub: Hub) -> None:
    """Room is made on one surviving node (an unload), a worker node is killed: its model is
    failed with the node named, then a request restarts it on the node with room; the model
    on the other surviving node serves throughout without losing a request."""
    cards = hub.admin()
    node_of = {m: c["node"] for m, c in cards.items() if c["state"] == "ready"}
    assert len(node_of) == 3, cards
    dead_model = next(m for m, n in node_of.items() if n in hub.cluster.workers)
    dead_node = node_of[dead_model]
    spare_model, kept_model = (m for m in node_of if m != dead_model)
    spare_node = node_of[spare_model]
    httpx.post(f"{hub.url}/api/models/{spare_model}/unload", timeout=60).raise_for_status()
    kept_actor = engine_actors()[kept_model]
    with Load(hub, (kept_model,)) as load:
        time.sleep(1.0)
        hub.cluster.cluster.remove_node(hub.cluster.workers.pop(dead_node))
        killed = time.monotonic()
        deadline = time.monotonic() + 30
        while hub.admin()[dead_model]["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.2)
        failed = hub.admin()[dead_model]
        assert failed["state"] == "failed", failed
        assert dead_node in (failed["last_error"] or ""), failed
        seen_failed = time.monotonic()
        assert hub.ask(dead_model).startswith(f"{dead_model}:")  # restarted on a live node
        back = time.monotonic()
        time.sleep(1.0)
    print(f"node {dead_node} killed: {dead_model} seen failed after {seen_failed - killed:.1f} s "
          f"({failed['last_error']}), served again {back - seen_failed:.1f} s later on "
          f"{spare_node}; requests on {node_of[kept_model]} meanwhile {load.ok}, "
          f"failed {len(load.failed)}")
    assert load.failed == []
    assert load.ok.get(kept_model, 0) > 0
    after = hub.admin()
    assert after[dead_model]["state"] == "ready"
    assert after[dead_model]["node"] == spare_node
    assert after[kept_model]["node"] == node_of[kept_model]
    assert engine_actors()[kept_model] == kept_actor
    assert dead_node not in {c.get("node") for c in hub.models().values()}
    assert dead_node not in hub.nodes()


def router_pids(config: Path) -> list[int]:
    """The pids of `vlmhub route --config CONFIG` processes (from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"route" in argv and str(config).encode() in argv:
            found.append(int(cmdline.parent.name))
    return found


def test_ray_engines_outlive_a_crashed_router_and_are_adopted(hub: Hub, tmp_path: Path) -> None:
    """The router is killed (SIGKILL: no clean-up); its engines (detached actors) keep running;
    a new router on the same cluster adopts them: ready at once, same actors, same nodes."""
    before = {m: c for m, c in hub.admin().items() if c["state"] == "ready"}
    actors = engine_actors()
    assert before and sorted(actors) == sorted(before)
    config_path = hub.log.parent / "models.yaml"
    pids = router_pids(config_path)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    config = yaml.safe_load(config_path.read_text())
    port = free_port()
    config["router"]["port"] = port
    second = tmp_path / "models.yaml"
    second.write_text(yaml.safe_dump(config))
    # The router that adopts them calls the engines with their keys: the state dir's
    # engine-keys (a restarted router reads the same state dir; here a copy of it).
    shutil.copytree(hub.log.parent / "state" / "engine-keys", tmp_path / "state" / "engine-keys")
    with route_process(second, tmp_path, port) as url:
        again = Hub(url, hub.cluster, tmp_path / "route.log")
        cards = again.admin()
        for m, c in before.items():
            assert (cards[m]["state"], cards[m]["phase"]) == ("ready", "ready (adopted)")
            assert (cards[m]["node"], cards[m]["port"]) == (c["node"], c["port"])
            assert again.ask(m).startswith(f"{m}:")
        assert engine_actors() == actors  # served by the very same engines
    assert engine_actors() == {}  # the new owner stopped them on its way out


async def test_ray_engine_host_node_binds_the_nodes_ip(ray_cluster: LocalCluster  # noqa: F811
                                                        ) -> None:
    """`engine_host: node` (a cluster of several machines): the engine listens on its node's
    IP, the handle's URL names it, and a stop ends it and its actor."""
    import ray

    rt = RayRuntime(RuntimeConfig(
        kind="ray", address=ray_cluster.address, engine_host="node",
        process_argv=[sys.executable, "-m", "vlmhub.testing.stub_engine"]))
    head_ip = next(n["NodeManagerAddress"] for n in ray.nodes()
                   if n["Alive"] and n["Labels"].get("vlmhub/node") == "head")
    port = random.randrange(30000, 31000)
    host, _ = rt.engine_bind(port)
    req = LaunchRequest(name="ray-host", spec_hash="h", image="-", port=port, node="head",
                        vram_gib=1.0, argv=["stub/ray-host", "--served-model-name", "ray-host",
                                            "--host", host, "--port", str(port)])
    handle = await rt.start(req)
    try:
        assert (handle.host, handle.node) == (head_ip, "head")
        await wait_ready(rt, handle, timeout_s=60)
        assert httpx.get(f"{handle.base_url}/v1/models").json()["data"][0]["id"] == "ray-host"
    finally:
        await rt.stop(handle, timeout_s=5)
    assert (await rt.status(handle)).state == "missing"
    assert "ray-host" not in engine_actors()
