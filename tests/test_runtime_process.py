"""ProcessRuntime with real processes: the stand-in engine, real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from vlmhub.engine_log import PHASES
from vlmhub.engines.base import EngineHandle, LaunchRequest, wait_ready
from vlmhub.engines.ports import free_port, port_is_free
from vlmhub.engines.process import ProcessRuntime
from vlmhub.errors import EngineStartError, EngineStartTimeout, PortInUse, RuntimeUnavailable
from vlmhub.testing.fixtures import stub_launch_request, stub_process_config, stub_spec

FAST = {"VLMHUB_STUB_STARTUP_DELAY": "0.3"}


def request(rt: ProcessRuntime, name: str, port: int | None = None, **spec_overrides: object
            ) -> LaunchRequest:
    spec_overrides.setdefault("env", FAST)
    spec = stub_spec(name, **spec_overrides)
    return stub_launch_request(rt, rt.rc, spec, port or free_port())


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_start_reports_phases_in_order_and_port_refuses_until_ready(
    process_runtime: ProcessRuntime,
) -> None:
    rt = process_runtime
    req = request(rt, "alpha", env={"VLMHUB_STUB_STARTUP_DELAY": "1.0"})
    handle = await rt.start(req)
    assert handle.runtime == "process" and handle.port == req.port
    assert handle.base_url == f"http://127.0.0.1:{req.port}"
    await asyncio.sleep(0.2)
    assert refused(req.port), "the engine must not accept connections while it loads"

    phases: list[str] = []
    await wait_ready(rt, handle, timeout_s=20, on_phase=lambda p, _line: phases.append(p))

    distinct = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert distinct[0] == "starting" and distinct[-1] == "ready"
    assert "loading_weights" in distinct and "profiling" in distinct
    assert [PHASES.index(p) for p in distinct] == sorted(PHASES.index(p) for p in distinct)
    async with httpx.AsyncClient() as client:
        models = (await client.get(f"{handle.base_url}/v1/models",  # the engine's own key
                                   headers={"Authorization": f"Bearer {handle.api_key}"})).json()
    assert [m["id"] for m in models["data"]] == ["alpha"]
    assert models["data"][0]["max_model_len"] == 2048
    assert (await rt.status(handle)).state == "running"


async def test_logs_follow_and_graceful_idempotent_stop(process_runtime: ProcessRuntime) -> None:
    rt = process_runtime
    req = request(rt, "beta")
    handle = await rt.start(req)
    await wait_ready(rt, handle, timeout_s=20)

    everything = await rt.logs(handle, tail=None)
    assert any("Application startup complete" in ln for ln in everything)
    assert await rt.logs(handle, tail=2) == everything[-2:]

    seen: list[str] = []

    async def collect() -> None:
        async for line in rt.follow(handle):
            seen.append(line)

    follower = asyncio.create_task(collect())
    await asyncio.sleep(0.3)
    assert any("vLLM API server version" in ln for ln in seen), "follow starts at the beginning"
    assert not follower.done(), "follow keeps going while the engine runs"

    await rt.stop(handle, timeout_s=10)
    await asyncio.wait_for(follower, timeout=5)  # follow ends once the engine has exited
    assert any("Shutting down" in ln for ln in seen), "SIGTERM lets the engine shut down"
    assert (await rt.status(handle)).state == "missing"
    assert not rt.state_path("beta").exists()
    assert port_is_free(req.port)
    await rt.stop(handle, timeout_s=1)  # idempotent
    assert await rt.adopt() == []
    assert any("Shutting down" in ln for ln in await rt.logs(handle)), "log kept after stop"


async def test_adopt_status_and_stop_from_another_vlmhub_process(
    process_runtime: ProcessRuntime, tmp_path: Path
) -> None:
    rt = process_runtime
    handle = await rt.start(request(rt, "gamma"))
    await wait_ready(rt, handle, timeout_s=20)

    # A NEW runtime instance in this process finds it.
    again = ProcessRuntime(rt.rc, state_dir=rt.state_dir)
    adopted = await again.adopt()
    assert [(h.name, h.ident, h.port, h.spec_hash) for h in adopted] == [
        (handle.name, handle.ident, handle.port, handle.spec_hash)
    ]

    # A restarted vlmhub (another OS process, not the engine's parent) adopts and stops it.
    script = textwrap.dedent(f"""
        import asyncio, json
        from pathlib import Path
        from vlmhub.config.schema import RuntimeConfig
        from vlmhub.engines.process import ProcessRuntime

        async def main():
            rt = ProcessRuntime(RuntimeConfig(kind="process"), Path({str(rt.state_dir)!r}))
            found = await rt.adopt()
            before = [(await rt.status(h)).state for h in found]
            for h in found:
                await rt.stop(h, timeout_s=10)
            after = [(await rt.status(h)).state for h in found]
            print(json.dumps({{"names": [h.name for h in found], "pids": [h.ident for h in found],
                              "before": before, "after": after}}))

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"names": ["gamma"], "pids": [handle.ident], "before": ["running"],
                      "after": ["missing"]}
    st = await rt.status(handle)  # we are the parent: we still read the exit code
    assert st.state == "exited" and st.exit_code == 0
    assert st.stopped, "an exit because a vlmhub process stopped it is not a crash"


