"""`vlmhub simulate`: small traces whose every number is worked out by hand (in the comments),
each policy's own behaviour on a tiny trace, the trace format's errors, and the command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlmhub.cli import app
from vlmhub.scheduling.policy import Params, PolicyName
from vlmhub.scheduling.simtrace import TraceError, check_models, parse_trace
from vlmhub.scheduling.simulate import (
    SimConfig,
    SimModel,
    SimResult,
    Simulation,
    percentile,
    simulate,
)
from vlmhub.sizing.sleepfacts import wake_price_s


def model(name: str, gib: float = 6.0, start_s: float = 10.0, **kw: object) -> SimModel:
    return SimModel(name=name, footprint_gib=gib, start_s=start_s, **kw)  # type: ignore[arg-type]


def trace(*lines: dict[str, object]) -> str:
    return "".join(json.dumps(x) + "\n" for x in lines)


def run(
    models: list[SimModel], text: str, policy: PolicyName, usable: float = 8.0, **kw: object
) -> tuple[SimResult, list[tuple[float, str]]]:
    cfg = SimConfig(tuple(models), usable, params=Params(name=policy), stop_s=1.0, **kw)  # type: ignore[arg-type]
    sim = Simulation(cfg, parse_trace(text))
    return sim.run(), sim.timeline


def waits(r: SimResult, klass: str = "interactive") -> tuple[float, float, float, float]:
    s = r.waits[klass]
    return s.p50_s, s.p95_s, s.max_s, s.total_wait_s


# a and b need 6 GiB each on an 8 GiB GPU: one at a time. Starts take 10 s, stops 1 s.
THREE = trace(
    {"t": 0, "model": "a", "duration": 5},
    {"t": 1, "model": "b", "duration": 5},
    {"t": 2, "model": "a", "duration": 5},
)


@pytest.mark.parametrize("policy", ["fifo", "vlmhub", "lru", "exclusive"])
def test_two_models_that_do_not_fit_three_requests(policy: PolicyName) -> None:
    # 0: start a (0-10). 1: b queues. 2: a queues (a is starting). 10: a leases both of its
    # requests (waits 10 and 8; they run until 15) and b's swap evicts a: drain until 15, stop
    # (15-16), start b (16-26). 26: b leased (wait 25), done at 31. Every policy does this,
    # except that under vlmhub the swap is held while a (just loaded, cost 10) has work, and
    # for busy_grace_s (0.25 s) after a's last answer: stop 15.25-16.25, start 16.25-26.25.
    r, timeline = run([model("a"), model("b")], THREE, policy)
    g = 0.25 if policy == "vlmhub" else 0.0
    assert (r.loads, r.wakes, r.evictions, r.served, r.requests) == (2, 0, 1, 3, 3)
    assert waits(r) == (10.0, 25.0 + g, 25.0 + g, 43.0 + g)
    assert r.makespan_s == 31.0 + g and r.loading_s == 20.0
    assert r.loading_fraction == pytest.approx(20 / (31 + g))
    assert r.throughput == pytest.approx(3 / (31 + g))
    began = 15.25 if policy == "vlmhub" else 10.0
    assert timeline == [(0.0, "start a"), (10.0, "a ready"), (began, "start b, evicting a (stop)"),
                        (16.0 + g, "a stopped"), (26.0 + g, "b ready")]
    assert r.refused == {"queue_full": 0, "refused": 0, "timeout": 0} and r.over_max_wait == 0


def test_a_swap_deferred_while_the_fresh_model_has_work_saves_a_load() -> None:
    # THREE plus an a request at 12 (5 s).
    # fifo: at 10 b's swap starts at once: a drains (new a work queues: the 12 s request
    # waits), stop 15-16, start b 16-26, b leased 26 (wait 25), done 31; then a's swap: drain b
    # until 31, stop 31-32, start a 32-42: the 12 s request waits 30. 3 loads.
    # vlmhub: a was just loaded (cost 10: held 40 s while it has work), so b waits; the 12 s
    # request is leased at once (wait 0) and a is busy until 17. At 17.25 (busy_grace_s after
    # a's last answer) a counts as idle: stop 17.25-18.25, start b 18.25-28.25, b leased at
    # 28.25 (wait 27.25). 2 loads.
    text = THREE + trace({"t": 12, "model": "a", "duration": 5})
    fifo, _ = run([model("a"), model("b")], text, "fifo")
    assert (fifo.loads, fifo.evictions) == (3, 2)
    assert waits(fifo) == (10.0, 30.0, 30.0, 73.0)  # waits 10, 8, 30 (a) and 25 (b)
    mine, timeline = run([model("a"), model("b")], text, "vlmhub")
    assert (mine.loads, mine.evictions) == (2, 1)
    assert waits(mine) == (8.0, 27.25, 27.25, 45.25)  # waits 10, 8, 0 (a) and 27.25 (b)
    assert (17.25, "start b, evicting a (stop)") in timeline
    assert mine.makespan_s == 33.25 and fifo.makespan_s == 47.0


# a (20 s to start) and b (2 s) are resident together on 8.5 GiB; c (2 s) needs room. a was
# last used at 21, b at 23; c arrives at 30. Both can sleep (keeping 0.25 GiB).
VICTIM = trace(
    {"t": 0, "model": "a", "duration": 1},
    {"t": 0, "model": "b", "duration": 1},
    {"t": 30, "model": "c", "duration": 1},
    {"t": 40, "model": "b", "duration": 1},
)
SLEEPY = [model("a", 4, 20, can_sleep=True, sleep_gib=0.25),
          model("b", 4, 2, can_sleep=True, sleep_gib=0.25),
          model("c", 4, 2, can_sleep=True, sleep_gib=0.25)]


def test_fifo_and_vlmhub_evict_the_cheap_long_idle_model_and_put_it_to_sleep() -> None:
    # idle / reload cost at 30: a 9/20 = 0.45, b 7/2 = 3.5 -> b goes, to sleep (1 s), then c
    # starts (31-33). At 40 b comes back by a wake (2 s), putting c (idle 6 s / 2) to sleep.
    for policy in ("fifo", "vlmhub"):
        r, t = run(SLEEPY, VICTIM, policy, usable=8.5, wake_s=2.0)  # type: ignore[arg-type]
        assert (30.0, "start c, evicting b (sleep)") in t
        assert (40.0, "wake b, evicting c (sleep)") in t
        assert (r.loads, r.wakes, r.sleeps, r.evictions) == (3, 1, 2, 2)
        assert r.loading_s == 20 + 2 + 2 + 2


def test_an_unmeasured_wake_costs_what_the_supervisor_prices_it() -> None:
    # no --wake-s: b's wake takes wake_price_s(1, its 2 s start) = 5 % of it, as a replica's
    # view prices a wake it has not measured (control.replica.Replica.wake_cost)
    r, _ = run(SLEEPY, VICTIM, "vlmhub", usable=8.5)
    assert wake_price_s(1, 2.0) == 0.1 and wake_price_s(2, 2.0) == pytest.approx(0.3)
    assert wake_price_s(1, 120.0) == 2.0 and wake_price_s(2, 120.0) == 6.0  # the caps
    assert wake_price_s(1, 120.0, measured=0.8) == 0.8
    assert r.loading_s == pytest.approx(20 + 2 + 2 + 0.1)


def test_lru_evicts_the_least_recently_used_and_never_sleeps() -> None:
    # plain LRU: a (last used 21) goes, stopped (30-31), c starts (31-33: waits 3); b is still
    # resident at 40, so its request is served at once. 3 loads, no sleep, no wake.
    r, t = run(SLEEPY, VICTIM, "lru", usable=8.5)
    assert (30.0, "start c, evicting a (stop)") in t
    assert (r.loads, r.wakes, r.sleeps, r.evictions) == (3, 0, 0, 1)
    # waits: a 20, b 22 (a's start, then its own 2 s), c 3, b 0
    assert waits(r) == (3.0, 22.0, 22.0, 45.0)


def test_exclusive_keeps_one_model_at_a_time_even_when_two_fit() -> None:
    # a and b fit together, but exclusive stops a to start b: a 0-20, its request runs 20-21
    # (drain), stop 21-22, b 22-24, b's request 24-25. fifo starts b beside a: 20-22, done 23.
    text = trace({"t": 0, "model": "a", "duration": 1}, {"t": 0, "model": "b", "duration": 1})
    r, t = run(SLEEPY, text, "exclusive", usable=8.5)
    assert [w for _, w in t] == ["start a", "a ready", "start b, evicting a (stop)",
                                 "a stopped", "b ready"]
    assert (r.loads, r.evictions, r.makespan_s) == (2, 1, 25.0)
    fifo, _ = run(SLEEPY, text, "fifo", usable=8.5)
    assert (fifo.loads, fifo.evictions, fifo.makespan_s) == (2, 0, 23.0)


def _priorities() -> str:
    # a runs one 30 s request from 10 to 40; b (batch) and c (interactive) queue behind it.
    return trace(
        {"t": 0, "model": "a", "duration": 30},
        {"t": 1, "model": "b", "duration": 5, "priority": "batch"},
        {"t": 2, "model": "c", "duration": 5},
    )


def test_interactive_before_batch() -> None:
    # fifo: the oldest first: b's swap at 10 (drain a until 40, stop, start b 41-51; b waits
    # 50), then c (drain b until 56, stop, start c 57-67: c waits 65).
    # vlmhub: both are held while a (just loaded, busy) works and busy_grace_s (0.25 s) after;
    # at 40.25 c goes first (stop 40.25-41.25, start 41.25-51.25: c waits 49.25); b comes back
    # as soon as c's interactive work is done (56.25) and its grace is over: stop c
    # 56.5-57.5, start b 57.5-67.5: b waits 66.5 (its bound is 10 x 20 = 200 s).
    fifo, _ = run([model("a"), model("b"), model("c")], _priorities(), "fifo")
    assert fifo.waits["batch"].max_s == 50.0 and fifo.waits["interactive"].max_s == 65.0
    mine, t = run([model("a"), model("b"), model("c")], _priorities(), "vlmhub")
    assert (40.25, "start c, evicting a (stop)") in t
    assert (56.5, "start b, evicting c (stop)") in t
    assert mine.waits["interactive"].max_s == 49.25 and mine.waits["batch"].max_s == 66.5
    # c's bound is 3 x (10 + 10) = 60: the worst ratio is c's 49.25 / 60
    assert mine.over_max_wait == 0 and mine.worst_wait_ratio == pytest.approx(49.25 / 60)


def test_the_wait_bound_forces_a_deferred_swap() -> None:
    # c's max_wait_s is 20; its swap is forced lead_factor (1.25) x its reload cost (10) before
    # that, at 2 + 20 - 12.5 = 9.5, while a is still starting: at 10, although a was just loaded
    # and is busy, c's swap begins. It still drains a first (until 40), so c waits 49 as
    # before (over its bound: a busy victim's drain is never cut short).
    cfg = SimConfig((model("a"), model("b"), model("c")), 8.0, stop_s=1.0,
                    params=Params(max_wait_s={"c": {"interactive": 20.0}}))
    sim = Simulation(cfg, parse_trace(_priorities()))
    r = sim.run()
    assert (10.0, "start c, evicting a (stop)") in sim.timeline
    assert r.waits["interactive"].max_s == 49.0 and r.waits["interactive"].over_max_wait == 1
    # with a bound of 60 (the default, 3 x (10 + 10)) it is not forced: c goes at 40.25
    sim = Simulation(replace(cfg, params=Params()), parse_trace(_priorities()))
    sim.run()
    assert (40.25, "start c, evicting a (stop)") in sim.timeline


def test_closed_loop_clients_and_an_open_stream() -> None:
    # 2 clients, 4 requests of 1 s on a (10 s start): both wait 10, then 0 and 0; done at 12.
    # The stream sends b requests at 10 and 20 (30 is past "until" 25), b fits beside a: b
    # starts after a (10-20), so the first waits 10 and the second 0.
    text = trace(
        {"clients": 2, "requests": 4, "models": ["a"], "duration": 1},
        {"every": 10, "models": ["b"], "duration": 1, "until": 25},
    )
    r, _ = run([model("a", 4), model("b", 4)], text, "vlmhub")
    assert (r.requests, r.served, r.loads) == (6, 6, 2)
    # waits: a 10, 10, 0, 0; b 10, 0 -> nearest-rank p50 is the 3rd of 6 sorted: 0
    assert waits(r) == (0.0, 10.0, 10.0, 30.0)
    assert r.makespan_s == 21.0


def test_a_stream_until_the_clients_are_done_and_the_closed_loop_draws_are_fixed() -> None:
    text = trace(
        {"clients": 1, "requests": 3, "models": ["a", "b"], "duration": [1, 2], "seed": 5},
        {"every": [3, 4], "models": ["b"], "duration": 1, "until": "clients", "seed": 6},
    )
    t = parse_trace(text)
    assert t.clients[0].draws == parse_trace(text).clients[0].draws  # the same every time
    results = [simulate(SimConfig((model("a", 4), model("b", 4)), 8.0), t, p)
               for p in ("fifo", "vlmhub")]
    # the stream stops once the client is done: fewer than 3 stream arrivals fit in ~23 s
    assert all(3 < r.requests < 3 + 10 and r.served == r.requests for r in results)


def test_queue_full_and_queue_timeout_are_not_served() -> None:
    text = trace(*({"t": i, "model": "a", "duration": 1} for i in range(3)))
    r, _ = run([model("a", max_queue=2)], text, "fifo")
    assert r.refused["queue_full"] == 1 and r.served == 2
    r, _ = run([model("a")], text, "fifo", queue_timeout_s=9.5)  # a is ready at 10
    assert r.refused["timeout"] == 1 and r.served == 2  # the request of t=0 gave up at 9.5
    # it waited 9.5 s against a bound of max(3 x (10 + 0), 10) = 30: not over
    assert r.over_max_wait == 0


def test_a_model_larger_than_the_gpu_is_refused_and_ttl_stops_idle_models() -> None:
    text = trace({"t": 0, "model": "big", "duration": 1}, {"t": 0, "model": "a", "duration": 1})
    r, t = run([model("big", 9), model("a", 4, ttl=30)], text, "vlmhub")
    assert r.refused["refused"] == 1 and r.served == 1
    assert (41.0, "ttl: stop a") not in t  # the sim ends when the trace is done...
    text += trace({"t": 60, "model": "a", "duration": 1})
    r, t = run([model("big", 9), model("a", 4, ttl=30)], text, "vlmhub")
    assert (41.0, "ttl: stop a") in t and r.loads == 2  # ...but not before: ttl 30 after 11


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile(list(map(float, range(1, 21))), 0.95) == 19.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "t.jsonl:2: not JSON"),
        ('{"t": 1, "model": "a", "duration": -1}', "t.jsonl:2: duration: -1 is below 0"),
        ('{"t": 1, "model": "a", "duration": 1, "priority": "urgent"}',
         "priority: 'urgent' is not a priority. Fix: use interactive or batch"),
        ('{"clients": 0, "requests": 5, "models": ["a"], "duration": 1}',
         "clients: 0 is not a positive whole number"),
        ('{"clients": 2, "requests": 5, "models": ["a"], "duration": [3, 1]}',
         "duration: [3, 1] runs backwards"),
        ('{"every": [1, 2], "models": ["a"], "duration": 1, "until": "clients"}',
         'runs until "clients" but the trace has no closed loop'),
        ("[1, 2]", "t.jsonl:2: a line must be a JSON object"),
        ('{"x": 1}', "t.jsonl:2: not a request, a closed loop or a stream"),
    ],
)
def test_a_bad_trace_line_names_file_line_field_and_fix(line: str, message: str) -> None:
    text = '{"note": "ok"}\n' + line + "\n"
    with pytest.raises(TraceError) as err:
        parse_trace(text, "t.jsonl")
    assert message in str(err.value) and "Fix:" in str(err.value)


def test_a_trace_naming_an_unknown_model_lists_the_configured_ones() -> None:
    t = parse_trace(trace({"t": 0, "model": "nope", "duration": 1}), "t.jsonl")
    with pytest.raises(TraceError, match=r"config does not have: nope\. Fix: use one of a, b"):
        check_models(t, ["a", "b"])


CONFIG = """\
gpu: {total_gib: 8, reserve_gib: 0.5, force_total: true}
router: {queue_timeout_s: 600}
runtime: {kind: process}
models:
  a:
    budget_gib: 5
    spec: &s {hf_repo: x/a, image: "vllm/vllm-openai:v0.11.0", reload_cost_s: 10,
              options: {max_model_len: 4096}, vram: {weights_gib: 2.0,
              kv_bytes_per_token: 28672, activation_gib: 0.5}}
  b:
    budget_gib: 5
    spec: {<<: *s, hf_repo: x/b}
