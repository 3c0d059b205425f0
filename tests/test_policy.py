"""The swap policy (vlmhub.policy), table-tested with worked-out numbers, plus 2,000 random
situations: an overdue request is never left waiting when its swap is possible."""

from __future__ import annotations

import random

import pytest

from vlmhub.policy import Demand, Params, Waiter, decide, max_wait
from vlmhub.scheduler import ReplicaView

NOW = 1000.0


def rv(name: str, state: str = "stopped", gib: float = 4.0, **kw: object) -> ReplicaView:
    kw.setdefault("reload_cost_s", 10.0)
    return ReplicaView(name=name, state=state, footprint_gib=gib, **kw)  # type: ignore[arg-type]


def waiting(name: str, *ages: float, priority: str = "interactive") -> Demand:
    return Demand(name, tuple(Waiter(NOW - a, priority) for a in ages))  # type: ignore[arg-type]


# a and b are resident on an 8 GiB GPU (4 GiB each); c (4 GiB) needs one of them out.
BUSY_A = rv("a", "ready", in_flight=2, last_used=NOW, loaded_at=NOW - 100)
BUSY_B = rv("b", "ready", in_flight=1, last_used=NOW - 1, loaded_at=NOW - 100)


def target(d: object) -> str | None:
    plan = getattr(d, "plan", None)
    return None if plan is None else plan.target


def test_a_start_that_evicts_nobody_happens_at_once() -> None:
    d = decide([rv("a", "ready"), rv("c")], [waiting("c", 0.0)], 8, NOW)
    assert target(d) == "c" and d.plan is not None and d.plan.evict == ()


def test_a_swap_is_deferred_until_the_waiting_work_pays_for_it() -> None:
    # cost = reload c (10) + reload of the busy victim (10) = 20; value_factor 2 -> 40 needed.
    # Two interactive waiters (weight 4) aged 4 s: 4*4*2 = 32 < 40 -> deferred.
    d = decide([BUSY_A, BUSY_B, rv("c")], [waiting("c", 4.0, 4.0)], 8, NOW)
    assert d.plan is None
    assert d.deferred and d.deferred[0][0] == "c" and "worth less" in d.deferred[0][1]
    # aged 5 s: 4*5*2 = 40 >= 40 -> swap, evicting the less busy... the LRU of equal cost: b
    d = decide([BUSY_A, BUSY_B, rv("c")], [waiting("c", 5.0, 5.0)], 8, NOW)
    assert target(d) == "c" and d.plan is not None
    assert [e.name for e in d.plan.evict] == ["b"] and d.plan.evict[0].busy


def test_an_idle_victim_costs_nothing_but_the_swap_waits_while_the_gpu_serves() -> None:
    idle_b = rv("b", "ready", last_used=NOW - 30, loaded_at=NOW - 100)
    # a still serves: c's waiters are batched (up to their bound) rather than loaded one by one
    d = decide([BUSY_A, idle_b, rv("c")], [waiting("c", 0.0)], 8, NOW)
    assert d.plan is None and "still serving" in d.deferred[0][1]
    d = decide([BUSY_A, idle_b, rv("c")], [waiting("c", 60.0)], 8, NOW)  # bound: 3 x 20 s
    assert target(d) == "c" and d.plan is not None and [e.name for e in d.plan.evict] == ["b"]
    # with nothing else serving, the idle model goes at once
    idle_a = rv("a", "ready", last_used=NOW - 5, loaded_at=NOW - 100)
    d = decide([idle_a, idle_b, rv("c")], [waiting("c", 0.0)], 8, NOW)
    assert target(d) == "c" and d.plan is not None and [e.name for e in d.plan.evict] == ["b"]


def test_a_model_just_loaded_with_work_keeps_its_place() -> None:
    # hold = hold_factor 4 x reload 10 = 40 s after loading; b was loaded 20 s ago and is busy
    fresh_b = rv("b", "ready", in_flight=1, last_used=NOW, loaded_at=NOW - 20)
    fresh_a = rv("a", "ready", in_flight=1, last_used=NOW, loaded_at=NOW - 20)
    d = decide([fresh_a, fresh_b, rv("c")], [waiting("c", 20.0, 20.0, 20.0)], 8, NOW)
    assert d.plan is None and "loaded 20 s ago" in d.deferred[0][1]


def test_the_wait_bound_forces_the_swap() -> None:
    # default interactive bound: 3 x (reload c 10 + costliest other 10) = 60 s
    fresh_b = rv("b", "ready", in_flight=1, last_used=NOW, loaded_at=NOW - 1)
    fresh_a = rv("a", "ready", in_flight=1, last_used=NOW, loaded_at=NOW - 1)
    views = [fresh_a, fresh_b, rv("c")]
    assert max_wait(views[2], views, "interactive", Params()) == 60.0
    assert decide(views, [waiting("c", 59.0)], 8, NOW).plan is None
    assert target(decide(views, [waiting("c", 60.0)], 8, NOW)) == "c"
    # a per-model max_wait_s wins over the derived bound
    p = Params(max_wait_s={"c": {"interactive": 5.0, "batch": 5.0}})
    assert target(decide(views, [waiting("c", 5.0)], 8, NOW, p)) == "c"


