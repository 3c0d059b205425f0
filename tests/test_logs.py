"""Operator logs (issue 17 item 1): `vlmhub route --log-format json` prints one line per engine
event (start, phases, ready with load time and budget, evict with the reason) and never a
secret, even one planted in the environment and in a request."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from route_support import wait_healthy
from test_state_owner import DEMO, REPO

from vlmhub.engines.ports import free_port
from vlmhub.logs import Redactor

KEY = "sk-planted-router-key-5f3a"
TOKEN = "hf_PlantedTokenValue0123456789"


def test_redactor_masks_keys_and_token_shapes_in_message_and_fields() -> None:
    rec = logging.LogRecord("vlmhub.x", logging.INFO, __file__, 1, "key %s and %s", (KEY, TOKEN),
                            None)
    rec.header = f"Bearer {KEY}"
    Redactor([KEY]).filter(rec)
    assert KEY not in rec.getMessage() and TOKEN not in rec.getMessage()
    assert rec.getMessage() == "key *** and ***" and rec.header == "Bearer ***"


LOG_FLOOD = """
import sys, time
from vlmhub.logs import ACCESS, configure
configure(fmt="json", secrets=[sys.argv[1]])
for i in range(20000):  # about 5 MB: far more than a pipe holds
    ACCESS.info("request %d key %s " + "x" * 200, i, sys.argv[1])
print("logged", flush=True)
"""


def flood(script: str) -> str:
    """Run ``script`` (which logs a flood, then prints "logged") with a stderr nobody reads
    until it has printed; then read that stderr whole and return it."""
    proc = subprocess.Popen([sys.executable, "-c", script, KEY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        # stderr unread all this time: with blocking logging the child never gets this far
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "logging blocked on a stderr nobody reads"
        assert proc.stdout.readline() == "logged\n"
        err = proc.stderr.read()  # now read it: what waited is written, then the child exits
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
    return err


def test_a_stderr_nobody_reads_never_blocks_the_caller() -> None:
    """The router's stderr as a pipe nobody reads (the defect: access lines filled the pipe and
    the event loop blocked in a write, so the router stalled). Logging returns at once; what
    could not be queued is counted, and the count is written once stderr is read again."""
    err = flood(LOG_FLOOD)
    lines = [json.loads(line) for line in err.splitlines()]
    dropped = [ln for ln in lines if "dropped" in ln]
    assert dropped and dropped[0]["level"] == "warning" and dropped[0]["dropped"] > 0
    written = len(lines) - len(dropped)
    assert written + sum(d["dropped"] for d in dropped) == 20000  # none lost silently
    assert KEY not in err


LOOP_FLOOD = """
import asyncio, re, sys, time
from vlmhub.logs import access, configure
configure(secrets=[sys.argv[1]])
async def main():
    for i in range(20000):  # access lines as the router's middleware hands them over
        access((time.time(), f"req{i}", "POST", f"/v1/x/{sys.argv[1]}", "m", None, 200, 1.0,
                "m@1", 2.0, 3.0, 10))
        if i % 500 == 0:
            await asyncio.sleep(0.03)  # the loop's flush runs meanwhile
asyncio.run(main())
print("logged", flush=True)
"""


def test_access_lines_on_the_event_loop_never_block_it() -> None:
    """Issue 21 item 15: the event loop renders and writes its own access lines (no writer
    thread holding the GIL), yet a stderr nobody reads never blocks it; what could not wait is
    counted, and every line is either written or counted once stderr is read."""
    err = flood(LOOP_FLOOD)
    lines = err.splitlines()
    written = [ln for ln in lines if " INFO vlmhub.access: req" in ln]
    dropped = [int(ln.split(" WARNING vlmhub.router: ")[1].split()[0]) for ln in lines
               if "log line(s) dropped" in ln]
    assert dropped and len(written) + sum(dropped) == 20000  # none lost silently
    assert len(written) == len({ln.split()[4] for ln in written})  # none written twice
    assert KEY not in err and "/v1/x/*** " in written[0]


def test_route_logs_engine_events_as_json_and_never_a_secret(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "VLMHUB_API_KEYS": KEY,
           "HF_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmhub", "route", "--config", str(DEMO), "--port", str(port),
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        auth = {"Authorization": f"Bearer {KEY}"}
        for model in ("demo-ocr", "demo-vl", "demo-phi"):  # two fit: the third evicts one
            body = {"model": model, "messages": [{"role": "user", "content": f"{TOKEN} hi"}]}
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
            assert r.status_code == 200, r.text
        bad = httpx.post(url + "/v1/chat/completions", json={"model": "demo-ocr"},
                         headers={"Authorization": f"Bearer {KEY}x"}, timeout=30)
        assert bad.status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert KEY not in out + err and TOKEN not in out + err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    engine = [e for e in events if e["logger"] == "vlmhub.engine"]
    kinds = {(e.get("model"), e.get("event")) for e in engine}
    for model in ("demo-ocr", "demo-vl", "demo-phi"):
        assert (model, "start") in kinds and (model, "ready") in kinds, kinds
    ready = next(e for e in engine if e.get("event") == "ready")
    assert ready["load_s"] > 0 and ready["port"] and ready["budget_gib"] > 0
    evict = [e for e in engine if e.get("event") == "evict"]
    assert evict and any("room for demo-phi" in e["reason"] for e in evict), evict


def test_status_load_and_unload_from_the_shell(tmp_path: Path) -> None:
    """Issue 17 item 6: `vlmhub status [--json]` and `vlmhub load|unload NAME` through the
    admin API of a running router; a router that is not there is a clear error."""
    port = free_port()
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmhub", "route", "--config", str(DEMO), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vlmhub", *args, "--router", url,
                               "--config", str(DEMO)],
                              capture_output=True, text=True, env={**env, "COLUMNS": "80"},
                              timeout=120)

    try:
        wait_healthy(url, proc)
        loaded = cli("load", "demo-vl", "--json")
        assert loaded.returncode == 0, loaded.stderr
        assert json.loads(loaded.stdout)["state"] == "ready"
        shown = cli("status", "--json")
        states = {m["name"]: m["state"] for m in json.loads(shown.stdout)}
        assert states["demo-vl"] == "ready" and states["demo-ocr"] == "stopped"
        table = cli("status")
        assert table.returncode == 0 and "demo-vl" in table.stdout and "ready" in table.stdout
        assert cli("unload", "demo-vl").returncode == 0
        states = {m["name"]: m["state"] for m in json.loads(cli("status", "--json").stdout)}
        assert states["demo-vl"] == "stopped"
        missing = cli("load", "nope")
        assert missing.returncode == 2 and "404" in missing.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    gone = subprocess.run([sys.executable, "-m", "vlmhub", "status", "--router", url],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode == 2 and "cannot reach the router" in gone.stderr
