"""The web page: ``GET /ui`` (a static, dependency-free page), its assets, ``/`` -> ``/ui``,
``GET /api/ui`` (the static facts the page needs: GPU, presets, budgets, the body limit),
``GET /api/ui/logs/{model}`` (a tail of the model's engine log), ``GET /api/ui/history`` (the
last hour of memory held and loads/evictions, vlmhub.router.history) and the OCR playground's
helpers (vlmhub.router.ui_ocr).

The page holds no secret and reads everything through the router's own APIs, so the files are
served to anyone who can reach the router; everything under ``/api/ui`` follows the admin rule
of ``/api`` (``router.admin_key`` as a Bearer token, else loopback clients only). The files are
small assets read by Starlette's ``FileResponse``; a log tail is read by the runtime (a file
read or a Docker call, in a worker thread).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from vlmhub.config.schema import Config, ResolvedModel
from vlmhub.control.contract import ReplicaInfo, SupervisorLike
from vlmhub.engines.base import EngineHandle, Runtime
from vlmhub.engines.process import ProcessRuntime
from vlmhub.router.admin import check_admin
from vlmhub.router.errors import error_response, unknown_model_response
from vlmhub.router.history import WINDOW_S, History
from vlmhub.router.state import router_state
from vlmhub.router.ui_ocr import ocr_routes
from vlmhub.sizing.vram import Gpu
from vlmhub.web import STATIC_DIR

ASSETS: dict[str, str] = {  # file name -> media type; nothing else in STATIC_DIR is served
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "ocr.js": "text/javascript; charset=utf-8",
    "panels.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
LOG_TAIL, LOG_TAIL_MAX = 200, 2000
HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def gpu_json(supervisor: SupervisorLike, config: Config) -> dict[str, Any] | None:
    """The card the supervisor plans for; else the configured size; else None."""
    gpu = getattr(supervisor, "gpu", None)
    if not isinstance(gpu, Gpu):
        if config.gpu.total_gib is None:
            return None
        gpu = Gpu(config.gpu.total_gib, config.gpu.reserve_gib, config.gpu.budget_gib,
                  "GPU (from config)")
    nodes = getattr(supervisor, "nodes", None)
    if isinstance(nodes, dict) and nodes and "" not in nodes:  # several GPU nodes (Ray)
        usable = {str(n): round(float(g), 3) for n, g in sorted(nodes.items())}
        return {"name": f"{len(usable)} GPU node{'s' if len(usable) != 1 else ''} "
                f"({', '.join(usable)})", "total_gib": round(sum(usable.values()), 3),
                "usable_gib": round(sum(usable.values()), 3), "nodes": usable}
    return {"name": gpu.name, "total_gib": round(gpu.total_gib, 3),
            "usable_gib": round(gpu.usable_gib, 3)}


def host_json(supervisor: SupervisorLike, config: Config) -> dict[str, Any]:
    """The host RAM level-1 sleepers may fill (the supervisor's budget, else the config's;
    ``usable_gib`` None: unknown) and what they hold now."""
    usable = getattr(supervisor, "host_gib", None)
    if not isinstance(usable, float):
        usable = config.host.budget_gib()
    held = sum(i.host_gib for i in supervisor.snapshot())
    return {"usable_gib": round(usable, 3) if math.isfinite(usable) else None,
            "held_gib": round(held, 3)}


def resolved_models(supervisor: SupervisorLike) -> dict[str, ResolvedModel]:
    """The supervisor's resolved models by name, when it exposes them (the real one does)."""
    replicas = getattr(supervisor, "replicas", None)
    if not isinstance(replicas, dict):
        return {}
    found: dict[str, ResolvedModel] = {}
    for replica in replicas.values():  # one of several replicas: its model's
        resolved = getattr(replica, "model", None)
        if isinstance(resolved, ResolvedModel):
            found[resolved.name] = resolved
    return found


