"""Replicas (issue 24): several engines of one model, one queue, least-in-flight balancing,
autoscaling between ``min`` and ``max``. The pure step first (the pool rules), then real
stand-in engines through the process runtime behind a real router and the real openai client.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from route_support import wait_healthy
from supervisor_support import build, model, routed_app
from test_reload import reconfigure

from vlmhub.cli.engines import Engines, _ps_rows
from vlmhub.config.schema import ReplicasConfig
from vlmhub.control.contract import Lease
from vlmhub.engines.base import EngineHandle, LaunchRequest
from vlmhub.engines.ports import free_port
from vlmhub.engines.process import ProcessRuntime
from vlmhub.router.history import History, sleep_residuals
from vlmhub.scheduling import step
from vlmhub.scheduling.policy import Waiter
from vlmhub.scheduling.scheduler import Plan, ReplicaView
from vlmhub.scheduling.simtrace import Clients, Draw, Request, Trace
from vlmhub.scheduling.simulate import SimConfig, SimModel, Simulation

NODES2 = {"n1": 8.0, "n2": 8.0}
REPO = Path(__file__).resolve().parent.parent


def rep(name: str, state: str = "stopped", gib: float = 5.0, **kw: Any) -> ReplicaView:
    return ReplicaView(name, state, gib, reload_cost_s=10.0, **kw)  # type: ignore[arg-type]


def ent(view: ReplicaView, node: str = "", **kw: Any) -> step.Entry:
    return step.Entry(view, node, **kw)


def pool(*members: str, waiters: int = 0, **kw: Any) -> step.Pool:
    return step.Pool(members, tuple(Waiter(0.0) for _ in range(waiters)), **kw)


# -- the pure step ------------------------------------------------------------------------
def test_a_fixed_pool_starts_its_first_replica_then_the_others_where_room_exists() -> None:
    p = pool("m#1", "m#2", waiters=3, high=2)
    cold = [ent(rep("m#1")), ent(rep("m#2"))]
    out = step.decide(cold, NODES2, 10.0, pools=[p])
    (run,) = out.actions
    assert isinstance(run, step.Run) and run.plan == Plan("start", "m#1")
    # #1 starts on its node: the pool waits for it (one start of a pool at a time)
    starting = [ent(rep("m#1", "starting"), run.node), ent(rep("m#2"))]
    assert step.decide(starting, NODES2, 11.0, busy={run.node: "m#1"}, pools=[p]).actions == ()
    # #1 ready and serving: #2 starts on the other node, without evicting anything
    other = "n2" if run.node == "n1" else "n1"
    ready = [ent(rep("m#1", "ready", in_flight=3), run.node), ent(rep("m#2"))]
    busy = step.decide(ready, NODES2, 12.0, pools=[pool("m#1", "m#2", high=2)])
    assert busy.actions == (step.Run(other, Plan("start", "m#2")),)


def test_further_replicas_never_evict_other_work() -> None:
    p = pool("m#1", "m#2", high=2)
    es = [ent(rep("m#1", "ready", in_flight=4), "n1"), ent(rep("m#2")),
          ent(rep("other", "ready", gib=5.0, last_used=0.0), "n2")]
    assert step.decide(es, NODES2, 100.0, pools=[p]).actions == ()  # only an eviction: none
    assert step.decide(es, {"n1": 8.0, "n2": 8.0, "n3": 8.0}, 100.0, pools=[p]).actions == (
        step.Run("n3", Plan("start", "m#2")),)


def test_replicas_spread_over_the_nodes_while_room_allows() -> None:
    """A further replica goes to a node without one of its siblings, even where a bigger node
    beside its sibling has more room left (Ray nodes and the cards of one machine alike); only
    when no other node has room does it join its sibling."""
    p = pool("m#1", "m#2", high=2)
    for big, small in (("head", "w1"), ("gpu0", "gpu1")):  # a 16 GiB node and an 8 GiB one
        nodes = {big: 16.0, small: 8.0}
        es = [ent(rep("m#1", "ready", in_flight=2), big), ent(rep("m#2"))]
        assert step.decide(es, nodes, 10.0, pools=[p]).actions == (
            step.Run(small, Plan("start", "m#2")),)
        taken = [*es[:1], ent(rep("m#2"), ""), ent(rep("other", "ready", gib=5.0), small)]
        assert step.decide(taken, nodes, 10.0, pools=[p]).actions == (
            step.Run(big, Plan("start", "m#2")),)  # no room elsewhere: beside its sibling
        other = [*es, ent(rep("n#1", "ready", gib=1.0), small)]  # another model's replica
        assert step.decide(other, nodes, 10.0, pools=[p]).actions == (
            step.Run(small, Plan("start", "m#2")),)


def test_autoscaling_adds_a_replica_above_its_target_and_drops_it_after_ttl() -> None:
    p = pool("m#1", "m#2", low=1, high=2, target=2.0)
    calm = [ent(rep("m#1", "ready", in_flight=2), "n1"), ent(rep("m#2"))]
    assert step.decide(calm, NODES2, 50.0, pools=[p]).actions == ()  # at its target: enough
    hot = [ent(rep("m#1", "ready", in_flight=3), "n1"), ent(rep("m#2"))]
    assert step.decide(hot, NODES2, 50.0, pools=[p]).actions == (
        step.Run("n2", Plan("start", "m#2")),)
    full = [ent(rep("m#1", "ready", in_flight=8), "n1"), ent(rep("m#2", "ready"), "n2")]
    assert step.decide(full, NODES2, 50.0, pools=[p]).actions == ()  # at max
    idle = [ent(rep("m#1", "ready", last_used=0.0), "n1", ttl=30.0),
            ent(rep("m#2", "ready", last_used=1.0), "n2", ttl=30.0)]
    (stop,) = step.decide(idle, NODES2, 100.0, pools=[p]).actions
    assert isinstance(stop, step.Expire)  # one goes, the other stays: min 1
    left = [e for e in idle if e.view.name != stop.name]
    assert step.decide(left, NODES2, 200.0, pools=[p]).actions == ()


def test_min_one_keeps_a_replica_up_without_requests() -> None:
    p = pool("m#1", "m#2", low=1, high=2, target=4.0)
    assert step.decide([ent(rep("m#1")), ent(rep("m#2"))], NODES2, 1.0, pools=[p]).actions[0] \
        == step.Run("n1", Plan("start", "m#1"))
    none = pool("m#1", "m#2", low=0, high=2, target=4.0)
    assert step.decide([ent(rep("m#1")), ent(rep("m#2"))], NODES2, 1.0, pools=[none]) \
        .actions == ()


def test_a_failed_replica_leaves_the_queue_to_its_sibling() -> None:
    p = pool("m#1", "m#2", waiters=2, high=2)
    es = [ent(rep("m#1", "failed"), failures=(9.0,)), ent(rep("m#2"))]
    out = step.decide(es, {"": 16.0}, 10.0, step.Rules(restart_backoff_s=4.0), pools=[p])
    assert out.actions == (step.Run("", Plan("start", "m#2")),)  # #1 is in its backoff


def test_replicas_in_models_yaml() -> None:
    assert ReplicasConfig(min=1, max=3).target == 4.0
    with pytest.raises(ValueError, match="above max"):
        ReplicasConfig(min=3, max=2)


# -- real engines ---------------------------------------------------------------------------
def two(**entry: Any) -> dict[str, Any]:
    return model(1.0, replicas=2, **entry)


async def test_fixed_replicas_balance_least_in_flight_and_name_the_replica(
        tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"m": two()}, delay=0.2,
                      stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.02"})
    async with routed_app(sup) as (url, _app):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        first = await client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert first.headers["x-vlmhub-replica"].startswith("m#")
        for _ in range(100):  # the second replica comes up beside the first
            if all(i.state == "ready" for i in sup.snapshot()[0].replicas):
                break
            await asyncio.sleep(0.1)
        (info,) = sup.snapshot()
        assert [i.replica for i in info.replicas] == ["m#1", "m#2"]
        assert {i.state for i in info.replicas} == {"ready"}
        assert len({i.port for i in info.replicas}) == 2

        async def one() -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
            return raw.headers["x-vlmhub-replica"].split("@")[0]

        served = collections.Counter(await asyncio.gather(*(one() for _ in range(64))))
        assert set(served) == {"m#1", "m#2"} and sum(served.values()) == 64
        assert max(served.values()) <= 1.2 * min(served.values())
        await client.close()
        async with httpx.AsyncClient(base_url=url, trust_env=False) as http:
            (row,) = (await http.get("/api/models")).json()["models"]
            assert row["name"] == "m" and row["state"] == "ready"
            assert [(r["replica"], r["state"]) for r in row["replicas"]] == [
                ("m#1", "ready"), ("m#2", "ready")]
            text = (await http.get("/metrics")).text
            for name in ("m#1", "m#2"):
                assert f'vlmhub_replica_state{{model="m",replica="{name}",state="ready"}} 1.0' \
                    in text
        history = History()  # the dashboard's memory chart: both engines' memory
        history.sample(sup.snapshot(), sleep_residuals(sup))
        assert history.samples[-1][1] == {"m": 2.5}  # two engines of 1.25 GiB
        rt = ProcessRuntime(sup.config.runtime, state_dir=tmp_path / "state")
        rows = await _ps_rows(Engines(None, [rt], budgets={"m": 1.25}))  # vlmhub ps
        assert {r["name"]: r["vram_gib"] for r in rows} == {"m#1": 1.25, "m#2": 1.25}


async def test_a_replica_that_dies_fails_only_its_own_requests(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"m": two()}, delay=0.2)
    await sup.start()
    try:
        lease = await sup.acquire("m")
        for _ in range(100):
            if all(r.state == "ready" for r in sup.replicas.values()):
                break
            await asyncio.sleep(0.1)
        a = await sup.acquire("m")
        b = await sup.acquire("m")
        assert {a.replica, b.replica} == {"m#1", "m#2"}  # least in flight: one each... plus
        sup.release(lease)
        dead = sup.replicas[a.replica]
        assert dead.handle is not None
        await sup.runtime.stop(dead.handle, timeout_s=2.0)
        sup.report_failure(a, "connection reset")
        for _ in range(50):
            if a.revoked is not None and a.revoked.done():
                break
            await asyncio.sleep(0.1)
        assert a.revoked is not None and a.revoked.done()
        assert b.revoked is not None and not b.revoked.done()  # the other one serves on
        more: list[Lease] = await asyncio.gather(*(sup.acquire("m") for _ in range(4)))
        assert {x.replica for x in more} == {b.replica}  # waiting work moved to the live one
        for x in (a, b, *more):
            sup.release(x)
    finally:
        await sup.shutdown()


# -- vlmhub simulate: the same step, in simulated time ---------------------------------------
def test_simulate_runs_two_replicas_on_two_gpus_through_the_shared_step() -> None:
    m = SimModel("m", 5.0, start_s=10.0, replicas=(0, 2, None), ttl=60.0)
    other = SimModel("o", 5.0, start_s=10.0, ttl=5.0)
    draws = tuple(Draw("m", 2.0) for _ in range(400))
    trace = Trace("burst", clients=(Clients(16, draws),),
                  requests=(Request(0.0, "o", 1.0),))
    sim = Simulation(SimConfig((m, other), 8.0, gpus=2), trace)
    out = sim.run()
    assert out.served == 401 and out.refused == {"queue_full": 0, "refused": 0, "timeout": 0}
    served = collections.Counter(q.rep for q in sim.reqs if q.model == "m")
    assert set(served) == {"m#1", "m#2"}
    events = [what for _, what in sim.timeline]
    second = next(i for i, what in enumerate(events) if what.startswith("start m#2"))
    assert "evicting" not in events[second]  # room without eviction: after o's ttl stop
    assert events.index("o stopped") < second
    one = Simulation(SimConfig((replace(m, replicas=(0, 1, None)),), 8.0, gpus=2),
                     replace(trace, requests=()))
    one.run()
    assert {q.rep for q in one.reqs if q.model == "m"} == {"m"}  # one replica: its own name


async def test_autoscaling_goes_from_min_to_max_under_a_burst_and_back(tmp_path: Path) -> None:
    scaled = model(1.0, ttl=1.0, replicas={"min": 1, "max": 2, "target": 2})
    sup, _, _ = build(tmp_path, {"m": scaled}, delay=0.3,
                      stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.05"})

    def states() -> list[str]:
        return [i.state for i in sup.snapshot()[0].replicas]

    async def until(cond: Any, what: str) -> None:
        for _ in range(200):
            if cond():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what}: {states()}")

    async with routed_app(sup) as (url, _app):
        await until(lambda: states() == ["ready", "stopped"], "min 1 is up without a request")
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        async def one() -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=16)
            assert raw.parse().choices[0].message.content
            return raw.headers["x-vlmhub-replica"].split("@")[0]

        burst = [asyncio.create_task(one()) for _ in range(12)]
        await until(lambda: states() == ["ready", "ready"], "a second replica under the burst")
        burst += [asyncio.create_task(one()) for _ in range(12)]
        served = collections.Counter(await asyncio.gather(*burst))  # none lost: all answered
        assert sum(served.values()) == 24 and served["m#2"] > 0
        await until(lambda: sorted(states()) == ["ready", "stopped"], "back to min after ttl")
        await asyncio.sleep(1.5)  # and it stays at min: the last one is kept through its ttl
        assert sorted(states()) == ["ready", "stopped"]
        await client.close()


# -- the shipped example ----------------------------------------------------------------------
def test_the_shipped_example_serves_one_model_on_two_engines(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    example = REPO / "examples" / "replicas.yaml"
    log = tmp_path / "route.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vlmhub", "route", "--config",
                                 str(example), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60)

        def one(_: int) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model="dots-ocr-demo", messages=[{"role": "user", "content": "hi"}],
                max_tokens=4)
            return raw.headers["x-vlmhub-replica"].split("@")[0]

        assert one(0).startswith("demo-ocr#")
        for _ in range(300):
            (row,) = httpx.get(url + "/api/models").json()["models"]
            if [r["state"] for r in row["replicas"]] == ["ready", "ready"]:
                break
            time.sleep(0.1)
        assert sorted(r["node"] for r in row["replicas"]) == ["gpu0", "gpu1"]  # a card each
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(one, range(8))) == {"demo-ocr#1", "demo-ocr#2"}
        ps = subprocess.run([sys.executable, "-m", "vlmhub", "ps", "--config", str(example),
                             "--json"], env=env, capture_output=True, text=True, check=True)
        assert sorted(r["name"] for r in json.loads(ps.stdout)) == ["demo-ocr#1", "demo-ocr#2"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


class SlowSecond(ProcessRuntime):
    """The real process runtime; the second replica's stand-in takes 3 s to start."""

    async def start(self, req: LaunchRequest) -> EngineHandle:
        if req.name.endswith("#2"):
            req = replace(req, env={**req.env, "VLMHUB_STUB_STARTUP_DELAY": "3"})
        return await super().start(req)


