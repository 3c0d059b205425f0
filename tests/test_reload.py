"""Config reload without a restart (issue 17 item 4), on a real `vlmhub route` process over a
copy of the demo: POST /api/reload, SIGHUP and --watch; clients keep sending requests the whole
time and every one of them is counted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from route_support import wait_healthy
from supervisor_support import build, model

from vlmhub.config.registry import Registry
from vlmhub.config.schema import RuntimeConfig, load_config, resolve
from vlmhub.control.contract import UnknownModel
from vlmhub.control.reload import ModelDiff
from vlmhub.control.supervisor import Supervisor
from vlmhub.engines.base import EngineHandle, LaunchRequest
from vlmhub.engines.keys import read_key
from vlmhub.engines.ports import free_port
from vlmhub.engines.process import ProcessRuntime

REPO = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())


def start_router(
    tmp_path: Path, cfg: dict[str, Any], *extra: str
) -> tuple[subprocess.Popen[str], str, Path]:
    port = free_port()
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    with (tmp_path / "router.out").open("w") as out:  # a file, as a terminal or journal would
        proc = subprocess.Popen(
            [sys.executable, "-m", "vlmhub", "route", "--config", str(path), "--port",
             str(port), *extra],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    return proc, url, path


def demo(tmp_path: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(yaml.safe_dump(DEMO))
    cfg.pop("together", None)  # these tests remove a grouped model
    lo = 20000 + (os.getpid() * 7) % 30000
    cfg["runtime"]["port_range"] = [lo, lo + 99]
    cfg["runtime"]["process_argv"] = [sys.executable, "-m", "vlmhub.testing.stub_engine",
                                      "--stub-startup-delay", "0.5"]
    return cfg


def models(url: str) -> dict[str, dict[str, Any]]:
    """The router's models. Retries: under a loaded CI machine one answer may be slow."""
    for attempt in range(3):
        try:
            got = httpx.get(url + "/api/models", timeout=20).json()["models"]
            return {m["name"]: m for m in got}
        except httpx.TimeoutException:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def hammer(url: str, model: str, stop: asyncio.Event, statuses: list[int]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while not stop.is_set():
            statuses.append((await c.post("/v1/chat/completions", json=body)).status_code)


def stop_router(proc: subprocess.Popen[str], tmp_path: Path) -> str:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    return (tmp_path / "router.out").read_text()


def engine_max_model_len(url: str, model: str, state_dir: Path) -> int | None:
    """What the engine serving ``model`` now was launched with (asked of the engine itself,
    with the engine's own key from the router's state dir)."""
    port = models(url)[model].get("port")
    if port is None:
        return None
    key = read_key(state_dir, model)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        got = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5, headers=headers,
                        trust_env=False).json()
    except httpx.HTTPError:
        return None
    n: int = got["data"][0]["max_model_len"]
    return n