@pytest.mark.parametrize(
    ("how", "code", "words"),
    [
        ("env", "free_memory", "free GPU memory"),
        ("argv", "max_model_len", "10240"),
    ],
)
async def test_startup_failure_raises_parsed_reason(
    process_runtime: ProcessRuntime, how: str, code: str, words: str
) -> None:
    rt = process_runtime
    if how == "env":
        req = request(rt, "delta", env={**FAST, "VLMHUB_STUB_FAIL_AT_STARTUP": "free-memory"})
    else:
        req = request(rt, "delta", options={
            "extra_args": ["--stub-fail-at-startup", "max-model-len"]})
    handle = await rt.start(req)
    with pytest.raises(EngineStartError) as info:
        await wait_ready(rt, handle, timeout_s=20)
    err = info.value
    assert not isinstance(err, EngineStartTimeout)
    assert err.code == code
    assert words in str(err) and "Fix:" in str(err)
    assert "exit code 1" in str(err)
    assert err.tail, "the error carries the log tail"
    assert (await rt.status(handle)).state == "exited"


async def test_startup_timeout(process_runtime: ProcessRuntime) -> None:
    rt = process_runtime
    handle = await rt.start(request(rt, "slow", env={"VLMHUB_STUB_STARTUP_DELAY": "30"}))
    t0 = time.monotonic()
    with pytest.raises(EngineStartTimeout) as info:
        await wait_ready(rt, handle, timeout_s=1.0)
    assert time.monotonic() - t0 < 5
    assert "did not become ready within 1 s" in str(info.value)
    assert "startup_timeout_s" in str(info.value) and "exited" not in str(info.value)
    assert info.value.code == "timeout"
    assert (await rt.status(handle)).state == "running"  # the caller decides to stop it
    await rt.stop(handle, timeout_s=5)
    assert (await rt.status(handle)).state == "missing"


async def test_port_in_use_is_refused_before_spawning(process_runtime: ProcessRuntime) -> None:
    rt = process_runtime
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"port {port} .*Fix:"):
            await rt.start(request(rt, "epsilon", port=port))
    assert await rt.adopt() == []
    assert not rt.state_path("epsilon").exists()


async def test_second_start_of_a_running_model_is_refused(process_runtime: ProcessRuntime) -> None:
    rt = process_runtime
    handle = await rt.start(request(rt, "zeta"))
    with pytest.raises(EngineStartError, match="already runs") as info:
        await rt.start(request(rt, "zeta"))
    assert info.value.code == "already_running"
    assert [h.ident for h in await rt.adopt()] == [handle.ident]


async def test_missing_program_is_runtime_unavailable(tmp_path: Path) -> None:
    rc = stub_process_config(tmp_path, process_argv=[str(tmp_path / "no-such-vllm"), "serve"])
    rt = ProcessRuntime(rc, state_dir=tmp_path / "state")
    with pytest.raises(RuntimeUnavailable, match=r"no-such-vllm.*Fix:"):
        await rt.start(request(rt, "eta"))