"""


def test_the_command_reads_costs_from_the_config_and_prints_json(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(CONFIG)
    (tmp_path / "t.jsonl").write_text(THREE)
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "t.jsonl"), "--config",
                                   str(tmp_path / "models.yaml"), "--policy", "fifo,exclusive",
                                   "--stop-s", "1", "--json"])
    assert out.exit_code == 0, out.output
    rows = [json.loads(x) for x in out.output.splitlines()]
    assert [r["policy"] for r in rows] == ["fifo", "exclusive"]
    # reload_cost_s 10 from the spec: the worked example of the first test
    assert rows[0]["loads"] == 2 and rows[0]["waits"]["interactive"]["max_s"] == 25.0
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "t.jsonl"), "--config",
                                   str(tmp_path / "models.yaml"), "--policy", "all"])
    assert out.exit_code == 0 and "exclusive" in out.output and "cold loads" in out.output


def test_the_command_reports_a_bad_trace_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(CONFIG)
    (tmp_path / "t.jsonl").write_text('{"t": 0, "model": "c", "duration": 1}\n')
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "t.jsonl"), "--config",
                                   str(tmp_path / "models.yaml")])
    assert out.exit_code == 2 and "config does not have: c" in out.output
    assert "Traceback" not in out.output
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "missing.jsonl"), "--config",
                                   str(tmp_path / "models.yaml")])
    assert out.exit_code == 2 and "cannot read the trace" in out.output
    out = CliRunner().invoke(app, ["simulate", str(tmp_path / "t.jsonl"), "--policy", "best"])
    assert out.exit_code == 2 and "unknown policy best" in out.output


def test_the_grace_keeps_closed_loop_clients_from_being_swapped_out_between_requests() -> None:
    # Three models, two fit; closed-loop clients whose next request comes one round trip
    # (rtt_s) after the answer. Without busy_grace_s, the resident models look idle between
    # round trips and the swap goes ahead with a few clients waiting (live uniform3: 50 starts
    # instead of 23); with it, the swap waits until every client waits for the missing model.
    text = trace({"clients": 8, "requests": 300, "models": ["a", "b", "c"],
                  "duration": [0.01, 0.03], "seed": 5})
    models = (model("a", 4, 2.0), model("b", 4, 2.0), model("c", 4, 2.0))

    def loads(grace: float, rtt: float) -> int:
        cfg = SimConfig(models, 8.0, params=Params(busy_grace_s=grace), stop_s=0.1, rtt_s=rtt)
        return simulate(cfg, parse_trace(text)).loads

    fifo = simulate(SimConfig(models, 8.0, params=Params(name="fifo"), stop_s=0.1),
                    parse_trace(text)).loads
    assert loads(0.25, 0.02) < loads(0.0, 0.02) <= fifo
    assert loads(0.25, 0.02) == loads(0.0, 0.0)  # the grace restores the no-gap behaviour


def test_the_command_simulates_several_gpus(tmp_path: Path) -> None:
    # a and b (5 GiB each) do not fit together on one 7.5 GiB GPU; with --gpus 2 the live
    # placement puts b on the other GPU: both start at once (a 0-10, b 1-11), nothing evicted;
    # waits: a 10, b 10, the second a 8
    (tmp_path / "models.yaml").write_text(CONFIG)
    (tmp_path / "t.jsonl").write_text(THREE)
    argv = ["simulate", str(tmp_path / "t.jsonl"), "--config", str(tmp_path / "models.yaml"),
            "--policy", "fifo", "--json"]
    one, two = (json.loads(CliRunner().invoke(app, [*argv, *extra]).output)
                for extra in ([], ["--gpus", "2"]))
    assert (one["gpus"], one["loads"], one["evictions"]) == (1, 2, 1)
    assert (two["gpus"], two["loads"], two["evictions"]) == (2, 2, 0)
    assert two["waits"]["interactive"]["max_s"] == 10.0 and two["makespan_s"] == 16.0
    out = CliRunner().invoke(app, [*argv[:-1], "--gpus", "2"])
    assert out.exit_code == 0 and "2 GPUs x 7.50 GiB usable" in " ".join(out.output.split())
