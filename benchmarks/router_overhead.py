"""Proxy overhead of ``vlmhub route``, side by side with the direct path, thin proxies and LiteLLM.

One run starts a raw-ASGI upstream (benchmarks/upstream.py), ``vlmhub route`` with one external
model in front of it and every feature on (an API key, metrics, the supervisor's queue
accounting), the thin starlette proxies of the reference measurement (one pooled
httpx.AsyncClient, or one aiohttp.ClientSession, feeding a StreamingResponse) and the LiteLLM
proxy (its own venv, made by benchmarks/litellm_env.sh; the same upstream as an OpenAI-compatible
model; a master key; no database). Then, path by path:

* ``wrk -t1 -cC -d8s --latency`` POSTs a small chat body (with the key) at C = 1, 16 and 64:
  p50, p99, requests/s, and the CPU the front process used per request;
* 15 sequential streaming requests (50 SSE chunks, 20 ms apart): median time to the first
  chunk, median total time (about 1 s when nothing buffers) and the number of reads per stream;
* the front process's resident memory once its load is over.

It prints Markdown tables, the ratios (vlmhub / LiteLLM throughput, latency added over direct)
and the issue-9 targets, and keeps wrk's raw output, the logs and a summary in a results folder.
``--update-doc docs/benchmarks.md`` writes them into that file's ``router_overhead`` block.
Timings on a small machine are noisy: it reports, it never asserts. About 4 minutes with the
default paths; see benchmarks/README.md for the rest.

    .venv/bin/python benchmarks/router_overhead.py [--update-doc docs/benchmarks.md]

Needs ``wrk`` on PATH (Debian: ``apt-get install -y wrk``); ``--profile`` also needs py-spy.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from benchlib import (
    HERE,
    REPO,
    Processes,
    cpu_seconds,
    fmt_ms,
    free_port,
    machine,
    memory_mib,
    save_report,
    sigterm_exits,
)

KEY = "sk-vlmhub-bench"  # the API key every path is sent (vlmhub and LiteLLM check it)
CHAT_BODY = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = '{"model":"bench","messages":[{"role":"user","content":"hi"}],"stream":true}'
HEADERS = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
CHAT_PATH = "/v1/chat/completions"
CONCURRENCIES = (1, 16, 64)
ALL_PATHS = ("direct", "vlmhub", "vlmhub-quiet", "vlmhub-asyncio", "vlmhub-h11", "vlmhub-baseline",
             "aiohttp", "httpx", "litellm")
DEFAULT_PATHS = ("direct", "vlmhub", "vlmhub-quiet", "aiohttp", "httpx", "litellm")
LABELS = {"direct": "direct", "vlmhub": "vlmhub route",
          "vlmhub-quiet": "vlmhub route (--log-level warning: no access log)",
          "vlmhub-asyncio": "vlmhub route (asyncio loop)", "vlmhub-h11": "vlmhub route (h11)",
          "vlmhub-baseline": "vlmhub route (baseline tree)", "aiohttp": "starlette + aiohttp",
          "httpx": "starlette + httpx", "litellm": "LiteLLM proxy"}
# vlmhub route with uvicorn's pure-Python h11 parser (uvicorn's "auto" picks httptools only
# when it can import it): httptools is hidden.
VLMHUB_H11 = ("import sys; sys.modules['httptools'] = None; sys.argv[0] = 'vlmhub'; "
              "from vlmhub.cli import main; main()")
# vlmhub route on asyncio's own loop, as when uvloop is not installed: uvloop is hidden.
VLMHUB_ASYNCIO = ("import sys; sys.modules['uvloop'] = None; sys.argv[0] = 'vlmhub'; "
                  "from vlmhub.cli import main; main()")
STREAM_CHUNKS = 50  # what benchmarks/upstream.py sends, before [DONE]
TARGET_ADDED_P50_MS = 0.4  # issue 9: c=1 p50 over direct
TARGET_ACCESS_LOG_COST = 0.05  # issue 21: the access log costs at most 5 % of rps at c=16
TARGET_FIRST_CHUNK_MS = 1.0  # issue 9: first chunk over direct

WRK_LUA = f"""wrk.method = "POST"
wrk.body = '{CHAT_BODY}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {KEY}"
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

