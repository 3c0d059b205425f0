"""One router per state dir, and engines of a live owner are never adopted (issue 14 item 3):
real `vlmhub route` processes over the demo, real stand-in engines, real owner processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from route_support import wait_healthy
from supervisor_support import build, model

from vlmhub.control.supervisor import Supervisor
from vlmhub.engines.base import EngineHandle
from vlmhub.engines.launch import launch_request
from vlmhub.engines.owner import StateDirBusy, lock_state_dir, this_owner
from vlmhub.engines.ports import free_port
from vlmhub.engines.process import ProcessRuntime
from vlmhub.testing.fixtures import stub_launch_request, stub_spec

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "demo.yaml"


def test_state_dir_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = lock_state_dir(state, port=8080, url="http://127.0.0.1:8080")
    try:
        with pytest.raises(StateDirBusy) as info:
            lock_state_dir(state, port=8090)
        text = str(info.value)
        assert f"pid {os.getpid()}, port 8080" in text and str(state) in text
        assert "--state-dir" in text and "VLMHUB_STATE_DIR" in text and "Fix:" in text
        assert info.value.holder["url"] == "http://127.0.0.1:8080"
    finally:
        first.release()
    second = lock_state_dir(state, port=8090)  # released: the next router takes it
    second.release()


OWNER = """
import asyncio, json, sys
from pathlib import Path
from vlmhub.engines.process import ProcessRuntime
from vlmhub.testing.fixtures import stub_launch_request, stub_process_config, stub_spec

async def main():
    tmp = Path(sys.argv[1])
    rt = ProcessRuntime(stub_process_config(tmp), state_dir=tmp / "state")
    spec = stub_spec("owned", env={"VLMHUB_STUB_STARTUP_DELAY": "0.2"})
    handle = await rt.start(stub_launch_request(rt, rt.rc, spec, int(sys.argv[2])))
    print(json.dumps({"ident": handle.ident, "hash": handle.spec_hash}), flush=True)
    sys.stdin.read()  # stay alive (the engine's owner) until the test closes stdin

asyncio.run(main())
"""


@pytest.fixture
def owner_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """Another live vlmhub process that started engine ``owned`` in ``tmp_path/state``."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), str(free_port())],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    started = json.loads(proc.stdout.readline())
    try:
        yield proc, started
    finally:
        proc.kill()
        proc.wait(10)
        with contextlib.suppress(ProcessLookupError):  # the engine, if the test did not stop it
            os.killpg(int(started["ident"]), signal.SIGKILL)


async def test_engines_of_a_live_owner_are_neither_adopted_nor_stopped(
    process_runtime: ProcessRuntime, owner_process: tuple[subprocess.Popen[str], dict[str, str]]
) -> None:
    proc, started = owner_process
    rt = process_runtime  # same state dir as the owner's
    [handle] = await rt.adopt()  # `vlmhub ps` sees it...
    assert handle.ident == started["ident"] and handle.owner != this_owner()

    changed = await rt.reconcile({"owned": "another-hash"})  # ...a router leaves it alone
    assert [h.ident for h in changed.others] == [started["ident"]]
    assert changed.kept == changed.stopped == changed.unknown == []
    assert (await rt.status(handle)).state == "running"
    same = await rt.reconcile({"owned": started["hash"]})
    assert same.kept == [] and [h.ident for h in same.others] == [started["ident"]]

    proc.kill()  # the owner dies; its engine runs on (own session) and is an orphan now
    proc.wait(10)
    adopted = await rt.reconcile({"owned": started["hash"]})
    assert [h.ident for h in adopted.kept] == [started["ident"]] and adopted.others == []
    record = json.loads(rt.state_path("owned").read_text())
    assert record["owner"] == this_owner(), "the adopter becomes the owner"
    await rt.stop(handle, timeout_s=5)


def route(port: int, state: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "VLMHUB_STATE_DIR": str(state), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "vlmhub", "route", "--config", str(DEMO), "--port", str(port),
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def ask(url: str, model: str) -> str:
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60)
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return r.choices[0].message.content or ""


