"""The pure scheduler, table-tested: pinned, busy, starting, sleeping, externals, TTL."""

from __future__ import annotations

import pytest

from vlmhub.scheduler import Evict, Plan, ReplicaView, expired, plan, restart_delay


def rv(name: str, state: str = "stopped", gib: float = 4.0, **kw: object) -> ReplicaView:
    return ReplicaView(name=name, state=state, footprint_gib=gib, **kw)  # type: ignore[arg-type]


NOW = 1000.0
CASES: list[tuple[str, str, list[ReplicaView], float, Plan]] = [
    ("already ready", "a", [rv("a", "ready")], 10, Plan("ready", "a")),
    ("fits: start, evict nothing", "a", [rv("a"), rv("b", "ready")], 10, Plan("start", "a")),
    (
        "starting model counts against memory: wait, one start at a time",
        "a",
        [rv("a"), rv("b", "starting", 4)],
        12,
        Plan("wait", "a", reason="one engine changes at a time: b is starting"),
    ),
    (
        "stopping model: wait",
        "a",
        [rv("a"), rv("b", "stopping")],
        12,
        Plan("wait", "a", reason="one engine changes at a time: b is stopping"),
    ),
    (
        "evict the idle one, not the busy one",
        "c",
        [rv("a", "ready", in_flight=2, last_used=10), rv("b", "ready", last_used=900), rv("c")],
        9,
        Plan("start", "c", (Evict("b", "stop"),)),
    ),
    (
        "busy victim is drained when nothing idle is left",
        "c",
        [rv("a", "ready", in_flight=1), rv("c")],
        6,
        Plan("start", "c", (Evict("a", "stop", True),)),
    ),
    (
        "pinned is never evicted: refuse",
        "c",
        [rv("a", "ready", pinned=True), rv("c")],
        6,
        Plan("refuse", "c"),
    ),
    ("too big for the GPU: refuse", "a", [rv("a", gib=20)], 10, Plan("refuse", "a")),
    (
        "LRU tie-break between equal reload costs",
        "c",
        [rv("a", "ready", last_used=500), rv("b", "ready", last_used=100), rv("c")],
        9,
        Plan("start", "c", (Evict("b", "stop"),)),
    ),
    (
        "reload cost protects an expensive model idle for the same time",
        "c",
        [
            rv("a", "ready", last_used=100, reload_cost_s=300),
            rv("b", "ready", last_used=100, reload_cost_s=10),
            rv("c"),
        ],
        9,
        Plan("start", "c", (Evict("b", "stop"),)),
    ),
    (
        "a sleep-capable victim sleeps, keeping its residue",
        "c",
        [rv("a", "ready", can_sleep=True, sleep_gib=1), rv("b", "ready", last_used=NOW), rv("c")],
        9,
        Plan("start", "c", (Evict("a", "sleep"),)),
    ),
    (
        "sleeping is not enough: stop it instead",
        "c",
        [
            rv("a", "ready", can_sleep=True, sleep_gib=3),
            rv("b", "ready", last_used=NOW, pinned=True),
            rv("c"),
        ],
        9,
        Plan("start", "c", (Evict("a", "stop"),)),
    ),
    (
        "wake a sleeping model: make room for the difference first",
        "a",
        [rv("a", "sleeping", sleep_gib=1), rv("b", "ready", gib=6)],
        9,
        Plan("wake", "a", (Evict("b", "stop"),)),
    ),
    (
        "wake without eviction when the rest fits",
        "a",
        [rv("a", "sleeping", sleep_gib=1), rv("b", "ready", gib=2)],
        9,
        Plan("wake", "a"),
    ),
    (
        "sleeping residue of others is stopped when needed",
        "c",
        [rv("a", "sleeping", sleep_gib=1.5), rv("b", "ready", pinned=True), rv("c")],
        9,
        Plan("start", "c", (Evict("a", "stop"),)),
    ),
    (
        "evict only what is needed: one large victim rather than two",
        "c",
        [
            rv("a", "ready", gib=3.3, last_used=100),
            rv("b", "ready", gib=3.6, last_used=500),
            rv("c", gib=4.0),
        ],
        7.5,
        Plan("start", "c", (Evict("b", "stop"),)),
    ),
    (
        "external endpoints hold nothing and are never victims",
        "b",
        [rv("x", "ready", external=True), rv("b")],
        4,
        Plan("start", "b"),
    ),
]


