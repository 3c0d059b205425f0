"""Hardening for real deployments (issue 21, router side), on real `vlmhub route` processes over
stand-in engines and on the router app over real stub engines: proxy variables never reach
engine traffic, a reload applies router settings at once, a request that never reached a dead
engine waits for its restart, tracebacks are masked, forwarded requests are not loopback."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
from fault_support import engine_pids, running, stub_models, write_config

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