async def test_reload_under_load_adds_removes_and_changes_models_without_a_blip(
    tmp_path: Path,
) -> None:
    """Clients hammer two running models the whole time; three reloads (POST /api/reload,
    a broken file, SIGHUP) add, remove and change models. The unchanged model keeps its
    engine; the changed one drains, stops and comes back with its new settings on the next
    request; no request fails."""
    cfg = demo(tmp_path)
    proc, url, path = start_router(tmp_path, cfg)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            for m in ("demo-ocr", "demo-vl"):
                body = {"model": m, "messages": [{"role": "user", "content": "hi"}]}
                assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        before = models(url)
        stop, statuses = asyncio.Event(), []
        clients = [
            asyncio.create_task(hammer(url, m, stop, statuses))
            for m in ("demo-ocr", "demo-ocr", "demo-ocr", "demo-vl", "demo-vl", "demo-vl")
        ]
        await asyncio.sleep(1.0)

        cfg["models"]["demo-new"] = cfg["models"]["demo-vl"]
        del cfg["models"]["demo-phi"]
        vl = cfg["models"]["demo-vl"]
        cfg["models"]["demo-vl"] = {
            **vl, "spec": {**vl["spec"], "options": {**vl["spec"]["options"],
                                                     "max_model_len": 2048}},
        }  # an engine flag: drain, stop, start again on the next request
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            r = await c.post("/api/reload")
            assert r.status_code == 200, r.text
            diff = r.json()
            assert diff["added"] == ["demo-new"] and diff["removed"] == ["demo-phi"]
            assert diff["changed"] == ["demo-vl"] and diff["unchanged"] == ["demo-ocr"]
            now = models(url)
            assert set(now) == {"demo-ocr", "demo-vl", "demo-new"}
            for _ in range(400):  # the changed engine is replaced while its clients go on
                if engine_max_model_len(url, "demo-vl", tmp_path / "state") == 2048:
                    break
                await asyncio.sleep(0.05)
            # the new flag, a new engine
            assert engine_max_model_len(url, "demo-vl", tmp_path / "state") == 2048
            assert models(url)["demo-vl"]["max_model_len"] == 2048
            gone = await c.post("/v1/chat/completions", json={
                "model": "demo-phi", "messages": [{"role": "user", "content": "hi"}]})
            assert gone.status_code == 404

            path.write_text(path.read_text() + "\nrouter: {port: 0\n")  # broken YAML
            bad = await c.post("/api/reload")
            assert bad.status_code == 400
            assert "models.yaml" in bad.json()["error"]["message"]
            assert ":" in bad.json()["error"]["message"]  # located (file:line)
            assert set(models(url)) == {"demo-ocr", "demo-vl", "demo-new"}  # config stays

            del cfg["models"]["demo-new"]  # SIGHUP reloads too
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            proc.send_signal(signal.SIGHUP)
            for _ in range(200):
                if "demo-new" not in models(url):
                    break
                await asyncio.sleep(0.05)
            assert "demo-new" not in models(url)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
        # the unchanged model kept its engine and lost no request across three reloads
        assert models(url)["demo-ocr"]["port"] == before["demo-ocr"]["port"]
        assert len(statuses) > 40 and set(statuses) == {200}, statuses
    except BaseException:
        print(stop_router(proc, tmp_path))  # the router's own lines, for whoever reads the failure
        raise
    out = stop_router(proc, tmp_path)
    assert "Reloaded" in out and "Not reloaded" in out


def test_watch_reloads_when_the_file_changes(tmp_path: Path) -> None:
    cfg = demo(tmp_path)
    proc, url, path = start_router(tmp_path, cfg, "--watch")
    try:
        time.sleep(1.1)  # a different mtime than the start's
        del cfg["models"]["demo-phi"]
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        for _ in range(100):
            if "demo-phi" not in models(url):
                break
            time.sleep(0.1)
        assert "demo-phi" not in models(url)
    finally:
        stop_router(proc, tmp_path)


# -- a reload during a start (issue 21 item 8): supervisors over real stand-in engines ---------


class GatedRuntime(ProcessRuntime):
    """The process runtime whose ``start`` yields to the event loop until the test opens
    ``gate``, as the Docker and Ray runtimes yield (their start runs in a worker thread): a
    reload can land while the engine is being launched and the replica has no handle yet."""

    def __init__(self, rc: RuntimeConfig, state_dir: Path) -> None:
        super().__init__(rc, state_dir=state_dir)
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def start(self, req: LaunchRequest) -> EngineHandle:
        self.entered.set()
        await self.gate.wait()
        return await super().start(req)


def gated(tmp_path: Path, models: dict[str, dict[str, Any]]) -> tuple[Supervisor, GatedRuntime]:
    sup, rec, _ = build(tmp_path, models, delay=0.5)
    rt = GatedRuntime(sup.config.runtime, tmp_path / "state")
    return Supervisor([r.model for r in sup.replicas.values()], sup.config, sup.gpu, rt,
                      observer=rec, tick_s=0.05), rt


