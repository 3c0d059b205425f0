"""Hardening for real deployments (issue 21, router side), on real `vlmhub route` processes over
stand-in engines and on the router app over real stub engines: proxy variables never reach
engine traffic, a reload applies router settings at once, a request that never reached a dead
engine waits for its restart, tracebacks are masked, forwarded requests are not loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fault_support import REPO, engine_pids, running, stub_models, write_config
from router_support import TestSupervisor, make_config, running_router

MSG = [{"role": "user", "content": "hi"}]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------- 1: engines never via a proxy
def test_proxy_variables_never_reach_engine_health_checks(tmp_path: Path) -> None:
    """HTTP_PROXY set as for downloading weights behind a corporate proxy, NO_PROXY not covering
    127.0.0.1 (the defect: the supervisor's health checks went to the proxy, so a healthy engine
    was killed as hung every few seconds and every request got 503)."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    env = {"HTTP_PROXY": proxy, "http_proxy": proxy, "HTTPS_PROXY": proxy, "https_proxy": proxy,
           "ALL_PROXY": proxy, "all_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    config = write_config(tmp_path, stub_models(("a",), 1.0))  # health every 0.5 s
    state = tmp_path / "state"
    with running(config, state, env=env) as router, \
            httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        body = {"model": "a", "messages": MSG}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        pid = engine_pids(state)["a"]
        for _ in range(8):  # 4 s: eight health intervals
            time.sleep(0.5)
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, (r.text, router.output()[-3000:])
        assert engine_pids(state)["a"] == pid  # never restarted
        assert "hung" not in router.output()


# --------------------------------------------- 4: an undelivered request waits for the restart
def test_a_request_the_dead_engine_never_received_waits_for_its_restart(tmp_path: Path) -> None:
    """The engine dies between two requests and no health check has noticed yet (the defect:
    the next request got 502 "could not be reached" although nothing was sent): the router
    reports it, waits for the restart like a request on a cold model and sends it then."""
    config = write_config(tmp_path, stub_models(("a",), 1.0),
                          router={"health_interval_s": 3600})  # only the request can notice
    state = tmp_path / "state"
    with running(config, state) as router, \
            httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        body = {"model": "a", "messages": MSG}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        pid = engine_pids(state)["a"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)  # its sockets are closed: a connection is refused now
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, (r.text, router.output()[-3000:])
        assert r.json()["choices"][0]["message"]["content"]
        assert engine_pids(state)["a"] != pid  # answered by the restarted engine
        assert "waits for the restart" in router.output()


# ------------------------------------------------- 12: tracebacks masked, 500 without its text
SECRET = "sk-planted-in-a-traceback-91c2"
TRACEBACK = """
import logging, sys
from vlmhub.logs import ROUTER, configure
configure(fmt=sys.argv[2], secrets=[sys.argv[1]])
try:
    raise RuntimeError("the key " + sys.argv[1] + " leaked into an exception")
except RuntimeError:
    ROUTER.exception("request failed")
ROUTER.warning("where", stack_info=True, extra={"note": "k=" + sys.argv[1]})
def deep(key):
    logging.getLogger("vlmhub.router").error("inner", stack_info=True)
deep(sys.argv[1])
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_tracebacks_and_stacks_are_masked(fmt: str) -> None:
    """The defect: the masking ran before the traceback was formatted and added to the line."""
    out = subprocess.run([sys.executable, "-c", TRACEBACK, SECRET, fmt], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "RuntimeError: the key *** leaked" in out.stderr.replace('\\n', '\n'), out.stderr
    assert "Traceback" in out.stderr and "request failed" in out.stderr
    assert SECRET not in out.stderr + out.stdout


class Broken(TestSupervisor):
    """A supervisor whose name lookup fails with a secret in the exception's text."""

    __test__ = False

    def resolve(self, name: str) -> str | None:
        raise RuntimeError(f"lookup failed with {SECRET} at /srv/private/path")


def test_a_500_names_the_request_id_and_never_the_exception() -> None:
    sup = Broken(backends={})
    with running_router(sup) as router:
        r = httpx.post(router.url + "/v1/chat/completions", json={"model": "m", "messages": MSG},
                       headers={"x-request-id": "trace-me-7"}, timeout=30)
        other = httpx.get(router.url + "/v1/models/m", timeout=30)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "internal_error" and "trace-me-7" in err["message"]
    assert r.headers["x-request-id"] == "trace-me-7"
    for resp in (r, other):
        assert SECRET not in resp.text and "RuntimeError" not in resp.text
        assert "/srv/private" not in resp.text
    assert other.status_code == 500 and other.headers["x-request-id"] in other.text


