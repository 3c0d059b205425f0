"""The real ``vlmhub`` command (a subprocess) serving the stand-in engine: serve, ps, logs,
health, stop; a start-up failure; Ctrl-C in the foreground; the Docker variant."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from vlmhub.engines.ports import port_is_free

VLMHUB = str(Path(sys.executable).parent / "vlmhub")
STUB = {"hf_repo": "stub/a", "image": "vlmhub/stub-engine:dev",
        "options": {"max_model_len": 2048},
        "vram": {"weights_gib": 1, "kv_bytes_per_token": 1024},
        "env": {"VLMHUB_STUB_STARTUP_DELAY": "0.4"}}


def write_config(tmp_path: Path, **runtime: Any) -> Path:
    lo = random.randrange(20000, 60000, 100)
    models: dict[str, Any] = {
        "demo-a": {"spec": STUB},
        "demo-bad": {"spec": {**STUB, "hf_repo": "stub/bad", "env": {
            "VLMHUB_STUB_STARTUP_DELAY": "0.3", "VLMHUB_STUB_FAIL_AT_STARTUP": "free-memory"}}},
        "demo-ocr": {"spec": {**STUB, "hf_repo": "stub/ocr",
                              "capabilities": ["chat", "vision", "ocr"],
                              "presets": {"ocr": {"prompt": "Read the page's text."}}}},
    }
    config = {
        "gpu": {"total_gib": 8},
        "runtime": {"kind": "process",
                    "process_argv": ["{python}", "-m", "vlmhub.testing.stub_engine"],
                    "port_range": [lo, lo + 99], "name_prefix": f"clitest-{tmp_path.name}"[:40],
                    **runtime},
        "models": models,
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def env_for(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "250",
            "NO_COLOR": "1"}


def vlmhub(tmp_path: Path, config: Path, *args: str, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VLMHUB, *args, "--config", str(config)], cwd=tmp_path,
                          env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=timeout, check=False)


def section(out: str, start: str, end: str) -> str:
    """The lines from the one that starts with ``start`` to the one that starts with ``end``."""
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.startswith(start))
    j = next(n for n, ln in enumerate(lines) if n >= i and ln.startswith(end))
    return "\n".join(lines[i : j + 1])


def port_of(out: str) -> int:
    line = next(ln for ln in out.splitlines() if ln.startswith("Endpoint: "))
    return int(line.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture
def stop_all(tmp_path: Path) -> Any:
    """Stops whatever a test left running (by the CLI itself, then by the state dir)."""
    configs: list[Path] = []
    yield configs
    for config in configs:
        vlmhub(tmp_path, config, "stop", "--all", "--timeout", "2")


def test_serve_detach_then_ps_logs_health_stop(tmp_path: Path, stop_all: list[Path]) -> None:
    config = write_config(tmp_path)
    stop_all.append(config)
    served = vlmhub(tmp_path, config, "serve", "demo-a", "--detach")
    assert served.returncode == 0, served.stderr
    out = served.stdout
    assert "--served-model-name demo-a" in out, "the planned argv is shown"
    for phase in ("starting", "loading weights", "profiling", "ready"):
        assert f"] {phase}" in out
    port = port_of(out)
    assert f"Endpoint: http://127.0.0.1:{port}/v1" in out

    curl = next(ln for ln in out.splitlines() if ln.startswith("curl -s "))
    answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=20)
    assert json.loads(answer.stdout)["choices"][0]["message"]["content"].startswith("demo-a:")
    python = section(out, "from openai import OpenAI", "print(response")
    ran = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("demo-a:")

    ps = vlmhub(tmp_path, config, "ps")
    assert ps.returncode == 0, ps.stderr
    row = next(ln for ln in ps.stdout.splitlines() if ln.strip().startswith("demo-a"))
    assert row.split()[:4] == ["demo-a", "running", "process", str(port)]
    assert "GiB" in row and row.split()[-1] == "ok"

    logs = vlmhub(tmp_path, config, "logs", "demo-a", "--tail", "200")
    assert logs.returncode == 0
    assert "Application startup complete" in logs.stdout
    assert len(vlmhub(tmp_path, config, "logs", "demo-a", "-n", "2").stdout.splitlines()) == 2

    health = vlmhub(tmp_path, config, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    row = next(ln for ln in health.stdout.splitlines() if ln.strip().startswith("demo-a"))
    assert row.split()[2:] == ["ok", "demo-a", "2048"]

    again = vlmhub(tmp_path, config, "serve", "demo-a", "--detach")
    assert again.returncode == 0 and "already running" in again.stdout

    stopped = vlmhub(tmp_path, config, "stop", "demo-a")
    assert stopped.returncode == 0 and "stopped demo-a (process)" in stopped.stdout
    assert port_is_free(port)
    assert "no engines running" in vlmhub(tmp_path, config, "ps").stdout
    assert "Shutting down" in vlmhub(tmp_path, config, "logs", "demo-a").stdout
    missing = vlmhub(tmp_path, config, "stop", "demo-a")
    assert missing.returncode != 0 and "no engine named 'demo-a'" in missing.stderr


def test_health_fails_for_a_dead_engine(tmp_path: Path, stop_all: list[Path]) -> None:
    config = write_config(tmp_path)
    stop_all.append(config)
    assert vlmhub(tmp_path, config, "serve", "demo-a", "-d").returncode == 0
    record = json.loads((tmp_path / "state" / "process" / "demo-a.json").read_text())
    os.killpg(record["pid"], signal.SIGSTOP)  # alive but not answering
    try:
        health = vlmhub(tmp_path, config, "health")
        assert health.returncode == 1
        assert "unhealthy" in health.stderr and "demo-a" in health.stderr
    finally:
        os.killpg(record["pid"], signal.SIGCONT)


def test_serve_failure_exits_1_with_the_reason(tmp_path: Path, stop_all: list[Path]) -> None:
    config = write_config(tmp_path)
    stop_all.append(config)
    served = vlmhub(tmp_path, config, "serve", "demo-bad", "--detach")
    assert served.returncode == 1
    assert "demo-bad failed to start" in served.stderr
    assert "Not enough free GPU memory" in served.stderr and "Fix:" in served.stderr
    assert "Traceback (most recent call last)" not in served.stderr.split("log lines:")[0]
    assert not (tmp_path / "state" / "process" / "demo-bad.json").exists(), "engine removed"
    assert "no engines running" in vlmhub(tmp_path, config, "ps").stdout


def test_unknown_model_and_busy_port(tmp_path: Path, stop_all: list[Path]) -> None:
    config = write_config(tmp_path)
    stop_all.append(config)
    unknown = vlmhub(tmp_path, config, "serve", "nope", "-d")
    assert unknown.returncode == 2 and "no model named 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        served = vlmhub(tmp_path, config, "serve", "demo-a", "-d", "--port", str(taken))
    assert served.returncode == 0, served.stderr
    assert f"port {taken} is in use; using {port_of(served.stdout)}" in served.stdout


def test_ocr_model_example_sends_an_image(tmp_path: Path, stop_all: list[Path]) -> None:
    config = write_config(tmp_path)
    stop_all.append(config)
    served = vlmhub(tmp_path, config, "serve", "demo-ocr", "--detach")
    assert served.returncode == 0, served.stderr
    (tmp_path / "page.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a page")
    curl = next(ln for ln in served.stdout.splitlines() if ln.startswith("curl -s "))
    assert "image_url" in curl and "Read the page's text." in served.stdout
    answer = subprocess.run(["bash", "-c", curl], cwd=tmp_path, capture_output=True,
                            text=True, timeout=20)
    assert json.loads(answer.stdout)["choices"][0]["message"]["content"].startswith(
        "demo-ocr: [1 image")
    python = section(served.stdout, "import base64", "print(response")
    ran = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("demo-ocr: [1 image")


def test_foreground_serve_stops_the_engine_on_sigint(tmp_path: Path,
                                                     stop_all: list[Path]) -> None:
    config = write_config(tmp_path)
    stop_all.append(config)
    proc = subprocess.Popen([VLMHUB, "serve", "demo-a", "--config", str(config)], cwd=tmp_path,
                            env=env_for(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Following the log"):
            break
    out = "".join(lines)
    assert "Following the log" in out, out + proc.stderr.read() if proc.stderr else out
    port = port_of(out)
    record = tmp_path / "state" / "process" / "demo-a.json"
    pid = json.loads(record.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped demo-a" in rest
    assert not record.exists() and port_is_free(port)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


@pytest.mark.docker
def test_serve_detach_with_docker(tmp_path: Path, stub_image: str, docker_client: Any,
                                  stop_all: list[Path]) -> None:
    config = write_config(tmp_path, gpus=None, hf_cache=str(tmp_path / "hf"),
                          vllm_cache=str(tmp_path / "vllm"))
    stop_all.append(config)
    prefix = yaml.safe_load(config.read_text())["runtime"]["name_prefix"]
    served = vlmhub(tmp_path, config, "serve", "demo-a", "--runtime", "docker", "--detach")
    assert served.returncode == 0, served.stderr
    assert f"docker run -d --name {prefix}-demo-a -p 127.0.0.1:" in served.stdout
    port = port_of(served.stdout)
    container = docker_client.containers.get(f"{prefix}-demo-a")
    assert container.labels["vlmhub.port"] == str(port)

    ps = vlmhub(tmp_path, config, "ps")
    row = next(ln for ln in ps.stdout.splitlines() if ln.strip().startswith("demo-a"))
    assert row.split()[:4] == ["demo-a", "running", "docker", str(port)]
    assert "Application startup complete" in vlmhub(tmp_path, config, "logs", "demo-a").stdout
    assert vlmhub(tmp_path, config, "health").returncode == 0

    stopped = vlmhub(tmp_path, config, "stop", "demo-a")
    assert "stopped demo-a (docker)" in stopped.stdout
    assert docker_client.containers.list(all=True, filters={"name": f"{prefix}-"}) == []


def test_unreachable_docker_is_explained(tmp_path: Path) -> None:
    bogus = f"unix://{tmp_path}/no-docker.sock"
    config = write_config(tmp_path, docker_host=bogus)
    served = vlmhub(tmp_path, config, "serve", "demo-a", "--runtime", "docker", "-d")
    assert served.returncode == 2
    assert "cannot reach the Docker engine" in served.stderr and bogus in served.stderr
    assert "sudo systemctl start docker" in served.stderr and "Traceback" not in served.stderr
    ps = vlmhub(tmp_path, config, "ps")
    assert ps.returncode == 0 and "no engines running" in ps.stdout
    assert "Docker engines not listed" in ps.stderr and bogus in ps.stderr


# --- issue 21 item 14: each engine has its own API key ------------------------------------


def test_served_engine_has_its_own_key_that_direct_calls_need(tmp_path: Path,
                                                              stop_all: list[Path]) -> None:
    """A local user reaching 127.0.0.1:PORT without the engine's key gets vLLM's 401; the key
    is random, 0600 in the state dir, out of argv, the state record and the printed text,
    and a later process (a restarted router) reads it for the engines it adopts."""
    import asyncio

    import httpx

    from vlmhub.config.schema import load_config
    from vlmhub.engines.process import ProcessRuntime

    config = write_config(tmp_path)
    stop_all.append(config)
    served = vlmhub(tmp_path, config, "serve", "demo-a", "--detach")
    assert served.returncode == 0, served.stderr
    port = port_of(served.stdout)
    key_file = tmp_path / "state" / "engine-keys" / "demo-a.key"
    key = key_file.read_text().strip()
    assert len(key) >= 32 and key_file.stat().st_mode & 0o777 == 0o600
    assert key not in served.stdout + served.stderr and str(key_file) in served.stdout

    direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                        json={"model": "demo-a", "messages": [{"role": "user", "content": "x"}]})
    assert direct.status_code == 401 and direct.json() == {"error": "Unauthorized"}
    assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200  # open, as in vLLM
    keyed = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                      headers={"Authorization": f"Bearer {key}"})
    assert keyed.status_code == 200

    (record,) = (tmp_path / "state" / "process").glob("demo-a.json")
    data = json.loads(record.read_text())
    assert key not in record.read_text()
    cmdline = Path(f"/proc/{data['pid']}/cmdline").read_bytes().decode(errors="replace")
    assert key not in cmdline and "--api-key" not in cmdline  # `ps` shows no key

    rt = ProcessRuntime(load_config(config).config.runtime, state_dir=tmp_path / "state")
    (adopted,) = [h for h in asyncio.run(rt.adopt()) if h.name == "demo-a"]
    assert adopted.api_key == key and key not in repr(adopted)
    health = vlmhub(tmp_path, config, "health")  # reads /v1/models with the key
    assert health.returncode == 0 and "demo-a" in health.stdout, health.stdout


async def test_the_router_sends_each_engine_its_key(tmp_path: Path) -> None:
    """Through the router (real supervisor, uvicorn, stand-in engine) the openai client needs
    only the router's key; the engine behind it refuses a direct call without its own."""
    import httpx
    import openai
    from supervisor_support import build, model, routed

    sup, _, _ = build(tmp_path, {"m": model(1.0)})
    async with routed(sup) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        answer = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
        handle = sup.replicas["m"].handle
        assert handle is not None and handle.api_key
        async with httpx.AsyncClient() as http:
            direct = await http.get(handle.base_url + "/v1/models")
            assert direct.status_code == 401 and direct.json() == {"error": "Unauthorized"}
