"""Issue 16's live run: 16 clients, 1,000 requests spread evenly over three stand-in models of
which two fit, through the REAL router (`vlmhub route`), once per swap policy, in one run.

For each policy (default: ``fifo``, today's old policy, then ``vlmhub``) it starts
``vlmhub route`` over benchmarks/traces/standin.yaml (three stand-in engines as local processes
on a pretend 8 GiB GPU; a start takes about 1.7 s) with ``router.policy`` set, in its own state
dir and on a free port. Then 16 closed-loop clients send the requests of
benchmarks/traces/uniform3.jsonl (request k goes to the model that trace draws for k, so every
policy and ``vlmhub simulate`` see the same sequence), each a short chat completion. It prints,
per policy: engine starts (``vlmhub_loads_total``) and starts per 1,000 requests, wall time,
throughput, latency (queueing plus the stand-in's few milliseconds, so an upper bound on the
queueing delay), the queueing delay the router reports (``x-vlmhub-queue-ms``), and how many
waited longer than their ``max_wait_s`` (the policy's bound for that model, computed from the
load times the router measured).

    .venv/bin/python benchmarks/policy_live.py [--requests 1000] [--clients 16]
        [--policies fifo,vlmhub] [--results DIR] [--update-doc docs/benchmarks.md]
        [--decisions]

Reports, never asserts. Stops every process it started, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from benchlib import Processes, free_port, machine, save_report, sigterm_exits

from vlmhub.scheduling import policy
from vlmhub.scheduling.scheduler import ReplicaView
from vlmhub.scheduling.simtrace import parse_trace
from vlmhub.scheduling.simulate import percentile

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "traces" / "standin.yaml"
TRACE = HERE / "traces" / "uniform3.jsonl"


@dataclass
class Run:
    policy: str
    ok: int
    errors: int
    wall_s: float
    latencies: list[tuple[str, float, float]]
    """(model, latency, queueing delay from the router's x-vlmhub-queue-ms) per answer."""
    loads: dict[str, int]
    load_s: dict[str, float]
    bounds: dict[str, float]

    @property
    def total_loads(self) -> int:
        return sum(self.loads.values())

    def over(self) -> int:
        return sum(1 for m, _, q in self.latencies if q > self.bounds.get(m, float("inf")))

    def worst_ratio(self) -> float:
        return max((q / self.bounds[m] for m, _, q in self.latencies if m in self.bounds),
                   default=0.0)


def write_config(dest: Path, name: str, decisions: bool = False) -> Path:
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["router"]["policy"] = name
    if decisions:  # every policy decision with its inputs, as JSON lines in router.log
        cfg["router"].update(log_level="debug", log_format="json")
    lo = free_port()
    cfg["runtime"]["port_range"] = [lo, lo + 99]
    dest.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dest


async def drive(
    url: str, models: list[str], clients: int
) -> tuple[list[tuple[str, float, float]], int]:
    """``clients`` closed-loop clients send one request per entry of ``models``, in order."""
    todo = iter(enumerate(models))
    lat: list[tuple[str, float, float]] = []
    errors = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for _, model in todo:
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4}
            t0 = time.monotonic()
            try:
                r = await http.post(url + "/v1/chat/completions", json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                queued = float(r.headers.get("x-vlmhub-queue-ms", "nan")) / 1000
                lat.append((model, time.monotonic() - t0, queued))
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=900, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return lat, errors


def scrape(url: str) -> tuple[dict[str, int], dict[str, float]]:
    """Engine starts per model (``vlmhub_loads_total``, ok) and each model's last load time."""
    text = httpx.get(url + "/metrics", timeout=10).text
    loads: dict[str, int] = {}
    for m in re.finditer(r"^vlmhub_loads_total\{([^}]*)\} ([0-9.e+]+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("result") == "ok":
            loads[labels["model"]] = int(float(m.group(2)))
    rows = httpx.get(url + "/api/models", timeout=10).json()["models"]
    last = {r["name"]: float(r["last_load_s"]) for r in rows if r.get("last_load_s")}
    return loads, last


def bounds(cfg_path: Path, last_load: dict[str, float]) -> dict[str, float]:
    """Each model's interactive max_wait_s as the policy computes it (measured load times)."""
    cfg = yaml.safe_load(cfg_path.read_text())
    views = [ReplicaView(n, "stopped", 3.5, reload_cost_s=last_load.get(
        n, float(m["spec"].get("reload_cost_s", 60.0)))) for n, m in cfg["models"].items()]
    p = policy.Params()
    return {v.name: policy.max_wait(v, views, "interactive", p) for v in views}


def run_one(
    name: str, n: int, clients: int, out: Path, models: list[str], decisions: bool = False
) -> Run:
    """One router under policy ``name``: start it, drive it, read its metrics, stop it."""
    work = out / name
    work.mkdir(parents=True, exist_ok=True)
    cfg = write_config(work / "models.yaml", name, decisions)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = Processes(work)
    try:
        proc = procs.start("router", [sys.executable, "-m", "vlmhub", "route", "--config",
                                      str(cfg), "--port", str(port), "--state-dir",
                                      str(work / "state")])
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
        t0 = time.monotonic()
        lat, errors = asyncio.run(drive(url, models[:n], clients))
        wall = time.monotonic() - t0
        loads, last = scrape(url)
    finally:
        procs.stop_all()  # SIGTERM: the router drains and stops its engines
    return Run(name, len(lat), errors, wall, lat, loads, last, bounds(cfg, last))


def report(runs: list[Run], n: int, clients: int) -> str:
    out = [f"{clients} clients, {n} requests over {', '.join(sorted(runs[0].loads) or ['-'])} "
           f"(config {CONFIG.relative_to(HERE.parent)}, trace {TRACE.relative_to(HERE.parent)}). "
           "Queueing delay: the router's x-vlmhub-queue-ms; latency adds the stand-in's answer.",
           "",
           "| policy | answered | errors | engine starts | starts per 1,000 | wall time | "
           "throughput | queueing p50 / p95 / max | latency p50 / p95 / max | max_wait_s | "
           "over max_wait_s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lat = [x for _, x, _ in r.latencies]
        queued = [q for _, _, q in r.latencies]
        per_k = 1000 * r.total_loads / max(r.ok + r.errors, 1)
        b = sorted({round(v, 1) for v in r.bounds.values()})
        out.append(
            f"| {r.policy} | {r.ok} | {r.errors} | {r.total_loads} | {per_k:.0f} | "
            f"{r.wall_s:.1f} s | {r.ok / r.wall_s:.1f} req/s | {_three(queued)} | "
            f"{_three(lat)} | {', '.join(f'{x:g}' for x in b)} s | "
            f"{r.over()} (worst {r.worst_ratio():.2f}x) |")
    if len(runs) == 2 and runs[0].total_loads and runs[1].ok:
        a, b2 = runs
        out += ["", f"{b2.policy} vs {a.policy}: starts x{b2.total_loads / a.total_loads:.2f}, "
                f"throughput x{(b2.ok / b2.wall_s) / (a.ok / a.wall_s):.2f}"]
    return "\n".join(out)


def _three(xs: list[float]) -> str:
    return (f"{percentile(xs, 0.5):.2f} / {percentile(xs, 0.95):.2f} / "
            f"{max(xs, default=0.0):.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--policies", default="fifo,vlmhub")
    ap.add_argument("--results", type=Path, default=None,
                    help="folder for logs (default: a new one under the temp dir)")
    ap.add_argument("--update-doc", type=Path, default=None,
                    help="write the figures into this file's policy_live block")
    ap.add_argument("--decisions", action="store_true",
                    help="log every swap-policy decision with its inputs (JSON lines, logger "
                    "vlmhub.scheduling.policy) in each policy's router.log under --results")
    ap.add_argument("--mixed", action="store_true",
                    help="instead: issue 23's run, mixed3 sped up through the router with "
                    "stand-ins that sleep, against vlmhub simulate (benchmarks/mixed_live.py)")
    ap.add_argument("--scale", type=float, default=30.0,
                    help="--mixed: replay the hour this many times faster")
    ap.add_argument("--start-s", type=float, default=2.0,
                    help="--mixed: a stand-in's start-up delay")
    a = ap.parse_args(argv)
    if a.mixed:
        return mixed(a, argv)
    names = [p.strip() for p in a.policies.split(",")]
    bad = [p for p in names if p not in policy.POLICIES]
    if bad:
        ap.error(f"unknown policy {bad}; use {', '.join(policy.POLICIES)}")
    models = [d.model for d in parse_trace(TRACE.read_text(), TRACE.name).clients[0].draws]
    if a.requests > len(models):
        ap.error(f"the trace has {len(models)} requests")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = a.results or Path(tempfile.gettempdir()) / f"vlmhub-policy-live-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    info = machine(("vlmhub", "uvicorn", "httpx"))
    info["command"] = " ".join([".venv/bin/python", "benchmarks/policy_live.py",
                                *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    with sigterm_exits():
        runs = [run_one(p, a.requests, a.clients, out, models, a.decisions) for p in names]
    text = report(runs, a.requests, a.clients)
    print(text)
    save_report(out, info, time.monotonic() - started, text,
                {"runs": [{k: v for k, v in r.__dict__.items() if k != "latencies"}
                          for r in runs]},
                a.update_doc, "policy_live")
    print(f"logs and summary.md in {out}")
    return 0


def mixed(a: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """``--mixed``: the live mixed trace and its simulation (benchmarks/mixed_live.py)."""
    import mixed_live

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = a.results or Path(tempfile.gettempdir()) / f"vlmhub-mixed-live-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    info = machine(("vlmhub", "uvicorn", "httpx"))
    info["command"] = " ".join([".venv/bin/python", "benchmarks/policy_live.py",
                                *(argv if argv is not None else sys.argv[1:])])
    started = time.monotonic()
    rows = mixed_live.scaled(a.scale)
    with sigterm_exits():
        live = mixed_live.run_live(out, rows, a.scale, a.start_s)
    sim = mixed_live.run_sim(out, rows, a.scale, live.start_s, max(live.wake_s, 0.01))
    text = mixed_live.report(live, sim, a.scale, 0.2)
    print(text)
    save_report(out, info, time.monotonic() - started, text,
                {"live": live.__dict__, "sim": sim.as_dict()}, a.update_doc, "mixed_live")
    print(f"logs and summary.md in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