def reconfigure(tmp_path: Path, sup: Supervisor, models: dict[str, dict[str, Any]]) -> ModelDiff:
    """Reload ``sup`` with ``models`` in place of build()'s (everything else the same)."""
    cfg = yaml.safe_load((tmp_path / "models.yaml").read_text())
    cfg["models"] = models
    path = tmp_path / "models-reloaded.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    return sup.reload(resolve(loaded, Registry().specs(), sup.gpu), loaded.config)


async def settle(sup: Supervisor, done: Callable[[], bool]) -> None:
    for _ in range(600):
        if done():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not settled: {sup.snapshot()}")


async def test_a_model_removed_before_its_engine_is_launched_is_stopped_once_started(
    tmp_path: Path,
) -> None:
    sup, rt = gated(tmp_path, {"a": model(1.0), "b": model(1.0)})
    await sup.start()
    try:
        waiting = asyncio.create_task(sup.acquire("a"))
        await rt.entered.wait()  # a's start runs, its engine not launched yet (no handle)
        assert reconfigure(tmp_path, sup, {"b": model(1.0)}).removed == ("a",)
        rt.gate.set()
        with pytest.raises(UnknownModel):
            await waiting
        await settle(sup, lambda: "a" not in sup.names() and "a" not in sup.replicas)
        assert [h.name for h in await rt.adopt()] == [], "no engine left running untracked"
    finally:
        rt.gate.set()
        await sup.shutdown()
        for h in await rt.adopt():
            await rt.stop(h, timeout_s=5)


async def test_a_model_changed_during_its_start_gets_the_new_engine_and_counts_both(
    tmp_path: Path,
) -> None:
    """The engine being launched when the reload comes has the old spec: once its start ends
    it is drained and stopped and the new spec starts; until it is gone the model counts the
    larger of the old and the new footprints."""
    sup, rt = gated(tmp_path, {"a": model(4.75)})  # 5 GiB
    await sup.start()
    try:
        first = asyncio.create_task(sup.acquire("a"))
        await rt.entered.wait()
        smaller = model(0.75, spec={"options": {"max_model_len": 2048, "enforce_eager": True}})
        # 0.75 GiB of weights and 2048 tokens of 256 KiB: 1.25 GiB
        assert reconfigure(tmp_path, sup, {"a": smaller}).changed == ("a",)
        assert sup.snapshot()[0].budget_gib == 5.0, "the old engine's memory still counts"
        rt.gate.set()
        sup.release(await first)
        got = None
        for _ in range(100):  # requests go on; the engine serving them changes once
            lease = await sup.acquire("a")
            key = getattr(lease, "api_key", None)  # the engine's own key, when it has one
            async with httpx.AsyncClient(
                headers={"Authorization": f"Bearer {key}"} if key else {}
            ) as c:
                got = (await c.get(lease.base_url + "/v1/models")).json()["data"][0]
            sup.release(lease)
            if got["max_model_len"] == 2048:
                break
            await asyncio.sleep(0.1)
        assert got is not None and got["max_model_len"] == 2048, "the new spec serves"
        assert sup.snapshot()[0].budget_gib == 1.25, "the old engine is gone: the new footprint"
        assert len(await rt.adopt()) == 1
    finally:
        rt.gate.set()
        await sup.shutdown()


async def test_preload_applies_to_a_model_a_reload_adds(tmp_path: Path) -> None:
    sup, _, _ = build(tmp_path, {"a": model(1.0)})
    await sup.start()
    try:
        assert reconfigure(tmp_path, sup, {"a": model(1.0), "p": model(1.0, preload=True),
                                           "q": model(1.0)}).added == ("p", "q")
        await settle(sup, lambda: {i.name: i.state for i in sup.snapshot()}["p"] == "ready")
        assert {i.name: i.state for i in sup.snapshot()}["q"] == "stopped"
    finally:
        await sup.shutdown()
