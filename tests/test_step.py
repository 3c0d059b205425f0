"""The control loop's one pure step (vlmhub.scheduling.step), shared by the supervisor and
`vlmhub simulate`: table cases of the step itself, then the same situations run through the
live Supervisor (real stand-in engine processes) and through the simulator, whose decisions
must agree: a swap on one GPU, a ttl expiry, a restart backoff and the crash-loop guard, and
two GPU nodes where the second model goes to the other node instead of evicting the first."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from supervisor_support import build, model

from vlmhub.config.schema import RuntimeConfig
from vlmhub.control.contract import AcquireError, LoadTimeout
from vlmhub.control.supervisor import Supervisor
from vlmhub.engines.process import ProcessRuntime
from vlmhub.scheduling import step
from vlmhub.scheduling.policy import Waiter
from vlmhub.scheduling.scheduler import Evict, Plan, ReplicaView, State
from vlmhub.scheduling.simtrace import parse_trace
from vlmhub.scheduling.simulate import Simulation, from_config


def entry(name: str, state: State = "stopped", *, node: str = "", waiters: int = 0,
          **kw: Any) -> step.Entry:
    view = ReplicaView(name, state, 6.0, last_used=kw.pop("last_used", 0.0))
    return step.Entry(view, node, tuple(Waiter(0.0) for _ in range(waiters)), **kw)


RULES = step.Rules(crash_loop_max=3, restart_backoff_s=4.0)


def test_a_failed_model_restarts_at_once_then_after_its_backoff_then_never() -> None:
    once = [entry("a", "failed", waiters=1, failures=(10.0,))]
    assert step.decide(once, {"": 8.0}, 10.5, RULES).actions == (step.Run("", Plan("start", "a")),)
    twice = [entry("a", "failed", waiters=1, failures=(10.0, 11.0))]
    assert step.decide(twice, {"": 8.0}, 14.9, RULES).actions == ()  # backoff: 4 s after 11
    assert step.decide(twice, {"": 8.0}, 15.0, RULES).actions == (
        step.Run("", Plan("start", "a")),)
    loop = [entry("a", "failed", waiters=1, failures=(10.0, 11.0, 20.0))]
    assert step.decide(loop, {"": 8.0}, 30.0, RULES).actions == (
        step.CrashLoop("a", 3, 280.0),)  # Retry-After: until the first failure leaves the window


def test_a_pass_stops_failed_engines_first_one_operation_per_node() -> None:
    # b's engine failed a health check; a waits; c is idle past its ttl: the node is b's now
    es = [entry("a", waiters=1), entry("b", "stopping"), entry("c", "ready", ttl=5.0)]
    assert step.decide(es, {"": 20.0}, 100.0).actions == (step.StopFailed("b", ""),)
    busy = step.decide(es, {"": 20.0}, 100.0, busy={"": None})
    assert busy == step.Step()  # every node runs an operation: nothing at all


def test_ttl_waits_while_queued_work_waits_for_a_changing_engine_on_its_node() -> None:
    # a is starting on n1; b, asleep there, waits for it to wake; c on n1 and d on n2 are idle
    # past their ttl: n1's ttl stop waits, n2's goes ahead
    es = [entry("a", "starting", node="n1"), entry("b", "sleeping", node="n1", waiters=1),
          entry("c", "ready", node="n1", ttl=5.0), entry("d", "ready", node="n2", ttl=5.0)]
    out = step.decide(es, {"n1": 20.0, "n2": 20.0}, 100.0)
    assert [a for a in out.actions if isinstance(a, step.Expire)] == [step.Expire("d", "n2")]


def test_two_nodes_place_the_second_model_beside_instead_of_evicting() -> None:
    es = [entry("a", "ready", node="n1", last_used=1.0), entry("b", waiters=1)]
    assert step.decide(es, {"n1": 8.0, "n2": 8.0}, 100.0).actions == (
        step.Run("n2", Plan("start", "b")),)
    assert step.decide([es[0], replace(es[1], node="")], {"": 8.0}, 100.0).actions == (
        step.Run("", Plan("start", "b", (Evict("a", "stop"),))),)


# -- the same situations, live and simulated ---------------------------------------------------

class Events:
    """An observer that keeps the supervisor's loads and evictions in order, in the words of
    the simulator's timeline ("a ready", "a failed", "a stopped", "a sleeping")."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        self.seen.append(f"{model} {'ready' if ok else 'failed'}")

    def observe_eviction(self, model: str, mode: str) -> None:
        self.seen.append(f"{model} {'sleeping' if mode == 'sleep' else 'stopped'}")