def model_json(info: ReplicaInfo, resolved: ResolvedModel | None) -> dict[str, Any]:
    """One model as the page shows it: the snapshot's facts plus the spec's presets."""
    spec = resolved.spec if resolved is not None else None
    budget = resolved.budget if resolved is not None else None
    presets = {
        key: {"prompt": p.prompt, "description": p.description, "temperature": p.temperature,
              "top_p": p.top_p, "max_tokens": p.max_tokens}
        for key, p in (spec.presets.items() if spec is not None else ())
    }
    return {
        "name": info.name,
        "aliases": list(info.aliases),
        "description": spec.description if spec is not None else "",
        "capabilities": list(spec.capabilities) if spec is not None else [],
        "presets": presets,
        "default_preset": spec.default_preset if spec is not None else None,
        "budget_gib": info.budget_gib,
        "host_gib": info.host_gib,
        "sleep_gib": round(budget.sleep_residual_gib, 3) if budget is not None else 0.0,
        "max_model_len": info.max_model_len,
        "external": info.external,
    }


async def ui_info(request: Request) -> Response:
    """GET /api/ui: the GPU and every model's presets and budget (admin rule of /api)."""
    st = router_state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    resolved = resolved_models(st.supervisor)
    models = [model_json(i, resolved.get(i.name)) for i in st.supervisor.snapshot()]
    return JSONResponse({"gpu": gpu_json(st.supervisor, st.config), "models": models,
                         "host": host_json(st.supervisor, st.config),
                         "max_body_bytes": st.max_body}, headers={"Cache-Control": "no-store"})


async def engine_logs(request: Request) -> Response:
    """GET /api/ui/logs/{model}?tail=N: the last N lines of the model's engine log (its
    running engine's; else, for the process runtime, the log the last one left)."""
    st = router_state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    name = request.path_params["model"]
    real = st.supervisor.resolve(name)
    if real is None:
        return unknown_model_response(name, st.supervisor)
    raw = request.query_params.get("tail", str(LOG_TAIL))
    if not raw.isdigit() or not 1 <= int(raw) <= LOG_TAIL_MAX:
        return error_response(400, f"`tail` must be a number of lines from 1 to {LOG_TAIL_MAX}",
                              "invalid_request_error", "invalid_tail")
    tail = int(raw)
    replicas = getattr(st.supervisor, "replicas", None)
    handle = getattr(replicas.get(real), "handle", None) if isinstance(replicas, dict) else None
    runtime = getattr(st.supervisor, "runtime", None)
    lines: list[str] = []
    error: str | None = None
    try:
        if isinstance(handle, EngineHandle) and isinstance(runtime, Runtime):
            lines = await runtime.logs(handle, tail)
        elif isinstance(runtime, ProcessRuntime):  # the log outlives the engine
            lines = await asyncio.to_thread(runtime.read_log, real, tail)
    except Exception as exc:  # Docker gone, an unreadable file: say so, in the panel
        error = f"{type(exc).__name__}: {exc}"
    info = next((i for i in st.supervisor.snapshot() if i.name == real), None)
    return JSONResponse({"name": real, "state": info.state if info else None,
                         "phase": info.phase if info else None,
                         "running": isinstance(handle, EngineHandle), "lines": lines,
                         "error": error}, headers={"Cache-Control": "no-store"})


async def history(request: Request) -> Response:
    """GET /api/ui/history: the last hour of memory held per model and loads/evictions."""
    st = router_state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    kept = getattr(request.app.state, "history", None)
    data = kept.as_json() if isinstance(kept, History) else {
        "now": time.time(), "window_s": WINDOW_S, "since": None, "recording": False,
        "samples": [], "events": []}
    return JSONResponse(data, headers={"Cache-Control": "no-store"})


def asset(name: str) -> Response:
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=HEADERS)


async def page(request: Request) -> Response:
    """GET /ui: the page."""
    return asset("index.html")


async def static_file(request: Request) -> Response:
    """GET /ui/{name}: a script or the style sheet (404 for anything else)."""
    name = request.path_params["name"]
    if name not in ASSETS or name == "index.html":
        return Response("not found", status_code=404, media_type="text/plain")
    return asset(name)


async def home(request: Request) -> Response:
    """GET /: to the page."""
    return RedirectResponse("/ui", status_code=307)


def ui_routes() -> list[Route]:
    return [
        Route("/", home, methods=["GET"]),
        Route("/ui", page, methods=["GET"]),
        Route("/ui/{name}", static_file, methods=["GET"]),
        Route("/api/ui", ui_info, methods=["GET"]),
        Route("/api/ui/history", history, methods=["GET"]),
        Route("/api/ui/logs/{model:path}", engine_logs, methods=["GET"]),
        *ocr_routes(),
    ]
