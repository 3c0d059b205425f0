"""``vlmhub route``: every model of models.yaml behind one OpenAI-compatible endpoint.

Engines start on the first request for their model and are swapped in and out by the
supervisor to fit the GPU. Everything runs in one ``asyncio.run``: the router (uvicorn), the
supervisor's control loop and the engines' health checks share the event loop. The port is
bound before anything starts, so a taken port fails at once. The first Ctrl-C drains (new
requests get 503 while those in flight finish, up to ``router.shutdown_timeout_s``), then the
supervisor stops the engines; a second Ctrl-C stops without waiting.

A state dir has one router: ``route`` holds ``<state_dir>/router.lock`` (see
:mod:`vlmhub.engines.owner`) from before it adopts engines until it has stopped them, and a
second router on the same state dir refuses at once, naming the first (pid, port).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.table import Table
from starlette.applications import Starlette

from vlmhub.cli.common import ConfigOption, Context, GpuOption, console, err_console, user_errors
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import Config, api_keys, load_config, resolve
from vlmhub.control.contract import ReplicaInfo
from vlmhub.engines.devices import Devices
from vlmhub.engines.launch import make_runtime
from vlmhub.engines.owner import StateDirLock, lock_state_dir
from vlmhub.errors import VlmhubError
from vlmhub.logs import ROUTER, set_level
from vlmhub.logs import configure as configure_logs
from vlmhub.paths import default_state_dir
from vlmhub.router.app import apply_settings, create_app
from vlmhub.router.batches import attach_batches
from vlmhub.router.history import History, Tee, attach_history
from vlmhub.router.metrics import RouterMetrics
from vlmhub.router.server import RouterServer
from vlmhub.router.server import run as server_run
from vlmhub.router.state import (
    ADMIN_TOKEN,
    AUTO_ADMIN_KEY,
    admin_key_for,
    is_loopback,
    with_admin_key,
)
from vlmhub.router.usage import attach_usage
from vlmhub.sizing.budgets import BudgetStore
from vlmhub.sizing.vram import Gpu

if TYPE_CHECKING:
    from vlmhub.control.supervisor import Supervisor

RuntimeKind = Literal["docker", "process", "ray"]
DEMO_BANNER = ("[bold yellow]DEMO[/]: these models are stand-in engines (test doubles that "
               "speak vLLM's API and answer made-up words), not real models. On a machine with "
               "an NVIDIA GPU, `vlmhub route` serves the built-in plugins and `vlmhub init` "
               "writes a models.yaml for the card.")


def print_summary(url: str, config: Config, gpu: Gpu, models: list[ReplicaInfo]) -> None:
    """The endpoint, the GPU and each model with its budget and state."""
    keyed = bool(api_keys(config))
    console.print(f"[bold green]vlmhub router ready[/]  [bold]{url}/v1[/]  "
                  f"(OpenAI-compatible; {'API key required' if keyed else 'no API key'})",
                  highlight=False)
    console.print(f"GPU: {gpu.name}, {gpu.total_gib:.1f} GiB total, {gpu.usable_gib:.1f} GiB "
                  f"usable by vlmhub (from {gpu.source})", highlight=False)
    table = Table(box=None, pad_edge=False)
    for col in ("MODEL", "ALIASES", "BUDGET GiB", "STATE", "PINNED", "RUNTIME"):
        table.add_column(col, justify="right" if col == "BUDGET GiB" else "left")
    for m in models:
        budget = "-" if m.external else f"{m.budget_gib:.2f}"
        table.add_row(m.name, ", ".join(m.aliases) or "-", budget, m.state,
                      "yes" if m.pinned else "", m.runtime)
    console.print(table)
    admin = "admin key" if config.router.admin_key else "local clients only"
    console.print(f"Admin:   {url}/api/models ({admin})", highlight=False)
    console.print(f"Metrics: {url}/metrics    Health: {url}/health", highlight=False)
    if models:
        console.print(f"Try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
                      f"-d '{{\"model\": \"{models[0].name}\", \"messages\": "
                      "[{\"role\": \"user\", \"content\": \"Hello\"}]}'",
                      highlight=False, markup=False, soft_wrap=True)
    stop = "stops the engines" if config.router.stop_engines_on_exit else "leaves engines running"
    console.print(f"Ctrl-C drains requests in flight and {stop}.", highlight=False)


class Reloader:
    """Re-read models.yaml and apply it to the running supervisor and router: on SIGHUP, on
    ``POST /api/reload`` and, with ``--watch``, when the file changes. Runs on the event loop;
    the reload itself is synchronous (the engine stops it needs run as operations), and it
    reports through the ``vlmhub.router`` logger, which never blocks (vlmhub.logs).

    Router settings apply from the next request on (keys, admin key, body limits, loading
    comments, CORS, loopback trust, log masking and level; vlmhub.router.settings); those that
    need a restart (host, port, log format) are named in the log and in the answer."""

    def __init__(self, ctx: Context, supervisor: Supervisor, budgets: BudgetStore, app: Starlette,
                 state_dir: Path, *, log_level_fixed: bool = False) -> None:
        self.ctx, self.supervisor, self.budgets, self.app = ctx, supervisor, budgets, app
        self.state_dir, self.log_level_fixed = state_dir, log_level_fixed
        self.path = ctx.loaded.path
        self.mtime = self._mtime()
        self.config = with_admin_key(ctx.loaded.config, state_dir)
        """The config in force (``admin_key: auto`` as its token)."""

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def __call__(self) -> dict[str, Any]:
        """Reload now; the answer of ``POST /api/reload`` (the model diff, its summary and
        ``restart_needed``). Raises ConfigError (located) for a bad file: nothing changes
        then."""
        self.mtime = self._mtime()
        try:
            loaded = load_config(self.path)
            models = resolve(
                loaded, self.ctx.registry.specs(), self.ctx.gpu, measured=self.budgets
            )
            config = with_admin_key(loaded.config, self.state_dir)
        except (ConfigError, VlmhubError, OSError) as exc:
            ROUTER.error("Not reloaded (the running config stays):\n%s", exc,
                         extra={"event": "reload", "ok": False})
            raise
        restart = apply_settings(self.app, config)  # from the next request on
        if not self.log_level_fixed:
            set_level(config.router.log_level)
        diff = self.supervisor.reload(models, loaded.config)
        self.config = config
        ROUTER.info("Reloaded %s: %s; router settings applied", self.path, diff.summary(),
                    extra={"event": "reload", "ok": True, "added": list(diff.added),
                           "removed": list(diff.removed), "changed": list(diff.changed),
                           "restart_needed": restart})
        if restart:
            ROUTER.warning("router.%s changed: it takes effect at the next start of `vlmhub "
                           "route` (the running router keeps the old value)",
                           ", router.".join(restart), extra={"restart_needed": restart})
        return {**dataclasses.asdict(diff), "summary": diff.summary(),
                "restart_needed": restart}

    def safely(self) -> None:
        """Reload, printing (not raising) a bad file's located error."""
        with contextlib.suppress(ConfigError, VlmhubError):
            self()

    async def watch(self, every_s: float = 1.0) -> None:
        """Reload whenever the file's mtime changes. Runs until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            if self._mtime() != self.mtime:
                self.safely()


async def run_route(ctx: Context, host: str | None, port: int | None,
                    kind: RuntimeKind | None, state_dir: Path | None = None,
                    watch: bool = False, log_level_fixed: bool = False) -> int:
    """Take the state dir, build the supervisor and the router, serve until stopped, then
    shut down. Blocks (asynchronously) for the router's whole life."""
    config = ctx.loaded.config
    rc = config.router
    host = host or rc.host
    port = rc.port if port is None else port
    state = (state_dir or default_state_dir()).expanduser().resolve()
    lock = lock_state_dir(state, port=port, url=f"http://{host}:{port}")  # or StateDirBusy
    try:
        return await _serve(ctx, host, port, kind, state, lock, watch, log_level_fixed)
    finally:
        lock.release()