@pytest.mark.parametrize(
    ("why", "target", "replicas", "usable", "want"), CASES, ids=[c[0] for c in CASES]
)
def test_plan(
    why: str, target: str, replicas: list[ReplicaView], usable: float, want: Plan
) -> None:
    got = plan(target, replicas, usable, NOW)
    assert (got.action, got.target, got.evict) == (want.action, want.target, want.evict), why
    if want.reason:
        assert got.reason == want.reason
    if got.action == "refuse":
        assert got.reason


def test_refusal_names_pinned_models() -> None:
    got = plan("c", [rv("a", "ready", pinned=True, gib=5), rv("c", gib=5)], 8, NOW)
    assert got.action == "refuse" and "a (5.00 GiB)" in got.reason and "Unpin" in got.reason


def test_plan_never_exceeds_budget_randomised() -> None:
    import random

    rng = random.Random(7)
    for _ in range(2000):
        reps = [
            rv(
                f"m{i}",
                rng.choice(["stopped", "ready", "sleeping", "failed"]),
                rng.uniform(1, 6),
                sleep_gib=rng.uniform(0.5, 1.5),
                in_flight=rng.choice([0, 0, 1]),
                pinned=rng.random() < 0.2,
                last_used=rng.uniform(0, NOW),
                can_sleep=rng.random() < 0.5,
            )
            for i in range(4)
        ]
        usable = rng.uniform(4, 14)
        held = sum(r.held_gib for r in reps)
        if held > usable:
            continue
        target = rng.choice(reps)
        p = plan(target.name, reps, usable, NOW)
        if p.action not in ("start", "wake"):
            continue
        evicted = {e.name: e for e in p.evict}
        assert not any(reps_by.pinned for reps_by in reps if reps_by.name in evicted)
        after = 0.0
        for r in reps:
            if r.name == target.name:
                after += r.footprint_gib
            elif r.name in evicted:
                after += r.sleep_gib if evicted[r.name].mode == "sleep" else 0.0
            else:
                after += r.held_gib
        assert after <= usable + 1e-6


def test_ttl_expiry() -> None:
    reps = [
        rv("a", "ready", last_used=0),
        rv("b", "ready", last_used=0, in_flight=1),
        rv("c", "ready", last_used=0, pinned=True),
        rv("d", "ready", last_used=990),
        rv("e", "stopped"),
    ]
    ttl = {"a": 60.0, "b": 60.0, "c": 60.0, "d": 60.0, "e": 60.0}
    assert expired(reps, ttl, NOW) == ["a"]
    assert expired(reps, {"a": None}, NOW) == []


def test_restart_backoff() -> None:
    assert [restart_delay(n, 2.0) for n in range(6)] == [0, 0, 2, 4, 8, 16]
    assert restart_delay(20, 2.0, cap_s=60) == 60


def test_a_together_group_is_kept_resident_together() -> None:
    """A member of the target's group is never evicted for it; outsiders go first."""
    views = [
        rv("a", "ready", 3, group="a,b", last_used=1.0),
        rv("x", "ready", 3, last_used=900.0),
        rv("b", "stopped", 3, group="a,b"),
    ]
    p = plan("b", views, 7, NOW)  # a is idler than x, but it is b's partner
    assert p == Plan("start", "b", (Evict("x", "stop"),))
    # without the group, the idlest model (a) would have gone
    plain = [rv("a", "ready", 3, last_used=1.0), views[1], rv("b", "stopped", 3)]
    assert plan("b", plain, 7, NOW) == Plan("start", "b", (Evict("a", "stop"),))
