"""Per-node placement (scheduling.placement), table-tested: which node a waiting model goes to, one
operation per node at a time, pinned/busy rules per node, dead nodes, and the single-GPU case
being exactly the single-GPU policy."""

from __future__ import annotations

import pytest

from vlmhub.scheduling import policy
from vlmhub.scheduling.placement import choose_node, decide
from vlmhub.scheduling.policy import Demand, Params, Waiter
from vlmhub.scheduling.scheduler import Evict, Plan, ReplicaView

NOW = 1000.0
FIFO = Params(name="fifo")


def rv(name: str, state: str = "stopped", gib: float = 5.0, **kw: object) -> ReplicaView:
    return ReplicaView(name=name, state=state, footprint_gib=gib, **kw)  # type: ignore[arg-type]


def want(*names: str) -> list[Demand]:
    return [Demand(n, (Waiter(NOW - 1),)) for n in names]


NODES = {"a": 7.5, "b": 7.5}

# (case, target, views, where, busy nodes, expected node, expected plan)
Case = tuple[str, str, list[ReplicaView], dict[str, str], frozenset[str], str | None, Plan]
WAIT_Z = Plan("wait", "y", reason="one engine changes at a time: z is starting")
CASES: list[Case] = [
    ("ready where it runs", "x", [rv("x", "ready")], {"x": "b"}, frozenset(), "b",
     Plan("ready", "x")),
    ("a sleeping engine wakes where it sleeps", "x", [rv("x", "sleeping", can_sleep=True)],
     {"x": "b"}, frozenset(), "b", Plan("wake", "x")),
    ("spread: the node with room, no eviction", "y", [rv("x", "ready"), rv("y")], {"x": "a"},
     frozenset(), "b", Plan("start", "y")),
    ("room beats an eviction even on a busy-free node", "y",
     [rv("x", "ready"), rv("z", "starting", 2.0), rv("y")], {"x": "a", "z": "b"},
     frozenset({"b"}), "b", WAIT_Z),
    ("both full, idle alike: evict the cheaper victim", "y",
     [rv("p", "ready", reload_cost_s=100.0), rv("q", "ready", reload_cost_s=10.0), rv("y")],
     {"p": "a", "q": "b"}, frozenset(), "b", Plan("start", "y", (Evict("q", "stop"),))),
    ("the victim idle longest for its reload cost", "y",
     [rv("p", "ready", reload_cost_s=2.0, last_used=NOW - 1), rv("q", "ready", reload_cost_s=2.0,
      last_used=NOW - 30), rv("y")], {"p": "a", "q": "b"}, frozenset(), "b",
     Plan("start", "y", (Evict("q", "stop"),))),
    ("a busy victim goes last", "y",
     [rv("p", "ready", reload_cost_s=1.0, in_flight=1), rv("q", "ready", reload_cost_s=40.0),
      rv("y")], {"p": "a", "q": "b"}, frozenset(), "b", Plan("start", "y", (Evict("q", "stop"),))),
    ("pinned holds per node: go to the other node", "y",
     [rv("p", "ready", pinned=True, reload_cost_s=1.0), rv("q", "ready", reload_cost_s=500.0),
      rv("y")], {"p": "a", "q": "b"}, frozenset(), "b", Plan("start", "y", (Evict("q", "stop"),))),
    ("a model still placed on a dead node waits to be failed there", "x",
     [rv("x", "stopping")], {"x": "gone"}, frozenset(), None,
     Plan("wait", "x", reason="its node gone is gone")),
    ("a failed model restarts on a live node", "x", [rv("x", "failed"), rv("w", "ready")],
     {"x": "gone", "w": "a"}, frozenset(), "b", Plan("start", "x")),
]


