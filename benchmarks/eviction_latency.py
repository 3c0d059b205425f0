"""The data path's latency while another model is evicted, with thousands of idle processes on
the machine (issue 21 item 10).

Stopping a process engine reads its process group's states from /proc, which means reading
every process's stat file: with 3,000 processes that is hundreds of milliseconds per read on a
small machine. The old stop did it on the event loop, which serves every request; the new one
does it in a worker thread. One run measures both:

1. it spawns ``--idle`` idle ``sleep`` processes (3,000 by default; bounded by the user's
   process limit, all killed and reaped at the end, even on Ctrl-C or SIGTERM);
2. for each mode (``old``: the scan on the event loop, as before, though with one scan per poll
   where the old code made two, so it understates the old cost; ``new``: the code as it is) it
   starts ``vlmhub route`` (the ``old`` one through a two-line bootstrap that puts the scan back
   on the loop) with two stand-in models that both fit: ``ready`` and ``evicted``;
3. ``--clients`` clients send chat requests to ``ready`` back to back while the script loads
   ``evicted`` and unloads it (``POST /api/models/evicted/unload``, which returns once the
   engine has stopped) ``--evictions`` times;
4. it reports p50/p99 of the requests that overlapped an unload, and of those that did not,
   per mode, and old/new as a ratio.

    .venv/bin/python benchmarks/eviction_latency.py [--idle 3000] [--evictions 8]
        [--update-doc docs/benchmarks.md]

It reports, it never asserts. About 2 minutes with 3,000 processes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
from benchlib import Processes, fmt_ms, free_port, machine, save_report, sigterm_exits
from cold_start import percentile

MAX_IDLE = 20_000
CONFIG = """gpu: {{total_gib: 8, reserve_gib: 0, force_total: true}}
router: {{queue_timeout_s: 120}}
runtime:
  kind: process
  process_argv: ["{python}", "-m", "vlmhub.testing.stub_engine", "--stub-startup-delay", "0.3"]
  port_range: [{lo}, {hi}]
models:
  ready: &stub
    spec:
      hf_repo: stub/ready
      image: vlmhub/stub-engine:dev
      options: {{max_model_len: 1024, enforce_eager: true}}
      vram: {{weights_gib: 1.0, kv_bytes_per_token: 28672, activation_gib: 0.25}}
  evicted: *stub
"""
BOOTSTRAP = """
import runpy, sys
if sys.argv[1] == "old":  # the stop's /proc scan back on the event loop, as it was
    import vlmhub.engines.process as process
    from vlmhub.engines.procfs import group_live_states

    async def on_the_loop(pgid):
        return group_live_states(pgid)

    process._group = on_the_loop
sys.argv = ["vlmhub", *sys.argv[2:]]
runpy.run_module("vlmhub", run_name="__main__")
"""
BODY = {"model": "ready", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@contextlib.contextmanager
def idle_processes(count: int) -> Iterator[int]:
    """``count`` idle ``sleep`` processes (fewer if the process limit says so), killed and
    reaped on the way out; yields how many run."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft != resource.RLIM_INFINITY:
        count = min(count, max(soft - 500, 0))
    count = min(count, MAX_IDLE)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield len(procs)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in procs:
            p.wait()


async def client(url: str, stop: asyncio.Event, out: list[tuple[float, float]]) -> None:
    """Chat requests to ``ready`` back to back: (start, latency) in seconds."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while not stop.is_set():
            start = time.monotonic()
            (await c.post("/v1/chat/completions", json=BODY)).raise_for_status()
            out.append((start, time.monotonic() - start))


async def measure(url: str, clients: int, evictions: int) -> tuple[list[float], list[float]]:
    """Latencies (s) of the requests that overlapped an unload of ``evicted``, and the rest."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as admin:
        for model in ("ready", "evicted"):
            (await admin.post(f"/api/models/{model}/load")).raise_for_status()
        stop, samples = asyncio.Event(), []
        tasks = [asyncio.create_task(client(url, stop, samples)) for _ in range(clients)]
        windows: list[tuple[float, float]] = []
        try:
            await asyncio.sleep(1.0)
            for _ in range(evictions):
                (await admin.post("/api/models/evicted/load")).raise_for_status()
                await asyncio.sleep(0.5)
                began = time.monotonic()
                (await admin.post("/api/models/evicted/unload")).raise_for_status()
                windows.append((began, time.monotonic()))
                await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    during = [lat for s, lat in samples if any(s < b and s + lat > a for a, b in windows)]
    rest = [lat for s, lat in samples if not any(s < b and s + lat > a for a, b in windows)]
    return during, rest


