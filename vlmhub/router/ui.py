"""The web page: ``GET /ui`` (a static, dependency-free page), its two assets, ``/`` -> ``/ui``,
and ``GET /api/ui``, the static facts the page needs (GPU, presets, budgets).

The page holds no secret and reads everything through the router's own APIs, so the files are
served to anyone who can reach the router; ``/api/ui`` follows the admin rule of ``/api``
(``router.admin_key`` as a Bearer token, else loopback clients only). Nothing here blocks: the
files are three small assets read by Starlette's ``FileResponse``.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from vlmhub.config import Config, ResolvedModel
from vlmhub.replica import ReplicaInfo, SupervisorLike
from vlmhub.router.admin import check_admin
from vlmhub.router.state import router_state
from vlmhub.vram import Gpu
from vlmhub.web import STATIC_DIR

ASSETS: dict[str, str] = {  # file name -> media type; nothing else in STATIC_DIR is served
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
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
    return {"name": gpu.name, "total_gib": round(gpu.total_gib, 3),
            "usable_gib": round(gpu.usable_gib, 3)}


def resolved_models(supervisor: SupervisorLike) -> dict[str, ResolvedModel]:
    """The supervisor's resolved models by name, when it exposes them (the real one does)."""
    replicas = getattr(supervisor, "replicas", None)
    if not isinstance(replicas, dict):
        return {}
    found: dict[str, ResolvedModel] = {}
    for name, replica in replicas.items():
        resolved = getattr(replica, "model", None)
        if isinstance(name, str) and isinstance(resolved, ResolvedModel):
            found[name] = resolved
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
    return JSONResponse({"gpu": gpu_json(st.supervisor, st.config), "models": models},
                        headers={"Cache-Control": "no-store"})


def asset(name: str) -> Response:
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=HEADERS)


async def page(request: Request) -> Response:
    """GET /ui: the page."""
    return asset("index.html")


async def static_file(request: Request) -> Response:
    """GET /ui/{name}: app.js or style.css (404 for anything else)."""
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
    ]
