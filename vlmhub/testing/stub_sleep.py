"""The stand-in's sleep mode: vLLM's dev-mode ``/sleep``, ``/wake_up``, ``/is_sleeping``.

Imported by :mod:`vlmhub.testing.stub_engine` (or, in the stand-in's Docker image, from its own
directory); standard library only. As vLLM (``vllm/entrypoints/serve/sleep/api_router.py``):

- ``POST /sleep?level=1|2`` answers 200 with an empty body once the engine sleeps. Level 1
  moves the weights to host RAM and drops the KV cache; level 2 drops both (after waking,
  answers fail until ``POST /collective_rpc {"method": "reload_weights"}``).
- ``POST /wake_up`` answers 200 with an empty body once the engine is awake.
- ``GET /is_sleeping`` answers ``{"is_sleeping": true|false}``.

What it simulates, with the pretend GPU (``--stub-ledger``) and a pretend host:

- **The residue.** A sleeping engine keeps ``--stub-sleep-residue-gib`` (default 1.25 GiB: the
  CUDA context and graph pools) in the GPU ledger.
- **Host RAM.** ``--stub-host-total-gib N --stub-host-ledger DIR`` is a pretend host shared by
  the stand-ins that name the same DIR: a level-1 sleep holds the weights
  (``--stub-weights-gib``, else 1.23 GiB) there until the wake. A level-1 sleep the host has no
  room for fails (500, the engine stays awake and keeps its GPU memory); level 2 needs none.
- **Wake times.** ``--stub-wake-s`` (level 1, default 0.05 s) and ``--stub-wake2-s`` (level 2,
  default 0.15 s): the wake answers after that long.
- **A wake without room** (vLLM does not check free memory before it wakes) fails as vLLM's
  CUDA out of memory: 500 with torch's message. The stand-in chose to **leak nothing**: the
  engine stays asleep at its level, the ledger keeps only its residue, and a later wake
  (after room is made) succeeds. Real vLLM may instead leak GPU memory on such a failure
  (vLLM #13941, #34600); vlmhub does not rely on either: a failed wake falls back to a stop
  and a cold start, and the stop frees whatever the engine held.
- **vLLM's sleep log line**, ``Sleep mode freed X GiB memory, Y GiB memory is still in use.``
  (with the pretend GPU): vlmhub reads it to learn the residue. ``VLMHUB_STUB_WAKE_FAILS=1``
  makes every wake of a sleeping engine answer 500; ``VLMHUB_STUB_WAKE_LEAK_GIB=X`` makes every
  wake succeed holding X GiB more than before the sleep (vLLM #13941: memory leaked on wake).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KNOBS: tuple[tuple[str, str, type], ...] = (  # flag, env var, type (stub_engine reads both)
    ("--stub-host-total-gib", "VLMHUB_STUB_HOST_TOTAL_GIB", float),
    ("--stub-host-ledger", "VLMHUB_STUB_HOST_LEDGER", str),
    ("--stub-wake-s", "VLMHUB_STUB_WAKE_S", float),
    ("--stub-wake2-s", "VLMHUB_STUB_WAKE2_S", float),
    ("--stub-sleep-residue-gib", "VLMHUB_STUB_SLEEP_RESIDUE_GIB", float),
)
ROUTES = {"GET": {"/is_sleeping"}, "POST": {"/sleep", "/wake_up"}}
"""Served with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode, as vLLM does."""
DEFAULT_RESIDUE_GIB = 1.25
DEFAULT_WEIGHTS_GIB = 1.23  # what the stand-in says "Model loading took" without a figure
DEFAULT_WAKE_S = {1: 0.05, 2: 0.15}
Reply = tuple[int, dict[str, Any] | None]  # status, JSON body (None: empty)
LogFn = Callable[..., None]
ErrorFn = Callable[[str, str, int], dict[str, Any]]  # vLLM's error body: message, type, code
ReadLedger = Callable[[Path], list[dict[str, Any]]]


@contextlib.contextmanager
def locked(directory: Path) -> Any:
    """The ledger dir's lock: a check-and-write is atomic across stand-ins."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_entry(path: Path, entry: dict[str, Any]) -> None:
    tmp = path.parent / f".{path.name}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)