def run_mode(mode: str, out: Path, procs: Processes, args: argparse.Namespace
             ) -> tuple[list[float], list[float]]:
    lo = free_port()
    config = out / f"{mode}.yaml"
    config.write_text(CONFIG.format(python=sys.executable, lo=lo, hi=lo + 100))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = procs.start(f"route-{mode}", [
        sys.executable, "-c", BOOTSTRAP, mode, "route", "--config", str(config), "--port",
        str(port), "--state-dir", str(out / f"state-{mode}")])
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vlmhub route ({mode}) exited:\n{procs.log_tail(f'route-{mode}')}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        if time.monotonic() > deadline:
            raise RuntimeError(f"vlmhub route ({mode}) did not answer")
        time.sleep(0.2)
    try:
        return asyncio.run(measure(url, args.clients, args.evictions))
    finally:
        procs.stop_all()  # the router stops its engines on SIGTERM; any left are killed
        for record in (out / f"state-{mode}" / "process").glob("*.json"):
            with contextlib.suppress(ValueError, KeyError, OSError):
                os.killpg(int(json.loads(record.read_text())["pid"]), signal.SIGKILL)


def report(idle: int, figures: dict[str, tuple[list[float], list[float]]]) -> str:
    def p(values: list[float], pct: float) -> float:
        return percentile(values, pct) * 1000 if values else float("nan")

    rows = ["| stop's /proc scan | requests during an unload | p50 | p99 | max "
            "| requests otherwise | p50 | p99 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, (during, rest) in figures.items():
        where = "on the event loop (old)" if mode == "old" else "in a worker thread (new)"
        rows.append(f"| {where} | {len(during)} | {fmt_ms(p(during, 50))} "
                    f"| {fmt_ms(p(during, 99))} | {fmt_ms(max(during, default=0) * 1000)} "
                    f"| {len(rest)} | {fmt_ms(p(rest, 50))} | {fmt_ms(p(rest, 99))} |")
    old, new = figures["old"][0], figures["new"][0]
    ratio = ""
    if old and new:
        ratio = (f"\n\nDuring an unload, old/new: p50 {p(old, 50) / p(new, 50):.1f}x, "
                 f"p99 {p(old, 99) / p(new, 99):.1f}x.")
    return (f"{idle} idle processes on the machine; request latency on `ready` while "
            f"`evicted` is unloaded:\n\n" + "\n".join(rows) + ratio)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--idle", type=int, default=3000, help="idle processes to spawn")
    parser.add_argument("--evictions", type=int, default=8, help="unloads per mode")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients of `ready`")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for logs (default: a new one under the temp dir)")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="write the figures into this file's eviction_latency block")
    args = parser.parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.results or Path(tempfile.gettempdir()) / f"vlmhub-eviction-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    info = machine(("vlmhub", "uvicorn", "uvloop", "httpx"))
    info["command"] = " ".join([".venv/bin/python", "benchmarks/eviction_latency.py",
                                *(argv if argv is not None else sys.argv[1:])])
    print(f"results: {out}", flush=True)
    started = time.monotonic()
    figures: dict[str, tuple[list[float], list[float]]] = {}
    procs = Processes(out)
    with sigterm_exits(), idle_processes(args.idle) as idle:
        print(f"{idle} idle processes running", flush=True)
        try:
            for mode in ("old", "new"):
                figures[mode] = run_mode(mode, out, procs, args)
                print(f"  {mode}: {len(figures[mode][0])} requests during unloads", flush=True)
        finally:
            procs.stop_all()
    elapsed = time.monotonic() - started
    text = report(idle, figures)
    print()
    print(text)
    save_report(out, info, elapsed, text, {"idle": idle, "latency_s": {
        m: {"during_unload": d, "otherwise": r} for m, (d, r) in figures.items()}},
        args.update_doc, "eviction_latency")
    return 0


if __name__ == "__main__":
    sys.exit(main())