async def _serve(ctx: Context, host: str, port: int, kind: RuntimeKind | None, state: Path,
                 lock: StateDirLock, watch: bool, log_level_fixed: bool) -> int:
    from vlmhub.control.supervisor import Supervisor

    config = with_admin_key(ctx.loaded.config, state)  # `admin_key: auto` -> the token
    rc = config.router
    if ctx.loaded.config.router.admin_key == AUTO_ADMIN_KEY:
        err_console.print(f"Admin token: {state / ADMIN_TOKEN} (mode 0600; `vlmhub status`, "
                          "`load` and `unload` read it)", highlight=False)
    budgets = BudgetStore(state / "budgets.json")  # this router's state dir owns it
    models = resolve(ctx.loaded, ctx.registry.specs(), ctx.gpu, measured=budgets)
    for m in models:  # a learned budget that no longer fits refuses its model, not the router
        if m.refusal is not None:
            err_console.print(f"[yellow]Warning:[/] {m.refusal}", highlight=False)
    gpu = ctx.gpu
    if not is_loopback(host) and host != "localhost" and not api_keys(config):
        err_console.print(f"[yellow]Warning:[/] listening on {host} without router.api_keys: "
                          "anyone who can reach this machine can use the models.",
                          highlight=False)
    metrics = RouterMetrics()
    supervisor: Supervisor | None = None
    server: RouterServer | None = None
    started = False
    try:
        runtime = make_runtime(config, kind)
        if hasattr(runtime, "state_dir"):  # engine records and keys (vlmhub.engines.keys)
            runtime.state_dir = state
        history = History()  # the last hour, for the web page's chart
        devices = getattr(runtime, "devices", None)  # process and Docker: this machine's cards
        supervisor = Supervisor(models, config, gpu, runtime, observer=Tee(metrics, history),
                                budgets=budgets, gpu_used=devices.used_gib if isinstance(
                                    devices, Devices) else None)
        app = create_app(supervisor, config, metrics=metrics)
        attach_history(app, supervisor, history)
        attach_batches(app, state)  # /v1/files, /v1/batches: <state>/batches
        attach_usage(app, state)  # tokens per key name and model: <state>/usage.json
        reloader = Reloader(ctx, supervisor, budgets, app, state,
                            log_level_fixed=log_level_fixed)
        app.state.reloader = reloader
        sup = supervisor

        def ready(bound: int) -> None:
            assert server is not None
            lock.record(port=bound, url=server.url)
            if ctx.demo:
                console.print(DEMO_BANNER, highlight=False, soft_wrap=True)
            print_summary(server.url, config, gpu, sup.snapshot())
            for h in sup.foreign:
                err_console.print(f"[yellow]Note:[/] engine {h.name} ({h.runtime}, port "
                                  f"{h.port}) is running but not in this config: vlmhub leaves "
                                  "it alone and cannot count its GPU memory. `vlmhub stop "
                                  f"{h.name}` stops it.", highlight=False)

        def stopping(in_flight: int) -> None:
            assert server is not None
            wait_s = server.drain_timeout_s = sup.config.router.shutdown_timeout_s  # reloadable
            waiting = f"waiting for {in_flight} request(s) in flight" if in_flight else "stopping"
            err_console.print(f"Shutting down: {waiting} (up to {wait_s:.0f} s); "
                              "Ctrl-C again to stop now.", highlight=False)

        server = RouterServer(app, host, port, drain_timeout_s=rc.shutdown_timeout_s,
                              on_ready=ready, on_stop=stopping)  # binds now: PortInUse
        started = True
        await supervisor.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.safely)
        watcher = asyncio.create_task(reloader.watch()) if watch else None
        # Everything built so far lives as long as the router: keep it out of the cyclic GC,
        # whose full collections otherwise stall every request for 30-50 ms (docs/benchmarks.md).
        gc.collect()
        gc.freeze()
        try:
            await server.serve()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                watcher.cancel()
    finally:
        if server is not None:
            server.sock.close()
        if supervisor is not None:
            rc = supervisor.config.router  # as the last reload left it
            if started:
                what = "Stopping engines" if rc.stop_engines_on_exit else "Leaving engines running"
                err_console.print(f"{what}...", highlight=False)
            await supervisor.shutdown(stop_engines=rc.stop_engines_on_exit,
                                      timeout_s=rc.shutdown_timeout_s)
    err_console.print("vlmhub router stopped.")
    return 0