# --------------------------------------- 13: forwarded requests are not loopback on the admin API
@dataclass
class Nowhere:
    """A backend that is never called (the admin API only lists it)."""

    name: str
    served: str = "m"
    api_key: str | None = None
    base_url: str = "http://127.0.0.1:9"


FORWARDED = ({"Forwarded": "for=203.0.113.7;proto=https"}, {"X-Forwarded-For": "203.0.113.7"},
             {"X-Real-IP": "203.0.113.7"})


def test_forwarded_requests_and_trust_loopback_false_need_the_admin_key() -> None:
    sup = TestSupervisor(backends={"m": Nowhere("m")})
    with running_router(sup) as router, \
            httpx.Client(base_url=router.url, timeout=30, trust_env=False) as c:
        assert c.get("/api/models").status_code == 200  # a local client, no proxy between
        for headers in FORWARDED:  # a reverse proxy on this host: remote users behind it
            r = c.get("/api/models", headers=headers)
            assert r.status_code == 403, headers
            assert "admin_key" in r.json()["error"]["message"]
            assert c.post("/api/models/m/unload", headers=headers).status_code == 403
            assert c.get("/api/ui", headers=headers).status_code == 403
    assert sup.actions == []
    with running_router(sup, make_config(trust_loopback=False)) as router:
        assert httpx.get(router.url + "/api/models", timeout=30).status_code == 403
    keyed = make_config(trust_loopback=False, admin_key="adm-key-1")
    with running_router(sup, keyed) as router, \
            httpx.Client(base_url=router.url, timeout=30, trust_env=False) as c:
        auth = {"Authorization": "Bearer adm-key-1"}
        assert c.get("/api/models", headers=auth).status_code == 200
        assert c.get("/api/models", headers={**auth, **FORWARDED[0]}).status_code == 200
        assert c.get("/api/models").status_code == 401


# ----------------------------------------------- 2: a reload applies the router's settings at once
OLD_KEY, NEW_KEY, NEWER_KEY = "sk-old-key-0001", "sk-new-key-0002", "sk-newer-key-0003"


def test_reload_applies_router_settings_from_the_next_request(tmp_path: Path) -> None:
    """POST /api/reload and SIGHUP: a revoked key is refused at once, a new key and admin key
    work, the body limit and CORS follow, the new key is masked in the log, and
    the settings that need a restart (port) are named in the answer and the log (the defect:
    every router setting was fixed when the app was built; the old key kept working)."""
    models = stub_models(("a",), 1.0)
    config = write_config(tmp_path, models, router={"api_keys": [OLD_KEY],
                                                    "admin_key": "adm-old-1"})
    body = {"model": "a", "messages": MSG}
    with running(config, tmp_path / "state", args=("--log-format", "json")) as router, \
            httpx.Client(base_url=router.url, timeout=60, trust_env=False) as c:
        def chat(key: str, extra: dict[str, str] | None = None) -> int:
            headers = {"Authorization": f"Bearer {key}", **(extra or {})}
            return c.post("/v1/chat/completions", json=body, headers=headers).status_code

        assert chat(OLD_KEY) == 200 and chat(NEW_KEY) == 401
        write_config(tmp_path, models, router={
            "api_keys": [NEW_KEY], "admin_key": "adm-new-2", "max_body_mb": 0.001,
            "cors_origins": ["http://localhost:3000"], "port": 9, "trust_loopback": False})
        r = c.post("/api/reload", headers={"Authorization": "Bearer adm-old-1"})
        assert r.status_code == 200, r.text
        assert r.json()["restart_needed"] == ["port"] and r.json()["unchanged"] == ["a"]
        assert chat(OLD_KEY) == 401  # revoked: refused from the next request on
        assert chat(NEW_KEY, {"x-request-id": f"id-{NEW_KEY}"}) == 200
        big = c.post("/v1/chat/completions", json={**body, "pad": "x" * 4096},
                     headers={"Authorization": f"Bearer {NEW_KEY}"})
        assert big.status_code == 413
        pre = c.options("/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204
        assert c.get("/api/models", headers={"Authorization": "Bearer adm-old-1"}
                     ).status_code == 401
        assert c.get("/api/models", headers={"Authorization": "Bearer adm-new-2"}
                     ).status_code == 200

        write_config(tmp_path, models, router={"api_keys": [NEWER_KEY]})  # SIGHUP as well
        router.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while chat(NEW_KEY) != 401 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert chat(NEW_KEY) == 401 and chat(NEWER_KEY) == 200
        assert c.get("/api/models").status_code == 200  # no admin key: loopback again
    out = router.output()
    assert "router.port changed" in out and '"restart_needed": ["port"]' in out
    for key in (OLD_KEY, NEW_KEY, NEWER_KEY, "adm-new-2"):
        assert key not in out, key
    assert "id-***" in out  # the new key, masked in the access line's request id