LITELLM_CONFIG = """model_list:
  - model_name: bench
    litellm_params:
      model: openai/bench
      api_base: {upstream}/v1
      api_key: none
general_settings:
  master_key: {key}
"""
# LiteLLM as documented for a local proxy without a database; the environment only keeps it
# from fetching its model price list from the internet at start and from sending telemetry.
LITELLM_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}


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
    complete: int = 0  # streams that carried every chunk and ended with [DONE]


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None  # the process whose CPU and memory are counted
    wrk: list[WrkResult] = field(default_factory=list)
    stream: StreamResult = field(default_factory=StreamResult)
    rss_start_mib: float | None = None  # once it answered its first request
    rss_after_mib: float | None = None  # after its wrk runs and streams
    rss_peak_mib: float | None = None


def wait_ready(procs: Processes, name: str, proc: subprocess.Popen[bytes], url: str,
               timeout_s: float = 30.0) -> None:
    """Block until a chat request through ``url`` answers 200 (or fail with the log's tail)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                   f"{procs.log_tail(name)}")
            try:
                resp = client.post(url + CHAT_PATH, content=CHAT_BODY, headers=HEADERS)
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s ({last}):\n"
                       f"{procs.log_tail(name)}")


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
    pid = target.proc.pid if target.proc else None
    if warmup_s:
        run_wrk(target.url, 16, warmup_s, lua)
    for c in CONCURRENCIES:
        before = cpu_seconds(pid)
        text = run_wrk(target.url, c, duration_s, lua)
        after = cpu_seconds(pid)
        cpu = after - before if before is not None and after is not None else None
        (out / f"wrk-{target.name}-c{c}.txt").write_text(text)
        result = parse_wrk(text, c, cpu)
        target.wrk.append(result)
        print(f"  c={c:<3} p50 {fmt_ms(result.p50_ms):>8}  p99 {fmt_ms(result.p99_ms):>8}  "
              f"{result.rps:>9,.0f} rps  errors {result.errors}", flush=True)


def measure_stream(target: Target, count: int) -> None:
    """``count`` sequential streams on one keep-alive connection (warmed first)."""
    result = target.stream
    with httpx.Client(timeout=30.0) as client:
        client.post(target.url + CHAT_PATH, content=CHAT_BODY, headers=HEADERS).raise_for_status()
        for _ in range(count):
            data = bytearray()
            reads = 0
            first: float | None = None
            start = time.perf_counter()
            with client.stream("POST", target.url + CHAT_PATH, content=STREAM_BODY,
                               headers=HEADERS) as resp:
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
            # LiteLLM re-encodes each chunk (and may add a closing one): count tokens, not events
            tokens = len(re.findall(rb'"content":"t\d+ "', bytes(data)))
            if tokens == STREAM_CHUNKS and data.rstrip().endswith(b"[DONE]"):
                result.complete += 1
    print(f"  stream: first chunk {fmt_ms(statistics.median(result.ttfb_ms))}, total "
          f"{statistics.median(result.total_s):.3f} s, {statistics.median(result.reads):.0f} "
          f"reads, {result.complete}/{count} complete", flush=True)


IDLE_LEAVES = ("EpollSelector.select ", "select (selectors.py)", "Condition.wait ",
               "Event.wait ", "Queue.get ", "run (uvloop", "Loop.run (uvloop")


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


def tables(targets: list[Target], duration_s: int) -> str:
    heads = [LABELS[t.name] for t in targets]
    sep = "|---" * (len(targets) + 1) + "|"
    out = [f"**Throughput and latency** (p50 / p99, requests per second; `wrk -t1 -cC "
           f"-d{duration_s}s --latency`):", "",
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
            "in µs, and its **resident memory** (VmRSS) once it answered its first request, "
            "after its load (the wrk runs and the streams), and at its peak (VmHWM), in MiB:",
            "", "| | " + " | ".join(heads) + " |", sep]
    for i, c in enumerate(CONCURRENCIES):
        cells = [f"{t.wrk[i].cpu_us_per_request:.0f}" if t.wrk[i].cpu_us_per_request else "n/a"
                 for t in targets]
        out.append(f"| CPU/request, c={c} | " + " | ".join(cells) + " |")
    for label, attr in (("RSS at start", "rss_start_mib"), ("RSS after load", "rss_after_mib"),
                        ("peak RSS", "rss_peak_mib")):
        cells = [f"{v:.0f}" if (v := getattr(t, attr)) is not None else "n/a" for t in targets]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
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


def ratios(targets: dict[str, Target]) -> str:
    """vlmhub / LiteLLM throughput, latency added over direct, and the issue-9 targets."""
    direct = targets["direct"]
    proxies = [t for n, t in targets.items() if n != "direct"]
    out = ["**Latency added over direct** (p50 of the path minus p50 of direct, same run):", "",
           "| concurrency | " + " | ".join(LABELS[t.name] for t in proxies) + " |",
           "|---" * (len(proxies) + 1) + "|"]
    for i, c in enumerate(CONCURRENCIES):
        cells = [f"+{fmt_ms(t.wrk[i].p50_ms - direct.wrk[i].p50_ms)}" for t in proxies]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    vlmhub, litellm, thin = targets.get("vlmhub"), targets.get("litellm"), targets.get("aiohttp")
    if vlmhub is not None and litellm is not None:
        out += ["", "**vlmhub route ÷ LiteLLM proxy**, requests per second: " + ", ".join(
            f"c={c} {vlmhub.wrk[i].rps / litellm.wrk[i].rps:.1f}x"
            for i, c in enumerate(CONCURRENCIES) if litellm.wrk[i].rps)
            + (f"; time to first chunk {fmt_ms(statistics.median(vlmhub.stream.ttfb_ms))} "
               f"against {fmt_ms(statistics.median(litellm.stream.ttfb_ms))}"
               if vlmhub.stream.ttfb_ms and litellm.stream.ttfb_ms else "") + "."]
    if vlmhub is not None:
        out += ["", "**Issue 9 targets** (vlmhub route with an API key, metrics and queue "
                "accounting on):", ""]
        added = vlmhub.wrk[0].p50_ms - direct.wrk[0].p50_ms
        out.append(f"- c=1 p50 added over direct ≤ {TARGET_ADDED_P50_MS} ms: "
                   f"+{fmt_ms(added)}, "
                   + ("met." if added <= TARGET_ADDED_P50_MS else
                      f"missed by {fmt_ms(added - TARGET_ADDED_P50_MS)}."))
        if thin is not None:
            for i, c in enumerate(CONCURRENCIES[1:], start=1):
                mine, theirs = vlmhub.wrk[i].rps, thin.wrk[i].rps
                out.append(f"- c={c} throughput ≥ starlette + aiohttp: {mine:,.0f} against "
                           f"{theirs:,.0f} rps ({mine / theirs:.0%}), "
                           + ("met." if mine >= theirs else
                              f"missed by {1 - mine / theirs:.0%}."))
        if (quiet := targets.get("vlmhub-quiet")) is not None:
            mine, bare = vlmhub.wrk[1].rps, quiet.wrk[1].rps
            out.append(f"- c=16 access-log cost ≤ {TARGET_ACCESS_LOG_COST:.0%} (log level info "
                       f"against warning, same run): {mine:,.0f} against {bare:,.0f} rps, "
                       f"{1 - mine / bare:.0%}, "
                       + ("met." if mine >= (1 - TARGET_ACCESS_LOG_COST) * bare else "missed."))
        if vlmhub.stream.ttfb_ms and direct.stream.ttfb_ms:
            first = statistics.median(vlmhub.stream.ttfb_ms)
            base = statistics.median(direct.stream.ttfb_ms)
            out.append(f"- first chunk ≤ direct + {TARGET_FIRST_CHUNK_MS:.0f} ms: "
                       f"{fmt_ms(first)} against {fmt_ms(base)} (+{fmt_ms(first - base)}), "
                       + ("met." if first - base <= TARGET_FIRST_CHUNK_MS else
                          f"missed by {fmt_ms(first - base - TARGET_FIRST_CHUNK_MS)}."))
    return "\n".join(out) + "\n"


def litellm_executable(given: str | None) -> str:
    """``--litellm``, else the venv made (once) by benchmarks/litellm_env.sh."""
    if given:
        return given
    done = subprocess.run(["bash", str(HERE / "litellm_env.sh")], stdout=subprocess.PIPE,
                          text=True, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit("benchmarks/litellm_env.sh failed; see its output above")
    return done.stdout.strip().splitlines()[-1]


def litellm_version(executable: str) -> str:
    python = Path(executable).parent / "python"
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                           "print(m.version('litellm'))"], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help=f"comma-separated, from {', '.join(ALL_PATHS)} (default: "
                        f"{','.join(DEFAULT_PATHS)}); direct is always measured")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk -c16 first")
    parser.add_argument("--streams", type=int, default=15, help="sequential streaming requests")
    parser.add_argument("--proxy-loop", choices=("asyncio", "uvloop"), default="uvloop",
                        help="event loop of the thin proxies (default uvloop, as vlmhub route "
                        "when uvloop is installed)")
    parser.add_argument("--litellm", default=None,
                        help="the litellm executable (default: the venv of litellm_env.sh)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a source tree (e.g. a git worktree of an older commit) whose "
                        "vlmhub/ the vlmhub-baseline path runs")
    parser.add_argument("--profile", action="store_true",
                        help="afterwards, py-spy the proxies under wrk -c16 (needs py-spy)")
    parser.add_argument("--results", type=Path, default=None,
                        help="folder for raw outputs (default: a new one under the temp dir)")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="write the figures into this file's router_overhead block")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    if unknown := [n for n in names if n not in ALL_PATHS]:
        parser.error(f"unknown path(s) {unknown}; choose from {', '.join(ALL_PATHS)}")
    if shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (Debian/Ubuntu: apt-get install -y wrk)")
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy (pip install py-spy)")
    if args.proxy_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("--proxy-loop uvloop needs uvloop (pip install uvloop)")
    if "vlmhub-baseline" in names and (args.baseline is None
                                       or not (args.baseline / "vlmhub").is_dir()):
        parser.error("the vlmhub-baseline path needs --baseline DIR with a vlmhub/ in it")
    litellm = litellm_executable(args.litellm) if "litellm" in names else None

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.results or Path(tempfile.gettempdir()) / f"vlmhub-bench-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    lua = out / "chat.lua"
    lua.write_text(WRK_LUA)
    info = machine(("vlmhub", "uvicorn", "starlette", "aiohttp", "httpx", "uvloop", "httptools"))
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    info["wrk"] = ((wrk.stdout or wrk.stderr).splitlines() or [""])[0].split(" Copyright")[0]
    if litellm:
        info["litellm"] = litellm_version(litellm)
    info["command"] = " ".join([".venv/bin/python", "benchmarks/router_overhead.py",
                                *(argv if argv is not None else sys.argv[1:])])
    info["thin proxies' loop"] = args.proxy_loop
    print(f"results: {out}")
    print(", ".join(f"{k} {v}" for k, v in info.items() if k != "command"), flush=True)
    if os.getloadavg()[0] > 0.5:
        print(f"warning: the machine is busy (load {os.getloadavg()[0]:.2f}); other work on "
              "its cores skews every figure", flush=True)

    procs = Processes(out)
    started = time.monotonic()
    profiles = ""
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
                f"router: {{api_keys: [{KEY}]}}\n"
                "runtime: {kind: process}\n"
                "models:\n"
                f"  bench: {{url: \"{upstream_url}\", served_model_name: bench}}\n")
            launches = {"vlmhub": ["-m", "vlmhub"], "vlmhub-quiet": ["-m", "vlmhub"],
                        "vlmhub-asyncio": ["-c", VLMHUB_ASYNCIO],
                        "vlmhub-h11": ["-c", VLMHUB_H11], "vlmhub-baseline": ["-m", "vlmhub"]}
            for name, launch in launches.items():
                if name in names:
                    port = free_port()
                    base = name == "vlmhub-baseline" and args.baseline is not None
                    proc = procs.start(
                        name, [sys.executable, *launch, "route", "--config", str(config),
                               "--port", str(port), "--state-dir", str(out / f"state-{name}"),
                               *(["--log-level", "warning"] if name == "vlmhub-quiet" else [])],
                        cwd=args.baseline.resolve() if base and args.baseline else REPO,
                        env={"PYTHONPATH": str(args.baseline.resolve())}
                        if base and args.baseline else None)
                    targets[name] = Target(name, f"http://127.0.0.1:{port}", proc)
            for client in ("aiohttp", "httpx"):
                if client in names:
                    script = out / "thin_proxy.py"
                    script.write_text(THIN_PROXY)
                    port = free_port()
                    proc = procs.start(client, [sys.executable, str(script), client,
                                                upstream_url, str(port), args.proxy_loop])
                    targets[client] = Target(client, f"http://127.0.0.1:{port}", proc)
            if litellm:
                lconf = out / "litellm.yaml"
                lconf.write_text(LITELLM_CONFIG.format(upstream=upstream_url, key=KEY))
                port = free_port()
                proc = procs.start("litellm", [litellm, "--config", str(lconf), "--host",
                                               "127.0.0.1", "--port", str(port),
                                               "--num_workers", "1"],
                                   env=LITELLM_ENV, cwd=out)
                targets["litellm"] = Target("litellm", f"http://127.0.0.1:{port}", proc)
            for t in targets.values():
                assert t.proc is not None
                wait_ready(procs, t.name, t.proc, t.url,
                           timeout_s=180.0 if t.name == "litellm" else 30.0)
                if mem := memory_mib(t.proc.pid):
                    t.rss_start_mib = mem[0]

            ordered = [targets[n] for n in ALL_PATHS if n in targets and
                       (n in names or n == "direct")]
            for t in ordered:
                print(f"{LABELS[t.name]} ({t.url})", flush=True)
                measure_wrk(t, args.duration, args.warmup, lua, out)
                if args.streams:
                    measure_stream(t, args.streams)
                if mem := memory_mib(t.proc.pid if t.proc else None):
                    t.rss_after_mib, t.rss_peak_mib = mem
                    print(f"  RSS {mem[0]:.0f} MiB (peak {mem[1]:.0f} MiB)", flush=True)
            if args.profile:
                for t in ordered:
                    if t.name != "direct":
                        print(f"profiling {LABELS[t.name]}...", flush=True)
                        profiles += profile(t, args.duration, lua, out) + "\n"
        finally:
            procs.stop_all()

    elapsed = time.monotonic() - started
    report = tables(ordered, args.duration) + "\n" + ratios(
        {t.name: t for t in ordered})
    print()
    print(report)
    if profiles:
        print(profiles)
    save_report(out, info, elapsed, report, {"targets": {
        t.name: {"url": t.url, "wrk": [r.__dict__ for r in t.wrk], "stream": t.stream.__dict__,
                 "rss_start_mib": t.rss_start_mib, "rss_after_mib": t.rss_after_mib,
                 "rss_peak_mib": t.rss_peak_mib} for t in ordered}},
                args.update_doc, "router_overhead")
    print(f"raw wrk outputs, logs and summary.md in {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
