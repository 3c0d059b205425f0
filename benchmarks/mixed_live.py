"""Issue 23's live run: a mixed trace through the REAL router with stand-in engines that sleep
like vLLM, against ``vlmhub simulate`` of the same trace and config (``policy_live.py --mixed``).

The stand-in of the seed's 12 GB card (:func:`config`): three stand-in engines with the shipped
models.yaml's footprints under sleep (dots-ocr 5.78, qwen3-vl 5.72 and phi3-vision 10.25 GiB
on 11.5 usable GiB, 1.25 GiB kept by a sleeper), a pretend GPU that refuses what does not fit
(the stand-ins' shared ledger) and a pretend host with room for one level-1 sleeper's weights
(so both levels happen). ``mixed3``'s hour is replayed ``--scale`` times faster (default 30: two
minutes): arrivals, durations, ``ttl`` and the router's timeouts are divided by it; a stand-in
start (``--start-s``, default 2 s, a 60 s start at that scale) is the same for every model. A
request's duration is its completion's length (``max_tokens`` x the stand-in's 10 ms a token).

The simulation gets the same config and the same requests, with the start and wake times the
live run measured. What is compared are the counts: cold loads (``vlmhub_loads_total`` less
the wakes) and wakes (the router's ``woken from level`` lines), within ``--tolerance`` (20 %).
Timings differ (the machine, the stand-in's process start), so they are reported, not
compared. Stops every process it started, also on error or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import yaml
from benchlib import Processes, free_port

from vlmhub.scheduling.simtrace import Trace, parse_trace
from vlmhub.scheduling.simulate import SimResult, from_config, simulate

HERE = Path(__file__).resolve().parent
MIXED = HERE / "traces" / "mixed3.jsonl"
TOKEN_S = 0.01
"""The stand-in's time per completion token (``--stub-token-delay``)."""
FOOTPRINT = {"dots-ocr": 5.78, "qwen3-vl": 5.72, "phi3-vision": 10.25}
TTL = {"dots-ocr": 1800, "qwen3-vl": 600, "phi3-vision": 600}
WEIGHTS_GIB = 1.23  # what a level-1 sleeping stand-in holds in the pretend host


@dataclass
class Live:
    cold: int
    wakes: int
    served: int
    refused: int
    wall_s: float
    start_s: float
    wake_s: float
    statuses: dict[int, int]


def scaled(scale: float, trace: Path = MIXED) -> list[dict[str, Any]]:
    """The trace's requests with times and durations divided by ``scale``; a duration is a
    whole number of the stand-in's tokens (1 to 64)."""
    out = []
    for line in trace.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "t" not in row:
            continue
        tokens = min(max(round(row["duration"] / scale / TOKEN_S), 1), 64)
        out.append({**row, "t": round(row["t"] / scale, 3), "duration": tokens * TOKEN_S,
                    "tokens": tokens})
    return out


def config(dest: Path, scale: float, start_s: float, host_ledger: Path) -> Path:
    """The 12 GB card's stand-in (see the module docs), with times divided by ``scale``."""
    lo = free_port()
    models = {}
    for name, gib in FOOTPRINT.items():
        models[name] = {
            "budget_gib": gib, "sleep": True, "ttl": round(TTL[name] / scale, 2),
            **({"preload": True, "priority": "batch"} if name == "dots-ocr" else {}),
            "spec": {"description": f"stand-in for {name}", "hf_repo": f"stub/{name}",
                     "image": "vlmhub/stub-engine:dev", "reload_cost_s": start_s,
                     "options": {"max_model_len": 4096, "enforce_eager": True},
                     "vram": {"weights_gib": WEIGHTS_GIB, "kv_bytes_per_token": 28672,
                              "activation_gib": 0.5, "sleep_residual_gib": 1.25}},
        }
    cfg = {
        "gpu": {"total_gib": 12, "reserve_gib": 0.5, "force_total": True},
        "host": {"total_gib": 2.0, "reserve_gib": 0.0},
        "router": {"host": "127.0.0.1", "port": 8080, "max_queue": 32, "policy": "vlmhub",
                   "queue_timeout_s": round(600 / scale, 2),
                   "drain_timeout_s": round(30 / scale, 2)},
        "runtime": {"kind": "process", "port_range": [lo, lo + 99], "process_argv": [
            "{python}", "-m", "vlmhub.testing.stub_engine", "--stub-startup-delay",
            str(start_s), "--stub-token-delay", str(TOKEN_S), "--stub-host-total-gib", "2.0",
            "--stub-host-ledger", str(host_ledger)]},
        "models": models,
    }
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