class Gpus(ProcessRuntime):
    """Stand-in engines as local processes, on ``gpus`` GPU nodes as a Ray cluster lists them
    (``gpu0``, ``gpu1``... of ``total_gib`` each, the simulator's names)."""

    def __init__(self, rc: RuntimeConfig, state_dir: Path, gpus: int, total_gib: float) -> None:
        super().__init__(rc, state_dir=state_dir)
        self.gpus, self.total_gib = gpus, total_gib

    async def nodes(self) -> dict[str, float] | None:
        if self.gpus == 1:
            return None
        return {f"gpu{i}": self.total_gib for i in range(self.gpus)}


async def live(tmp_path: Path, models: dict[str, dict[str, Any]], gpus: int = 1,
               **kw: Any) -> tuple[Supervisor, Events]:
    """A supervisor over stand-in engines on ``gpus`` GPUs of 8 GiB, observed in order."""
    first, _, _ = build(tmp_path, models, delay=0.05, **kw)
    await first.http.aclose()
    events = Events()
    rt = Gpus(first.config.runtime, tmp_path / "state", gpus, 8.0)
    sup = Supervisor([r.model for r in first.replicas.values()], first.config, first.gpu, rt,
                     observer=events, tick_s=0.05)
    await sup.start()
    return sup, events


async def ask(sup: Supervisor, name: str, outcomes: list[str]) -> str | None:
    """One request, as the simulator counts it; the error's message when it is not served."""
    try:
        lease = await asyncio.wait_for(sup.acquire(name), 30)
    except LoadTimeout as exc:
        outcomes.append("timeout")
        return str(exc)
    except AcquireError as exc:
        outcomes.append("refused")
        return str(exc)
    await asyncio.sleep(0.01)
    sup.release(lease)
    outcomes.append("served")
    return None


