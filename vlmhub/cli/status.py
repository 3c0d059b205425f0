"""``vlmhub status``, ``vlmhub load NAME`` and ``vlmhub unload NAME``: the running router's view
and its admin actions from the shell, through its admin API (``/api/models``).

The router is ``--router URL``, else ``http://<router.host>:<router.port>`` from models.yaml
(the default config when none is found). The admin key is ``router.admin_key`` (with
``auto``: the token the router wrote to ``<state dir>/admin.token``) or ``$VLMHUB_ADMIN_KEY``;
without one the router answers loopback clients only. Each command makes one blocking HTTP
request (load waits until the model is ready or failed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from vlmhub.cli.common import ConfigOption, console, err_console, user_errors
from vlmhub.config.schema import find_config, load_config
from vlmhub.errors import VlmhubError
from vlmhub.paths import default_state_dir
from vlmhub.router.state import admin_key_for

RouterOption = typer.Option(
    "--router", help="The router's base URL (default: router.host/port from models.yaml).")
JsonOption = typer.Option("--json", help="Print JSON instead of a table.")


def admin_target(config: Path | None, router: str | None) -> tuple[str, str | None]:
    cfg = load_config(find_config(config)).config
    url = router or f"http://{cfg.router.host}:{cfg.router.port}"
    key = admin_key_for(cfg.router.admin_key, default_state_dir(), create=False)  # `auto`
    return url.rstrip("/"), key or os.environ.get("VLMHUB_ADMIN_KEY") or None


def admin_call(method: str, url: str, key: str | None, timeout: float) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        resp = httpx.request(method, url, headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        base = url.split("/api/")[0]
        raise VlmhubError(
            f"cannot reach the router at {base} ({type(exc).__name__}). Fix: start it with "
            "`vlmhub route`, or give its address with --router URL."
        ) from exc
    try:
        body = resp.json()
    except ValueError:
        body = {"error": {"message": resp.text[:300]}}
    if resp.status_code >= 400:
        message = (body.get("error") or {}).get("message") or f"HTTP {resp.status_code}"
        raise VlmhubError(f"{resp.status_code}: {message}")
    return body


def _fmt_gib(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def status(
    config: Path | None = ConfigOption,
    router: Annotated[str | None, RouterOption] = None,
    as_json: Annotated[bool, JsonOption] = False,
) -> None:
    """The running router's models: state, queue, in flight, memory held, last error."""
    with user_errors():
        url, key = admin_target(config, router)
        models = admin_call("GET", url + "/api/models", key, 10.0)["models"]
        if as_json:
            typer.echo(json.dumps(models, indent=2))
            return
        table = Table(box=None, pad_edge=False)
        for col in ("MODEL", "STATE", "PHASE", "PORT", "GiB", "IN FLIGHT", "QUEUED",
                    "LAST ERROR"):
            table.add_column(col, overflow="fold")
        for m in models:
            table.add_row(m["name"], m["state"], m.get("phase") or "-", str(m["port"] or "-"),
                          _fmt_gib(m.get("budget_gib")), str(m["in_flight"]), str(m["queued"]),
                          (m.get("last_error") or m.get("waiting_reason") or "-")[:200])
        console.print(table)


def _act(action: str, name: str, config: Path | None, router: str | None, as_json: bool) -> None:
    with user_errors():
        url, key = admin_target(config, router)
        info = admin_call("POST", f"{url}/api/models/{name}/{action}", key, 3600.0)
        if as_json:
            typer.echo(json.dumps(info, indent=2))
        else:
            err_console.print(f"{info['name']}: {info['state']}"
                              + (f" on port {info['port']}" if info.get("port") else ""),
                              highlight=False)


def load(
    name: str,
    config: Path | None = ConfigOption,
    router: Annotated[str | None, RouterOption] = None,
    as_json: Annotated[bool, JsonOption] = False,
) -> None:
    """Start a model in the running router now; waits until it is ready (or failed: exit 1)."""
    _act("load", name, config, router, as_json)


def unload(
    name: str,
    config: Path | None = ConfigOption,
    router: Annotated[str | None, RouterOption] = None,
    as_json: Annotated[bool, JsonOption] = False,
) -> None:
    """Stop a model in the running router, after its requests in flight finish."""
    _act("unload", name, config, router, as_json)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("load")(load)
    app.command("unload")(unload)
