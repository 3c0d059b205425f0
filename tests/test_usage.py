"""Token usage per key name and model (issue 27 item 2): counted from the engines' answers,
streamed or not (the usage chunk the router asked for is taken out for a client that did not
ask for it, kept for one that did), in /metrics and /api/usage, kept across a restart of a
real `vlmhub route`, and shown by `vlmhub usage --json --since`. Never a key, only its name."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from route_support import route_process
from router_support import (
    RunningRouter,
    StubEngine,
    TestSupervisor,
    engines,
    make_config,
    running_router,
)

from vlmhub.engines.ports import free_port

PLAIN = "sk-plain-usage-42"
ALICE = "sk-alice-usage-42"
MSG = [{"role": "user", "content": "count my tokens please"}]


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    with engines(StubEngine("alpha"), StubEngine("bravo")) as started:
        yield started


def sdk(router: RunningRouter, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, timeout=30, max_retries=0)


def usage_rows(url: str, since: str | None = None) -> list[dict[str, Any]]:
    params = {"since": since} if since else {}
    resp = httpx.get(url + "/api/usage", params=params, timeout=10)
    assert resp.status_code == 200, resp.text
    rows: list[dict[str, Any]] = resp.json()["data"]
    return rows


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["key"], r["model"]): r for r in rows}


def test_usage_of_plain_and_streamed_answers_counted_and_the_usage_chunk_only_if_asked(
    stubs: dict[str, StubEngine]
) -> None:
    """alice: one non-streamed answer, one stream that did not ask for usage (no usage chunk
    reaches her, every chunk has a choice) and one that did (its usage chunk arrives). All
    three count under ``alice``; the plain key's under ``key-<6 hex>``. /metrics has them by
    key name and model; no key anywhere."""
    config = make_config(api_keys=[PLAIN, {"name": "alice", "key": ALICE}])
    with running_router(TestSupervisor(dict(stubs)), config) as router:
        alice = sdk(router, ALICE)
        plain = alice.chat.completions.create(model="alpha", messages=MSG,  # type: ignore[arg-type]
                                              max_tokens=5)
        assert plain.usage is not None
        chunks = list(alice.chat.completions.create(
            model="alpha", messages=MSG, max_tokens=5, stream=True))  # type: ignore[arg-type]
        assert chunks and all(c.choices and c.usage is None for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == plain.choices[0].message.content
        asked = list(alice.chat.completions.create(
            model="alpha", messages=MSG, max_tokens=5, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}))
        assert asked[-1].choices == [] and asked[-1].usage == plain.usage
        sdk(router, PLAIN).completions.create(model="bravo", prompt="hi", max_tokens=3)

        rows = by_key(usage_rows(router.url))
        mine = rows[("alice", "alpha")]
        assert mine["requests"] == 3
        assert mine["prompt_tokens"] == 3 * plain.usage.prompt_tokens
        assert mine["completion_tokens"] == 3 * plain.usage.completion_tokens
        label = "key-" + hashlib.sha256(PLAIN.encode()).hexdigest()[:6]
        assert rows[(label, "bravo")]["completion_tokens"] == 3
        metrics = httpx.get(router.url + "/metrics", timeout=10).text
        want = f'vlmhub_prompt_tokens_total{{key="alice",model="alpha"}} ' \
               f'{3.0 * plain.usage.prompt_tokens}'
        assert want in metrics
        assert f'vlmhub_completion_tokens_total{{key="{label}",model="bravo"}} 3.0' in metrics
        page = metrics + json.dumps(usage_rows(router.url))
        assert PLAIN not in page and ALICE not in page


def test_without_keys_usage_counts_as_anonymous(stubs: dict[str, StubEngine]) -> None:
    with running_router(TestSupervisor(dict(stubs)), make_config()) as router:
        sdk(router, "none").chat.completions.create(model="alpha", messages=MSG,  # type: ignore[arg-type]
                                                     max_tokens=2)
        assert [(r["key"], r["completion_tokens"]) for r in usage_rows(router.url)] == [
            ("anonymous", 2)]
        bad = httpx.get(router.url + "/api/usage", params={"since": "yesterday-ish"}, timeout=5)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


# ------------------------------------------------------------------ vlmhub route, restarted
def route_config(tmp_path: Path, port: int) -> Path:
    lo = free_port()
    spec = {"hf_repo": "stub/x", "image": "vlmhub/stub-engine:dev",
            "options": {"max_model_len": 2048, "enforce_eager": True},
            "vram": {"weights_gib": 1.0, "kv_bytes_per_token": 28672, "activation_gib": 0.5}}
    (tmp_path / "bob.key").write_text("sk-bob-from-a-file\n")
    cfg = {
        "gpu": {"total_gib": 8, "reserve_gib": 0.5, "force_total": True},
        "router": {"port": port, "shutdown_timeout_s": 5, "api_keys": [
            PLAIN,
            {"name": "alice", "key_env": "TEST_ALICE_KEY", "models": ["a"]},
            {"name": "bob", "key_file": str(tmp_path / "bob.key"), "rpm": 100}]},
        "runtime": {"kind": "process", "port_range": [lo, lo + 50], "process_argv": [
            sys.executable, "-m", "vlmhub.testing.stub_engine", "--stub-startup-delay", "0.1"]},
        "models": {"alpha": {"aliases": ["a"], "spec": {**spec, "hf_repo": "stub/alpha"}},
                   "bravo": {"spec": {**spec, "hf_repo": "stub/bravo"}}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli_usage(config: Path, url: str, env: dict[str, str], *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "vlmhub", "usage", "--config", str(config),
                          "--router", url, "--json", *args], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return json.loads(out.stdout)["data"]


def test_usage_survives_a_router_restart_and_vlmhub_usage_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `vlmhub route` (keys inline, from the environment, from a file): usage of
    alice (alpha by its alias only) and bob; the router stops (SIGINT) and starts again on
    the same state dir: `vlmhub usage --json` shows the same counts, ``--since 1d`` leaves
    out an old hour that was in the usage file; a reload that drops bob refuses him from the
    next request. No key in the usage file, the logs, /metrics or /api/usage."""
    port = free_port()
    config = route_config(tmp_path, port)
    state = tmp_path / "state"
    state.mkdir()
    old_hour = (int(time.time()) // 3600 - 72) * 3600
    (state / "usage.json").write_text(json.dumps(
        {"version": 1, "buckets": [[old_hour, "alice", "alpha", 7, 70, 700]]}))
    monkeypatch.setenv("TEST_ALICE_KEY", ALICE)
    env = {**os.environ, "VLMHUB_STATE_DIR": str(state)}
    log = tmp_path / "route.log"
    with route_process(config, tmp_path, port) as url:
        alice = openai.OpenAI(base_url=url + "/v1", api_key=ALICE, max_retries=0, timeout=60)
        bob = openai.OpenAI(base_url=url + "/v1", api_key="sk-bob-from-a-file", max_retries=0,
                            timeout=60)
        assert [m.id for m in alice.models.list()] == ["alpha"]
        with pytest.raises(openai.NotFoundError):
            alice.chat.completions.create(model="bravo", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
        first = alice.chat.completions.create(model="a", messages=MSG, max_tokens=4)  # type: ignore[arg-type]
        assert first.usage is not None
        list(bob.chat.completions.create(model="bravo", messages=MSG, max_tokens=3,  # type: ignore[arg-type]
                                         stream=True))
        metrics = httpx.get(url + "/metrics", timeout=10).text
    saved = (state / "usage.json").read_text()
    for secret in (PLAIN, ALICE, "sk-bob-from-a-file"):
        assert secret not in saved and secret not in metrics
        assert secret not in log.read_text()
    with route_process(config, tmp_path, port) as url:
        everything = by_key(cli_usage(config, url, env))
        assert everything[("alice", "alpha")]["requests"] == 8
        assert everything[("alice", "alpha")]["prompt_tokens"] == 70 + first.usage.prompt_tokens
        assert everything[("bob", "bravo")]["completion_tokens"] == 3
        recent = by_key(cli_usage(config, url, env, "--since", "1d"))
        assert recent[("alice", "alpha")]["requests"] == 1
        assert recent[("alice", "alpha")]["completion_tokens"] == first.usage.completion_tokens
        assert json.dumps(usage_rows(url)).count("sk-") == 0

        raw = yaml.safe_load(config.read_text())
        raw["router"]["api_keys"] = raw["router"]["api_keys"][:2]  # bob's key revoked
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        assert httpx.post(url + "/api/reload", timeout=30).status_code == 200
        bob = openai.OpenAI(base_url=url + "/v1", api_key="sk-bob-from-a-file", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bob.models.list()
    assert "sk-bob-from-a-file" not in log.read_text() and ALICE not in log.read_text()


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n", b"\r\r"])
def test_a_stream_passes_whole_events_in_any_line_ending_and_only_the_usage_chunk_goes(
    end: bytes
) -> None:
    """An engine's stream cut at every 5 bytes: each event reaches the client as soon as it is
    complete (never held to the end), the bytes are unchanged, and only the usage chunk is
    taken out when the router asked for it."""
    from vlmhub.router.usage import UsageTap

    events = [b'data: {"choices":[{"delta":{"content":"hi"}}]}', b'data: {"choices":[],'
              b'"usage":{"prompt_tokens":3,"completion_tokens":2}}', b"data: [DONE]"]
    stream = end.join(events) + end
    for strip in (False, True):
        counted: list[tuple[int, int]] = []
        tap = UsageTap(lambda p, c, out=counted: out.append((p, c)))
        tap.strip = strip
        sent, first_at = b"", None
        for i in range(0, len(stream), 5):
            sent += tap.feed(stream[i:i + 5])
            if first_at is None and sent:
                first_at = i + 5
        sent += tap.flush()
        tap.finish()
        assert first_at is not None and first_at < len(events[0]) + len(end) + 5
        assert sent == (events[0] + end + events[2] + end if strip else stream)
        assert counted == [(3, 2)]
