"""Stand-in (test double) for vLLM's OpenAI-compatible server. NOT an inference engine.

It speaks vLLM 0.32's CLI and HTTP surface (``/health``, ``/v1/models``, chat and text
completions with streaming, ``/metrics``, sleep mode, ...) and answers with deterministic
made-up text whose first word is the served model name plus a colon. Knobs (``--stub-*`` flags
or ``VLMHUB_STUB_*`` env vars; a flag wins) make it slow to start, fail at start-up with vLLM's
real errors, crash mid-stream, hang (``--stub-hang-after N``: after N completions every
request is accepted and never answered; SIGTERM still ends it), or share a simulated GPU with
other stubs through a ledger dir;
``VLMHUB_STUB_SLEEP_FAILS=1`` makes ``/sleep`` answer 500.
With ``--stub-weights-gib`` it also simulates vLLM's memory accounting and prints vLLM's real
memory lines with those figures (``--stub-activation-gib``, ``--stub-non-torch-gib``,
``--stub-cuda-graph-gib``, ``--stub-kv-bytes-per-token``): without ``--kv-cache-memory-bytes``
it "profiles" (the KV cache gets ``--gpu-memory-utilization`` x total less the rest, and a
shortfall fails with vLLM's no-cache-blocks or max-model-len error); with it, the engine holds
exactly its parts, and more than the simulated GPU has free is CUDA out of memory.
Standard library only, imports nothing from vlmhub: it runs as ``python3 /app/stub_engine.py``
in a bare Debian image as well as ``python -m vlmhub.testing.stub_engine``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

# The stand-in's Docker image has no vlmhub package: it carries these modules beside this
# file (/app), so each falls back to a plain import from this file's directory.
try:  # dots.ocr layout answers (it needs vlmhub.ocr: without vlmhub, none)
    from vlmhub.testing import stub_layout
except ImportError:
    try:
        import stub_layout  # type: ignore[import-not-found,no-redef]
    except ImportError:
        stub_layout = None  # type: ignore[assignment]
try:  # the task-dependent routes (pooling, speech, ...)
    from vlmhub.testing import stub_endpoints
except ImportError:
    try:
        import stub_endpoints  # type: ignore[import-not-found,no-redef]
    except ImportError:
        stub_endpoints = None  # type: ignore[assignment]
try:  # the pretend machine of several GPUs (VLMHUB_STUB_GPUS, CUDA_VISIBLE_DEVICES)
    from vlmhub.testing import stub_gpus
except ImportError:
    try:
        import stub_gpus  # type: ignore[import-not-found,no-redef]
    except ImportError:  # one pretend card
        stub_gpus = None  # type: ignore[assignment]
try:  # sleep mode: both levels, the pretend host's RAM, wake times, a wake without room
    from vlmhub.testing import stub_sleep
except ImportError:
    try:
        import stub_sleep  # type: ignore[import-not-found,no-redef]
    except ImportError:
        stub_sleep = None  # type: ignore[assignment]

VERSION = "0.32.0"
GIB = 1024**3
SLEEP_CLAIM_GIB = 1.25  # what a sleeping vLLM keeps on the GPU (CUDA context, graph pools)
IMAGE_TOKENS = 64  # prompt tokens counted per image
WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "amber", "basalt", "cobalt", "dune", "ember", "fjord", "granite", "harbor", "iris", "jade",
    "kelp", "lagoon", "marble", "nectar", "onyx", "pebble", "quartz", "ripple", "saffron", "umber",
]  # fmt: skip
FREE_MEMORY = (
    "ValueError: Free memory on device cuda:0 ({free:.2f}/{total:.2f} GiB) on startup is less "
    "than desired GPU memory utilization ({util}, {claim:.2f} GiB). Decrease GPU memory "
    "utilization or reduce GPU memory used by other processes."
)
FAILURES = {  # --stub-fail-at-startup REASON -> (file, line, function, error line)
    "free-memory": ("worker/gpu_worker.py", 239, "init_device",
                    FREE_MEMORY.format(free=3.21, total=11.5, util=0.85, claim=9.78)),
    "no-cache-blocks": ("core/kv_cache_utils.py", 686, "check_enough_kv_cache_memory",
                        "ValueError: No available memory for the cache blocks. Try increasing "
                        "`gpu_memory_utilization` when initializing the engine."),
    "max-model-len": ("core/kv_cache_utils.py", 706, "check_enough_kv_cache_memory",
                      "ValueError: To serve at least one request with the models's max seq len "
                      "(32768), (3.50 GiB KV cache is needed, which is larger than the available "
                      "KV cache memory (1.10 GiB). Based on the available memory, the estimated "
                      "maximum model length is 10240. Try increasing `gpu_memory_utilization` or "
                      "decreasing `max_model_len` when initializing the engine."),
}  # fmt: skip
KNOBS: tuple[tuple[str, str, type], ...] = (  # flag, env var, type
    ("--stub-startup-delay", "VLMHUB_STUB_STARTUP_DELAY", float),
    ("--stub-fail-at-startup", "VLMHUB_STUB_FAIL_AT_STARTUP", str),
    ("--stub-crash-after", "VLMHUB_STUB_CRASH_AFTER", int),
    ("--stub-hang-after", "VLMHUB_STUB_HANG_AFTER", int),
    ("--stub-token-delay", "VLMHUB_STUB_TOKEN_DELAY", float),
    ("--stub-request-delay", "VLMHUB_STUB_REQUEST_DELAY", float),  # seconds per completion
    ("--stub-max-seqs", "VLMHUB_STUB_MAX_SEQS", int),  # completions at once; more wait
    ("--stub-gpu-total-gib", "VLMHUB_STUB_GPU_TOTAL_GIB", float),
    ("--stub-ledger", "VLMHUB_STUB_LEDGER", str),
    ("--stub-weights-gib", "VLMHUB_STUB_WEIGHTS_GIB", float),
    ("--stub-activation-gib", "VLMHUB_STUB_ACTIVATION_GIB", float),
    ("--stub-non-torch-gib", "VLMHUB_STUB_NON_TORCH_GIB", float),
    ("--stub-cuda-graph-gib", "VLMHUB_STUB_CUDA_GRAPH_GIB", float),
    ("--stub-kv-bytes-per-token", "VLMHUB_STUB_KV_BYTES_PER_TOKEN", int),
) + (stub_sleep.KNOBS if stub_sleep is not None else ())
DEFAULT_TOTAL_GIB = 24.0  # the simulated card when no --stub-gpu-total-gib is given
# Unknown vLLM flags take one value, except these booleans (and --enable-*/--disable-*/--no-*).
BOOL_FLAGS = {"--trust-remote-code", "--enforce-eager", "--async-scheduling", "--headless",
              "--skip-tokenizer-init", "--return-tokens-as-token-ids", "--allow-credentials"}
BOOL_PREFIXES = ("--enable-", "--disable-", "--no-")
DEV_ROUTES = {"/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache"}
_out_lock = threading.Lock()


def log(msg: str, src: str = "api_server.py:1", level: str = "INFO",
        out: TextIO | None = None) -> None:
    """Print a vLLM-style line (``INFO 11-26 12:00:00 [file.py:N] msg``), flushed."""
    raw(f"{level} {time.strftime('%m-%d %H:%M:%S')} [{src}] {msg}", out)


def raw(line: str, out: TextIO | None = None) -> None:
    with _out_lock:
        print(line, file=out or sys.stdout, flush=True)


# ----------------------------------------------------------------------------- GPU ledger
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited but unreaped child still answers kill(0): zombies count as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_ledger(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Live entries of a simulated-GPU ledger dir, each with an added "file" key.

    An entry with an "ident" (an engine in a container) is live while its file exists; any
    other while its pid is alive.
    """
    entries: list[dict[str, Any]] = []
    for path in sorted(Path(directory).glob("[!.]*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("ident") or _pid_alive(int(entry.get("pid", -1))):
            entries.append({**entry, "file": path.name})
    return entries


def ledger_used_gib(directory: str | os.PathLike[str]) -> float:
    """GiB claimed on the simulated GPU by the live engines of a ledger dir."""
    return float(sum(float(e.get("claim_gib", 0.0)) for e in read_ledger(directory)))


class Ledger:
    """This engine's entry: ``DIR/<pid, or env VLMHUB_STUB_LEDGER_ID>-<port>.json``."""

    def __init__(self, directory: str, port: int, model: str, total: float, util: float) -> None:
        self.dir, self.total, self.util, self.claim = Path(directory), total, util, util * total
        self.residue = SLEEP_CLAIM_GIB  # kept while asleep (stub_sleep: --stub-sleep-residue-gib)
        ident = os.environ.get("VLMHUB_STUB_LEDGER_ID") or None
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", ident or str(os.getpid()))
        self.path = self.dir / f"{key}-{port}.json"
        self.entry: dict[str, Any] = {"pid": os.getpid(), "port": port, "model": model,
                                      "claim_gib": self.claim, "sleeping": False,
                                      "started": time.time()}
        if ident:
            self.entry["ident"] = ident
        self.written = False
        self.free_at_start = total
        self.mirrors: list[Ledger] = []
        """The ledgers of a tensor-parallel stand-in's other ranks (stub_gpus.cards): each
        is checked and charged as this one."""

    def acquire(self) -> str | None:
        """vLLM's start-up free-memory check against the other engines, then write the entry.

        Returns the vLLM error line when the simulated GPU has too little free memory.
        """
        for m in self.mirrors:  # every rank checks its own card
            if (err := m.acquire()) is not None:
                self.remove()
                return err
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # check-and-write is atomic across stubs
            others = [e for e in read_ledger(self.dir) if e["file"] != self.path.name]
            free = max(0.0, self.total - sum(float(e.get("claim_gib", 0.0)) for e in others))
            self.free_at_start = min([free, *(m.free_at_start for m in self.mirrors)])
            if free < self.claim:
                for m in self.mirrors:
                    m.remove()
                return FREE_MEMORY.format(free=free, total=self.total, util=self.util,
                                          claim=self.claim)
            self.write()
        return None

    def write(self, sleeping: bool | None = None) -> None:
        if sleeping is not None:
            claim = self.residue if sleeping else self.claim
            self.entry.update(sleeping=sleeping, claim_gib=claim)
        tmp = self.dir / f".{self.path.name}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(self.entry))
        os.replace(tmp, self.path)
        self.written = True
        for m in self.mirrors:
            m.entry.update(self.entry)
            m.write()

    def remove(self) -> None:
        for m in self.mirrors:
            m.remove()
        if self.written:
            self.written = False
            with contextlib.suppress(OSError):
                self.path.unlink()


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse vLLM's CLI: other vLLM flags are ignored, --disable-log-requests fails (exit 2)."""
    p = argparse.ArgumentParser(prog="api_server.py", allow_abbrev=False,
                                description="vlmhub stub engine: a test double of vLLM's server")
    p.add_argument("model_tag", nargs="?", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.92)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--enable-sleep-mode", action="store_true")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    if stub_endpoints is not None:  # --task, --runner, --convert
        stub_endpoints.add_args(p)
    for flag, _env, kind in KNOBS:
        p.add_argument(flag, type=kind, default=None)
    known = {s for a in p._actions for s in a.option_strings}
    tokens, i = list(sys.argv[1:] if argv is None else argv), 0
    kept: list[str] = []
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):  # vLLM also accepts --max_model_len
            name = tok.split("=", 1)[0].replace("_", "-")
            tok = name + tok[len(name):]
            if name == "--disable-log-requests":
                p.error("unrecognized arguments: --disable-log-requests")
            if name not in known:  # ignore it, and its value unless it is a boolean flag
                boolean = name in BOOL_FLAGS or name.startswith(BOOL_PREFIXES)
                nxt = tokens[i + 1] if i + 1 < len(tokens) else "-"
                takes = "=" not in tok and not boolean and (
                    not nxt.startswith("-") or re.fullmatch(r"-[\d.]+", nxt) is not None)
                i += 2 if takes else 1
                continue
        kept.append(tok)
        i += 1
    args = p.parse_args(kept)
    for flag, env, kind in KNOBS:
        dest = flag[2:].replace("-", "_")
        if getattr(args, dest) is None and os.environ.get(env):
            try:
                setattr(args, dest, kind(os.environ[env]))
            except ValueError:
                p.error(f"invalid {env}: {os.environ[env]!r}")
    args.model = args.model or args.model_tag or "Qwen/Qwen3-0.6B"
    args.served_model_name = args.served_model_name or [args.model]
    args.max_model_len = args.max_model_len or 8192
    return args


# ----------------------------------------------------------------------------- engine
class Stub:
    """State shared by the request threads of one stub engine."""

    def __init__(self, args: argparse.Namespace, ledger: Ledger | None) -> None:
        self.args, self.ledger, self.names = args, ledger, list(args.served_model_name)
        self.created = int(time.time())
        self.token_delay = float(args.stub_token_delay or 0.0)
        self.request_delay = float(args.stub_request_delay or 0.0)
        self.seqs = threading.Semaphore(args.stub_max_seqs) if args.stub_max_seqs else None
        """--stub-max-seqs: a completion waits for one of N slots (as vLLM's max_num_seqs)."""
        self.crash_after = int(args.stub_crash_after or 0)
        self.hang_after = int(args.stub_hang_after or 0)
        self.dev_mode = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.running = self.disconnects = self.completions = self.successes = 0
        self.sleeper = (stub_sleep.Sleeper(args, ledger, read_ledger, log, error_body)
                        if stub_sleep is not None else None)

    @property
    def sleep_level(self) -> int:
        """0 awake, else the level it sleeps at."""
        return self.sleeper.level if self.sleeper else 0

    @property
    def needs_reload(self) -> bool:
        """Woke from level 2, no collective_rpc reload_weights yet."""
        return self.sleeper.needs_reload if self.sleeper else False

    def die(self) -> None:
        """Abrupt engine death (a simulated EngineCore crash): no response, no cleanup."""
        log("EngineCore encountered a fatal error.", "core.py:711", "ERROR")
        if self.ledger:  # a dead process frees its GPU memory
            self.ledger.remove()
        os._exit(1)


def prompt_of(body: dict[str, Any], chat: bool) -> tuple[str, int, int]:
    """(seed text, prompt token count, image count) of a completion request body."""
    if not chat:
        prompt = json.dumps(body.get("prompt", ""), sort_keys=True)
        return prompt, max(1, len(prompt.split())), 0
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list")
    words = images = 0
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                images += 1
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                words += len(part["text"].split())
    tokens = words + 4 * len(messages) + IMAGE_TOKENS * images
    return json.dumps(messages, sort_keys=True), tokens, images


def generate(model: str, prompt: str, images: int, n_tokens: int) -> list[str]:
    """Deterministic pieces: 'model:', ' [N image(s)]' if any, then ' word'... (n_tokens)."""
    pieces = [f"{model}:"] + ([f" [{images} image{'s' * (images != 1)}]"] if images else [])
    seed = hashlib.sha256(f"{model}\n{prompt}".encode()).digest()
    for i in range(max(0, n_tokens - len(pieces))):
        digest = hashlib.sha256(seed + i.to_bytes(4, "big")).digest()
        pieces.append(" " + WORDS[int.from_bytes(digest[:4], "big") % len(WORDS)])
    return pieces[:n_tokens]


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class ClientGone(Exception):
    """The HTTP client hung up before the answer was complete."""


# ----------------------------------------------------------------------------- HTTP
class StubServer(ThreadingHTTPServer):
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], stub: Stub) -> None:
        self.stub = stub
        super().__init__(addr, Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StubServer

    def version_string(self) -> str:
        return "uvicorn"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        phrase = HTTPStatus(int(code)).phrase if str(code).isdigit() else ""
        raw(f'INFO:     {self.client_address[0]}:{self.client_address[1]} - "{self.requestline}" '
            f"{code} {phrase}")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # errors of the stdlib server itself stay quiet; access lines come from log_request

    def reply(self, code: int, body: bytes = b"", ctype: str = "application/json") -> None:
        self.send_response(code)
        if body:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply_json(self, code: int, obj: Any) -> None:
        self.reply(code, json.dumps(obj).encode())

    def chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def pause(self) -> None:
        """Wait one token's delay; raise ClientGone as soon as the client hangs up."""
        delay = self.server.stub.token_delay
        end = time.monotonic() + delay
        if delay > 0 and select.select([self.connection], [], [], delay)[0]:
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    raise ClientGone
            except OSError as exc:
                raise ClientGone from exc
            time.sleep(max(0.0, end - time.monotonic()))

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def dispatch(self, method: str) -> None:
        stub, url = self.server.stub, urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with stub.lock:
            stub.requests[path] = stub.requests.get(path, 0) + 1
        if stub.hang_after and stub.completions >= stub.hang_after:
            threading.Event().wait()  # hung after N completions: accepts, never answers
        key = stub.args.api_key or os.environ.get("VLLM_API_KEY")  # as vLLM: flag, else env
        scheme, _, given = (self.headers.get("Authorization") or "").partition(" ")
        guarded = path.startswith("/v1") or path in DEV_ROUTES  # newer vLLM guards dev routes
        if key and guarded and (scheme.lower() != "bearer" or given != key):
            return self.reply_json(401, {"error": "Unauthorized"})  # vLLM's body; /health open
        sleep = (stub_sleep.ROUTES if stub.dev_mode and stub.args.enable_sleep_mode and
                 stub_sleep is not None else {"GET": set(), "POST": set()})
        routes = {"GET": {"/health", "/ping", "/version", "/v1/models", "/metrics", "/stub/stats"}
                  | sleep["GET"],
                  "POST": {"/ping", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                           "/tokenize"} | sleep["POST"]
                  | ({"/collective_rpc", "/reset_prefix_cache"} if stub.dev_mode else set())}
        if method == "POST" and stub_endpoints is not None and stub_endpoints.handled(
                self, path, data):
            return None
        if path not in routes[method]:
            known = any(path in paths for paths in routes.values())
            detail = "Method Not Allowed" if known else "Not Found"
            return self.reply_json(405 if known else 404, {"detail": detail})
        body: dict[str, Any] = {}
        if data.strip():
            try:
                body = json.loads(data)
                if not isinstance(body, dict):
                    raise ValueError("the request body must be a JSON object")
            except ValueError as exc:
                msg = f"JSON decode error: {exc}"
                return self.reply_json(400, error_body(msg, "BadRequestError", 400))
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return self.model_route(path, body)
        self.admin_route(path, query, body)

    def admin_route(self, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> None:
        stub, args = self.server.stub, self.server.stub.args
        if path == "/version":
            return self.reply_json(200, {"version": VERSION})
        if path == "/v1/models":
            return self.reply_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": stub.created, "owned_by": "vllm",
                 "root": args.model, "parent": None, "max_model_len": args.max_model_len,
                 "permission": []} for name in stub.names]})
        if path == "/stub/stats":
            with stub.lock:
                stats = {"requests": dict(stub.requests), "running": stub.running,
                         "disconnects": stub.disconnects, "completions": stub.completions}
            return self.reply_json(200, stats)
        if path == "/metrics":
            ctype = "text/plain; version=0.0.4; charset=utf-8"
            return self.reply(200, self.metrics().encode(), ctype)
        if path == "/tokenize":
            text = json.dumps(body.get("messages") or body.get("prompt", ""), sort_keys=True)
            ids = [int(hashlib.sha256(w.encode()).hexdigest()[:4], 16) for w in text.split()]
            return self.reply_json(200, {"count": len(ids), "max_model_len": args.max_model_len,
                                         "tokens": ids, "token_strs": None})
        if path == "/is_sleeping":
            return self.reply_json(200, {"is_sleeping": stub.sleep_level > 0})
        if path == "/collective_rpc":
            if stub.sleeper:
                stub.sleeper.reloaded(body.get("method"))
            return self.reply_json(200, {"results": [None]})
        if path in ("/sleep", "/wake_up") and stub.sleeper:  # stub_sleep.py
            code, answer = (stub.sleeper.sleep((query.get("level") or ["1"])[0])
                            if path == "/sleep" else stub.sleeper.wake())
            if answer is not None:
                return self.reply_json(code, answer)
        self.reply(200)  # /health, /ping, /reset_prefix_cache, /sleep, /wake_up

    def metrics(self) -> str:
        stub = self.server.stub
        labels = 'engine="0",model_name="{}"'.format(stub.names[0].replace('"', '\\"'))
        with stub.lock:
            running, level, done = stub.running, stub.sleep_level, stub.successes
        rows = [("num_requests_running", "gauge", "Number of requests in model execution batches.",
                 running),
                ("num_requests_waiting", "gauge", "Number of requests waiting to be processed.", 0),
                ("kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
                 min(1.0, 0.05 * running)),
                ("request_success_total", "counter", "Count of successfully processed requests.",
                 done)]
        lines: list[str] = []
        for name, kind, text, value in rows:
            lines += [f"# HELP vllm:{name} {text}", f"# TYPE vllm:{name} {kind}",
                      f"vllm:{name}{{{labels}}} {float(value)}"]
        lines += ["# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is "
                  "sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep "
                  "level 1; discard_all = 1 means sleep level 2.",
                  "# TYPE vllm:engine_sleep_state gauge"]
        for i, state in enumerate(("awake", "weights_offloaded", "discard_all")):
            lines.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} '
                         f"{float(level == i)}")
        return "\n".join(lines) + "\n"

    def model_route(self, path: str, body: dict[str, Any]) -> None:
        stub = self.server.stub
        model = str(body.get("model") or stub.names[0])
        if model not in stub.names:
            msg = f"The model `{model}` does not exist."
            return self.reply_json(404, error_body(msg, "NotFoundError", 404))
        if stub.sleep_level or stub.needs_reload:  # real vLLM misbehaves; the stand-in says why
            why = (f"the engine is asleep (level {stub.sleep_level}); POST /wake_up first"
                   if stub.sleep_level else "the weights were discarded by sleep level 2; POST "
                   '/collective_rpc {"method": "reload_weights"} after /wake_up')
            code, kind = (503, "ServiceUnavailableError") if stub.sleep_level else (
                500, "InternalServerError")
            return self.reply_json(code, error_body(f"vlmhub stub engine: {why}", kind, code))
        if path == "/v1/embeddings":
            given = body.get("input", "")
            items: list[Any] = given if isinstance(given, list) else [given]
            digests = [hashlib.sha256(f"{model}\n{json.dumps(x)}".encode()).digest() for x in items]
            used = sum(len(json.dumps(x).split()) for x in items)
            return self.reply_json(200, {
                "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": model, "usage": {"prompt_tokens": used, "total_tokens": used},
                "data": [{"object": "embedding", "index": i,
                          "embedding": [round(b / 127.5 - 1, 4) for b in d[:16]]}
                         for i, d in enumerate(digests)]})
        self.complete(model, body, chat=path == "/v1/chat/completions")

    def complete(self, model: str, body: dict[str, Any], chat: bool) -> None:
        stub, limit = self.server.stub, self.server.stub.args.max_model_len
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        try:
            prompt, prompt_tokens, images = prompt_of(body, chat)
            layout = (stub_layout.answer(body, WORDS)  # only for dots.ocr's layout prompt
                      if chat and stub_layout is not None else None)
            if wanted is not None and (not isinstance(wanted, int) or wanted < 1):
                raise ValueError("max_tokens must be a positive integer")
            if prompt_tokens + (wanted or 0) > limit:
                raise ValueError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {prompt_tokens + (wanted or 0)} tokens ({prompt_tokens} in the "
                    f"messages, {wanted or 0} in the completion). Please reduce the length of the "
                    "messages or completion.")
        except ValueError as exc:
            return self.reply_json(400, error_body(str(exc), "BadRequestError", 400))
        pieces = (generate(model, prompt, images, min(wanted or 16, 64)) if layout is None
                  else stub_layout.pieces(layout, wanted))
        finish = "length" if wanted == len(pieces) else "stop"
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + len(pieces),
                 "completion_tokens": len(pieces)}
        if stub.seqs is not None:
            stub.seqs.acquire()
        time.sleep(stub.request_delay)  # --stub-request-delay: the work of one request
        with stub.lock:
            stub.completions += 1
            crash = stub.completions == stub.crash_after
            stub.running += 1
        try:
            if body.get("stream"):
                with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
                self.stream(model, chat, pieces, finish, usage if with_usage else None, crash)
            else:
                if crash:
                    stub.die()
                for _ in pieces:
                    self.pause()
                text = "".join(pieces)
                choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish,
                                          "stop_reason": None}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text, "tool_calls": [],
                                         "reasoning_content": None}
                else:
                    choice["text"] = text
                self.reply_json(200, {
                    "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": model, "choices": [choice],
                    "usage": usage})
            with stub.lock:
                stub.successes += 1
        except (ClientGone, ConnectionError):
            with stub.lock:
                stub.disconnects += 1
            self.close_connection = True
        finally:
            with stub.lock:
                stub.running -= 1
            if stub.seqs is not None:
                stub.seqs.release()

    def stream(self, model: str, chat: bool, pieces: list[str], finish: str,
               usage: dict[str, int] | None, crash: bool) -> None:
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(delta: dict[str, str] | None, text: str, reason: str | None = None) -> None:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
            choice.update({"delta": delta} if chat else {"text": text})
            obj = {"id": rid, "object": kind, "created": created, "model": model,
                   "choices": [choice]}
            self.chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if chat:
            event({"role": "assistant", "content": ""}, "")
        for i, piece in enumerate(pieces):
            if crash and i == min(2, len(pieces) - 1):
                self.server.stub.die()  # mid-stream: the client sees a broken chunked body
            self.pause()
            event({"content": piece}, piece)
        event({}, "", finish)
        if usage is not None:
            obj = {"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                   "usage": usage}
            self.chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")


# ----------------------------------------------------------------------------- memory
Step = tuple[float, str, str]  # (fraction of the start-up delay, source file, message)
Failure = tuple[str, int, str, str]  # (file, line, function, error line) as in FAILURES


def memory_startup(args: argparse.Namespace, ledger: Ledger | None,
                   delay: float) -> tuple[list[Step], Failure | None]:
    """vLLM's memory accounting on the simulated GPU, as log lines (and the failure, if any).

    Profiling (no --kv-cache-memory-bytes): the KV cache gets U x total less weights,
    activation, non-torch and CUDA graphs. With --kv-cache-memory-bytes the engine holds its
    parts exactly, and CUDA runs out of memory when they exceed what was free at start.
    """
    total = float(args.stub_gpu_total_gib or DEFAULT_TOTAL_GIB)
    util, length = args.gpu_memory_utilization, args.max_model_len
    w = float(args.stub_weights_gib) / max(args.tensor_parallel_size, 1)  # a rank's shard
    act = float(args.stub_activation_gib or 0.0)
    nt = 0.1 if args.stub_non_torch_gib is None else float(args.stub_non_torch_gib)
    graphs = 0.0 if args.enforce_eager else float(args.stub_cuda_graph_gib or 0.0)
    per_token = int(args.stub_kv_bytes_per_token or 131072)
    requested, fixed = util * total, w + act + nt + graphs
    free = ledger.free_at_start if ledger else total
    steps: list[Step] = [
        (0.05, "gpu_model_runner.py:2602", f"Starting to load model {args.model}..."),
        (0.45, "default_loader.py:267", "Loading weights took 0.40 seconds"),
        (0.55, "gpu_model_runner.py:5150",
         f"Model loading took {w:.4f} GiB memory and {delay:.6f} seconds")]
    if args.kv_cache_memory_bytes:
        kv = args.kv_cache_memory_bytes / GIB
        steps.append((0.7, "gpu_worker.py:669", (
            f"Initial free memory {free:.2f} GiB, reserved {kv:.2f} GiB memory for KV Cache as "
            "specified by kv_cache_memory_bytes config and skipped memory profiling. This does "
            "not respect the gpu_memory_utilization config.")))
        if fixed + kv > free + 1e-9:
            return steps, ("worker/gpu_worker.py", 401, "initialize_from_config",
                           f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                           f"{kv:.2f} GiB. GPU 0 has a total capacity of {total:.2f} GiB of which "
                           f"{max(free - fixed, 0.0):.2f} GiB is free.")
        claim = fixed + kv
    else:
        kv = requested - fixed
        steps += [(0.7, "gpu_worker.py:298", "Memory profiling takes 0.10 seconds"),
                  (0.75, "gpu_worker.py:760", f"Available KV cache memory: {kv:.2f} GiB")]
        if kv <= 0:
            return steps, FAILURES["no-cache-blocks"]
        if kv * GIB < length * per_token:
            need, most = length * per_token / GIB, int(kv * GIB // per_token) // 16 * 16
            return steps, ("core/kv_cache_utils.py", 1027, "_check_enough_kv_cache_memory", (
                f"ValueError: To serve at least one request with the model's max seq len "
                f"({length}), ({need:.2f} GiB KV cache is needed, which is larger than the "
                f"available KV cache memory ({kv:.2f} GiB). Based on the available memory, the "
                f"estimated maximum model length is {most}. Try increasing "
                "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the "
                "engine."))
        claim = requested
    tokens = int(kv * GIB // per_token) // 16 * 16
    steps.append((0.85, "kv_cache_utils.py:2328", (
        f"GPU KV cache size: {tokens:,} tokens, Maximum concurrency for {length:,} tokens per "
        f"request: {tokens / length:.2f}x")))
    if graphs:
        steps.append((0.9, "gpu_model_runner.py:6582",
                      f"Graph capturing finished in 1 secs, took {graphs:.2f} GiB"))
    if not args.kv_cache_memory_bytes:
        steps.append((0.95, "gpu_worker.py:1034", (
            f"Free memory on device ({free:.2f}/{total:.2f} GiB) on startup. Desired GPU memory "
            f"utilization is ({util}, {requested:.2f} GiB). Actual usage is {w + nt:.2f} GiB "
            f"for consumed memory (weights + non-torch), {act:.2f} GiB for peak activation, "
            f"and {graphs:.2f} GiB for CUDAGraph memory. Current kv cache memory in use is "
            f"{kv:.2f} GiB.")))
    if ledger:  # the engine now holds what it really uses
        ledger.claim = claim
        ledger.write(sleeping=False)
    return steps, None


# ----------------------------------------------------------------------------- main
def fail(src: str, line_no: int, func: str, error: str) -> int:
    """Print vLLM's start-up failure (ERROR line, then a traceback on stderr); exit code 1."""
    log("EngineCore failed to start.", "core.py:708", "ERROR")
    base = "/usr/local/lib/python3.12/dist-packages/vllm/v1"
    raw("Traceback (most recent call last):\n"
        f'  File "{base}/engine/core.py", line 699, in run_engine_core\n'
        "    engine_core = EngineCoreProc(*args, **kwargs)\n"
        f'  File "{base}/{src}", line {line_no}, in {func}\n'
        f"    raise {error.split(':')[0]}(\n{error}", sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    delay = max(0.0, 0.5 if args.stub_startup_delay is None else float(args.stub_startup_delay))
    ranks: list[tuple[str | None, float | None]] = []
    try:  # several pretend cards: each rank's card has its own ledger and size
        if stub_gpus is not None:
            ranks = stub_gpus.cards(args.stub_ledger, args.stub_gpu_total_gib, DEFAULT_TOTAL_GIB,
                                    ranks=args.tensor_parallel_size)
            args.stub_ledger, args.stub_gpu_total_gib = ranks[0]
    except ValueError as exc:  # stub_gpus.NoDevice
        return fail("worker/gpu_worker.py", 239, "init_device", str(exc))
    ledger = None
    if args.stub_ledger and args.stub_gpu_total_gib:
        ledger = Ledger(args.stub_ledger, args.port, args.model, float(args.stub_gpu_total_gib),
                        args.gpu_memory_utilization)
        ledger.mirrors = [Ledger(d, args.port, args.model, float(t), args.gpu_memory_utilization)
                          for d, t in ranks[1:] if d and t]  # the other ranks' cards
        atexit.register(ledger.remove)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log("Shutting down", "launcher.py:99")
        if ledger:
            ledger.remove()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"vLLM API server version {VERSION} (vlmhub stub engine)", "api_server.py:1885")
    log(f"non-default args: {{'model_tag': {args.model!r}, 'host': {args.host!r}, "
        f"'port': {args.port}, 'max_model_len': {args.max_model_len}}}", "utils.py:253")
    if ledger and (err := ledger.acquire()):
        return fail("worker/gpu_worker.py", 239, "init_device", err)
    kv_gib = 0.5
    if args.kv_cache_memory_bytes:
        kv_gib = args.kv_cache_memory_bytes / GIB
    elif args.stub_gpu_total_gib:
        kv_gib = max(0.1, args.gpu_memory_utilization * args.stub_gpu_total_gib - 1.6)
    reason = args.stub_fail_at_startup
    fail_at = 0.3 if reason == "free-memory" else 0.75
    if args.stub_weights_gib is not None and not reason:
        steps, oom = memory_startup(args, ledger, delay)
        return run_steps(args, ledger, steps, oom and (steps[-1][0] + 0.05, oom), delay)
    steps = [
        (0.05, "gpu_model_runner.py:2602", f"Starting to load model {args.model}..."),
        (0.45, "default_loader.py:267", "Loading weights took 0.40 seconds"),
        (0.55, "gpu_model_runner.py:2653", f"Model loading took 1.23 GiB and {delay:.1f} seconds"),
        (0.7, "gpu_worker.py:298", "Memory profiling takes 0.10 seconds"),
        (0.8, "gpu_worker.py:299", f"Available KV cache memory: {kv_gib:.2f} GiB"),
        (0.9, "kv_cache_utils.py:1087", f"GPU KV cache size: {int(kv_gib * GIB / 131072)} tokens"),
        (1.0, "", ""),
    ]
    failure: tuple[float, Failure] | None = None
    if reason:
        steps = [step for step in steps if step[0] <= fail_at]
        failure = (fail_at, FAILURES.get(reason, ("engine/core.py", 83, "__init__",
                                                  f"RuntimeError: {reason}")))
    return run_steps(args, ledger, steps, failure, delay)


def run_steps(args: argparse.Namespace, ledger: Ledger | None, steps: list[Step],
              failure: tuple[float, Failure] | None, delay: float) -> int:
    """Print the start-up lines at their times; then fail (at its time), or serve."""
    start = time.monotonic()
    for frac, src, msg in steps:
        time.sleep(max(0.0, start + frac * delay - time.monotonic()))
        if msg:
            log(msg, src)
    if failure is not None:
        time.sleep(max(0.0, start + failure[0] * delay - time.monotonic()))
        return fail(*failure[1])
    time.sleep(max(0.0, start + delay - time.monotonic()))
    try:  # bound only now: while "loading", connections are refused, as with vLLM
        server = StubServer((args.host, args.port), Stub(args, ledger))
    except OSError as exc:
        log(f"OSError: {exc}", "api_server.py:1900", "ERROR")
        return 1
    log(f"Starting vLLM API server 0 on http://{args.host}:{args.port}", "launcher.py:44")
    raw(f"INFO:     Started server process [{os.getpid()}]\n"
        "INFO:     Waiting for application startup.\nINFO:     Application startup complete.\n"
        f"INFO:     Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