PROGRAM = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"])
print("token-length", len(os.environ.get("HF_TOKEN", "")))
print("worker", child.pid, flush=True)
time.sleep(120)
"""


async def test_stubborn_engine_is_killed_with_its_group_and_secrets_stay_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
    rc = stub_process_config(tmp_path, process_argv=[sys.executable, "-c", PROGRAM])
    rt = ProcessRuntime(rc, state_dir=tmp_path / "state")
    req = LaunchRequest(name="stubborn", spec_hash="h", image="none:1", port=free_port(),
                        argv=["--api-key", "sk-do-not-print"], pass_env=["HF_TOKEN"])
    handle = await rt.start(req)
    try:
        for _ in range(100):
            lines = await rt.logs(handle)
            if any(ln.startswith("worker") for ln in lines):
                break
            await asyncio.sleep(0.05)
        assert f"token-length {len('hf_test_secret')}" in lines, "HF_TOKEN is passed through"
        worker = int(next(ln for ln in lines if ln.startswith("worker")).split()[1])
        record = rt.state_path("stubborn").read_text()
        assert "sk-do-not-print" not in record and "hf_test_secret" not in record
        assert json.loads(record)["argv"][-2:] == ["--api-key", "***"]
        assert "hf_test_secret" not in repr(handle)

        t0 = time.monotonic()
        await rt.stop(handle, timeout_s=0.5)
        assert time.monotonic() - t0 < 4
        st = await rt.status(handle)
        assert st.state == "missing"
        assert not _pid_alive(worker), "the whole process group is killed"
    finally:
        await rt.stop(handle, timeout_s=0.1)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


async def test_reconcile_keeps_matching_and_stops_changed(process_runtime: ProcessRuntime) -> None:
    rt = process_runtime
    a = await rt.start(request(rt, "keep-me"))
    b = await rt.start(request(rt, "change-me"))
    c = await rt.start(request(rt, "not-configured"))
    await asyncio.gather(*(wait_ready(rt, h, timeout_s=20) for h in (a, b, c)))

    result = await rt.reconcile({"keep-me": a.spec_hash, "change-me": "another-hash"})

    assert [h.name for h in result.kept] == ["keep-me"]
    assert [h.name for h in result.stopped] == ["change-me"]
    assert [h.name for h in result.unknown] == ["not-configured"]
    states = {h.name: (await rt.status(h)).state for h in (a, b, c)}
    assert states == {"keep-me": "running", "change-me": "missing", "not-configured": "running"}


def test_status_of_an_engine_killed_behind_our_back(process_runtime: ProcessRuntime) -> None:
    async def scenario() -> tuple[str, int | None]:
        rt = process_runtime
        handle: EngineHandle = await rt.start(request(rt, "victim"))
        await wait_ready(rt, handle, timeout_s=20)
        os.kill(int(handle.ident), signal.SIGKILL)
        for _ in range(50):
            st = await rt.status(handle)
            if st.state != "running":
                assert not st.stopped, "killed behind vlmhub's back: a crash, not a stop"
                return st.state, st.exit_code
            await asyncio.sleep(0.05)
        return "running", None

    assert asyncio.run(scenario()) == ("exited", -signal.SIGKILL)


def freeze(pid: int) -> None:
    """SIGSTOP ``pid`` and return once /proc shows it stopped (delivery is asynchronous)."""
    os.kill(pid, signal.SIGSTOP)
    stat = Path(f"/proc/{pid}/stat")
    for _ in range(200):
        if stat.read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not stop")


async def test_stop_of_a_hung_engine_leaves_its_replacement_alone(
    process_runtime: ProcessRuntime,
) -> None:
    """Issue 14 item 1: the health check stops a frozen engine while the control loop starts
    its replacement; the stop must not delete the new engine's record (nor touch it)."""
    rt = process_runtime
    old = await rt.start(request(rt, "swapped"))
    await wait_ready(rt, old, timeout_s=20)
    freeze(int(old.ident))  # hung: answers nothing, ignores SIGTERM
    stopping = asyncio.create_task(rt.stop(old, timeout_s=3))
    new: EngineHandle | None = None
    deadline = time.monotonic() + 30
    while new is None and time.monotonic() < deadline:  # start it as soon as the runtime lets us
        try:
            new = await rt.start(request(rt, "swapped"))
        except EngineStartError:
            await asyncio.sleep(0.01)
    await stopping
    assert new is not None and new.ident != old.ident
    record = json.loads(rt.state_path("swapped").read_text())
    assert record["pid"] == int(new.ident), "the old engine's stop kept the new engine's record"
    await wait_ready(rt, new, timeout_s=20)
    assert (await rt.status(new)).state == "running"
    assert (await rt.status(old)).state == "missing"
    elsewhere = ProcessRuntime(rt.rc, state_dir=rt.state_dir)  # `vlmhub ps`, a restarted router
    assert [(h.name, h.ident) for h in await elsewhere.adopt()] == [("swapped", new.ident)]
    await rt.stop(old, timeout_s=1)  # stopping the old handle again is still harmless
    assert rt.state_path("swapped").exists() and _pid_alive(int(new.ident))