@pytest.mark.parametrize(("case", "target", "views", "where", "busy", "node", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_choose_node(case: str, target: str, views: list[ReplicaView], where: dict[str, str],
                     busy: frozenset[str], node: str | None, expected: Plan) -> None:
    t = next(v for v in views if v.name == target)
    got_node, got = choose_node(t, NODES, views, where, NOW, busy)
    assert got_node == node, case
    assert (got.action, got.evict) == (expected.action, expected.evict), case
    if expected.reason:
        assert got.reason == expected.reason, case


def test_too_big_for_every_node_is_refused_with_each_nodes_reason() -> None:
    _, p = choose_node(rv("big", gib=9.0), NODES, [rv("big", gib=9.0)], {}, NOW)
    assert p.action == "refuse"
    assert "a: big needs 9.00 GiB" in p.reason and "b: big needs 9.00 GiB" in p.reason


def test_no_live_node_is_refused() -> None:
    _, p = choose_node(rv("x"), {}, [rv("x")], {}, NOW)
    assert (p.action, p.reason) == ("refuse", "no GPU node is available (no live Ray node)")


def test_a_model_on_a_dead_node_is_neither_planned_nor_refused() -> None:
    d = decide(NODES, [rv("x", "stopping")], {"x": "gone"}, want("x"), NOW, FIFO)
    assert (d.plans, d.refuse) == ((), ())


def test_two_nodes_start_two_models_at_once() -> None:
    views = [rv("x"), rv("y")]
    d = decide(NODES, views, {}, want("x", "y"), NOW, FIFO)
    assert sorted((n, p.target, p.action) for n, p in d.plans) == [
        ("a", "x", "start"), ("b", "y", "start")]


def test_one_start_at_a_time_per_node() -> None:
    """Three models, two nodes with room for two each: two starts now, one per node; the third
    waits for a node's slot, and the busy node gets nothing new."""
    nodes = {"a": 12.0, "b": 12.0}
    views = [rv("x"), rv("y"), rv("z")]
    d = decide(nodes, views, {}, want("x", "y", "z"), NOW, FIFO)
    assert len(d.plans) == 2 and len({n for n, _ in d.plans}) == 2
    views = [rv("x", "starting"), rv("y"), rv("z")]
    d = decide(nodes, views, {"x": "a"}, want("y", "z"), NOW, FIFO, busy=frozenset({"a"}))
    assert [(n, p.target) for n, p in d.plans] == [("b", "y")]
    assert d.busy_nodes == frozenset({"a"})  # z waits for a's slot


def test_a_swap_on_one_node_leaves_the_other_alone() -> None:
    views = [rv("p", "ready", last_used=1.0), rv("q", "ready", last_used=999.0), rv("y")]
    d = decide(NODES, views, {"p": "a", "q": "b"}, want("y"), NOW, FIFO)
    assert [(n, p.evict) for n, p in d.plans] == [("a", (Evict("p", "stop"),))]


SINGLE = [
    ([rv("a"), rv("b", "ready", last_used=10.0)], want("a")),
    ([rv("a", gib=4), rv("b", "ready", gib=4), rv("c", "starting", gib=4)], want("a")),
    ([rv("a", gib=20)], want("a")),
    ([rv("a"), rv("b", "ready", in_flight=1, loaded_at=NOW - 1)], want("a")),
    ([rv("a", gib=3), rv("b", gib=3), rv("c", "ready", gib=3)], want("a", "b")),
]


@pytest.mark.parametrize(("views", "demand"), SINGLE)
@pytest.mark.parametrize("params", [Params(), FIFO])
def test_one_gpu_is_exactly_the_single_gpu_policy(
    views: list[ReplicaView], demand: list[Demand], params: Params
) -> None:
    d = decide({"": 7.5}, views, {}, demand, NOW, params)
    one = policy.decide(views, demand, 7.5, NOW, params)
    assert d.plans == ((("", one.plan),) if one.plan is not None else ())
    assert (d.refuse, d.deferred, d.recheck_at) == (one.refuse, one.deferred, one.recheck_at)


# -- tensor parallelism: an engine on several devices at once ----------------------------------
THREE = {"gpu0": 8.0, "gpu1": 8.0, "gpu2": 8.0}


def test_a_tp_engine_takes_devices_with_room_and_counts_on_each() -> None:
    from vlmhub.scheduling.placement import members, on_node

    views = [rv("a", "ready", 5.0), rv("big", gib=5.0, devices=2)]
    node, p = choose_node(views[1], THREE, views, {"a": "gpu0"}, NOW)
    assert (node, p) == ("gpu1+gpu2", Plan("start", "big"))  # never beside a on gpu0
    assert members("gpu1+gpu2") == ("gpu1", "gpu2")
    placed = {"a": "gpu0", "big": "gpu1+gpu2"}
    running = [views[0], rv("big", "ready", 5.0, devices=2)]
    assert [v.name for v in on_node(running, placed, "gpu2")] == ["big"]  # held on each card
    # a third model fits on no card without evicting; on gpu1 or gpu2 the victim is big
    small = rv("c", gib=4.0, reload_cost_s=1.0)
    node, p = choose_node(small, THREE, [*running, small], placed, NOW)
    assert node is not None and p.action == "start" and len(p.evict) == 1


def test_a_tp_start_makes_room_on_every_device() -> None:
    from vlmhub.scheduling.placement import plan_on

    views = [rv("a", "ready", 5.0), rv("b", "ready", 5.0), rv("big", gib=5.0, devices=2)]
    where = {"a": "gpu0", "b": "gpu1"}
    p = plan_on("big", views, "gpu0+gpu1", THREE, where, NOW)
    assert p.action == "start" and {e.name for e in p.evict} == {"a", "b"}  # one per card
    # a pinned model on one of the cards refuses there, naming the card
    pinned = [rv("a", "ready", 5.0, pinned=True), *views[1:]]
    p = plan_on("big", pinned, "gpu0+gpu1", THREE, where, NOW)
    assert p.action == "refuse" and p.reason.startswith("gpu0: big needs")
    # a victim spanning both cards frees both: one eviction, not two
    both = [rv("old", "ready", 6.0, devices=2), rv("big", gib=5.0, devices=2)]
    p = plan_on("big", both, "gpu0+gpu1", THREE, {"old": "gpu0+gpu1"}, NOW)
    assert p == Plan("start", "big", (Evict("old", "stop"),))


def test_more_tp_devices_than_live_nodes_is_refused() -> None:
    big = rv("big", gib=1.0, devices=4)
    _, p = choose_node(big, THREE, [big], {}, NOW)
    assert p.action == "refuse" and "spans 4 GPUs" in p.reason and "3 are live" in p.reason


def test_an_operation_on_a_tp_engines_devices_holds_every_one_of_them() -> None:
    # big starts on gpu0+gpu1; in the same pass, x (which would go to gpu1) must wait
    views = [rv("big", gib=5.0, devices=2), rv("x", gib=7.0), rv("y", "ready", 5.0)]
    two = {"gpu0": 8.0, "gpu1": 8.0}
    d = decide(two, views, {"y": "gpu0"}, want("big"), NOW, FIFO,
               busy=frozenset({"gpu0+gpu1"}))
    assert d.plans == ()  # both cards are held by the running operation on gpu0+gpu1
    d = decide(two, views, {"y": "gpu0"}, want("x"), NOW, FIFO, busy=frozenset({"gpu0+gpu1"}))
    assert d.plans == ()
    d = decide(two, views, {"y": "gpu0"}, want("big", "x"), NOW, FIFO)
    assert [n for n, _ in d.plans] == ["gpu0+gpu1"]  # x's card is claimed by big's plan


def test_the_step_keeps_a_tp_engines_stop_off_devices_that_run_an_operation() -> None:
    from vlmhub.scheduling import step

    failed = step.Entry(rv("big", "stopping", 5.0, devices=2), node="gpu0+gpu1")
    two = {"gpu0": 8.0, "gpu1": 8.0}
    assert step.decide([failed], two, NOW, busy={"gpu1": "x"}).actions == ()
    assert step.decide([failed], two, NOW).actions == (step.StopFailed("big", "gpu0+gpu1"),)
