"""Issue 23: the sleep-aware plan (caps that let a model wake beside the others' residue),
host RAM as a second budget (level 1 or 2 per eviction), and both levels in `vlmhub simulate`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmhub.cli import app
from vlmhub.config.registry import Registry
from vlmhub.scheduling.policy import Demand, Waiter, decide
from vlmhub.scheduling.scheduler import ReplicaView, host_free_gib, plan
from vlmhub.scheduling.simtrace import parse_trace
from vlmhub.scheduling.simulate import SimConfig, SimModel, Simulation
from vlmhub.sizing.sleepplan import plan_sleep, residues
from vlmhub.sizing.vram import Gpu, budget_for
from vlmhub.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "vlmhub" / "examples" / "models.yaml"
MIXED3 = ROOT / "benchmarks" / "traces" / "mixed3.jsonl"


def seed_specs() -> tuple[ModelSpec, ModelSpec, ModelSpec]:
    """The shipped models.yaml's three models (variants as there)."""
    specs = Registry().specs()
    return (specs["dots-ocr"].with_variant("fp8"), specs["qwen3-vl"].with_variant("2b-fp8"),
            specs["phi3-vision"])


# -- 1. the sleep-aware plan ------------------------------------------------------------------
def test_each_set_is_capped_to_wake_beside_the_others_residue() -> None:
    # A 16 GB card (15.5 usable): at their defaults the pair needs 14.41 GiB and phi3-vision
    # 10.73; beside phi3-vision's residue the pair has 15.5 - 1.25 = 14.25, and phi3-vision
    # beside both of theirs 13.0. The planner lowers the pair's caps so that every switch is a
    # wake; phi3-vision already fits.
    dots, qwen, phi3 = seed_specs()
    gpu = Gpu(16, 0.5)
    sp = plan_sleep([[dots, qwen], [phi3]], frozenset({"dots-ocr", "qwen3-vl", "phi3-vision"}),
                    gpu)
    left = residues([dots, qwen, phi3])
    assert all(s.all_wake and s.plan.fits for s in sp.sets)
    for s in sp.sets:
        beside = sum(left[n] for n in s.others)
        assert s.plan.total_gib + beside <= gpu.usable_gib + 1e-9
    pair = sp.of("dots-ocr")
    assert pair is not None and pair.plan.lowered
    assert pair.plan.default_total_gib + left["phi3-vision"] > gpu.usable_gib  # needed it


def test_on_the_seed_card_phi3_is_capped_beside_as_many_residues_as_its_floors_allow() -> None:
    # 12 GB, 0.5 reserved: phi3-vision's weights, activation and context alone are 9.23 GiB,
    # so beside both residues (2.5 GiB) it never fits; beside one (11.5 - 1.25 = 10.25) it does,
    # with a lower max_model_len. The plan says a switch to it stops one sleeper.
    dots, qwen, phi3 = seed_specs()
    gpu = Gpu(12, 0.5)
    sp = plan_sleep([[dots, qwen], [phi3]], frozenset({"dots-ocr", "qwen3-vl", "phi3-vision"}),
                    gpu)
    s = sp.of("phi3-vision")
    assert s is not None and s.plan.fits and s.beside == 1 and not s.all_wake
    assert s.plan.total_gib <= gpu.usable_gib - 1.25 + 1e-9
    assert budget_for(phi3).footprint_gib > s.plan.total_gib  # lowered from its default
    assert "stopping 1 of" in s.switch()
    assert sp.cold_switches


def test_non_sleepers_leave_no_residue_so_nothing_is_lowered() -> None:
    phi3 = seed_specs()[2]
    sp = plan_sleep([[phi3]], frozenset(), Gpu(12, 0.5))
    assert sp.sets[0].all_wake and not sp.sets[0].plan.lowered


