"""DockerRuntime against a real Docker engine and the stand-in engine image (tier 2).

Skipped when no Docker engine answers, except with CI=true (then the fixtures fail).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker.errors
import httpx
import pytest

from vlmhub.config.schema import RuntimeConfig
from vlmhub.engines.base import LaunchRequest, wait_ready
from vlmhub.engines.docker import DockerRuntime
from vlmhub.engines.owner import this_owner
from vlmhub.engines.ports import free_port
from vlmhub.errors import EngineStartError, ImageUnavailable, PortInUse, RuntimeUnavailable
from vlmhub.spec import ModelSpec
from vlmhub.testing.fixtures import stub_launch_request, stub_spec

FAST = {"VLMHUB_STUB_STARTUP_DELAY": "0.3"}
MISSING_IMAGE = "127.0.0.1:9/vlmhub/not-there:0.1"  # a registry that refuses at once


def spec(name: str, **overrides: Any) -> ModelSpec:
    overrides.setdefault("env", FAST)
    return stub_spec(name, **overrides)


def request(rt: DockerRuntime, name: str, port: int | None = None, **overrides: Any
            ) -> LaunchRequest:
    return stub_launch_request(rt, rt.rc, spec(name, **overrides), port or free_port())


def non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") else ip


@pytest.mark.docker
async def test_serve_ready_logs_follow_and_stop(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any
) -> None:
    rt = docker_runtime
    req = request(rt, "alpha")
    assert req.argv[req.argv.index("--host") + 1] == "0.0.0.0"
    assert req.argv[req.argv.index("--port") + 1] == "8000"
    handle = await rt.start(req)
    phases: list[str] = []
    await wait_ready(rt, handle, timeout_s=30, on_phase=lambda p, _l: phases.append(p))
    assert phases[0] == "starting" and phases[-1] == "ready"
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{req.port}/v1/models",
                             headers={"Authorization": f"Bearer {handle.api_key}"})
    assert [m["id"] for m in r.json()["data"]] == ["alpha"]
    lines = await rt.logs(handle, tail=None)
    assert any("Application startup complete" in ln for ln in lines)
    assert await rt.logs(handle, tail=3) == lines[-3:]

    seen: list[str] = []

    async def collect() -> None:
        async for line in rt.follow(handle):
            seen.append(line)

    follower = asyncio.create_task(collect())
    await asyncio.sleep(0.5)
    assert any("vLLM API server version" in ln for ln in seen)
    assert not follower.done()
    await rt.stop(handle, timeout_s=10)
    await asyncio.wait_for(follower, timeout=10)  # the stream ends with the container
    assert any("Shutting down" in ln for ln in seen), "docker stop sends SIGTERM first"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(handle.ident)
    assert (await rt.status(handle)).state == "missing"
    await rt.stop(handle)  # idempotent


@pytest.mark.docker
async def test_loopback_publish_labels_mounts_and_secrets(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "hf_docker_test_secret_value"
    monkeypatch.setenv("HF_TOKEN", secret)
    rt = docker_runtime
    s = spec("beta")
    req = stub_launch_request(rt, rt.rc, s, free_port())
    assert "HF_TOKEN" in req.pass_env and secret not in repr(req)
    handle = await rt.start(req)
    await wait_ready(rt, handle, timeout_s=30)

    attrs = docker_client.containers.get(handle.ident).attrs
    bindings = attrs["NetworkSettings"]["Ports"]["8000/tcp"]
    assert {(b["HostIp"], b["HostPort"]) for b in bindings} == {("127.0.0.1", str(req.port))}
    ip = non_loopback_ip()
    if ip is not None:
        with pytest.raises(OSError):
            socket.create_connection((ip, req.port), timeout=1.0).close()

    labels = attrs["Config"]["Labels"]
    assert labels["vlmhub.managed"] == "1"
    assert labels["vlmhub.model"] == "beta"
    assert labels["vlmhub.spec-hash"] == s.spec_hash() == handle.spec_hash
    assert labels["vlmhub.port"] == str(req.port)
    assert labels["vlmhub.health-path"] == "/health"
    assert attrs["Name"] == f"/{rt.rc.name_prefix}-beta"

    assert f"HF_TOKEN={secret}" in attrs["Config"]["Env"], "HF_TOKEN reaches the engine"
    assert secret not in repr(labels) and secret not in repr(handle)
    assert secret not in repr(attrs["Config"]["Cmd"]) and secret not in repr(req.argv)

    mounts = {m["Destination"]: m["Source"] for m in attrs["Mounts"]}
    assert mounts["/root/.cache/huggingface"] == str(Path(rt.rc.hf_cache).resolve())
    assert mounts["/root/.cache/vllm"] == str(Path(rt.rc.vllm_cache).resolve())
    assert attrs["HostConfig"]["IpcMode"] == "host"
    assert not attrs["HostConfig"].get("DeviceRequests"), "gpus: null asks for no GPU"


@pytest.mark.docker
async def test_adoption_after_restart_and_reconcile(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any
) -> None:
    rt = docker_runtime
    keep = await rt.start(request(rt, "keep"))
    change = await rt.start(request(rt, "change"))
    await asyncio.gather(wait_ready(rt, keep, timeout_s=30), wait_ready(rt, change, timeout_s=30))

    restarted = DockerRuntime(rt.rc)  # a new vlmhub: its own connection, same config
    try:
        adopted = {h.name: h for h in await restarted.adopt()}
        assert set(adopted) == {"keep", "change"}
        for original in (keep, change):
            h = adopted[original.name]
            assert (h.ident, h.port, h.spec_hash, h.health_path, h.base_url) == (
                original.ident, original.port, original.spec_hash, original.health_path,
                original.base_url)
            assert abs(h.started_at - original.started_at) < 5
        other = DockerRuntime(rt.rc.model_copy(update={"name_prefix": "someone-else"}),
                              client=docker_client)
        assert await other.adopt() == [], "engines of another prefix are not adopted"

        result = await restarted.reconcile({"keep": keep.spec_hash, "change": "new-hash"})
    finally:
        await restarted.close()
    assert [h.name for h in result.kept] == ["keep"]
    assert [h.name for h in result.stopped] == ["change"]
    assert result.unknown == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(change.ident)
    assert (await rt.status(keep)).state == "running"


@pytest.mark.docker
async def test_container_dying_at_startup_gives_parsed_reason(
    docker_runtime: DockerRuntime, stub_image: str
) -> None:
    rt = docker_runtime
    req = request(rt, "broken", env={**FAST, "VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"})
    handle = await rt.start(req)
    with pytest.raises(EngineStartError) as info:
        await wait_ready(rt, handle, timeout_s=30)
    assert info.value.code == "no_cache_blocks"
    assert "No memory was left for the KV cache" in str(info.value)
    assert "Fix:" in str(info.value) and "exit code 1" in str(info.value)
    st = await rt.status(handle)
    assert (st.state, st.exit_code) == ("exited", 1)
    # A later start of the same model replaces the dead container.
    handle2 = await rt.start(request(rt, "broken"))
    assert handle2.ident != handle.ident
    await wait_ready(rt, handle2, timeout_s=30)
    # Stopping the old handle goes by container id: the new container of the model stays.
    await rt.stop(handle)
    assert (await rt.status(handle2)).state == "running"


@pytest.mark.docker
async def test_busy_host_port_is_port_in_use(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any
) -> None:
    rt = docker_runtime
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"port {port} .*Fix:"):
            await rt.start(request(rt, "gamma", port=port))
    left = docker_client.containers.list(all=True, filters={"name": f"{rt.rc.name_prefix}-"})
    assert left == [], "the container that could not start is removed"


@pytest.mark.docker
async def test_gpu_request_without_nvidia_runtime(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any
) -> None:
    if "nvidia" in (docker_client.info().get("Runtimes") or {}):
        pytest.skip("this Docker engine has the NVIDIA runtime")
    rt = DockerRuntime(docker_runtime.rc.model_copy(update={"gpus": "all"}),
                       client=docker_client)
    with pytest.raises(RuntimeUnavailable, match=r"nvidia-container-toolkit.*gpus: null"):
        await rt.start(request(rt, "delta"))
    left = docker_client.containers.list(all=True, filters={"name": f"{rt.rc.name_prefix}-"})
    assert left == []


@pytest.mark.docker
async def test_missing_image_that_cannot_be_pulled(
    docker_runtime: DockerRuntime, stub_image: str
) -> None:
    rt = docker_runtime
    await rt.ensure_image(stub_image)  # present: returns without pulling
    with pytest.raises(ImageUnavailable) as info:
        await rt.ensure_image(MISSING_IMAGE, progress=lambda *a: None)
    text = str(info.value)
    assert "pull failed" in text and "127.0.0.1:9" in text
    assert f"docker pull {MISSING_IMAGE}" in text and "scripts/build-stub-image.sh" in text
    req = request(rt, "epsilon", image=MISSING_IMAGE)
    with pytest.raises(ImageUnavailable, match="not present locally"):
        await rt.start(req)


@pytest.mark.docker
async def test_frozen_container_is_killed_without_waiting_the_grace(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any
) -> None:
    """Issue 14 item 2: an engine frozen by SIGSTOP inside its container is killed at once."""
    rt = docker_runtime
    handle = await rt.start(request(rt, "frozen"))
    await wait_ready(rt, handle, timeout_s=30)
    container = docker_client.containers.get(handle.ident)
    container.kill(signal="SIGSTOP")
    for _ in range(100):
        rows = container.top(ps_args="-o pid,stat")["Processes"]
        if all(row[1].startswith("T") for row in rows):
            break
        time.sleep(0.05)
    t0 = time.monotonic()
    await rt.stop(handle, timeout_s=20)
    assert time.monotonic() - t0 < 10, "a frozen engine must not get the whole 20 s grace"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(handle.ident)
    st = await rt.status(handle)
    assert st.state == "missing" and st.stopped


OWNER = """
import asyncio, json, sys
from vlmhub.config.schema import RuntimeConfig
from vlmhub.engines.docker import DockerRuntime
from vlmhub.engines.ports import free_port
from vlmhub.testing.fixtures import stub_launch_request, stub_spec