class HostLedger:
    """This engine's share of the pretend host's RAM: ``DIR/<pid or id>-<port>.json`` with
    ``host_gib`` (the weights a level-1 sleep holds there). Read like the GPU ledger: an entry
    is live while its pid is (or, with an ``ident``, while its file exists)."""

    def __init__(self, directory: str, port: int, model: str, total: float,
                 read: ReadLedger) -> None:
        self.dir, self.total, self.read = Path(directory), total, read
        ident = os.environ.get("VLMHUB_STUB_LEDGER_ID") or None
        key = re.sub(r"[^A-Za-z0-9_.-]", "_", ident or str(os.getpid()))
        self.path = self.dir / f"{key}-{port}.json"
        self.entry: dict[str, Any] = {"pid": os.getpid(), "port": port, "model": model,
                                      "host_gib": 0.0, **({"ident": ident} if ident else {})}

    def hold(self, gib: float) -> str | None:
        """Hold ``gib`` of host RAM; the error line when the host has no room (nothing held)."""
        with locked(self.dir):
            others = [e for e in self.read(self.dir) if e["file"] != self.path.name]
            free = max(0.0, self.total - sum(float(e.get("host_gib", 0.0)) for e in others))
            if gib > free + 1e-9:
                return (f"RuntimeError: cannot offload {gib:.2f} GiB of weights to host memory: "
                        f"{free:.2f} of {self.total:.2f} GiB free")
            write_entry(self.path, {**self.entry, "host_gib": gib})
        return None

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class Sleeper:
    """One engine's sleep state and its effect on the GPU and host ledgers. Thread-safe (the
    request threads share it); a wake blocks its request thread for the wake time."""

    def __init__(self, args: Any, gpu: Any, read: ReadLedger, log: LogFn, error: ErrorFn
                 ) -> None:
        """``gpu``: the stand-in's GPU ledger entry (``claim``, ``residue``, ``total``, ``dir``,
        ``path``, ``write(sleeping=)``) or None (no pretend GPU)."""
        self.gpu, self.read, self.log, self.error = gpu, read, log, error
        self.level = 0  # 0 awake, else 1 or 2
        self.needs_reload = False  # woke from level 2, no collective_rpc reload_weights yet
        self.lock = threading.Lock()
        self.weights_gib = float(args.stub_weights_gib or DEFAULT_WEIGHTS_GIB)
        self.wake_s = {1: DEFAULT_WAKE_S[1] if args.stub_wake_s is None else args.stub_wake_s,
                       2: DEFAULT_WAKE_S[2] if args.stub_wake2_s is None else args.stub_wake2_s}
        if gpu is not None and args.stub_sleep_residue_gib is not None:
            gpu.residue = float(args.stub_sleep_residue_gib)
        self.host = None
        if args.stub_host_ledger and args.stub_host_total_gib:
            self.host = HostLedger(args.stub_host_ledger, args.port, args.model,
                                   float(args.stub_host_total_gib), read)

    def sleep(self, level: str) -> Reply:
        if level not in ("1", "2"):
            return 400, self.error(f"invalid sleep level {level}", "BadRequestError", 400)
        if os.environ.get("VLMHUB_STUB_SLEEP_FAILS"):  # fault injection: sleep fails
            self.log("Sleep failed: CUDA error: out of memory", "gpu_worker.py:117", "ERROR")
            return 500, self.error("CUDA error: out of memory", "InternalServerError", 500)
        began = time.monotonic()
        with self.lock:
            if not self.level:
                if level == "1" and self.host is not None and (
                        why := self.host.hold(self.weights_gib)):
                    self.log(why, "gpu_worker.py:117", "ERROR")
                    return 500, self.error(why, "InternalServerError", 500)
                if self.gpu is not None:
                    self.gpu.write(sleeping=True)
                    used = sum(float(e.get("claim_gib", 0.0)) for e in self.read(self.gpu.dir))
                    self.log(f"Sleep mode freed {self.gpu.claim - self.gpu.residue:.2f} GiB "
                             f"memory, {used:.2f} GiB memory is still in use.",
                             "gpu_worker.py:142")
                self.level = int(level)
        self.log(f"It took {time.monotonic() - began + 0.1:.2f} seconds to fall asleep "
                 f"(level {level}).", "gpu_worker.py:117")
        return 200, None

    def wake(self) -> Reply:
        began = time.monotonic()
        with self.lock:
            if self.level and os.environ.get("VLMHUB_STUB_WAKE_FAILS"):  # fault injection
                self.log("Wake up failed: CUDA error: out of memory", "gpu_worker.py:150",
                         "ERROR")
                return 500, self.error("CUDA error: out of memory", "InternalServerError", 500)
            if self.level:
                if self.gpu is not None and (oom := self._claim_gpu()):
                    self.log(oom, "gpu_worker.py:150", "ERROR")
                    return 500, self.error(oom, "InternalServerError", 500)
                time.sleep(self.wake_s[self.level])
                if self.host is not None:
                    self.host.release()
                self.needs_reload = self.needs_reload or self.level == 2
                self.level = 0
        self.log(f"It took {time.monotonic() - began:.2f} seconds to wake up.",
                 "gpu_worker.py:150")
        return 200, None

    def _claim_gpu(self) -> str | None:
        """Take the engine's awake memory back on the pretend GPU, or torch's OOM line (then
        nothing changes: the engine sleeps on, holding its residue)."""
        gpu = self.gpu
        with locked(gpu.dir):
            others = [e for e in self.read(gpu.dir) if e["file"] != gpu.path.name]
            free = max(0.0, gpu.total - sum(float(e.get("claim_gib", 0.0)) for e in others))
            if gpu.claim > free + 1e-9:
                return (f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
                        f"{gpu.claim - gpu.residue:.2f} GiB. GPU 0 has a total capacity of "
                        f"{gpu.total:.2f} GiB of which {max(free - gpu.residue, 0.0):.2f} GiB "
                        "is free.")
            if leak := float(os.environ.get("VLMHUB_STUB_WAKE_LEAK_GIB") or 0):
                gpu.claim += leak  # fault injection: the wake leaks (vLLM #13941, #34600)
            gpu.write(sleeping=False)
        return None

    def reloaded(self, method: object) -> None:
        """``POST /collective_rpc``: ``reload_weights`` makes a level-2 wake serve again."""
        self.needs_reload = self.needs_reload and method != "reload_weights"

    def close(self) -> None:
        if self.host is not None:
            self.host.release()