def test_vlmhub_plan_shows_the_switch_plan(tmp_path: Path) -> None:
    text = SEED.read_text().replace("    ttl: 600\n", "    ttl: 600\n    sleep: true\n")
    text = text.replace("    ttl: 1800\n", "    ttl: 1800\n    sleep: true\n")
    cfg = tmp_path / "models.yaml"
    cfg.write_text(text)
    out = CliRunner().invoke(app, ["plan", "--config", str(cfg), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    phi3 = next(s for s in doc["switches"] if s["set"] == ["phi3-vision"])
    assert phi3["beside"] == 1 and phi3["switch"] == "wake, stopping sleepers"
    assert phi3["lowered"]["phi3-vision"]  # caps against the defaults
    budget = next(m for m in doc["models"] if m["name"] == "phi3-vision")["budget_gib"]
    assert budget <= phi3["room_gib"] + 1e-3


def test_vlmhub_plan_shows_host_ram_beside_the_gpu(tmp_path: Path) -> None:
    text = SEED.read_text().replace("    ttl: 600\n", "    ttl: 600\n    sleep: true\n")
    cfg = tmp_path / "models.yaml"
    cfg.write_text(text + "host:\n  total_gib: 6\n  reserve_gib: 2\n")
    out = CliRunner().invoke(app, ["plan", "--config", str(cfg), "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    weights = sum(m["weights_gib"] for m in doc["models"] if m.get("sleep"))
    assert doc["host"]["total_gib"] == 6 and doc["host"]["usable_gib"] == 4
    assert doc["host"]["sleepers_weights_gib"] == pytest.approx(weights, abs=1e-3)
    assert doc["host"]["all_level1"] == (weights <= 4)
    shown = CliRunner().invoke(app, ["plan", "--config", str(cfg)])
    assert shown.exit_code == 0, shown.output
    assert "Host RAM:" in shown.output and "level-1 sleepers" in shown.output


# -- 2. host RAM: level 1 or 2 per eviction, never over the host budget -----------------------
def view(name: str, state: str, gib: float = 5.0, **kw: object) -> ReplicaView:
    return ReplicaView(name=name, state=state, footprint_gib=gib, can_sleep=True,  # type: ignore[arg-type]
                       **kw)  # type: ignore[arg-type]


def test_a_victim_sleeps_at_level_1_where_the_host_has_room_else_level_2_else_stops() -> None:
    a = view("a", "ready", host_gib=4.0, last_used=0.0)
    t = view("t", "stopped")
    assert plan("t", [a, t], 8.0, 100.0, host_gib=6.0).evict[0].level == 1
    p = plan("t", [a, t], 8.0, 100.0, host_gib=3.0)
    assert (p.evict[0].mode, p.evict[0].level) == ("sleep", 2)
    slow = view("a", "ready", host_gib=4.0, wake2_s=90.0, reload_cost_s=60.0)
    assert plan("t", [slow, t], 8.0, 100.0, host_gib=3.0).evict[0].mode == "stop"


def test_host_budget_is_never_exceeded_in_random_situations() -> None:
    rng = random.Random(23)
    for _ in range(2000):
        host = rng.uniform(0, 16)
        vs, held = [], 0.0
        for i in range(rng.randint(1, 5)):
            state = rng.choice(["ready", "sleeping", "stopped"])
            level = rng.choice([1, 2])
            w = rng.uniform(0.5, 8)
            if state == "sleeping" and level == 1 and held + w > host:
                level = 2  # a valid start: within the host budget
            held += w if state == "sleeping" and level == 1 else 0.0
            vs.append(view(f"m{i}", state, rng.uniform(1, 6), host_gib=w, level=level,
                           last_used=rng.uniform(0, 50)))
        target = rng.choice(vs)
        p = plan(target.name, vs, 12.0, 100.0, host_gib=host)
        by = {v.name: v for v in vs}
        after = dict(by)
        for ev in p.evict:
            v = by[ev.name]
            if ev.mode == "sleep":
                after[ev.name] = ReplicaView(**{**v.__dict__, "state": "sleeping",
                                                "level": ev.level})
            else:
                after[ev.name] = ReplicaView(**{**v.__dict__, "state": "stopped"})
        assert host_free_gib(list(after.values()), host) >= -1e-9


def test_a_swap_to_a_sleeper_is_priced_at_its_wake_not_its_cold_start() -> None:
    # b (cold start 120 s) serves one request; a sleeps (wake 2 s, cold 60 s). One request has
    # waited 10 s for a: 4 x 10 = 40 request-s. Priced at cold starts (60 + 120 s) the swap
    # waits for 360; at what it costs (a's wake, b's wake after its sleep: 4 s) it runs now.
    a = view("a", "sleeping", reload_cost_s=60.0, wake_s=2.0, host_gib=1.0)
    b = view("b", "ready", 6.0, reload_cost_s=120.0, wake_s=2.0, in_flight=1, host_gib=1.0)
    d = decide([a, b], [Demand("a", (Waiter(1000.0),))], 8.0, 1010.0)
    assert d.plan is not None and d.plan.action == "wake"
    assert [(e.name, e.mode) for e in d.plan.evict] == [("b", "sleep")]


# -- 6. the simulator: both levels and the host ledger -----------------------------------------
def _sim(host: float, wake2_s: float = 6.0) -> Simulation:
    models = tuple(SimModel(n, 5.0, 10.0, can_sleep=True, sleep_gib=1.0, host_gib=4.0)
                   for n in ("a", "b", "c"))
    text = "".join(json.dumps({"t": 30.0 * i, "model": "abc"[i % 3], "duration": 1.0}) + "\n"
                   for i in range(12))
    cfg = SimConfig(models, 8.0, host_gib=host, wake2_s=wake2_s)
    return Simulation(cfg, parse_trace(text))


def test_simulated_host_ram_stays_in_budget_with_level_2_sleeps() -> None:
    # Three 5 GiB models on 8 GiB, 4 GiB of weights each: with a 16 GiB host every eviction
    # sleeps at level 1; with 5 GiB only one level-1 sleeper fits, the rest sleep at level 2.
    roomy = _sim(16.0)
    r = roomy.run()
    assert r.sleeps2 == 0 and r.host_peak_gib > 5.0
    tight = _sim(5.0)
    t = tight.run()
    assert t.sleeps2 > 0 and t.host_peak_gib <= 5.0 + 1e-9
    assert t.wakes == r.wakes and t.loads == r.loads  # still wakes, not cold starts
    assert any("(level 2)" in what for _, what in tight.timeline)


def test_a_level_2_wake_costs_its_own_time() -> None:
    fast, slow = _sim(0.0, wake2_s=3.0).run(), _sim(0.0, wake2_s=9.0).run()
    assert fast.sleeps2 > 0 and fast.wakes == slow.wakes
    assert slow.loading_s - fast.loading_s == pytest.approx(6.0 * slow.wakes)


def test_mixed3_on_the_seed_card_the_sleep_plan_turns_cold_loads_into_wakes(
    tmp_path: Path,
) -> None:
    # The second row: models.yaml with sleep on all three. Planned without the residue,
    # phi3-vision fills the card and most switches are cold starts; with the plan most are
    # wakes, and a 16 GiB host is never exceeded.
    text = SEED.read_text().replace("    ttl: 600\n", "    ttl: 600\n    sleep: true\n")
    text = text.replace("    ttl: 1800\n", "    ttl: 1800\n    sleep: true\n")
    cfg = tmp_path / "models.yaml"
    cfg.write_text(text)
    out = CliRunner().invoke(app, ["simulate", str(MIXED3), "--config", str(cfg), "--json",
                                   "--host-gib", "16"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    plain = CliRunner().invoke(app, ["simulate", str(MIXED3), "--config", str(SEED), "--json"])
    p = json.loads(plain.output)
    assert r["wakes"] > r["loads"] and r["loads"] * 3 < p["loads"]
    assert r["loading_fraction"] < p["loading_fraction"] / 2
    assert r["host_peak_gib"] <= 16 and r["refused"]["refused"] == 0