async def main():
    rt = DockerRuntime(RuntimeConfig.model_validate_json(sys.argv[1]))
    spec = stub_spec("owned", env={"VLMHUB_STUB_STARTUP_DELAY": "0.3"})
    handle = await rt.start(stub_launch_request(rt, rt.rc, spec, free_port()))
    print(json.dumps({"ident": handle.ident, "hash": handle.spec_hash}), flush=True)
    sys.stdin.read()  # stay alive (the container's owner) until the test closes stdin

asyncio.run(main())
"""


@pytest.mark.docker
async def test_reconcile_leaves_containers_of_a_live_owner_alone(
    docker_runtime: DockerRuntime, stub_image: str, docker_client: Any
) -> None:
    """Issue 14 item 3: a router adopts (or stops) only containers whose owner is gone."""
    rt = docker_runtime
    owner = subprocess.Popen([sys.executable, "-c", OWNER, rt.rc.model_dump_json()],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        started = json.loads(owner.stdout.readline())
        labels = docker_client.containers.get(started["ident"]).labels
        assert labels["vlmhub.owner"] != this_owner()
        changed = await rt.reconcile({"owned": "another-hash"})
        assert [h.ident for h in changed.others] == [started["ident"]]
        assert changed.stopped == changed.kept == []
        assert docker_client.containers.get(started["ident"]).status == "running"
    finally:
        owner.kill()
        owner.wait(10)
    adopted = await rt.reconcile({"owned": started["hash"]})  # its owner is gone now
    assert [h.ident for h in adopted.kept] == [started["ident"]] and adopted.others == []


def test_unreachable_engine_names_docker_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = f"unix://{tmp_path}/no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", sock)
    with pytest.raises(RuntimeUnavailable) as info:
        DockerRuntime(RuntimeConfig(kind="docker"))
    text = str(info.value)
    assert f"DOCKER_HOST={sock}" in text
    assert "sudo systemctl start docker" in text and "dockerd" in text
    with pytest.raises(RuntimeUnavailable, match=f"runtime.docker_host={sock}"):
        DockerRuntime(RuntimeConfig(kind="docker", docker_host=sock))


def test_pull_progress_reports_download_bytes_per_layer() -> None:
    from vlmhub.engines.docker import _PullReporter

    calls: list[tuple[str, int | None, int | None]] = []
    report = _PullReporter(lambda *call: calls.append(call))
    events: list[dict[str, Any]] = [
        {"status": "Pulling fs layer", "id": "a"},
        {"status": "Already exists", "id": "b"},
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 10, "total": 100}},
        {"status": "Downloading", "id": "a", "progressDetail": {"current": 60, "total": 100}},
        {"status": "Download complete", "id": "a", "progressDetail": {}},
        {"status": "Extracting", "id": "a", "progressDetail": {"current": 5, "total": 100}},
        {"status": "Pull complete", "id": "a", "progressDetail": {}},
    ]
    for event in events:
        report(event)
    assert calls == [("a", None, None), ("b", None, None), ("a", 10, 100), ("a", 60, 100),
                     ("a", 100, 100), ("a", 100, 100)]
