"""Proxy overhead of ``vlmhub route``, side by side with the direct path and two thin proxies.

One run starts a raw-ASGI upstream (benchmarks/upstream.py), ``vlmhub route`` with one external
model in front of it, and the thin starlette proxies of the reference measurement (one pooled
httpx.AsyncClient, or one aiohttp.ClientSession, feeding a StreamingResponse). Then, path by
path:

* ``wrk -t1 -cC -d8s --latency`` POSTs a small chat body at C = 1, 16 and 64: p50, p99,
  requests/s, and the CPU the front process used per request;
* 15 sequential streaming requests (50 SSE chunks, 20 ms apart): median time to the first
  chunk, median total time (about 1 s when nothing buffers) and the number of reads per stream.

It prints Markdown tables and keeps wrk's raw output, the logs and a summary in a results
folder. Timings on a small machine are noisy: it reports, it never asserts. About 3 minutes
with the default paths (direct, vlmhub, aiohttp, httpx); see benchmarks/README.md for the rest.

    .venv/bin/python benchmarks/router_overhead.py [--profile] [--results DIR]

Needs ``wrk`` on PATH (Debian: ``apt-get install -y wrk``); ``--profile`` also needs py-spy.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHAT_BODY = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":true}'
CHAT_PATH = "/v1/chat/completions"
CONCURRENCIES = (1, 16, 64)
ALL_PATHS = ("direct", "vlmhub", "vlmhub-h11", "vlmhub-gcfreeze", "vlmhub-uvloop", "aiohttp",
             "httpx")
DEFAULT_PATHS = ("direct", "vlmhub", "aiohttp", "httpx")
LABELS = {"direct": "direct", "vlmhub": "vlmhub route", "vlmhub-h11": "vlmhub route (h11)",
          "vlmhub-gcfreeze": "vlmhub route + gc.freeze()",
          "vlmhub-uvloop": "vlmhub route + uvloop", "aiohttp": "starlette + aiohttp",
          "httpx": "starlette + httpx"}
# vlmhub route with uvicorn's pure-Python h11 parser, as a plain `pip install vlmhub` runs it
# (uvicorn's "auto" picks httptools only when it is installed): httptools is hidden.
VLMHUB_H11 = ("import sys; sys.modules['httptools'] = None; sys.argv[0] = 'vlmhub'; "
              "from vlmhub.cli import main; main()")
# An experiment, not vlmhub's behaviour: vlmhub route that moves every object alive once it
# accepts requests (imports, config, app) out of the garbage collector's reach (gc.freeze), so
# full collections under load stop scanning them.
VLMHUB_GC_FREEZE = (
    "import gc, sys; import vlmhub.router.server as s; started = s.RouterServer._started\n"
    "def _started(self):\n    gc.collect(); gc.freeze(); started(self)\n"
    "s.RouterServer._started = _started; sys.argv[0] = 'vlmhub'\n"
    "from vlmhub.cli import main; main()")
# An experiment too: vlmhub route on uvloop (its asyncio.run takes the loop from the policy).
VLMHUB_UVLOOP = (
    "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "sys.argv[0] = 'vlmhub'; from vlmhub.cli import main; main()")
STREAM_CHUNKS = 50  # what benchmarks/upstream.py sends, before [DONE]

WRK_LUA = f"""wrk.method = "POST"
wrk.body = '{CHAT_BODY}'
wrk.headers["Content-Type"] = "application/json"
"""

# The thin reference proxy (as in proxy-measurements.md): starlette, one pooled client, the
# upstream's bytes fed to a StreamingResponse. Written to the results folder and run from there.
THIN_PROXY = '''"""Thin reference proxy: python thin_proxy.py CLIENT UPSTREAM_URL PORT LOOP."""
import sys
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.routing import Route

CLIENT, UPSTREAM, PORT, LOOP = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
pool = {}

@asynccontextmanager
async def lifespan(app):
    if CLIENT == "httpx":
        import httpx
        pool["c"] = httpx.AsyncClient(base_url=UPSTREAM, timeout=None)
    else:
        import aiohttp
        pool["c"] = aiohttp.ClientSession(UPSTREAM, auto_decompress=False)
    yield
    await (pool["c"].aclose() if CLIENT == "httpx" else pool["c"].close())

async def proxy(request):
    body, c = await request.body(), pool["c"]
    headers = {"content-type": request.headers.get("content-type", "application/json")}
    if CLIENT == "httpx":
        r = await c.send(c.build_request("POST", request.url.path, content=body,
                                         headers=headers), stream=True)
        status, chunks, close = r.status_code, r.aiter_raw(), r.aclose
    else:
        r = await c.post(request.url.path, data=body, headers=headers)

        async def close():  # async: a sync background task would hop to a worker thread
            r.release()
        status, chunks = r.status, r.content.iter_any()
    return StreamingResponse(chunks, status_code=status, background=BackgroundTask(close),
                             media_type=r.headers.get("content-type"))

app = Starlette(routes=[Route("/v1/chat/completions", proxy, methods=["POST"])],
                lifespan=lifespan)
uvicorn.run(app, host="127.0.0.1", port=PORT, loop=LOOP, log_level="warning", access_log=False)
'''


@dataclass
class WrkResult:
    concurrency: int
    p50_ms: float
    p99_ms: float
    rps: float
    requests: int
    errors: int  # non-2xx answers plus socket errors
    cpu_us_per_request: float | None  # CPU of the front process (the proxy, or the upstream)


@dataclass
class StreamResult:
    ttfb_ms: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)
    complete: int = 0  # streams that carried all 50 chunks and [DONE]


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None  # the process whose CPU is counted
    wrk: list[WrkResult] = field(default_factory=list)
    stream: StreamResult = field(default_factory=StreamResult)


class Processes:
    """The child processes of this run; all stopped by :meth:`stop_all` (SIGTERM, then KILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, env=env,
                                start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop_all(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc, log in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(procs: Processes, name: str, proc: subprocess.Popen[bytes], url: str,
               timeout_s: float = 30.0) -> None:
    """Block until a chat request through ``url`` answers 200 (or fail with the log's tail)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                   f"{procs.log_tail(name)}")
            try:
                resp = client.post(url + CHAT_PATH, content=CHAT_BODY,
                                   headers={"content-type": "application/json"})
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s ({last}):\n"
                       f"{procs.log_tail(name)}")


def cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float | None:
    """User + system CPU of ``proc`` so far, from /proc (None where unavailable)."""
    if proc is None:
        return None
    try:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def parse_wrk(text: str, concurrency: int, cpu_s: float | None) -> WrkResult:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
        if m is None:
            raise ValueError(f"no {pct}% latency in wrk's output:\n{text}")
        return float(m[1]) * UNITS_MS[m[2]]

    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    if rps is None or total is None:
        raise ValueError(f"unexpected wrk output:\n{text}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     text)
    if sock is not None:
        errors += sum(int(n) for n in sock.groups())
    requests = int(total[1])
    per_req = cpu_s * 1e6 / requests if cpu_s is not None and requests else None
    return WrkResult(concurrency, latency("50"), latency("99"), float(rps[1]), requests, errors,
                     per_req)


def run_wrk(url: str, concurrency: int, duration_s: int, lua: Path) -> str:
    argv = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--latency", "-s", str(lua),
            url + CHAT_PATH]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def measure_wrk(target: Target, duration_s: int, warmup_s: int, lua: Path, out: Path) -> None:
    if warmup_s:
        run_wrk(target.url, 16, warmup_s, lua)
    for c in CONCURRENCIES:
        before = cpu_seconds(target.proc)
        text = run_wrk(target.url, c, duration_s, lua)
        after = cpu_seconds(target.proc)
        cpu = after - before if before is not None and after is not None else None
        (out / f"wrk-{target.name}-c{c}.txt").write_text(text)
        result = parse_wrk(text, c, cpu)
        target.wrk.append(result)
        print(f"  c={c:<3} p50 {fmt_ms(result.p50_ms):>8}  p99 {fmt_ms(result.p99_ms):>8}  "
              f"{result.rps:>9,.0f} rps  errors {result.errors}", flush=True)


def measure_stream(target: Target, count: int) -> None:
    """``count`` sequential streams on one keep-alive connection (warmed first)."""
    result = target.stream
    headers = {"content-type": "application/json"}
    with httpx.Client(timeout=30.0) as client:
        client.post(target.url + CHAT_PATH, content=CHAT_BODY, headers=headers).raise_for_status()
        for _ in range(count):
            data = bytearray()
            reads = 0
            first: float | None = None
            start = time.perf_counter()
            with client.stream("POST", target.url + CHAT_PATH, content=STREAM_BODY,
                               headers=headers) as resp:
                resp.raise_for_status()
                for chunk in resp.iter_raw():
                    if not chunk:
                        continue
                    if first is None:
                        first = time.perf_counter()
                    reads += 1
                    data += chunk
            end = time.perf_counter()
            result.ttfb_ms.append(((first or end) - start) * 1000)
            result.total_s.append(end - start)
            result.reads.append(reads)
            if data.count(b"data: ") == STREAM_CHUNKS + 1 and data.rstrip().endswith(b"[DONE]"):
                result.complete += 1
    print(f"  stream: first chunk {fmt_ms(statistics.median(result.ttfb_ms))}, total "
          f"{statistics.median(result.total_s):.3f} s, {statistics.median(result.reads):.0f} "
          f"reads, {result.complete}/{count} complete", flush=True)


IDLE_LEAVES = ("EpollSelector.select ", "select (selectors.py)", "Condition.wait ",
               "Event.wait ", "Queue.get ")  # a thread waiting, not working


def layer(frame: str) -> str:
    """The package of a py-spy frame such as ``send (uvicorn/protocols/http/h11_impl.py)``."""
    where = frame.rpartition("(")[2].rstrip(")")
    top = where.split("/", 1)[0] if "/" in where else where.removesuffix(".py")
    return top.lstrip("<").rstrip(">") or "?"


def py_spy() -> str | None:
    """py-spy on PATH, or beside this interpreter (a venv's bin/)."""
    found = shutil.which("py-spy")
    beside = Path(sys.executable).parent / "py-spy"
    return found or (str(beside) if beside.exists() else None)


def profile(target: Target, duration_s: int, lua: Path, out: Path, top: int = 25) -> str:
    """py-spy (raw stacks, no line numbers) on the target's process during wrk at c=16;
    returns the top functions by own and by inclusive samples, as text."""
    assert target.proc is not None
    folded = out / f"profile-{target.name}-c16.folded"
    argv = [py_spy() or "py-spy", "record", "-p", str(target.proc.pid), "-d",
            str(duration_s + 1), "-r", "200", "-f", "raw", "--nolineno", "--nonblocking",
            "-o", str(folded)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    text = run_wrk(target.url, 16, duration_s, lua)
    (out / f"wrk-{target.name}-c16-profiled.txt").write_text(text)
    _, err = spy.communicate(timeout=60)
    if spy.returncode != 0 or not folded.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')}")
    own: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames or not n.isdigit():
            continue
        count = int(n)
        if frames[-1].startswith(IDLE_LEAVES):
            idle += count
            continue
        total += count
        own[frames[-1]] += count
        layers[layer(frames[-1])] += count
        for frame in set(frames):
            incl[frame] += count
    if not total:
        raise RuntimeError(f"py-spy recorded no busy sample of {target.name}")
    lines = [f"# {LABELS[target.name]}: py-spy at 200 Hz during wrk -c16 -d{duration_s}s: "
             f"{total} busy samples (plus {idle} idle ones, waiting in select() or on a lock, "
             "left out); percentages of the busy ones", "", "## own samples by package"]
    lines += [f"{n / total:6.1%}  {name}" for name, n in layers.most_common()]
    lines += ["", "## own (self) samples"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "## inclusive samples"]
    lines += [f"{n / total:6.1%}  {frame}" for frame, n in incl.most_common(top)]
    report = "\n".join(lines) + "\n"
    (out / f"profile-{target.name}-top.txt").write_text(report)
    return report


def fmt_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def tables(targets: list[Target], duration_s: int) -> str:
    heads = [LABELS[t.name] for t in targets]
    sep = "|---" * (len(targets) + 1) + "|"
    out = [f"**Throughput and latency** (p50 / p99, requests per second; wrk -t1 -cC "
           f"-d{duration_s}s --latency):", "",
           "| concurrency | " + " | ".join(heads) + " |", sep]
    for i, c in enumerate(CONCURRENCIES):
        cells = []
        for t in targets:
            r = t.wrk[i]
            cell = f"{fmt_ms(r.p50_ms)} / {fmt_ms(r.p99_ms)}, {r.rps:,.0f} rps"
            if r.errors:
                cell += f" ({r.errors} errors)"
            cells.append(cell)
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out += ["", "**CPU per request** of the front process (the proxy; for direct, the upstream), "
            "in µs:", "", "| concurrency | " + " | ".join(heads) + " |", sep]
    for i, c in enumerate(CONCURRENCIES):
        cells = [f"{t.wrk[i].cpu_us_per_request:.0f}" if t.wrk[i].cpu_us_per_request else "n/a"
                 for t in targets]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    streamed = [t for t in targets if t.stream.ttfb_ms]
    if streamed:
        n = len(streamed[0].stream.ttfb_ms)
        out += ["", f"**Streaming** ({n} sequential requests, 50 SSE chunks 20 ms apart; "
                "medians):", "",
                "| path | time to first chunk | total | reads per stream | complete |",
                "|---|---|---|---|---|"]
        for t in streamed:
            s = t.stream
            out.append(f"| {LABELS[t.name]} | {fmt_ms(statistics.median(s.ttfb_ms))} | "
                       f"{statistics.median(s.total_s):.3f} s | "
                       f"{statistics.median(s.reads):.0f} | {s.complete}/{len(s.ttfb_ms)} |")
    return "\n".join(out) + "\n"


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else ""

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    wrk_version = wrk_version.split(" Copyright")[0]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "vlmhub"],
                           capture_output=True, text=True, check=False).stdout.strip()
    info = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": str(os.cpu_count()), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version(), "wrk": wrk_version.strip(),
            "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
            "vlmhub commit": (git or "unknown") + (" + uncommitted changes in vlmhub/"
                                                   if dirty else "")}
    for pkg in ("vlmhub", "uvicorn", "starlette", "aiohttp", "httpx", "uvloop", "httptools"):
        info[pkg] = version(pkg)
    return info


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the clean-up in ``finally`` runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"comma-separated, from {', '.join(ALL_PATHS)} (default: "
                        f"{','.join(DEFAULT_PATHS)}); direct is always measured")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk -c16 first")
    parser.add_argument("--streams", type=int, default=15, help="sequential streaming requests")
    parser.add_argument("--proxy-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="event loop of the thin proxies (default asyncio, as vlmhub route)")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, py-spy the proxies under wrk -c16 (needs py-spy)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for raw outputs (default: a new one under the temp dir)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    if unknown := [n for n in names if n not in ALL_PATHS]:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(ALL_PATHS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian/Ubuntu: apt-get install -y wrk)")
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    if ((args.proxy_loop == "uvloop" or "vlmhub-uvloop" in names)
            and importlib.util.find_spec("uvloop") is None):
        parser.error("--proxy-loop uvloop and vlmhub-uvloop need uvloop (pip install uvloop)")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.results or Path(tempfile.gettempdir()) / f"vlmhub-bench-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    lua = out / "chat.lua"
    lua.write_text(WRK_LUA)
    info = machine()
    info["command"] = " ".join([".venv/bin/python", "benchmarks/router_overhead.py",
                                *(argv if argv is not None else sys.argv[1:])])
    info["proxy_loop"] = args.proxy_loop
    print(f"results: {out}")
    print(", ".join(f"{k} {v}" for k, v in info.items() if k != "command"), flush=True)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: the machine is busy (load {os.getloadavg()[0]:.2f}); other work on "
              "its cores skews every figure", flush=True)

    procs = Processes(out)
    started = time.monotonic()
    with sigterm_exits():
        try:
            up_port = free_port()
            upstream_url = f"http://127.0.0.1:{up_port}"
            up = procs.start("upstream", [sys.executable, str(HERE / "upstream.py"),
                                          "--port", str(up_port)])
            wait_ready(procs, "upstream", up, upstream_url)
            targets = {"direct": Target("direct", upstream_url, up)}
            config = out / "models.yaml"
            config.write_text(
                "gpu: {total_gib: 8, force_total: true}\n"
                "runtime: {kind: process}\n"
                "models:\n"
                f"  bench: {{url: \"{upstream_url}\", served_model_name: bench}}\n")
            launches = {"vlmhub": ["-m", "vlmhub"], "vlmhub-h11": ["-c", VLMHUB_H11],
                        "vlmhub-gcfreeze": ["-c", VLMHUB_GC_FREEZE],
                        "vlmhub-uvloop": ["-c", VLMHUB_UVLOOP]}
            for name, launch in launches.items():
                if name in names:
                    port = free_port()
                    proc = procs.start(name, [sys.executable, *launch, "route", "--config",
                                              str(config), "--port", str(port)])
                    targets[name] = Target(name, f"http://127.0.0.1:{port}", proc)
            for client in ("aiohttp", "httpx"):
                if client in names:
                    script = out / "thin_proxy.py"
                    script.write_text(THIN_PROXY)
                    port = free_port()
                    proc = procs.start(client, [sys.executable, str(script), client,
                                                upstream_url, str(port), args.proxy_loop])
                    targets[client] = Target(client, f"http://127.0.0.1:{port}", proc)
            for t in targets.values():
                assert t.proc is not None
                wait_ready(procs, t.name, t.proc, t.url)

            ordered = [targets[n] for n in ALL_PATHS if n in targets and
                       (n in names or n == "direct")]
            for t in ordered:
                print(f"{LABELS[t.name]} ({t.url})", flush=True)
                measure_wrk(t, args.duration, args.warmup, lua, out)
                if args.streams:
                    measure_stream(t, args.streams)
            profiles = ""
            if args.profile:
                for t in ordered:
                    if t.name != "direct":
                        print(f"profiling {LABELS[t.name]}...", flush=True)
                        profiles += profile(t, args.duration, lua, out) + "\n"
        finally:
            procs.stop_all()

    table = tables(ordered, args.duration)
    elapsed = time.monotonic() - started
    print()
    print(table)
    if profiles:
        print(profiles)
    summary = [f"# Router overhead run ({info['date']})", "", "```", info["command"], "```", "",
               *(f"- {k}: {v}" for k, v in info.items() if k not in ("command", "date")),
               f"- elapsed: {elapsed:.0f} s", "", table]
    (out / "summary.md").write_text("\n".join(summary))
    (out / "results.json").write_text(json.dumps({
        "info": info, "elapsed_s": elapsed,
        "targets": {t.name: {"url": t.url, "wrk": [r.__dict__ for r in t.wrk],
                             "stream": t.stream.__dict__} for t in ordered}}, indent=2))
    print(f"raw wrk outputs, logs and summary.md in {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
