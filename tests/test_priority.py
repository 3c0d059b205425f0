"""Request priorities end to end: the X-Vlmhub-Priority header through the real router to the
supervisor's swap policy, and `vlmhub ocr` marking its requests as batch work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from ocr_support import FlakyServer
from PIL import Image
from supervisor_support import build, model, routed

from vlmhub.ocr.batch import BatchOptions, ocr_batch

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


async def test_priority_header_reaches_the_policy_and_bad_values_are_400(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0), "b": model(1.0, priority="batch")})
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=30) as c:
        bad = await c.post("/v1/chat/completions", json=CHAT,
                           headers={"X-Vlmhub-Priority": "urgent"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_priority"
        ok = await c.post("/v1/chat/completions", json=CHAT,
                          headers={"X-Vlmhub-Priority": "batch"})
        assert ok.status_code == 200
        assert sup.replicas["a"].priority == "batch"
        ok = await c.post("/v1/chat/completions", json=CHAT)
        assert ok.status_code == 200 and sup.replicas["a"].priority == "interactive"
        # a model's own `priority` is the default for its requests
        ok = await c.post("/v1/chat/completions", json={**CHAT, "model": "b"})
        assert ok.status_code == 200 and sup.replicas["b"].priority == "batch"


async def test_interactive_work_swaps_in_ahead_of_an_older_batch_queue(tmp_path: Path) -> None:
    """One model fits at a time; while `a` starts, a batch request queues for `b` and, later,
    an interactive one for `c`: the policy brings `c` in first."""
    sup, _, _ = build(
        tmp_path, {"a": model(3.0), "b": model(3.0), "c": model(3.0)}, total_gib=4.0, delay=1.0
    )
    async with routed(sup) as url, httpx.AsyncClient(base_url=url, timeout=60) as c:
        first = asyncio.create_task(c.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.3)
        batch = asyncio.create_task(c.post(
            "/v1/chat/completions", json={**CHAT, "model": "b"},
            headers={"X-Vlmhub-Priority": "batch"}))
        await asyncio.sleep(0.3)
        chat = asyncio.create_task(c.post("/v1/chat/completions", json={**CHAT, "model": "c"}))
        done: list[str] = []
        for name, task in (("a", first), ("b", batch), ("c", chat)):
            task.add_done_callback(lambda _t, n=name: done.append(n))
        results = await asyncio.gather(first, batch, chat)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert done == ["a", "c", "b"], done


async def test_ocr_sends_its_pages_as_batch_work(tmp_path: Path) -> None:
    page = tmp_path / "page.png"
    Image.new("RGB", (64, 48), "white").save(page)
    fake = FlakyServer()
    async with fake.serve() as url:
        opts = BatchOptions(model="plain", out_dir=tmp_path / "out", base_url=url)
        result = (await ocr_batch([page], opts)).results[0]
    assert result.status == "ok"
    posts = [h for h in fake.heads if h.startswith(b"post ")]
    assert posts and all(b"x-vlmhub-priority: batch" in h for h in posts)
