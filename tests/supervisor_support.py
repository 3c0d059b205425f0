"""Build real supervisors over stand-in engines run as local processes (no mocks)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette

from vlmhub.config.registry import Registry
from vlmhub.config.schema import load_config, resolve
from vlmhub.control.supervisor import Supervisor
from vlmhub.engines.base import Runtime
from vlmhub.engines.docker import DockerRuntime
from vlmhub.engines.process import ProcessRuntime
from vlmhub.router.app import create_app
from vlmhub.router.server import RouterServer
from vlmhub.sizing.budgets import BudgetStore
from vlmhub.sizing.vram import Gpu
from vlmhub.testing.stub_engine import ledger_used_gib


class Recorder:
    """A real observer that keeps what the supervisor reports."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, bool]] = []
        self.evictions: list[tuple[str, str]] = []

    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        self.loads.append((model, ok))

    def observe_eviction(self, model: str, mode: str) -> None:
        self.evictions.append((model, mode))


def model(weights: float, sleep_gib: float = 1.25, **entry: Any) -> dict[str, Any]:
    """A stand-in model whose footprint is exactly ``weights + 0.25`` GiB (no CUDA context).
    ``sleep_gib`` matches what a sleeping stand-in engine claims in the ledger (1.25)."""
    spec = entry.pop("spec", {})
    return {
        **entry,
        "spec": {
            "hf_repo": "stub/x",
            "image": "vlmhub/stub-engine:dev",
            "startup_timeout_s": 30,
            "reload_cost_s": 1,
            "options": {"max_model_len": 1024, "enforce_eager": True},
            "vram": {
                "weights_gib": weights,
                "kv_bytes_per_token": 262144,
                "activation_gib": 0,
                "non_torch_gib": 0,
                "cuda_context_gib": 0,
                "sleep_residual_gib": sleep_gib,
            },
            **spec,
        },
    }


def build(tmp_path: Path, models: dict[str, dict[str, Any]], *, total_gib: float = 8.0,
          delay: float = 0.3, router: dict[str, Any] | None = None,
          stub_env: dict[str, str] | None = None, ledger: bool = True,
          docker_prefix: str | None = None, budgets: BudgetStore | None = None,
          runtime_type: type[ProcessRuntime] = ProcessRuntime,
          host: dict[str, Any] | None = None, gpu_probe: bool = False,
          ) -> tuple[Supervisor, Recorder, Path]:
    """A supervisor whose stand-in engines share a simulated GPU ledger of ``total_gib``:
    an engine that would over-commit it fails at start-up with vLLM's free-memory error.

    Process runtime by default (``runtime_type``: a subclass of it, to inject a fault); with
    ``docker_prefix`` the engines are containers of the stand-in image (the ledger lives in
    the mounted HF cache, one entry per model). ``gpu_probe``: the supervisor reads the card's
    memory in use from the ledger (as it reads NVML on a real card) around each wake."""
    base = random.randint(21000, 60000)
    env = {"VLMHUB_STUB_STARTUP_DELAY": str(delay), **(stub_env or {})}
    runtime: dict[str, Any] = {"port_range": [base, base + 60]}
    if docker_prefix is None:
        ledger_dir = tmp_path / "ledger"
        inner_ledger = str(ledger_dir)
        runtime |= {"kind": "process",
                    "process_argv": [sys.executable, "-m", "vlmhub.testing.stub_engine"]}
    else:
        ledger_dir = tmp_path / "hf-cache" / "ledger"
        inner_ledger = "/root/.cache/huggingface/ledger"
        runtime |= {"kind": "docker", "gpus": None, "name_prefix": docker_prefix,
                    "hf_cache": str(tmp_path / "hf-cache"),
                    "vllm_cache": str(tmp_path / "vllm-cache")}
        for name, entry in models.items():
            entry.setdefault("env", {})["VLMHUB_STUB_LEDGER_ID"] = name
    ledger_dir.mkdir(parents=True, exist_ok=True)
    ledger_dir.chmod(0o777)
    if ledger:
        env |= {"VLMHUB_STUB_LEDGER": inner_ledger, "VLMHUB_STUB_GPU_TOTAL_GIB": str(total_gib)}
    runtime["env"] = env
    cfg = {
        "gpu": {"total_gib": total_gib, "reserve_gib": 0, "force_total": True},
        "router": {"health_interval_s": 0.5, "restart_backoff_s": 0.2, **(router or {})},
        "runtime": runtime,
        "models": models,
        **({"host": host} if host is not None else {}),
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    gpu = Gpu(total_gib, 0, None, "test", "config")
    resolved = resolve(loaded, Registry().specs(), gpu, measured=budgets)
    rt: Runtime
    if docker_prefix is None:
        rt = runtime_type(loaded.config.runtime, state_dir=tmp_path / "state")
    else:
        rt = DockerRuntime(loaded.config.runtime)
    rec = Recorder()
    sup = Supervisor(resolved, loaded.config, gpu, rt, observer=rec, tick_s=0.05,
                     budgets=budgets, gpu_used=(lambda node: ledger_used_gib(ledger_dir))
                     if gpu_probe else None)
    return sup, rec, ledger_dir


def used(ledger_dir: Path) -> float:
    return ledger_used_gib(ledger_dir)


@contextlib.asynccontextmanager
async def routed_app(sup: Supervisor) -> AsyncIterator[tuple[str, Starlette]]:
    """Serve ``sup`` behind a real uvicorn on a free loopback port, in this event loop;
    yields the base URL and the app."""
    app = create_app(sup, sup.config)
    server = RouterServer(app, "127.0.0.1", 0)
    await sup.start()
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.server.started:
                break
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{server.port}", app
    finally:
        server.stop()
        await asyncio.wait_for(task, 30)
        await sup.shutdown()


@contextlib.asynccontextmanager
async def routed(sup: Supervisor) -> AsyncIterator[str]:
    """:func:`routed_app`, yielding only the base URL."""
    async with routed_app(sup) as (url, _):
        yield url
