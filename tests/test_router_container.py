"""The router in a container (issue 27 item 3), against a real Docker engine (tier 2).

The router image is built from this checkout by scripts/build-router-image.sh (cached by a
hash of its inputs). No registry is reachable in CI, so its base is the locally made
``vlmhub/debian-python:bookworm`` (scripts/build-stub-image.sh) unless VLMHUB_ROUTER_BASE
names another. The router runs as examples/compose.yaml's service says: the test reads the
file and turns each of its keys into the Docker SDK's arguments (an unknown key fails the
test, so the file and this test cannot drift apart), with three local substitutions: the
image tag, the host side of the Docker socket (this engine's socket) and the models.yaml.

Skipped without a Docker engine, except with CI=true (then it fails); a failed image build
fails the test everywhere.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from test_runtime_docker import non_loopback_ip

from vlmhub.engines.base import wait_ready
from vlmhub.engines.docker import HF_MOUNT, LABEL_PREFIX, DockerRuntime
from vlmhub.engines.ports import free_port
from vlmhub.testing.fixtures import stub_launch_request, stub_spec

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "examples" / "compose.yaml"
BUILD = REPO / "scripts" / "build-router-image.sh"
ROUTER_IMAGE = os.environ.get("VLMHUB_ROUTER_IMAGE", "vlmhub/router:dev")
ROUTER_BASE = os.environ.get("VLMHUB_ROUTER_BASE", "vlmhub/debian-python:bookworm")
SOCKET_IN_COMPOSE = "/var/run/docker.sock"
_VAR = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


@pytest.fixture(scope="module")
def router_image(stub_image: str) -> str:
    """The router image, built (or found up to date) by scripts/build-router-image.sh."""
    env = {**os.environ, "VLMHUB_ROUTER_IMAGE": ROUTER_IMAGE, "VLMHUB_ROUTER_BASE": ROUTER_BASE}
    done = subprocess.run(["bash", str(BUILD)], env=env, capture_output=True, text=True,
                          timeout=1200, check=False)
    if done.returncode != 0:
        pytest.fail(f"{BUILD.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}",
                    pytrace=False)
    assert done.stdout.split()[-1] == ROUTER_IMAGE
    return ROUTER_IMAGE


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        assert op != "?", f"compose.yaml needs {name}: {arg}"
        return arg if op == "-" else ""
    return _VAR.sub(one, text)


def grace_s(text: str) -> float:
    m = re.fullmatch(r"(\d+)(s|m)", text)
    assert m, text
    return int(m.group(1)) * (60 if m.group(2) == "m" else 1)


def compose_run_kwargs(service: dict[str, Any], env: dict[str, str], socket_path: str,
                       models_yaml: Path, state_volume: str) -> dict[str, Any]:
    """``service`` of compose.yaml as ``containers.run`` arguments (each key compose takes)."""
    kwargs: dict[str, Any] = {"detach": True}
    for key, value in service.items():
        if key == "image":
            assert value == "vlmhub/router:dev"  # what build-router-image.sh tags
            kwargs["image"] = ROUTER_IMAGE
        elif key in ("command", "network_mode", "init", "read_only"):
            kwargs[key] = value
        elif key == "group_add":
            kwargs[key] = [interpolate(str(g), env) for g in value]
        elif key == "stop_grace_period":
            kwargs["stop_grace_s"] = grace_s(value)
        elif key == "tmpfs":
            kwargs[key] = {path: "" for path in value}
        elif key == "restart":
            kwargs["restart_policy"] = {"Name": value}
        elif key == "environment":
            kwargs[key] = {}
            for item in value:  # KEY=VALUE, or KEY alone: passed on when set
                k, eq, v = str(item).partition("=")
                if eq or env.get(k):
                    kwargs[key][k] = interpolate(v, env) if eq else env[k]
        elif key == "volumes":
            kwargs[key] = {}
            for item in value:
                src, dst, *mode = interpolate(item, env).split(":")
                if src == SOCKET_IN_COMPOSE:
                    src = socket_path  # this engine's socket on the host
                elif src == "./models.yaml":
                    src = str(models_yaml)
                elif not src.startswith("/"):
                    src = state_volume  # the named volume: one per test
                kwargs[key][src] = {"bind": dst, "mode": mode[0] if mode else "rw"}
        else:
            pytest.fail(f"compose.yaml: the test does not know the key {key!r}; add it here")
    return kwargs


def write_models_yaml(path: Path, prefix: str, port: int, hf_cache: Path,
                      vllm_cache: Path) -> None:
    base = free_port()
    config = {
        "gpu": {"total_gib": 8, "reserve_gib": 0, "force_total": True},
        "router": {"port": port, "health_interval_s": 0.5, "shutdown_timeout_s": 10},
        "runtime": {"kind": "docker", "gpus": None, "name_prefix": prefix,
                    "port_range": [base, base + 20], "hf_cache": str(hf_cache),
                    "vllm_cache": str(vllm_cache),
                    "env": {"VLMHUB_STUB_STARTUP_DELAY": "0.3"}},
        "models": {"alpha": {"spec": {
            "hf_repo": "stub/alpha", "image": "vlmhub/stub-engine:dev",
            "startup_timeout_s": 60, "reload_cost_s": 1,
            "options": {"max_model_len": 1024, "enforce_eager": True},
            "vram": {"weights_gib": 1, "kv_bytes_per_token": 1024, "activation_gib": 0,
                     "non_torch_gib": 0, "cuda_context_gib": 0}}}},
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)  # the router's user (uid 10001) reads it through the bind mount


def wait_health(container: Any, port: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        container.reload()
        if container.status != "running":
            pytest.fail("the router container ended:\n"
                        + container.logs().decode(errors="replace")[-3000:], pytrace=False)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    pytest.fail("the router did not answer /health:\n"
                + container.logs().decode(errors="replace")[-3000:], pytrace=False)


def engines(client: Any, prefix: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"{LABEL_PREFIX}={prefix}"}))


@pytest.mark.docker
def test_router_container_starts_an_engine_answers_and_stops_it_on_sigterm(
    docker_client: Any, stub_image: str, router_image: str, tmp_path: Path
) -> None:
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        pytest.fail(f"the router container mounts a Docker socket; DOCKER_HOST is {host}")
    socket_path = host.removeprefix("unix://")
    prefix = f"vlmhubrc-{uuid.uuid4().hex[:8]}"
    hf_cache, vllm_cache = tmp_path / "hf-cache", tmp_path / "vllm-cache"
    hf_cache.mkdir()
    port = free_port()
    models_yaml = tmp_path / "models.yaml"
    write_models_yaml(models_yaml, prefix, port, hf_cache, vllm_cache)
    compose = yaml.safe_load(COMPOSE.read_text())
    (name, service), = compose["services"].items()
    assert list(compose["volumes"]) == ["vlmhub-state"]
    env = {"DOCKER_GID": str(os.stat(socket_path).st_gid), "HF_CACHE": str(hf_cache),
           "VLLM_CACHE": str(vllm_cache), "HF_TOKEN": "hf_router_container_secret"}
    volume = docker_client.volumes.create(f"{prefix}-state")
    kwargs = compose_run_kwargs(service, env, socket_path, models_yaml, volume.name)
    grace = kwargs.pop("stop_grace_s")
    assert kwargs["network_mode"] == "host"  # engines publish on the host's 127.0.0.1
    router = None
    try:
        router = docker_client.containers.run(name=f"{prefix}-{name}", **kwargs)
        wait_health(router, port)
        # unprivileged: the image's user, with the socket's group only
        assert router.exec_run(["id", "-u"]).output.decode().strip() == "10001"
        # a secure default kept: on the host's network it listens on 127.0.0.1 only
        ip = non_loopback_ip()
        if ip is not None:
            with pytest.raises(OSError):
                socket.create_connection((ip, port), timeout=1.0).close()

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=90)
        answer = client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
        assert answer.choices[0].message.content
        (engine,) = engines(docker_client, prefix)
        assert engine.status == "running" and engine.labels["vlmhub.model"] == "alpha"
        mounts = {m["Destination"]: m["Source"] for m in engine.attrs["Mounts"]}
        assert mounts[HF_MOUNT] == str(hf_cache)  # the host's path, as compose.yaml mounts it
        assert "HF_TOKEN=hf_router_container_secret" in engine.attrs["Config"]["Env"]
        assert "hf_router_container_secret" not in router.logs().decode(errors="replace")

        router.stop(timeout=int(grace))  # what `docker compose stop/down` does: SIGTERM first
        result = router.wait(timeout=grace + 30)
        logs = router.logs().decode(errors="replace")
        assert result["StatusCode"] == 0, logs[-3000:]  # not killed at the end of the grace
        assert "vlmhub router stopped." in logs, logs[-3000:]
        assert engines(docker_client, prefix) == []  # no engine container left behind
    finally:
        if router is not None:
            with contextlib.suppress(Exception):
                router.remove(force=True)
        for leftover in engines(docker_client, prefix):
            with contextlib.suppress(Exception):
                leftover.remove(force=True)
        with contextlib.suppress(Exception):
            volume.remove(force=True)


@pytest.mark.docker
async def test_the_stand_in_image_carries_its_task_routes(
    docker_runtime: DockerRuntime, stub_image: str
) -> None:
    """stub_engine.py imports stub_endpoints from its own directory in the image: /pooling is
    answered there as by the process engine (the image used to hold stub_engine.py alone, and
    answered 404)."""
    rt = docker_runtime
    req = stub_launch_request(rt, rt.rc, stub_spec("gamma", env={
        "VLMHUB_STUB_STARTUP_DELAY": "0.3"}), free_port())
    handle = await rt.start(req)
    try:
        await wait_ready(rt, handle, timeout_s=30)
        async with httpx.AsyncClient() as client:
            r = await client.post(f"http://127.0.0.1:{req.port}/pooling",
                                  json={"model": "gamma", "input": "two words"},
                                  headers={"Authorization": f"Bearer {handle.api_key}"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["object"] == "pooling"
    finally:
        await rt.stop(handle, timeout_s=10)
