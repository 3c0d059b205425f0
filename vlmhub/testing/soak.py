"""A bounded soak of `vlmhub route`: many OpenAI clients over three stand-in engines of which
two fit the (simulated) GPU, so the router swaps all the time. Every request is counted, and
the router's own process is read from /proc (descriptors, TCP connections, threads, RSS)
before and after. Used by tests/test_soak.py (reduced) and benchmarks/soak.py (full size).

The router runs as its own process (``python -m vlmhub route``), so what /proc shows is its
alone. Everything here talks to it over loopback only. :func:`soak` blocks (asynchronously)
for the whole run; its clients run concurrently on the caller's event loop. Linux only (/proc).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from vlmhub.engines.ports import free_port
from vlmhub.testing.stub_engine import ledger_used_gib

REPO = Path(__file__).resolve().parents[2]
STUB = [sys.executable, "-m", "vlmhub.testing.stub_engine"]
DOCUMENTED = frozenset({503, 504})
"""The statuses a client may get under load by design (queue full, no room, load failed or
timed out), each with Retry-After (503) and a reason. Anything else is a failure."""


# ----------------------------------------------------------------------- models.yaml
def stub_models(names: tuple[str, ...], weights: float, **entry: Any) -> dict[str, Any]:
    """Stand-in models of ``weights + 0.25`` GiB each (no CUDA context), as models.yaml."""
    return {n: {**entry, "spec": {
        "hf_repo": f"stub/{n}", "image": "vlmhub/stub-engine:dev", "startup_timeout_s": 60,
        "reload_cost_s": 1, "options": {"max_model_len": 1024, "enforce_eager": True},
        "vram": {"weights_gib": weights, "kv_bytes_per_token": 262144, "activation_gib": 0,
                 "non_torch_gib": 0, "cuda_context_gib": 0, "sleep_residual_gib": 1.25}}}
        for n in names}


def write_config(folder: Path, models: dict[str, Any], *, router: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, total_gib: float = 8.0) -> Path:
    """``folder/models.yaml`` for the process runtime over stand-in engines that share a
    simulated GPU ledger of ``total_gib`` in ``folder/ledger`` (an over-commit fails at
    start-up with vLLM's own free-memory error)."""
    base = 21000 + (os.getpid() * 7 + time.time_ns() // 1_000_000) % 38000
    ledger = folder / "ledger"
    ledger.mkdir(parents=True, exist_ok=True)
    cfg = {
        "gpu": {"total_gib": total_gib, "reserve_gib": 0, "force_total": True},
        "router": {"health_interval_s": 0.5, "restart_backoff_s": 0.2, **(router or {})},
        "runtime": {"kind": "process", "process_argv": STUB, "port_range": [base, base + 60],
                    "env": {"VLMHUB_STUB_STARTUP_DELAY": "0.3", "VLMHUB_STUB_LEDGER": str(ledger),
                            "VLMHUB_STUB_GPU_TOTAL_GIB": str(total_gib), **(env or {})}},
        "models": models,
    }
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------- the router process
class RouterProcess:
    """One `vlmhub route` process on a free loopback port; its output goes to a file."""

    def __init__(self, config: Path, state: Path, *, port: int | None = None,
                 env: dict[str, str] | None = None, log: Path | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or config.parent / f"route-{uuid.uuid4().hex[:6]}.log"
        full = {**os.environ, "VLMHUB_STATE_DIR": str(state), "COLUMNS": "200", **(env or {})}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vlmhub", "route", "--config", str(config), "--port",
                 str(self.port), *args], stdout=out, stderr=subprocess.STDOUT, env=full,
                cwd=REPO)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_healthy(self, timeout_s: float = 60.0) -> RouterProcess:
        """Block until ``/health`` answers 200; raise with the router's output if it exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1, trust_env=False).status_code == 200:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.1)
        raise RuntimeError(f"router never became healthy:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no engine stop, no clean-up of any kind."""
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        """Ctrl-C (drain, stop the engines); SIGKILL if it hangs. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextlib.contextmanager
def running(config: Path, state: Path, **kw: Any) -> Iterator[RouterProcess]:
    """A healthy router for the ``with`` block; stopped (Ctrl-C) at its end."""
    router = RouterProcess(config, state, **kw)
    try:
        yield router.wait_healthy()
    finally:
        router.stop()


# ----------------------------------------------------------------------- /proc readings
def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _tcp_rows(pid: int, state: str) -> Iterator[tuple[str, list[str]]]:
    """(table, columns) of the TCP sockets of ``pid`` in ``state`` (hex: 01 ESTABLISHED,
    0A LISTEN)."""
    inodes = _socket_inodes(pid)
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
                cols = row.split()
                if cols[3] == state and cols[9] in inodes:
                    yield table, cols


def tcp_connections(pid: int) -> int:
    """ESTABLISHED TCP connections (v4 and v6) held by ``pid``."""
    return sum(1 for _ in _tcp_rows(pid, "01"))


def listening(pid: int) -> list[str]:
    """``address:port`` of each listening TCP socket of ``pid`` (IPv6 as ``[hex]``)."""
    out = []
    for table, cols in _tcp_rows(pid, "0A"):
        addr, port = cols[1].split(":")
        if table == "tcp":
            host = ".".join(str(int(addr[i:i + 2], 16)) for i in (6, 4, 2, 0))
        else:
            host = f"[{addr}]"
        out.append(f"{host}:{int(port, 16)}")
    return out


@dataclass(frozen=True)
class ProcSample:
    """What /proc says about one process at one moment."""

    fds: int
    tcp: int
    threads: int
    rss_kib: int

    @staticmethod
    def of(pid: int) -> ProcSample:
        rss = next(int(line.split()[1]) for line in
                   Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        return ProcSample(len(os.listdir(f"/proc/{pid}/fd")), tcp_connections(pid),
                          len(os.listdir(f"/proc/{pid}/task")), rss)


# ----------------------------------------------------------------------- the soak
@dataclass
class SoakResult:
    """Every request counted, and the router process before and after."""

    clients: int
    swaps: int = 0
    requests: int = 0
    ok: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    """The start of each refusal's message (status: text), counted."""
    lost: list[str] = field(default_factory=list)
    """Requests that got no HTTP answer (connection or protocol error, timeout)."""
    wrong: list[str] = field(default_factory=list)
    """Answers from the wrong engine, or streams without a finish reason."""
    before: ProcSample | None = None
    after: ProcSample | None = None
    peak_ledger_gib: float = 0.0
    seconds: float = 0.0

    @property
    def undocumented(self) -> dict[int, int]:
        return {s: n for s, n in self.statuses.items() if s != 200 and s not in DOCUMENTED}

    def summary(self) -> str:
        b, a = self.before, self.after
        proc = (f"router fds {b.fds} -> {a.fds}, TCP {b.tcp} -> {a.tcp}, threads {b.threads} "
                f"-> {a.threads}, RSS {b.rss_kib / 1024:.1f} -> {a.rss_kib / 1024:.1f} MiB"
                if a and b else "no /proc samples")
        other = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()) if s != 200)
        return (f"{self.ok} ok of {self.requests} requests from {self.clients} clients across "
                f"{self.swaps} swaps in {self.seconds:.0f} s; lost {len(self.lost)}, wrong "
                f"{len(self.wrong)}, other statuses: {other or 'none'}; {proc}; peak GPU "
                f"ledger {self.peak_ledger_gib:.2f} GiB")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["statuses"] = {str(k): v for k, v in self.statuses.items()}
        out["reasons"] = dict(self.reasons)
        return out


