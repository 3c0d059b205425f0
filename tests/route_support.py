"""`vlmhub route` as a real process for the end-to-end tiers (tests/test_vllm_e2e.py,
tests/test_vlm_route.py): started on a config file with its own state dir, waited for until
/health answers, stopped with SIGINT; its log and every engine's log are printed at the end
(pytest shows them for a failed test)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def wait_healthy(url: str, proc: subprocess.Popen[Any], log: Path | None = None) -> None:
    """Wait (up to about 60 s) until the router at ``url`` answers /health; fail with its
    output (``log``, else its stdout pipe) as soon as the process exits."""
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            out = log.read_text() if log is not None else (proc.stdout.read() if proc.stdout
                                                           else "")
            raise AssertionError(f"router exited with {proc.returncode}:\n{out}")
        time.sleep(0.1)
    raise AssertionError(f"{url} never became healthy")

@contextmanager
def route_process(config: Path, root: Path, port: int) -> Iterator[str]:
    """Run ``vlmhub route --config CONFIG`` (state dir ``ROOT/state``, log ``ROOT/route.log``)
    and yield its URL once /health answers. Blocks up to 30 s for the start, 60 s for the
    stop (then kills it)."""
    env = {**os.environ, "VLMHUB_STATE_DIR": str(root / "state"), "COLUMNS": "200"}
    log_path = root / "route.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmhub", "route", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log_path)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print(log_path.read_text()[-4000:])
        logs = root / "state" / "logs"
        for f in sorted(logs.glob("*.log")) if logs.exists() else []:
            print(f"--- {f.name}\n" + f.read_text()[-3000:])