async def replay(url: str, rows: list[dict[str, Any]]) -> tuple[dict[int, int], float]:
    """Send each request at its time (open loop); the answers' statuses and the wall time."""
    statuses: dict[int, int] = {}
    t0 = time.monotonic()

    async def one(http: httpx.AsyncClient, row: dict[str, Any]) -> None:
        await asyncio.sleep(max(row["t"] - (time.monotonic() - t0), 0.0))
        body = {"model": row["model"], "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": row["tokens"]}
        headers = {"x-vlmhub-priority": row["priority"]} if row.get("priority") else {}
        try:
            r = await http.post(url + "/v1/chat/completions", json=body, headers=headers)
            code = r.status_code
        except httpx.HTTPError:
            code = 0
        statuses[code] = statuses.get(code, 0) + 1

    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        await asyncio.gather(*(one(http, r) for r in rows))
    return statuses, time.monotonic() - t0


def run_live(work: Path, rows: list[dict[str, Any]], scale: float, start_s: float) -> Live:
    """One router over the stand-in config: start it, replay ``rows``, count, stop it."""
    cfg = config(work / "models.yaml", scale, start_s, work / "host-ledger")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = Processes(work)
    ledger = work / "gpu-ledger"
    ledger.mkdir(parents=True, exist_ok=True)
    env = {"VLMHUB_STUB_LEDGER": str(ledger), "VLMHUB_STUB_GPU_TOTAL_GIB": "12"}
    try:
        proc = procs.start("router", [sys.executable, "-m", "vlmhub", "route", "--config",
                                      str(cfg), "--port", str(port), "--state-dir",
                                      str(work / "state")], env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"vlmhub route did not come up:\n{procs.log_tail('router')}")
            time.sleep(0.1)
        statuses, wall = asyncio.run(replay(url, rows))
        loads = metric_sum(httpx.get(url + "/metrics", timeout=10).text, "vlmhub_loads_total",
                           'result="ok"')
    finally:
        procs.stop_all()
    log = (work / "router.log").read_text(errors="replace")
    woken = [float(x) for x in re.findall(r"woken from level \d in ([0-9.]+) s", log)]
    started = [float(x) for x in re.findall(r"ready in ([0-9.]+) s", log)]
    cold = int(loads) - len(woken)
    return Live(cold, len(woken), statuses.get(200, 0), sum(
        n for code, n in statuses.items() if code != 200), wall,
        sum(started) / len(started) if started else start_s,
        sum(woken) / len(woken) if woken else 0.05, statuses)


def metric_sum(text: str, name: str, label: str = "") -> float:
    """The sum of ``name``'s samples (with ``label`` among their labels) in Prometheus text."""
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", text, re.M):
        if label in m.group(1):
            total += float(m.group(2))
    return total


def run_sim(work: Path, rows: list[dict[str, Any]], scale: float, start_s: float,
            wake_s: float | None = None) -> SimResult:
    """``vlmhub simulate`` of the same requests on the same config (``start_s``/``wake_s``:
    the live run's measured times; the stand-in's own wake and stop are tens of ms)."""
    from vlmhub.cli.common import Context

    cfg = config(work / "sim.yaml", scale, start_s, work / "sim-host")
    ctx = Context(cfg, None)
    models = ctx.models()
    sim = from_config(models, ctx.loaded.config, ctx.gpu.usable_gib, start_s=start_s,
                      wake_s=wake_s, wake2_s=wake_s, sleep_s=0.05, stop_s=0.1,
                      host_gib=ctx.loaded.config.host.budget_gib())
    sim = replace(sim, models=tuple(replace(m, reload_cost_s=start_s) for m in sim.models))
    text = "\n".join(json.dumps({k: v for k, v in r.items() if k != "tokens"}) for r in rows)
    trace: Trace = parse_trace(text, "mixed3-scaled")
    return simulate(sim, trace, "vlmhub")


def within(a: float, b: float, tolerance: float) -> bool:
    """``a`` within ``tolerance`` (a share) of ``b``, or both small (a difference of 1)."""
    return abs(a - b) <= max(tolerance * max(a, b), 1.0)


def report(live: Live, sim: SimResult, scale: float, tolerance: float) -> str:
    rows = [("cold loads", live.cold, sim.loads), ("wakes", live.wakes, sim.wakes),
            ("served", live.served, sim.served),
            ("not served", live.refused, sum(sim.refused.values()))]
    out = [f"`mixed3` at {scale:g}x speed through `vlmhub route` with stand-in engines (the "
           "12 GB card's footprints, sleep on, a host with room for one level-1 sleeper), "
           f"against `vlmhub simulate` of the same requests (starts {live.start_s:.2f} s and "
           f"wakes {live.wake_s:.3f} s as measured live).", "",
           "| count | live | simulated | within 20 % |", "|---|---|---|---|"]
    for label, a, b in rows:
        ok = "yes" if within(a, b, tolerance) else "no"
        out.append(f"| {label} | {a} | {b} | {ok if label in ('cold loads', 'wakes') else '-'} |")
    out += ["", f"Live wall time {live.wall_s:.1f} s; HTTP statuses {live.statuses}."]
    return "\n".join(out)