async def until(sup: Supervisor, name: str, state: str) -> None:
    for _ in range(200):
        if any(i.name == name and i.state == state for i in sup.snapshot()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never became {state}")


def simulated(sup: Supervisor, lines: list[dict[str, Any]], gpus: int = 1,
              fails: dict[str, int] | None = None) -> Simulation:
    """The simulation of ``sup``'s own config (starts 0.5 s, stops 0.1 s), run on the trace."""
    cfg = from_config([r.model for r in sup.replicas.values()], sup.config, sup.gpu.usable_gib,
                      start_s=0.5, stop_s=0.1, gpus=gpus)
    cfg = replace(cfg, models=tuple(replace(m, fails=(fails or {}).get(m.name, 0))
                                    for m in cfg.models))
    sim = Simulation(cfg, parse_trace("".join(json.dumps(x) + "\n" for x in lines)))
    sim.run()
    return sim


def events(sim: Simulation) -> list[str]:
    return [w for _, w in sim.timeline if re.fullmatch(r"\S+ (ready|failed|stopped|sleeping)", w)]


def outcomes(sim: Simulation) -> list[str]:
    return [q.outcome for q in sim.reqs]


def req(t: float, name: str) -> dict[str, Any]:
    return {"t": t, "model": name, "duration": 0.01}


async def test_a_swap_on_one_gpu_live_and_simulated(tmp_path: Path) -> None:
    # a and b (5.75 GiB each) do not fit together on 8 GiB: b's start stops a first
    sup, seen = await live(tmp_path, {"a": model(5.5), "b": model(5.5)})
    done: list[str] = []
    try:
        await ask(sup, "a", done)
        await asyncio.sleep(0.5)  # a is idle: past the policy's busy_grace_s
        await ask(sup, "b", done)
    finally:
        await sup.shutdown()
    sim = simulated(sup, [req(0, "a"), req(5, "b")])
    assert (5.0, "start b, evicting a (stop)") in sim.timeline
    assert seen.seen == events(sim) == ["a ready", "a stopped", "b ready"]
    assert done == outcomes(sim) == ["served", "served"]


async def test_a_ttl_expiry_live_and_simulated(tmp_path: Path) -> None:
    sup, seen = await live(tmp_path, {"a": model(1.0, ttl=1)})
    done: list[str] = []
    try:
        await ask(sup, "a", done)
        await until(sup, "a", "stopped")
        await ask(sup, "a", done)
    finally:
        await sup.shutdown()
    sim = simulated(sup, [req(0, "a"), req(10, "a")])
    assert "ttl: stop a" in [w for _, w in sim.timeline]
    assert seen.seen == events(sim) == ["a ready", "a stopped", "a ready"]
    assert done == outcomes(sim) == ["served", "served"]


async def test_a_restart_backoff_and_the_crash_loop_guard_live_and_simulated(
    tmp_path: Path,
) -> None:
    # every start fails. The first failure restarts at once; after the second the restart
    # waits restart_backoff_s (4 s), longer than the queue_timeout_s (2 s) of the request
    # that came at once: it times out without a start. After the backoff a third start
    # fails, and the crash-loop guard (3 failures) answers the next request without one.
    bad = model(1.0, env={"VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"})
    rc = {"restart_backoff_s": 4.0, "queue_timeout_s": 2.0, "crash_loop_max": 3}
    sup, seen = await live(tmp_path, {"a": bad}, router=rc)
    done: list[str] = []
    try:
        for _ in range(3):
            await ask(sup, "a", done)
        await asyncio.sleep(2.5)  # 4.5 s after the second failure
        await ask(sup, "a", done)
        why = await ask(sup, "a", done)
    finally:
        await sup.shutdown()
    assert why is not None and "crash loop (3 failures in 300 s)" in why
    sim = simulated(sup, [req(0, "a"), req(0.6, "a"), req(1.2, "a"), req(6, "a"), req(7, "a")],
                    fails={"a": 99})
    assert seen.seen == events(sim) == ["a failed"] * 3
    assert done == outcomes(sim) == ["refused", "refused", "timeout", "refused", "refused"]


async def test_two_gpu_nodes_live_and_simulated(tmp_path: Path) -> None:
    # the same two models on two 8 GiB GPUs: b starts on the other GPU, a keeps serving
    models = {"a": model(5.5), "b": model(5.5)}
    sup, seen = await live(tmp_path, models, gpus=2, ledger=False)
    done: list[str] = []
    try:
        await ask(sup, "a", done)
        await asyncio.sleep(0.5)
        await ask(sup, "b", done)
        where = {i.name: i.node for i in sup.snapshot()}
        nodes = dict(sup.nodes)
    finally:
        await sup.shutdown()
    trace = [req(0, "a"), req(5, "b")]
    sim = simulated(sup, trace, gpus=2)
    assert nodes == sim.c.nodes == {"gpu0": 8.0, "gpu1": 8.0}
    assert (5.0, "start b on gpu1") in sim.timeline
    assert seen.seen == events(sim) == ["a ready", "b ready"]
    assert where == {name: r.node for name, r in sim.reps.items()} == {"a": "gpu0", "b": "gpu1"}
    assert done == outcomes(sim) == ["served", "served"]
    assert events(simulated(sup, trace)) == ["a ready", "a stopped", "b ready"]  # one GPU
