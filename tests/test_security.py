"""Security checks (issue 10, item 4) on real `vlmhub route` processes over stand-in engines:
loopback-only listening, keys enforced on /v1 and the admin API, the generated admin token,
planted secrets that must never come out, and models.yaml values that must never become flags
or shell text. Unit-level key checks are in test_router_app.py; the engine's minimal
environment in test_runtime_process.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fault_support import (
    REPO,
    engine_pids,
    listening,
    running,
    stub_models,
    write_config,
)
from supervisor_support import build, model, routed

from vlmhub.router.state import ADMIN_TOKEN

MSG = [{"role": "user", "content": "hi"}]
V1_POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
            "/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize")


def cli(*args: str, state: Path, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "VLMHUB_STATE_DIR": str(state), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "vlmhub", *args], capture_output=True,
                          text=True, env=full, cwd=REPO, timeout=120)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------- loopback only
def test_security_router_and_engines_listen_on_loopback_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, stub_models(("a",), 1.0))
    state = tmp_path / "state"
    with running(config, state) as router:  # no --host: the default
        r = httpx.post(router.url + "/v1/chat/completions", json={"model": "a", "messages": MSG})
        assert r.status_code == 200, r.text
        mine = listening(router.pid)
        assert mine == [f"127.0.0.1:{router.port}"], mine
        (engine,) = engine_pids(state).values()
        theirs = listening(engine)
        assert theirs and all(a.startswith("127.0.0.1:") for a in theirs), theirs


@pytest.mark.docker
async def test_security_docker_engine_is_published_on_loopback_and_gets_yaml_as_data(
    tmp_path: Path, stub_image: str, docker_client: Any
) -> None:
    """The container's port is published on 127.0.0.1 only, it gets no extra privilege, and
    a served name full of shell syntax reaches vLLM as one argument."""
    prefix = f"vlmhub-s{uuid.uuid4().hex[:6]}"
    odd = "x; touch /tmp/pwned && echo $(id) --privileged"
    sup, _, _ = build(tmp_path, {"a": model(1.0, spec={"served_model_name": odd})},
                      docker_prefix=prefix)
    try:
        async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={"model": "a", "messages": MSG})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"].startswith(odd + ":")
            handle = sup.replicas["a"].handle
            assert handle is not None
            attrs = docker_client.containers.get(handle.ident).attrs
            bindings = attrs["HostConfig"]["PortBindings"]
            assert {b["HostIp"] for v in bindings.values() for b in v} == {"127.0.0.1"}
            assert attrs["HostConfig"]["Privileged"] is False
            assert not attrs["HostConfig"].get("CapAdd")
            cmd = attrs["Config"]["Cmd"]
            assert cmd[cmd.index("--served-model-name") + 1] == odd
            assert "--privileged" not in cmd
    finally:
        for ctr in docker_client.containers.list(all=True, filters={"name": prefix}):
            ctr.remove(force=True)
    assert not Path("/tmp/pwned").exists()


# ---------------------------------------------------------------------- keys are enforced
def test_security_keys_are_required_on_v1_and_the_admin_api(tmp_path: Path) -> None:
    config = write_config(tmp_path, stub_models(("a",), 1.0),
                          router={"api_keys": ["user-key-1"], "admin_key": "admin-key-1"})
    with running(config, tmp_path / "state",
                 env={"VLMHUB_API_KEYS": "user-key-2"}) as router, \
            httpx.Client(base_url=router.url, timeout=60) as c:
        body = {"model": "a", "messages": MSG, "prompt": "x", "input": "x", "tokens": [1]}
        unkeyed = ({}, bearer("wrong"), bearer("admin-key-1"), {"Authorization": "user-key-1"})
        for headers in unkeyed:
            for path in V1_POSTS:
                r = c.post(path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
            for path in ("/v1/models", "/v1/models/a"):
                assert c.get(path, headers=headers).status_code == 401, (path, headers)
        for key in ("user-key-1", "user-key-2"):  # the file's key and the environment's
            r = c.post("/v1/chat/completions", json=body, headers=bearer(key))
            assert r.status_code == 200, r.text
        for headers in ({}, bearer("user-key-1"), bearer("wrong")):  # loopback is not enough
            assert c.get("/api/models", headers=headers).status_code == 401
            assert c.post("/api/models/a/unload", headers=headers).status_code == 401
            assert c.get("/api/ui", headers=headers).status_code == 401
            assert c.post("/api/reload", headers=headers).status_code == 401
        assert c.get("/api/models", headers=bearer("admin-key-1")).status_code == 200
        assert c.get("/health").status_code == 200  # no key, and no secret in it


def test_security_generated_admin_token(tmp_path: Path) -> None:
    """`router.admin_key: auto`: a random token in <state>/admin.token (0600, in a 0700 dir)
    that the CLI reads; nothing else opens the admin API, even on loopback."""
    config = write_config(tmp_path, stub_models(("a",), 1.0), router={"admin_key": "auto"})
    state = tmp_path / "state"
    with running(config, state, args=("--log-level", "debug")) as router:
        path = state / ADMIN_TOKEN
        token = path.read_text().strip()
        assert len(token) >= 40
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        for headers in ({}, bearer("auto"), bearer(token[:-1])):
            assert httpx.get(router.url + "/api/models", headers=headers).status_code == 401
        assert httpx.get(router.url + "/api/models", headers=bearer(token)).status_code == 200
        done = cli("load", "a", "--config", str(config), "--router", router.url, state=state)
        assert done.returncode == 0 and "a: ready" in done.stderr, done.stderr
        listed = cli("status", "--config", str(config), "--router", router.url, "--json",
                     state=state)
        assert listed.returncode == 0 and '"state": "ready"' in listed.stdout, listed.stderr
        assert token not in listed.stdout + listed.stderr + done.stdout + done.stderr
        wrong_dir = cli("status", "--config", str(config), "--router", router.url,
                        state=tmp_path / "elsewhere")
        assert wrong_dir.returncode != 0 and "401" in wrong_dir.stderr
    output = router.output()
    assert str(path) in output and token not in output
    path.chmod(0o644)  # readable by others: no longer trusted, a new token replaces it
    with running(config, state) as again:
        fresh = path.read_text().strip()
        assert fresh != token and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert httpx.get(again.url + "/api/models", headers=bearer(token)).status_code == 401
        assert httpx.get(again.url + "/api/models", headers=bearer(fresh)).status_code == 200
    with running(config, state) as third:  # a private token is kept across restarts
        assert path.read_text().strip() == fresh
        assert httpx.get(third.url + "/api/models", headers=bearer(fresh)).status_code == 200


# ------------------------------------------------------------ planted secrets stay hidden
def test_security_planted_secrets_never_leak(tmp_path: Path) -> None:
    hf = "hf_PlantedToken" + uuid.uuid4().hex
    file_key, env_key, admin = (f"sk-planted-{k}-{uuid.uuid4().hex}" for k in ("f", "e", "a"))
    models = {**stub_models(("a",), 1.0),
              **stub_models(("bad",), 1.0, env={"VLMHUB_STUB_FAIL_AT_STARTUP": "oops"})}
    config = write_config(tmp_path, models, router={"api_keys": [file_key], "admin_key": admin})
    state = tmp_path / "state"
    env = {"HF_TOKEN": hf, "VLMHUB_API_KEYS": env_key}
    bodies: list[str] = []
    with running(config, state, env=env, args=("--log-level", "debug")) as router, \
            httpx.Client(base_url=router.url, timeout=60) as c:
        chat = {"model": "a", "messages": MSG}
        for key in (file_key, env_key, admin, "sk-wrong-" + hf):
            r = c.post("/v1/chat/completions", json=chat, headers=bearer(key))
            bodies.append(r.text + str(r.headers))
            r = c.get("/v1/models", headers=bearer(key))
            bodies.append(r.text + str(r.headers))
        for body in ({"model": "nope", "messages": MSG}, {"model": "bad", "messages": MSG},
                     {"messages": MSG}, {"model": "a", "messages": MSG, "stream": True}):
            r = c.post("/v1/chat/completions", json=body, headers=bearer(file_key))
            bodies.append(r.text + str(r.headers))
        assert "bad" in bodies[-3] and r.status_code == 200
        for path in ("/api/models", "/api/ui"):
            bodies.append(c.get(path, headers=bearer(admin)).text)
        bodies.append(c.post("/api/models/bad/load", headers=bearer(admin)).text)
        for path in ("/health", "/metrics", "/openapi.json", "/ui"):
            bodies.append(c.get(path).text)
        engines = engine_pids(state)
        ps_cli = cli("ps", "--config", str(config), state=state,
                     env={"DOCKER_HOST": "unix:///nonexistent"})
        assert ps_cli.returncode == 0 and "a" in ps_cli.stdout, ps_cli.stderr
        os_ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        environ = Path(f"/proc/{engines['a']}/environ").read_bytes().decode(errors="replace")
    files = [p for p in state.rglob("*") if p.is_file()]
    written = "\n".join(p.read_text(errors="replace") for p in files)
    out = {"response bodies": "\n".join(bodies), "vlmhub ps": ps_cli.stdout + ps_cli.stderr,
           "ps -eo args": os_ps, "router output": router.output(), "state dir": written}
    for where, text in out.items():
        for secret in (hf, file_key, env_key, admin):
            assert secret not in text, f"a planted secret appears in {where}"
    assert hf in environ, "HF_TOKEN is passed to the engine (its environment only)"
    for secret in (file_key, env_key, admin):
        assert secret not in environ, "the router's keys never reach an engine"


# ------------------------------------------------ YAML values never become flags or shell
def test_security_yaml_values_never_become_vllm_flags(tmp_path: Path) -> None:
    spec: dict[str, Any] = {"hf_repo": "--trust-remote-code", "image": "x/y:1",
                            "served_model_name": "--api-key", "revision": "-x",
                            "options": {"max_model_len": 1024, "quantization": "--enforce-eager",
                                        "chat_template": "--chat-template-content-format"},
                            "vram": {"weights_gib": 1, "kv_bytes_per_token": 1000}}
    cfg = {"gpu": {"total_gib": 24, "force_total": True}, "runtime": {"kind": "process"},
           "models": {"inline": {"spec": spec}, "--privileged": {"plugin": "qwen3-vl"}}}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done = cli("config", "check", "--config", str(path), state=tmp_path / "state")
    text = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in text, text
    for field in ("hf_repo", "served_model_name", "revision", "options.quantization",
                  "options.chat_template"):
        assert f"models.inline.spec.{field}:" in text, (field, text)
    assert "models.yaml:" in text and "--privileged" in text


def test_security_shell_syntax_in_yaml_is_passed_as_data(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    odd = f"x; touch {canary} && $(touch {canary}) `touch {canary}`"
    models = stub_models(("a",), 1.0)
    models["a"]["spec"]["served_model_name"] = odd
    models["a"]["env"] = {"ODD": f"$(touch {canary})"}
    config = write_config(tmp_path, models)
    state = tmp_path / "state"
    with running(config, state) as router:
        r = httpx.post(router.url + "/v1/chat/completions", json={"model": "a", "messages": MSG},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].startswith(odd + ":")
        (pid,) = engine_pids(state).values()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[argv.index(b"--served-model-name") + 1] == odd.encode()
    assert not canary.exists(), "no shell ever ran the YAML's text"


def test_security_unknown_router_is_not_a_secret_oracle(tmp_path: Path) -> None:
    """A key-protected router answers the same 401 for a wrong key whatever its length or
    prefix: no part of the real key leaks through the answer."""
    config = write_config(tmp_path, stub_models(("a",), 1.0), router={"api_keys": ["k" * 40]})
    with running(config, tmp_path / "state") as router:
        answers = {httpx.get(router.url + "/v1/models", headers=bearer(k)).text
                   for k in ("k", "k" * 39, "k" * 41, "x" * 40, "k" * 39 + "x")}
    assert len(answers) == 1 and "k" * 10 not in answers.pop()