def test_interactive_is_served_before_batch_when_both_need_a_swap() -> None:
    views = [rv("a", "ready", last_used=NOW - 50, loaded_at=NOW - 500), rv("b"), rv("c")]
    demand = [waiting("b", 30.0, priority="batch"), waiting("c", 1.0)]
    assert target(decide(views, demand, 4, NOW)) == "c"
    # and under fifo the older batch request wins
    assert target(decide(views, demand, 4, NOW, Params(name="fifo"))) == "b"


def test_batch_yields_to_interactive_and_comes_back_after() -> None:
    batch_a = rv("a", "ready", in_flight=8, last_used=NOW, loaded_at=NOW - 5, priority="batch")
    # interactive c evicts the busy batch model at once: no hold, no price
    d = decide([batch_a, rv("c")], [waiting("c", 0.0)], 4, NOW)
    assert target(d) == "c" and d.plan is not None and d.plan.evict[0].name == "a"
    # while c has interactive work, the batch queue waits (within its bound)...
    chat_c = rv("c", "ready", in_flight=1, last_used=NOW, loaded_at=NOW - 20)
    d = decide([rv("a", priority="batch"), chat_c], [waiting("a", 30.0, priority="batch")], 4, NOW)
    assert d.plan is None and "interactive" in d.deferred[0][1]
    # ...and comes back as soon as c's interactive work is done
    idle_c = rv("c", "ready", last_used=NOW - 1, loaded_at=NOW - 100)
    d = decide([rv("a", priority="batch"), idle_c], [waiting("a", 30.0, priority="batch")], 4, NOW)
    assert target(d) == "a"
    # a batch request past its bound (10 x 20 s = 200 s) forces its way back
    d = decide([rv("a", priority="batch"), chat_c], [waiting("a", 200.0, priority="batch")], 4, NOW)
    assert target(d) == "a"


def test_exclusive_stops_every_other_model() -> None:
    views = [rv("a", "ready", gib=1), rv("b", "ready", gib=1), rv("c", gib=1)]
    d = decide(views, [waiting("c", 0.0)], 8, NOW, Params(name="exclusive"))
    assert d.plan is not None and sorted(e.name for e in d.plan.evict) == ["a", "b"]
    assert all(e.mode == "stop" for e in d.plan.evict)


def test_lru_ignores_reload_cost_and_never_sleeps() -> None:
    cheap_old = rv("a", "ready", last_used=NOW - 100, reload_cost_s=1, can_sleep=True)
    costly_older = rv("b", "ready", last_used=NOW - 200, reload_cost_s=500, can_sleep=True)
    demand = [waiting("c", 0.0)]
    lru = decide([cheap_old, costly_older, rv("c")], demand, 8, NOW, Params(name="lru"))
    assert lru.plan is not None and lru.plan.evict[0].name == "b"
    assert lru.plan.evict[0].mode == "stop"
    ours = decide([cheap_old, costly_older, rv("c")], demand, 8, NOW)
    assert ours.plan is not None and ours.plan.evict[0].name == "a"


def test_one_operation_at_a_time_and_refusals() -> None:
    d = decide([rv("a", "starting"), rv("c")], [waiting("c", 999.0)], 8, NOW)
    assert d.plan is None and not d.refuse
    d = decide([rv("c", gib=20)], [waiting("c", 0.0)], 8, NOW)
    assert d.plan is None and d.refuse and "needs 20.00 GiB" in d.refuse[0][1]


@pytest.mark.parametrize("seed", range(4))
def test_no_starvation_over_random_situations(seed: int) -> None:
    """2,000 situations: whenever a request is past its bound and its model could be started
    (nothing else changing, nothing pinned in the way), the policy starts an overdue model."""
    rng = random.Random(seed)
    for _ in range(500):
        names = ["a", "b", "c", "d"][: rng.randint(2, 4)]
        views = []
        for n in names:
            state = rng.choice(["stopped", "ready", "ready", "sleeping"])
            views.append(rv(
                n, state, gib=rng.choice([2.0, 3.0, 4.0]),
                in_flight=rng.randint(0, 3) if state == "ready" else 0,
                last_used=NOW - rng.uniform(0, 300), loaded_at=NOW - rng.uniform(0, 300),
                reload_cost_s=rng.uniform(1, 120), can_sleep=rng.random() < 0.3,
                priority=rng.choice(["interactive", "batch"]),
            ))
        demand = []
        for v in views:
            if v.state != "ready" and rng.random() < 0.8:
                demand.append(Demand(v.name, tuple(
                    Waiter(NOW - rng.uniform(0, 4000), rng.choice(["interactive", "batch"]))
                    for _ in range(rng.randint(1, 5))
                )))
        d = decide(views, demand, 8.0, NOW)
        by = {v.name: v for v in views}
        overdue = {
            x.name for x in demand
            if any(NOW - w.arrived >= max_wait(by[x.name], views, w.priority, Params())
                   for w in x.waiters)
        }
        refused = {n for n, _ in d.refuse}
        if overdue - refused:
            assert d.plan is not None, (views, demand, d)
            assert d.plan.target in overdue, (views, demand, d)
        if d.plan is not None:  # never over-commits: what stays plus the target fits
            evicted = {e.name: e for e in d.plan.evict}
            held = sum(
                (v.sleep_gib if evicted[v.name].mode == "sleep" else 0.0)
                if v.name in evicted else v.held_gib
                for v in views if v.name != d.plan.target
            )
            assert held + by[d.plan.target].footprint_gib <= 8.0 + 1e-6
