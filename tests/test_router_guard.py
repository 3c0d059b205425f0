"""The browser guard: a web page open in the user's browser cannot drive the local router."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from router_support import (
    RunningRouter,
    StubEngine,
    TestSupervisor,
    engines,
    running_router,
)

from vlmhub.router.guard import refusal

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def router() -> Iterator[RunningRouter]:
    with (
        engines(StubEngine("alpha")) as started,
        running_router(TestSupervisor(dict(started))) as r,
    ):
        yield r


def test_plain_clients_and_the_dashboard_itself_pass(router: RunningRouter) -> None:
    assert httpx.post(router.url + "/v1/chat/completions", json=CHAT).status_code == 200
    own = {"Origin": router.url, "Sec-Fetch-Site": "same-origin"}
    assert (
        httpx.post(router.url + "/v1/chat/completions", json=CHAT, headers=own).status_code == 200
    )
    local = f"localhost:{router.port}"
    assert (
        httpx.post(
            router.url + "/api/models/alpha/load",
            headers={"Host": local, "Origin": f"http://{local}"},
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_cross_site_pages_cannot_change_state(
    router: RunningRouter, headers: dict[str, str]
) -> None:
    for path, body in (("/api/models/alpha/unload", None), ("/v1/chat/completions", CHAT)):
        r = httpx.post(router.url + path, json=body, headers=headers)
        assert r.status_code == 403, (path, headers)
        assert r.json()["error"]["code"] == "cross_site_refused"
    assert ("unload", "alpha") not in router.supervisor.actions  # nothing was unloaded
    # reading is not a state change (and CORS keeps the answer from the page)
    assert httpx.get(router.url + "/v1/models", headers=headers).status_code == 200


def test_dns_rebinding_is_refused_on_loopback(router: RunningRouter) -> None:
    r = httpx.get(router.url + "/api/models", headers={"Host": "rebound.example:80"})
    assert r.status_code == 403 and "does not name this machine" in r.json()["error"]["message"]
    for host in (f"127.0.0.1:{router.port}", f"localhost:{router.port}", "[::1]:8080"):
        assert (
            refusal(
                {
                    "type": "http",
                    "method": "GET",
                    "server": ("127.0.0.1", 1),
                    "headers": [(b"host", host.encode())],
                }
            )
            is None
        )


def test_a_router_on_a_public_address_accepts_its_own_names() -> None:
    scope = {
        "type": "http",
        "method": "POST",
        "server": ("0.0.0.0", 8080),
        "headers": [(b"host", b"gpu-box.lan:8080"), (b"origin", b"http://gpu-box.lan:8080")],
    }
    assert refusal(scope) is None
    scope["headers"] = [(b"host", b"gpu-box.lan:8080"), (b"origin", b"http://other.lan")]
    assert refusal(scope) is not None