async def _metric_sum(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text,
                                                       re.MULTILINE))


async def _one(oa: Any, name: str, stream: bool, res: SoakResult) -> None:
    """One chat request; counted in ``res`` whatever happens."""
    import openai

    res.requests += 1
    messages = [{"role": "user", "content": f"hello {name} {res.requests}"}]
    try:
        if stream:
            text, finish = "", None
            chunks = await oa.chat.completions.create(model=name, messages=messages,
                                                      max_tokens=8, stream=True)
            async for chunk in chunks:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        else:
            r = await oa.chat.completions.create(model=name, messages=messages, max_tokens=8)
            text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
    except openai.APIStatusError as exc:
        res.statuses[exc.status_code] += 1
        res.reasons[f"{exc.status_code}: {exc.message}"[:120]] += 1
        return
    except Exception as exc:  # no HTTP answer at all: lost
        res.lost.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
        return
    res.statuses[200] += 1
    if text.startswith(f"{name}:") and finish in ("length", "stop"):
        res.ok += 1
    else:
        res.wrong.append(f"{name}: {text[:80]!r} finish={finish}")


async def _phase(url: str, names: tuple[str, ...], clients: int, swaps: int,
                 res: SoakResult, max_per_client: int, ledger: Path | None,
                 deadline: float) -> None:
    """``clients`` concurrent clients, each cycling through ``names`` (streaming every other
    request), until the router has made ``swaps`` more evictions, each client has sent
    ``max_per_client`` requests, or the monotonic ``deadline`` has passed."""
    import openai

    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        target = await _metric_sum(http, "vlmhub_evictions_total") + swaps
        done = asyncio.Event()

        async def monitor() -> None:
            while not done.is_set():
                evictions = await _metric_sum(http, "vlmhub_evictions_total")
                res.swaps = int(evictions)
                if evictions >= target or time.monotonic() > deadline:
                    done.set()
                if ledger is not None:
                    res.peak_ledger_gib = max(res.peak_ledger_gib, ledger_used_gib(ledger))
                await asyncio.sleep(0.1)

        async def client(i: int) -> None:
            oa = openai.AsyncOpenAI(base_url=url + "/v1", api_key="soak", timeout=600,
                                    max_retries=0)
            try:
                for k in range(max_per_client):
                    if done.is_set():
                        break
                    await _one(oa, names[(i + k) % len(names)], (i + k) % 2 == 0, res)
            finally:
                await oa.close()

        watch = asyncio.create_task(monitor())
        try:
            await asyncio.gather(*(client(i) for i in range(clients)))
        finally:
            done.set()
            await watch