async def test_requests_queued_when_a_replica_dies_wait_for_the_one_starting(
        tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"m": two()}, delay=0.2, runtime_type=SlowSecond)
    await sup.start()
    try:
        first = await sup.acquire("m")
        assert first.replica == "m#1"
        for _ in range(50):  # the second replica is starting (slowly) beside the first
            if sup.replicas["m#2"].state == "starting":
                break
            await asyncio.sleep(0.05)
        dead = sup.replicas["m#1"]
        assert dead.handle is not None and sup.replicas["m#2"].state == "starting"
        await sup.runtime.stop(dead.handle, timeout_s=2.0)
        sup.report_failure(first, "connection reset")
        for _ in range(50):
            if dead.state != "ready":
                break
            await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(sup.acquire("m")) for _ in range(3)]
        leases = await asyncio.gather(*waiting)  # none failed: they waited for m#2
        assert {x.replica for x in leases} == {"m#2"}
        assert first.revoked is not None and first.revoked.done()
        for x in (first, *leases):
            sup.release(x)
    finally:
        await sup.shutdown()


async def test_a_reload_changes_the_number_of_replicas(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"m": model(1.0)}, delay=0.2)
    await sup.start()

    async def settle(names: list[str]) -> None:
        for _ in range(200):
            ready = sorted(n for n, r in sup.replicas.items() if r.state == "ready")
            if ready == names and sorted(sup.replicas) == names:
                return
            await asyncio.sleep(0.05)
        raise AssertionError({n: r.state for n, r in sup.replicas.items()})

    try:
        sup.release(await sup.acquire("m"))
        reconfigure(tmp_path, sup, {"m": two()})  # the one engine goes, two come
        held = await sup.acquire("m")  # served throughout: by the old engine or a new one
        sup.release(held)
        sup.release(await sup.acquire("m"))
        await settle(["m#1", "m#2"])
        reconfigure(tmp_path, sup, {"m": model(1.0)})  # and back to one
        sup.release(await sup.acquire("m"))
        await settle(["m"])
        assert [i.replicas for i in sup.snapshot()] == [()]
    finally:
        await sup.shutdown()