async def test_frozen_engine_is_killed_without_waiting_the_grace(
    process_runtime: ProcessRuntime,
) -> None:
    """Issue 14 item 2: a SIGSTOPped engine cannot act on SIGTERM, so waiting the grace only
    keeps its clients waiting: stop kills it at once."""
    rt = process_runtime
    handle = await rt.start(request(rt, "frozen"))
    await wait_ready(rt, handle, timeout_s=20)
    pid = int(handle.ident)
    freeze(pid)
    st = await rt.status(handle)
    assert st.state == "running" and "frozen" in st.detail
    t0 = time.monotonic()
    await rt.stop(handle, timeout_s=20)
    assert time.monotonic() - t0 < 10, "a frozen engine must not get the whole 20 s grace"
    assert not _pid_alive(pid)
    assert (await rt.status(handle)).state == "missing"
    assert not rt.state_path("frozen").exists()


async def test_engine_gets_a_minimal_environment_not_the_routers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14 item 10: the router's secrets (VLMHUB_API_KEYS, anything else) stay out of the
    engine; pass_env names, HF_TOKEN, what vLLM reads and the config's env get in."""
    monkeypatch.setenv("VLMHUB_API_KEYS", "sk-router-key")
    monkeypatch.setenv("PLANTED_SECRET", "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hf_engine_token")
    monkeypatch.setenv("MY_PASSED_VAR", "passed")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    rc = stub_process_config(tmp_path, pass_env=["HF_TOKEN", "MY_PASSED_VAR"],
                             env={"FROM_CONFIG": "yes"})
    rt = ProcessRuntime(rc, state_dir=tmp_path / "state")
    handle = await rt.start(request(rt, "env-check"))
    try:
        await wait_ready(rt, handle, timeout_s=20)  # it runs on the minimal environment
        raw = Path(f"/proc/{handle.ident}/environ").read_bytes()
        env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
        assert "VLMHUB_API_KEYS" not in env and "PLANTED_SECRET" not in env
        assert b"sk-router-key" not in raw and b"s3cret" not in raw
        assert env["HF_TOKEN"] == "hf_engine_token" and env["MY_PASSED_VAR"] == "passed"
        assert env["VLLM_LOGGING_LEVEL"] == "INFO" and env["CUDA_VISIBLE_DEVICES"] == "0"
        assert env["FROM_CONFIG"] == "yes" and env["VLMHUB_STUB_STARTUP_DELAY"] == "0.3"
        assert env["PATH"] == os.environ["PATH"] and env["HOME"] == os.environ["HOME"]
    finally:
        await rt.stop(handle, timeout_s=5)


_PROC_LISTINGS: list[int] | None = None
"""While a list: the threads that listed /proc (audit events), for the test below."""


def _audit_proc_listings(event: str, args: tuple[object, ...]) -> None:
    if _PROC_LISTINGS is not None and event in ("os.listdir", "os.scandir") and args:
        path = args[0]
        if isinstance(path, str | os.PathLike) and os.fspath(path).rstrip("/") == "/proc":
            _PROC_LISTINGS.append(threading.get_ident())


sys.addaudithook(_audit_proc_listings)  # audit hooks stay for the process; inert but here


async def test_a_stop_scans_proc_off_the_event_loop(process_runtime: ProcessRuntime) -> None:
    """Issue 21 item 10: finding a process group's members means reading every process of
    /proc (tens of ms with thousands of processes); a stop does it in a worker thread, never
    on the event loop that serves the router's requests. Python's audit events name the thread
    of every listing of /proc during the stop (no timing involved)."""
    global _PROC_LISTINGS
    rt = process_runtime
    handle = await rt.start(request(rt, "offloop"))
    await wait_ready(rt, handle, timeout_s=20)
    _PROC_LISTINGS = listings = []
    try:
        await rt.stop(handle, timeout_s=10)
    finally:
        _PROC_LISTINGS = None
    assert (await rt.status(handle)).state == "missing"
    assert threading.get_ident() not in listings, "the stop listed /proc on the event loop"