async def _settle(url: str, pid: int, quiet_s: float) -> ProcSample:
    """Wait until no request is in flight or queued, then ``quiet_s`` more, and read the
    router's /proc. Idle pooled connections to engines are closed by aiohttp's clean-up,
    which runs every keep-alive timeout (4 s): up to 8 s after their last use."""
    async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        for _ in range(600):
            models = (await http.get("/api/models")).json()["models"]
            if all(m["in_flight"] == 0 and m["queued"] == 0 for m in models):
                break
            await asyncio.sleep(0.1)
    await asyncio.sleep(quiet_s)
    return ProcSample.of(pid)


async def soak(url: str, pid: int, *, names: tuple[str, ...], clients: int, swaps: int,
               warmup_swaps: int = 3, max_per_client: int = 100_000, quiet_s: float = 10.0,
               ledger: Path | None = None, limit_s: float = 3600.0) -> SoakResult:
    """Warm up (``warmup_swaps``), settle and sample the router process ``pid``, run until
    ``swaps`` more swaps, settle and sample again. Blocks (asynchronously) for the run; the
    load stops after ``limit_s`` in any case (then ``swaps`` tells how far it got)."""
    res = SoakResult(clients)
    started = time.monotonic()
    deadline = started + limit_s
    await _phase(url, names, clients, warmup_swaps, res, max_per_client, ledger, deadline)
    res.before = await _settle(url, pid, quiet_s)
    await _phase(url, names, clients, swaps, res, max_per_client, ledger, deadline)
    res.after = await _settle(url, pid, quiet_s)
    res.seconds = time.monotonic() - started
    return res


def soak_config(folder: Path, clients: int, token_delay: float = 0.01) -> Path:
    """Three stand-in models of 3.25 GiB on a simulated 8 GiB GPU (two fit), with queues
    and timeouts sized so that a correct router never refuses a request."""
    return write_config(
        folder, stub_models(("a", "b", "c"), 3.0),
        router={"max_queue": max(64, clients * 2), "queue_timeout_s": 600,
                "drain_timeout_s": 120, "health_interval_s": 2.0},
        # the stand-ins report the memory they are planned with, so a start's measured
        # budget (vlmhub.sizing.budgets) keeps three from fitting
        env={"VLMHUB_STUB_TOKEN_DELAY": str(token_delay), "VLMHUB_STUB_WEIGHTS_GIB": "2.9",
             "VLMHUB_STUB_ACTIVATION_GIB": "0", "VLMHUB_STUB_NON_TORCH_GIB": "0",
             "VLMHUB_STUB_KV_BYTES_PER_TOKEN": "262144"},
    )


def run_soak(folder: Path, *, clients: int, swaps: int, quiet_s: float = 10.0,
             max_per_client: int = 100_000, limit_s: float = 3600.0) -> SoakResult:
    """The whole soak: config, router process, load, samples; the router is stopped at the
    end (its engines too). Blocks for the run."""
    config = soak_config(folder, clients)
    with running(config, folder / "state") as router:
        return asyncio.run(soak(router.url, router.pid, names=("a", "b", "c"), clients=clients,
                                swaps=swaps, quiet_s=quiet_s, max_per_client=max_per_client,
                                ledger=folder / "ledger", limit_s=limit_s))