def route(
    config: Path | None = ConfigOption,
    host: Annotated[str | None, typer.Option(
        "--host", help="Address to listen on (default: router.host, 127.0.0.1). Use 0.0.0.0 "
        "only with router.api_keys set.")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", help="Port to listen on (default: router.port, 8080).")] = None,
    gpu_gib: float | None = GpuOption,
    runtime: Annotated[RuntimeKind | None, typer.Option(
        "--runtime", help="docker, process or ray (default: runtime.kind in models.yaml).")] = None,
    state_dir: Annotated[Path | None, typer.Option(
        "--state-dir", help="The router's state dir: its lock, engine records and logs "
        "(default: $VLMHUB_STATE_DIR, else ~/.local/state/vlmhub). One router per state dir; "
        "give a second router its own to run both side by side.")] = None,
    log_level: Annotated[str | None, typer.Option(
        "--log-level", help="debug, info, warning or error (default: router.log_level, info)."
    )] = None,
    log_format: Annotated[str | None, typer.Option(
        "--log-format", help="text or json (default: router.log_format, text).")] = None,
    watch: Annotated[bool, typer.Option(
        "--watch", help="Reload models.yaml when it changes (SIGHUP and POST /api/reload "
        "always do).")] = False,
) -> None:
    """Serve every model in models.yaml behind one OpenAI-compatible endpoint, starting and
    swapping engines on demand to fit the GPU."""
    with user_errors():
        ctx = Context(config, gpu_gib)
        rc = ctx.loaded.config.router
        level, fmt = (log_level or rc.log_level).lower(), (log_format or rc.log_format).lower()
        if level not in ("debug", "info", "warning", "error") or fmt not in ("text", "json"):
            raise VlmhubError(f"--log-level {level!r} / --log-format {fmt!r}: use one of "
                              "debug|info|warning|error and text|json")
        state = (state_dir or default_state_dir()).expanduser().resolve()
        admin = admin_key_for(rc.admin_key, state, create=True)  # `auto`: the state dir's token
        configure_logs(level, "json" if fmt == "json" else "text", [*api_keys(ctx.loaded.config),
                                                                 admin or ""])
        try:
            code = server_run(run_route(ctx, host, port, runtime, state_dir, watch,
                                        log_level_fixed=log_level is not None))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            code = 130
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``route`` to ``app``."""
    app.command("route")(route)