def stop_router(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    return proc.stdout.read() if proc.stdout else ""


def test_second_router_on_a_state_dir_refuses_and_the_first_keeps_serving(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    port1, port2, port3 = free_port(), free_port(), free_port()
    first = route(port1, state)
    url1 = f"http://127.0.0.1:{port1}"
    others: list[subprocess.Popen[str]] = []
    try:
        wait_healthy(url1, first)
        assert ask(url1, "demo-ocr").startswith("demo-ocr:")
        record = json.loads((state / "process" / "demo-ocr.json").read_text())

        second = route(port2, state)
        others.append(second)
        code = second.wait(60)
        out = stop_router(second)
        assert code != 0, out
        assert f"another vlmhub router (pid {first.pid}, port {port1})" in out, out
        assert "--state-dir" in out and "Traceback" not in out, out

        # The first router's engine was neither adopted nor stopped: it serves on.
        assert ask(url1, "demo-ocr").startswith("demo-ocr:")
        assert json.loads((state / "process" / "demo-ocr.json").read_text()) == record
        models = {m["id"]: m for m in httpx.get(url1 + "/v1/models").json()["data"]}
        assert models["demo-ocr"]["state"] == "ready"

        # Side by side: a router with its own state dir starts and serves.
        third = route(port3, state, "--state-dir", str(tmp_path / "side"))  # the option wins
        others.append(third)
        url3 = f"http://127.0.0.1:{port3}"
        wait_healthy(url3, third)
        assert ask(url3, "demo-phi").startswith("demo-phi:")
        assert (tmp_path / "side" / "process" / "demo-phi.json").exists()
        assert not (state / "process" / "demo-phi.json").exists()
        assert ask(url1, "demo-ocr").startswith("demo-ocr:")
    finally:
        for proc in others:
            stop_router(proc)
        out1 = stop_router(first)
    assert first.returncode == 0, out1
    assert list((state / "process").glob("*.json")) == []  # the first stopped its own engines
    lock = json.loads((state / "router.lock").read_text() or "{}")
    assert lock == {}, "the lock file is emptied when its router leaves"


async def test_engines_record_the_vlmhub_process_that_started_them(
    process_runtime: ProcessRuntime,
) -> None:
    rt = process_runtime
    spec = stub_spec("stamped", env={"VLMHUB_STUB_STARTUP_DELAY": "0.2"})
    handle = await rt.start(stub_launch_request(rt, rt.rc, spec, free_port()))
    try:
        assert handle.owner == this_owner()
        assert json.loads(rt.state_path("stamped").read_text())["owner"] == this_owner()
        host, pid, _start = this_owner().rsplit(":", 2)
        assert pid == str(os.getpid()) and host
    finally:
        await rt.stop(handle, timeout_s=5)


async def start_like_a_gone_router(sup: Supervisor, name: str) -> EngineHandle:
    """Start ``name``'s engine as a router would and leave it to load, as if that router had
    died right after: its owner stamp is this process, which adoption treats as its own."""
    r = sup.replicas[name]
    req = launch_request(r.model, sup.gpu, sup.runtime, sup.config.runtime, free_port(),
                         sleep_mode=r.sleep_ok)
    return await sup.runtime.start(req)


async def test_a_router_restarted_during_a_load_adopts_the_loading_engine(
    tmp_path: Path,
) -> None:
    """Issue 21 item 7: the engine is still loading when the new router starts. It is adopted
    as ``starting`` (its memory counts from the first moment: b, which does not fit beside it,
    waits), its phase is shown, and its first request is served by that engine, not a new one."""
    sup, rec, _ = build(tmp_path, {"a": model(4.75), "b": model(4.75)}, delay=3.0)
    handle = await start_like_a_gone_router(sup, "a")
    await sup.start()
    try:
        info = {i.name: i for i in sup.snapshot()}
        assert info["a"].state == "starting" and info["a"].port == handle.port
        assert info["a"].phase
        b_wants = asyncio.create_task(sup.acquire("b"))
        lease = await sup.acquire("a")
        assert lease.base_url == handle.base_url and rec.loads == []
        assert not b_wants.done()  # a's engine holds the GPU: b waits, never beside it
        assert json.loads(sup.runtime.state_path("a").read_text())["owner"] == this_owner()
        sup.release(lease)
        sup.release(await b_wants)  # then a is evicted and b starts, within the GPU's memory
        assert rec.loads == [("b", True)]
        assert [h.name for h in await sup.runtime.adopt()] == ["b"]
    finally:
        await sup.shutdown()


async def test_an_adopted_engine_that_does_not_finish_loading_in_time_is_stopped(
    tmp_path: Path,
) -> None:
    """Issue 21 item 7: an adopted engine still loading gets what is left of its
    startup_timeout_s (counted from its own start); then it is failed and stopped, never left
    running untracked (which a new start would then hit as "already running")."""
    sup, _, _ = build(tmp_path, {"a": model(1.0, spec={"startup_timeout_s": 3})}, delay=120.0)
    handle = await start_like_a_gone_router(sup, "a")
    await sup.start()
    try:
        assert {i.name: i.state for i in sup.snapshot()} == {"a": "starting"}
        for _ in range(600):  # failed, and its engine stopped (the replica forgets its port)
            if sup.snapshot()[0].state != "starting" and sup.snapshot()[0].port is None:
                break
            await asyncio.sleep(0.05)
        info = sup.snapshot()[0]
        assert info.state == "failed" and info.port is None, info
        assert "did not become ready within 3 s" in (info.last_error or "")
        assert (await sup.runtime.status(handle)).state != "running"
        assert await sup.runtime.adopt() == []
    finally:
        await sup.shutdown()
