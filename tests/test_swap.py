"""The router over the REAL supervisor and stand-in engines, driven by the real `openai` SDK:
the 16-client swap scenario, a crash mid-stream, and the same flow in Docker."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from supervisor_support import build, model, routed, used


async def ask(client: openai.AsyncOpenAI, name: str, stream: bool) -> str:
    messages = [{"role": "user", "content": f"hello {name}"}]
    if not stream:
        r = await client.chat.completions.create(
            model=name,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
        )
        assert r.choices[0].finish_reason in ("length", "stop")
        return r.choices[0].message.content or ""
    text, finish = "", None
    chunks = await client.chat.completions.create(
        model=name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        stream=True,
    )
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish in ("length", "stop"), "the stream ended without a finish reason"
    return text


async def test_sixteen_clients_swapping_three_models_on_a_gpu_that_fits_two(
    tmp_path: Path,
) -> None:
    names = ("a", "b", "c")
    # 8 GiB; each model 3.25 GiB: any two fit, three do not
    sup, rec, ledger = build(
        tmp_path,
        {n: model(3.0) for n in names},
        delay=0.2,
        stub_env={"VLMHUB_STUB_TOKEN_DELAY": "0.02"},
        router={"max_queue": 64, "queue_timeout_s": 240, "drain_timeout_s": 60},
    )
    usable = sup.gpu.usable_gib
    peak = {"ledger": 0.0, "plan": 0.0}
    violations: list[str] = []

    async def monitor() -> None:
        while True:
            peak["ledger"] = max(peak["ledger"], used(ledger))
            held = 0.0
            for r in sup.replicas.values():
                if r.state in ("starting", "ready", "stopping"):
                    held += r.footprint
                if r.state in ("stopping", "stopped", "sleeping") and r.in_flight:
                    violations.append(f"{r.name} is {r.state} with {r.in_flight} in flight")
            peak["plan"] = max(peak["plan"], held)
            await asyncio.sleep(0.01)

    async with routed(sup) as url:
        watcher = asyncio.create_task(monitor())
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=240, max_retries=0)

        async def one_client(i: int) -> list[str]:
            seen = []
            for k in range(80):  # until at least 20 swaps have happened (bounded)
                if len(rec.evictions) >= 22 and k >= 6:
                    break
                name = names[(i + k) % 3]
                text = await ask(client, name, stream=(i + k) % 2 == 0)
                assert text.startswith(f"{name}:"), (name, text)  # answered by the right engine
                seen.append(name)
            return seen

        results = await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(16))), 300)
        watcher.cancel()
        await client.close()
    assert all(len(r) >= 6 for r in results)  # every request of every client succeeded
    assert len(rec.evictions) >= 20, f"only {len(rec.evictions)} swaps"
    assert not violations, violations[:5]
    assert peak["plan"] <= usable + 1e-9
    assert 0 < peak["ledger"] <= 8.0 + 1e-9  # the stand-ins' own start-up check agrees
    assert all(ok for _, ok in rec.loads), rec.loads


async def test_crash_mid_stream_errors_the_client_and_the_next_request_restarts(
    tmp_path: Path,
) -> None:
    sup, rec, _ = build(
        tmp_path,
        {"a": model(1.0)},
        stub_env={"VLMHUB_STUB_CRASH_AFTER": "2", "VLMHUB_STUB_TOKEN_DELAY": "0.02"},
    )
    async with routed(sup) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert (await ask(client, "a", stream=False)).startswith("a:")
        with pytest.raises((openai.APIError, AssertionError)):
            await ask(client, "a", stream=True)  # the engine dies in the middle of this one
        for _ in range(100):  # the lease is released once the broken response is closed
            if sup.snapshot()[0].state == "failed" and sup.snapshot()[0].in_flight == 0:
                break
            await asyncio.sleep(0.05)
        info = sup.snapshot()[0]
        assert info.state == "failed" and info.in_flight == 0
        assert (await ask(client, "a", stream=True)).startswith("a:")  # restarted
        assert sup.snapshot()[0].restarts == 1 and len(rec.loads) == 2
        async with httpx.AsyncClient() as http:  # async: the router runs in this event loop
            models = (await http.get(url + "/v1/models")).json()["data"]
        assert models[0]["id"] == "a" and models[0]["state"] == "ready"
        await client.close()


@pytest.mark.docker
async def test_router_over_docker_engines(tmp_path: Path, stub_image: str) -> None:
    prefix = f"vlmhub-t{uuid.uuid4().hex[:6]}"
    sup, rec, ledger = build(
        tmp_path,
        {"a": model(5.0, aliases=["first"]), "b": model(5.0)},
        delay=0.3,
        docker_prefix=prefix,
    )
    async with routed(sup) as url:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert (await ask(client, "first", stream=False)).startswith("a:")
        assert (await ask(client, "a", stream=True)).startswith("a:")
        assert 0 < used(ledger) <= 8.0
        assert (await ask(client, "b", stream=True)).startswith("b:")  # a evicted: 5+5 > 8
        assert rec.evictions == [("a", "stop")]
        async with httpx.AsyncClient() as http:
            data = (await http.get(url + "/v1/models")).json()["data"]
        states = {m["id"]: m["state"] for m in data}
        assert states == {"a": "stopped", "b": "ready"}
        assert (await ask(client, "a", stream=False)).startswith("a:")
        await client.close()
    import docker

    left = docker.from_env().containers.list(all=True, filters={"name": prefix})
    assert left == []
