"""The admin API under ``/api``: list the models, load or unload one now.

Auth: with ``router.admin_key`` set, ``Authorization: Bearer <admin_key>`` is required (401
otherwise, from anywhere). Without it only loopback clients may call (403 for the others), and
not even they when the request carries a forwarding header (``Forwarded``, ``X-Forwarded-For``,
``X-Real-IP``) or ``router.trust_loopback`` is false: behind a reverse proxy or an ``ssh -L`` on
this host every remote user is a loopback peer.
Listing is a synchronous snapshot; load and unload wait (asynchronously) for the supervisor.
A load that ends with the model ``failed`` answers 503 with the engine's reason (and
``Retry-After``), never 200.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vlmhub.config.locate import ConfigError
from vlmhub.control.contract import AcquireError, ReplicaInfo
from vlmhub.errors import VlmhubError
from vlmhub.router.errors import acquire_error_response, error_response, unknown_model_response
from vlmhub.router.state import RouterState, bearer, is_loopback, key_matches, router_state
from vlmhub.router.usage import parse_since


def replica_json(info: ReplicaInfo) -> dict[str, Any]:
    """A snapshot as JSON: every :class:`ReplicaInfo` field (aliases as a list)."""
    out = dataclasses.asdict(info)
    out["aliases"] = list(info.aliases)
    return out


FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})
"""Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever its peer."""


def local_client(request: Request, trust_loopback: bool) -> bool:
    """The caller is on this machine and may be trusted as such: ``router.trust_loopback``, a
    loopback peer, and no forwarding header (a reverse proxy on this host is a loopback peer
    for every remote user behind it)."""
    if not trust_loopback or not is_loopback(request.client.host if request.client else None):
        return False
    return not any(k in FORWARDING for k, _ in request.scope["headers"])


def check_admin(request: Request, st: RouterState) -> Response | None:
    """None when the caller may use the admin API (admin key, or a local client without one,
    see :func:`local_client`); else the 401/403 response to send. Shared by /api/models and
    the dashboard's /api/ui. Reads the settings current for this request (a reload applies)."""
    settings = st.settings
    if settings.admin_key is not None:
        if key_matches(bearer(request), (settings.admin_key,)):
            return None
        return error_response(401, "The admin API needs `Authorization: Bearer <admin_key>` "
                              "(router.admin_key in models.yaml).", "invalid_request_error",
                              "invalid_admin_key", {"WWW-Authenticate": "Bearer"})
    if local_client(request, settings.trust_loopback):
        return None
    return error_response(403, "The admin API answers only local clients when no "
                          "router.admin_key is set (never a request forwarded by a proxy, nor "
                          "any when router.trust_loopback is false). Set router.admin_key in "
                          "models.yaml to use it from another machine or through a proxy.",
                          "permission_error", "admin_forbidden")


def _state(request: Request) -> RouterState:
    return router_state(request)


async def list_replicas(request: Request) -> Response:
    """GET /api/models: every model's snapshot."""
    st = _state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    return JSONResponse({"models": [replica_json(i) for i in st.supervisor.snapshot()]})


async def _act(request: Request, action: str) -> Response:
    st = _state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    wanted = request.path_params["name"]
    name = st.supervisor.resolve(wanted)
    if name is None:
        return unknown_model_response(wanted, st.supervisor)
    try:
        if action == "load":
            info = await st.supervisor.load(name)
        else:
            info = await st.supervisor.unload(name)
    except AcquireError as exc:
        return acquire_error_response(exc)
    except VlmhubError as exc:
        return error_response(503, str(exc), "service_unavailable", f"{action}_failed")
    if action == "load" and info.state == "failed":
        return load_failed(info)
    return JSONResponse(replica_json(info))


def load_failed(info: ReplicaInfo) -> Response:
    """503 (with ``Retry-After``) for a load that left the model ``failed``, with the reason."""
    reason = (info.last_error or "no reason was recorded").rstrip(". ")
    fix = ("check that the external server is running" if info.external
           else f"`vlmhub logs {info.name}` shows the engine's log; fix the cause")
    return error_response(503, f"Model {info.name!r} failed to load: {reason}. Fix: {fix}, "
                          "then load it again.", "service_unavailable", "load_failed")


async def load_model(request: Request) -> Response:
    """POST /api/models/{name}/load: start it now; waits until it is ready or failed."""
    return await _act(request, "load")


async def unload_model(request: Request) -> Response:
    """POST /api/models/{name}/unload: stop it now, after its requests finish."""
    return await _act(request, "unload")


async def reload_config(request: Request) -> Response:
    """POST /api/reload: re-read models.yaml and apply it: the models (control.reload) and the
    router's settings, from the next request on. The answer lists the models added, removed,
    changed and unchanged, and ``restart_needed``: the router settings that changed but take
    effect only at the next start. An invalid file is refused (400, with its located error)
    and the running config stays."""
    st = _state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    reloader = getattr(request.app.state, "reloader", None)
    if reloader is None:
        return error_response(501, "this router was not started from a models.yaml it can "
                              "re-read", "invalid_request_error", "reload_unavailable")
    try:
        answer = reloader()  # the model diff, its summary and the settings needing a restart
    except (VlmhubError, ConfigError) as exc:
        return error_response(400, f"models.yaml was not reloaded; the running config stays. "
                              f"{exc}", "invalid_request_error", "invalid_config")
    return JSONResponse(answer)


async def usage_report(request: Request) -> Response:
    """GET /api/usage?since=1d: tokens per key name and model (hourly buckets from ``since``'s
    hour; absent: all). Never a key, only its name."""
    st = _state(request)
    if (denied := check_admin(request, st)) is not None:
        return denied
    now = time.time()
    try:
        since = parse_since(request.query_params.get("since"), now)
    except ValueError:
        return error_response(400, "since must be a duration (30m, 12h, 1d, 2w), a Unix time "
                              "or an ISO date", "invalid_request_error", "invalid_since",
                              param="since")
    return JSONResponse({"object": "usage", "since": since, "now": now,
                         "data": st.usage.report(since)})


def admin_routes() -> list[Route]:
    return [
        Route("/api/usage", usage_report, methods=["GET"]),
        Route("/api/reload", reload_config, methods=["POST"]),
        Route("/api/models", list_replicas, methods=["GET"]),
        Route("/api/models/{name:path}/load", load_model, methods=["POST"]),
        Route("/api/models/{name:path}/unload", unload_model, methods=["POST"]),
    ]
